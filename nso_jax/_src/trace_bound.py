"""Per-layer Hessian traces and the trace term of the NSO paper's bound.

* :func:`layer_traces`: the Hessian trace of every layer (leaf), by
  Hutchinson, with error bars; the layers' estimates sum to
  :func:`~nso_jax.hessian.trace`'s with the same key;
* :func:`trace_bound_term`: the data-measurable term of the paper's PAC-Bayes
  bound, :math:`\\sqrt{(\\sum_l T_l)(\\sum_l \\lVert W_l - W_l^{(0)}
  \\rVert^2) / n}`.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import data_plans
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


def _layer_trace_samples(
  operator: operators.LinearOperator,
  key: jax.Array,
  num: int,
  sampler: noise_lib.LeafSampler,
  execution: batching.Execution,
  chunk_size: int | None,
) -> PyTree:
  """Per probe, per leaf :math:`z_l \\cdot (H z)_l`: leaves of shape ``(num,)``."""

  def per_leaf(index: jax.Array) -> PyTree:
    # The probes of stochastic_trace.hutchinson: same key, same sampler.
    z = noise_lib.sample_noise(
      jax.random.fold_in(key, index), operator.template, sampler
    )
    return jax.tree.map(operators.leaf_vdot, z, operator.matvec(z))

  return batching.map_indices(per_leaf, num, execution=execution, chunk_size=chunk_size)


def layer_traces(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  num_matvecs: int = 100,
  probe: str = "rademacher",
  execution: batching.Execution = "auto",
  chunk_size: int | None = None,
  param_filter: ParamFilter = None,
) -> PyTree:
  r"""The Hessian trace of every layer (leaf), by Hutchinson, with error bars.

  For leaf :math:`l` with Hessian block :math:`H_{ll}`, and probes :math:`z`
  of i.i.d. zero-mean unit-variance entries over the whole pytree,

  .. math::
    \operatorname{tr}(H_{ll}) \approx \frac{1}{m} \sum_{j=1}^m
    z_{j,l}^\top (H z_j)_l, \qquad \operatorname{se}_l = \frac{s_l}{\sqrt m}.

  Each probe costs one Hessian-vector product for all the leaves at once.
  The estimator is unbiased: :math:`z_l^\top (H z)_l = z_l^\top H_{ll} z_l +
  \sum_{k \neq l} z_l^\top H_{lk} z_k`, and the cross terms have mean zero as
  :math:`z_l` and :math:`z_k` are independent (they add variance, not bias).
  The probes are those of :func:`~nso_jax.hessian.hutchinson`, drawn from the
  same key the same way, so the per-leaf estimates sum to
  ``hessian.trace(..., method="hutchinson")`` with the same key, probe and
  ``num_matvecs`` (up to rounding). This is how the authors measure layer
  traces (``compute_hessians_trace`` in their code, after PyHessian), there
  with the ``1e-3`` early stop of :func:`~nso_jax.hessian.trace`.

  To group leaves into one layer (a weight and its bias), add their values;
  the standard error of a sum needs the per-probe samples, which
  :func:`~nso_jax.hessian.trace` with a ``param_filter`` selecting the group
  gives.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    num_matvecs: the number of probes :math:`m` (one product each).
    probe: ``"rademacher"`` (default) or ``"normal"``.
    execution: how the probes' products run (see
      :func:`~nso_jax.hessian.hutchinson`).
    chunk_size: probes per step of ``execution="map"`` (default 1 on
      CPU, 16 on accelerators).
    param_filter: estimate only some leaves (see :func:`hessian_operator`);
      a leaf's block, and so its estimate's mean, does not depend on which
      others are selected.

  Returns:
    A pytree shaped like ``params`` whose leaves are
    :class:`~nso_jax.hessian.TraceEstimate` ``(value, stderr, num_matvecs)``
    (``None`` where ``param_filter`` excludes).

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
  sampler = stochastic_trace.probe_sampler(probe)
  operator = operators.hessian_operator(
    loss_fn, params, data_plans.reusable(data), param_filter=param_filter
  )
  execution = stochastic_trace.resolve_probe_execution(
    execution, chunk_size, num, *operator
  )
  key = checks.canonicalize_key(key)
  samples = _layer_trace_samples(operator, key, num, sampler, execution, chunk_size)
  count = jnp.asarray(num, jnp.int32)
  return jax.tree.map(
    lambda s: stochastic_trace.TraceEstimate(
      *stochastic_trace.mean_and_stderr(s), count
    ),
    samples,
  )


def trace_bound_term(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  reference: PyTree,
  key: checks.KeyLike,
  *,
  num_examples: int,
  num_matvecs: int = 100,
  probe: str = "rademacher",
  reduction: str = "max",
  execution: batching.Execution = "auto",
  chunk_size: int | None = None,
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
    num_matvecs: probes per trace estimate (per batch with ``"max"``).
    probe: ``"rademacher"`` (default) or ``"normal"``.
    reduction: ``"max"`` over batches or ``"mean"`` over the data set.
    execution: how the probes' products run (see
      :func:`~nso_jax.hessian.hutchinson`).
    chunk_size: probes per step of ``execution="map"`` (default 1 on
      CPU, 16 on accelerators).
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
  sampler = stochastic_trace.probe_sampler(probe)
  checks.check_choice(reduction, BOUND_REDUCTIONS, "reduction")
  data = data_plans.reusable(data)
  operator = operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter
  )
  execution = stochastic_trace.resolve_probe_execution(
    execution, chunk_size, num, *operator
  )
  key = checks.canonicalize_key(key)
  v = selection.restrict_like(operator.template, reference, params, "reference")
  squared = jax.tree.map(
    lambda w, w0: operators.leaf_vdot(w - w0, w - w0), operator.template, v
  )

  def traces_on(batch_data: Any) -> PyTree:
    batch_operator = operators.hessian_operator(
      loss_fn, params, batch_data, param_filter=param_filter
    )
    samples = _layer_trace_samples(
      batch_operator, key, num, sampler, execution, chunk_size
    )
    return jax.tree.map(lambda s: jnp.mean(s, axis=0), samples)

  plan = data_plans.make_plan(data)
  if reduction == "mean" or not plan.groups:
    traces = traces_on(data)
  else:
    maxima = []
    for group in plan.groups:
      per_batch = jax.lax.map(traces_on, group.stacked)
      keep = group.weights > 0
      maxima.append(
        jax.tree.map(
          lambda t, keep=keep: jnp.max(jnp.where(keep, t, -jnp.inf)), per_batch
        )
      )
    traces = jax.tree.map(_elementwise_max, *maxima)
  trace = jnp.sum(jnp.stack([jnp.maximum(t, 0.0) for t in jax.tree.leaves(traces)]))
  squared_distance = jnp.sum(jnp.stack(jax.tree.leaves(squared)))
  value = jnp.sqrt(trace * squared_distance / n)
  return TraceBound(value, trace, squared_distance, traces, squared)
