r"""Curvature readings from NSO's own evaluations.

Each step of :func:`nso_jax.noise_stability` evaluates the loss at the pairs
``W + U_j`` and ``W - U_j``. With the clean loss ``L(W)`` beside them, the
pair is a reading of the Hessian's trace: by Taylor expansion, the odd terms
cancelling,

.. math::

  \tfrac12\left[L(W + U) + L(W - U)\right] - L(W)
  = \tfrac12 U^\top H U + O(\sigma^4),
  \qquad E\left[U^\top H U\right] = \sigma^2 \operatorname{tr}(H),

for any zero-mean noise with independent elements of variance ``sigma**2``.
:func:`curvature_readings` wraps an optimizer holding NSO and keeps running
estimates of ``tr(H)`` and of the gap relative to the loss, with standard
errors.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nso_jax._src import estimator
from nso_jax._src import mesh
from nso_jax._src import selection
from nso_jax._src import transform


class CurvatureReadings(NamedTuple):
  """The readings kept by :func:`curvature_readings`, all float32 but ``count``.

  Attributes:
    count: int32 number of readings taken: the updates whose reading was
      finite (``sigma > 0``, finite losses, a nonzero clean loss).
    loss: the clean loss ``L(W)`` of the last update, at the weights the
      update started from.
    gap: the noise-stability gap of the last update, ``mean_j [L(W + U_j) +
      L(W - U_j)] / 2 - L(W)``, an estimate of ``(sigma**2 / 2) tr(H)``.
    trace: the running estimate of ``tr(H)``, the bias-corrected exponential
      moving average of the readings ``2 gap / sigma**2``.
    trace_stderr: its standard error (``inf`` before two readings).
    trace_var: the weighted variance of the readings about ``trace``, which
      the update carries to the next step.
    relative_gap: the running estimate of ``gap / loss``.
    relative_gap_stderr: its standard error (``inf`` before two readings).
    relative_gap_var: the weighted variance of the readings ``gap / loss``.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  loss: jax.Array
  gap: jax.Array
  trace: jax.Array
  trace_stderr: jax.Array
  trace_var: jax.Array
  relative_gap: jax.Array
  relative_gap_stderr: jax.Array
  relative_gap_var: jax.Array


def _check_decay(decay: Any) -> float:
  """``decay``, a Python float in (0, 1)."""
  if (
    isinstance(decay, bool)
    or not isinstance(decay, (int, float))
    or not 0.0 < float(decay) < 1.0
  ):
    raise ValueError(
      f"`decay` must be a float in (0, 1), the weight the running estimates "
      f"keep of their past; got {decay!r}."
    )
  return float(decay)


def _init_readings() -> CurvatureReadings:
  zero = jnp.zeros([], jnp.float32)
  inf = jnp.full([], jnp.inf, jnp.float32)
  return CurvatureReadings(
    jnp.zeros([], jnp.int32), zero, zero, zero, inf, zero, zero, inf, zero
  )


def _the_noise_state(opt_state: Any) -> transform.NoiseStabilityState:
  """The one :class:`NoiseStabilityState` of ``inner``'s state."""
  found = transform.noise_states(opt_state)
  is_accumulation = lambda node: isinstance(node, transform.AccumulationState)
  if any(map(is_accumulation, jax.tree.leaves(opt_state, is_leaf=is_accumulation))):
    raise ValueError(
      "`inner` of curvature_readings holds nso_jax.accumulate, whose noise "
      "state changes once per accumulated step: a micro-batch's clean loss "
      "would be read against another step's perturbed losses. Read the "
      "curvature without accumulation."
    )
  if len(found) != 1:
    raise ValueError(
      "`inner` of curvature_readings must hold one noise_stability "
      f"transformation (its state a NoiseStabilityState); found {len(found)}. "
      "Pass the NSO optimizer, e.g. nso_jax.nso(optax.sgd(0.1), 0.01, key=0)."
    )
  return found[0]


def _check_needed(grad_fn: Any, params: Any) -> None:
  """``update`` needs ``grad_fn`` and ``params``."""
  if grad_fn is None:
    raise ValueError(
      "curvature_readings needs the gradient function: call "
      "`tx.update(grads, state, params, grad_fn=grad_fn)` with `grad_fn` "
      "returning (loss, grads), e.g. `jax.value_and_grad(loss)`."
    )
  if params is None:
    raise ValueError(
      "curvature_readings evaluates the loss at the parameters: pass them to "
      "`tx.update(grads, state, params, grad_fn=grad_fn)`."
    )


