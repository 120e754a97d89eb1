"""Flax glue: a Linen train state and an NNX gradient function.

Optax transformations that need more than the gradient (such as
:func:`nso_jax.noise_stability`, which needs ``grad_fn``) take it as an extra
keyword argument of ``update``. Flax's own ``TrainState.apply_gradients`` does
not forward such arguments; :class:`TrainState` does. ``nnx.Optimizer.update``
forwards them, but NNX modules are stateful objects while ``grad_fn`` must map
pure parameter arrays to gradients: :func:`nnx_grad_fn` builds it.

Model state such as BatchNorm's running statistics must come from the clean
forward pass only: the perturbed passes normalise with their own batch
statistics and their state updates are discarded. Both helpers arrange that.

Checkpoints: :mod:`nso_jax._src.checkpoints`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state

from nso_jax._src import checks
from nso_jax._src import mesh

# A Linen step's loss: (params, batch_stats) -> (scalar loss, aux dict).
LossWithAuxFn = Callable[[Any, Any], tuple[jax.Array, dict[str, Any]]]


class TrainState(train_state.TrainState):
  """A Linen train state that forwards extra arguments to ``tx.update``.

  Like :class:`flax.training.train_state.TrainState`, plus a ``batch_stats``
  field for models with BatchNorm (``None`` otherwise), and an
  :meth:`apply_gradients` that passes ``grad_fn`` (and the keyword arguments
  in ``update_args``) on to ``tx.update``. As in Flax, the other keyword
  arguments of :meth:`apply_gradients` are fields of the state to replace
  (e.g. ``batch_stats=...``); none of them reaches the optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import nso_jax
    >>> from nso_jax import training
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> state = training.TrainState.create(
    ...     apply_fn=model.apply, params=params,
    ...     tx=nso_jax.nso(optax.sgd(0.1), sigma=0.01, key=0))
    >>> loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
    >>> state = state.apply_gradients(
    ...     grads=jax.tree.map(jnp.zeros_like, params), grad_fn=jax.grad(loss))
    >>> int(state.step)
    1
  """

  batch_stats: Any = None

  def apply_gradients(
    self,
    *,
    grads: Any,
    grad_fn: Callable[..., Any] | None = None,
    update_args: Mapping[str, Any] | None = None,
    **kwargs: Any,
  ) -> TrainState:
    """Applies one optimizer update.

    Args:
      grads: the gradient at ``self.params`` (for NSO with ``clean_weight=0``
        it is not used and may be zeros).
      grad_fn: passed to ``tx.update`` as ``grad_fn`` when given.
      update_args: further keyword arguments for ``tx.update``.
      **kwargs: fields of the state to replace, as in Flax (e.g.
        ``batch_stats=...``); they are not passed to the optimizer.

    Returns:
      The new state, ``step`` incremented by one.
    """
    extra = dict(update_args or {})
    if grad_fn is not None:
      extra["grad_fn"] = grad_fn
    tx = optax.with_extra_args_support(self.tx)
    updates, opt_state = tx.update(grads, self.opt_state, self.params, **extra)
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      opt_state=opt_state,
      **kwargs,
    )


def _describe(value: Any) -> str:
  """A short description of a value, for error messages."""
  if value is None:
    return "None"
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
  if isinstance(value, (tuple, list)):
    return f"a {type(value).__name__} of {len(value)} items"
  if isinstance(value, (bool, int, float)):
    return f"the Python {type(value).__name__} {value!r}"
  return f"a {type(value).__name__}"


def _check_loss_output(output: Any) -> tuple[Any, Mapping[str, Any]]:
  """Returns ``output`` if it is ``(scalar float loss, dict aux)``, else raises."""
  if not (isinstance(output, (tuple, list)) and len(output) == 2):
    raise TypeError(
      "`loss_fn` must return a pair (loss, aux): a scalar float loss and a "
      "dict of metrics (with the updated statistics under 'batch_stats' for "
      f"BatchNorm); it returned {_describe(output)}. Return (loss, {{}}) when "
      "there is nothing else to report."
    )
  loss, aux = output
  is_number = isinstance(loss, (int, float)) and not isinstance(loss, bool)
  if not (is_number or (hasattr(loss, "shape") and hasattr(loss, "dtype"))):
    raise TypeError(
      "The loss returned by `loss_fn` (the first item of its pair) must be a "
      f"scalar float array; it is {_describe(loss)}."
    )
  if jnp.ndim(loss) != 0:
    raise ValueError(
      "The loss returned by `loss_fn` must be a scalar; it is "
      f"{_describe(loss)}. Reduce it over the batch (e.g. with jnp.mean)."
    )
  if not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
    raise TypeError(
      "The loss returned by `loss_fn` must be floating point, to be "
      f"differentiated; it is {_describe(loss)}. Compute it in floats (e.g. "
      "loss.astype(jnp.float32))."
    )
  if not isinstance(aux, Mapping):
    raise TypeError(
      "`aux`, the second item returned by `loss_fn`, must be a dict (of "
      "metrics, and the updated 'batch_stats' for BatchNorm); it is "
      f"{_describe(aux)}. Return (loss, {{}}) when there is nothing else to "
      "report."
    )
  return loss, aux


def train_step(
  state: TrainState,
  loss_fn: LossWithAuxFn,
  *,
  clean_gradient: bool = True,
  data_axis: str | tuple[str, ...] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step of a Linen model, with model state handled correctly.

  ``loss_fn(params, batch_stats) -> (loss, aux)`` evaluates the model on the
  current batch (close over it, and over the step's dropout key) and returns
  the scalar loss and a dict ``aux`` that holds the updated statistics under
  ``"batch_stats"`` (for models with BatchNorm) and any metrics to report.

  The clean pass at ``state.params`` provides the new ``batch_stats``, the
  reported loss and metrics, and (if ``clean_gradient``) the gradient passed
  to ``tx.update``. The optimizer gets ``grad_fn(params)``, which runs the same
  ``loss_fn`` from the same ``state.batch_stats`` and drops its ``aux``: the
  perturbed passes of NSO normalise with batch statistics and leave the
  running statistics alone. Every pass of a step sees the same batch and
  dropout key, so the pair ``W + U``, ``W - U`` evaluates one loss function,
  as the estimator's cancellation of odd-order terms requires.

  Args:
    state: the train state.
    loss_fn: ``(params, batch_stats) -> (loss, aux)``.
    clean_gradient: compute the gradient at ``state.params`` (needed by any
      optimizer that reads it: plain SGD/Adam, SAM, NSO with
      ``clean_weight > 0``). With ``False`` only a forward pass runs there, and
      the optimizer receives zeros: right for NSO with ``clean_weight=0``,
      which then costs exactly ``2k`` gradient evaluations.
    data_axis: inside :func:`jax.shard_map` with the batch split over this
      mesh axis (or tuple of axes): the loss, the metrics, the new
      ``batch_stats`` (their floating-point arrays) and the clean gradient
      are averaged over it, so that the new state and the metrics are the
      same on every shard. ``loss_fn`` evaluates the shard's own batch (no
      ``pmean`` in it); give the optimizer the same axis (``nso(...,
      data_axis=...)``). ``None`` (the default): no mesh axis.

  Returns:
    ``(new_state, metrics)``, ``metrics`` being ``{"loss": loss, **aux}``
    without ``"batch_stats"``.

  ``grad_fn`` also accepts and ignores a second positional argument, so
  ``optax.contrib.sam(..., opaque_mode=True)``, which calls
  ``grad_fn(params, i)``, runs its adversarial steps on the step's batch.
  SAM's default (transparent) mode needs nothing: each call is one of its
  steps, with the clean gradient (``clean_gradient=True``).

  Raises:
    TypeError: if ``state`` is not a :class:`TrainState`, ``loss_fn`` does
      not take ``(params, batch_stats)``, or does not return a pair
      ``(loss, aux)`` of a float loss and a dict.
    ValueError: if the loss is not a scalar, or ``data_axis`` is not an axis
      of the enclosing ``shard_map``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import nso_jax
    >>> from nso_jax import training
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.Dense(8)(x)
    ...     x = nn.BatchNorm(use_running_average=not train)(x)
    ...     return nn.Dense(1)(nn.relu(x))
    >>> net, x, y = Net(), jnp.ones((4, 3)), jnp.zeros((4, 1))
    >>> variables = net.init(jax.random.key(0), x, train=False)
    >>> state = training.TrainState.create(
    ...     apply_fn=net.apply, params=variables["params"],
    ...     batch_stats=variables["batch_stats"],
    ...     tx=nso_jax.nso(optax.sgd(0.1), sigma=0.01, num_perturbations=2, key=0))
    >>> def loss_fn(params, batch_stats):
    ...   out, updates = net.apply(
    ...       {"params": params, "batch_stats": batch_stats}, x, train=True,
    ...       mutable=["batch_stats"])
    ...   return jnp.mean((out - y) ** 2), {"batch_stats": updates["batch_stats"]}
    >>> step = jax.jit(lambda s: training.train_step(s, loss_fn, clean_gradient=False))
    >>> state, metrics = step(state)
    >>> sorted(metrics), int(state.step)
    (['loss'], 1)
  """
  if not isinstance(state, TrainState):
    raise TypeError(
      "`state` must be an nso_jax.training.TrainState, which has a "
      "`batch_stats` field and passes `grad_fn` on to the optimizer; got "
      f"{type(state).__module__}.{type(state).__qualname__}. Create it with "
      "nso_jax.training.TrainState.create(apply_fn=..., params=..., tx=...)."
    )
  checks.check_signature(loss_fn, "loss_fn", 2, "(params, batch_stats) -> (loss, aux)")
  clean_gradient = checks.check_bool(clean_gradient, "clean_gradient")
  axes = mesh.check_axis_name(data_axis, "data_axis")
  batch_stats = state.batch_stats

  def clean_loss(params):
    return _check_loss_output(loss_fn(params, batch_stats))

  if clean_gradient:
    local = _mark_varying(state.params, axes)
    (loss, aux), grads = jax.value_and_grad(clean_loss, has_aux=True)(local)
    grads = _mean_over(grads, axes)
  else:
    loss, aux = clean_loss(state.params)
    grads = jax.tree.map(jnp.zeros_like, state.params)
  aux = dict(aux)
  new_batch_stats = _mean_over(aux.pop("batch_stats", batch_stats), axes)

  def grad_fn(params, *unused):
    # optax.contrib.sam(opaque_mode=True) calls grad_fn(params, i); the batch
    # is the one loss_fn closes over.
    del unused
    return jax.grad(clean_loss, has_aux=True)(params)[0]

  state = state.apply_gradients(
    grads=grads, grad_fn=grad_fn, batch_stats=new_batch_stats
  )
  return state, _mean_over({"loss": loss, **aux}, axes)


