"""Lanczos eigenvalues, power iteration and spectral density (SLQ).

The matrix is seen only through ``matvec(v) -> A v`` on pytrees shaped like
``template``; ``A`` must be symmetric. Lanczos works on a flat view of the
pytree (it needs an orthonormal basis); power iteration stays on pytrees.

Lanczos runs its steps in a ``lax.fori_loop`` with the Krylov basis, ``(m +
1) x n`` values for ``m`` steps, on the device. Where the one rule of
:func:`nso_jax.batching.default_execution` says ``"host"`` (a convolutional
operator on CPU, called eagerly, or ``execution="host"``), a Python loop
calls one compiled product per step instead, and the basis and its
reorthogonalisation live in host memory: the device holds two vectors.
"""

from __future__ import annotations

import math
from typing import Any
from typing import NamedTuple
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import mesh
from nso_jax._src import noise as noise_lib
from nso_jax._src import operators
from nso_jax._src.checks import PyTree
from nso_jax._src.operators import Matvec

WHICH = ("LA", "SA", "LM")


class Tridiagonal(NamedTuple):
  """The Lanczos decomposition ``A V^T ~ V^T T`` of a symmetric operator.

  Attributes:
    diagonal: the ``num_steps`` diagonal entries of ``T``.
    off_diagonal: its ``num_steps - 1`` off-diagonal entries (a zero marks a
      restart after an invariant subspace was found).
    basis: the orthonormal Lanczos vectors as rows, shape ``(num_steps, n)``.
  """

  diagonal: jax.Array
  off_diagonal: jax.Array
  basis: jax.Array


class RitzValues(NamedTuple):
  r"""Ritz values of a symmetric operator, with their residual bounds.

  Attributes:
    eigenvalues: the ``num_eigenvalues`` Ritz values, in the order ``which``
      asks for.
    residual_bounds: for each, :math:`|\beta_m s_{mj}|`, the last
      off-diagonal entry of the Lanczos recursion times the last component
      of the Ritz vector in the Krylov basis: the norm of :math:`A y -
      \theta y` for the unit Ritz vector :math:`y`, so (``A`` symmetric)
      an eigenvalue of ``A`` lies within it of :math:`\theta`. Zero after an
      invariant subspace was found at the last step. It is the residual of
      the exact recursion: in floating point, a well converged pair's bound
      can fall to zero, while its true residual is floored near
      :math:`\epsilon \lVert A \rVert` (``eps`` of the dtype).
    eigenvectors: the unit-norm Ritz vectors as one pytree shaped like the
      template with a leading axis of ``num_eigenvalues``, or ``None``.
  """

  eigenvalues: jax.Array
  residual_bounds: jax.Array
  eigenvectors: PyTree | None


class PowerIterationResult(NamedTuple):
  """The dominant eigenpair found by power iteration.

  Attributes:
    eigenvalue: the Rayleigh quotient of ``eigenvector``, an estimate of the
      eigenvalue of largest magnitude.
    eigenvector: a unit-norm pytree shaped like the parameters.
    num_iters: the number of iterations (matrix-vector products) used.
  """

  eigenvalue: jax.Array
  eigenvector: PyTree
  num_iters: jax.Array


class DensityGrid(NamedTuple):
  """Where a spectral density is evaluated, and how much it is smoothed.

  Attributes:
    size: the number of grid points, at least 2.
    bounds: the grid's ``(low, high)``; ``None`` spans the Ritz values padded
      by five bandwidths, so that the density integrates to one on the grid.
    bandwidth: the Gaussian kernel's standard deviation; ``None`` uses 1% of
      the spectral range (the ``bounds``, or the spread of the Ritz values).

  Example:
    >>> from nso_jax import hessian
    >>> hessian.DensityGrid(size=400, bounds=(-1.0, 5.0))
    DensityGrid(size=400, bounds=(-1.0, 5.0), bandwidth=None)
  """

  size: int = 1000
  bounds: tuple[float, float] | None = None
  bandwidth: float | None = None


DEFAULT_GRID = DensityGrid()


