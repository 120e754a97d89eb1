"""Stochastic trace estimators with error bars: Hutchinson, Hutch++ and XTrace.

Every estimator sees the matrix only through a matrix-vector product
``matvec(v) -> A v`` on pytrees shaped like ``template`` (for example the loss
Hessian of :func:`nso_jax.hessian.hessian_operator`), spends a fixed budget of
``num_matvecs`` products, and returns the estimate together with its standard
error, so that a measured difference in flatness comes with an error bar.

``A`` must be symmetric (a Hessian or a Gauss-Newton matrix is).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from nso_jax._src import utils

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

PROBES = ("rademacher", "normal")


class TraceEstimate(NamedTuple):
  """A stochastic trace estimate with its standard error.

  Attributes:
    value: the estimate of ``tr(A)``.
    stderr: its standard error, estimated from the same matvecs (``inf`` when
      a single sample leaves the spread undetermined).
    num_matvecs: the number of matrix-vector products the estimate uses (below
      the budget when Hutchinson stopped early).
  """

  value: jax.Array
  stderr: jax.Array
  num_matvecs: jax.Array


class FlatOperator(NamedTuple):
  """A pytree operator seen through flat vectors (where a basis is needed)."""

  matvec: Callable[[jax.Array], jax.Array]
  unravel: Callable[[jax.Array], PyTree]
  dim: int
  dtype: Any


# ----------------------------------------------------------------------------
# Shared helpers (also used by the Lanczos module).
# ----------------------------------------------------------------------------


def check_template(template: PyTree, name: str = "template") -> list[jax.Array]:
  """Returns the leaves of ``template``; raises if it has none or any is not float."""
  leaves_with_path = jax.tree_util.tree_leaves_with_path(template)
  if not leaves_with_path:
    raise ValueError(
      f"`{name}` is an empty pytree: there are no parameters to measure curvature over."
    )
  for path, leaf in leaves_with_path:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f"`{name}` leaf {jax.tree_util.keystr(path) or '(root)'} has dtype "
        f"{dtype}; curvature is defined for floating-point leaves only "
        "(exclude the others with `param_filter`)."
      )
  return [leaf for _, leaf in leaves_with_path]


def check_probe(probe: str) -> str:
  if probe not in PROBES:
    raise ValueError(f"`probe` must be one of {PROBES}, got {probe!r}.")
  return probe


def check_batch_size(batch_size: int | None, num: int) -> int | None:
  """Validates the probe batch size; ``None`` maps over probes one at a time."""
  if batch_size is None:
    return None
  return min(utils.check_positive_int(batch_size, "batch_size"), num)


def dimension(template: PyTree) -> int:
  return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(template)))


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """The Euclidean inner product of two pytrees, accumulated in >= float32."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  products = [
    jnp.vdot(x, y, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
    for x, y in zip(leaves_a, leaves_b, strict=True)
  ]
  return sum(products[1:], products[0])


def random_vector(key: jax.Array, shape, dtype, probe: str) -> jax.Array:
  if probe == "rademacher":
    return jax.random.rademacher(key, shape, dtype=dtype)
  return jax.random.normal(key, shape, dtype=dtype)


def sample_probe(key: jax.Array, template: PyTree, probe: str) -> PyTree:
  """Draws a probe shaped like ``template``, leaf by leaf in each leaf's dtype."""
  leaves, treedef = jax.tree.flatten(template)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [
      random_vector(k, jnp.shape(leaf), jnp.result_type(leaf), probe)
      for k, leaf in zip(keys, leaves, strict=True)
    ]
  )


def flatten_operator(matvec: Matvec, template: PyTree) -> FlatOperator:
  """Views a pytree operator as one acting on flat vectors."""
  flat, unravel_template = ravel_pytree(template)
  # Linear algebra (QR, eigh) needs at least float32, whatever the leaves hold.
  dtype = jnp.promote_types(flat.dtype, jnp.float32)

  def unravel(x: jax.Array) -> PyTree:
    return unravel_template(x.astype(flat.dtype))

  def flat_matvec(x: jax.Array) -> jax.Array:
    return ravel_pytree(matvec(unravel(x)))[0].astype(dtype)

  return FlatOperator(flat_matvec, unravel, int(flat.size), dtype)