def _check_returns_loss(grad_fn: Any, params: Any, settings: Any) -> None:
  """``grad_fn`` must return ``(value, grads)``: the value is what is read."""
  perturbed = selection.selection_mask(params, settings.estimator.param_filter)
  has_value, _, _ = estimator.gradient_shapes(grad_fn, params, perturbed)
  if not has_value:
    raise ValueError(
      "`grad_fn` returns gradients only; curvature_readings reads the loss: "
      "pass `grad_fn` returning (loss, grads), e.g. "
      "`jax.value_and_grad(loss)`."
    )


def _check_pairs(settings: Any) -> None:
  """Refuses a one-sided NSO, before its update computes anything."""
  if settings.estimator.one_sided:
    raise ValueError(
      "curvature_readings needs the pairs W + U and W - U: with "
      "`one_sided`=True, L(W + U) - L(W) carries the first-order term "
      "grad . U, which has mean zero but swamps the curvature. Build NSO with "
      "one_sided=False."
    )


def _the_step(seen: list[tuple[Any, Any]]) -> tuple[Any, Any]:
  """The settings and ``sigma`` of the one NSO update that ``inner`` ran."""
  if len(seen) != 1:
    raise ValueError(
      f"`inner` of curvature_readings ran {len(seen)} noise_stability "
      "updates in one update, expected one."
    )
  return seen[0]


def _clean_loss(grad_fn: Any, params: Any, data_axes: tuple[str, ...]) -> jax.Array:
  """``L(W)``: the value of ``grad_fn(params)``, averaged over the data shards."""
  params = jax.tree.map(lambda x: mesh.mark_varying(x, data_axes), params)
  value = jnp.asarray(grad_fn(params)[0], jnp.float32)
  total = mesh.psum_varying(value, data_axes, "data_axis")
  return total / mesh.axis_size(data_axes)


def _stderr(var: jax.Array, count: jax.Array, decay: float) -> jax.Array:
  """The standard error of the bias-corrected EMA of ``count`` readings."""
  t = count.astype(jnp.float32)
  power = jnp.power(jnp.float32(decay), t)
  # The sum of the squared weights, (1 - d)(1 + d^t) / ((1 + d)(1 - d^t)).
  weight_sq = (1 - decay) * (1 + power) / ((1 + decay) * (1 - power))
  # The weighted variance is v (1 - weight_sq) in expectation.
  v = var / jnp.maximum(1 - weight_sq, jnp.finfo(jnp.float32).tiny)
  return jnp.where(count >= 2, jnp.sqrt(v * weight_sq), jnp.inf)


def _ema(mean: Any, var: Any, x: Any, alpha: Any) -> tuple[Any, Any]:
  """The weighted mean and variance with the new reading's weight ``alpha``."""
  delta = x - mean
  return mean + alpha * delta, (1 - alpha) * (var + alpha * delta**2)


def _next_readings(
  old: CurvatureReadings, gap: Any, loss: Any, sigma: Any, decay: float
) -> CurvatureReadings:
  sigma = jnp.asarray(sigma, jnp.float32)
  trace = 2 * gap / sigma**2
  relative = gap / loss
  taken = (sigma > 0) & jnp.isfinite(trace) & jnp.isfinite(relative)
  count = old.count + taken.astype(jnp.int32)
  # The bias-corrected EMA's weight of the newest of t readings.
  # (The first is exactly 1: the first reading owes nothing to the zeros.)
  power = jnp.power(jnp.float32(decay), count.astype(jnp.float32))
  alpha = jnp.where(count <= 1, 1.0, (1 - jnp.float32(decay)) / (1 - power))
  alpha = jnp.where(taken, alpha, 0.0)
  trace = jnp.where(taken, trace, old.trace)
  relative = jnp.where(taken, relative, old.relative_gap)
  new_trace, trace_var = _ema(old.trace, old.trace_var, trace, alpha)
  new_relative, relative_var = _ema(
    old.relative_gap, old.relative_gap_var, relative, alpha
  )
  return CurvatureReadings(
    count=count,
    loss=loss,
    gap=gap,
    trace=new_trace,
    trace_stderr=_stderr(trace_var, count, decay),
    trace_var=trace_var,
    relative_gap=new_relative,
    relative_gap_stderr=_stderr(relative_var, count, decay),
    relative_gap_var=relative_var,
  )


