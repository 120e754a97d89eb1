"""How much of NSO's noise half-precision parameters can hold."""

from __future__ import annotations

from typing import Any

import jax

from nso_jax._src import checks
from nso_jax._src import estimator
from nso_jax._src import noise as noise_lib
from nso_jax._src import selection


def noise_resolution(
  params: Any,
  sigma: Any,
  key: checks.KeyLike,
  *,
  noise: noise_lib.NoiseName = "normal",
  param_filter: selection.ParamFilter = None,
) -> jax.Array:
  r"""The share of the noise that the parameters' dtype can hold.

  In half precision (float16, bfloat16) a small perturbation rounds away:
  ``W + U`` is stored back as ``W`` where ``U`` is below the spacing of the
  numbers near ``W``, and NSO then drifts towards the plain gradient. This
  measures, for the noise of the first pair NSO draws from ``key``
  (``U = sigma * sample_noise(fold_in(key, 0), params, noise)``),

  .. math::

    \frac{\lVert (W + U) - W \rVert^2}{\lVert U \rVert^2}

  in float32 over the perturbed half-precision leaves, ``U``, ``W + U`` and
  ``W`` itself rounded to the leaf's dtype as they are stored, under
  :func:`jax.jit` too: there XLA may keep a half-precision value in float32
  (a ``W`` computed in the step, or ``W + U``), and the rounding is done in
  float32 so that it is not skipped. Near 1, the perturbation is the one
  asked for; well below 1, raise ``sigma`` or keep float32 master weights.
  It is exactly 1 when no perturbed leaf is in half precision, and NaN for a
  traced ``sigma`` that is negative or not finite (NSO's update is then NaN
  too). To measure the noise of :func:`nso_jax.noise_stability`'s next
  update, pass ``jax.random.split(state.key)[0]``.

  Args:
    params: a pytree of floating-point arrays, the point ``W``.
    sigma: the noise scale, a float >= 0 or a scalar array.
    key: an int seed or a PRNG key, as given to
      :func:`nso_jax.noise_stability_gradient`.
    noise: the noise distribution (see :func:`nso_jax.sample_noise`).
    param_filter: the leaves NSO perturbs (see
      :func:`nso_jax.noise_stability`).

  Returns:
    A float32 scalar in [0, 1] (up to rounding), or NaN for an invalid
    traced ``sigma``.

  Example:
    >>> import jax.numpy as jnp
    >>> import nso_jax
    >>> w = jnp.full(1000, 4.0, jnp.bfloat16)  # numbers 2**-5 apart near 4
    >>> float(nso_jax.noise_resolution(w, 1e-3, key=0)) < 0.01
    True
    >>> float(nso_jax.noise_resolution(w.astype(jnp.float32), 1e-3, key=0))
    1.0
  """
  estimator.check_sigma(sigma)
  key = checks.canonicalize_key(key)
  noise_lib.check_noise(noise)
  checks.check_float_tree(params, "params", "noise perturbs floating-point arrays")
  param_filter = estimator.check_param_filter(param_filter)
  sigma = checks.nan_unless_valid(sigma, minimum=0.0)
  return noise_lib.held_share(params, sigma, key, noise, param_filter)
