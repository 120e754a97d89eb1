"""Small shared helpers: PRNG key canonicalisation and argument checks."""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KeyLike = Any  # int seed, typed key array, or legacy uint32[2] key


def canonicalize_key(key: KeyLike, name: str = "key") -> jax.Array:
  """Returns a typed PRNG key array from an int seed or any JAX key.

  Args:
    key: an integer seed, a typed key (``jax.random.key``) or a legacy raw key
      (``jax.random.PRNGKey``, a ``uint32[2]`` array).
    name: the argument name used in error messages.

  Returns:
    A scalar typed key array.

  Raises:
    ValueError: if ``key`` is ``None`` (there is no silent default seed).
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


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
  """Returns ``value`` as a Python int, or raises a ValueError naming it."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
      f"`{name}` must be a concrete Python int, got a traced value; it fixes "
      "array shapes, so mark it static (e.g. `static_args` of "
      "optax.inject_hyperparams)."
    )
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
  try:
    as_int = operator.index(value)
  except TypeError:
    try:
      as_int = operator.index(np.asarray(value).item()) if np.ndim(value) == 0 else None
    except TypeError:
      as_int = None
  if as_int is None or as_int < minimum:
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
  return as_int
