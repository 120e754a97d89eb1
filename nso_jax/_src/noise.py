"""Zero-mean, unit-variance noise drawn leaf by leaf over a pytree.

Every distribution here has mean 0 and variance 1 per element, so scaling by
``sigma`` gives perturbations with covariance ``sigma**2 * I`` whichever
distribution is chosen: the second-order smoothing term of noise stability
optimisation, ``(sigma**2 / 2) tr(H)``, is the same for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import Literal

import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp

from nso_jax._src import utils

NoiseName = Literal["normal", "normal_fast", "uniform", "laplace", "rademacher"]

_SQRT3 = math.sqrt(3.0)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
# The sum of the four bytes of a uniform uint32 has mean 4 * 127.5 = 510 and
# variance 4 * (256**2 - 1) / 12 = 21845.
_BYTE_SUM_MEAN = 510
_BYTE_SUM_INV_STD = 1.0 / math.sqrt(21845.0)


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, dtype)


def _random_words(key, shape):
  """Uniform random uint32 words; for threefry keys at half the usual cost.

  With ``jax_threefry_partitionable`` (the default), ``jax.random.bits``
  spends one threefry-2x32 hash (64 output bits) per 32-bit word and XORs the
  two halves. Here each hash yields two words, the threefry construction JAX
  used before: half the hashes for the same number of independent words.
  Other key implementations fall back to ``jax.random.bits``.
  """
  if str(jax.random.key_impl(key)) != "threefry2x32":
    return jax.random.bits(key, shape, jnp.uint32)
  key_words = jax.random.key_data(key)
  counts = jax.lax.iota(jnp.uint32, math.prod(shape))
  words = jax_random_ext.threefry_2x32((key_words[0], key_words[1]), counts)
  return words.reshape(shape)


def _normal_fast(key, shape, dtype):
  """Approximately Gaussian, exactly standardised: a centred sum of 4 bytes.

  One random uint32 per element; its four bytes are i.i.d. uniform on
  {0, ..., 255}, so their sum ``s`` (a discrete Irwin-Hall variable) has mean
  510 and variance 21845 exactly, and ``(s - 510) / sqrt(21845)`` has mean 0
  and variance 1. It skips the inverse error function of
  ``jax.random.normal`` and draws its words two per threefry hash.
  """
  words = _random_words(key, shape)
  # Pairwise byte sums in one pass (SWAR): two 9-bit sums per 16-bit lane.
  mask = jnp.uint32(0x00FF00FF)
  pair_sums = (words & mask) + ((words >> 8) & mask)
  byte_sum = (pair_sums & jnp.uint32(0xFFFF)) + (pair_sums >> 16)
  centred = byte_sum.astype(jnp.int32) - _BYTE_SUM_MEAN
  compute_dtype = jnp.promote_types(dtype, jnp.float32)
  z = centred.astype(compute_dtype) * jnp.asarray(_BYTE_SUM_INV_STD, compute_dtype)
  return z.astype(dtype)


def _uniform(key, shape, dtype):
  return jax.random.uniform(key, shape, dtype, minval=-_SQRT3, maxval=_SQRT3)


def _laplace(key, shape, dtype):
  return jax.random.laplace(key, shape, dtype) * jnp.asarray(_INV_SQRT2, dtype)


def _rademacher(key, shape, dtype):
  """Random signs, 32 from each random word (one bit per sign)."""
  size = math.prod(shape)
  words = _random_words(key, (-(-size // 32),))
  masks = jnp.left_shift(jnp.uint32(1), jnp.arange(32, dtype=jnp.uint32))
  signs = jnp.where((words[:, None] & masks) != 0, -1, 1).astype(dtype)
  return signs.reshape(-1)[:size].reshape(shape)


_SAMPLERS: dict[str, Callable[[jax.Array, tuple[int, ...], Any], jax.Array]] = {
  "normal": _normal,
  "normal_fast": _normal_fast,
  "uniform": _uniform,
  "laplace": _laplace,
  "rademacher": _rademacher,
}

# The exact distributions. "normal_fast" is accepted too: it samples an
# approximation of "normal" (same first two moments), not a distribution of
# its own.
NOISE_DISTRIBUTIONS: tuple[str, ...] = ("normal", "uniform", "laplace", "rademacher")
NOISE_NAMES: tuple[str, ...] = tuple(_SAMPLERS)


def check_noise(noise: str) -> str:
  """Returns ``noise`` if it names a noise sampler, else raises a ValueError."""
  if noise not in _SAMPLERS:
    raise ValueError(f"`noise` must be one of {NOISE_NAMES}, got {noise!r}.")
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


def sample_noise(key: utils.KeyLike, tree: Any, noise: NoiseName = "normal") -> Any:
  r"""Draws unit-variance noise shaped like ``tree``, one key per leaf.

  Each leaf receives i.i.d. samples of mean 0 and variance 1, in the leaf's own
  dtype:

  * ``"normal"``: :math:`z \sim N(0, 1)`;
  * ``"normal_fast"``: an approximation of :math:`N(0, 1)` with the exact
    first two moments, :math:`z = (s - 510) / \sqrt{21845}` where ``s`` is
    the sum of the four bytes of one uniform random ``uint32`` (a discrete
    Irwin-Hall variable): mean 0 and variance 1 exactly, symmetric, bounded
    by :math:`|z| \le 3.451`, kurtosis 2.7 instead of 3, on a grid of 1021
    values. NSO's smoothing term ``(sigma**2 / 2) tr(H)`` depends on the
    first two moments only, so it is unchanged; the ``O(sigma**4)`` term
    differs slightly. With threefry keys (the default) it costs less than
    half of ``"normal"`` on CPU: the bits come two words per hash and no
    inverse error function is needed (``benchmarks/noise_cost.py``);
  * ``"uniform"``: :math:`z \sim U(-\sqrt{3}, \sqrt{3})`;
  * ``"laplace"``: :math:`z \sim \mathrm{Laplace}(0, 1/\sqrt{2})`;
  * ``"rademacher"``: :math:`z = \pm 1` with equal probability, one random bit
    per element (the cheapest sampler by far).

  The key is split once into one key per leaf (in ``jax.tree.leaves`` order),
  so the result depends only on ``key`` and the tree's structure, shapes and
  dtypes.

  Args:
    key: an int seed or a PRNG key (see :func:`jax.random.key`).
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
  keys = jax.random.split(utils.canonicalize_key(key), len(leaves))
  samples = [
    sampler(k, jnp.shape(leaf), jnp.result_type(leaf))
    for k, leaf in zip(keys, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, samples)