def _mark_varying(tree: Any, axes: tuple[str, ...]) -> Any:
  """``tree``'s arrays typed as varying over ``axes`` (unchanged for none).

  Differentiated so, replicated parameters inside ``shard_map`` give the
  shard's own gradient rather than the sum over the shards.
  """
  if not axes:
    return tree
  return jax.tree.map(lambda x: mesh.mark_varying(x, axes), tree)


def _mean_over(tree: Any, axes: tuple[str, ...]) -> Any:
  """The mean over the mesh ``axes`` of ``tree``'s floating-point arrays.

  Other leaves (integer counters, PRNG keys) are returned as they are.
  """
  if not axes:
    return tree

  def mean(x: Any) -> Any:
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      return jax.lax.pmean(x, axes)
    return x

  return jax.tree.map(mean, tree)


def _as_pure(tree: Any) -> Any:
  """The arrays of a tree of NNX variables (``nnx.as_pure``, ``nnx.pure`` before)."""
  as_pure = getattr(nnx, "as_pure", None) or nnx.pure
  return as_pure(tree)


def _loss_kwargs(
  loss_fn: Callable[..., Any], model: Any, args: tuple[Any, ...], loss_kwargs: Any
) -> dict[str, Any]:
  """``loss_kwargs`` as a dict, checked to be keywords ``loss_fn`` accepts."""
  if loss_kwargs is None:
    kwargs: dict[str, Any] = {}
  elif isinstance(loss_kwargs, Mapping) and all(
    isinstance(k, str) for k in loss_kwargs
  ):
    kwargs = dict(loss_kwargs)
  else:
    raise TypeError(
      "`loss_kwargs` must be a dict of the keyword arguments of `loss_fn` (or "
      f"None), got {_describe(loss_kwargs)}."
    )
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {_describe(loss_fn)}.")
  try:
    signature = inspect.signature(loss_fn)
  except (TypeError, ValueError):  # a callable without a signature to check
    return kwargs
  try:
    signature.bind(model, *args, **kwargs)
  except TypeError as error:
    raise TypeError(
      f"`loss_fn` cannot be called as loss_fn(model, *args, **loss_kwargs) "
      f"with {len(args)} argument(s) after the model and loss_kwargs="
      f"{sorted(kwargs)}: {error}. Check the names in `loss_kwargs`."
    ) from None
  return kwargs


