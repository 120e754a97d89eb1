"""The one validation kit: keys, choices, ints, scalars and float pytrees.

Each check raises one exception type for one kind of fault, with messages in
one style: the argument's name in backticks, what was expected, and the value
that was given. A bad setting (a value of the wrong kind or out of range)
raises :class:`ValueError`; a pytree leaf that is not floating point raises
:class:`TypeError`; a PRNG key of no accepted kind raises :class:`TypeError`.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
KeyLike = Any  # an int seed, a typed key array, or a legacy uint32[2] key

# Why a parameter leaf must be floating point: one rule, and one message, for
# NSO and the Hessian tools alike.
FLOAT_PARAMS = (
  "only floating-point parameters are perturbed and differentiated; exclude "
  "the others with `param_filter` (an excluded leaf may have any dtype)"
)
# The floating-point dtypes nso_jax computes with; narrower floats (float8,
# float4) have no implicit promotion to the float32 its sums run in.
SUPPORTED_FLOATS = ("bfloat16", "float16", "float32", "float64")


def accumulation_dtype(dtype: Any) -> np.dtype:
  """The dtype sums and linear algebra run in: ``dtype``, at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def is_traced(value: Any) -> bool:
  """Whether ``value`` is an abstract value under ``jit``, ``vmap`` or ``grad``."""
  return isinstance(value, jax.core.Tracer)


