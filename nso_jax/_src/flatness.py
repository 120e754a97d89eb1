"""The flatness measures of the NSO paper, as functions of a loss and a data set.

Zhang, Li and Ju (TMLR 2024) measure the flatness that Noise Stability
Optimization trains for in four ways, besides the trace and the largest
eigenvalue (:func:`~nso_jax.hessian.trace`,
:func:`~nso_jax.hessian.max_eigenvalue`):

* :func:`noise_stability_measure`: the mean loss increase under Gaussian
  weight noise, :math:`\\mathbb{E}_U[L(W + U)] - L(W)`;
* :func:`layer_hessian_measure`: per layer, :math:`v_l^\\top H_l v_l` with
  :math:`v = W - W^{(0)}` (and :func:`direction_curvature`, the whole
  :math:`v^\\top H v`);
* the layer traces and the bound's trace term are in ``trace_bound.py``.

A "layer" is a leaf of the parameter pytree. Every function takes the data as
:func:`~nso_jax.hessian.hessian_operator` does (one batch, a list or iterator
of batches, or :class:`~nso_jax.hessian.StackedBatches`) and runs inside
``jax.jit`` with the parameters and the key as traced arguments.
"""

from __future__ import annotations

from collections.abc import Callable
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
  eps: float,
  num_draws: int = 20,
  noise: noise_lib.NoiseName | noise_lib.LeafSampler = "normal",
  antithetic: bool = False,
  execution: batching.Execution = "auto",
  chunk_size: int | None = None,
  param_filter: ParamFilter = None,
) -> NoiseStabilityEstimate:
  r"""Noise stability: the mean loss increase under Gaussian weight noise.

  With :math:`m` draws :math:`U_j = \epsilon Z_j`, :math:`Z_j` of i.i.d.
  zero-mean unit-variance entries (standard normal by default),

  .. math::
    S_\epsilon = \frac{1}{m} \sum_{j=1}^m \bigl[L(W + U_j) - L(W)\bigr],
    \qquad \operatorname{se} = \frac{s}{\sqrt m},

  with :math:`s` the sample standard deviation of the increases and
  :math:`L` the mean loss over the whole data set (batches weighted by their
  example counts). By Taylor expansion its expectation is
  :math:`\frac{\epsilon^2}{2}\operatorname{tr}(H) + O(\epsilon^4)`, the
  quantity NSO penalises. The paper reports it with 20 draws of
  :math:`N(0, \epsilon^2 I)` (the default); the authors' image-model code
  perturbs the weight matrices only (pass a ``param_filter``) and their text
  and MNIST scripts average :math:`L(W + U)` and :math:`L(W - U)`
  (``antithetic=True``), which cancels the odd-order terms and so most of
  the variance, at two loss evaluations per draw.

  Draw :math:`j` is ``eps * sample_noise(jax.random.fold_in(key, j),
  params, noise)``: it depends only on ``key`` and :math:`j`, so fewer draws
  with the same key are a prefix of more. The draws run through
  :func:`nso_jax.batching.map_indices`, with the clean loss :math:`L(W)` as
  one more evaluation of the same computation (so that no rounding offset
  enters the differences, and ``eps=0`` gives exactly 0): ``num_draws + 1``
  passes over the data, ``2 * num_draws + 2`` with ``antithetic=True``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the weights :math:`W`, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`
      (see :func:`hessian_operator`).
    key: an int seed or a ``jax.random.key``.
    eps: the noise's standard deviation :math:`\epsilon \ge 0` (may be traced).
    num_draws: the number of draws :math:`m`.
    noise: the distribution of :math:`Z` (see :func:`nso_jax.sample_noise`).
    antithetic: use :math:`\frac{1}{2}[L(W + U_j) + L(W - U_j)] - L(W)` per
      draw (same expectation up to :math:`O(\epsilon^4)`, far less variance).
    execution: how the draws run: ``"auto"``, ``"vmap"``, ``"map"`` or
      ``"unroll"`` (see :func:`nso_jax.batching.map_indices`).
    chunk_size: draws per step of ``execution="map"`` (default 1 on
      CPU, 16 on accelerators).
    param_filter: perturb only some leaves (see :func:`hessian_operator`).

  Returns:
    A :class:`NoiseStabilityEstimate` ``(value, stderr, samples)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[1.0, 2.0, 3.0, 4.0]])  # H = diag(x): tr(H) = 10
    >>> estimate = hessian.noise_stability_measure(
    ...     loss, jnp.ones(4), x, key=1, eps=0.1, num_draws=500, antithetic=True)
    >>> print(f"{estimate.value:.3f} +- {estimate.stderr:.3f}")  # eps**2/2 tr(H)
    0.050 +- 0.002

  References:
    Zhang, Li, Ju, "Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach", TMLR 2024 (arXiv:2306.08553).
  """
  num = checks.check_positive_int(num_draws, "num_draws")
  eps = checks.check_scalar(eps, "eps", minimum=0.0)
  if not callable(noise):
    noise_lib.check_noise(noise)
  antithetic = checks.check_bool(antithetic, "antithetic")
  execution, chunk_size = batching.check_execution(execution, chunk_size)
  key = checks.canonicalize_key(key)
  data = data_plans.reusable(data)
  # Validates params, data, loss_fn and param_filter as every measure does.
  operators.hessian_operator(loss_fn, params, data, param_filter=param_filter)
  selected, merge = selection.select(params, param_filter)
  plan = data_plans.make_plan(data)
  loss_dtype = checks.accumulation_dtype(
    jax.eval_shape(loss_fn, params, plan.first_batch()).dtype
  )
  mean_loss = _mean_loss(loss_fn, plan, loss_dtype)

  def shifted(z: PyTree, scale: jax.Array) -> PyTree:
    return merge(
      jax.tree.map(lambda w, u: w + (scale * u).astype(w.dtype), selected, z)
    )

  def perturbed_loss(j: jax.Array) -> jax.Array:
    # Index num_draws is the clean loss, through the very same computation
    # (W + 0 U = W): the increases carry no rounding offset, and eps = 0
    # gives exactly 0.
    scale = jnp.where(j < num, eps, 0.0)
    z = noise_lib.sample_noise(jax.random.fold_in(key, j), selected, noise)
    value = mean_loss(shifted(z, scale))
    if antithetic:
      value = 0.5 * (value + mean_loss(shifted(z, -scale)))
    return value

  values = batching.map_indices(
    perturbed_loss, num + 1, execution=execution, chunk_size=chunk_size
  )
  samples = values[:num] - values[num]
  mean, stderr = stochastic_trace.mean_and_stderr(samples)
  return NoiseStabilityEstimate(mean, stderr, samples)


