r"""A ``sigma`` that tunes itself towards a target relative gap.

NSO's ``sigma`` sets how far the smoothed loss lies above the clean one:
``E[L(W + U)] - L(W) = (sigma**2 / 2) tr(H) + O(sigma**4)``. The relative gap
``r = (sigma**2 / 2) tr(H) / L(W)`` is a number without units ("the smoothed
loss is ``100 r`` % above the clean loss") whose right value carries over
between models far better than ``sigma`` does. :func:`tune_sigma` reads
``tr(H)`` with :func:`nso_jax.curvature_readings` and moves a multiplier of
the configured ``sigma`` until the relative gap is the target.
"""

from __future__ import annotations

import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nso_jax._src import checks
from nso_jax._src import readings as readings_lib
from nso_jax._src import transform


class SigmaTuningState(NamedTuple):
  """The state :func:`tune_sigma` keeps beside the readings, float32 scalars.

  Attributes:
    scale: the multiplier of the configured ``sigma`` (a schedule's value at
      the step, the injected one, or a noise geometry's factor) that the next
      update uses; 1 at first.
    last_sigma: the ``sigma`` the last update used, ``scale`` times the
      configured one (0 before the first update), for logs and plots.
  """

  scale: jax.Array
  last_sigma: jax.Array


def _setting(value: Any, name: str, **interval: Any) -> float:
  """A concrete real setting within ``interval``, as a Python float."""
  if checks.is_traced(value):
    raise ValueError(
      f"`{name}` of tune_sigma must be a concrete Python float, got a traced "
      "value; the controller's settings are fixed when it is built."
    )
  return float(checks.check_scalar(value, name, **interval))


def _check_bounds(bounds: Any) -> tuple[float, float]:
  """``bounds``, two finite floats ``0 < lo <= 1 <= hi``."""
  expected = (
    "a pair (lo, hi) of finite floats with 0 < lo <= 1 <= hi, the smallest "
    "and largest multiple of the configured sigma"
  )
  try:
    lo, hi = bounds
    lo = _setting(lo, "bounds", minimum=0.0, maximum=1.0, open_minimum=True)
    hi = _setting(hi, "bounds", minimum=1.0)
  except (TypeError, ValueError):
    raise ValueError(f"`bounds` must be {expected}, got {bounds!r}.") from None
  return lo, hi


def _next_scale(
  scale: jax.Array,
  sigma: jax.Array,
  old: readings_lib.CurvatureReadings,
  new: readings_lib.CurvatureReadings,
  settings: tuple[float, float, float, float],
) -> jax.Array:
  """The scale after an update that used ``sigma``, read into ``new``."""
  target, rate, lo, hi = settings
  # The relative gap this step's sigma gives at the step's weights, from the
  # running trace (a reading of tr(H) whatever the sigma it was taken at).
  predicted = sigma**2 * new.trace / (2 * new.loss)
  log2 = math.log(2.0)
  error = jnp.log(target / jnp.where(predicted > 0, predicted, 1.0))
  error = jnp.where(predicted > 0, jnp.clip(error, -log2, log2), log2)
  # No new reading (sigma = 0, a non-finite loss) or a loss <= 0: hold.
  moved = (new.count > old.count) & (new.loss > 0) & ~jnp.isnan(predicted)
  log_scale = jnp.log(scale) + jnp.where(moved, rate * error / 2, 0.0)
  return jnp.exp(jnp.clip(log_scale, math.log(lo), math.log(hi)))


