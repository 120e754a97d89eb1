"""Noise stability optimisation as an Optax gradient transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import estimator
from nso_jax._src import noise as noise_lib
from nso_jax._src import nonfinite
from nso_jax._src import selection

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class NoiseStabilityState(NamedTuple):
  r"""State of :func:`noise_stability`.

  Attributes:
    count: int32 number of updates taken; the argument of a ``sigma`` schedule.
    key: the typed PRNG key of the next update.
    value: float32 mean of the values ``grad_fn`` returned at the perturbed
      weights in the last update, an estimate of the smoothed loss
      ``E[L(W + U)]``; zero unless ``has_value=True``.
    noise_resolution: with ``track_noise_resolution=True``, the float32
      share of the last update's noise that the parameters' dtype can hold,
      :math:`\lVert (W + U) - W \rVert^2 / \lVert U \rVert^2` over the
      half-precision (float16, bfloat16) leaves, for the first pair. Near 1,
      the perturbation is the one asked for; well below 1, ``W + U`` rounds
      back towards ``W`` and NSO drifts towards the plain gradient: raise
      ``sigma`` or keep float32 master weights. Exactly 1 when no leaf is in
      half precision; NaN (not measured) for half-precision parameters unless
      tracked, since the measurement draws the first pair's noise again.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  key: jax.Array
  value: jax.Array
  noise_resolution: jax.Array


