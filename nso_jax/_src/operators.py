"""Matrix-free curvature operators over pytrees.

A curvature operator is a :class:`LinearOperator`: a ``matvec`` on pytrees
shaped like the (selected) parameters. :func:`hessian_operator` gives the loss
Hessian through forward-over-reverse products, :func:`ggn_operator` the
Gauss-Newton matrix :math:`J^\\top H_{\\text{out}} J`. Both average exactly over
a data set given as one batch, a list (or iterator) of batches of any sizes, or
:class:`StackedBatches`, and accumulate inside the compiled
program. :func:`flatten_operator` views any operator on flat vectors, for the
algorithms that need a basis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from nso_jax._src import checks
from nso_jax._src import data_plans
from nso_jax._src import mesh
from nso_jax._src import selection
from nso_jax._src.checks import PyTree

# A loss as the curvature tools take it: (params, batch) -> scalar mean loss.
LossFn = Callable[[PyTree, PyTree], jax.Array]
Matvec = Callable[[PyTree], PyTree]

CURVATURE_LEAVES = "curvature is defined for floating-point leaves only"
# How a Hessian-vector product differentiates twice (see hvp).
HVP_MODES = ("auto", "forward", "reverse")
# Part of the name of the primitive that applies a jax.custom_vjp function.
NO_FORWARD_RULE = "custom_vjp"


def check_template(template: PyTree, name: str = "template") -> None:
  """Raises unless ``template`` is a non-empty pytree of floating-point leaves."""
  checks.check_float_tree(template, name, CURVATURE_LEAVES)


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
    return dimension(self.template)


class FlatOperator(NamedTuple):
  """A pytree operator seen through flat vectors (where a basis is needed)."""

  matvec: Callable[[jax.Array], jax.Array]
  unravel: Callable[[jax.Array], PyTree]
  dim: int
  dtype: Any


def dimension(template: PyTree) -> int:
  return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(template)))


def leaf_vdot(a: jax.Array, b: jax.Array) -> jax.Array:
  """The Euclidean inner product of two arrays, accumulated in >= float32."""
  return jnp.vdot(a, b, preferred_element_type=checks.accumulation_dtype(a.dtype))


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """The Euclidean inner product of two pytrees, accumulated in >= float32."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  products = [leaf_vdot(x, y) for x, y in zip(leaves_a, leaves_b, strict=True)]
  return sum(products[1:], products[0])


def flatten_operator(matvec: Matvec, template: PyTree) -> FlatOperator:
  """Views a pytree operator as one acting on flat vectors."""
  flat, unravel_template = ravel_pytree(template)
  # Linear algebra (QR, eigh) needs at least float32, whatever the leaves hold.
  dtype = checks.accumulation_dtype(flat.dtype)

  def unravel(x: jax.Array) -> PyTree:
    return unravel_template(x.astype(flat.dtype))

  def flat_matvec(x: jax.Array) -> jax.Array:
    return ravel_pytree(matvec(unravel(x)))[0].astype(dtype)

  return FlatOperator(flat_matvec, unravel, int(flat.size), dtype)


def _forward_over_reverse(
  loss_fn: LossFn, params: PyTree, batch: PyTree, tangent: PyTree
) -> PyTree:
  gradient = lambda p: jax.grad(loss_fn)(p, batch)
  return jax.jvp(gradient, (params,), (tangent,))[1]


def _reverse_over_reverse(
  loss_fn: LossFn, params: PyTree, batch: PyTree, tangent: PyTree
) -> PyTree:
  # The gradient of v . grad L: the pullback of the gradient map applied to v
  # (H is symmetric, so H^T v = H v).
  gradient = lambda p: jax.grad(loss_fn)(p, batch)
  _, pullback = jax.vjp(gradient, params)
  return pullback(tangent)[0]


def _applies(jaxpr: Any, fragment: str) -> bool:
  """Whether ``jaxpr``, nested jaxprs included, applies a primitive so named."""
  for eqn in jaxpr.eqns:
    if fragment in eqn.primitive.name:
      return True
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
        if hasattr(inner, "eqns") and _applies(inner, fragment):
          return True
  return False