def _loss_and_aux(output: Any, has_aux: bool) -> tuple[Any, Mapping[str, Any]]:
  """``(loss, aux)`` from what an NNX loss returned (``aux`` is ``{}`` if none)."""
  if has_aux:
    return _check_loss_output(output)
  if isinstance(output, (tuple, list)):
    raise TypeError(
      f"`loss_fn` returned {_describe(output)}, not a scalar loss: pass "
      "has_aux=True for a loss that returns (loss, aux)."
    )
  loss, _ = _check_loss_output((output, {}))
  return loss, {}


def nnx_grad_fn(
  model: nnx.Module,
  loss_fn: Callable[..., Any],
  *args: Any,
  wrt: Any = nnx.Param,
  loss_kwargs: Mapping[str, Any] | None = None,
  has_aux: bool = False,
  return_value: bool = False,
) -> Callable[..., Any]:
  """Builds ``grad_fn`` for ``nnx.Optimizer.update(model, grads, grad_fn=...)``.

  ``nnx.Optimizer`` calls ``tx.update`` with the pure arrays of the ``wrt``
  parameters; the returned function maps such arrays to the gradient of
  ``loss_fn(model, *args, **loss_kwargs)``, evaluated on a copy of ``model``
  rebuilt with those parameters. Changes the passes make to the copy (BatchNorm
  statistics, RNG counters) are discarded, so build ``grad_fn`` before the
  clean pass: every perturbed pass then uses the dropout masks of the clean
  pass, and only the clean pass updates the model's state.
  :func:`nnx_train_step` does all of this.

  Args:
    model: the NNX module at its current state.
    loss_fn: ``(model, *args, **loss_kwargs) -> loss``, or ``-> (loss, aux)``
      with ``has_aux``.
    *args: positional arguments of ``loss_fn`` after the model (the batch).
    wrt: the filter of trainable variables, as given to ``nnx.Optimizer``.
    loss_kwargs: keyword arguments of ``loss_fn``. They are checked against
      its signature when ``grad_fn`` is built: a name it does not take is an
      error, never silently passed on.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.
    return_value: ``grad_fn`` returns ``(loss, grads)``, as
      :func:`jax.value_and_grad` does, instead of ``grads``. NSO reads which
      from the output's structure and keeps the mean loss at the perturbed
      weights in ``NoiseStabilityState.value``.

  Returns:
    ``grad_fn(param_arrays) -> grads`` (or ``(loss, grads)``) in the structure
    of ``nnx.as_pure(nnx.state(model, wrt))``. A second positional argument
    (``optax.contrib.sam(opaque_mode=True)`` passes its step index) is ignored.

  Raises:
    TypeError: if ``loss_kwargs`` is not a dict of names, or ``loss_fn``
      cannot take ``(model, *args, **loss_kwargs)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import nso_jax
    >>> from nso_jax import training
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, nso_jax.nso(optax.sgd(0.1), sigma=0.01, key=0), wrt=nnx.Param)
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> @nnx.jit
    ... def step(model, optimizer, x, y):
    ...   grad_fn = training.nnx_grad_fn(model, loss_fn, x, y, return_value=True)
    ...   loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    ...   optimizer.update(model, grads, grad_fn=grad_fn)
    ...   return loss
    >>> loss = step(model, optimizer, jnp.ones((4, 3)), jnp.zeros((4, 1)))
    >>> int(optimizer.step[...]), optimizer.opt_state[0].value[...].shape
    (1, ())
    >>> try:
    ...   training.nnx_grad_fn(model, loss_fn, 1.0, 2.0, loss_kwargs={"scale": 2})
    ... except TypeError as error:
    ...   print(error)
    `loss_fn` cannot be called as loss_fn(model, *args, **loss_kwargs) with 2
    argument(s) after the model and loss_kwargs=['scale']: got an unexpected
    keyword argument 'scale'. Check the names in `loss_kwargs`.
  """
  kwargs = _loss_kwargs(loss_fn, model, args, loss_kwargs)
  has_aux = checks.check_bool(has_aux, "has_aux")
  return_value = checks.check_bool(return_value, "return_value")
  graphdef, _, rest = nnx.split(model, wrt, ...)  # type: ignore[misc]
  # A snapshot of the arrays: the split state refers to the model's variables,
  # which the clean pass then updates in place.
  rest = _as_pure(rest)

  def loss_of_params(param_arrays: Any) -> Any:
    copy = nnx.merge(graphdef, param_arrays, rest, copy=True)
    return _loss_and_aux(loss_fn(copy, *args, **kwargs), has_aux)[0]

  grad = (
    jax.value_and_grad(loss_of_params) if return_value else jax.grad(loss_of_params)
  )

  def grad_fn(param_arrays: Any, *unused: Any) -> Any:
    del unused
    return grad(param_arrays)

  return grad_fn


