"""Mesh axes inside ``shard_map``: names, sizes, indices and varying types.

Inside :func:`jax.shard_map` every value carries the set of manual mesh axes
over which it may differ between devices (JAX's "varying" types). Loop
carries, ``cond`` branches and ``psum`` operands must agree on it. These shims
mark values as varying where ``shard_map`` asks, on every supported JAX
version (the types exist from JAX 0.6.1; before, values pass unchanged).
"""

from __future__ import annotations

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


def psum_varying(tree: Any, axes: tuple[str, ...]) -> Any:
  """``psum`` over ``axes``, one collective, of values that may be invariant.

  A value the same on every device of an axis (say, a gradient that depends
  only on the data shard, summed over the pair axis as well) is marked
  varying first, as ``shard_map``'s type checks ask.
  """
  if not axes:
    return tree
  return jax.lax.psum(jax.tree.map(lambda x: mark_varying(x, axes), tree), axes)
