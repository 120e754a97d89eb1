"""Matrix-free curvature operators over pytrees, and one-call flatness measures.

A curvature operator is a :class:`LinearOperator`: a ``matvec`` on pytrees
shaped like the (selected) parameters. :func:`hessian_operator` gives the loss
Hessian through forward-over-reverse products, :func:`ggn_operator` the
Gauss-Newton matrix :math:`J^\\top H_{\\text{out}} J`. Both average exactly over
a data set given as one batch, a list (or iterator) of batches of any sizes, or
:class:`StackedBatches`, and accumulate inside the compiled program.

:func:`trace`, :func:`eigenvalues`, :func:`top_eigenvalues`,
:func:`max_eigenvalue` and :func:`spectral_density` build the Hessian operator
and run the estimators of :mod:`nso_jax.hessian` on it in one call.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax._src import lanczos as lanczos_lib
from nso_jax._src import trace as trace_lib
from nso_jax._src import utils

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
ParamFilter = PyTree | Callable[[tuple[Any, ...], jax.Array], bool] | None

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")


class LinearOperator(NamedTuple):
  """A symmetric linear map on pytrees, known through its products.

  It unpacks as ``(matvec, template)``, the first two arguments of every
  estimator: ``hutchinson(*operator, key, num_matvecs=...)``.

  Attributes:
    matvec: ``v -> A v`` for pytrees ``v`` shaped like ``template``.
    template: the parameters the operator acts on (unselected leaves of a
      ``param_filter`` are ``None``); only shapes and dtypes matter.
  """

  matvec: Callable[[PyTree], PyTree]
  template: PyTree

  @property
  def dim(self) -> int:
    """The number of scalar parameters the operator acts on."""
    return trace_lib.dimension(self.template)


class StackedBatches(NamedTuple):
  """Equal-shape batches stacked along a new leading axis.

  Attributes:
    data: a pytree whose leaves have shape ``(num_batches, batch_size, ...)``.
    weights: optional per-batch weights of shape ``(num_batches,)``, typically
      example counts (for a padded last batch whose loss masks the padding);
      ``None`` weighs batches equally.
  """

  data: PyTree
  weights: jax.Array | None = None


def hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, tangent: PyTree) -> PyTree:
  r"""The Hessian-vector product :math:`\nabla^2 L(\theta) v`, forward over reverse.

  Computed as the directional derivative of the gradient,
  :math:`\frac{d}{d\epsilon} \nabla L(\theta + \epsilon v)|_{\epsilon=0}`, by
  ``jax.jvp`` of ``jax.grad``: one forward and one backward pass, about twice
  the cost of a gradient, with no Hessian ever formed.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the point :math:`\theta`, any pytree.
    batch: the data passed to ``loss_fn``.
    tangent: the direction :math:`v`, a pytree shaped like ``params``.

  Returns:
    :math:`\nabla^2 L(\theta) v`, shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: jnp.sum(x * w ** 3) / 3  # Hessian diag(2 x w)
    >>> hessian.hvp(loss, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]),
    ...             jnp.array([1.0, 1.0]))
    Array([2., 4.], dtype=float32)
  """
  gradient = lambda p: jax.grad(loss_fn)(p, batch)
  return jax.jvp(gradient, (params,), (tangent,))[1]


# ----------------------------------------------------------------------------
# Parameter selection.
# ----------------------------------------------------------------------------


def _selection_mask(params: PyTree, param_filter: ParamFilter) -> list[bool]:
  leaves_with_path = jax.tree_util.tree_leaves_with_path(params)
  if param_filter is None:
    return [True] * len(leaves_with_path)
  if callable(param_filter):
    mask = [param_filter(path, leaf) for path, leaf in leaves_with_path]
  else:
    try:
      broadcast = jax.tree.map(
        lambda flag, subtree: jax.tree.map(lambda _: flag, subtree),
        param_filter,
        params,
      )
    except (ValueError, TypeError) as error:
      raise ValueError(
        "`param_filter` must be a callable (path, leaf) -> bool or a pytree "
        "of bools whose structure is a prefix of `params`; got "
        f"{jax.tree.structure(param_filter)} for params "
        f"{jax.tree.structure(params)}."
      ) from error
    mask = jax.tree.leaves(broadcast)
  for flag in mask:
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(
        "`param_filter` must give Python bools (it fixes which leaves are "
        f"measured at trace time), got {flag!r}."
      )
  if not any(mask):
    raise ValueError("`param_filter` selects no parameter leaf.")
  return [bool(flag) for flag in mask]


def _select(
  params: PyTree, param_filter: ParamFilter
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
  """Returns the selected sub-pytree and a function merging one back in."""
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    raise ValueError(
      "`params` is an empty pytree: there are no parameters to measure curvature over."
    )
  mask = _selection_mask(params, param_filter)
  if all(mask):
    return params, lambda selected: selected
  selected = treedef.unflatten(
    [leaf if keep else None for leaf, keep in zip(leaves, mask, strict=True)]
  )

  def merge(selected: PyTree) -> PyTree:
    chosen = iter(jax.tree.leaves(selected))
    return treedef.unflatten(
      [next(chosen) if keep else leaf for leaf, keep in zip(leaves, mask, strict=True)]
    )

  return selected, merge


# ----------------------------------------------------------------------------
# Data sets: one batch, a list of batches, or stacked batches.
# ----------------------------------------------------------------------------


class _Group(NamedTuple):
  stacked: PyTree  # leaves (num_batches, ...)
  weights: jax.Array  # (num_batches,)


class _DataPlan(NamedTuple):
  single_batch: PyTree | None
  groups: tuple[_Group, ...]
  total_weight: Any

  def first_batch(self) -> PyTree:
    if not self.groups:
      return self.single_batch
    return jax.tree.map(lambda x: x[0], self.groups[0].stacked)


def _is_batch_sequence(data: Any) -> bool:
  return isinstance(data, (list, collections.abc.Iterator))


def _leading_size(batch: PyTree, name: str) -> int:
  sizes = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError(
        f"`{name}` leaf {jax.tree_util.keystr(path) or '(root)'} is a scalar; "
        "every leaf of a batch needs a leading example axis."
      )
    sizes.add(shape[0])
  if not sizes:
    raise ValueError(f"`{name}` is an empty pytree: a batch needs arrays.")
  if len(sizes) > 1:
    raise ValueError(
      f"`{name}` has leaves with different numbers of examples {sorted(sizes)}; "
      "expected one leading example axis shared by all leaves."
    )
  return sizes.pop()


def _plan_list(batches: list[PyTree]) -> _DataPlan:
  if not batches:
    raise ValueError("`data` is an empty sequence of batches.")
  first_structure = jax.tree.structure(batches[0])
  first_shapes = [jnp.shape(x)[1:] for x in jax.tree.leaves(batches[0])]
  sizes = []
  for index, batch in enumerate(batches):
    structure = jax.tree.structure(batch)
    if structure != first_structure:
      raise ValueError(
        f"`data[{index}]` has structure {structure}, expected {first_structure} "
        "like `data[0]`. (A list is read as a sequence of batches; pass a "
        "single batch as a tuple or dict.)"
      )
    sizes.append(_leading_size(batch, f"data[{index}]"))
    shapes = [jnp.shape(x)[1:] for x in jax.tree.leaves(batch)]
    if shapes != first_shapes:
      raise ValueError(
        f"`data[{index}]` has per-example shapes {shapes}, expected "
        f"{first_shapes} like `data[0]`."
      )
  by_size: dict[int, list[int]] = {}
  for index, size in enumerate(sizes):
    by_size.setdefault(size, []).append(index)
  groups = []
  for size, indices in by_size.items():
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[batches[i] for i in indices])
    groups.append(_Group(stacked, jnp.full((len(indices),), float(size))))
  return _DataPlan(None, tuple(groups), float(sum(sizes)))


def _plan_stacked(data: StackedBatches) -> _DataPlan:
  num_batches = {
    jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(data.data)
  }
  if not num_batches:
    raise ValueError("`data.data` of StackedBatches is an empty pytree.")
  if None in num_batches or len(num_batches) > 1:
    raise ValueError(
      "`data` (StackedBatches) needs every leaf to have the same leading "
      f"batch axis, got leading sizes {sorted(map(str, num_batches))}."
    )
  (num,) = num_batches
  if num < 1:
    raise ValueError("`data` (StackedBatches) holds no batch.")
  if data.weights is None:
    weights = jnp.ones((num,))
    total = float(num)
  else:
    weights = jnp.asarray(data.weights)
    if weights.shape != (num,):
      raise ValueError(
        f"`data.weights` must have shape ({num},), one weight per batch, got "
        f"{weights.shape}."
      )
    if not isinstance(weights, jax.core.Tracer):
      concrete = np.asarray(weights)
      if np.any(concrete < 0) or not concrete.sum() > 0:
        raise ValueError(
          f"`data.weights` must be >= 0 with a positive sum, got {concrete}."
        )
    total = jnp.sum(weights)
  return _DataPlan(None, (_Group(data.data, weights),), total)


def _plan(data: Any) -> _DataPlan:
  if isinstance(data, StackedBatches):
    return _plan_stacked(data)
  if _is_batch_sequence(data):
    return _plan_list(list(data))
  if data is None:
    raise ValueError(
      "`data` is None; pass a batch, a list of batches or StackedBatches."
    )
  return _DataPlan(data, (), 1.0)


def _average_over_data(
  per_batch: Callable[[PyTree, PyTree], PyTree], plan: _DataPlan, v: PyTree
) -> PyTree:
  """The data-weighted average of ``per_batch(batch, v)``, accumulated in a scan."""
  if not plan.groups:
    return per_batch(plan.single_batch, v)
  total = None
  for group in plan.groups:

    def step(acc, inputs):
      batch, weight = inputs
      product = per_batch(batch, v)
      acc = jax.tree.map(lambda a, p: a + weight.astype(a.dtype) * p, acc, product)
      return acc, None

    zeros = jax.tree.map(
      lambda x: jnp.zeros(jnp.shape(x), jnp.promote_types(x.dtype, jnp.float32)), v
    )
    partial, _ = jax.lax.scan(step, zeros, (group.stacked, group.weights))
    total = partial if total is None else jax.tree.map(jnp.add, total, partial)
  return jax.tree.map(
    lambda x, like: (x / jnp.asarray(plan.total_weight).astype(x.dtype)).astype(
      like.dtype
    ),
    total,
    v,
  )


def _check_scalar_loss(value: Any, name: str) -> None:
  shape = getattr(value, "shape", None)
  dtype = getattr(value, "dtype", None)
  if shape != () or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"`{name}` must return a float scalar (the mean loss over the batch), "
      f"got {jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), value)}."
    )


# ----------------------------------------------------------------------------
# Operators.
# ----------------------------------------------------------------------------


def hessian_operator(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  *,
  param_filter: ParamFilter = None,
) -> LinearOperator:
  r"""The loss Hessian over a data set, as a matrix-free operator.

  With batches :math:`b` of :math:`n_b` examples and mean losses :math:`L_b`,
  the operator is the Hessian of the data-set mean loss,

  .. math::
    H = \frac{\sum_b n_b \nabla^2 L_b(\theta)}{\sum_b n_b},

  applied by forward-over-reverse products (:func:`hvp`) accumulated in a
  ``jax.lax.scan`` over the batches, inside the caller's compiled program.
  ``data`` may be

  * one batch: any pytree of arrays (an array, a tuple, a dict, ...);
  * a ``list`` or an iterator of batches, of possibly unequal sizes: batches
    of equal size are stacked and scanned, one scan per distinct size, each
    weighted by its example count, so an unequal last batch counts exactly;
  * :class:`StackedBatches`: batches already stacked on a leading axis, with
    optional per-batch weights.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the point at which to take the Hessian, any pytree of float arrays.
    data: the data set, as above.
    param_filter: restricts the operator to some parameter leaves (the others
      held fixed), e.g. for layer-wise traces: a pytree of bools whose
      structure is a prefix of ``params``, or a callable ``(path, leaf) ->
      bool`` on the key paths of ``jax.tree_util.tree_leaves_with_path``.
      The operator then acts on pytrees shaped like ``params`` with ``None``
      in place of the unselected leaves.

  Returns:
    A :class:`LinearOperator`.

  Raises:
    ValueError: for an empty ``params``, a non-scalar loss, malformed ``data``
      or a ``param_filter`` that selects nothing.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: jnp.mean((x @ w) ** 2)  # Hessian 2 X^T X / n
    >>> batches = [jnp.eye(3)[:2], jnp.eye(3)[2:]]  # 2 examples, then 1
    >>> operator = hessian.hessian_operator(loss, jnp.zeros(3), batches)
    >>> operator.matvec(jnp.ones(3)) * 3 / 2  # equals X^T X v for the full X
    Array([1., 1., 1.], dtype=float32)
  """
  selected, merge = _select(params, param_filter)
  trace_lib.check_template(selected, "params")
  plan = _plan(data)
  restricted_loss = lambda sub, batch: loss_fn(merge(sub), batch)
  _check_scalar_loss(
    jax.eval_shape(restricted_loss, selected, plan.first_batch()), "loss_fn"
  )

  def matvec(v: PyTree) -> PyTree:
    per_batch = lambda batch, tangent: hvp(restricted_loss, selected, batch, tangent)
    return _average_over_data(per_batch, plan, v)

  return LinearOperator(matvec, selected)


def ggn_operator(
  model_fn: Callable[[PyTree, PyTree], PyTree],
  per_example_loss: Callable[[PyTree, PyTree], jax.Array],
  params: PyTree,
  data: Any,
  *,
  param_filter: ParamFilter = None,
) -> LinearOperator:
  r"""The generalised Gauss-Newton matrix over a data set, as an operator.

  For a loss :math:`L(\theta) = \ell(f(\theta))` of model outputs
  :math:`f(\theta)`, the GGN drops the second derivatives of the model,

  .. math::
    G = J^\top \, \nabla^2_{f} \ell \; J, \qquad J = \partial f / \partial
    \theta,

  which is positive semi-definite whenever :math:`\ell` is convex in the
  outputs (squared error, cross-entropy) and equals the Fisher information for
  those losses. One product costs a linearisation of the model, a Hessian-vector
  product of :math:`\ell` in the outputs and a transposed linear map. Data are
  handled as in :func:`hessian_operator`.

  Args:
    model_fn: ``model_fn(params, batch) -> outputs`` (any pytree).
    per_example_loss: ``per_example_loss(outputs, batch) -> losses`` of shape
      ``(n,)`` (as optax's losses return) or a scalar; its mean is the loss.
    params: the point, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    param_filter: as in :func:`hessian_operator`.

  Returns:
    A :class:`LinearOperator`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from nso_jax import hessian
    >>> model = lambda w, batch: batch["x"] @ w
    >>> loss = lambda out, batch: optax.l2_loss(out, batch["y"])  # 0.5 * error^2
    >>> batch = {"x": jnp.eye(2), "y": jnp.zeros(2)}
    >>> operator = hessian.ggn_operator(model, loss, jnp.ones(2), batch)
    >>> operator.matvec(jnp.array([1.0, 0.0]))  # X^T X / n
    Array([0.5, 0. ], dtype=float32)
  """
  selected, merge = _select(params, param_filter)
  trace_lib.check_template(selected, "params")
  plan = _plan(data)
  restricted_model = lambda sub, batch: model_fn(merge(sub), batch)

  def output_loss(outputs: PyTree, batch: PyTree) -> jax.Array:
    return jnp.mean(per_example_loss(outputs, batch))

  first = plan.first_batch()
  outputs = jax.eval_shape(restricted_model, selected, first)
  losses = jax.eval_shape(per_example_loss, outputs, first)
  shape = getattr(losses, "shape", None)
  if shape is None or len(shape) > 1:
    raise ValueError(
      "`per_example_loss` must return per-example losses of shape (n,) or a "
      f"scalar, got {losses}."
    )

  def per_batch(batch: PyTree, v: PyTree) -> PyTree:
    model = lambda sub: restricted_model(sub, batch)
    outputs, model_jvp = jax.linearize(model, selected)
    output_gradient = lambda out: jax.grad(output_loss)(out, batch)
    output_hvp = jax.jvp(output_gradient, (outputs,), (model_jvp(v),))[1]
    (product,) = jax.linear_transpose(model_jvp, selected)(output_hvp)
    return product

  return LinearOperator(lambda v: _average_over_data(per_batch, plan, v), selected)


# ----------------------------------------------------------------------------
# One-call measures on the loss Hessian.
# ----------------------------------------------------------------------------


def trace(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: utils.KeyLike,
  *,
  num_matvecs: int = 100,
  method: str = "hutchinson",
  probe: str = "rademacher",
  rtol: float | None = None,
  batch_size: int | None = None,
  param_filter: ParamFilter = None,
) -> trace_lib.TraceEstimate:
  r"""The trace of the loss Hessian, with its standard error.

  :math:`\operatorname{tr}(H)` is the flatness NSO penalises: the noise-smoothed
  loss is :math:`L + \tfrac{\sigma^2}{2} \operatorname{tr}(H) + O(\sigma^4)`.
  The paper measures it with Hutchinson's estimator, Rademacher probes, at most
  100 of them and a ``1e-3`` relative early stop: pass ``rtol=1e-3`` for that
  protocol. The default spends the whole budget, so that the standard error is
  calibrated. ``"hutch++"`` and ``"xtrace"`` converge faster when a few sharp
  directions dominate the trace.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`
      (see :func:`hessian_operator`).
    key: an int seed or a ``jax.random.key``.
    num_matvecs: the budget of Hessian-vector products.
    method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
    probe: ``"rademacher"`` (default) or ``"normal"``.
    rtol: relative early-stop tolerance, Hutchinson only; ``None`` for none.
    batch_size: probes evaluated together inside ``jax.lax.map``; ``None``
      evaluates one at a time (least memory, fastest on small CPUs).
    param_filter: restricts to some leaves, e.g. one layer (see
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
  if method not in TRACE_METHODS:
    raise ValueError(f"`method` must be one of {TRACE_METHODS}, got {method!r}.")
  if rtol is not None and method != "hutchinson":
    raise ValueError(
      f"`rtol`={rtol!r} applies to method='hutchinson' only; {method!r} needs "
      "its whole budget of matvecs. Pass rtol=None."
    )
  operator = hessian_operator(loss_fn, params, data, param_filter=param_filter)
  options = dict(num_matvecs=num_matvecs, probe=probe, batch_size=batch_size)
  if method == "hutchinson":
    return trace_lib.hutchinson(*operator, key, rtol=rtol, **options)
  if method == "hutch++":
    return trace_lib.hutch_pp(*operator, key, **options)
  return trace_lib.xtrace(*operator, key, **options)


def eigenvalues(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: utils.KeyLike,
  *,
  k: int = 5,
  which: str = "LA",
  num_steps: int | None = None,
  return_eigenvectors: bool = False,
  param_filter: ParamFilter = None,
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
    k: how many eigenvalues.
    which: ``"LA"``, ``"SA"`` or ``"LM"``.
    num_steps: Lanczos steps; ``None`` uses ``max(40, 2 k)``, capped at the
      dimension.
    return_eigenvectors: also return the eigenvectors as a pytree with a
      leading axis of size ``k``.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).

  Returns:
    The eigenvalues, or ``(eigenvalues, eigenvectors)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[1.0, -2.0, 3.0, 4.0]])  # H = diag(x)
    >>> hessian.eigenvalues(loss, jnp.ones(4), x, key=0, k=2, which="SA")
    Array([-2.,  1.], dtype=float32)
  """
  operator = hessian_operator(loss_fn, params, data, param_filter=param_filter)
  return lanczos_lib.lanczos_eigenvalues(
    *operator,
    key,
    k=k,
    num_steps=num_steps,
    which=which,
    return_eigenvectors=return_eigenvectors,
  )


def top_eigenvalues(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: utils.KeyLike,
  *,
  k: int = 5,
  num_steps: int | None = None,
  return_eigenvectors: bool = False,
  param_filter: ParamFilter = None,
) -> jax.Array | tuple[jax.Array, PyTree]:
  """The ``k`` largest eigenvalues of the loss Hessian, in decreasing order.

  Lanczos with full reorthogonalisation; ``eigenvalues(..., which="LA")``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    k: how many eigenvalues.
    num_steps: Lanczos steps; ``None`` uses ``max(40, 2 k)``, capped at the
      dimension.
    return_eigenvectors: also return the eigenvectors.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).

  Returns:
    The eigenvalues, or ``(eigenvalues, eigenvectors)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[1.0, -2.0, 3.0, 4.0]])
    >>> hessian.top_eigenvalues(loss, jnp.ones(4), x, key=0, k=2)
    Array([4., 3.], dtype=float32)
  """
  return eigenvalues(
    loss_fn,
    params,
    data,
    key,
    k=k,
    which="LA",
    num_steps=num_steps,
    return_eigenvectors=return_eigenvectors,
    param_filter=param_filter,
  )


def max_eigenvalue(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: utils.KeyLike,
  *,
  num_iters: int = 100,
  tol: float = 1e-8,
  param_filter: ParamFilter = None,
) -> lanczos_lib.PowerIterationResult:
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
  operator = hessian_operator(loss_fn, params, data, param_filter=param_filter)
  return lanczos_lib.power_iteration(*operator, key, num_iters=num_iters, tol=tol)


def spectral_density(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: utils.KeyLike,
  *,
  num_probes: int = 4,
  num_steps: int = 64,
  grid_size: int = 1000,
  bandwidth: float | None = None,
  bounds: tuple[float, float] | None = None,
  batch_size: int | None = None,
  param_filter: ParamFilter = None,
) -> lanczos_lib.SpectralDensity:
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
    grid_size: the number of grid points.
    bandwidth: the Gaussian kernel's standard deviation; ``None`` uses 1% of
      the spectral range.
    bounds: the grid's ``(low, high)``; ``None`` chooses them from the Ritz
      values.
    batch_size: probes run together inside ``jax.lax.map``.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).

  Returns:
    A :class:`~nso_jax.hessian.SpectralDensity`.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.linspace(0.0, 1.0, 30)[None]
    >>> density = hessian.spectral_density(loss, jnp.ones(30), x, key=0,
    ...                                    num_steps=10, grid_size=200)
    >>> density.grid.shape, density.density.shape
    ((200,), (200,))
  """
  operator = hessian_operator(loss_fn, params, data, param_filter=param_filter)
  return lanczos_lib.stochastic_lanczos_quadrature(
    *operator,
    key,
    num_probes=num_probes,
    num_steps=num_steps,
    grid_size=grid_size,
    bandwidth=bandwidth,
    bounds=bounds,
    batch_size=batch_size,
  )