def direction_curvature(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  direction: PyTree,
  *,
  param_filter: ParamFilter = None,
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
    loss_fn, params, data_plans.reusable(data), param_filter=param_filter
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
  execution: batching.Execution = "auto",
  chunk_size: int | None = None,
  param_filter: ParamFilter = None,
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
    execution: how the per-leaf products run (see
      :func:`nso_jax.batching.map_indices`).
    chunk_size: products per step of ``execution="map"`` (default 1 on
      CPU, 16 on accelerators).
    param_filter: measure only some leaves (see :func:`hessian_operator`).

  Returns:
    A pytree shaped like ``params`` of scalars :math:`M_l` (float32, or
    float64 for float64 leaves), ``None`` where ``param_filter`` excludes.

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
  execution, chunk_size = batching.check_execution(execution, chunk_size)
  operator = operators.hessian_operator(
    loss_fn, params, data_plans.reusable(data), param_filter=param_filter
  )
  v = selection.restrict_like(operator.template, reference, params, "reference")
  v = jax.tree.map(lambda w, w0: w - w0, operator.template, v)
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

  values = batching.map_indices(
    block, len(leaves), execution=execution, chunk_size=chunk_size
  )
  return jax.tree.unflatten(
    treedef,
    [
      values[k].astype(checks.accumulation_dtype(leaf.dtype))
      for k, leaf in enumerate(leaves)
    ],
  )
