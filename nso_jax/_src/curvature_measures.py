"""Curvature measures of a loss: the Hessian's trace, norm, eigenvalues, density.

Each function is thin: it builds the Hessian operator of a loss over a data
set (:func:`~nso_jax.hessian.hessian_operator`, with its ``param_filter`` and
``data_axis``) and runs one estimator of :mod:`nso_jax.hessian` on it:
:func:`trace`, :func:`eigenvalues`, :func:`top_eigenvalues`,
:func:`max_eigenvalue`, :func:`spectral_density`, and
:func:`hessian_frobenius_norm` (:math:`\\operatorname{tr}(H^2)` and
:math:`\\lVert H \\rVert_F` from the squared norms of probe products).
They take the settings that measurements vary; an estimator's rarer ones
(Gaussian probes, say) are had by calling it on the operator:
``hutchinson(*hessian_operator(loss_fn, params, data), key, num_matvecs=100,
probe="normal")``. With the same settings the two give the same bits.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import geometry
from nso_jax._src import lanczos
from nso_jax._src import mesh
from nso_jax._src import noise as noise_lib
from nso_jax._src import operators
from nso_jax._src import selection
from nso_jax._src import stochastic_trace
from nso_jax._src.checks import PyTree
from nso_jax._src.operators import LossFn
from nso_jax._src.selection import ParamFilter

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")


def trace(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  num_matvecs: int = 100,
  method: str = "hutchinson",
  rtol: float | None = None,
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
  data_axis: mesh.AxisName | None = None,
) -> stochastic_trace.TraceEstimate:
  r"""The trace of the loss Hessian, with its standard error.

  :math:`\operatorname{tr}(H)` is the flatness NSO penalises: the noise-smoothed
  loss is :math:`L + \tfrac{\sigma^2}{2} \operatorname{tr}(H) + O(\sigma^4)`.
  The paper measures it with Hutchinson's estimator, Rademacher probes, at most
  100 of them and a ``1e-3`` relative early stop: pass ``rtol=1e-3`` for that
  protocol. The default spends the whole budget, so that the standard error is
  calibrated. ``"hutch++"`` and ``"xtrace"`` converge faster when a few sharp
  directions dominate the trace. The probes are Rademacher vectors, the
  lowest-variance choice; for Gaussian ones call
  :func:`~nso_jax.hessian.hutchinson` on
  :func:`~nso_jax.hessian.hessian_operator`.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`
      (see :func:`hessian_operator`).
    key: an int seed or a ``jax.random.key``.
    num_matvecs: the budget of Hessian-vector products.
    method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
    rtol: relative early-stop tolerance, Hutchinson only; ``None`` for none.
    execution: how the probes' products run, a
      :class:`~nso_jax.batching.Execution` or a strategy name (see
      :func:`~nso_jax.hessian.hutchinson`); ``"auto"`` runs them one at a
      time on CPU (least memory, fastest on small CPUs). Inside
      :func:`jax.shard_map`, ``Execution(axis=...)`` splits the probes over
      the devices of that mesh axis.
    param_filter: restricts to some leaves, e.g. one layer (see
      :func:`hessian_operator`).
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which ``data`` is split, ``loss_fn`` being the shard's loss (see
      :func:`hessian_operator`).

  Returns:
    A :class:`~nso_jax.hessian.TraceEstimate` ``(value, stderr, num_matvecs)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: jnp.mean(jnp.sum(x * w ** 2, axis=-1))  # H = 2 mean(x)
    >>> x = jnp.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    >>> estimate = hessian.trace(loss, jnp.ones(3), x, key=0, num_matvecs=10)
    >>> float(estimate.value), float(estimate.stderr)
    (12.0, 0.0)

  References:
    Zhang, Li, Ju, "Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach", TMLR 2024 (arXiv:2306.08553).
  """
  checks.check_choice(method, TRACE_METHODS, "method")
  if rtol is not None and method != "hutchinson":
    raise ValueError(
      f"`rtol`={rtol!r} applies to method='hutchinson' only; {method!r} needs "
      "its whole budget of matvecs. Pass rtol=None."
    )
  operator = operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter, data_axis=data_axis
  )
  if method == "hutchinson":
    return stochastic_trace.hutchinson(
      *operator, key, num_matvecs=num_matvecs, rtol=rtol, execution=execution
    )
  estimator = (
    stochastic_trace.hutch_pp if method == "hutch++" else stochastic_trace.xtrace
  )
  return estimator(*operator, key, num_matvecs=num_matvecs, execution=execution)


def weighted_trace(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  sigma: Any,
  num_matvecs: int = 100,
  method: str = "hutchinson",
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
  data_axis: mesh.AxisName | None = None,
) -> stochastic_trace.TraceEstimate:
  r"""The Hessian's trace weighted by the noise: :math:`\operatorname{tr}(\Sigma H)`.

  NSO with noise :math:`U = \sigma S(W) Z` (a noise geometry: per leaf,
  per filter, per element) smooths the loss into :math:`L + \frac12
  \operatorname{tr}(\Sigma H) + O(\sigma^4)`, :math:`\Sigma =
  \operatorname{diag}(\sigma^2 S(W)^2)`: this is the curvature such a run
  regularises, and twice the expectation of
  :func:`~nso_jax.hessian.noise_stability_measure` with the same ``sigma``.
  For a scalar ``sigma`` it is :math:`\sigma^2 \operatorname{tr}(H)`.

  It is :func:`trace` of the loss as a function of :math:`\delta` in
  :math:`W + \sigma S(W) \delta`, at :math:`\delta = 0`, whose Hessian is
  :math:`\sigma^2 S H S`: the same probes, methods and standard error.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters :math:`W`, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    sigma: the noise's scale as NSO takes it: a float, a pytree of floats
      per leaf, or a geometry (:func:`nso_jax.leafwise`,
      :func:`nso_jax.filterwise`, :func:`nso_jax.elementwise`) with a
      constant factor.
    num_matvecs: the budget of Hessian-vector products.
    method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
    execution: how the probes' products run (see :func:`trace`).
    param_filter: the leaves perturbed (see :func:`hessian_operator`).
    data_axis: inside :func:`jax.shard_map`, the mesh axis over which
      ``data`` is split (see :func:`trace`).

  Returns:
    A :class:`~nso_jax.hessian.TraceEstimate` of :math:`\operatorname{tr}(\Sigma H)`.

  Example:
    >>> import jax.numpy as jnp
    >>> import nso_jax
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.sum(x * w ** 2)  # H = diag(x)
    >>> x, w = jnp.array([1.0, 2.0]), jnp.array([3.0, 1.0])
    >>> estimate = hessian.weighted_trace(  # (0.1 |w|)^2 x: 0.09 + 0.02
    ...     loss, w, x, key=0, sigma=nso_jax.elementwise(0.1, eps=0.0))
    >>> print(f"{float(estimate.value):.2f}")
    0.11
  """
  operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter, data_axis=data_axis
  )
  selected, merge = selection.select(params, param_filter)
  std, _ = selection.select(geometry.noise_std(sigma, params), param_filter)

  def shifted_loss(delta: PyTree, batch: Any) -> jax.Array:
    moved = jax.tree.map(
      lambda w, s, d: w + (s * d).astype(jnp.result_type(w)), selected, std, delta
    )
    return loss_fn(merge(moved), batch)

  origin = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.result_type(w)), selected)
  return trace(
    shifted_loss,
    origin,
    data,
    key,
    num_matvecs=num_matvecs,
    method=method,
    execution=execution,
    data_axis=data_axis,
  )


def eigenvalues(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  num_eigenvalues: int = 5,
  which: str = "LA",
  num_steps: int | None = None,
  return_eigenvectors: bool = False,
  param_filter: ParamFilter = None,
  data_axis: mesh.AxisName | None = None,
) -> jax.Array | tuple[jax.Array, PyTree]:
  """Extreme eigenvalues of the loss Hessian by Lanczos.

  ``which="LA"`` gives the sharpest directions, ``"SA"`` the most negative
  curvature (a saddle's escape directions), ``"LM"`` the largest magnitudes.
  See :func:`~nso_jax.hessian.lanczos_eigenvalues` for the method.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    num_eigenvalues: how many eigenvalues.
    which: ``"LA"``, ``"SA"`` or ``"LM"``.
    num_steps: Lanczos steps; ``None`` uses ``max(40, 2 * num_eigenvalues)``,
      capped at the dimension.
    return_eigenvectors: also return the eigenvectors as a pytree with a
      leading axis of size ``num_eigenvalues``.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which ``data`` is split, ``loss_fn`` being the shard's loss (see
      :func:`hessian_operator`).

  Returns:
    The eigenvalues, or ``(eigenvalues, eigenvectors)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[1.0, -2.0, 3.0, 4.0]])  # H = diag(x)
    >>> hessian.eigenvalues(loss, jnp.ones(4), x, key=0, num_eigenvalues=2,
    ...                    which="SA").round(4)
    Array([-2.,  1.], dtype=float32)
  """
  operator = operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter, data_axis=data_axis
  )
  return lanczos.lanczos_eigenvalues(
    *operator,
    key,
    num_eigenvalues=num_eigenvalues,
    num_steps=num_steps,
    which=which,
    return_eigenvectors=return_eigenvectors,
  )


def top_eigenvalues(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  num_eigenvalues: int = 5,
  num_steps: int | None = None,
  return_eigenvectors: bool = False,
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
  data_axis: mesh.AxisName | None = None,
) -> jax.Array | tuple[jax.Array, PyTree]:
  """The ``num_eigenvalues`` largest eigenvalues of the loss Hessian, decreasing.

  Lanczos with full reorthogonalisation; ``eigenvalues(..., which="LA")``.
  For their residual bounds, call :func:`~nso_jax.hessian.lanczos_ritz` on
  :func:`hessian_operator` with the same key: the same values, and
  ``residual_bounds`` beside them.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    num_eigenvalues: how many eigenvalues.
    num_steps: Lanczos steps; ``None`` uses ``max(40, 2 * num_eigenvalues)``,
      capped at the dimension.
    return_eigenvectors: also return the eigenvectors.
    execution: where the Lanczos steps run (see
      :func:`~nso_jax.hessian.lanczos_eigenvalues`): ``"auto"`` drives them
      from Python, the basis in host memory, for a convolutional model on
      CPU called eagerly, and runs them in one compiled loop otherwise.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which ``data`` is split, ``loss_fn`` being the shard's loss (see
      :func:`hessian_operator`).

  Returns:
    The eigenvalues, or ``(eigenvalues, eigenvectors)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[1.0, -2.0, 3.0, 4.0]])
    >>> hessian.top_eigenvalues(loss, jnp.ones(4), x, key=0, num_eigenvalues=2).round(4)
    Array([4., 3.], dtype=float32)
  """
  operator = operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter, data_axis=data_axis
  )
  return lanczos.lanczos_eigenvalues(
    *operator,
    key,
    num_eigenvalues=num_eigenvalues,
    num_steps=num_steps,
    which="LA",
    return_eigenvectors=return_eigenvectors,
    execution=execution,
  )


def max_eigenvalue(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  num_iters: int = 100,
  tol: float = 1e-8,
  param_filter: ParamFilter = None,
  data_axis: mesh.AxisName | None = None,
) -> lanczos.PowerIterationResult:
  """The largest-magnitude Hessian eigenvalue by power iteration, as in the paper.

  The NSO paper (after PyHessian) reports the largest eigenvalue from power
  iteration with 100 iterations and a ``1e-8`` relative tolerance, the
  defaults here. Near a minimum the largest-magnitude eigenvalue is the
  largest one. :func:`top_eigenvalues` is more accurate per product.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    num_iters: the maximum number of iterations.
    tol: the relative change of the eigenvalue at which to stop.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which ``data`` is split, ``loss_fn`` being the shard's loss (see
      :func:`hessian_operator`).

  Returns:
    A :class:`~nso_jax.hessian.PowerIterationResult` ``(eigenvalue,
    eigenvector, num_iters)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[1.0, -2.0, 3.0, 8.0]])
    >>> round(float(hessian.max_eigenvalue(loss, jnp.ones(4), x, key=0).eigenvalue), 4)
    8.0
  """
  operator = operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter, data_axis=data_axis
  )
  return lanczos.power_iteration(*operator, key, num_iters=num_iters, tol=tol)


def spectral_density(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  num_probes: int = 4,
  num_steps: int = 64,
  grid: lanczos.DensityGrid = lanczos.DEFAULT_GRID,
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
  data_axis: mesh.AxisName | None = None,
) -> lanczos.SpectralDensity:
  """The smoothed eigenvalue density of the loss Hessian (SLQ).

  See :func:`~nso_jax.hessian.stochastic_lanczos_quadrature` for the method
  and :func:`~nso_jax.hessian.plot_spectral_density` to draw it.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    num_probes: independent Lanczos runs.
    num_steps: Lanczos steps per run.
    grid: a :class:`~nso_jax.hessian.DensityGrid`: the grid's size and
      bounds and the Gaussian kernel's bandwidth (by default 1,000 points
      over the Ritz values, smoothed by 1% of their range).
    execution: how the probes' Lanczos runs are batched, a
      :class:`~nso_jax.batching.Execution` or a strategy name (see
      :func:`~nso_jax.hessian.stochastic_lanczos_quadrature`); its ``axis``
      splits the probes over the devices of a mesh axis.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which ``data`` is split, ``loss_fn`` being the shard's loss (see
      :func:`hessian_operator`).

  Returns:
    A :class:`~nso_jax.hessian.SpectralDensity`.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.linspace(0.0, 1.0, 30)[None]
    >>> density = hessian.spectral_density(loss, jnp.ones(30), x, key=0,
    ...     num_steps=10, grid=hessian.DensityGrid(size=200))
    >>> density.grid.shape, density.density.shape
    ((200,), (200,))
  """
  operator = operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter, data_axis=data_axis
  )
  return lanczos.stochastic_lanczos_quadrature(
    *operator,
    key,
    num_probes=num_probes,
    num_steps=num_steps,
    grid=grid,
    execution=execution,
  )


class FrobeniusEstimate(NamedTuple):
  """The Hessian's Frobenius norm and :math:`\\operatorname{tr}(H^2)`, with errors.

  Attributes:
    value: :math:`\\lVert H \\rVert_F`, the square root of ``squared``.
    stderr: its standard error by the delta method,
      ``squared_stderr / (2 value)``.
    squared: the unbiased estimate of :math:`\\operatorname{tr}(H^2) =
      \\lVert H \\rVert_F^2`.
    squared_stderr: its standard error (``inf`` from a single probe).
    num_matvecs: the Hessian-vector products spent.
  """

  value: jax.Array
  stderr: jax.Array
  squared: jax.Array
  squared_stderr: jax.Array
  num_matvecs: jax.Array


def hessian_frobenius_norm(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  num_matvecs: int = 100,
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
  data_axis: mesh.AxisName | None = None,
) -> FrobeniusEstimate:
  r"""The Frobenius norm of the loss Hessian and :math:`\operatorname{tr}(H^2)`.

  With Rademacher probes :math:`z_j`, :math:`\mathbb{E}\lVert Hz
  \rVert^2 = \operatorname{tr}(H^2) = \sum_i \lambda_i^2`, so

  .. math::
    \widehat{\operatorname{tr}(H^2)} = \frac1m \sum_{j=1}^m \lVert H z_j
    \rVert^2, \qquad \widehat{\lVert H \rVert_F} =
    \sqrt{\widehat{\operatorname{tr}(H^2)}},

  one product per probe. The first is unbiased, with per-probe variance
  :math:`2 \sum_{i \neq k} (H^2)_{ik}^2` (none when :math:`H^2` is
  diagonal); its standard error is the sample one. The norm, a square root
  of it, is biased low by about :math:`\operatorname{se}^2 / (8
  \operatorname{tr}(H^2)^{3/2})` (Jensen), negligible once the relative
  error is small; its standard error is the delta method's,
  :math:`\operatorname{se} / (2 \lVert H \rVert_F)`. Unlike the trace,
  these weigh negative curvature like positive: :math:`\operatorname{tr}(H^2)
  \ge \lambda_{\max}^2` bounds the sharpest direction whatever the
  signs.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    num_matvecs: the number of probes :math:`m`.
    execution: how the probes' products run (see
      :func:`~nso_jax.hessian.hutchinson`); its ``axis`` splits the probes
      over a mesh axis.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which ``data`` is split (see :func:`hessian_operator`).

  Returns:
    A :class:`~nso_jax.hessian.FrobeniusEstimate` ``(value, stderr, squared,
    squared_stderr, num_matvecs)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[3.0, -4.0]])  # H = diag(3, -4): tr(H^2) = 25
    >>> estimate = hessian.hessian_frobenius_norm(loss, jnp.ones(2), x, key=0)
    >>> float(estimate.value), float(estimate.squared), float(estimate.stderr)
    (5.0, 25.0, 0.0)

  References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines", 1989 (applied to :math:`H^2`).
  """
  num = checks.check_positive_int(num_matvecs, "num_matvecs")
  operator = operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter, data_axis=data_axis
  )
  key = checks.canonicalize_key(key)

  def squared_norm(index: jax.Array) -> jax.Array:
    z = noise_lib.sample_noise(
      jax.random.fold_in(key, index), operator.template, jax.random.rademacher
    )
    product = operator.matvec(z)
    return operators.tree_vdot(product, product)

  samples = batching.map_indices(squared_norm, num, execution=execution)
  squared, squared_stderr = stochastic_trace.mean_and_stderr(samples)
  norm = jnp.sqrt(jnp.maximum(squared, 0.0))
  safe = jnp.where(norm > 0, norm, 1.0)
  stderr = jnp.where(norm > 0, squared_stderr / (2 * safe), jnp.sqrt(squared_stderr))
  count = jnp.asarray(num, jnp.int32)
  return FrobeniusEstimate(norm, stderr, squared, squared_stderr, count)
