"""The one batching seam: run ``fn(i)`` over indices ``0 .. size - 1``.

NSO's perturbation pairs, the Hessian tools' random probes and the
noise-stability measure's draws are the same kind of work: ``size``
independent evaluations of one function of an index. :func:`sum_indices` adds
their results up (NSO's gradient sum: nothing is stacked, so memory does not
grow with the count); :func:`map_indices` stacks them (per-probe samples, from
which a standard error follows). How they run is one value, :class:`Execution`:

* ``"vmap"``: all at once, as one batched computation; refused (a
  ``ValueError`` naming the count) when the batch's estimated memory
  exceeds the device's (:func:`memory_bound`), where ``"auto"`` runs chunks
  that fit instead;
* ``"map"``: a ``lax.scan`` over chunks of ``chunk_size`` indices, each
  chunk batched with ``vmap``; memory is bounded by the chunk. The default
  chunk (:func:`default_chunk_size`) is 1 on CPU, one at a time, and 16 on
  accelerators;
* ``"unroll"``: one after another in the compiled graph;
* ``"host"``: a Python loop calling one compiled function per chunk of
  ``chunk_size`` indices (unrolled within the chunk), for work called
  eagerly: no loop in the compiled graph, whose backward convolutions XLA:CPU
  runs 20-30 times slower. Where the work is traced (inside an outer
  :func:`jax.jit`, :func:`jax.vmap` or :func:`jax.shard_map`) it falls back
  to the in-graph choice of ``"auto"``;
* ``"auto"``: :func:`default_execution`, the one rule for all of them.

Inside :func:`jax.shard_map`, ``Execution(axis=...)`` splits the indices over
the devices of a mesh axis: device ``r`` of ``n`` evaluates ``r, r + n, r +
2n, ...``, each in the way the strategy says, and one collective, a ``psum``,
combines the results. Since ``fn`` sees the same global index on any mesh,
the result does not depend on the number of devices beyond summation order.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple
from typing import cast

import jax
import jax.numpy as jnp

from nso_jax._src import checks
from nso_jax._src import mesh

_LOG = logging.getLogger("nso_jax")

Strategy = Literal["auto", "vmap", "map", "unroll", "host"]
STRATEGIES: tuple[str, ...] = ("auto", "vmap", "map", "unroll", "host")
# Strategies whose chunk_size means something.
CHUNKED = ("map", "host")
# Compiled chunk functions of "host", by the text of their jaxpr.
_HOST_CACHE_SIZE = 32

# Unrolled evaluations compile in time linear in their number (6.9 s at 8,
# 17.5 s at 16 NSO pairs of the benchmark CNN on CPU) and keep every
# evaluation's buffers alive.
MAX_AUTO_UNROLLED = 8
# Beyond this, an explicit "unroll" would trace for minutes with no message.
MAX_UNROLLED = 512
# On accelerators "auto" batches at most this many evaluations with vmap (NSO's
# few pairs); more (100 trace probes) would hold all their activations at once.
MAX_AUTO_VMAPPED = 16
# Indices are int32.
MAX_SIZE = 2**31 - 1
# The memory a batch of evaluations may fill where neither the device nor the
# host reports its size (see memory_bound).
DEFAULT_MEMORY_BOUND = 64 * 2**30


@dataclasses.dataclass(frozen=True)
class Execution:
  """How repeated evaluations run: NSO's pairs, probes, noise draws.

  A frozen, hashable value, checked when it is built. Every function of
  nso_jax that repeats an evaluation takes it as ``execution=``; a strategy
  name alone (``execution="map"``) is shorthand for ``Execution("map")``.

  Attributes:
    strategy: ``"auto"`` (:func:`default_execution`), ``"vmap"`` (all at
      once), ``"map"`` (a loop over chunks, memory of one chunk),
      ``"unroll"`` (one after another in the compiled graph) or ``"host"``
      (a Python loop over compiled chunks, when called eagerly).
    chunk_size: evaluations per step of ``"map"`` or per compiled call of
      ``"host"``; ``None`` for :func:`default_chunk_size` (1 on CPU, 16 on
      accelerators).
    axis: inside :func:`jax.shard_map`, the mesh axis (or a tuple of axes)
      whose devices split the evaluations, combined by one ``psum``. For NSO
      these are its pairs, all on the same batch; for the Hessian tools,
      their probes. The result does not depend on the number of devices
      beyond summation order.

  Example:
    >>> from nso_jax import batching
    >>> batching.Execution("map", chunk_size=4)
    Execution(strategy='map', chunk_size=4, axis=None)
    >>> batching.Execution("vmap", chunk_size=4)
    Traceback (most recent call last):
    ...
    ValueError: `chunk_size`=4 applies only to strategy='map' or 'host', got ...
  """

  strategy: Strategy = "auto"
  chunk_size: int | None = None
  axis: mesh.AxisName | None = None

  def __post_init__(self) -> None:
    checks.check_choice(self.strategy, STRATEGIES, "strategy")
    if self.chunk_size is not None:
      chunk_size = checks.check_positive_int(self.chunk_size, "chunk_size")
      if self.strategy not in CHUNKED:
        raise ValueError(
          f"`chunk_size`={chunk_size} applies only to strategy='map' or "
          f"'host', got strategy={self.strategy!r}."
        )
      object.__setattr__(self, "chunk_size", chunk_size)
    mesh.check_axis_name(self.axis, "axis", bound=False)


ExecutionLike = Execution | Strategy


def as_execution(execution: Any, name: str = "execution") -> Execution:
  """``execution`` as an :class:`Execution` (a strategy name is shorthand)."""
  if isinstance(execution, Execution):
    return execution
  if isinstance(execution, str):
    checks.check_choice(execution, STRATEGIES, name)
    return Execution(cast(Strategy, execution))
  raise TypeError(
    f"`{name}` must be a batching.Execution or one of {STRATEGIES}, got {execution!r}."
  )


def default_chunk_size(backend: str | None = None) -> int:
  """The chunk of ``"map"`` when ``chunk_size`` is not given.

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
  backend: str | None = None,
  *,
  convolutional: bool = False,
  size: int = 1,
  eager: bool = False,
) -> Strategy:
  """The strategy ``"auto"`` resolves to on ``backend``: the one rule.

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
  ``execution="unroll"`` or ``"vmap"`` to trade memory for speed). Called
  eagerly (``eager``: no outer trace, as the Hessian tools usually are),
  convolutional evaluations run as ``"host"`` whatever their number: a
  Python loop over one compiled evaluation, with no loop in the graph and
  time linear in ``size`` (on a 38k-parameter CNN, 100 trace probes fell
  from over 150 s to seconds; eagerly, ``"unroll"`` would dispatch
  operation by operation). See ``benchmarks/curvature_cnn.py``.

  Args:
    backend: a JAX backend name; ``None`` means ``jax.default_backend()``.
    convolutional: whether the function computes convolutions (see
      :func:`computes_convolutions`).
    size: the number of evaluations on one device (NSO pairs, probes, or
      the dependent steps of a Lanczos loop).
    eager: whether the evaluations are called outside any trace, so that a
      host loop can drive them.

  Returns:
    ``"vmap"``, ``"map"``, ``"unroll"`` or ``"host"``.

  Example:
    >>> from nso_jax import batching
    >>> batching.default_execution("gpu"), batching.default_execution("cpu")
    ('vmap', 'map')
    >>> batching.default_execution("cpu", convolutional=True, size=4)
    'unroll'
    >>> batching.default_execution("cpu", convolutional=True, size=100, eager=True)
    'host'
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return "vmap" if size <= MAX_AUTO_VMAPPED else "map"
  if convolutional and eager:
    return "host"
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
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return _uses_primitive(jaxpr, "conv_general_dilated")


@functools.cache
def _memory_of(backend: str) -> int:
  try:
    stats = jax.local_devices(backend=backend)[0].memory_stats() or {}
  except (RuntimeError, ValueError, IndexError, NotImplementedError):
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if backend == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      pass
  return DEFAULT_MEMORY_BOUND


def memory_bound(backend: str | None = None) -> int:
  """The bytes a batch of evaluations may fill on one device of ``backend``.

  The device's memory where it reports one (``bytes_limit`` of
  ``memory_stats()``, GPUs and TPUs), the host's physical memory on CPU, else
  :data:`DEFAULT_MEMORY_BOUND` (64 GiB). Asked once per backend.
  """
  return _memory_of(backend or jax.default_backend())


def _nbytes(aval: Any) -> int:
  try:
    return math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
  except (AttributeError, TypeError):  # tokens, PRNG key types
    return 0


def evaluation_bytes(closed: Any) -> int:
  """The estimated bytes one evaluation adds to a ``"vmap"`` batch.

  From shapes only: the larger of the evaluation's outputs and its largest
  value that depends on the index (a perturbed copy of the parameters, a
  probe's product), at the top level of ``closed``, a closed jaxpr of one
  index. A batch of ``n`` evaluations holds ``n`` of each at once.
  """
  jaxpr = closed.jaxpr
  dependent = set(jaxpr.invars)
  largest = 0
  for eqn in jaxpr.eqns:
    if any(not hasattr(v, "val") and v in dependent for v in eqn.invars):
      for out in eqn.outvars:
        dependent.add(out)
        largest = max(largest, _nbytes(out.aval))
  outputs = sum(_nbytes(v.aval) for v in jaxpr.outvars if not hasattr(v, "val"))
  return max(largest, outputs)


def _format_bytes(num: int) -> str:
  for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if num >= scale:
      return f"{num / scale:.1f} {unit}"
  return f"{num} bytes"


def _fit_in_memory(
  strategy: Strategy, chunk: int, requested: Execution, local_size: int, per: int
) -> tuple[Strategy, int]:
  """``(strategy, chunk)`` with a batch that fits :func:`memory_bound`.

  An automatic choice (``"auto"``, or ``"host"`` inside a trace) falls back
  to ``"map"`` over chunks that fit, and its default chunk shrinks to fit; an
  explicit ``"vmap"`` is left to :func:`resolve` to refuse.
  """
  bound = memory_bound()
  fits = max(1, bound // max(per, 1))
  automatic = requested.strategy in ("auto", "host")
  if automatic and strategy == "vmap" and local_size * per > bound:
    return "map", min(fits, local_size)
  if automatic and strategy == "map" and requested.chunk_size is None:
    return strategy, min(chunk, fits)
  return strategy, chunk


class Resolved(NamedTuple):
  """An :class:`Execution` resolved for ``size`` evaluations on this device."""

  strategy: Literal["vmap", "map", "unroll", "host"]
  chunk_size: int  # evaluations per step of "map" or per call of "host"
  axes: tuple[str, ...]
  num_devices: int
  size: int  # the global number of evaluations
  local_size: int  # this device's share


def resolve(
  execution: ExecutionLike,
  size: int,
  fn: Callable[[jax.Array], Any] | None = None,
  *,
  size_name: str = "size",
) -> Resolved:
  """Resolves ``execution`` for ``size`` evaluations of ``fn``: the one place.

  The per-device share is decided here, and ``"auto"`` by
  :func:`default_execution` on that share; ``fn``, a function of one index,
  is traced to find out whether it convolves and whether it is called
  eagerly, none of the values it closes over being a tracer (without it, it
  is taken not to convolve, and to be traced). ``"host"`` where the work is
  traced falls back to what ``"auto"`` decides there.

  A batch must fit in memory (:func:`memory_bound`, estimated from shapes
  by :func:`evaluation_bytes`): an explicit ``"vmap"`` that would not is
  refused, naming ``size_name`` (the count argument of the caller); an
  automatic choice runs ``"map"`` over chunks that fit instead.

  Raises:
    ValueError: for an explicit ``"vmap"`` of ``size`` evaluations whose
      estimated memory exceeds :func:`memory_bound`, or an ``"unroll"`` of
      more than ``MAX_UNROLLED``.
  """
  execution = as_execution(execution)
  size = checks.check_positive_int(size, size_name)
  if size > MAX_SIZE:
    raise ValueError(
      f"`{size_name}` asks for {size} evaluations; their indices are int32, "
      f"so at most {MAX_SIZE} (2**31 - 1) run in one call."
    )
  axes = mesh.check_axis_name(execution.axis, "execution.axis")
  num_devices = mesh.axis_size(axes)
  local_size = -(-size // num_devices)
  strategy = execution.strategy
  closed = None
  if fn is not None and (
    strategy in ("auto", "host") or (strategy == "vmap" and local_size > 1)
  ):
    # Shapes only: to find convolutions, an eager call and the batch's memory.
    closed = jax.make_jaxpr(fn)(jnp.int32(0))
  if strategy in ("auto", "host"):
    eager = closed is not None and not axes and is_concrete(closed.consts)
    if strategy == "auto" or not eager:
      convolutional = closed is not None and _uses_primitive(
        closed.jaxpr, "conv_general_dilated"
      )
      strategy = default_execution(
        convolutional=convolutional, size=local_size, eager=eager
      )
      _LOG.debug(
        "execution %r for %d evaluations (%d on this device) resolved to %r "
        "(convolutional=%s, eager=%s, backend=%s)",
        execution.strategy,
        size,
        local_size,
        strategy,
        convolutional,
        eager,
        jax.default_backend(),
      )
  if strategy == "unroll" and local_size > MAX_UNROLLED:
    raise ValueError(
      f"`execution`='unroll' with {local_size} evaluations would trace "
      f"{local_size} copies of the function (minutes of compiling); unroll at "
      f"most {MAX_UNROLLED}, or use 'map' (memory of one chunk) or 'vmap'."
    )
  chunk = min(execution.chunk_size or default_chunk_size(), local_size)
  if closed is not None:
    per = evaluation_bytes(closed)
    strategy, chunk = _fit_in_memory(strategy, chunk, execution, local_size, per)
    if strategy == "vmap" and local_size * per > memory_bound():
      _refuse_vmap(size_name, size, local_size, per)
  concrete = cast(Literal["vmap", "map", "unroll"], strategy)
  return Resolved(concrete, chunk, axes, num_devices, size, local_size)


def _refuse_vmap(size_name: str, size: int, local_size: int, per: int) -> None:
  bound = memory_bound()
  chunk = max(1, bound // max(per, 1))
  raise ValueError(
    f"`execution`='vmap' would run {size} evaluations (`{size_name}`) at "
    f"once: an estimated {_format_bytes(local_size * per)} on a device "
    f"({_format_bytes(per)} each), beyond the {_format_bytes(bound)} of "
    "memory there. Run them in chunks with "
    f"execution=batching.Execution('map', chunk_size={min(chunk, 16)}), "
    f"or lower `{size_name}`."
  )


def describe(
  execution: ExecutionLike, size: int, fn: Callable[[jax.Array], Any] | None = None
) -> dict[str, Any]:
  """What ``execution`` runs as for ``size`` evaluations of ``fn``, here.

  The choice ``"auto"`` makes is otherwise silent (it is also logged at
  ``DEBUG`` level by the ``"nso_jax"`` logger). ``fn``, a function of one
  index, is traced, not run; called inside ``jit`` or ``shard_map``, the
  answer is the one the traced work gets.

  Returns:
    A dict: ``strategy`` (``"vmap"``, ``"map"``, ``"unroll"`` or
    ``"host"``), ``chunk_size`` (evaluations per step of ``"map"`` and
    ``"host"``), ``num_devices`` and ``local_size`` (this device's share).

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import batching
    >>> batching.describe("auto", 100, lambda i: jnp.sin(i))["strategy"]
    'map'
  """
  resolved = resolve(execution, size, fn)
  keys = ("strategy", "chunk_size", "num_devices", "local_size")
  return {key: getattr(resolved, key) for key in keys}


def is_concrete(values: Any) -> bool:
  """Whether no leaf of ``values`` is a tracer: they can leave for the host."""
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(values))


_host_chunks: dict[tuple[str, int], Callable[..., list[jax.Array]]] = {}


def _host_chunk(jaxpr: Any, count: int) -> Callable[..., list[jax.Array]]:
  """The compiled ``(consts, start, last) -> outputs of start .. start + count - 1``.

  Indices past ``last`` evaluate ``last`` (the caller drops them), so one
  compiled chunk serves every call; ``count`` 0 gives instead ``(consts,
  *args) -> outputs`` of one call (:func:`host_function`). Cached by the
  jaxpr's text, so that a
  second eager call with arrays of the same shapes compiles nothing; the
  outputs are stacked leaf by leaf.
  """
  cache_key = (str(jaxpr), count)
  run = _host_chunks.get(cache_key)
  if run is None and count == 0:  # one call of the jaxpr, any arguments
    run = jax.jit(lambda consts, *args: jax.core.eval_jaxpr(jaxpr, consts, *args))
  elif run is None:

    def chunk(consts: list[Any], start: jax.Array, last: jax.Array) -> list[jax.Array]:
      outs = [
        jax.core.eval_jaxpr(jaxpr, consts, jnp.minimum(start + j, last))
        for j in range(count)
      ]
      return [jnp.stack(leaves) for leaves in zip(*outs, strict=True)]

    run = jax.jit(chunk)
  if cache_key not in _host_chunks:
    if len(_host_chunks) >= _HOST_CACHE_SIZE:
      _host_chunks.pop(next(iter(_host_chunks)))
    _host_chunks[cache_key] = run
  return cast(Callable[..., list[jax.Array]], run)


def host_function(fn: Callable[..., Any], *example: Any) -> Callable[..., Any]:
  """``fn`` compiled once for a host loop, its closed-over arrays as arguments.

  ``fn`` is traced on ``example`` (arrays of the shapes and dtypes it will be
  called with); the returned function calls one cached executable, so a
  Python loop over it compiles once and folds no closed-over data into the
  program. The closed-over values must be concrete (:func:`is_concrete`).

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax._src import batching
    >>> scale = jnp.arange(3.0)
    >>> double = batching.host_function(lambda v: 2 * scale * v, jnp.ones(3))
    >>> double(jnp.ones(3))
    Array([0., 2., 4.], dtype=float32)
  """
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*example)
  run = _host_chunk(closed.jaxpr, 0)
  tree = jax.tree.structure(shapes)
  return lambda *args: jax.tree.unflatten(tree, run(closed.consts, *args))


def _host_map(fn: Callable[[jax.Array], Any], resolved: Resolved) -> Any:
  """``fn`` over ``0 .. local_size - 1`` by a Python loop of compiled chunks.

  The values ``fn`` closes over are arguments of the compiled chunk, not
  constants folded into it. A last, shorter chunk repeats its last index
  (the copies are dropped) rather than compile a second function.
  """
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(jnp.int32(0))
  size, chunk = resolved.local_size, resolved.chunk_size
  run, last = _host_chunk(closed.jaxpr, chunk), jnp.int32(size - 1)
  outs = [run(closed.consts, jnp.int32(start), last) for start in range(0, size, chunk)]
  stacked = [jnp.concatenate(leaves)[:size] for leaves in zip(*outs, strict=True)]
  return jax.tree.unflatten(jax.tree.structure(shapes), stacked)


def _on_this_device(fn: Callable[[jax.Array], Any], resolved: Resolved) -> Callable:
  """``fn`` over this device's share of the indices.

  Device ``r`` of ``n`` takes the global indices ``r + i n``; where ``n``
  does not divide ``size``, the last ones run past ``size - 1``: they
  evaluate ``fn(size - 1)`` and give zeros.
  """
  if resolved.num_devices == 1:
    return fn
  first, size = mesh.device_index(resolved.axes), resolved.size

  def local_fn(i: jax.Array) -> Any:
    index = first + i * resolved.num_devices
    if size % resolved.num_devices == 0:
      return fn(index)
    out = fn(jnp.minimum(index, size - 1))
    return jax.tree.map(lambda x: jnp.where(index < size, x, jnp.zeros_like(x)), out)

  return local_fn


def _tree_add(a: Any, b: Any) -> Any:
  return jax.tree.map(jnp.add, a, b)


def _vmap_sum(fn: Callable[[jax.Array], Any], indices: jax.Array) -> Any:
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.vmap(fn)(indices))


def sum_indices(
  fn: Callable[[jax.Array], Any], size: int, *, execution: ExecutionLike = "auto"
) -> Any:
  """The sum of ``fn(i)`` over ``i = 0 .. size - 1``, run as ``execution`` says.

  Only the running sum is kept: with ``"map"``, memory is that of one chunk
  whatever ``size``. The result is the same for every strategy up to the
  order of floating-point summation.

  Args:
    fn: maps an int32 index to a pytree of arrays.
    size: the number of indices, at least 1.
    execution: an :class:`Execution` or a strategy name; with an ``axis``,
      the devices of that mesh axis split the indices and one ``psum``
      combines their partial sums.

  Returns:
    The sum, a pytree like ``fn``'s output (the same on every device of the
    execution's axis).

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import batching
    >>> batching.sum_indices(lambda i: i**2, 4, execution=batching.Execution("map", 3))
    Array(14, dtype=int32)
  """
  checks.check_callable(fn, "fn", "(index) -> pytree of arrays")
  resolved = resolve(execution, size, fn)
  return mesh.psum_varying(partial_sum(fn, resolved), resolved.axes)


def partial_sum(fn: Callable[[jax.Array], Any], resolved: Resolved) -> Any:
  """This device's share of :func:`sum_indices`, before the ``psum``."""
  fn, size = _on_this_device(fn, resolved), resolved.local_size
  if resolved.strategy == "host":
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), _host_map(fn, resolved))
  if resolved.strategy == "vmap":
    return _vmap_sum(fn, jnp.arange(size))
  if resolved.strategy == "unroll":
    return functools.reduce(_tree_add, (fn(jnp.int32(i)) for i in range(size)))
  chunk = resolved.chunk_size
  num_chunks, remainder = divmod(size, chunk)
  step_fn = fn if chunk == 1 else functools.partial(_vmap_sum, fn)
  chunk_indices = jnp.arange(num_chunks * chunk).reshape(num_chunks, chunk)
  if chunk == 1:
    chunk_indices = chunk_indices[:, 0]
  if num_chunks == 1:
    total = step_fn(chunk_indices[0])
  else:
    shapes = jax.eval_shape(step_fn, chunk_indices[0])
    zeros = jax.tree.map(mesh.zeros_like_shape, shapes)
    total, _ = jax.lax.scan(
      lambda carry, i: (_tree_add(carry, step_fn(i)), None), zeros, chunk_indices
    )
  if remainder:
    total = _tree_add(total, _vmap_sum(fn, jnp.arange(num_chunks * chunk, size)))
  return total