class SpectralDensity(NamedTuple):
  """A smoothed spectral density, ready to plot.

  Attributes:
    grid: evaluation points, shape ``(size,)`` of the :class:`DensityGrid`.
    density: the density on ``grid``; it integrates to one (the eigenvalue
      counting density is ``n * density``).
    nodes: Gauss quadrature nodes (Ritz values), ``(num_probes, num_steps)``.
    weights: their weights, each row summing to one.
    bandwidth: the standard deviation of the Gaussian smoothing kernel.
  """

  grid: jax.Array
  density: jax.Array
  nodes: jax.Array
  weights: jax.Array
  bandwidth: jax.Array


def _tridiagonal_matrix(diagonal: jax.Array, off_diagonal: jax.Array) -> jax.Array:
  return jnp.diag(diagonal) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)


def lanczos_tridiag(
  matvec: Any, v0: jax.Array, num_steps: int, key: checks.KeyLike
) -> Tridiagonal:
  r"""Lanczos tridiagonalisation with full reorthogonalisation.

  Builds an orthonormal basis :math:`V` of the Krylov space
  :math:`\mathcal K_m(A, v_0)` with :math:`V A V^\top = T` tridiagonal, in one
  ``jax.lax.fori_loop``. Every new vector is orthogonalised twice against all
  previous ones (classical Gram-Schmidt twice), which keeps the basis
  orthonormal to working precision, so no spurious copies of converged Ritz
  values appear. When the Krylov space becomes invariant (the residual
  vanishes) the recursion restarts from a random vector orthogonal to the
  basis, with a zero off-diagonal entry: the eigenvalues of ``T`` stay
  eigenvalues (or Ritz values) of ``A`` and nothing turns into NaN.

  Args:
    matvec: ``v -> A v`` on flat vectors of the same shape as ``v0``.
    v0: the starting vector, shape ``(n,)``, not zero.
    num_steps: the number of Lanczos steps (matrix-vector products), at most
      ``n``.
    key: a key for the restart vectors (used only after a breakdown).

  Returns:
    A :class:`Tridiagonal`.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> diagonal = jnp.arange(1.0, 7.0)
    >>> result = hessian.lanczos_tridiag(
    ...     lambda v: diagonal * v, jnp.ones(6), num_steps=6, key=0)
    >>> t = jnp.diag(result.diagonal) + jnp.diag(result.off_diagonal, 1)
    >>> jnp.linalg.eigvalsh(t + jnp.diag(result.off_diagonal, -1)).round(4)
    Array([1., 2., 3., 4., 5., 6.], dtype=float32)
  """
  checks.check_callable(matvec, "matvec", "(v) -> A v")
  result, _ = _tridiag_in_graph(matvec, v0, num_steps, key)
  return result


