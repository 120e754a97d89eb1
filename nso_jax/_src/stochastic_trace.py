"""Stochastic trace estimators with error bars: Hutchinson, Hutch++ and XTrace.

Every estimator sees the matrix only through a matrix-vector product
``matvec(v) -> A v`` on pytrees shaped like ``template`` (for example the loss
Hessian of :func:`nso_jax.hessian.hessian_operator`), spends a fixed budget of
``num_matvecs`` products, and returns the estimate together with its standard
error, so that a measured difference in flatness comes with an error bar.

``A`` must be symmetric (a Hessian or a Gauss-Newton matrix is). The products
of independent probes run through :mod:`nso_jax.batching`, the seam NSO's
perturbation pairs use too, as one :class:`~nso_jax.batching.Execution` value
says (its ``axis`` splits the probes over the devices of a mesh axis).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import noise as noise_lib
from nso_jax._src import operators
from nso_jax._src.checks import PyTree
from nso_jax._src.operators import Matvec

# Probe distributions, drawn leaf by leaf (through nso_jax.sample_noise) or as
# flat blocks.
PROBES: dict[str, noise_lib.LeafSampler] = {
  "rademacher": jax.random.rademacher,
  "normal": jax.random.normal,
}


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


def probe_sampler(probe: str) -> noise_lib.LeafSampler:
  return PROBES[checks.check_choice(probe, tuple(PROBES), "probe")]


def _flat_probes(
  key: jax.Array, shape: tuple[int, ...], dtype: object, probe: str
) -> jax.Array:
  return PROBES[probe](key, shape, dtype)


def mean_and_stderr(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
  num = samples.shape[0]
  mean = jnp.mean(samples)
  if num < 2:
    return mean, jnp.full_like(mean, jnp.inf)
  return mean, jnp.std(samples, ddof=1) / np.sqrt(num)


def _check_rtol(rtol: float | None) -> float | None:
  if rtol is None:
    return None
  if checks.is_traced(rtol):
    raise ValueError("`rtol` must be a concrete Python float, got a traced value.")
  return float(checks.check_scalar(rtol, "rtol", minimum=0.0))


def hutchinson(
  matvec: Matvec,
  template: PyTree,
  key: checks.KeyLike,
  *,
  num_matvecs: int,
  probe: str = "rademacher",
  rtol: float | None = None,
  execution: batching.ExecutionLike = "auto",
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
  ``jax.lax.while_loop`` over chunks of the execution's ``chunk_size`` probes
  (all of them with ``"vmap"``; no host round trips); the decision is taken
  probe by probe, so the result does not depend on the chunks, and probes
  computed after the stop are discarded.
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
    execution: how the probes' products run, a
      :class:`~nso_jax.batching.Execution` or a strategy name (``"auto"``,
      ``"vmap"``, ``"map"``, ``"unroll"``). ``"auto"`` runs them one at a time
      on CPU (least memory, and fastest on a 2-core CPU) and all at once on
      accelerators. Inside :func:`jax.shard_map`, ``Execution(axis=...)``
      splits the probes over the devices of that mesh axis (not with
      ``rtol``); the same key gives the same estimate on any number of
      devices, up to rounding.

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
  num = checks.check_positive_int(num_matvecs, "num_matvecs")
  sampler = probe_sampler(probe)
  rtol = _check_rtol(rtol)
  operators.check_template(template)
  checks.check_callable(matvec, "matvec", "(v) -> A v")
  execution = batching.as_execution(execution)
  if rtol is not None and execution.axis is not None:
    raise ValueError(
      "`rtol` stops after a data-dependent number of probes, which cannot be "
      f"split over the mesh axis {execution.axis!r} of `execution`: pass one "
      "or the other."
    )
  key = checks.canonicalize_key(key)

  def quadratic_form(probe_key: jax.Array) -> jax.Array:
    v = noise_lib.sample_noise(probe_key, template, sampler)
    return operators.tree_vdot(v, matvec(v))

  sample = lambda i: quadratic_form(jax.random.fold_in(key, i))
  resolved = batching.resolve(execution, num, sample, size_name="num_matvecs")
  if rtol is None:
    mean, stderr = mean_and_stderr(batching.map_resolved(sample, resolved))
    return TraceEstimate(mean, stderr, jnp.asarray(num, jnp.int32))
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num))
  chunk = num if resolved.strategy == "vmap" else resolved.chunk_size
  return _hutchinson_early_stop(quadratic_form, keys, rtol, chunk)


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


def _apply_to_rows(
  operator: operators.FlatOperator, execution: batching.Execution, rows: jax.Array
) -> jax.Array:
  """Returns ``rows @ A`` (``A`` symmetric), one matvec per row."""
  resolved = batching.resolve(execution, rows.shape[0])
  return batching.map_resolved(lambda i: operator.matvec(rows[i]), resolved)


def _sketching_setup(
  matvec: Matvec,
  template: PyTree,
  key: checks.KeyLike,
  num: int,
  probe: str,
  execution: batching.ExecutionLike,
) -> tuple[operators.FlatOperator, Callable[[jax.Array], jax.Array], jax.Array]:
  """Checks the arguments of Hutch++ and XTrace; their flat operator and rows.

  ``execution`` is resolved once, for the whole budget of ``num`` products;
  each block of rows then runs with that strategy and chunk.
  """
  probe_sampler(probe)
  operators.check_template(template)
  checks.check_callable(matvec, "matvec", "(v) -> A v")
  execution = batching.as_execution(execution)
  operator = operators.flatten_operator(matvec, template)
  zeros = jnp.zeros(operator.dim, operator.dtype)
  resolved = batching.resolve(execution, num, lambda _: operator.matvec(zeros))
  chunk_size = resolved.chunk_size if resolved.strategy == "map" else None
  fixed = batching.Execution(resolved.strategy, chunk_size, execution.axis)
  rows = functools.partial(_apply_to_rows, operator, fixed)
  return operator, rows, checks.canonicalize_key(key)


def hutch_pp(
  matvec: Matvec,
  template: PyTree,
  key: checks.KeyLike,
  *,
  num_matvecs: int,
  probe: str = "rademacher",
  execution: batching.ExecutionLike = "auto",
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
    execution: how the products run, a :class:`~nso_jax.batching.Execution`
      or a strategy name (see :func:`hutchinson`); its ``axis`` splits the
      products over the devices of a mesh axis, and the same key gives the
      same estimate on any number of devices, up to rounding.

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
  num = checks.check_positive_int(num_matvecs, "num_matvecs", minimum=3)
  operator, rows, key = _sketching_setup(matvec, template, key, num, probe, execution)
  sketch_size = min(num // 3, operator.dim)
  num_probes = num - 2 * sketch_size
  sketch_key, probe_key = jax.random.split(key)

  sketch = _flat_probes(sketch_key, (sketch_size, operator.dim), operator.dtype, probe)
  basis, _ = jnp.linalg.qr(rows(sketch).T)
  low_rank_trace = jnp.sum(basis.T * rows(basis.T))

  probes = _flat_probes(probe_key, (num_probes, operator.dim), operator.dtype, probe)
  probes = probes - (probes @ basis) @ basis.T
  samples = jnp.sum(probes * rows(probes), axis=1)
  mean, stderr = mean_and_stderr(samples)
  return TraceEstimate(low_rank_trace + mean, stderr, jnp.asarray(num, jnp.int32))


def xtrace(
  matvec: Matvec,
  template: PyTree,
  key: checks.KeyLike,
  *,
  num_matvecs: int,
  probe: str = "rademacher",
  execution: batching.ExecutionLike = "auto",
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
    execution: how the products run, a :class:`~nso_jax.batching.Execution`
      or a strategy name (see :func:`hutchinson`); its ``axis`` splits the
      products over the devices of a mesh axis, and the same key gives the
      same estimate on any number of devices, up to rounding.

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
  num = checks.check_positive_int(num_matvecs, "num_matvecs", minimum=2)
  operator, rows, key = _sketching_setup(matvec, template, key, num, probe, execution)
  size = min(num // 2, operator.dim)

  omega = _flat_probes(key, (size, operator.dim), operator.dtype, probe).T
  images = rows(omega.T).T  # Y = A Omega
  basis, triangle = jnp.linalg.qr(images)  # Y = Q R
  projected_images = rows(basis.T).T  # Z = A Q
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
  mean, stderr = mean_and_stderr(samples)
  exact = jnp.trace(compressed)
  if size == operator.dim:  # Q spans the whole space: tr(Q^T A Q) = tr(A)
    rank_deficient = jnp.asarray(True)
  value = jnp.where(rank_deficient, exact, mean)
  stderr = jnp.where(rank_deficient, jnp.zeros_like(stderr), stderr)
  return TraceEstimate(value, stderr, jnp.asarray(2 * size, jnp.int32))