def curvature_readings(
  inner: optax.GradientTransformation, *, decay: float = 0.9
) -> optax.GradientTransformationExtraArgs:
  r"""Reads the Hessian's trace from NSO's own perturbed losses.

  ``inner`` is an optimizer holding one :func:`nso_jax.noise_stability`
  (e.g. :func:`nso_jax.nso`), two-sided. Each ``update`` runs ``inner``
  unchanged (``grad_fn`` and the other extra arguments passed on) and
  evaluates the clean loss ``L(W)`` as the value of ``grad_fn(params)``,
  which must return ``(loss, grads)`` as :func:`jax.value_and_grad` does.
  With the step's mean perturbed loss (``NoiseStabilityState.value``) and
  the step's ``sigma`` (a schedule's value at that step, or the injected
  one), the step's gap

  .. math::

    g = \frac{1}{2k}\sum_j \left[L(W + U_j) + L(W - U_j)\right] - L(W),
    \qquad E[g] = \frac{\sigma^2}{2}\operatorname{tr}(H) + O(\sigma^4),

  gives a reading ``2 g / sigma**2`` of ``tr(H)`` and one ``g / L(W)`` of the
  relative gap. With ``param_filter``, ``H`` is the block of the perturbed
  leaves. Inside :func:`jax.shard_map`, the clean loss is averaged over
  NSO's ``data_axis`` (its perturbed losses already are).

  The running estimates are bias-corrected exponential moving averages, as
  Adam's: after ``t`` readings the reading ``i`` has weight ``w_i = (1 - d)
  d^(t-i) / (1 - d^t)``. For independent readings of variance ``v`` the
  estimate has variance ``v q_t``, with ``q_t = sum_i w_i^2 = (1 - d)^2 (1 -
  d^(2t)) / ((1 - d^t)^2 (1 - d^2)) = (1 - d)(1 + d^t) / ((1 + d)(1 -
  d^t))`` (a geometric sum): ``q_1 = 1``, and ``q_t`` falls to ``(1 - d) /
  (1 + d)``, the variance of ``(1 + d) / (1 - d)`` readings averaged (19 at
  ``d = 0.9``). The weighted variance of the readings about the estimate has mean
  ``v (1 - q_t)``, so the standard error is ``sqrt(var q_t / (1 - q_t))``.
  It assumes the curvature changes little over those readings.

  Cost: one forward pass per update under :func:`jax.jit`, where the unused
  gradient of ``grad_fn(params)`` is dead code and removed; outside ``jit``
  it costs a gradient. Without the wrapper nothing changes: NSO's compiled
  step is the same.

  Args:
    inner: the optimizer holding NSO, with ``one_sided=False``.
    decay: ``d`` in (0, 1), the weight the running estimates keep of their
      past.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is
    ``(inner_state, CurvatureReadings)``.

  Raises:
    ValueError: for a ``decay`` outside (0, 1); at ``init``, when ``inner``
      holds no (or two) ``noise_stability``, or :func:`nso_jax.accumulate`;
      at ``update``, without ``grad_fn`` or ``params``, for a ``grad_fn``
      returning gradients only, and for a one-sided NSO.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import nso_jax
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0]) * w**2)
    >>> tx = nso_jax.curvature_readings(
    ...     nso_jax.nso(optax.sgd(0.0), sigma=0.1, num_perturbations=4, key=0))
    >>> params = jnp.ones(3)
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda s: tx.update(
    ...     None, s, params, grad_fn=jax.value_and_grad(loss))[1])
    >>> for _ in range(50):
    ...   state = step(state)
    >>> readings = state[1]
    >>> bool(abs(readings.trace - 6.0) < 4 * readings.trace_stderr)
    True
  """
  decay = _check_decay(decay)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: Any) -> tuple[Any, CurvatureReadings]:
    inner_state = inner.init(params)
    _the_noise_state(inner_state)
    return inner_state, _init_readings()

  def update_fn(
    updates: Any,
    state: tuple[Any, CurvatureReadings],
    params: Any = None,
    *,
    grad_fn: Any = None,
    **extra_args: Any,
  ) -> tuple[Any, tuple[Any, CurvatureReadings]]:
    inner_state, readings = state
    _check_needed(grad_fn, params)
    seen: list[tuple[Any, Any]] = []

    def observe(settings: Any, sigma: Any) -> None:
      _check_pairs(settings)
      seen.append((settings, sigma))

    with transform.observe_updates(observe):
      updates, inner_state = inner.update(
        updates, inner_state, params, grad_fn=grad_fn, **extra_args
      )
    settings, sigma = _the_step(seen)
    _check_returns_loss(grad_fn, params, settings)
    loss = _clean_loss(grad_fn, params, settings.estimator.data_axes)
    gap = _the_noise_state(inner_state).value - loss
    return updates, (inner_state, _next_readings(readings, gap, loss, sigma, decay))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