def nnx_train_step(
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  loss_fn: Callable[..., Any],
  *args: Any,
  loss_kwargs: Mapping[str, Any] | None = None,
  has_aux: bool = False,
  clean_gradient: bool = True,
  data_axis: str | tuple[str, ...] | None = None,
) -> dict[str, Any]:
  """One optimizer step of an NNX model, with model state handled correctly.

  The NNX counterpart of :func:`train_step`; call it inside ``nnx.jit``. The
  clean pass ``loss_fn(model, *args, **loss_kwargs)`` runs on ``model`` itself:
  it updates BatchNorm's running statistics and draws the dropout masks from
  the model's ``nnx.Rngs`` as NNX does, and gives the reported loss and
  metrics and (if ``clean_gradient``) the gradient. The optimizer gets a
  ``grad_fn`` built by :func:`nnx_grad_fn` before that pass: the perturbed
  passes run on copies of the model as it was, so they use the clean pass's
  batch and dropout masks, and their state updates are discarded.

  Args:
    model: the NNX module; updated in place.
    optimizer: its ``nnx.Optimizer`` (its ``wrt`` filter selects the
      parameters); updated in place.
    loss_fn: ``(model, *args, **loss_kwargs) -> loss``, or ``-> (loss, aux)``
      with ``has_aux``, ``aux`` a dict of metrics.
    *args: positional arguments of ``loss_fn`` after the model (the batch).
    loss_kwargs: keyword arguments of ``loss_fn``, checked against its
      signature.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    clean_gradient: compute the gradient at the current parameters (needed
      by any optimizer that reads it: SGD/Adam, SAM, NSO with
      ``clean_weight > 0``). With ``False`` only a forward pass runs there and
      the optimizer receives zeros: right for NSO with ``clean_weight=0``,
      which then costs exactly ``2k`` gradient evaluations.
    data_axis: inside :func:`jax.shard_map` with the batch split over this
      mesh axis (or axes): the metrics, the model's floating-point state
      other than the parameters (BatchNorm statistics) and the clean
      gradient are averaged over it, as in :func:`train_step`.

  Returns:
    The metrics ``{"loss": loss, **aux}`` of the clean pass.

  Raises:
    TypeError: if ``optimizer`` is not an ``nnx.Optimizer``, ``loss_fn``
      cannot take the arguments, or it does not return a float loss (and a
      dict ``aux`` with ``has_aux``).
    ValueError: if the loss is not a scalar, or ``data_axis`` is not an axis
      of the enclosing ``shard_map``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import nso_jax
    >>> from nso_jax import training
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.dense = nnx.Linear(3, 8, rngs=rngs)
    ...     self.norm = nnx.BatchNorm(8, rngs=rngs)
    ...     self.dropout = nnx.Dropout(0.1, rngs=rngs)
    ...     self.head = nnx.Linear(8, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(self.dropout(nnx.relu(self.norm(self.dense(x)))))
    >>> model = Net(nnx.Rngs(0, dropout=1))
    >>> optimizer = nnx.Optimizer(
    ...     model, nso_jax.nso(optax.sgd(0.1), sigma=0.01, key=0), wrt=nnx.Param)
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> @nnx.jit
    ... def step(model, optimizer, x, y):
    ...   return training.nnx_train_step(
    ...       model, optimizer, loss_fn, x, y, clean_gradient=False)
    >>> metrics = step(model, optimizer, jnp.ones((4, 3)), jnp.zeros((4, 1)))
    >>> sorted(metrics), int(optimizer.step[...])
    (['loss'], 1)
  """
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
      f"`optimizer` must be an nnx.Optimizer, got {_describe(optimizer)}. "
      "Create it with nnx.Optimizer(model, tx, wrt=nnx.Param)."
    )
  kwargs = _loss_kwargs(loss_fn, model, args, loss_kwargs)
  has_aux = checks.check_bool(has_aux, "has_aux")
  clean_gradient = checks.check_bool(clean_gradient, "clean_gradient")
  axes = mesh.check_axis_name(data_axis, "data_axis")
  wrt = optimizer.wrt
  grad_fn = nnx_grad_fn(
    model, loss_fn, *args, wrt=wrt, loss_kwargs=kwargs, has_aux=has_aux
  )

  def clean_loss(m: nnx.Module) -> tuple[Any, Mapping[str, Any]]:
    return _loss_and_aux(loss_fn(m, *args, **kwargs), has_aux)

  if clean_gradient:
    params = _as_pure(nnx.state(model, wrt))
    if axes:  # differentiate the shard's loss alone, then average
      nnx.update(model, _mark_varying(params, axes))
    diff = nnx.DiffState(0, wrt)
    (loss, aux), grads = nnx.value_and_grad(clean_loss, argnums=diff, has_aux=True)(
      model
    )
    if axes:
      nnx.update(model, params)
      grads = _mean_over(grads, axes)
  else:
    loss, aux = clean_loss(model)
    grads = jax.tree.map(jnp.zeros_like, nnx.state(model, wrt))
  optimizer.update(model, grads, grad_fn=grad_fn)
  if axes:
    model_state = nnx.state(model, nnx.Not(wrt))
    nnx.update(model, _mean_over(_as_pure(model_state), axes))
  return _mean_over({"loss": loss, **aux}, axes)
