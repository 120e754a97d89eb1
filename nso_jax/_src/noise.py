"""Zero-mean, unit-variance noise drawn leaf by leaf over a pytree.

Every distribution here has mean 0 and variance 1 per element, so scaling by
``sigma`` gives perturbations with covariance ``sigma**2 * I`` whichever
distribution is chosen: the second-order smoothing term of noise stability
optimisation, ``(sigma**2 / 2) tr(H)``, is the same for all of them.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from typing import Any
from typing import Literal

import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np

from nso_jax._src import checks
from nso_jax._src import selection

NoiseName = Literal["normal", "normal_fast", "uniform", "laplace", "rademacher"]
LeafSampler = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]

_SQRT2 = math.sqrt(2.0)
_SQRT3 = math.sqrt(3.0)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_QUANTILE_BITS = 16


def _is_threefry(key: jax.Array) -> bool:
  return str(jax.random.key_impl(key)) == "threefry2x32"


def _row_major_index(shape: tuple[int, ...]) -> jax.Array:
  """The row-major index of every element of ``shape``, as uint32 iotas."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(len(shape) - 1, -1, -1):
    iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    index = index + iota * np.uint32(stride)
    stride *= shape[axis]
  return index


def _random_words(key, shape, elements_per_word=1):
  """Uniform random uint32 words for a leaf of ``shape`` (at least 1-D).

  Word ``(..., j)`` serves elements ``j * elements_per_word`` onwards of the
  leaf's last axis, so the result has shape ``shape[:-1] + (ceil(shape[-1] /
  elements_per_word),)``. For threefry keys, each threefry-2x32 hash (64
  output bits) yields two adjacent words of the last axis, where
  ``jax.random.bits`` spends one hash per word (with
  ``jax_threefry_partitionable``, the default): half the hashes for the same
  number of independent words. The hash counters are the row-major indices
  of the word pairs, computed elementwise in the leaf's shape, so a leaf
  sharded across devices is drawn shard by shard, without communication.
  Other key implementations, and leaves of 2**33 words or more, use
  ``jax.random.bits``.
  """
  last = shape[-1]
  words_shape = (*shape[:-1], -(-last // elements_per_word))
  pairs_shape = (*shape[:-1], -(-words_shape[-1] // 2))
  if not _is_threefry(key) or math.prod(pairs_shape) >= 2**32:
    return jax.random.bits(key, words_shape, jnp.uint32)
  counters = _row_major_index(pairs_shape)
  key_words = jax.random.key_data(key)
  first, second = jax_random_ext.threefry2x32_p.bind(
    key_words[0], key_words[1], jnp.zeros_like(counters), counters
  )
  return _side_by_side(jnp.stack([first, second], axis=-1), words_shape[-1])


def _side_by_side(parts: jax.Array, length: int) -> jax.Array:
  """``(..., w, m) -> (..., length)``: each word's ``m`` parts in a row, trimmed."""
  return parts.reshape((*parts.shape[:-2], -1))[..., :length]


def _normal(key, shape, dtype):
  """The distribution of ``jax.random.normal``, from cheaper words.

  The inverse transform of ``jax.random.normal``: 23 random mantissa bits give
  ``u`` uniform on the open interval (-1, 1), and ``sqrt(2) erfinv(u)`` is
  Gaussian. The words come two per threefry hash (:func:`_random_words`). It
  is computed in float32 and rounded to ``dtype`` (``jax.random.normal``
  samples half-precision dtypes from 7 or 10 mantissa bits); float64 leaves
  and non-threefry keys use ``jax.random.normal`` itself.
  """
  if jnp.dtype(dtype).itemsize > 4 or not _is_threefry(key):
    return jax.random.normal(key, shape, dtype)
  words = _random_words(key, shape)
  one = jnp.uint32(0x3F800000)  # the bits of float32 1.0
  unit = jax.lax.bitcast_convert_type((words >> 9) | one, jnp.float32) - 1.0
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  u = jnp.maximum(low, unit * (np.float32(1.0) - low) + low)
  return (np.float32(_SQRT2) * jax.lax.erf_inv(u)).astype(dtype)


@functools.cache
def gaussian_quantile_table() -> np.ndarray:
  """The 2**16 midpoint quantiles of N(0, 1), scaled to unit variance.

  Entry ``i`` is ``c * Phi^{-1}((i + 1/2) / 2**16)``, with ``c = 1.0000101``
  making the mean square exactly 1 (the discretisation trims the tails). The
  table is antisymmetric, so the mean is exactly 0.
  """
  size = 1 << _QUANTILE_BITS
  inverse_cdf = statistics.NormalDist().inv_cdf
  upper = np.array([inverse_cdf((i + 0.5) / size) for i in range(size // 2, size)])
  upper = upper / math.sqrt(np.mean(upper**2))
  table = np.concatenate([-upper[::-1], upper]).astype(np.float32)
  table.setflags(write=False)  # cached: shared by every later call
  return table


def _normal_fast(key, shape, dtype):
  """N(0, 1) at 16-bit resolution: a quantile-table lookup, two per word.

  Inverse-transform sampling with a 16-bit uniform index ``i``: ``z`` is entry
  ``i`` of :func:`gaussian_quantile_table`. Each random word gives two
  adjacent samples, and a gather replaces the inverse error function.
  """
  words = _random_words(key, shape, elements_per_word=2)
  halves = jnp.stack([words & jnp.uint32(0xFFFF), words >> 16], axis=-1)
  indices = _side_by_side(halves, shape[-1])
  table = jnp.asarray(gaussian_quantile_table())
  samples = table.at[indices.astype(jnp.int32)].get(mode="promise_in_bounds")
  return samples.astype(dtype)


def _uniform(key, shape, dtype):
  return jax.random.uniform(key, shape, dtype, minval=-_SQRT3, maxval=_SQRT3)


def _laplace(key, shape, dtype):
  return jax.random.laplace(key, shape, dtype) * jnp.asarray(_INV_SQRT2, dtype)


def _rademacher(key, shape, dtype):
  """Random signs, up to 32 from each random word (one bit per sign)."""
  words = _random_words(key, shape, elements_per_word=32)
  masks = jnp.left_shift(jnp.uint32(1), jnp.arange(32, dtype=jnp.uint32))
  signs = jnp.where((words[..., None] & masks) != 0, -1, 1).astype(dtype)
  return _side_by_side(signs, shape[-1])


_SAMPLERS: dict[str, LeafSampler] = {
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


def check_noise(noise: Any) -> str:
  """Returns ``noise`` if it names a noise sampler, else raises a ValueError."""
  return checks.check_choice(noise, NOISE_NAMES, "noise")


def sample_noise(
  key: checks.KeyLike, tree: checks.PyTree, noise: NoiseName | LeafSampler = "normal"
) -> checks.PyTree:
  r"""Draws unit-variance noise shaped like ``tree``, one key per leaf.

  Each leaf receives i.i.d. samples of mean 0 and variance 1, in the leaf's own
  dtype:

  * ``"normal"``: :math:`z \sim N(0, 1)`, by the inverse transform of
    ``jax.random.normal`` (``sqrt(2) erfinv(u)``, ``u`` uniform on (-1, 1)
    from 23 random bits), fed two random words per threefry hash where
    ``jax.random.bits`` spends one hash per word;
  * ``"normal_fast"``: :math:`N(0, 1)` at 16-bit resolution,
    :math:`z = c\,\Phi^{-1}((i + 1/2) / 2^{16})` for a uniform 16-bit ``i``
    (a table lookup, two samples per random word), with :math:`c =
    1.0000101` making the variance exactly 1; the mean is exactly 0. Its
    distance from :math:`N(0, 1)` is at most :math:`1.01 \cdot 10^{-5}` in
    CDF (Kolmogorov), its kurtosis 2.9992, and :math:`|z| \le 4.325`. NSO's
    smoothing term ``(sigma**2 / 2) tr(H)`` depends on the first two moments
    only, so it is unchanged. It skips the inverse error function and half the
    random bits: on CPU it costs about half of ``"normal"``
    (``benchmarks/noise_cost.py``);
  * ``"uniform"``: :math:`z \sim U(-\sqrt{3}, \sqrt{3})`;
  * ``"laplace"``: :math:`z \sim \mathrm{Laplace}(0, 1/\sqrt{2})`;
  * ``"rademacher"``: :math:`z = \pm 1` with equal probability, one random bit
    per element (the cheapest sampler by far);
  * a function ``(key, shape, dtype) -> array`` that draws one leaf, such as
    ``jax.random.rademacher`` (the Hessian tools draw their probes so).

  The key is split once into one key per leaf (in ``jax.tree.leaves`` order),
  so the result depends only on ``key`` and the tree's structure, shapes and
  dtypes. With threefry keys (the default), a leaf's random words are hashed
  from counters laid out in the leaf's own shape, so a leaf sharded across
  devices is drawn shard by shard, without communication.

  Args:
    key: an int seed or a PRNG key (see :func:`jax.random.key`).
    tree: a pytree of floating-point arrays (or shape/dtype structs).
    noise: the distribution's name, or a function drawing one leaf.

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
  shape_of: Callable[[Any], tuple[int, ...]]
  if callable(noise):
    sampler, shape_of = noise, jnp.shape
  else:
    # The named samplers index the last axis: scalars are one-element vectors.
    sampler, shape_of = _SAMPLERS[check_noise(noise)], lambda x: jnp.shape(x) or (1,)
  if not jax.tree.leaves(tree):
    return tree
  leaves = checks.check_float_tree(
    tree,
    "tree",
    "noise can only perturb floating-point parameters; keep non-trainable "
    "integer state out of the parameters",
  )
  keys = jax.random.split(checks.canonicalize_key(key), len(leaves))
  samples = [
    sampler(k, shape_of(leaf), jnp.result_type(leaf)).reshape(jnp.shape(leaf))
    for k, leaf in zip(keys, leaves, strict=True)
  ]
  return jax.tree.unflatten(jax.tree.structure(tree), samples)


# Below this share of the noise held (see held_share), NSO and the measures warn.
MIN_HELD_SHARE = 0.5


def round_to(x: jax.Array, dtype: Any) -> jax.Array:
  """float32 ``x`` rounded to the nearest number of ``dtype``, kept in float32.

  The rounding is done in float32 (``reduce_precision``, and by hand below
  the smallest normal number, which ``reduce_precision`` flushes to zero),
  so XLA keeps it under ``jit``, where it may skip a cast to half precision
  and back (excess precision).
  """
  info = jnp.finfo(dtype)
  rounded = jax.lax.reduce_precision(x, info.nexp, info.nmant)
  if info.minexp > jnp.finfo(jnp.float32).minexp:  # float16's subnormal numbers
    step = 2.0 ** (info.minexp - info.nmant)
    subnormal = jnp.abs(x) < 2.0**info.minexp
    rounded = jnp.where(subnormal, jnp.round(x / step) * step, rounded)
  return rounded


def held_share(
  tree: checks.PyTree,
  sigma: Any,
  key: jax.Array,
  noise: NoiseName | LeafSampler,
  param_filter: selection.ParamFilter,
  scales: list[Any] | None = None,
) -> jax.Array:
  r"""The share of the noise ``U`` that ``W + U`` holds in the leaves' dtypes.

  ``U = sigma * S * sample_noise(fold_in(key, 0), tree, noise)`` (``S`` a
  noise geometry's per-leaf ``scales``, 1 without) and
  :math:`\lVert (W + U) - W \rVert^2 / \lVert U \rVert^2`, in float32 over
  the leaves of ``tree`` in half precision that ``mask`` selects, with ``U``
  and ``W + U`` rounded to each leaf's dtype as they are stored (``W`` too:
  under ``jit`` it may be an unrounded float32 value). 1 when no such leaf
  is selected or ``U`` is zero; NaN for a NaN ``sigma``.

  Args:
    tree: the point ``W``, a pytree of floating-point arrays.
    sigma: the noise scale.
    key: a typed PRNG key; draw 0 is ``fold_in(key, 0)``.
    noise: the distribution (see :func:`sample_noise`).
    param_filter: the leaves perturbed (see :func:`selection.selection_mask`).
    scales: ``S`` per leaf, in leaf order (see ``geometry.relative_scales``).
  """
  mask = tuple(selection.selection_mask(tree, param_filter))
  return _held_share(tree, sigma, key, scales, noise=noise, mask=mask)


@functools.partial(jax.jit, static_argnames=("noise", "mask"))
def _held_share(
  tree: checks.PyTree,
  sigma: Any,
  key: jax.Array,
  scales: list[Any] | None,
  *,
  noise: NoiseName | LeafSampler,
  mask: tuple[bool, ...],
) -> jax.Array:
  """:func:`held_share`, compiled once (eagerly, its many small operations)."""
  leaves = jax.tree.leaves(tree)
  half = [
    keep and jnp.dtype(jnp.result_type(w)).itemsize < 4
    for w, keep in zip(leaves, mask, strict=True)
  ]
  if not any(half):
    return jnp.ones([], jnp.float32)
  z = jax.tree.leaves(sample_noise(jax.random.fold_in(key, 0), tree, noise))
  held, asked = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32)
  per_leaf = [None] * len(leaves) if scales is None else scales
  for is_half, w, zi, si in zip(half, leaves, z, per_leaf, strict=True):
    if is_half:
      dtype = jnp.result_type(w)
      std = jnp.asarray(sigma, jnp.float32) * (1.0 if si is None else si)
      scale = round_to(std, dtype)
      u = round_to(round_to(zi.astype(jnp.float32), dtype) * scale, dtype)
      w32 = round_to(jnp.asarray(w, jnp.float32), dtype)
      moved = round_to(w32 + u, dtype) - w32
      held += jnp.sum(moved**2)
      asked += jnp.sum(u**2)
  return jnp.where(asked == 0, 1.0, held / jnp.where(asked == 0, 1.0, asked))


def rounding_problem(
  tree: checks.PyTree,
  sigma: Any,
  key: jax.Array,
  noise: NoiseName | LeafSampler,
  param_filter: selection.ParamFilter,
  scales: list[Any] | None = None,
) -> str | None:
  """Why noise of scale ``sigma`` rounds away in ``tree``'s half-precision leaves.

  The one test behind the half-precision warnings of NSO and the measures.
  With concrete leaves it is :func:`held_share` below :data:`MIN_HELD_SHARE`;
  with traced ones (or a traced key) only the dtypes are known, and ``sigma``
  is compared with half the spacing of each selected half-precision dtype's
  numbers near 1.0. A traced ``sigma``, or one that is not positive, is not
  tested. With a noise geometry's per-leaf ``scales`` (its ``sigma`` the
  geometry's factor), only concrete leaves are tested: the scales depend on
  their values.

  Returns:
    What is wrong with ``sigma``, to complete "sigma=... is ...", or ``None``.
  """
  if checks.is_traced(sigma) or not float(sigma) > 0:
    return None
  leaves = jax.tree.leaves(tree)
  if not all(
    isinstance(w, jax.Array | np.ndarray) and jnp.issubdtype(w.dtype, jnp.floating)
    for w in leaves
  ):
    return None  # the computation names the leaf that is not a float array
  mask = selection.selection_mask(tree, param_filter)
  half = {
    jnp.dtype(jnp.result_type(w))
    for w, keep in zip(leaves, mask, strict=True)
    if keep and jnp.dtype(jnp.result_type(w)).itemsize < 4
  }
  if not half:
    return None
  names = ", ".join(sorted(d.name for d in half))
  if checks.is_traced(key) or any(checks.is_traced(w) for w in leaves):
    if scales is not None:
      return None
    spacing = max(float(jnp.finfo(d).eps) for d in half)
    if float(sigma) >= spacing / 2:
      return None
    return f"below half the spacing of {names} numbers near 1.0 ({spacing:.3g})"
  share = float(held_share(tree, float(sigma), key, noise, param_filter, scales))
  if share >= MIN_HELD_SHARE:
    return None
  return f"too small for the {names} parameters: {share:.0%} of the noise is held"