def noise_stability(
  sigma: ScalarOrSchedule,
  num_perturbations: int = 1,
  *,
  key: checks.KeyLike,
  noise: noise_lib.NoiseName = "normal",
  one_sided: bool = False,
  clean_weight: float = 0.0,
  has_value: bool = False,
  execution: batching.Execution = "auto",
  chunk_size: int | None = None,
  track_noise_resolution: bool = False,
  param_filter: selection.ParamFilter = None,
  pair_axis: batching.AxisName | None = None,
  data_axis: batching.AxisName | None = None,
  per_shard_noise: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces the gradient by the noise stability (NSO) gradient.

  Each update draws ``k = num_perturbations`` noise samples ``U_j`` of
  variance ``sigma**2`` per element and returns

  .. math::

    G = \frac{1}{2k} \sum_{j=1}^{k}
        \left[\nabla L(W + U_j) + \nabla L(W - U_j)\right],

  an estimate of the gradient of ``E[L(W + U)] = L(W) + (sigma**2 / 2)
  tr(H(W)) + O(sigma**4)``, which steers training towards flat minima. Chain
  it before any optimizer, which then steps at the unperturbed weights:
  ``optax.chain(noise_stability(...), optax.sgd(...))``.

  ``update`` takes the gradient function as a keyword-only extra argument,
  ``tx.update(grads, state, params, grad_fn=grad_fn)``, and ignores other
  extra arguments so the chain can carry them. The incoming ``grads`` are
  read only when ``clean_weight > 0``, as the clean gradient at ``params``;
  pass ``None`` (or zeros) otherwise. With ``clean_weight > 0``, incoming
  ``grads`` that are ``None`` or all zeros are taken as missing and the clean
  gradient is computed with ``grad_fn`` (one more evaluation), so a clean
  weight never mixes in a gradient that was not computed.

  The PRNG key is split once per update and kept in the state, so the same
  key gives the same updates bit for bit, and a checkpointed state resumes
  the same trajectory.

  Numerics: settings known when the transformation is built are checked then
  (a schedule for ``sigma`` is checked at step 0). A value known only at run
  time (a ``sigma`` or ``clean_weight`` injected by
  ``optax.inject_hyperparams``, a schedule's later values) that is invalid
  makes the update NaN, never a silently different one. Non-finite
  gradients are passed on (the key and count still advance): to skip such
  steps, wrap the optimizer that follows in :func:`nso_jax.skip_nonfinite`,
  or pass ``skip_nonfinite=True`` to :func:`nso_jax.nso`. For gradient
  accumulation put ``optax.MultiSteps(opt, n).gradient_transformation()``
  after this transformation, so that each micro-batch's NSO gradient is
  accumulated.

  Args:
    sigma: the noise standard deviation, a float >= 0 or a schedule mapping
      the update count to it (e.g. ``optax.linear_schedule`` for a warm-up).
    num_perturbations: ``k``, the number of noise pairs per update (``2k``
      gradient evaluations; ``k`` if ``one_sided``).
    key: an int seed or a PRNG key. Required: there is no default seed.
    noise: ``"normal"`` (the paper's), ``"uniform"``, ``"laplace"`` or
      ``"rademacher"``, all zero-mean with variance ``sigma**2``; or
      ``"normal_fast"``, a cheaper approximation of ``"normal"`` with the same
      first two moments (see :func:`nso_jax.sample_noise`).
    one_sided: perturb with ``+U_j`` only (random weight perturbation).
    clean_weight: ``lam`` in [0, 1]; the update is ``lam * grads + (1 - lam)
      * G``, ``grads`` being the clean gradient. The paper uses 0.
    has_value: ``grad_fn`` returns ``(value, grads)`` with a scalar value, as
      :func:`jax.value_and_grad` does; its mean over the perturbed weights is
      kept in ``state.value`` for logging.
    execution: how the pairs run: ``"auto"``, ``"vmap"``, ``"map"`` or
      ``"unroll"``; see :func:`nso_jax.noise_stability_gradient`. The result
      is the same up to floating-point summation order.
    chunk_size: pairs per step of ``execution="map"`` (default 1 on CPU:
      sequential; 16 on accelerators).
    track_noise_resolution: measure ``state.noise_resolution`` for
      half-precision parameters (one more noise draw per step).
    param_filter: the leaves to perturb: ``None`` (all), a pytree of Python
      bools whose structure is a prefix of ``params``, or a function
      ``(path, leaf) -> bool`` (the Hessian tools' ``param_filter``). The
      other leaves are evaluated unperturbed; the optimizer still updates
      them, with their gradient averaged over the perturbed evaluations.
    pair_axis: inside :func:`jax.shard_map`, the mesh axis whose devices
      split the pairs; the update does not depend on its size.
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which the batch is split: ``grad_fn`` returns the local gradient and
      the update averages it over the shards, in the same single ``psum`` as
      the pairs. With ``clean_weight > 0`` the clean gradient is computed
      here, averaged over the shards by a second ``psum``; the gradient
      passed to ``update`` is not read.
    per_shard_noise: each shard of ``data_axis`` draws its own pairs
      (``fold_in(key, shard)``): ``n`` shards average ``n k`` pairs. It
      changes with the number of shards; see
      :func:`nso_jax.noise_stability_gradient`.
      ``state.noise_resolution`` is measured on the unfolded key's first
      pair, a draw of the same distribution.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: on invalid settings, or at ``update`` when ``grad_fn`` or
      ``params`` is missing.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import nso_jax
    >>> def loss(w, x):
    ...   return jnp.mean((x @ w - 1.0) ** 2)
    >>> x = jnp.ones((8, 3))
    >>> params = jnp.zeros(3)
    >>> tx = optax.chain(
    ...     nso_jax.noise_stability(sigma=0.01, num_perturbations=2, key=0),
    ...     optax.sgd(0.05, momentum=0.5),
    ... )
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   grad_fn = lambda p: jax.grad(loss)(p, x)
    ...   # No clean gradient is needed with clean_weight=0: pass None.
    ...   updates, state = tx.update(None, state, params, grad_fn=grad_fn)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(20):
    ...   params, state = step(params, state)
    >>> print(f"{loss(params, x):.4f}")
    0.0000
    >>> int(state[0].count)
    20

  References:
    Zhang, Li, Ju, `Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach <https://arxiv.org/abs/2306.08553>`_,
    TMLR 2024.
  """
  if callable(sigma):
    checks.check_scalar(sigma(jnp.zeros([], jnp.int32)), "sigma(0)", minimum=0.0)
  else:
    estimator.check_sigma(sigma)
  num_perturbations = checks.check_positive_int(num_perturbations, "num_perturbations")
  noise_lib.check_noise(noise)
  one_sided = checks.check_bool(one_sided, "one_sided")
  has_value = checks.check_bool(has_value, "has_value")
  track = checks.check_bool(track_noise_resolution, "track_noise_resolution")
  clean_weight = estimator.check_clean_weight(clean_weight)
  batching.check_execution(execution, chunk_size)
  estimator.check_axes(pair_axis, data_axis, per_shard_noise, bound=False)
  key = checks.canonicalize_key(key)

  def init_fn(params):
    del params
    return NoiseStabilityState(
      count=jnp.zeros([], jnp.int32),
      key=key,
      value=jnp.zeros([], jnp.float32),
      noise_resolution=jnp.ones([], jnp.float32),
    )

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    if grad_fn is None:
      raise ValueError(
        "noise_stability needs the gradient function: call "
        "`tx.update(grads, state, params, grad_fn=grad_fn)` with "
        "`grad_fn(params) -> grads` (e.g. `lambda p: jax.grad(loss)(p, batch)`). "
        "Flax's own TrainState.apply_gradients does not pass `grad_fn` on: use "
        "nso_jax.training.TrainState, or nnx.Optimizer.update(..., grad_fn=...)."
      )
    if params is None:
      raise ValueError(
        "noise_stability perturbs the parameters: pass them to "
        "`tx.update(grads, state, params, grad_fn=grad_fn)`."
      )
    step_key, next_key = jax.random.split(state.key)
    sigma_now = sigma(state.count) if callable(sigma) else sigma
    # With the batch split over `data_axis`, the clean gradient is computed by
    # the estimator, as the mean of the shards' gradients: the one passed in
    # could be the shard's own, or a sum (`jax.grad` inside shard_map sums the
    # gradients of replicated parameters over the shards).
    clean = (
      None
      if data_axis is not None
      else _clean_gradient(updates, params, grad_fn, clean_weight, has_value)
    )
    out = estimator.noise_stability_gradient(
      grad_fn,
      params,
      step_key,
      sigma=sigma_now,
      num_perturbations=num_perturbations,
      noise=noise,
      one_sided=one_sided,
      clean_weight=clean_weight,
      clean_gradient=clean,
      has_value=has_value,
      execution=execution,
      chunk_size=chunk_size,
      param_filter=param_filter,
      pair_axis=pair_axis,
      data_axis=data_axis,
      per_shard_noise=per_shard_noise,
    )
    value = state.value
    if has_value:
      value, out = out
      if jnp.ndim(value) != 0:
        raise ValueError(
          "with has_value=True, `grad_fn` must return a scalar value; got "
          f"shape {jnp.shape(value)}. Use nso_jax.noise_stability_gradient "
          "directly for pytree values."
        )
      value = jnp.asarray(value, jnp.float32)
    new_state = NoiseStabilityState(
      count=optax.safe_increment(state.count),
      key=next_key,
      value=value,
      noise_resolution=_noise_resolution(
        params, step_key, sigma_now, noise, track, param_filter
      ),
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _clean_gradient(
  updates: Any, params: Any, grad_fn: Any, clean_weight: Any, has_value: bool
) -> Any:
  """The clean gradient to mix in: the incoming one, or ``None`` to compute it.

  Incoming gradients that are all zeros are taken as missing (a placeholder
  such as ``train_step(clean_gradient=False)`` passes), and computed. Under
  ``jax.vmap`` the test becomes a select: the clean gradient is then always
  computed, one more evaluation per step (only with ``clean_weight > 0``).
  """
  if updates is None or (not checks.is_traced(clean_weight) and clean_weight == 0):
    return None
  if not checks.same_structure(updates, params):
    raise ValueError(
      "with clean_weight > 0, the gradient passed to `update` is the clean "
      "gradient and must have the structure of `params`; got "
      f"{jax.tree.structure(updates)} for {jax.tree.structure(params)}."
    )

  def compute() -> Any:
    out = grad_fn(params)
    return jax.tree.map(jnp.asarray, out[1] if has_value else out)

  all_zero = checks.tree_all(lambda g: g == 0, updates)
  incoming = jax.tree.map(
    lambda g, c: jnp.asarray(g, c.dtype), updates, jax.eval_shape(compute)
  )
  return jax.lax.cond(all_zero, compute, lambda: incoming)


def _noise_resolution(
  params: Any,
  key: jax.Array,
  sigma: Any,
  noise: noise_lib.NoiseName,
  track: bool,
  param_filter: selection.ParamFilter,
) -> Any:
  """``|(W + U) - W|^2 / |U|^2`` over perturbed half-precision leaves, pair 0."""
  perturbed = selection.selection_mask(params, param_filter)
  half = [
    keep and jnp.dtype(jnp.result_type(p)).itemsize < 4
    for p, keep in zip(jax.tree.leaves(params), perturbed, strict=True)
  ]
  if not any(half):
    return jnp.ones([], jnp.float32)
  if not track:
    return jnp.full([], jnp.nan, jnp.float32)
  z = noise_lib.sample_noise(jax.random.fold_in(key, 0), params, noise)
  held, asked = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32)
  for is_half, w, zi in zip(
    half, jax.tree.leaves(params), jax.tree.leaves(z), strict=True
  ):
    if is_half:
      u = zi * jnp.asarray(sigma, zi.dtype)
      moved = (w + u).astype(jnp.float32) - w.astype(jnp.float32)
      held += jnp.sum(moved**2)
      asked += jnp.sum(u.astype(jnp.float32) ** 2)
  return jnp.where(asked > 0, held / jnp.where(asked > 0, asked, 1), 1.0)


def nso(
  optimizer: optax.GradientTransformation,
  sigma: ScalarOrSchedule,
  num_perturbations: int = 1,
  *,
  key: checks.KeyLike,
  skip_nonfinite: bool = False,
  **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """Bundles :func:`noise_stability` with a base optimizer.

  ``nso(opt, sigma, k, key=key)`` is ``optax.chain(noise_stability(sigma, k,
  key=key), opt)``: the base optimizer (and its weight decay) acts at the
  unperturbed weights with the NSO gradient. With ``skip_nonfinite=True`` the
  base optimizer is wrapped in :func:`nso_jax.skip_nonfinite`: a step whose
  NSO gradient is not finite changes neither the parameters nor the
  optimizer's state.

  Args:
    optimizer: the base optimizer, e.g. ``optax.sgd(0.1, momentum=0.9)`` or
      ``optax.adamw(1e-3)``.
    sigma: the noise standard deviation or its schedule.
    num_perturbations: ``k``, the number of noise pairs per update.
    key: an int seed or a PRNG key.
    skip_nonfinite: skip (and count) steps whose gradient is not finite.
    **kwargs: further options of :func:`noise_stability`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` needs
    ``grad_fn``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import nso_jax
    >>> tx = nso_jax.nso(optax.adamw(1e-3), sigma=0.01, num_perturbations=2, key=0)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> type(state[0]).__name__
    'NoiseStabilityState'
  """
  if checks.check_bool(skip_nonfinite, "skip_nonfinite"):
    optimizer = nonfinite.skip_nonfinite(optimizer)
  return optax.chain(
    noise_stability(sigma, num_perturbations, key=key, **kwargs), optimizer
  )
