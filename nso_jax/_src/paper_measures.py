"""The flatness measures of the NSO paper, as functions of a loss and a data set.

Zhang, Li and Ju (TMLR 2024) measure the flatness that Noise Stability
Optimization trains for in these ways, besides the trace and the largest
eigenvalue (:func:`~nso_jax.hessian.trace`,
:func:`~nso_jax.hessian.max_eigenvalue`):

* :func:`noise_stability_measure`: the mean loss increase under Gaussian
  weight noise of scale ``sigma``, :math:`\\mathbb{E}_U[L(W + U)] - L(W)`;
* :func:`layer_hessian_measure`: per layer, :math:`v_l^\\top H_l v_l` with
  :math:`v = W - W^{(0)}` (and :func:`direction_curvature`, the whole
  :math:`v^\\top H v`);
* :func:`layer_traces`: the Hessian trace of every layer (leaf), by
  Hutchinson, with error bars; the layers' estimates sum to
  :func:`~nso_jax.hessian.trace`'s with the same key;
* :func:`trace_bound_term`: the data-measurable term of the paper's PAC-Bayes
  bound, :math:`\\sqrt{(\\sum_l T_l)(\\sum_l \\lVert W_l - W_l^{(0)}
  \\rVert^2) / n}`.

A "layer" is a leaf of the parameter pytree. Every function takes the data as
:func:`~nso_jax.hessian.hessian_operator` does (one batch, a list or iterator
of batches, or :class:`~nso_jax.hessian.StackedBatches`) and runs inside
``jax.jit`` with the parameters and the key as traced arguments. The ones that
repeat an evaluation (draws, probes, layers) take one ``execution`` value, a
:class:`~nso_jax.batching.Execution`, whose ``axis`` splits that work over the
devices of a mesh axis inside :func:`jax.shard_map`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import data_plans
from nso_jax._src import geometry
from nso_jax._src import groups as groups_lib
from nso_jax._src import mesh
from nso_jax._src import noise as noise_lib
from nso_jax._src import operators
from nso_jax._src import selection
from nso_jax._src import stochastic_trace
from nso_jax._src.checks import PyTree
from nso_jax._src.operators import LossFn
from nso_jax._src.selection import ParamFilter

BOUND_REDUCTIONS = ("max", "mean")


class TraceBound(NamedTuple):
  """The trace term of the NSO paper's generalisation bound, and its parts.

  Attributes:
    value: :math:`\\sqrt{T \\cdot R^2 / n}`.
    trace: :math:`T = \\sum_l \\max(T_l, 0)`, the layers' traces clipped at 0.
    squared_distance: :math:`R^2 = \\sum_l \\lVert W_l - W_l^{(0)} \\rVert^2`.
    layer_traces: the per-layer traces :math:`T_l` (unclipped), a pytree
      shaped like the parameters (``None`` where ``param_filter`` excludes).
    layer_squared_distances: the per-layer
      :math:`\\lVert W_l - W_l^{(0)} \\rVert^2`, shaped likewise.
  """

  value: jax.Array
  trace: jax.Array
  squared_distance: jax.Array
  layer_traces: PyTree
  layer_squared_distances: PyTree


def _elementwise_max(first: jax.Array, *rest: jax.Array) -> jax.Array:
  for value in rest:
    first = jnp.maximum(first, value)
  return first


class NoiseStabilityEstimate(NamedTuple):
  """A Monte Carlo estimate of the loss increase under weight noise.

  Attributes:
    value: the mean loss increase over the draws.
    stderr: its standard error, ``std(samples, ddof=1) / sqrt(num_draws)``
      (``inf`` for a single draw).
    samples: the loss increase of each draw, shape ``(num_draws,)``.
  """

  value: jax.Array
  stderr: jax.Array
  samples: jax.Array


def _mean_loss(
  loss_fn: LossFn, plan: data_plans.DataPlan, dtype: Any
) -> Callable[[PyTree], jax.Array]:
  """``params ->`` the example-weighted mean loss over the data of ``plan``."""
  zero = jnp.zeros((), dtype)

  def mean_loss(params: PyTree) -> jax.Array:
    per_batch = lambda batch, _: loss_fn(params, batch).astype(dtype)
    return data_plans.average_over_data(per_batch, plan, zero)

  return mean_loss


def noise_stability_measure(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  sigma: Any,
  num_draws: int = 20,
  noise: noise_lib.NoiseName | noise_lib.LeafSampler = "normal",
  antithetic: bool = False,
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
) -> NoiseStabilityEstimate:
  r"""Noise stability: the mean loss increase under Gaussian weight noise.

  With :math:`m` draws :math:`U_j = \sigma Z_j`, :math:`Z_j` of i.i.d.
  zero-mean unit-variance entries (standard normal by default),

  .. math::
    S_\sigma = \frac{1}{m} \sum_{j=1}^m \bigl[L(W + U_j) - L(W)\bigr],
    \qquad \operatorname{se} = \frac{s}{\sqrt m},

  with :math:`s` the sample standard deviation of the increases and
  :math:`L` the mean loss over the whole data set (batches weighted by their
  example counts). By Taylor expansion its expectation is
  :math:`\frac{\sigma^2}{2}\operatorname{tr}(H) + O(\sigma^4)`, the
  quantity NSO penalises. The paper reports it with 20 draws of
  :math:`N(0, \sigma^2 I)` (the default); the authors' image-model code
  perturbs the weight matrices only (pass a ``param_filter``) and their text
  and MNIST scripts average :math:`L(W + U)` and :math:`L(W - U)`
  (``antithetic=True``), which cancels the odd-order terms and so most of
  the variance, at two loss evaluations per draw.

  Draw :math:`j` is ``sigma * sample_noise(jax.random.fold_in(key, j),
  params, noise)``: it depends only on ``key`` and :math:`j`, so fewer draws
  with the same key are a prefix of more. The draws run through
  :func:`nso_jax.batching.map_indices`, with the clean loss :math:`L(W)` as
  one more evaluation of the same computation (so that no rounding offset
  enters the differences, and ``sigma=0`` gives exactly 0): ``num_draws + 1``
  passes over the data, ``2 * num_draws + 2`` with ``antithetic=True``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the weights :math:`W`, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`
      (see :func:`hessian_operator`).
    key: an int seed or a ``jax.random.key``.
    sigma: the noise's standard deviation :math:`\sigma \ge 0`, or a
      noise geometry as NSO takes it (a pytree of floats per leaf,
      :func:`nso_jax.leafwise`, :func:`nso_jax.filterwise`,
      :func:`nso_jax.elementwise`; not a schedule): then :math:`U_j =
      \sigma S(W) Z_j` and the expectation is :math:`\frac12
      \operatorname{tr}(\Sigma H)`, which
      :func:`~nso_jax.hessian.weighted_trace` measures. It may be
      traced; a traced one that is negative or not finite makes the
      estimate NaN, as it makes NSO's update NaN. With half-precision
      parameters, a ``sigma`` whose noise ``W + U`` mostly rounds away
      (below their spacing) warns, as NSO's ``init`` does: the estimate
      then measures rounding and can be negative.
    num_draws: the number of draws :math:`m`.
    noise: the distribution of :math:`Z` (see :func:`nso_jax.sample_noise`).
    antithetic: use :math:`\frac{1}{2}[L(W + U_j) + L(W - U_j)] - L(W)` per
      draw (same expectation up to :math:`O(\sigma^4)`, far less variance).
    execution: how the draws run, a :class:`~nso_jax.batching.Execution` or
      a strategy name (``"auto"``, ``"vmap"``, ``"map"``, ``"unroll"``; see
      :func:`nso_jax.batching.map_indices`). Inside :func:`jax.shard_map`,
      ``Execution(axis=...)`` splits the draws (and the clean evaluation)
      over the devices of that mesh axis; the same key gives the same
      estimate on any number of devices, up to rounding.
    param_filter: perturb only some leaves (see :func:`hessian_operator`).

  Returns:
    A :class:`NoiseStabilityEstimate` ``(value, stderr, samples)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[1.0, 2.0, 3.0, 4.0]])  # H = diag(x): tr(H) = 10
    >>> estimate = hessian.noise_stability_measure(
    ...     loss, jnp.ones(4), x, key=1, sigma=0.1, num_draws=500, antithetic=True)
    >>> print(f"{estimate.value:.3f} +- {estimate.stderr:.3f}")  # sigma**2/2 tr(H)
    0.050 +- 0.002

  References:
    Zhang, Li, Ju, "Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach", TMLR 2024 (arXiv:2306.08553).
  """
  num = checks.check_positive_int(num_draws, "num_draws")
  sigma, noise_scale = geometry.split(sigma)
  if callable(sigma):
    raise ValueError(
      "`sigma` must be a float >= 0 (or a noise geometry with one), got a "
      "schedule: pass its value at the step measured."
    )
  sigma = checks.check_scalar(sigma, "sigma", minimum=0.0)
  if not callable(noise):
    noise_lib.check_noise(noise)
  antithetic = checks.check_bool(antithetic, "antithetic")
  execution = batching.as_execution(execution)
  key = checks.canonicalize_key(key)
  data = data_plans.reusable(data)
  # Validates params, data, loss_fn and param_filter as every measure does.
  operators.hessian_operator(loss_fn, params, data, param_filter=param_filter)
  selected, merge = selection.select(params, param_filter)
  mask = selection.selection_mask(params, param_filter)
  scales = geometry.relative_scales(noise_scale, params, param_filter)
  scales = (
    None if scales is None else [s for s, k in zip(scales, mask, strict=True) if k]
  )
  _warn_if_noise_rounds_away(selected, sigma, key, noise, scales)
  scales = scales or [None] * len(jax.tree.leaves(selected))
  # A traced sigma follows NSO's run-time policy: an invalid one gives NaN.
  sigma = checks.nan_unless_valid(sigma, minimum=0.0)
  plan = data_plans.make_plan(data)
  loss_dtype = checks.accumulation_dtype(
    jax.eval_shape(loss_fn, params, plan.first_batch()).dtype
  )
  mean_loss = _mean_loss(loss_fn, plan, loss_dtype)

  def shifted(z: PyTree, factor: jax.Array) -> PyTree:
    leaves, treedef = jax.tree.flatten(selected)
    return merge(
      jax.tree.unflatten(
        treedef,
        [
          w + (factor * u if s is None else factor * s * u).astype(w.dtype)
          for w, u, s in zip(leaves, jax.tree.leaves(z), scales, strict=True)
        ],
      )
    )

  def perturbed_loss(j: jax.Array) -> jax.Array:
    # Index num_draws is the clean loss, through the very same computation
    # (W + 0 U = W): the increases carry no rounding offset, and sigma = 0
    # gives exactly 0.
    scale = jnp.where(j < num, sigma, 0.0)
    z = noise_lib.sample_noise(jax.random.fold_in(key, j), selected, noise)
    value = mean_loss(shifted(z, scale))
    if antithetic:
      value = 0.5 * (value + mean_loss(shifted(z, -scale)))
    return value

  resolved = batching.resolve(execution, num + 1, perturbed_loss, size_name="num_draws")
  values = batching.map_resolved(perturbed_loss, resolved)
  samples = values[:num] - values[num]
  mean, stderr = stochastic_trace.mean_and_stderr(samples)
  return NoiseStabilityEstimate(mean, stderr, samples)


def _warn_if_noise_rounds_away(
  selected: PyTree, sigma: Any, key: jax.Array, noise: Any, scales: Any
) -> None:
  """Warns, as NSO's ``init`` does, when half precision rounds the noise away.

  The test is NSO's (``noise.rounding_problem``), on the first draw's noise:
  with concrete parameters, less than half of its energy held by
  ``W + U``; under ``jit``, a ``sigma`` below half the spacing of the
  dtype's numbers near 1.0.
  """
  what = noise_lib.rounding_problem(selected, sigma, key, noise, None, scales)
  if what is not None:
    warnings.warn(
      f"noise_stability_measure: sigma={float(sigma):.3g} is {what}; W + U "
      "rounds back to W (or a whole spacing away), so the loss increases "
      "measure rounding, not curvature, and can be negative. Raise sigma, or "
      "measure float32 copies of the parameters "
      "(jax.tree.map(lambda w: w.astype(jnp.float32), params)).",
      stacklevel=3,
    )


def direction_curvature(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  direction: PyTree,
  *,
  param_filter: ParamFilter = None,
  data_axis: mesh.AxisName | None = None,
) -> jax.Array:
  r"""The curvature along a direction, :math:`v^\top H v`, from one product.

  With :math:`v = W - W^{(0)}` (``direction = params - reference``), this is
  the whole-network Hessian-based measure whose per-layer parts
  :func:`layer_hessian_measure` returns; along a unit vector it is the
  directional second derivative of the loss. Exact: one Hessian-vector
  product over the data set, no randomness.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the point at which the Hessian is taken, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    direction: :math:`v`, a pytree with the structure and shapes of ``params``.
    param_filter: use only some leaves of :math:`v` (the Hessian block of the
      selected leaves; see :func:`hessian_operator`).
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which ``data`` is split, with ``loss_fn`` the loss of this device's
      shard (see :func:`hessian_operator`).

  Returns:
    :math:`v^\top H v`, a scalar (float32, or float64 for float64 leaves).

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[1.0, 2.0, 3.0]])  # H = diag(1, 2, 3)
    >>> hessian.direction_curvature(loss, jnp.zeros(3), x, jnp.array([1.0, 1.0, 2.0]))
    Array(15., dtype=float32)

  References:
    Ju, Li, Zhang, "Robust Fine-Tuning of Deep Neural Networks with
    Hessian-based Generalization Guarantees", ICML 2022.

    Zhang, Li, Ju, "Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach", TMLR 2024 (arXiv:2306.08553).
  """
  operator = operators.hessian_operator(
    loss_fn,
    params,
    data_plans.reusable(data),
    param_filter=param_filter,
    data_axis=data_axis,
  )
  v = selection.restrict_like(operator.template, direction, params, "direction")
  return operators.tree_vdot(v, operator.matvec(v))


def layer_hessian_measure(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  reference: PyTree,
  *,
  block_diagonal: bool = True,
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
  group_by: groups_lib.GroupBy = None,
) -> PyTree:
  r"""The paper's Hessian-based measure: per layer, :math:`v_l^\top H_l v_l`.

  With :math:`v = W - W^{(0)}` (``params - reference``, e.g. the fine-tuned
  minus the pretrained weights) and :math:`H_l` the diagonal block of the
  loss Hessian for leaf :math:`l`,

  .. math::
    M_l = v_l^\top H_l v_l = v_l^\top \bigl[H (v_l \oplus 0)\bigr]_l,

  one Hessian-vector product per leaf, with :math:`v` zero outside leaf
  :math:`l`. It is exact (no randomness). This is the quantity of the
  authors' Hessian-based generalisation analysis (Ju, Li, Zhang, 2022), which
  the NSO paper measures per layer. The whole-network
  :math:`v^\top H v = \sum_l M_l + \sum_{l \neq k} v_l^\top H_{lk} v_k` is
  :func:`direction_curvature` (one product).

  With ``block_diagonal=False`` it returns instead
  :math:`v_l^\top (H v)_l`, from one product with the whole :math:`v`: the
  split of :math:`v^\top H v` over the leaves (they sum to it), cross blocks
  included. That is what the authors' scripts compute
  (``compute_hessians_quantity`` in VirtuosoResearch/Noise-stability-optimization,
  which also take the maximum over mini-batches; for a freshly initialised
  head they use the reference 0).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the weights :math:`W`, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    reference: :math:`W^{(0)}`, a pytree with the structure and shapes of
      ``params``.
    block_diagonal: ``True`` for :math:`v_l^\top H_l v_l` (one product per
      leaf), ``False`` for :math:`v_l^\top (H v)_l` (one product in all).
    execution: how the per-leaf products run, a
      :class:`~nso_jax.batching.Execution` or a strategy name (see
      :func:`nso_jax.batching.map_indices`); inside :func:`jax.shard_map`,
      ``Execution(axis=...)`` splits the leaves over the devices of that mesh
      axis.
    param_filter: measure only some leaves (see :func:`hessian_operator`).
    group_by: measure modules instead of leaves: ``None`` (per leaf), a
      positive int (leaves sharing that many leading path keys form a
      module, ``1`` puts ``"Dense_0"``'s kernel and bias together) or a
      callable ``(path) -> name``. A module's :math:`M_g = v_g^\top H_{gg}
      v_g` takes its whole diagonal block, cross terms between its leaves
      included (one product per module); with ``block_diagonal=False`` the
      leaves' values are added.

  Returns:
    A pytree shaped like ``params`` of scalars :math:`M_l` (float32, or
    float64 for float64 leaves), ``None`` where ``param_filter`` excludes;
    with ``group_by``, a dict from module name to :math:`M_g`.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda p, x: 0.5 * jnp.mean((x @ p["a"] + x @ p["b"]) ** 2)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> reference = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    >>> x = jnp.eye(2)  # every block of H is I / 2
    >>> measure = hessian.layer_hessian_measure(loss, params, x, reference)
    >>> {name: float(value) for name, value in measure.items()}
    {'a': 1.0, 'b': 1.0}
    >>> float(hessian.direction_curvature(loss, params, x, params))  # cross terms
    4.0

  References:
    Ju, Li, Zhang, "Robust Fine-Tuning of Deep Neural Networks with
    Hessian-based Generalization Guarantees", ICML 2022.

    Zhang, Li, Ju, "Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach", TMLR 2024 (arXiv:2306.08553).
  """
  block_diagonal = checks.check_bool(block_diagonal, "block_diagonal")
  execution = batching.as_execution(execution)
  group_by = groups_lib.check_group_by(group_by)
  operator = operators.hessian_operator(
    loss_fn, params, data_plans.reusable(data), param_filter=param_filter
  )
  v = selection.restrict_like(operator.template, reference, params, "reference")
  v = jax.tree.map(lambda w, w0: w - w0, operator.template, v)
  if group_by is not None:
    names = groups_lib.group_names(operator.template, group_by)
    if not block_diagonal:
      forms = jax.tree.leaves(jax.tree.map(operators.leaf_vdot, v, operator.matvec(v)))
      return groups_lib.sum_by_group(forms, names)
    return _module_hessian_measure(operator, v, names, execution)
  if not block_diagonal:
    return jax.tree.map(operators.leaf_vdot, v, operator.matvec(v))
  leaves, treedef = jax.tree.flatten(v)

  def block(index: jax.Array) -> jax.Array:
    masked = [
      jnp.where(index == k, leaf, jnp.zeros_like(leaf)) for k, leaf in enumerate(leaves)
    ]
    product = jax.tree.leaves(operator.matvec(jax.tree.unflatten(treedef, masked)))
    dtype = checks.accumulation_dtype(jnp.result_type(*leaves))
    forms = jnp.stack(
      [
        operators.leaf_vdot(a, b).astype(dtype)
        for a, b in zip(leaves, product, strict=True)
      ]
    )
    return forms[index]

  values = batching.map_indices(block, len(leaves), execution=execution)
  return jax.tree.unflatten(
    treedef,
    [
      values[k].astype(checks.accumulation_dtype(leaf.dtype))
      for k, leaf in enumerate(leaves)
    ],
  )


def _module_hessian_measure(
  operator: operators.LinearOperator,
  v: PyTree,
  names: list[str],
  execution: batching.Execution,
) -> dict[str, jax.Array]:
  """Per module ``g``, :math:`v_g^\top H_{gg} v_g`: one product per module."""
  modules = groups_lib.distinct(names)
  module_of_leaf = [modules.index(name) for name in names]
  leaves, treedef = jax.tree.flatten(v)
  dtype = checks.accumulation_dtype(jnp.result_type(*leaves))

  def block(index: jax.Array) -> jax.Array:
    masked = [
      jnp.where(index == g, leaf, jnp.zeros_like(leaf))
      for g, leaf in zip(module_of_leaf, leaves, strict=True)
    ]
    product = jax.tree.leaves(operator.matvec(jax.tree.unflatten(treedef, masked)))
    forms = [
      operators.leaf_vdot(a, b).astype(dtype)
      for a, b in zip(masked, product, strict=True)
    ]
    return sum(forms[1:], forms[0])

  values = batching.map_indices(block, len(modules), execution=execution)
  return {name: values[g] for g, name in enumerate(modules)}


def _layer_trace_sampler(
  operator: operators.LinearOperator, key: jax.Array
) -> Callable[[jax.Array], PyTree]:
  """Probe ``index ->`` per leaf :math:`z_l \\cdot (H z)_l`."""

  def per_leaf(index: jax.Array) -> PyTree:
    # The probes of stochastic_trace.hutchinson: same key, Rademacher entries.
    z = noise_lib.sample_noise(
      jax.random.fold_in(key, index), operator.template, jax.random.rademacher
    )
    return jax.tree.map(operators.leaf_vdot, z, operator.matvec(z))

  return per_leaf


def layer_traces(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  num_matvecs: int = 100,
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
  group_by: groups_lib.GroupBy = None,
  data_axis: mesh.AxisName | None = None,
) -> PyTree:
  r"""The Hessian trace of every layer (leaf), by Hutchinson, with error bars.

  For leaf :math:`l` with Hessian block :math:`H_{ll}`, and Rademacher probes
  :math:`z` (i.i.d. random signs) over the whole pytree,

  .. math::
    \operatorname{tr}(H_{ll}) \approx \frac{1}{m} \sum_{j=1}^m
    z_{j,l}^\top (H z_j)_l, \qquad \operatorname{se}_l = \frac{s_l}{\sqrt m}.

  Each probe costs one Hessian-vector product for all the leaves at once.
  The estimator is unbiased: :math:`z_l^\top (H z)_l = z_l^\top H_{ll} z_l +
  \sum_{k \neq l} z_l^\top H_{lk} z_k`, and the cross terms have mean zero as
  :math:`z_l` and :math:`z_k` are independent (they add variance, not bias).
  The probes are those of :func:`~nso_jax.hessian.hutchinson`, drawn from the
  same key the same way, so the per-leaf estimates sum to
  ``hessian.trace(..., method="hutchinson")`` with the same key and
  ``num_matvecs`` (up to rounding). This is how the authors measure layer
  traces (``compute_hessians_trace`` in their code, after PyHessian), there
  with the ``1e-3`` early stop of :func:`~nso_jax.hessian.trace`.

  To report modules instead of leaves (a weight and its bias together), pass
  ``group_by``: the per-probe samples of a module's leaves are added before
  the mean and the standard error are taken, so a module's error bar
  accounts for the correlation of its leaves' estimates.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    num_matvecs: the number of Rademacher probes :math:`m` (one product
      each).
    execution: how the probes' products run, a
      :class:`~nso_jax.batching.Execution` or a strategy name (see
      :func:`~nso_jax.hessian.hutchinson`); inside :func:`jax.shard_map`,
      ``Execution(axis=...)`` splits the probes over the devices of that mesh
      axis, with the same estimates on any number of devices up to rounding.
    param_filter: estimate only some leaves (see :func:`hessian_operator`);
      a leaf's block, and so its estimate's mean, does not depend on which
      others are selected.
    group_by: ``None`` (per leaf), a positive int (leaves sharing that many
      leading path keys form a module: ``1`` groups ``"Dense_0"``'s kernel
      and bias) or a callable ``(path) -> name``.
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which ``data`` is split, with ``loss_fn`` the loss of this device's
      shard (see :func:`hessian_operator`).

  Returns:
    A pytree shaped like ``params`` whose leaves are
    :class:`~nso_jax.hessian.TraceEstimate` ``(value, stderr, num_matvecs)``
    (``None`` where ``param_filter`` excludes); with ``group_by``, a dict from
    module name to its :class:`~nso_jax.hessian.TraceEstimate`.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda p, x: 0.5 * jnp.mean(jnp.sum(x * p["a"] ** 2, axis=-1)
    ...                                    + jnp.sum(x * p["b"] ** 2, axis=-1))
    >>> params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    >>> x = jnp.array([[1.0, 2.0, 3.0]])  # H_aa = H_bb = diag(1, 2, 3)
    >>> traces = hessian.layer_traces(loss, params, x, key=0, num_matvecs=8)
    >>> float(traces["a"].value), float(traces["b"].stderr)
    (6.0, 0.0)
    >>> is_estimate = lambda node: isinstance(node, hessian.TraceEstimate)
    >>> sum(t.value for t in jax.tree.leaves(traces, is_leaf=is_estimate))
    Array(12., dtype=float32)

  References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines", 1989.

    Zhang, Li, Ju, "Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach", TMLR 2024 (arXiv:2306.08553).
  """
  num = checks.check_positive_int(num_matvecs, "num_matvecs")
  group_by = groups_lib.check_group_by(group_by)
  operator = operators.hessian_operator(
    loss_fn,
    params,
    data_plans.reusable(data),
    param_filter=param_filter,
    data_axis=data_axis,
  )
  per_leaf = _layer_trace_sampler(operator, checks.canonicalize_key(key))
  samples = batching.map_indices(per_leaf, num, execution=execution)
  count = jnp.asarray(num, jnp.int32)
  estimate = lambda s: stochastic_trace.TraceEstimate(
    *stochastic_trace.mean_and_stderr(s), count
  )
  if group_by is None:
    return jax.tree.map(estimate, samples)
  names = groups_lib.group_names(operator.template, group_by)
  summed = groups_lib.sum_by_group(jax.tree.leaves(samples), names)
  return {name: estimate(total) for name, total in summed.items()}


def trace_bound_term(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  reference: PyTree,
  key: checks.KeyLike,
  *,
  num_examples: int,
  num_matvecs: int = 100,
  reduction: str = "max",
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
) -> TraceBound:
  r"""The data-measurable term of the NSO paper's PAC-Bayes bound.

  The paper's generalisation bound (its Theorem on PAC-Bayes generalisation)
  grows with the trace of the loss Hessian and the distance of the weights
  from their initialisation, over the square root of the training-set size
  :math:`n`. This function computes

  .. math::
    B = \sqrt{\frac{T \cdot R^2}{n}}, \qquad
    T = \sum_l \max(T_l, 0), \qquad
    R^2 = \sum_l \lVert W_l - W_l^{(0)} \rVert_F^2,

  where :math:`W^{(0)}` is ``reference`` (the pretrained or initial weights)
  and :math:`T_l` the trace of layer :math:`l`'s Hessian block, measured as
  the authors do (:func:`layer_traces`: Hutchinson, one full product per
  probe, per-leaf dot products):

  * ``reduction="max"`` (default, the authors' protocol): :math:`T_l` is the
    largest over the batches of ``data`` of the per-batch estimate, each batch
    with the same probes (the bound has a maximum over examples; a batch's
    mean Hessian stands in for an example's, so pass batches of one example
    for per-example maxima). Batches of zero weight in
    :class:`StackedBatches` are ignored. The maximum of noisy estimates is
    biased upwards: use enough probes.
  * ``reduction="mean"``: :math:`T_l` is the trace of the data set's mean
    Hessian (an unbiased estimate, but not the maximum the bound asks for).

  This is the form of the authors' bound scripts in
  `VirtuosoResearch/Noise-stability-optimization
  <https://github.com/VirtuosoResearch/Noise-stability-optimization>`_
  (``exps_on_text_datasets/compute_noise_stability.py``; likewise
  ``exps_on_graph_datasets/compute_noise_stability.py``), which print
  ``max_loss * sqrt(max_traces.sum() * np.square(norms).sum() / train_num)``:
  per-layer maxima over mini-batches of the Hutchinson layer traces, starting
  from 0 (hence the clipping at 0 above), summed, times the summed squared
  distances of the layers from the pretrained weights, over the training-set
  size. One total trace times one total squared radius is what a PAC-Bayes
  argument with a single isotropic posterior :math:`N(W, \sigma^2 I)`, NSO's
  noise, gives.

  Left out, so that :math:`B` is the part measured from data: the constant
  in front (the scripts multiply by the largest mini-batch loss, standing in
  for the bound :math:`C` on the loss), and the theorem's other constants and
  lower-order terms. The paper's theorem (as the abstract and the
  authors' related bounds state it) uses the positive part :math:`H^+` of the
  Hessian and a maximum over the data distribution; like the authors' code,
  this uses the plain trace, clipped at 0 per layer (at most
  :math:`\operatorname{tr}(H_{ll}^+)`), and the maximum over the given
  batches. We could not check the theorem's exact statement (its constants,
  and whether the trace enters per layer) against the paper's text: the form
  computed is the authors' code's. The layer-wise form
  :math:`\sqrt{\sum_l \lVert W_l - W_l^{(0)} \rVert^2 T_l / n}`, which
  per-layer noise scales would give, is at most :math:`B` and follows from
  the returned ``layer_traces`` and ``layer_squared_distances``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the trained weights :math:`W`, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`
      (the training data, or a sample of it).
    reference: :math:`W^{(0)}`, with the structure and shapes of ``params``.
    key: an int seed or a ``jax.random.key``.
    num_examples: :math:`n`, the size of the training set (which ``data``
      may only sample).
    num_matvecs: Rademacher probes per trace estimate (per batch with
      ``"max"``).
    reduction: ``"max"`` over batches or ``"mean"`` over the data set.
    execution: how the probes' products run, a
      :class:`~nso_jax.batching.Execution` or a strategy name (see
      :func:`~nso_jax.hessian.hutchinson`); inside :func:`jax.shard_map`,
      ``Execution(axis=...)`` splits the probes over the devices of that mesh
      axis. The batches of ``reduction="max"`` run one after another, each
      with its probes run so.
    param_filter: use only some leaves, for both :math:`T` and :math:`R^2`
      (the authors use the weight matrices, not biases or normalisation).

  Returns:
    A :class:`TraceBound` ``(value, trace, squared_distance, layer_traces,
    layer_squared_distances)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> batches = [jnp.array([[1.0, 1.0]]), jnp.array([[2.0, 6.0]])]
    >>> bound = hessian.trace_bound_term(
    ...     loss, jnp.ones(2), batches, jnp.zeros(2), key=0, num_examples=200)
    >>> float(bound.trace), float(bound.squared_distance), float(bound.value)
    (8.0, 2.0, 0.2828...)

  References:
    Zhang, Li, Ju, "Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach", TMLR 2024 (arXiv:2306.08553).

    Ju, Li, Zhang, "Robust Fine-Tuning of Deep Neural Networks with
    Hessian-based Generalization Guarantees", ICML 2022.
  """
  n = checks.check_positive_int(num_examples, "num_examples")
  num = checks.check_positive_int(num_matvecs, "num_matvecs")
  checks.check_choice(reduction, BOUND_REDUCTIONS, "reduction")
  data = data_plans.reusable(data)
  operator = operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter
  )
  key = checks.canonicalize_key(key)
  # One resolution for every batch's probes.
  resolved = batching.resolve(execution, num, _layer_trace_sampler(operator, key))
  v = selection.restrict_like(operator.template, reference, params, "reference")
  squared = jax.tree.map(
    lambda w, w0: operators.leaf_vdot(w - w0, w - w0), operator.template, v
  )

  def traces_on(batch_data: Any) -> PyTree:
    batch_operator = operators.hessian_operator(
      loss_fn, params, batch_data, param_filter=param_filter
    )
    per_leaf = _layer_trace_sampler(batch_operator, key)
    samples = batching.map_resolved(per_leaf, resolved)
    return jax.tree.map(lambda s: jnp.mean(s, axis=0), samples)

  plan = data_plans.make_plan(data)
  if reduction == "mean" or not plan.groups:
    traces = traces_on(data)
  else:
    traces = _max_over_batches(traces_on, plan)
  trace = jnp.sum(jnp.stack([jnp.maximum(t, 0.0) for t in jax.tree.leaves(traces)]))
  squared_distance = jnp.sum(jnp.stack(jax.tree.leaves(squared)))
  # n as a Python float: a count beyond int32 (3e9 examples) cannot overflow.
  value = jnp.sqrt(trace * squared_distance / float(n))
  return TraceBound(value, trace, squared_distance, traces, squared)


def _max_over_batches(
  traces_on: Callable[[Any], PyTree], plan: data_plans.DataPlan
) -> PyTree:
  """Per leaf, the largest of ``traces_on(batch)`` over the batches of ``plan``.

  The batches run one at a time (``"map"``: the memory of one batch's
  products); those of weight 0 in :class:`StackedBatches` are ignored.
  """
  one_at_a_time = batching.Execution("map", chunk_size=1)
  maxima = []
  for group in plan.groups:
    stacked = group.stacked

    def on_batch(i: jax.Array, stacked: PyTree = stacked) -> PyTree:
      return traces_on(jax.tree.map(lambda x: jnp.asarray(x)[i], stacked))

    num_batches = group.weights.shape[0]
    per_batch = batching.map_indices(on_batch, num_batches, execution=one_at_a_time)
    keep = group.weights > 0
    maxima.append(
      jax.tree.map(
        lambda t, keep=keep: jnp.max(jnp.where(keep, t, -jnp.inf)), per_batch
      )
    )
  return jax.tree.map(_elementwise_max, *maxima)
