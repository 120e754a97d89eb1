"""Fisher information and Gauss-Newton traces, the Hessian's positive stand-ins.

* :func:`empirical_fisher_trace`: :math:`\\operatorname{tr} \\hat F =
  \\frac1n \\sum_i \\lVert \\nabla \\ell_i \\rVert^2`, from per-example
  gradients at the observed labels; exact, no probes;
* :func:`fisher_trace`: the Fisher information's trace, with labels drawn
  from the model's own predictive distribution (Monte Carlo, with a standard
  error over the draws);
* :func:`ggn_trace`: Hutchinson on :func:`~nso_jax.hessian.ggn_operator`.

For a softmax cross-entropy or a unit-variance squared error the Fisher
information equals the Gauss-Newton matrix, so :func:`fisher_trace` and
:func:`ggn_trace` estimate the same number. Per-example gradients, draws and
probes run through :mod:`nso_jax.batching`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import data_plans
from nso_jax._src import mesh
from nso_jax._src import operators
from nso_jax._src import selection
from nso_jax._src import stochastic_trace
from nso_jax._src.checks import PyTree
from nso_jax._src.operators import LossFn
from nso_jax._src.selection import ParamFilter

LIKELIHOODS = ("categorical", "gaussian")
ModelFn = Callable[[PyTree, PyTree], jax.Array]


def _num_examples(batch: PyTree) -> int:
  return int(jnp.shape(jax.tree.leaves(batch)[0])[0])


def _example(batch: PyTree, index: jax.Array) -> PyTree:
  """Example ``index`` of ``batch`` as a batch of one."""
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, index, 1), batch)


def _squared_gradient_norm(
  scalar_fn: Callable[[PyTree], jax.Array], point: PyTree, index: jax.Array
) -> jax.Array:
  # Typed as varying like the index, so that inside shard_map the gradient is
  # this device's example's (that of replicated parameters would be summed).
  point = jax.tree.map(lambda p: mesh.vary_like(p, index), point)
  gradient = jax.grad(scalar_fn)(point)
  return operators.tree_vdot(gradient, gradient)


def _inner_execution(execution: batching.Execution) -> batching.Execution:
  """The examples' loop inside a draw: the strategy, without the mesh axis."""
  if execution.strategy == "unroll":  # would unroll draws times examples
    return batching.Execution("auto")
  return batching.Execution(execution.strategy, execution.chunk_size)


def empirical_fisher_trace(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  *,
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
) -> stochastic_trace.TraceEstimate:
  r"""The empirical Fisher's trace: the mean squared per-example gradient norm.

  .. math::
    \operatorname{tr} \hat F = \operatorname{tr} \Bigl(\frac1n \sum_i
    \nabla \ell_i \nabla \ell_i^\top\Bigr) = \frac1n \sum_i
    \lVert \nabla \ell_i(\theta) \rVert^2,

  with :math:`\ell_i` the loss of example :math:`i` at its observed label,
  ``loss_fn`` on a batch of that one example. Exact over the data (one
  gradient per example, no probes), so the standard error is 0. Near a
  minimum it is not the Hessian's trace: it measures the gradient noise
  that stochastic training sees.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the
      batch; it must accept batches of one example.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`
      (whose weights scale the batches' means).
    execution: how the per-example gradients run, a
      :class:`~nso_jax.batching.Execution` or a strategy name; its ``axis``
      splits each batch's examples over a mesh axis.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).

  Returns:
    A :class:`~nso_jax.hessian.TraceEstimate` with ``stderr`` 0 and
    ``num_matvecs`` 0 (no Hessian-vector products).

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean((x @ w - 1.0) ** 2)
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # gradients (-1, 0), (0, -2)
    >>> float(hessian.empirical_fisher_trace(loss, jnp.zeros(2), x).value)
    2.5
  """
  execution = batching.as_execution(execution)
  data = data_plans.reusable(data)
  operators.hessian_operator(loss_fn, params, data, param_filter=param_filter)
  selected, merge = selection.select(params, param_filter)
  plan = data_plans.make_plan(data)
  dtype = checks.accumulation_dtype(jnp.result_type(*jax.tree.leaves(selected)))

  def per_batch(batch: PyTree, zero: jax.Array) -> jax.Array:
    def squared_norm(index: jax.Array) -> jax.Array:
      example_loss = lambda p: loss_fn(merge(p), _example(batch, index))
      return _squared_gradient_norm(example_loss, selected, index).astype(dtype)

    n = _num_examples(batch)
    return batching.sum_indices(squared_norm, n, execution=execution) / n

  value = data_plans.average_over_data(per_batch, plan, jnp.zeros((), dtype))
  zero = jnp.zeros((), dtype)
  return stochastic_trace.TraceEstimate(value, zero, jnp.asarray(0, jnp.int32))


