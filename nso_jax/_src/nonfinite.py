"""Skipping updates whose gradient is not finite, however many in a row."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nso_jax._src import checks

# States that a skipped update still advances, and states that cannot be
# skipped as a whole (with the way to skip instead), by type; the modules that
# define them register them (see `advance_when_skipped`, `refuse_to_skip`).
_ADVANCING: list[type] = []
_REFUSED: dict[type, str] = {}


def advance_when_skipped(state_type: type) -> type:
  """Registers a state that a skipped update still advances.

  NSO's state is one: its key and step count advance on a skipped step, so
  that the next step draws fresh noise. Kept as it was, a noise draw whose
  gradient is not finite would repeat at every later step, and every step
  would be skipped.

  Args:
    state_type: the state's class.

  Returns:
    ``state_type``.
  """
  _ADVANCING.append(state_type)
  return state_type


def refuse_to_skip(state_type: type, reason: str) -> type:
  """Registers a state that :func:`skip_nonfinite` refuses to wrap, and why.

  Args:
    state_type: the state's class.
    reason: the error message, naming where to put the skip instead.

  Returns:
    ``state_type``.
  """
  _REFUSED[state_type] = reason
  return state_type


def _is_registered(node: Any) -> bool:
  return isinstance(node, tuple(_ADVANCING) + tuple(_REFUSED))


def _check_skippable(state: Any) -> None:
  """Raises if ``state`` holds a state that cannot be skipped as a whole."""
  for node in jax.tree.leaves(state, is_leaf=_is_registered):
    for state_type, reason in _REFUSED.items():
      if isinstance(node, state_type):
        raise ValueError(reason)


def _keep_unless_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``finite``, else ``old``; the registered states always advance."""

  def select(new_node: Any, old_node: Any) -> Any:
    if isinstance(new_node, tuple(_ADVANCING)):
      return new_node
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_node, old_node)

  return jax.tree.map(select, new, old, is_leaf=_is_registered)


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    inner_state: the wrapped transformation's state, as of the last finite
      update (NSO's key and step count inside it advance at every update).
    num_skipped: int32 number of updates skipped so far.
    last_finite: whether the last update was applied.
  """

  inner_state: Any
  num_skipped: jax.Array
  last_finite: jax.Array


def skip_nonfinite(
  inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Skips every update whose incoming or outgoing gradient is not finite.

  A skipped update returns zeros and leaves ``inner``'s state as it was, so
  neither the parameters nor the optimizer's moments see a NaN or an
  infinity; the skipped updates are counted in the state. Unlike
  ``optax.apply_if_finite(inner, max_consecutive_errors=n)``, which applies
  the non-finite update once ``n`` bad updates came in a row, it never
  applies one, however many occur: a run that diverges for good stands still
  (watch ``num_skipped``) instead of filling its parameters with NaN.

  NSO's key and step count advance on a skipped step wherever it is put, so
  that the next step draws fresh noise: around the base optimizer,
  ``optax.chain(noise_stability(...), skip_nonfinite(optax.sgd(0.1)))`` or
  ``nso(..., skip_nonfinite=True)``; or around the whole of it,
  ``skip_nonfinite(nso(...))``, where everything else in the state is kept.
  With :func:`nso_jax.accumulate`, put it around the optimizer inside,
  ``accumulate(noise_stability(...), skip_nonfinite(opt), n)``: around
  ``accumulate`` it is refused (``init`` raises a ``ValueError``), since a
  skipped micro-batch would keep the step's noise, and the next ones would
  repeat it.

  Args:
    inner: the transformation to guard, e.g. the base optimizer.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with a
    :class:`SkipNonfiniteState`.

  Raises:
    ValueError: at ``init``, when ``inner`` is :func:`nso_jax.accumulate`
      (or holds it).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import nso_jax
    >>> tx = nso_jax.skip_nonfinite(optax.sgd(0.1, momentum=0.9))
    >>> params = jnp.ones(2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([1.0, jnp.nan]), state, params)
    >>> updates, int(state.num_skipped)
    (Array([0., 0.], dtype=float32), 1)
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: Any) -> SkipNonfiniteState:
    inner_state = inner.init(params)
    _check_skippable(inner_state)
    return SkipNonfiniteState(
      inner_state=inner_state,
      num_skipped=jnp.zeros([], jnp.int32),
      last_finite=jnp.asarray(True),
    )

  def update_fn(
    updates: Any, state: SkipNonfiniteState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, SkipNonfiniteState]:
    new_updates, new_inner = inner.update(
      updates, state.inner_state, params, **extra_args
    )
    finite = checks.tree_all(jnp.isfinite, updates) & checks.tree_all(
      jnp.isfinite, new_updates
    )
    new_updates = jax.tree.map(
      lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates
    )
    new_inner = _keep_unless_finite(finite, new_inner, state.inner_state)
    num_skipped = state.num_skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
    return new_updates, SkipNonfiniteState(new_inner, num_skipped, finite)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