def canonicalize_key(key: KeyLike, name: str = "key") -> jax.Array:
  """Returns a typed PRNG key array from an int seed or any JAX key.

  Args:
    key: an integer seed, a typed key (``jax.random.key``) or a legacy raw key
      (``jax.random.PRNGKey``, a ``uint32[2]`` array).
    name: the argument name used in error messages.

  Returns:
    A scalar typed key array.

  Raises:
    ValueError: if ``key`` is ``None`` (there is no silent default seed), or a
      key array that holds more than one key.
    TypeError: if ``key`` is of no accepted kind.
  """
  if key is None:
    raise ValueError(
      f"`{name}` is required: pass an int seed or a jax.random.key; "
      "nso_jax never picks a default seed."
    )
  if isinstance(key, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be an int seed or a PRNG key, got {key!r}.")
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(
        f"`{name}` must be a single PRNG key, got a key array of shape {key.shape}."
      )
    return key
  if isinstance(key, (int, np.integer)):
    if not -(2**63) <= int(key) < 2**63:
      raise ValueError(
        f"`{name}` must be an int seed in [-2**63, 2**63), got {int(key)}."
      )
    return jax.random.key(int(key))
  arr = jnp.asarray(key) if isinstance(key, (jax.Array, np.ndarray)) else None
  if arr is not None and arr.dtype == jnp.uint32 and arr.shape == (2,):
    return jax.random.wrap_key_data(arr)
  if arr is not None and jnp.issubdtype(arr.dtype, jnp.integer) and arr.shape == ():
    return jax.random.key(arr)
  raise TypeError(
    f"`{name}` must be an int seed, a typed key from jax.random.key, or a "
    f"uint32[2] key from jax.random.PRNGKey; got {key!r}."
  )


def check_callable(value: Any, name: str, expected: str) -> Any:
  """Returns ``value`` if it is callable, else raises a TypeError.

  Args:
    value: the argument.
    name: the argument's name, for the error message.
    expected: its signature, e.g. ``"(params) -> grads"``.
  """
  if not callable(value):
    raise TypeError(f"`{name}` must be a function {expected}, got {describe(value)}.")
  return value


def check_signature(value: Any, name: str, num_args: int, expected: str) -> Any:
  """Checks that ``value`` is callable and accepts ``num_args`` positional arguments.

  A callable whose signature Python cannot read (some builtins) passes: it is
  found out when called.

  Raises:
    TypeError: if ``value`` is not callable, or cannot take ``num_args``
      positional arguments.
  """
  check_callable(value, name, expected)
  try:
    signature = inspect.signature(value)
  except (TypeError, ValueError):
    return value
  try:
    signature.bind(*range(num_args))
  except TypeError as error:
    raise TypeError(
      f"`{name}` must be a function {expected}, taking {num_args} positional "
      f"argument(s); got {getattr(value, '__qualname__', type(value).__name__)}"
      f"{signature}: {error}."
    ) from None
  return value


def describe(value: Any) -> str:
  """A short description of ``value`` for an error message: its type and repr."""
  text = repr(value)
  if len(text) > 80:
    text = text[:77] + "..."
  return f"{type(value).__name__} {text}"


def check_choice(value: Any, choices: Sequence[Any], name: str) -> Any:
  """Returns ``value`` if it is one of ``choices``, else raises a ValueError."""
  if not isinstance(value, str | None) or value not in choices:
    raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")
  return value


def check_bool(value: Any, name: str) -> bool:
  """Returns ``value`` if it is a Python or NumPy bool, else raises a ValueError."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be True or False, got {value!r}.")
  return bool(value)


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
  """Returns ``value`` as a Python int ``>= minimum``, else raises a ValueError."""
  if is_traced(value):
    raise ValueError(
      f"`{name}` must be a concrete Python int, got a traced value; it fixes "
      "array shapes, so mark it static (e.g. `static_args` of "
      "optax.inject_hyperparams)."
    )
  as_int = None
  if not isinstance(value, (bool, np.bool_)):
    try:
      as_int = operator.index(value)
    except TypeError:
      if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.integer):
        as_int = int(np.asarray(value))
  if as_int is None or as_int < minimum:
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
  return as_int


def _interval(minimum: float, maximum: float, open_minimum: bool) -> str:
  low = f"> {minimum:g}" if open_minimum else f">= {minimum:g}"
  if math.isinf(maximum):
    return low
  return f"in {'(' if open_minimum else '['}{minimum:g}, {maximum:g}]"


def check_scalar(
  value: Any,
  name: str,
  *,
  minimum: float = -math.inf,
  maximum: float = math.inf,
  open_minimum: bool = False,
) -> Any:
  """Checks a real scalar setting: finite and within ``[minimum, maximum]``.

  Python numbers, NumPy scalars and concrete JAX scalars are all checked. A
  traced scalar (under ``jit``, or injected by ``optax.inject_hyperparams``)
  cannot be, and is returned unchanged: its value is only known at run time.

  Args:
    value: the setting.
    name: the argument's name, for the error message.
    minimum: the smallest value allowed.
    maximum: the largest value allowed.
    open_minimum: exclude ``minimum`` itself.

  Returns:
    ``value`` itself (a concrete value is not converted, so that its dtype is
    kept).

  Raises:
    ValueError: if ``value`` is not a real scalar, is NaN or infinite, or lies
      outside the interval.
  """
  expected = f"a finite float {_interval(minimum, maximum, open_minimum)}"
  if is_traced(value):
    if jnp.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.number):
      raise ValueError(
        f"`{name}` must be {expected}, got a traced value of shape "
        f"{jnp.shape(value)} and dtype {value.dtype}."
      )
    return value
  if isinstance(value, (bool, np.bool_)) or np.ndim(value) != 0:
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.") from None
  too_low = number <= minimum if open_minimum else number < minimum
  if not math.isfinite(number) or too_low or number > maximum:
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
  return value


def nan_unless_valid(
  value: Any, *, minimum: float = -math.inf, maximum: float = math.inf
) -> Any:
  """The run-time policy for a traced scalar setting: NaN where it is invalid.

  A setting known only at run time (injected by ``optax.inject_hyperparams``,
  a schedule's later value, an argument traced by ``jit``) cannot be refused
  by :func:`check_scalar`; outside ``[minimum, maximum]`` or not finite, it
  becomes NaN, so that what is computed from it is NaN, never a silently
  different result (a negative noise scale acting as its absolute value).
  NSO's ``sigma`` and ``clean_weight`` and the measures' noise scale all
  follow it. A concrete value is returned unchanged (it was checked).

  Args:
    value: the setting, checked by :func:`check_scalar` when concrete.
    minimum: the smallest valid value.
    maximum: the largest valid value.

  Returns:
    ``value``, or NaN in its dtype where a traced ``value`` is invalid.
  """
  if not is_traced(value):
    return value
  valid = jnp.isfinite(value)
  if maximum < math.inf:
    valid = (value <= maximum) & valid
  if minimum > -math.inf:
    valid = (value >= minimum) & valid
  return jnp.where(valid, value, jnp.nan)


def tree_all(predicate: Any, tree: PyTree) -> jax.Array:
  """Whether ``predicate(leaf)`` (a boolean array) holds everywhere in ``tree``.

  True for an empty tree.
  """
  leaves = [jnp.all(predicate(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def same_structure(a: PyTree, b: PyTree) -> bool:
  """Whether two pytrees have the same structure (node types and keys)."""
  # jaxlib's PyTreeDef has no type stub: its comparison is untyped.
  return bool(jax.tree.structure(a) == jax.tree.structure(b))  # type: ignore[operator]


def check_supported_float(dtype: Any, what: str) -> None:
  """Raises a TypeError for a floating-point dtype nso_jax does not compute in.

  Args:
    dtype: a floating-point dtype.
    what: what has it, e.g. "`params` leaf ['w']".
  """
  if jnp.dtype(dtype).name not in SUPPORTED_FLOATS:
    raise TypeError(
      f"{what} has dtype {jnp.dtype(dtype).name}, which is not supported: "
      f"nso_jax computes in {', '.join(SUPPORTED_FLOATS)} (8-bit and 4-bit "
      "floats have no implicit promotion to the float32 its sums run in). "
      "Keep float32 master weights and cast them inside the loss."
    )


def check_float_tree(tree: PyTree, name: str, purpose: str) -> list[Any]:
  """Returns the leaves of ``tree``; raises if it has none or one is not float.

  Args:
    tree: a pytree of arrays or shape/dtype structs.
    name: the argument's name, for the error message.
    purpose: what the leaves are for, completing "... has dtype int32; "
      (e.g. "noise can only perturb floating-point parameters").

  Returns:
    The leaves, in ``jax.tree.leaves`` order.

  Raises:
    ValueError: if ``tree`` has no leaves.
    TypeError: if a leaf is not floating point.
  """
  leaves_with_path = jax.tree_util.tree_leaves_with_path(tree)
  if not leaves_with_path:
    raise ValueError(f"`{name}` is an empty pytree: it needs at least one array.")
  for path, leaf in leaves_with_path:
    where = jax.tree_util.keystr(path) or "(root)"
    try:
      dtype = jnp.result_type(leaf)
    except TypeError:
      kind = f"{type(leaf).__module__}.{type(leaf).__qualname__}"
      raise TypeError(
        f"`{name}` leaf {where} is a {kind}, not an array; {purpose}. Pass "
        "the arrays only: for an Equinox module, "
        "`eqx.filter(model, eqx.is_inexact_array)`, in which the other fields "
        "are None."
      ) from None
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"`{name}` leaf {where} has dtype {dtype}; {purpose}.")
    check_supported_float(dtype, f"`{name}` leaf {where}")
  return [leaf for _, leaf in leaves_with_path]