def _sampled_nll(outputs: jax.Array, key: jax.Array, likelihood: str) -> jax.Array:
  """Minus the log-likelihood of a label drawn from the model's prediction."""
  fixed = jax.lax.stop_gradient(outputs)
  if likelihood == "categorical":
    label = jax.random.categorical(key, fixed, axis=-1)
    log_probs = jax.nn.log_softmax(outputs, axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_probs, label[..., None], axis=-1))
  target = fixed + jax.random.normal(key, fixed.shape, fixed.dtype)
  return 0.5 * jnp.sum((target - outputs) ** 2)


def _mean_over_batches(
  per_batch: Callable[[PyTree, jax.Array], jax.Array], plan: data_plans.DataPlan
) -> jax.Array:
  """The weighted mean of ``per_batch(batch, batch_number)`` over the data."""
  if not plan.groups:
    return per_batch(plan.single_batch, jnp.int32(0))
  shape = jax.eval_shape(per_batch, plan.first_batch(), jnp.int32(0))
  total, offset = jnp.zeros(shape.shape, shape.dtype), 0
  for group in plan.groups:
    count = group.weights.shape[0]
    numbers = offset + jnp.arange(count, dtype=jnp.int32)
    offset += count

    def step(acc: jax.Array, inputs: Any) -> tuple[jax.Array, None]:
      batch, weight, number = inputs
      value = per_batch(batch, number)
      return acc + weight.astype(value.dtype) * value, None

    total, _ = jax.lax.scan(step, total, (group.stacked, group.weights, numbers))
  return total / jnp.asarray(plan.total_weight).astype(total.dtype)