def tune_sigma(
  inner: optax.GradientTransformation,
  *,
  target: float,
  rate: float = 0.1,
  decay: float = 0.9,
  bounds: tuple[float, float] = (0.1, 10.0),
) -> optax.GradientTransformationExtraArgs:
  r"""Tunes NSO's ``sigma`` during training towards a target relative gap.

  ``inner`` is an optimizer holding one two-sided
  :func:`nso_jax.noise_stability` (e.g. :func:`nso_jax.nso`); it is wrapped
  in :func:`nso_jax.curvature_readings` (same ``grad_fn`` returning ``(loss,
  grads)``, same refusals). Each update uses ``sigma = scale * sigma_c``,
  ``sigma_c`` the configured ``sigma`` (a schedule's value at the step, the
  injected one, or a noise geometry's factor, so schedules and geometries
  still act), and then moves ``scale`` towards the relative gap ``target``:

  .. math::

    \hat r = \frac{\sigma^2 \widehat{\operatorname{tr} H}}{2 L(W)},
    \qquad \log s \mathrel{+}= \frac{\rho}{2}
    \operatorname{clip}\left(\log\frac{r^*}{\hat r}, -\log 2, \log 2\right),
    \qquad s \leftarrow \operatorname{clip}(s, lo, hi),

  with ``tr H`` the readings' running trace, ``L(W)`` the step's clean loss,
  ``rho`` the ``rate`` and ``r*`` the ``target``; ``r_hat <= 0`` (a trace
  estimate that noise or negative curvature puts at or below 0) counts as
  too small, ``+log 2``. With a noise geometry ``U = sigma S(W) Z`` the
  readings' trace is ``tr(S^2 H)`` and the same law holds. A step without a
  reading (``sigma = 0``, a non-finite loss) or with a loss ``<= 0`` leaves
  ``scale`` as it is.

  Why it converges: ``r_hat`` grows as ``sigma**2``, so with ``e = log(s /
  s*)``, ``s*`` the scale where ``r_hat = target``, ``log(target / r_hat) =
  -2 e``: the fixed point is ``r_hat = target``, ``sigma* = sqrt(2 target L
  / tr H)``. Far from it ``|e|`` falls by ``rho log(2) / 2`` per step (the
  clip: ``sigma`` changes by at most ``2**(rho / 2)`` per step, so one noisy
  reading cannot throw it); within a factor ``sqrt 2`` of it ``e`` shrinks to
  ``(1 - rho) e``, geometrically and without overshoot for ``rho <= 1``. The
  readings of ``tr H`` (``2 gap / sigma**2``) do not depend on the ``sigma``
  they were taken at, to ``O(sigma**2)``, so the running estimate stays valid
  while ``sigma`` moves and the loop has no lag. (A controller on the
  running relative gap itself would act on readings taken at earlier sigmas,
  about ``1 / (1 - decay)`` steps back, and overshoot.) Noise in the trace
  estimate, relative size ``eps``, moves ``sigma`` by about ``eps / 2``,
  averaged further over about ``1 / rho`` steps.

  The target fixes a relative gap, not the accuracy. One too large for the
  task can run away: noise that stops learning keeps the weights where the
  curvature is low, so the gap stays below the target and ``sigma`` climbs
  to ``hi`` (on MNIST-1D at target 0.1 three of four tasks stayed at chance;
  see the experiments page). Start from a working ``sigma`` and keep
  ``bounds`` narrow.

  Args:
    inner: the optimizer holding NSO, with ``one_sided=False``.
    target: the relative gap ``gap / L(W)`` to reach, a float > 0.
    rate: ``rho`` in (0, 1], the fraction of the log-error corrected per step.
    decay: the readings' ``decay`` (see :func:`nso_jax.curvature_readings`).
    bounds: ``(lo, hi)``, ``0 < lo <= 1 <= hi``: the range of ``scale``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is
    ``((inner_state, CurvatureReadings), SigmaTuningState)``, a pytree of
    arrays: the same key gives the same bits, and it resumes from a
    checkpoint.

  Raises:
    ValueError: for a bad ``target``, ``rate`` or ``bounds`` (and ``decay``)
      when built, and whatever :func:`nso_jax.curvature_readings` refuses.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import nso_jax
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0]) * w**2) + 1.0
    >>> inner = nso_jax.nso(optax.sgd(0.0), sigma=0.1, num_perturbations=4, key=0)
    >>> tx = nso_jax.tune_sigma(inner, target=0.05)
    >>> params = jnp.ones(3)
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda s: tx.update(
    ...     None, s, params, grad_fn=jax.value_and_grad(loss))[1])
    >>> for _ in range(100):
    ...   state = step(state)
    >>> (_, readings), tuned = state
    >>> print(f"relative gap {float(readings.relative_gap):.2f}")
    relative gap 0.05
    >>> sigma_star = (2 * 0.05 * 4.0 / 6.0) ** 0.5  # L = 4, tr(H) = 6
    >>> bool(abs(tuned.last_sigma / sigma_star - 1) < 0.1)
    True
  """
  settings = (
    _setting(target, "target", minimum=0.0, open_minimum=True),
    _setting(rate, "rate", minimum=0.0, maximum=1.0, open_minimum=True),
    *_check_bounds(bounds),
  )
  wrapped = readings_lib.curvature_readings(inner, decay=decay)

  def init_fn(params: Any) -> tuple[Any, SigmaTuningState]:
    one, zero = jnp.ones([], jnp.float32), jnp.zeros([], jnp.float32)
    return wrapped.init(params), SigmaTuningState(scale=one, last_sigma=zero)

  def update_fn(
    updates: Any,
    state: tuple[Any, SigmaTuningState],
    params: Any = None,
    **extra_args: Any,
  ) -> tuple[Any, tuple[Any, SigmaTuningState]]:
    readings_state, tuning = state
    used: list[jax.Array] = []

    def scale_sigma(settings: Any, sigma: Any) -> jax.Array:
      del settings
      used.append(tuning.scale * jnp.asarray(sigma, jnp.float32))
      return used[-1]

    with transform.observe_updates(scale_sigma):
      updates, new_readings_state = wrapped.update(
        updates, readings_state, params, **extra_args
      )
    # The readings refuse an update that ran no (or two) NSO updates.
    sigma = used[0]
    scale = _next_scale(
      tuning.scale, sigma, readings_state[1], new_readings_state[1], settings
    )
    return updates, (new_readings_state, SigmaTuningState(scale, sigma))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