def map_probes(fn: Callable, xs: Any, batch_size: int | None) -> Any:
  """``jax.lax.map`` over the leading axis, ``batch_size`` probes at a time."""
  return jax.lax.map(fn, xs, batch_size=batch_size)


def probe_keys(key: jax.Array, num: int) -> jax.Array:
  """One key per probe index; probe i does not depend on how many are drawn."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num))


def _mean_and_stderr(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
  num = samples.shape[0]
  mean = jnp.mean(samples)
  if num < 2:
    return mean, jnp.full_like(mean, jnp.inf)
  return mean, jnp.std(samples, ddof=1) / np.sqrt(num)


def _check_rtol(rtol: float | None) -> float | None:
  if rtol is None:
    return None
  if isinstance(rtol, jax.core.Tracer):
    raise ValueError("`rtol` must be a concrete Python float, got a traced value.")
  if not (np.ndim(rtol) == 0 and float(rtol) >= 0 and math.isfinite(float(rtol))):
    raise ValueError(f"`rtol` must be a finite float >= 0 or None, got {rtol!r}.")
  return float(rtol)


# ----------------------------------------------------------------------------
# Hutchinson.
# ----------------------------------------------------------------------------


def hutchinson(
  matvec: Matvec,
  template: PyTree,
  key: utils.KeyLike,
  *,
  num_matvecs: int,
  probe: str = "rademacher",
  rtol: float | None = None,
  batch_size: int | None = None,
) -> TraceEstimate:
  r"""Hutchinson's trace estimator with its standard error.

  With probes :math:`v_i` of independent zero-mean unit-variance entries,

  .. math::
    \operatorname{tr}(A) \approx \frac{1}{m} \sum_{i=1}^m v_i^\top A v_i,
    \qquad \operatorname{se} = \frac{s}{\sqrt m},

  where :math:`s` is the sample standard deviation of the :math:`v_i^\top A
  v_i`. Rademacher probes give the lowest variance,
  :math:`2 \sum_{i \neq j} A_{ij}^2`; Gaussian ones add :math:`2 \sum_i
  A_{ii}^2`. Probes are drawn leaf by leaf; probe :math:`i` depends only on
  ``key`` and :math:`i`.

  With ``rtol``, the estimator follows the stopping rule of PyHessian and of
  the NSO paper: it stops at the first probe where the running mean moves by
  at most ``rtol`` times its previous value. The loop is a
  ``jax.lax.while_loop`` over chunks of ``batch_size`` probes (no host round
  trips); the decision is taken probe by probe, so the result does not depend
  on ``batch_size``, and probes computed after the stop are discarded.
  Early stopping is a heuristic: the reported standard error is that of the
  probes used and is optimistic when the rule stops very early.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like ``template``; ``A`` symmetric.
    template: a pytree with the shapes and dtypes of the vectors.
    key: an int seed or a ``jax.random.key``.
    num_matvecs: the budget of matrix-vector products (one per probe).
    probe: ``"rademacher"`` (default) or ``"normal"``.
    rtol: optional relative tolerance for early stopping (the paper uses
      ``1e-3``); ``None`` spends the whole budget.
    batch_size: probes evaluated together (vmapped) inside ``jax.lax.map``;
      ``None`` evaluates one probe at a time, which uses least memory and was
      fastest on a 2-core CPU. Larger batches pay off on accelerators.

  Returns:
    A :class:`TraceEstimate`.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> diagonal = jnp.arange(1.0, 101.0)
    >>> estimate = hessian.hutchinson(
    ...     lambda v: diagonal * v, jnp.zeros(100), key=0, num_matvecs=10)
    >>> float(estimate.value)  # Rademacher probes are exact on a diagonal
    5050.0
    >>> float(estimate.stderr)
    0.0

  References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines", 1989.

    Yao, Gholami, Keutzer, Mahoney, "PyHessian: Neural networks through the lens
    of the Hessian", 2020.

    Zhang, Li, Ju, "Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach", TMLR 2024 (arXiv:2306.08553).
  """
  num = utils.check_positive_int(num_matvecs, "num_matvecs")
  probe = check_probe(probe)
  rtol = _check_rtol(rtol)
  batch_size = check_batch_size(batch_size, num)
  check_template(template)
  keys = probe_keys(utils.canonicalize_key(key), num)

  def quadratic_form(probe_key: jax.Array) -> jax.Array:
    v = sample_probe(probe_key, template, probe)
    return tree_vdot(v, matvec(v))

  if rtol is None:
    samples = map_probes(quadratic_form, keys, batch_size)
    mean, stderr = _mean_and_stderr(samples)
    return TraceEstimate(mean, stderr, jnp.asarray(num, jnp.int32))
  return _hutchinson_early_stop(quadratic_form, keys, rtol, batch_size or 1)


def _hutchinson_early_stop(
  quadratic_form: Callable[[jax.Array], jax.Array],
  keys: jax.Array,
  rtol: float,
  chunk: int,
) -> TraceEstimate:
  """Welford running mean and variance over probes, stopped by ``rtol``."""
  num = keys.shape[0]
  num_chunks = -(-num // chunk)
  padded = jnp.concatenate([keys, keys[: num_chunks * chunk - num]])
  padded = padded.reshape(num_chunks, chunk)
  dtype = jax.eval_shape(quadratic_form, keys[0]).dtype
  zero = jnp.zeros((), dtype)

  def add_sample(state, inputs):
    count, mean, m2, done = state
    value, index = inputs
    take = jnp.logical_and(~done, index < num)
    new_count = count + 1
    delta = value - mean
    new_mean = mean + delta / new_count.astype(dtype)
    new_m2 = m2 + delta * (value - new_mean)
    converged = jnp.logical_and(
      new_count >= 2, jnp.abs(new_mean - mean) <= rtol * jnp.abs(mean)
    )
    state = (
      jnp.where(take, new_count, count),
      jnp.where(take, new_mean, mean),
      jnp.where(take, new_m2, m2),
      jnp.logical_or(done, jnp.logical_and(take, converged)),
    )
    return state, None

  def cond(carry):
    chunk_index, (_, _, _, done) = carry
    return jnp.logical_and(chunk_index < num_chunks, ~done)

  def body(carry):
    chunk_index, state = carry
    values = jax.vmap(quadratic_form)(padded[chunk_index])
    indices = chunk_index * chunk + jnp.arange(chunk)
    state, _ = jax.lax.scan(add_sample, state, (values, indices))
    return chunk_index + 1, state

  init = (jnp.asarray(0, jnp.int32), (jnp.asarray(0, jnp.int32), zero, zero, False))
  _, (count, mean, m2, _) = jax.lax.while_loop(cond, body, init)
  variance = m2 / jnp.maximum(count - 1, 1).astype(dtype)
  stderr = jnp.where(
    count >= 2, jnp.sqrt(variance / count.astype(dtype)), jnp.asarray(jnp.inf, dtype)
  )
  return TraceEstimate(mean, stderr, count)


# ----------------------------------------------------------------------------
# Hutch++ and XTrace: low-rank deflation plus a Hutchinson correction.
# ----------------------------------------------------------------------------


def _apply_to_rows(
  operator: FlatOperator, rows: jax.Array, batch_size: int | None
) -> jax.Array:
  """Returns ``rows @ A`` (``A`` symmetric), one matvec per row."""
  batch_size = None if batch_size is None else min(batch_size, rows.shape[0])
  return map_probes(operator.matvec, rows, batch_size)


def hutch_pp(
  matvec: Matvec,
  template: PyTree,
  key: utils.KeyLike,
  *,
  num_matvecs: int,
  probe: str = "rademacher",
  batch_size: int | None = None,
) -> TraceEstimate:
  r"""Hutch++: Hutchinson after deflating a randomised low-rank sketch.

  The budget :math:`m` is split in thirds: :math:`k = \lfloor m/3 \rfloor`
  products :math:`A S` give an orthonormal basis :math:`Q` of the dominant
  range, :math:`k` more give :math:`\operatorname{tr}(Q^\top A Q)` exactly, and
  the remaining :math:`m - 2k` Hutchinson probes estimate the trace of the
  deflated rest :math:`(I - QQ^\top) A (I - QQ^\top)`:

  .. math::
    \operatorname{tr}(A) \approx \operatorname{tr}(Q^\top A Q)
    + \frac{1}{m - 2k} \sum_i g_i^\top (I - QQ^\top) A (I - QQ^\top) g_i.

  On a fast-decaying spectrum the deflated rest is small, so the error falls
  like :math:`1/m` instead of Hutchinson's :math:`1/\sqrt m`. The standard
  error is that of the Hutchinson part (the deflated trace is exact given
  :math:`Q`). Works on a flat view of the pytree.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like ``template``; ``A`` symmetric.
    template: a pytree with the shapes and dtypes of the vectors.
    key: an int seed or a ``jax.random.key``.
    num_matvecs: the budget of matrix-vector products, at least 3.
    probe: ``"rademacher"`` (default) or ``"normal"``.
    batch_size: products evaluated together inside ``jax.lax.map``; ``None``
      evaluates one at a time.

  Returns:
    A :class:`TraceEstimate`.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> u = jnp.linspace(-1.0, 1.0, 50)
    >>> rank_one = lambda v: 50.0 * u * jnp.vdot(u, v)  # trace 50 * |u|^2
    >>> estimate = hessian.hutch_pp(rank_one, jnp.zeros(50), key=0, num_matvecs=9)
    >>> round(float(estimate.value), 3), round(float(50.0 * u @ u), 3)
    (867.347, 867.347)

  References:
    Meyer, Musco, Musco, Woodruff, "Hutch++: Optimal stochastic trace
    estimation", SOSA 2021.
  """
  num = utils.check_positive_int(num_matvecs, "num_matvecs", minimum=3)
  probe = check_probe(probe)
  check_template(template)
  batch_size = check_batch_size(batch_size, num)
  operator = flatten_operator(matvec, template)
  key = utils.canonicalize_key(key)
  sketch_size = min(num // 3, operator.dim)
  num_probes = num - 2 * sketch_size
  sketch_key, probe_key = jax.random.split(key)

  sketch = random_vector(sketch_key, (sketch_size, operator.dim), operator.dtype, probe)
  basis, _ = jnp.linalg.qr(_apply_to_rows(operator, sketch, batch_size).T)
  low_rank_trace = jnp.sum(basis.T * _apply_to_rows(operator, basis.T, batch_size))

  probes = random_vector(probe_key, (num_probes, operator.dim), operator.dtype, probe)
  probes = probes - (probes @ basis) @ basis.T
  samples = jnp.sum(probes * _apply_to_rows(operator, probes, batch_size), axis=1)
  mean, stderr = _mean_and_stderr(samples)
  return TraceEstimate(low_rank_trace + mean, stderr, jnp.asarray(num, jnp.int32))


def xtrace(
  matvec: Matvec,
  template: PyTree,
  key: utils.KeyLike,
  *,
  num_matvecs: int,
  probe: str = "rademacher",
  batch_size: int | None = None,
) -> TraceEstimate:
  r"""XTrace: the exchangeable, leave-one-out version of Hutch++.

  With :math:`s = \lfloor m/2 \rfloor` probes :math:`\Omega = [\omega_1, \dots,
  \omega_s]`, let :math:`Q_{(i)}` be an orthonormal basis of the range of
  :math:`A \Omega` without column :math:`i`. Each probe gives an unbiased
  estimate that deflates the range of the others and uses itself as the
  Hutchinson probe,

  .. math::
    t_i = \operatorname{tr}(Q_{(i)}^\top A Q_{(i)})
    + \omega_i^\top (I - Q_{(i)} Q_{(i)}^\top) A (I - Q_{(i)} Q_{(i)}^\top)
    \omega_i,

  and XTrace is their mean, with standard error
  :math:`\operatorname{std}(t_i) / \sqrt{s}` as in the paper. All
  :math:`Q_{(i)}` come from one QR factorisation :math:`A\Omega = QR` by a
  rank-one downdate along the normalised columns of :math:`R^{-\top}`, so the
  whole estimator costs :math:`m` products. If :math:`A\Omega` is numerically
  rank deficient, or the probes span the whole space, the range of :math:`A`
  is captured and the trace :math:`\operatorname{tr}(Q^\top A Q)` is returned
  with zero error.

  The error estimate is the paper's; it treats the :math:`t_i` as independent
  though they share probes, and is a little optimistic (on a small MLP
  Hessian, the reported standard error was about 12% below the observed
  spread).

  Args:
    matvec: ``v -> A v`` on pytrees shaped like ``template``; ``A`` symmetric.
    template: a pytree with the shapes and dtypes of the vectors.
    key: an int seed or a ``jax.random.key``.
    num_matvecs: the budget of matrix-vector products, at least 2.
    probe: ``"rademacher"`` (default) or ``"normal"``.
    batch_size: products evaluated together inside ``jax.lax.map``; ``None``
      evaluates one at a time.

  Returns:
    A :class:`TraceEstimate`.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> diagonal = 0.5 ** jnp.arange(200.0)  # a fast-decaying spectrum
    >>> estimate = hessian.xtrace(
    ...     lambda v: diagonal * v, jnp.zeros(200), key=0, num_matvecs=40)
    >>> round(float(estimate.value), 4)
    2.0

  References:
    Epperly, Tropp, Webber, "XTrace: Making the most of every sample in
    stochastic trace estimation", SIAM J. Matrix Anal. Appl., 2024.
  """
  num = utils.check_positive_int(num_matvecs, "num_matvecs", minimum=2)
  probe = check_probe(probe)
  check_template(template)
  batch_size = check_batch_size(batch_size, num)
  operator = flatten_operator(matvec, template)
  key = utils.canonicalize_key(key)
  size = min(num // 2, operator.dim)

  omega = random_vector(key, (size, operator.dim), operator.dtype, probe).T
  images = _apply_to_rows(operator, omega.T, batch_size).T  # Y = A Omega
  basis, triangle = jnp.linalg.qr(images)  # Y = Q R
  projected_images = _apply_to_rows(operator, basis.T, batch_size).T  # Z = A Q
  compressed = basis.T @ projected_images
  compressed = 0.5 * (compressed + compressed.T)  # H = Q^T A Q
  coefficients = basis.T @ omega  # W = Q^T Omega

  # Column i of S (unit norm) spans the part of range(Q) orthogonal to all
  # columns of Y but the i-th: Q_(i) Q_(i)^T = Q Q^T - (Q s_i)(Q s_i)^T.
  diagonal = jnp.abs(jnp.diagonal(triangle))
  threshold = np.sqrt(operator.dim) * jnp.finfo(operator.dtype).eps * jnp.max(diagonal)
  # A (numerically) singular R means range(Y) is invariant under A and
  # tr(Q^T A Q) is the whole trace; a full-rank operator with a tiny tail can
  # also give a small R_ii, so the residual of the deflation must vanish too.
  leftover = jnp.sum(
    (omega - basis @ coefficients) * (images - projected_images @ coefficients), axis=0
  )
  rank_deficient = (jnp.min(diagonal) <= threshold) & (
    jnp.abs(jnp.mean(leftover))
    <= np.sqrt(operator.dim)
    * jnp.finfo(operator.dtype).eps
    * jnp.abs(jnp.trace(compressed))
  )
  identity = jnp.eye(size, dtype=triangle.dtype)
  safe_triangle = jnp.where(rank_deficient, identity, triangle)
  dual = jax.scipy.linalg.solve_triangular(safe_triangle, identity, lower=False).T
  dual = dual / jnp.linalg.norm(dual, axis=0)
  overlap = jnp.sum(dual * coefficients, axis=0)  # s_i^T W_i

  # u_i = (I - Q_(i) Q_(i)^T) omega_i and A u_i, for all i at once.
  residual = omega - basis @ coefficients + (basis @ dual) * overlap
  residual_image = (
    images - projected_images @ coefficients + (projected_images @ dual) * overlap
  )
  samples = (
    jnp.trace(compressed)
    - jnp.sum(dual * (compressed @ dual), axis=0)
    + jnp.sum(residual * residual_image, axis=0)
  )
  mean, stderr = _mean_and_stderr(samples)
  exact = jnp.trace(compressed)
  if size == operator.dim:  # Q spans the whole space: tr(Q^T A Q) = tr(A)
    rank_deficient = jnp.asarray(True)
  value = jnp.where(rank_deficient, exact, mean)
  stderr = jnp.where(rank_deficient, jnp.zeros_like(stderr), stderr)
  return TraceEstimate(value, stderr, jnp.asarray(2 * size, jnp.int32))