def fisher_trace(
  model_fn: ModelFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  likelihood: str = "categorical",
  num_draws: int = 10,
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
) -> stochastic_trace.TraceEstimate:
  r"""The Fisher information's trace, labels drawn from the model (Monte Carlo).

  .. math::
    \operatorname{tr} F = \frac1n \sum_i \mathbb{E}_{y \sim p_\theta(\cdot
    \mid x_i)} \lVert \nabla_\theta \log p_\theta(y \mid x_i) \rVert^2,

  estimated by drawing, in each of :math:`S` draws, one label per example
  from the model's predictive distribution: draw :math:`s` gives
  :math:`T_s = \frac1n \sum_i \lVert \nabla \log p_\theta(y_{s,i} \mid x_i)
  \rVert^2`, and the estimate is their mean with standard error
  :math:`\operatorname{std}(T_s) / \sqrt S` (the error of the draws, for
  the given data; ``inf`` for one draw). For these likelihoods :math:`F`
  is the Gauss-Newton matrix of the matching loss
  (:func:`~nso_jax.hessian.ggn_trace`), which differs from the empirical
  Fisher (:func:`empirical_fisher_trace`) away from a perfect fit.

  Args:
    model_fn: ``model_fn(params, batch) -> outputs`` of shape ``(n, ...)``:
      logits over the last axis for ``"categorical"``, means for
      ``"gaussian"``; it must accept batches of one example.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``; draw :math:`s`, batch
      :math:`b` and example :math:`i` use ``fold_in`` of it by :math:`s`,
      :math:`b`, :math:`i`.
    likelihood: ``"categorical"`` (softmax over the last axis) or
      ``"gaussian"`` (unit variance).
    num_draws: the number of draws :math:`S` (each costs a gradient per
      example).
    execution: how the draws run, a :class:`~nso_jax.batching.Execution` or
      a strategy name; its ``axis`` splits the draws over a mesh axis. Each
      draw's examples run with the same strategy, on one device.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).

  Returns:
    A :class:`~nso_jax.hessian.TraceEstimate` ``(value, stderr,
    num_matvecs)``, ``num_matvecs`` 0 (no Hessian-vector products).

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> model = lambda w, x: x @ w  # a linear model: F = X^T X / n
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> estimate = hessian.fisher_trace(model, jnp.zeros((2, 1)), x, key=0,
    ...                                 likelihood="gaussian", num_draws=200)
    >>> print(f"{estimate.value:.1f} ± {estimate.stderr:.1f}")  # exactly 2.5
    2.6 ± 0.2

  References:
    Kunstner, Hennig, Balles, "Limitations of the empirical Fisher
    approximation for natural gradient descent", NeurIPS 2019.

    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020.
  """
  checks.check_choice(likelihood, LIKELIHOODS, "likelihood")
  num = checks.check_positive_int(num_draws, "num_draws")
  execution = batching.as_execution(execution)
  key = checks.canonicalize_key(key)
  data = data_plans.reusable(data)
  selected, merge = selection.select(params, param_filter)
  operators.check_template(selected, "params")
  plan = data_plans.make_plan(data)
  first = plan.first_batch()
  outputs = jax.eval_shape(lambda p: model_fn(merge(p), first), selected)
  if not jnp.issubdtype(outputs.dtype, jnp.floating) or outputs.ndim < 1:
    raise ValueError(
      "`model_fn` must return float outputs with a leading example axis, got "
      f"{outputs}."
    )
  dtype = checks.accumulation_dtype(jnp.result_type(*jax.tree.leaves(selected)))
  inner = _inner_execution(execution)

  def draw(s: jax.Array) -> jax.Array:
    def per_batch(batch: PyTree, number: jax.Array) -> jax.Array:
      batch_key = jax.random.fold_in(jax.random.fold_in(key, s), number)

      def squared_norm(index: jax.Array) -> jax.Array:
        example_key = jax.random.fold_in(batch_key, index)
        nll = lambda p: _sampled_nll(
          model_fn(merge(p), _example(batch, index)), example_key, likelihood
        )
        return _squared_gradient_norm(nll, selected, index).astype(dtype)

      n = _num_examples(batch)
      return batching.sum_indices(squared_norm, n, execution=inner) / n

    return _mean_over_batches(per_batch, plan)

  samples = batching.map_indices(draw, num, execution=execution)
  mean, stderr = stochastic_trace.mean_and_stderr(samples)
  return stochastic_trace.TraceEstimate(mean, stderr, jnp.asarray(0, jnp.int32))


def ggn_trace(
  model_fn: ModelFn,
  per_example_loss: Callable[[PyTree, PyTree], jax.Array],
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  num_matvecs: int = 100,
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
) -> stochastic_trace.TraceEstimate:
  r"""The trace of the Gauss-Newton matrix :math:`J^\top H_{\text{out}} J`.

  Hutchinson's estimator (Rademacher probes) on
  :func:`~nso_jax.hessian.ggn_operator`; the same as
  ``hutchinson(*ggn_operator(model_fn, per_example_loss, params, data), key,
  num_matvecs=...)``. For a softmax cross-entropy or a squared error the GGN
  is positive semi-definite and equals the Fisher information
  (:func:`fisher_trace`).

  Args:
    model_fn: ``model_fn(params, batch) -> outputs`` (any pytree).
    per_example_loss: ``per_example_loss(outputs, batch) -> losses`` of shape
      ``(n,)`` or a scalar; its mean is the loss.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    num_matvecs: the number of probes (one GGN product each).
    execution: how the probes' products run (see
      :func:`~nso_jax.hessian.hutchinson`).
    param_filter: restricts to some leaves (see :func:`hessian_operator`).

  Returns:
    A :class:`~nso_jax.hessian.TraceEstimate` ``(value, stderr,
    num_matvecs)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> model = lambda w, x: x @ w
    >>> squared = lambda out, x: 0.5 * jnp.sum(out ** 2, axis=-1)
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # G = X^T X / n, trace 2.5
    >>> float(hessian.ggn_trace(model, squared, jnp.zeros((2, 1)), x, key=0).value)
    2.5

  References:
    Schraudolph, "Fast curvature matrix-vector products for second-order
    gradient descent", Neural Computation, 2002.
  """
  num = checks.check_positive_int(num_matvecs, "num_matvecs")
  operator = operators.ggn_operator(
    model_fn, per_example_loss, params, data, param_filter=param_filter
  )
  return stochastic_trace.hutchinson(
    *operator, key, num_matvecs=num, execution=execution
  )