def _tridiag_in_graph(
  matvec: Any, v0: jax.Array, num_steps: int, key: checks.KeyLike
) -> tuple[Tridiagonal, jax.Array]:
  """:func:`lanczos_tridiag` and the residual norm of its last step."""
  v0 = jnp.asarray(v0)
  if v0.ndim != 1:
    raise ValueError(f"`v0` must be a flat vector, got shape {v0.shape}.")
  dim = v0.shape[0]
  num_steps = checks.check_positive_int(num_steps, "num_steps")
  if num_steps > dim:
    raise ValueError(
      f"`num_steps` must be at most the dimension {dim}, got {num_steps}."
    )
  key = checks.canonicalize_key(key)
  dtype = v0.dtype
  eps = jnp.finfo(dtype).eps
  breakdown_tol = np.sqrt(dim) * eps

  def orthogonalise(w, basis):
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)

  def body(i, state):
    basis, diagonal, off_diagonal = state
    v = basis[i]
    w = matvec(v).astype(dtype)
    alpha = jnp.vdot(v, w)
    image_norm = jnp.linalg.norm(w)
    w = orthogonalise(w, basis)
    beta = jnp.linalg.norm(w)
    breakdown = beta <= breakdown_tol * image_norm

    def restart(_):
      fresh = jax.random.normal(jax.random.fold_in(key, i), (dim,), dtype)
      fresh = orthogonalise(fresh, basis)
      fresh = fresh / jnp.linalg.norm(fresh)
      return fresh, mesh.vary_like(jnp.zeros((), dtype), beta)

    def proceed(_):
      return w / jnp.where(beta > 0, beta, 1), beta

    next_v, beta = jax.lax.cond(breakdown, restart, proceed, None)
    return (
      basis.at[i + 1].set(next_v),
      diagonal.at[i].set(alpha),
      off_diagonal.at[i].set(beta),
    )

  # A spare row and entry take the residual of the last step (then dropped).
  basis = jnp.zeros((num_steps + 1, dim), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
  # Inside shard_map, a start that varies across devices makes every carry vary.
  zeros = mesh.vary_like(jnp.zeros(num_steps, dtype), v0)
  init = (mesh.vary_like(basis, v0), zeros, zeros)
  basis, diagonal, off_diagonal = jax.lax.fori_loop(0, num_steps, body, init)
  result = Tridiagonal(diagonal, off_diagonal[: num_steps - 1], basis[:num_steps])
  return result, off_diagonal[num_steps - 1]


def _orthogonalise_on_host(w: np.ndarray, basis: np.ndarray) -> np.ndarray:
  w = w - basis.T @ (basis @ w)
  return w - basis.T @ (basis @ w)


def _tridiag_on_host(
  matvec: Any, v0: jax.Array, num_steps: int, key: jax.Array
) -> tuple[Tridiagonal, np.ndarray]:
  """:func:`lanczos_tridiag` driven from Python, the basis in host memory.

  Each step calls one compiled product (:func:`batching.host_function`) and
  orthogonalises on the host, in the dtype of ``v0``, as the in-graph loop
  does: the results agree with it to rounding. The returned basis is a NumPy
  array; the device holds only the vector being multiplied and its image.
  """
  product = batching.host_function(matvec, v0)
  dtype = np.dtype(v0.dtype)
  dim = v0.shape[0]
  breakdown_tol = np.sqrt(dim) * np.finfo(dtype).eps
  basis = np.zeros((num_steps + 1, dim), dtype)
  start = np.asarray(v0)
  basis[0] = start / np.linalg.norm(start)
  diagonal = np.zeros(num_steps, dtype)
  off_diagonal = np.zeros(num_steps, dtype)
  for i in range(num_steps):
    w = np.asarray(product(jnp.asarray(basis[i]))).astype(dtype)
    diagonal[i] = np.dot(basis[i], w)
    image_norm = np.linalg.norm(w)
    w = _orthogonalise_on_host(w, basis[: i + 1])
    beta = np.linalg.norm(w)
    if beta <= breakdown_tol * image_norm:
      drawn = jax.random.normal(jax.random.fold_in(key, i), (dim,), dtype)
      fresh = _orthogonalise_on_host(np.asarray(drawn), basis[: i + 1])
      basis[i + 1], beta = fresh / np.linalg.norm(fresh), dtype.type(0)
    else:
      basis[i + 1] = w / beta if beta > 0 else w
    off_diagonal[i] = beta
  # The basis stays a NumPy array, in host memory (typed as the field's Array).
  host_basis = cast(jax.Array, basis[:num_steps])
  result = Tridiagonal(
    jnp.asarray(diagonal), jnp.asarray(off_diagonal[: num_steps - 1]), host_basis
  )
  return result, off_diagonal[num_steps - 1]


def _tridiag(
  matvec: Any, v0: jax.Array, num_steps: int, key: jax.Array, on_host: bool
) -> tuple[Tridiagonal, Any]:
  if on_host:
    return _tridiag_on_host(matvec, v0, num_steps, key)
  return _tridiag_in_graph(matvec, v0, num_steps, key)


def _runs_on_host(
  execution: batching.ExecutionLike, num_steps: int, matvec: Any, v0: jax.Array
) -> bool:
  """Whether the one rule puts these ``num_steps`` dependent products on the host."""
  resolved = batching.resolve(execution, num_steps, lambda _: matvec(v0))
  return resolved.strategy == "host"


def _default_num_steps(num_eigenvalues: int, dim: int) -> int:
  return min(dim, max(40, 2 * num_eigenvalues))


def lanczos_eigenvalues(
  matvec: Matvec,
  template: PyTree,
  key: checks.KeyLike,
  *,
  num_eigenvalues: int,
  num_steps: int | None = None,
  which: str = "LA",
  return_eigenvectors: bool = False,
  execution: batching.ExecutionLike = "auto",
) -> jax.Array | tuple[jax.Array, PyTree]:
  r"""Extreme eigenvalues of a symmetric operator by the Lanczos method.

  Runs ``num_steps`` steps of :func:`lanczos_tridiag` from a random Rademacher
  start and returns ``num_eigenvalues`` Ritz values of the tridiagonal matrix :math:`T`.
  Extreme eigenvalues converge first, the faster the better they are separated
  from the rest of the spectrum; with ``num_steps`` equal to the dimension
  the result is exact up to rounding.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like ``template``; ``A`` symmetric.
    template: a pytree with the shapes and dtypes of the vectors.
    key: an int seed or a ``jax.random.key``.
    num_eigenvalues: how many eigenvalues, at most the dimension.
    num_steps: Lanczos steps (matrix-vector products), between
      ``num_eigenvalues`` and the dimension; ``None`` uses ``max(40, 2 *
      num_eigenvalues)`` capped at the dimension.
    which: ``"LA"`` largest algebraic (sharpest directions, in decreasing
      order), ``"SA"`` smallest algebraic (most negative curvature, in
      increasing order) or ``"LM"`` largest magnitude (decreasing ``|λ|``).
    return_eigenvectors: also return the Ritz vectors.
    execution: where the steps run: ``"auto"`` (the one rule of
      :func:`nso_jax.batching.default_execution` for ``num_steps``
      dependent products: on CPU, a convolutional operator called eagerly
      runs as ``"host"``), ``"host"`` (a Python loop over one compiled
      product, the basis in host memory; in-graph where traced) or any
      other strategy (the in-graph ``lax.fori_loop``, the basis on the
      device).

  Returns:
    The ``num_eigenvalues`` eigenvalues; with ``return_eigenvectors``, a pair
    of the eigenvalues and the unit-norm eigenvectors as one pytree shaped
    like ``template`` with a leading axis of size ``num_eigenvalues``.
    :func:`lanczos_ritz` returns their residual bounds too.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> diagonal = jnp.linspace(-1.0, 1.0, 100).at[:3].set(jnp.array([5., 4., 3.]))
    >>> hessian.lanczos_eigenvalues(
    ...     lambda v: diagonal * v, jnp.zeros(100), key=0, num_eigenvalues=3,
    ...     num_steps=30
    ... ).round(4)
    Array([5., 4., 3.], dtype=float32)

  References:
    Lanczos, "An iteration method for the solution of the eigenvalue problem of
    linear differential and integral operators", 1950.

    Ghorbani, Krishnan, Xiao, "An investigation into neural net optimization via
    Hessian eigenvalue density", ICML 2019.
  """
  result = lanczos_ritz(
    matvec,
    template,
    key,
    num_eigenvalues=num_eigenvalues,
    num_steps=num_steps,
    which=which,
    return_eigenvectors=return_eigenvectors,
    execution=execution,
  )
  if not return_eigenvectors:
    return result.eigenvalues
  return result.eigenvalues, result.eigenvectors


def lanczos_ritz(
  matvec: Matvec,
  template: PyTree,
  key: checks.KeyLike,
  *,
  num_eigenvalues: int,
  num_steps: int | None = None,
  which: str = "LA",
  return_eigenvectors: bool = False,
  execution: batching.ExecutionLike = "auto",
) -> RitzValues:
  r"""Extreme Ritz values by Lanczos, with their residual bounds.

  :func:`lanczos_eigenvalues` with the same arguments gives the same
  values; this also returns, for each Ritz pair :math:`(\theta_j, y_j)`,
  the bound :math:`\lVert A y_j - \theta_j y_j \rVert = |\beta_m s_{mj}|`,
  within which an eigenvalue of the symmetric ``A`` lies. It costs nothing
  beyond the Lanczos run: :math:`\beta_m` is the norm of the last step's
  residual and :math:`s_{mj}` the last component of the eigenvector of the
  tridiagonal matrix.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like ``template``; ``A`` symmetric.
    template: a pytree with the shapes and dtypes of the vectors.
    key: an int seed or a ``jax.random.key``.
    num_eigenvalues: how many eigenvalues, at most the dimension.
    num_steps: Lanczos steps, as in :func:`lanczos_eigenvalues`.
    which: ``"LA"``, ``"SA"`` or ``"LM"``, as in :func:`lanczos_eigenvalues`.
    return_eigenvectors: also compute the Ritz vectors.
    execution: where the steps run, as in :func:`lanczos_eigenvalues`.

  Returns:
    A :class:`RitzValues` ``(eigenvalues, residual_bounds, eigenvectors)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> diagonal = jnp.linspace(-1.0, 1.0, 100).at[:3].set(jnp.array([5., 4., 3.]))
    >>> ritz = hessian.lanczos_ritz(
    ...     lambda v: diagonal * v, jnp.zeros(100), key=0, num_eigenvalues=3,
    ...     num_steps=30)
    >>> ritz.eigenvalues.round(4)
    Array([5., 4., 3.], dtype=float32)
    >>> bool(jnp.all(ritz.residual_bounds < 1e-3))
    True
  """
  which = checks.check_choice(which, WHICH, "which")
  operators.check_template(template)
  checks.check_callable(matvec, "matvec", "(v) -> A v")
  operator = operators.flatten_operator(matvec, template)
  k = checks.check_positive_int(num_eigenvalues, "num_eigenvalues")
  if k > operator.dim:
    raise ValueError(
      "`num_eigenvalues` must be at most the dimension of the operator "
      f"({operator.dim}), got {k}."
    )
  if num_steps is None:
    num_steps = _default_num_steps(k, operator.dim)
  num_steps = checks.check_positive_int(num_steps, "num_steps")
  if not k <= num_steps <= operator.dim:
    raise ValueError(
      f"`num_steps` must be between num_eigenvalues={k} and the dimension "
      f"{operator.dim}, got {num_steps}."
    )
  start_key, restart_key = jax.random.split(checks.canonicalize_key(key))
  v0 = jax.random.rademacher(start_key, (operator.dim,), operator.dtype)
  on_host = _runs_on_host(execution, num_steps, operator.matvec, v0)
  result, last_beta = _tridiag(operator.matvec, v0, num_steps, restart_key, on_host)
  ritz_values, ritz_coordinates = jnp.linalg.eigh(
    _tridiagonal_matrix(result.diagonal, result.off_diagonal)
  )  # ascending
  if which == "LA":
    order = jnp.arange(num_steps - 1, num_steps - 1 - k, -1)
  elif which == "SA":
    order = jnp.arange(k)
  else:
    order = jnp.argsort(-jnp.abs(ritz_values))[:k]
  eigenvalues = ritz_values[order]
  bounds = jnp.abs(jnp.asarray(last_beta) * ritz_coordinates[-1, order])
  if not return_eigenvectors:
    return RitzValues(eigenvalues, bounds, None)
  coordinates = ritz_coordinates[:, order].T
  if on_host:  # (k, m) @ (m, n) on the host, where the basis is
    vectors = jnp.asarray(np.asarray(coordinates) @ result.basis)
  else:
    vectors = coordinates @ result.basis  # (k, n)
  return RitzValues(eigenvalues, bounds, jax.vmap(operator.unravel)(vectors))


def power_iteration(
  matvec: Matvec,
  template: PyTree,
  key: checks.KeyLike,
  *,
  num_iters: int = 100,
  tol: float = 1e-8,
) -> PowerIterationResult:
  r"""The eigenvalue of largest magnitude by power iteration.

  Iterates :math:`v \leftarrow A v / \lVert A v \rVert` from a Gaussian start
  in a ``jax.lax.while_loop`` and stops after ``num_iters`` products or when
  the Rayleigh quotient :math:`\lambda = v^\top A v` changes by at most ``tol``
  relative, the defaults being those of PyHessian and the NSO paper. Lanczos
  (:func:`lanczos_eigenvalues`) converges much faster for the same number of
  products; power iteration is here to reproduce the paper's numbers.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like ``template``; ``A`` symmetric.
    template: a pytree with the shapes and dtypes of the vectors.
    key: an int seed or a ``jax.random.key``.
    num_iters: the maximum number of iterations.
    tol: the relative change of the eigenvalue below which iteration stops.

  Returns:
    A :class:`PowerIterationResult`.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> diagonal = jnp.array([4.0, 1.0, 0.5, -2.0])
    >>> result = hessian.power_iteration(lambda v: diagonal * v, jnp.zeros(4), key=0)
    >>> round(float(result.eigenvalue), 4)
    4.0

  References:
    Yao, Gholami, Keutzer, Mahoney, "PyHessian: Neural networks through the lens
    of the Hessian", 2020.
  """
  num_iters = checks.check_positive_int(num_iters, "num_iters")
  if checks.is_traced(tol):
    raise ValueError("`tol` must be a concrete float >= 0, got a traced value.")
  checks.check_scalar(tol, "tol", minimum=0.0)
  operators.check_template(template)
  checks.check_callable(matvec, "matvec", "(v) -> A v")
  start = noise_lib.sample_noise(
    checks.canonicalize_key(key), template, jax.random.normal
  )

  def normalise(v):
    norm = jnp.sqrt(operators.tree_vdot(v, v))
    return jax.tree.map(lambda x: x / jnp.where(norm > 0, norm, 1).astype(x.dtype), v)

  v = normalise(start)
  dtype = jnp.result_type(*jax.tree.leaves(v))

  def cond(state):
    i, _, _, _, converged = state
    return jnp.logical_and(i < num_iters, ~converged)

  def body(state):
    i, v, _, previous, _ = state
    image = matvec(v)
    eigenvalue = operators.tree_vdot(v, image).astype(dtype)
    image_norm = jnp.sqrt(operators.tree_vdot(image, image))
    converged = jnp.logical_or(
      jnp.abs(eigenvalue - previous) <= tol * jnp.abs(eigenvalue), image_norm == 0
    )
    # Keep the vector whose Rayleigh quotient is reported on the last step.
    next_v = jax.lax.cond(converged, lambda: v, lambda: normalise(image))
    return i + 1, next_v, v, eigenvalue, converged

  inf = jnp.asarray(jnp.inf, dtype)
  init = (jnp.asarray(0, jnp.int32), v, v, inf, jnp.asarray(False))
  num_done, _, eigenvector, eigenvalue, _ = jax.lax.while_loop(cond, body, init)
  return PowerIterationResult(eigenvalue, eigenvector, num_done)


def stochastic_lanczos_quadrature(
  matvec: Matvec,
  template: PyTree,
  key: checks.KeyLike,
  *,
  num_probes: int = 4,
  num_steps: int = 64,
  grid: DensityGrid = DEFAULT_GRID,
  execution: batching.ExecutionLike = "auto",
) -> SpectralDensity:
  r"""The smoothed eigenvalue density of a symmetric operator by SLQ.

  For a unit random probe :math:`v`, ``num_steps`` Lanczos steps give the
  Gauss quadrature rule :math:`\{(\theta_j, \tau_j)\}` (Ritz values and the
  squared first components of the eigenvectors of :math:`T`) for the spectral
  measure of :math:`A` seen from :math:`v`, whose expectation over :math:`v` is
  the eigenvalue distribution. Averaging over probes and smoothing with a
  Gaussian kernel :math:`g_\sigma`,

  .. math::
    \phi(t) = \frac{1}{n_v} \sum_{l=1}^{n_v} \sum_j \tau_j^{(l)}
    g_\sigma(t - \theta_j^{(l)}),
    \qquad \int \phi = 1, \quad \int t \, \phi(t) \, dt \approx
    \operatorname{tr}(A) / n.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like ``template``; ``A`` symmetric.
    template: a pytree with the shapes and dtypes of the vectors.
    key: an int seed or a ``jax.random.key``.
    num_probes: independent Rademacher probes (Lanczos runs).
    num_steps: Lanczos steps per probe, capped at the dimension.
    grid: a :class:`DensityGrid`, the grid's size and bounds and the
      kernel's bandwidth (these settings travel together as one value, as
      they only shape the smoothed curve, not the quadrature).
    execution: how the probes' Lanczos runs are batched, a
      :class:`~nso_jax.batching.Execution` or a strategy name (``"auto"``,
      ``"vmap"``, ``"map"``, ``"unroll"``); ``"auto"`` runs one at a time on
      CPU. Under ``vmap`` the breakdown restart of each step becomes a select
      that always runs (a fresh vector orthogonalised against the basis), so
      batching pays off only where matvecs dominate. Inside
      :func:`jax.shard_map`, ``Execution(axis=...)`` splits the probes over
      the devices of that mesh axis; the same key gives the same estimate on
      any number of devices, up to rounding.

  Returns:
    A :class:`SpectralDensity`; plot it with :func:`plot_spectral_density`.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> diagonal = jnp.linspace(0.0, 1.0, 200)
    >>> density = hessian.stochastic_lanczos_quadrature(
    ...     lambda v: diagonal * v, jnp.zeros(200), key=0, num_probes=2,
    ...     num_steps=20, grid=hessian.DensityGrid(size=400))
    >>> spacing = density.grid[1] - density.grid[0]
    >>> round(float(jnp.sum(density.density) * spacing), 3)  # integrates to one
    1.0

  References:
    Ghorbani, Krishnan, Xiao, "An investigation into neural net optimization via
    Hessian eigenvalue density", ICML 2019.

    Lin, Saad, Yang, "Approximating spectral densities of large matrices", SIAM
    Review, 2016.
  """
  num_probes = checks.check_positive_int(num_probes, "num_probes")
  num_steps = checks.check_positive_int(num_steps, "num_steps")
  grid = _check_grid(grid)
  operators.check_template(template)
  checks.check_callable(matvec, "matvec", "(v) -> A v")
  operator = operators.flatten_operator(matvec, template)
  num_steps = min(num_steps, operator.dim)
  key = checks.canonicalize_key(key)

  def quadrature(index, on_host=False):
    probe_key = jax.random.fold_in(key, index)
    start_key, restart_key = jax.random.split(probe_key)
    v0 = jax.random.rademacher(start_key, (operator.dim,), operator.dtype)
    result, _ = _tridiag(operator.matvec, v0, num_steps, restart_key, on_host)
    nodes, coordinates = jnp.linalg.eigh(
      _tridiagonal_matrix(result.diagonal, result.off_diagonal)
    )
    return nodes, coordinates[0] ** 2

  first = lambda i: operator.matvec(  # the first product of probe i
    jax.random.rademacher(jax.random.fold_in(key, i), (operator.dim,), operator.dtype)
  )
  if batching.resolve(execution, num_steps, first).strategy == "host":
    rules = [quadrature(jnp.int32(i), on_host=True) for i in range(num_probes)]
    nodes, weights = (jnp.stack(parts) for parts in zip(*rules, strict=True))
  else:
    nodes, weights = batching.map_indices(quadrature, num_probes, execution=execution)
  return _smoothed_density(nodes, weights, grid)


def _check_grid(grid: DensityGrid) -> DensityGrid:
  """``grid``, checked: a :class:`DensityGrid` of valid settings."""
  if not isinstance(grid, DensityGrid):
    raise TypeError(f"`grid` must be a hessian.DensityGrid, got {grid!r}.")
  size = checks.check_positive_int(grid.size, "grid.size", minimum=2)
  if grid.bandwidth is not None:
    checks.check_scalar(
      grid.bandwidth, "grid.bandwidth", minimum=0.0, open_minimum=True
    )
  bounds = grid.bounds
  if bounds is not None and (len(bounds) != 2):
    raise ValueError(
      f"`grid.bounds` must be a pair (low, high) or None, got {bounds!r}."
    )
  if (
    bounds is not None
    and not any(checks.is_traced(b) for b in bounds)
    and not float(bounds[0]) < float(bounds[1])
  ):
    raise ValueError(f"`grid.bounds` must satisfy low < high, got {bounds!r}.")
  return grid._replace(size=size)


def _smoothed_density(
  nodes: jax.Array, weights: jax.Array, grid: DensityGrid
) -> SpectralDensity:
  """The Gaussian-smoothed density of the probes' quadrature rules on ``grid``."""
  dtype = nodes.dtype
  bandwidth, bounds = grid.bandwidth, grid.bounds
  if bounds is None:
    low, high = jnp.min(nodes), jnp.max(nodes)
    width = high - low
    # A single distinct eigenvalue: fall back to a scale set by its magnitude.
    width = jnp.where(width > 0, width, jnp.maximum(jnp.abs(high), 1))
    kernel_width = 0.01 * width if bandwidth is None else jnp.asarray(bandwidth, dtype)
    low, high = low - 5 * kernel_width, high + 5 * kernel_width
  else:
    low, high = (jnp.asarray(b, dtype) for b in bounds)
    kernel_width = (
      0.01 * (high - low) if bandwidth is None else jnp.asarray(bandwidth, dtype)
    )
  points = jnp.linspace(low, high, grid.size, dtype=dtype)
  distance = (points[:, None] - nodes.reshape(-1)) / kernel_width
  kernel = jnp.exp(-0.5 * distance**2) / (kernel_width * math.sqrt(2 * math.pi))
  density = kernel @ weights.reshape(-1) / nodes.shape[0]
  return SpectralDensity(points, density, nodes, weights, kernel_width)
