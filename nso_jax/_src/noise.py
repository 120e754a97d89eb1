"""Zero-mean, unit-variance noise drawn leaf by leaf over a pytree.

Every distribution here has mean 0 and variance 1 per element, so scaling by
``sigma`` gives perturbations with covariance ``sigma**2 * I`` whichever
distribution is chosen: the second-order smoothing term of noise stability
optimisation, ``(sigma**2 / 2) tr(H)``, is the same for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

NoiseName = Literal["normal", "uniform", "laplace", "rademacher"]

_SQRT3 = math.sqrt(3.0)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, dtype)


def _uniform(key, shape, dtype):
  return jax.random.uniform(key, shape, dtype, minval=-_SQRT3, maxval=_SQRT3)


def _laplace(key, shape, dtype):
  return jax.random.laplace(key, shape, dtype) * jnp.asarray(_INV_SQRT2, dtype)


def _rademacher(key, shape, dtype):
  return jax.random.rademacher(key, shape, dtype)


_SAMPLERS: dict[str, Callable[[jax.Array, tuple[int, ...], Any], jax.Array]] = {
  "normal": _normal,
  "uniform": _uniform,
  "laplace": _laplace,
  "rademacher": _rademacher,
}

NOISE_DISTRIBUTIONS: tuple[str, ...] = tuple(_SAMPLERS)


def check_noise(noise: str) -> str:
  """Returns ``noise`` if it names a distribution, else raises a ValueError."""
  if noise not in _SAMPLERS:
    raise ValueError(f"`noise` must be one of {NOISE_DISTRIBUTIONS}, got {noise!r}.")
  return noise


def _check_float_leaves(tree: Any) -> None:
  paths_and_leaves = jax.tree_util.tree_leaves_with_path(tree)
  for path, leaf in paths_and_leaves:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        "noise can only perturb floating-point parameters; the leaf at "
        f"{jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}. Keep "
        "non-trainable integer state out of the parameters."
      )


def sample_noise(key: jax.Array, tree: Any, noise: NoiseName = "normal") -> Any:
  r"""Draws unit-variance noise shaped like ``tree``, one key per leaf.

  Each leaf receives i.i.d. samples of mean 0 and variance 1, in the leaf's own
  dtype:

  * ``"normal"``: :math:`z \sim N(0, 1)`;
  * ``"uniform"``: :math:`z \sim U(-\sqrt{3}, \sqrt{3})`;
  * ``"laplace"``: :math:`z \sim \mathrm{Laplace}(0, 1/\sqrt{2})`;
  * ``"rademacher"``: :math:`z = \pm 1` with equal probability.

  The key is split once into one key per leaf (in ``jax.tree.leaves`` order),
  so the result depends only on ``key`` and the tree's structure, shapes and
  dtypes.

  Args:
    key: a typed PRNG key (see :func:`jax.random.key`).
    tree: a pytree of floating-point arrays (or shape/dtype structs).
    noise: the distribution's name.

  Returns:
    A pytree with the structure, shapes and dtypes of ``tree``.

  Raises:
    ValueError: if ``noise`` names no known distribution.
    TypeError: if a leaf of ``tree`` is not floating point.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from nso_jax import sample_noise
    >>> z = sample_noise(jax.random.key(0), {"w": jnp.zeros((2, 3))}, "rademacher")
    >>> z["w"].shape, bool(jnp.all(jnp.abs(z["w"]) == 1))
    ((2, 3), True)
  """
  sampler = _SAMPLERS[check_noise(noise)]
  _check_float_leaves(tree)
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree
  keys = jax.random.split(key, len(leaves))
  samples = [
    sampler(k, jnp.shape(leaf), jnp.result_type(leaf))
    for k, leaf in zip(keys, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, samples)
