"""Mesh axes inside ``shard_map``: names, sizes, indices and varying types.

Inside :func:`jax.shard_map` every value carries the set of manual mesh axes
over which it may differ between devices (JAX's "varying" types). Loop
carries, ``cond`` branches and ``psum`` operands must agree on it. These shims
mark values as varying where ``shard_map`` asks, on every supported JAX
version (the types exist from JAX 0.6.1; before, values pass unchanged).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

AxisName = str | tuple[str, ...]


def check_axis_name(
  axis_name: Any, name: str, *, bound: bool = True
) -> tuple[str, ...]:
  """The mesh axes ``axis_name`` names, checked to be bound here.

  With ``bound=False`` only the names are checked (when a setting is built,
  outside the mapped function).

  Returns:
    The axis names as a tuple (``()`` for ``None``).

  Raises:
    TypeError: when the names are not strings (or a tuple of them).
    ValueError: when a name is repeated, or not an axis of the enclosing
      :func:`jax.shard_map` or :func:`jax.pmap`.
  """
  if axis_name is None:
    return ()
  names = (axis_name,) if isinstance(axis_name, str) else axis_name
  if not isinstance(names, tuple) or not names:
    raise TypeError(
      f"`{name}` must be a mesh axis name or a tuple of them, got {axis_name!r}."
    )
  for axis in names:
    if not isinstance(axis, str):
      raise TypeError(f"`{name}` must name mesh axes with strings, got {axis!r}.")
  if len(set(names)) != len(names):
    raise ValueError(f"`{name}` names an axis twice: {axis_name!r}.")
  if bound:
    for axis in names:
      try:
        jax.lax.psum(1, axis)
      except NameError:
        raise ValueError(
          f"`{name}`={axis!r} is not an axis of the enclosing jax.shard_map or "
          "jax.pmap: call this inside a function mapped over a mesh with that "
          "axis (e.g. jax.shard_map(step, mesh=mesh, ...))."
        ) from None
  return names


def axis_size(axes: tuple[str, ...]) -> int:
  """The number of devices along ``axes`` (1 for none), a Python int."""
  return int(jax.lax.psum(1, axes)) if axes else 1


def device_index(axes: tuple[str, ...]) -> jax.Array:
  """This device's index along ``axes``, row-major over them (0 for none)."""
  return jax.lax.axis_index(axes) if axes else jnp.int32(0)


def varying_axes(aval: Any) -> frozenset[str]:
  """The manual mesh axes over which a value (or its shape) may vary."""
  manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # JAX < 0.9; none before 0.6.1


def mark_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """``x``, typed as varying over ``axes`` as well, as ``shard_map`` asks.

  JAX versions without these types (before 0.6.1) get ``x`` unchanged.
  """
  if not axes:
    return x
  aval = jax.typeof(x)
  if not (hasattr(aval, "manual_axis_type") or hasattr(aval, "vma")):
    return x
  missing = tuple(a for a in axes if a not in varying_axes(aval))
  if not missing:
    return x
  pcast = getattr(jax.lax, "pcast", None)
  if pcast is not None:
    return pcast(x, missing, to="varying")
  return jax.lax.pvary(x, missing)  # type: ignore[attr-defined]  # JAX < 0.9


