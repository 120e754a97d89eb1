"""The one batching seam: run ``fn(i)`` over indices ``0 .. size - 1``.

NSO's perturbation pairs and the Hessian tools' random probes are the same
kind of work: ``size`` independent evaluations of one function of an index.
:func:`sum_indices` adds their results up (NSO's gradient sum: nothing is
stacked, so memory does not grow with the count); :func:`map_indices` stacks
them (per-probe samples, from which a standard error follows). Both run them
in one of three ways, chosen by ``execution``:

* ``"vmap"``: all at once, as one batched computation;
* ``"map"``: a ``lax.scan`` over chunks of ``chunk_size`` indices, each
  chunk batched with ``vmap``; memory is bounded by the chunk. The default
  chunk (:func:`default_chunk_size`) is 1 on CPU, one at a time, and 16 on
  accelerators;
* ``"unroll"``: one after another in the compiled graph;
* ``"auto"``: :func:`default_execution`, the one rule for both.

Inside :func:`jax.shard_map` (or :func:`jax.pmap`), ``axis_name`` splits the
indices over the devices of a mesh axis: device ``r`` of ``n`` evaluates
``r, r + n, r + 2n, ...``, each in the way ``execution`` says, and one
collective, a ``psum``, combines the results. Since ``fn`` sees the same
global index on any mesh, the result does not depend on the number of
devices beyond summation order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import cast

import jax
import jax.numpy as jnp

from nso_jax._src import checks

AxisName = str | tuple[str, ...]
Execution = Literal["auto", "vmap", "map", "unroll"]
EXECUTIONS: tuple[str, ...] = ("auto", "vmap", "map", "unroll")

# Unrolled evaluations compile in time linear in their number (6.9 s at 8,
# 17.5 s at 16 NSO pairs of the benchmark CNN on CPU) and keep every
# evaluation's buffers alive.
MAX_AUTO_UNROLLED = 8
# Beyond this, an explicit "unroll" would trace for minutes with no message.
MAX_UNROLLED = 512
# On accelerators "auto" batches at most this many evaluations with vmap (NSO's
# few pairs); more (100 trace probes) would hold all their activations at once.
MAX_AUTO_VMAPPED = 16


def default_chunk_size(backend: str | None = None) -> int:
  """The chunk of ``execution="map"`` when ``chunk_size`` is not given.

  On CPU one evaluation at a time (the fastest there, see
  :func:`default_execution`); on accelerators 16, as many as ``"auto"``
  batches at once with ``vmap``: measured on an H100, one at a time was 2 to
  2.5 times slower than chunks of 16 for 16 to 100 evaluations, which ran at
  0.95 to 1.12 times the time of a full ``vmap`` (see ``benchmarks/``).

  Example:
    >>> from nso_jax import batching
    >>> batching.default_chunk_size("cpu"), batching.default_chunk_size("gpu")
    (1, 16)
  """
  backend = backend or jax.default_backend()
  return 1 if backend == "cpu" else MAX_AUTO_VMAPPED


def default_execution(
  backend: str | None = None, *, convolutional: bool = False, size: int = 1
) -> Execution:
  """Returns the strategy ``execution="auto"`` resolves to on ``backend``.

  Accelerators run up to 16 evaluations (NSO's pairs) as one batched
  computation (``"vmap"``); more (such as 100 trace probes) run in chunks
  of 16 (``"map"``, :func:`default_chunk_size`), since a batch holds every
  evaluation's activations at once.
  On CPU, where batching adds no parallelism beyond XLA's own threading, a
  sequential ``lax.scan`` (``"map"`` with chunk size 1) was measured fastest,
  and it keeps memory flat in ``size``. Except for convolutional networks:
  inside a loop, XLA:CPU computes the backward convolutions with its generic
  emitter instead of its fast convolution kernels (measured 15x slower than
  ``"unroll"`` for a small CNN at 16 NSO pairs, and ``"vmap"`` 2.9x slower),
  so there the evaluations are unrolled, up to 8 of them; beyond, compile
  time and memory would grow with ``size``, and ``"map"`` is kept (pass
  ``execution="unroll"`` or ``"vmap"`` to trade memory for speed). See
  ``benchmarks/``.

  Args:
    backend: a JAX backend name; ``None`` means ``jax.default_backend()``.
    convolutional: whether the function computes convolutions (see
      :func:`computes_convolutions`).
    size: the number of evaluations (NSO pairs, or probes).

  Returns:
    ``"vmap"``, ``"map"`` or ``"unroll"``.

  Example:
    >>> from nso_jax import batching
    >>> batching.default_execution("gpu"), batching.default_execution("cpu")
    ('vmap', 'map')
    >>> batching.default_execution("cpu", convolutional=True, size=4)
    'unroll'
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return "vmap" if size <= MAX_AUTO_VMAPPED else "map"
  if convolutional and size <= MAX_AUTO_UNROLLED:
    return "unroll"
  return "map"


def _uses_primitive(jaxpr: Any, name: str) -> bool:
  """Whether ``jaxpr`` or any jaxpr nested in its equations applies ``name``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
        if hasattr(inner, "eqns") and _uses_primitive(inner, name):
          return True
  return False


def jaxpr_convolves(jaxpr: Any) -> bool:
  """Whether a ``Jaxpr`` convolves anywhere, nested jaxprs included."""
  return _uses_primitive(jaxpr, "conv_general_dilated")


def computes_convolutions(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether ``fn(*args)`` convolves anywhere, nested computations included.

  ``fn`` is traced once (abstractly: nothing is computed).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from nso_jax import batching
    >>> conv = lambda x: jnp.convolve(x, jnp.ones(3))
    >>> batching.computes_convolutions(jax.grad(lambda x: conv(x).sum()), jnp.ones(5))
    True
  """
  return jaxpr_convolves(jax.make_jaxpr(fn)(*args).jaxpr)


def check_execution(execution: Any, chunk_size: Any) -> tuple[Execution, int | None]:
  """Validates an execution strategy and its chunk size."""
  execution = cast(Execution, checks.check_choice(execution, EXECUTIONS, "execution"))
  if chunk_size is not None:
    chunk_size = checks.check_positive_int(chunk_size, "chunk_size")
    if execution != "map":
      raise ValueError(
        f"`chunk_size` applies only to execution='map', got chunk_size="
        f"{chunk_size} with execution={execution!r}."
      )
  return execution, chunk_size


def check_unrolled_size(execution: str, size: int) -> None:
  if execution == "unroll" and size > MAX_UNROLLED:
    raise ValueError(
      f"`execution`='unroll' with {size} evaluations would trace {size} copies "
      f"of the function (minutes of compiling); unroll at most {MAX_UNROLLED}, "
      "or use execution='map' (memory of one chunk) or 'vmap'."
    )


def resolve_execution(
  execution: str, size: int, fn: Callable[[jax.Array], Any] | None = None
) -> Execution:
  """``execution``, with ``"auto"`` resolved by :func:`default_execution`.

  ``fn``, a function of one index, is traced to find out whether it convolves;
  without it, it is taken not to.
  """
  if execution != "auto":
    return cast(Execution, execution)
  convolutional = fn is not None and computes_convolutions(fn, jnp.int32(0))
  return default_execution(convolutional=convolutional, size=size)


def _plan(
  fn: Callable[[jax.Array], Any], size: Any, execution: Any, chunk_size: Any
) -> tuple[int, Execution, int | None]:
  """Checks the arguments of a seam and resolves ``"auto"``."""
  size = checks.check_positive_int(size, "size")
  execution, chunk_size = check_execution(execution, chunk_size)
  execution = resolve_execution(execution, size, fn)
  check_unrolled_size(execution, size)
  return size, execution, chunk_size


def check_axis_name(
  axis_name: Any, name: str, *, bound: bool = True
) -> tuple[str, ...]:
  """The mesh axes ``axis_name`` names, checked to be bound here.

  With ``bound=False`` only the names are checked (when building a
  transformation, outside the mapped function).

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
    if not bound:
      continue
    try:
      jax.lax.psum(1, axis)
    except NameError:
      raise ValueError(
        f"`{name}`={axis!r} is not an axis of the enclosing jax.shard_map or "
        "jax.pmap: call this inside a function mapped over a mesh with that "
        "axis (e.g. jax.shard_map(step, mesh=mesh, ...))."
      ) from None
  if len(set(names)) != len(names):
    raise ValueError(f"`{name}` names an axis twice: {axis_name!r}.")
  return names


def axis_size(axes: tuple[str, ...]) -> int:
  """The number of devices along ``axes`` (1 for none), a Python int."""
  return int(jax.lax.psum(1, axes)) if axes else 1


def device_index(axes: tuple[str, ...]) -> jax.Array:
  """This device's index along ``axes``, row-major over them (0 for none)."""
  return jax.lax.axis_index(axes) if axes else jnp.int32(0)


def _varying_axes(aval: Any) -> frozenset[str]:
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
  missing = tuple(a for a in axes if a not in _varying_axes(aval))
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
  return mark_varying(x, tuple(sorted(_varying_axes(jax.typeof(like)))))


def psum_varying(tree: Any, axes: tuple[str, ...]) -> Any:
  """``psum`` over ``axes``, one collective, of values that may be invariant.

  A value the same on every device of an axis (say, a gradient that depends
  only on the data shard, summed over the pair axis as well) is marked
  varying first, as ``shard_map``'s type checks ask.
  """
  if not axes:
    return tree
  return jax.lax.psum(jax.tree.map(lambda x: mark_varying(x, axes), tree), axes)


def _zeros(shape: Any) -> jax.Array:
  """Zeros of ``shape`` (from ``jax.eval_shape``), varying where it varies."""
  zeros = jnp.zeros(shape.shape, shape.dtype)
  return mark_varying(zeros, tuple(sorted(_varying_axes(shape))))


def _on_this_device(
  fn: Callable[[jax.Array], Any], size: int, axes: tuple[str, ...]
) -> tuple[Callable[[jax.Array], Any], int]:
  """``fn`` over this device's share of ``0 .. size - 1``, and its length.

  Device ``r`` of ``n`` takes the global indices ``r + i n``; where ``n``
  does not divide ``size``, the last ones run past ``size - 1``: they
  evaluate ``fn(size - 1)`` and give zeros.
  """
  num_devices = axis_size(axes)
  if num_devices == 1:
    return fn, size
  local_size = -(-size // num_devices)
  first = device_index(axes)

  def local_fn(i: jax.Array) -> Any:
    index = first + i * num_devices
    if size % num_devices == 0:
      return fn(index)
    out = fn(jnp.minimum(index, size - 1))
    return jax.tree.map(lambda x: jnp.where(index < size, x, jnp.zeros_like(x)), out)

  return local_fn, local_size


def _tree_add(a: Any, b: Any) -> Any:
  return jax.tree.map(jnp.add, a, b)


def _vmap_sum(fn: Callable[[jax.Array], Any], indices: jax.Array) -> Any:
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.vmap(fn)(indices))


def sum_indices(
  fn: Callable[[jax.Array], Any],
  size: int,
  *,
  execution: Execution = "auto",
  chunk_size: int | None = None,
  axis_name: AxisName | None = None,
) -> Any:
  """The sum of ``fn(i)`` over ``i = 0 .. size - 1``, run as ``execution`` says.

  Only the running sum is kept: with ``"map"``, memory is that of one chunk
  whatever ``size``. The result is the same for every strategy up to the
  order of floating-point summation.

  Args:
    fn: maps an int32 index to a pytree of arrays.
    size: the number of indices, at least 1.
    execution: ``"auto"``, ``"vmap"``, ``"map"`` or ``"unroll"``, for each
      device's share.
    chunk_size: indices per step of ``"map"`` (default
      :func:`default_chunk_size`: 1 on CPU, 16 on accelerators).
    axis_name: inside ``shard_map``, the mesh axis (or axes) whose devices
      split the indices; the partial sums are combined by one ``psum``.

  Returns:
    The sum, a pytree like ``fn``'s output (the same on every device of
    ``axis_name``).

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import batching
    >>> batching.sum_indices(lambda i: i**2, 4, execution="map", chunk_size=3)
    Array(14, dtype=int32)
  """
  axes = check_axis_name(axis_name, "axis_name")
  return psum_varying(
    partial_sum_indices(fn, size, execution, chunk_size, axes=axes), axes
  )


def partial_sum_indices(
  fn: Callable[[jax.Array], Any],
  size: int,
  execution: Any,
  chunk_size: Any,
  *,
  axes: tuple[str, ...] = (),
) -> Any:
  """This device's share of :func:`sum_indices`, before the ``psum``."""
  size = checks.check_positive_int(size, "size")
  fn, size = _on_this_device(fn, size, axes)
  size, execution, chunk_size = _plan(fn, size, execution, chunk_size)
  if execution == "vmap":
    return _vmap_sum(fn, jnp.arange(size))
  if execution == "unroll":
    return functools.reduce(_tree_add, (fn(jnp.int32(i)) for i in range(size)))
  chunk = min(chunk_size or default_chunk_size(), size)
  num_chunks, remainder = divmod(size, chunk)
  step_fn = fn if chunk == 1 else functools.partial(_vmap_sum, fn)
  chunk_indices = jnp.arange(num_chunks * chunk).reshape(num_chunks, chunk)
  if chunk == 1:
    chunk_indices = chunk_indices[:, 0]
  if num_chunks == 1:
    total = step_fn(chunk_indices[0])
  else:
    shapes = jax.eval_shape(step_fn, chunk_indices[0])
    zeros = jax.tree.map(_zeros, shapes)
    total, _ = jax.lax.scan(
      lambda carry, i: (_tree_add(carry, step_fn(i)), None), zeros, chunk_indices
    )
  if remainder:
    total = _tree_add(total, _vmap_sum(fn, jnp.arange(num_chunks * chunk, size)))
  return total


def map_indices(
  fn: Callable[[jax.Array], Any],
  size: int,
  *,
  execution: Execution = "auto",
  chunk_size: int | None = None,
  axis_name: AxisName | None = None,
) -> Any:
  """``fn(i)`` for ``i = 0 .. size - 1``, stacked on a new leading axis.

  The evaluations run as in :func:`sum_indices`; the results are identical
  for every strategy up to rounding.

  Args:
    fn: maps an int32 index to a pytree of arrays.
    size: the number of indices, at least 1.
    execution: ``"auto"``, ``"vmap"``, ``"map"`` or ``"unroll"``, for each
      device's share.
    chunk_size: indices per step of ``"map"`` (default
      :func:`default_chunk_size`: 1 on CPU, 16 on accelerators).
    axis_name: inside ``shard_map``, the mesh axis (or axes) whose devices
      split the indices; one ``psum`` of the results, each placed at its
      indices, stacks them in index order.

  Returns:
    A pytree like ``fn``'s output, each leaf with a leading axis of ``size``
    (the same on every device of ``axis_name``).

  Example:
    >>> from nso_jax import batching
    >>> batching.map_indices(lambda i: 2 * i, 3, execution="vmap")
    Array([0, 2, 4], dtype=int32)
  """
  axes = check_axis_name(axis_name, "axis_name")
  size = checks.check_positive_int(size, "size")
  if axis_size(axes) == 1:
    return _map_here(fn, size, execution, chunk_size)
  local_fn, local_size = _on_this_device(fn, size, axes)
  local = _map_here(local_fn, local_size, execution, chunk_size)

  num_devices, column = axis_size(axes), device_index(axes)

  def place(x: jax.Array) -> jax.Array:
    # Row i, column r of (local, devices, ...) holds global index r + i *
    # devices: flattened, that is index order. Summing the placements gathers
    # them with a result the same on every device.
    placed = jnp.zeros((x.shape[0], num_devices, *x.shape[1:]), x.dtype)
    return placed.at[:, column].set(x)

  gathered = psum_varying(jax.tree.map(place, local), axes)
  return jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:]))[:size], gathered)


def _map_here(
  fn: Callable[[jax.Array], Any], size: int, execution: Any, chunk_size: Any
) -> Any:
  size, execution, chunk_size = _plan(fn, size, execution, chunk_size)
  indices = jnp.arange(size)
  if execution == "vmap":
    return jax.vmap(fn)(indices)
  if execution == "unroll":
    outputs = [fn(jnp.int32(i)) for i in range(size)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
  chunk = min(chunk_size or default_chunk_size(), size)
  return jax.lax.map(fn, indices, batch_size=None if chunk == 1 else chunk)