def _lacks_forward_rule(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether ``fn(*args)`` calls a ``jax.custom_vjp`` function anywhere.

  Such a function has no forward-mode rule. JAX traces ``jax.jvp`` through
  it without complaint and fails only when the program is lowered or run,
  so the check reads ``fn``'s own program (traced abstractly, nothing
  computed) instead of trying a product.
  """
  try:
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  except Exception:  # the callers' own checks report failures
    return False
  return _applies(jaxpr, NO_FORWARD_RULE)


def resolve_hvp_mode(
  mode: str, loss_fn: LossFn, params: PyTree, batch: PyTree, tangent: PyTree
) -> str:
  """``"forward"`` or ``"reverse"``: ``mode``, with ``"auto"`` decided once.

  ``loss_fn`` may be any function of ``(params, batch)`` (a model too).
  ``"auto"`` traces it abstractly (nothing is computed) and keeps
  forward over reverse unless the loss calls a ``jax.custom_vjp`` function,
  which has no forward-mode rule.
  """
  del tangent  # the decision depends on the loss alone
  checks.check_choice(mode, HVP_MODES, "mode")
  if mode != "auto":
    return mode
  return "reverse" if _lacks_forward_rule(loss_fn, params, batch) else "forward"


def hvp(
  loss_fn: LossFn, params: PyTree, batch: PyTree, tangent: PyTree, *, mode: str = "auto"
) -> PyTree:
  r"""The Hessian-vector product :math:`\nabla^2 L(\theta) v`.

  By default forward over reverse: the directional derivative of the
  gradient, :math:`\frac{d}{d\epsilon} \nabla L(\theta + \epsilon
  v)|_{\epsilon=0}`, by ``jax.jvp`` of ``jax.grad``: one forward and one
  backward pass, about twice the cost of a gradient, with no Hessian ever
  formed. A loss with no forward-mode rule (one that calls a
  ``jax.custom_vjp`` function, such as a hand-written cross-entropy) cannot
  be differentiated that way; there the product is reverse over reverse,
  the gradient of :math:`v \cdot \nabla L(\theta)` (``jax.vjp`` of
  ``jax.grad``), which needs only reverse-mode rules and keeps more of the
  forward pass in memory.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the point :math:`\theta`, any pytree.
    batch: the data passed to ``loss_fn``.
    tangent: the direction :math:`v`, a pytree shaped like ``params``.
    mode: ``"auto"`` (forward over reverse where the loss allows it, decided
      once when the product is traced; reverse over reverse otherwise),
      ``"forward"`` or ``"reverse"``. The two agree to rounding.

  Returns:
    :math:`\nabla^2 L(\theta) v`, shaped like ``params``.

  Raises:
    ValueError: for an unknown ``mode``.
    TypeError: with ``mode="forward"`` on a loss that has no forward-mode
      rule.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: jnp.sum(x * w ** 3) / 3  # Hessian diag(2 x w)
    >>> hessian.hvp(loss, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]),
    ...             jnp.array([1.0, 1.0]))
    Array([2., 4.], dtype=float32)
    >>> hessian.hvp(loss, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]),
    ...             jnp.array([1.0, 1.0]), mode="reverse")
    Array([2., 4.], dtype=float32)

  References:
    Pearlmutter, "Fast exact multiplication by the Hessian", Neural
    Computation, 1994.
  """
  mode = resolve_hvp_mode(mode, loss_fn, params, batch, tangent)
  if mode == "forward":
    return _forward_over_reverse(loss_fn, params, batch, tangent)
  return _reverse_over_reverse(loss_fn, params, batch, tangent)


def _shape_on_data(fn: Callable[..., Any], name: str, first: Any, batch: PyTree) -> Any:
  """``jax.eval_shape(fn, first, batch)``, naming ``data`` if ``fn`` fails on it."""
  try:
    return jax.eval_shape(fn, first, batch)
  except (TypeError, ValueError, IndexError, KeyError) as error:
    shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), batch
    )
    raise ValueError(
      f"`{name}` failed on the first batch of `data` ({shapes}): {error}. Check "
      "that `data` holds batches with a leading example axis, as the function "
      "expects."
    ) from error


def _check_scalar_loss(value: Any, name: str) -> None:
  shape = getattr(value, "shape", None)
  dtype = getattr(value, "dtype", None)
  if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"`{name}` must return a float scalar (the mean loss over the batch), "
      f"got {jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), value)}."
    )


def check_loss_axes(
  loss_fn: LossFn,
  params: PyTree,
  batch: PyTree,
  data_axes: tuple[str, ...],
  context: PyTree = None,
) -> None:
  """Refuses, inside ``shard_map``, a loss the data axes do not describe.

  A loss that varies over a mesh axis other than ``data_axes`` (and the
  axes the parameters vary over) is a shard's loss whose Hessian-vector
  products ``jax.grad`` would sum over the shards; one that does not vary
  over a data axis is already averaged over it. See
  :func:`nso_jax._src.mesh.check_declared_axes`.
  """
  mesh.check_declared_axes(
    lambda p: loss_fn(p, batch),
    params,
    data_axes=data_axes,
    name="loss_fn",
    returns_value=True,
    context=context,
  )


def hessian_operator(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  *,
  param_filter: selection.ParamFilter = None,
  data_axis: mesh.AxisName | None = None,
  mode: str = "auto",
) -> LinearOperator:
  r"""The loss Hessian over a data set, as a matrix-free operator.

  With batches :math:`b` of :math:`n_b` examples and mean losses :math:`L_b`,
  the operator is the Hessian of the data-set mean loss,

  .. math::
    H = \frac{\sum_b n_b \nabla^2 L_b(\theta)}{\sum_b n_b},

  applied by Hessian-vector products (:func:`hvp`, forward over reverse where
  the loss allows it) accumulated in a ``jax.lax.scan`` over the batches,
  inside the caller's compiled program. Every one-call measure of
  :mod:`nso_jax.hessian` builds this operator with ``mode="auto"``, so a
  loss with a ``jax.custom_vjp`` part works everywhere.
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
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which the data are split, with ``loss_fn`` the loss of this device's
      shard (as NSO's ``data_axis`` takes it): each product is the mean of
      the shards' products, one ``psum``. Without it, a loss inside
      ``shard_map`` must average itself over the shards (``jax.lax.pmean``):
      a shard's loss is refused, as is a loss that does not vary over the
      ``data_axis`` given (already averaged), each naming the axis.
    mode: how the products differentiate twice (see :func:`hvp`):
      ``"auto"`` decides once, on the first batch, between forward over
      reverse and, for a loss without a forward-mode rule, reverse over
      reverse; ``"forward"`` or ``"reverse"`` choose.

  Returns:
    A :class:`LinearOperator`.

  Raises:
    ValueError: for an empty ``params``, a non-scalar loss, malformed ``data``,
      a ``param_filter`` that selects nothing or an unknown ``mode``; inside
      :func:`jax.shard_map`, for a loss the ``data_axis`` given does not
      describe (see ``data_axis``) or a ``data_axis`` of :func:`jax.vmap`.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: jnp.mean((x @ w) ** 2)  # Hessian 2 X^T X / n
    >>> batches = [jnp.eye(3)[:2], jnp.eye(3)[2:]]  # 2 examples, then 1
    >>> operator = hessian.hessian_operator(loss, jnp.zeros(3), batches)
    >>> operator.matvec(jnp.ones(3)) * 3 / 2  # equals X^T X v for the full X
    Array([1., 1., 1.], dtype=float32)
  """
  checks.check_callable(loss_fn, "loss_fn", "(params, batch) -> scalar loss")
  selected, merge = selection.select(params, param_filter)
  checks.check_float_tree(selected, "params", checks.FLOAT_PARAMS)
  plan = data_plans.make_plan(data)
  restricted_loss = lambda sub, batch: loss_fn(merge(sub), batch)
  _check_scalar_loss(
    _shape_on_data(restricted_loss, "loss_fn", selected, plan.first_batch()),
    "loss_fn",
  )

  data_axes = mesh.check_bound_axes(data_axis, "data_axis")
  check_loss_axes(restricted_loss, selected, plan.first_batch(), data_axes, params)
  mode = resolve_hvp_mode(mode, restricted_loss, selected, plan.first_batch(), selected)

  def matvec(v: PyTree) -> PyTree:
    # Typed as varying over the data axes, the point and the direction give
    # this shard's product (`jax.grad` of replicated parameters would sum the
    # shards' gradients by itself). The point also varies as the direction
    # does over a mesh axis that splits the probes (shard_map's type checks
    # ask that the operands of a product agree).
    if data_axes:
      v = jax.tree.map(lambda t: mesh.mark_varying(t, data_axes), v)
    point = jax.tree.map(mesh.vary_like, selected, v)
    per_batch = lambda batch, tangent: hvp(
      restricted_loss, point, batch, tangent, mode=mode
    )
    local = data_plans.average_over_data(per_batch, plan, v)
    if not data_axes:
      return local
    total = mesh.psum_varying(local, data_axes)
    return jax.tree.map(lambda x: x / mesh.axis_size(data_axes), total)

  return LinearOperator(matvec, selected)


def _model_products(
  model: Callable[[PyTree], PyTree], point: PyTree, mode: str
) -> tuple[PyTree, Matvec, Matvec]:
  """The outputs of ``model`` at ``point``, ``v -> J v`` and ``u -> J^T u``."""
  if mode == "forward":
    outputs, jacobian = jax.linearize(model, point)
    transpose = lambda u: jax.linear_transpose(jacobian, point)(u)[0]
    return outputs, jacobian, transpose
  outputs, pullback = jax.vjp(model, point)
  transpose = lambda u: pullback(u)[0]
  zeros = jax.tree.map(jnp.zeros_like, outputs)
  # J v is the transpose of u -> J^T u, taken by differentiating it.
  jacobian = lambda v: jax.vjp(transpose, zeros)[1](v)[0]
  return outputs, jacobian, transpose


def ggn_operator(
  model_fn: Callable[[PyTree, PyTree], PyTree],
  per_example_loss: Callable[[PyTree, PyTree], jax.Array],
  params: PyTree,
  data: Any,
  *,
  param_filter: selection.ParamFilter = None,
  mode: str = "auto",
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

  A model without a forward-mode rule (a ``jax.custom_vjp`` layer) gives
  :math:`J^\top u` by its pullback and :math:`J v` by transposing that
  pullback (the gradient of :math:`u \mapsto v \cdot J^\top u`, which
  differentiates the custom backward rule once more: it must itself be
  differentiable); a per-example loss without one gets its output Hessian
  product by reverse over reverse (:func:`hvp`).

  Args:
    model_fn: ``model_fn(params, batch) -> outputs`` (any pytree).
    per_example_loss: ``per_example_loss(outputs, batch) -> losses`` of shape
      ``(n,)`` (as optax's losses return) or a scalar; its mean is the loss.
    params: the point, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    param_filter: as in :func:`hessian_operator`.
    mode: ``"auto"`` (forward mode for the model's :math:`J v` and the output
      Hessian product wherever the functions have forward-mode rules, each
      decided once on the first batch), ``"forward"`` or ``"reverse"`` (for
      both).

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
  checks.check_callable(model_fn, "model_fn", "(params, batch) -> outputs")
  checks.check_callable(
    per_example_loss, "per_example_loss", "(outputs, batch) -> per-example losses"
  )
  selected, merge = selection.select(params, param_filter)
  checks.check_float_tree(selected, "params", checks.FLOAT_PARAMS)
  plan = data_plans.make_plan(data)
  restricted_model = lambda sub, batch: model_fn(merge(sub), batch)

  def output_loss(outputs: PyTree, batch: PyTree) -> jax.Array:
    return jnp.mean(per_example_loss(outputs, batch))

  first = plan.first_batch()
  outputs = _shape_on_data(restricted_model, "model_fn", selected, first)
  losses = _shape_on_data(per_example_loss, "per_example_loss", outputs, first)
  shape = getattr(losses, "shape", None)
  if shape is None or len(shape) > 1:
    raise ValueError(
      "`per_example_loss` must return per-example losses of shape (n,) or a "
      f"scalar, got {losses}."
    )

  # A batch split over a mesh axis would sum the shards' GGNs.
  mesh.check_declared_axes(
    lambda sub: output_loss(restricted_model(sub, first), first),
    selected,
    data_axes=(),
    name="model_fn",
    returns_value=True,
    context=params,
    fix="ggn_operator takes no `data_axis`: give it the whole batch (outside "
    "jax.shard_map, or a batch replicated over that axis).",
  )
  # "auto" decides for the model and the per-example loss separately.
  model_mode = resolve_hvp_mode(mode, restricted_model, selected, first, None)
  loss_mode = resolve_hvp_mode(mode, output_loss, outputs, first, outputs)

  def per_batch(batch: PyTree, v: PyTree) -> PyTree:
    # Varying as the direction does over a mesh axis splitting the probes.
    point = jax.tree.map(mesh.vary_like, selected, v)
    model = lambda sub: restricted_model(sub, batch)
    outputs, jacobian, transpose = _model_products(model, point, model_mode)
    output_hvp = hvp(output_loss, outputs, batch, jacobian(v), mode=loss_mode)
    return transpose(output_hvp)

  return LinearOperator(
    lambda v: data_plans.average_over_data(per_batch, plan, v), selected
  )