def vary_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x``, typed as varying over the mesh axes ``like`` varies over.

  Inside ``shard_map``, loop carries and ``cond`` branches must agree on
  this type: a buffer of zeros that will hold per-device values is marked.
  """
  return mark_varying(x, tuple(sorted(varying_axes(jax.typeof(like)))))


def zeros_like_shape(shape: Any) -> jax.Array:
  """Zeros of ``shape`` (from ``jax.eval_shape``), varying where it varies."""
  zeros = jnp.zeros(shape.shape, shape.dtype)
  return mark_varying(zeros, tuple(sorted(varying_axes(shape))))


def psum_varying(tree: Any, axes: tuple[str, ...], name: str = "execution.axis") -> Any:
  """``psum`` over ``axes``, one collective, of values that may be invariant.

  A value the same on every device of an axis (say, a gradient that depends
  only on the data shard, summed over the pair axis as well) is marked
  varying first, as ``shard_map``'s type checks ask. An axis of
  ``jax.vmap`` is refused, naming ``name`` (the argument the axes came from).
  """
  if not axes:
    return tree
  check_mesh_axes(axes, name)
  return jax.lax.psum(jax.tree.map(lambda x: mark_varying(x, axes), tree), axes)


# Collectives that reduce or move values across devices: a function that
# applies one over an axis combines the devices of that axis itself.
_COLLECTIVES = ("psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute")


def has_varying_types() -> bool:
  """Whether this JAX types values as varying over mesh axes (>= 0.6.1)."""
  aval = jax.typeof(jnp.zeros(()))
  return hasattr(aval, "manual_axis_type") or hasattr(aval, "vma")


def manual_axes() -> frozenset[str] | None:
  """The manual mesh axes of the enclosing ``shard_map`` (none outside).

  ``None`` where this JAX does not say (no varying types, or no abstract
  mesh): the checks that need it are skipped there.
  """
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  if get_mesh is None or not has_varying_types():
    return None
  current = get_mesh()
  if not hasattr(current, "manual_axes"):
    return None
  return frozenset(current.manual_axes)


def check_bound_axes(axis_name: Any, name: str) -> tuple[str, ...]:
  """The axes ``axis_name`` names, checked to be ``shard_map`` axes here.

  :func:`check_axis_name`, then :func:`check_mesh_axes`: what a function
  taking a mesh axis checks inside the mapped function.
  """
  axes = check_axis_name(axis_name, name)
  check_mesh_axes(axes, name)
  return axes


def check_mesh_axes(axes: tuple[str, ...], name: str) -> None:
  """Raises unless every axis of ``axes`` is a manual axis of ``shard_map``.

  An axis bound by :func:`jax.vmap` answers ``psum`` as a mesh axis does,
  but values cannot be typed as varying over it.

  Raises:
    ValueError: naming ``name`` and the axis, for an axis of ``jax.vmap``
      (or of another transformation) rather than of ``jax.shard_map``.
  """
  manual = manual_axes()
  if manual is None:
    return
  for axis in axes:
    if axis not in manual:
      here = ", ".join(repr(a) for a in sorted(manual)) or "none here"
      raise ValueError(
        f"`{name}`={axis!r} names an axis bound by jax.vmap (or another "
        "transformation), not a mesh axis of the enclosing jax.shard_map "
        f"(its manual axes: {here}). Devices split the batch or the "
        "evaluations only over shard_map axes: name one of them, or leave "
        f"`{name}` unset under jax.vmap."
      )


def _equations(jaxpr: Any) -> Any:
  """The equations of ``jaxpr``, those of its nested jaxprs included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def _axes_of(value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  if isinstance(value, (tuple, list)):
    return tuple(a for a in value if isinstance(a, str))
  return ()


def collective_axes(jaxpr: Any) -> frozenset[str]:
  """The mesh axes over which ``jaxpr`` applies a collective (a ``pmean``)."""
  found: set[str] = set()
  for eqn in _equations(jaxpr):
    if any(eqn.primitive.name.startswith(c) for c in _COLLECTIVES):
      for key in ("axes", "axis_name"):
        found.update(_axes_of(eqn.params.get(key)))
  return frozenset(found)


def varying_inside(closed: Any) -> frozenset[str]:
  """The axes over which any value ``closed`` reads or computes may vary."""
  found: set[str] = set()
  for var in (*closed.jaxpr.constvars, *closed.jaxpr.invars):
    found.update(varying_axes(var.aval))
  for eqn in _equations(closed.jaxpr):
    for var in eqn.outvars:
      found.update(varying_axes(var.aval))
  return frozenset(found)


def tree_varying_axes(tree: Any) -> frozenset[str]:
  """The axes over which any array leaf of ``tree`` may vary."""
  found: set[str] = set()
  for leaf in jax.tree.leaves(tree):
    if hasattr(leaf, "dtype") or isinstance(leaf, (int, float, complex)):
      found.update(varying_axes(jax.typeof(leaf)))
  return frozenset(found)


def _tracks_varying(axis: str) -> bool:
  """Whether values are typed as varying here (not with ``check_vma=False``)."""
  closed = jax.make_jaxpr(lambda: mark_varying(jnp.zeros(()), (axis,)))()
  return axis in varying_axes(closed.out_avals[0])


def check_declared_axes(
  fn: Any,
  params: Any,
  *,
  data_axes: tuple[str, ...],
  execution_axes: tuple[str, ...] = (),
  name: str,
  returns_value: bool,
  context: Any = None,
  fix: str | None = None,
) -> None:
  """Refuses a mesh misuse that would scale the result by a number of devices.

  Inside :func:`jax.shard_map`, ``fn(params)`` (a loss, or a gradient
  function) is traced at parameters typed as varying over ``data_axes``, as
  the caller evaluates it, and read (types and collectives only; nothing
  is computed or compiled):

  * a loss that varies over a manual axis that is not declared (neither a
    data axis nor an axis the parameters or ``context`` vary over) is this
    device's shard's loss: ``jax.grad`` of replicated parameters would sum
    the shards' gradients. Over an ``execution_axes`` axis, the devices that
    split the evaluations would see different batches. Without a value
    (``returns_value=False``, gradients only), such an axis is one that some
    value inside ``fn`` varies over, while ``fn`` applies no collective over
    it when the parameters vary over it too;
  * a loss that does not vary over a declared data axis is already averaged
    over it: averaging it again would divide by the axis's size. Without a
    value, a collective over a declared data axis may average the loss or
    only share statistics (synchronised batch norm), so it is warned about,
    not refused.

  Where values are not typed as varying (JAX before 0.6.1, or a
  ``shard_map`` with ``check_vma=False``), nothing is checked.

  Args:
    fn: a function of the parameters; with ``returns_value``, its first
      output leaf is the loss.
    params: the parameters ``fn`` is evaluated at.
    data_axes: the declared data axes (``data_axis``).
    execution_axes: the axes ``Execution(axis=...)`` splits evaluations over.
    name: the argument ``fn`` came from, for the messages (``"grad_fn"``).
    returns_value: whether ``fn``'s first output leaf is the loss.
    context: values whose varying axes count as the parameters' own (the
      parameters a filter left out of ``params``).
    fix: what to do about an undeclared axis, for a function that takes no
      ``data_axis``; by default, pass ``data_axis`` or ``pmean`` the loss.

  Raises:
    ValueError: naming the axis and the fix.
  """
  manual = manual_axes()
  if not manual or not _tracks_varying(min(manual)):
    return
  own = tree_varying_axes(params) | tree_varying_axes(context)
  mark = lambda axes: jax.tree.map(lambda x: mark_varying(x, axes), params)
  closed = jax.make_jaxpr(fn)(mark(data_axes))
  if returns_value:
    loss = varying_axes(closed.out_avals[0])
    stray = loss - set(data_axes) - own
    averaged = [axis for axis in data_axes if axis not in loss]
  else:
    inside = varying_inside(closed) - set(data_axes) - own
    reduced: frozenset[str] = frozenset()
    if inside:
      marked = data_axes + tuple(sorted(inside))
      reduced = collective_axes(jax.make_jaxpr(fn)(mark(marked)).jaxpr)
    stray = inside - reduced
    averaged = [axis for axis in data_axes if axis in collective_axes(closed.jaxpr)]
  what = "loss" if returns_value else "gradient"
  for axis in sorted(stray):
    _refuse_stray(axis, name, returns_value, axis in execution_axes, fix)
  if not returns_value:
    # Without the loss, a collective may average it or may only share
    # statistics (synchronised batch norm, an all_gather): warn, never refuse.
    for axis in averaged:
      _warn_collective(axis, name)
    return
  for axis in averaged:
    size = axis_size((axis,))
    raise ValueError(
      f"`{name}` gives a {what} that seems already averaged over "
      f"`data_axis`={axis!r} (a jax.lax.pmean or psum over it inside?): with "
      f"`data_axis` it must give this device's shard's {what}, which is "
      f"then averaged over the {size} shards once; averaged twice it would be "
      f"{size} times too small. Remove the pmean from it, or drop `data_axis`."
    )


def _warn_collective(axis: str, name: str) -> None:
  size = axis_size((axis,))
  warnings.warn(
    f"`{name}` applies a collective over `data_axis`={axis!r}. If it averages "
    f"the loss (a jax.lax.pmean of it), the estimate is {size} times too "
    "small: with `data_axis`, it must give this device's shard's gradient. "
    "If it only shares statistics (synchronised batch norm, an all_gather), "
    f"this is fine. Pass jax.value_and_grad(...) as `{name}`, so that the "
    "loss is read and this is checked exactly.",
    stacklevel=4,
  )


def _refuse_stray(
  axis: str,
  name: str,
  returns_value: bool,
  splits_evaluations: bool,
  fix: str | None,
) -> None:
  size = axis_size((axis,))
  if returns_value:
    found = f"`{name}` gives a loss that varies over mesh axis {axis!r}"
  else:
    found = (
      f"`{name}` computes with values that vary over mesh axis {axis!r} and "
      "averages nothing over it"
    )
  if splits_evaluations:
    raise ValueError(
      f"{found}, the axis `execution=Execution(axis=...)` splits the "
      "evaluations over: every device of that axis must see the same batch, "
      "and this one seems split over it. Pass the axis the batch is split "
      f"over as `data_axis` (data_axis={axis!r}), and split the evaluations "
      "over another mesh axis (or none)."
    )
  fix = fix or (
    f"Pass data_axis={axis!r} (the shard's loss or gradient, averaged over "
    "the shards once; taken by NSO and most Hessian tools), or average the "
    f"loss over the shards inside it with jax.lax.pmean(loss, {axis!r})."
  )
  raise ValueError(
    f"{found} ({size} devices), an axis that is not declared: this reads as "
    "the shard of a batch split over that axis, and jax.grad of replicated "
    f"parameters would sum the {size} shards' gradients ({size} times too "
    f"large). {fix}"
  )
