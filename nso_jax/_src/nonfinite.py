"""Skipping updates whose gradient is not finite, however many in a row."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nso_jax._src import checks


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    inner_state: the wrapped transformation's state, as of the last finite
      update.
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

  Put it after :func:`nso_jax.noise_stability`, around the base optimizer, so
  that NSO's key and step count still advance on a skipped step (the next
  step draws fresh noise): ``optax.chain(noise_stability(...),
  skip_nonfinite(optax.sgd(0.1)))``, or ``nso(..., skip_nonfinite=True)``.

  Args:
    inner: the transformation to guard, e.g. the base optimizer.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with a
    :class:`SkipNonfiniteState`.

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
    return SkipNonfiniteState(
      inner_state=inner.init(params),
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
    new_inner = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old), new_inner, state.inner_state
    )
    num_skipped = state.num_skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
    return new_updates, SkipNonfiniteState(new_inner, num_skipped, finite)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