def map_indices(
  fn: Callable[[jax.Array], Any], size: int, *, execution: ExecutionLike = "auto"
) -> Any:
  """``fn(i)`` for ``i = 0 .. size - 1``, stacked on a new leading axis.

  The evaluations run as in :func:`sum_indices`; the results are identical
  for every strategy up to rounding.

  Args:
    fn: maps an int32 index to a pytree of arrays.
    size: the number of indices, at least 1.
    execution: an :class:`Execution` or a strategy name; with an ``axis``,
      the devices of that mesh axis split the indices and one ``psum`` of
      the results, each placed at its indices, stacks them in index order.

  Returns:
    A pytree like ``fn``'s output, each leaf with a leading axis of ``size``
    (the same on every device of the execution's axis).

  Example:
    >>> from nso_jax import batching
    >>> batching.map_indices(lambda i: 2 * i, 3, execution="vmap")
    Array([0, 2, 4], dtype=int32)
  """
  checks.check_callable(fn, "fn", "(index) -> pytree of arrays")
  return map_resolved(fn, resolve(execution, size, fn))


def map_resolved(fn: Callable[[jax.Array], Any], resolved: Resolved) -> Any:
  """:func:`map_indices` with its execution already resolved."""
  local = _map_here(_on_this_device(fn, resolved), resolved)
  if resolved.num_devices == 1:
    return local
  column = mesh.device_index(resolved.axes)

  def place(x: jax.Array) -> jax.Array:
    # Row i, column r of (local, devices, ...) holds global index r + i *
    # devices: flattened, that is index order. Summing the placements gathers
    # them with a result the same on every device.
    placed = jnp.zeros((x.shape[0], resolved.num_devices, *x.shape[1:]), x.dtype)
    return placed.at[:, column].set(x)

  gathered = mesh.psum_varying(jax.tree.map(place, local), resolved.axes)
  return jax.tree.map(
    lambda x: x.reshape((-1, *x.shape[2:]))[: resolved.size], gathered
  )


def _map_here(fn: Callable[[jax.Array], Any], resolved: Resolved) -> Any:
  if resolved.strategy == "host":
    return _host_map(fn, resolved)
  indices = jnp.arange(resolved.local_size)
  if resolved.strategy == "vmap":
    return jax.vmap(fn)(indices)
  if resolved.strategy == "unroll":
    outputs = [fn(jnp.int32(i)) for i in range(resolved.local_size)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
  chunk = resolved.chunk_size
  return jax.lax.map(fn, indices, batch_size=None if chunk == 1 else chunk)
