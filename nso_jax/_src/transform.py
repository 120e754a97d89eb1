"""Noise stability optimisation as an Optax gradient transformation."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import estimator
from nso_jax._src import geometry
from nso_jax._src import mesh
from nso_jax._src import noise as noise_lib
from nso_jax._src import nonfinite
from nso_jax._src import selection

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]
Sigma = ScalarOrSchedule | geometry.NoiseScale | checks.PyTree


@nonfinite.advance_when_skipped  # a skipped step still draws fresh noise
class NoiseStabilityState(NamedTuple):
  """State of :func:`noise_stability`.

  Attributes:
    count: int32 number of updates taken; the argument of a ``sigma`` schedule.
    key: the typed PRNG key of the next update.
    value: float32 mean of the values ``grad_fn`` returned at the perturbed
      weights in the last update, an estimate of the smoothed loss
      ``E[L(W + U)]``; zero while ``grad_fn`` returns gradients only.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  key: jax.Array
  value: jax.Array


@dataclasses.dataclass(frozen=True)
class _Settings:
  """What each update of :func:`noise_stability` runs with, checked once."""

  estimator: estimator.Estimator
  sigma: ScalarOrSchedule  # the scalar factor (or schedule) of the noise
  noise_scale: geometry.NoiseScale | None  # its geometry; None: isotropic
  clean_weight: Any  # a float in [0, 1], or a traced one
  per_shard_noise: bool


def _make_settings(
  sigma: Any,
  estimator_settings: estimator.Estimator,
  clean_weight: Any,
  per_shard_noise: Any,
) -> _Settings:
  factor, noise_scale = geometry.split(sigma)
  if callable(factor):
    checks.check_scalar(factor(jnp.zeros([], jnp.int32)), "sigma(0)", minimum=0.0)
  else:
    estimator.check_sigma(factor)
  checks.check_scalar(clean_weight, "clean_weight", minimum=0.0, maximum=1.0)
  if not checks.is_traced(clean_weight):
    clean_weight = float(clean_weight)
  if (
    checks.check_bool(per_shard_noise, "per_shard_noise")
    and not estimator_settings.data_axes
  ):
    raise ValueError(
      "`per_shard_noise`=True draws each data shard's pairs from its own key: "
      "it needs `data_axis`, the mesh axis over which the batch is split."
    )
  return _Settings(
    estimator_settings, factor, noise_scale, clean_weight, per_shard_noise
  )


def noise_stability(
  sigma: Sigma,
  num_perturbations: int = 1,
  *,
  key: checks.KeyLike,
  noise: noise_lib.NoiseName = "normal",
  one_sided: bool = False,
  clean_weight: float = 0.0,
  param_filter: selection.ParamFilter = None,
  execution: batching.ExecutionLike = "auto",
  data_axis: mesh.AxisName | None = None,
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
  extra arguments so the chain can carry them. ``grad_fn`` returns gradients,
  or ``(value, grads)`` as :func:`jax.value_and_grad` does, with a scalar
  value: its mean over the perturbed weights is then kept in
  ``state.value`` for logging (which of the two is read from the output's
  structure, see :func:`nso_jax.noise_stability_gradient`). The incoming
  ``grads`` are read only when ``clean_weight > 0``, as the clean gradient at
  ``params``; pass ``None`` (or zeros) otherwise. With ``clean_weight > 0``,
  incoming ``grads`` that are ``None`` or all zeros are taken as missing and
  the clean gradient is computed with ``grad_fn`` (one more evaluation), so a
  clean weight never mixes in a gradient that was not computed.

  The PRNG key is split once per update and kept in the state, so the same
  key gives the same updates bit for bit, and a checkpointed state resumes
  the same trajectory.

  Numerics: every setting is checked when the transformation is built (a
  schedule for ``sigma`` at step 0). A value known only at run time (a
  ``sigma`` or ``clean_weight`` injected by ``optax.inject_hyperparams``, a
  schedule's later values) that is invalid makes the update NaN, never a
  silently different one. Non-finite gradients are passed on (the key and
  count still advance): to skip such steps, wrap the optimizer that follows
  in :func:`nso_jax.skip_nonfinite`, or pass ``skip_nonfinite=True`` to
  :func:`nso_jax.nso`. For gradient accumulation use
  :func:`nso_jax.accumulate` (not ``optax.MultiSteps`` around this
  transformation); :func:`nso_jax.check_chain` finds the compositions that
  run but compute something else. For half-precision parameters,
  :func:`nso_jax.noise_resolution` tells how much of the noise their dtype
  can hold, and ``init`` warns (once) when most of it rounds away.

  Args:
    sigma: the noise standard deviation, a float >= 0 or a schedule mapping
      the update count to it (e.g. ``optax.linear_schedule`` for a warm-up);
      or a noise geometry: a pytree of floats, one standard deviation per
      leaf, or :func:`nso_jax.leafwise`, :func:`nso_jax.filterwise` (scaled
      by each filter's norm), :func:`nso_jax.elementwise` (scaled by
      ``|w|``). Then ``U_j = sigma S(W) Z_j`` with ``S(W)`` computed at each
      update and held fixed during it, and the step follows the gradient of
      ``L + (1/2) tr(Sigma H)``, ``Sigma = diag(sigma**2 S(W)**2)``
      (:func:`nso_jax.hessian.weighted_trace` measures it).
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
    param_filter: the leaves to perturb: ``None`` (all), a pytree of Python
      bools whose structure is a prefix of ``params``, or a function
      ``(path, leaf) -> bool`` (the Hessian tools' ``param_filter``). The
      other leaves are evaluated unperturbed; the optimizer still updates
      them, with their gradient averaged over the perturbed evaluations.
    execution: how the pairs run, a :class:`nso_jax.batching.Execution` or a
      strategy name (``"auto"``, ``"vmap"``, ``"map"``, ``"unroll"``); see
      :func:`nso_jax.noise_stability_gradient`. The result is the same up to
      floating-point summation order. Inside :func:`jax.shard_map`, its
      ``axis`` names the mesh axis whose devices split the pairs; the update
      does not depend on its size.
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

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError, TypeError: on invalid settings, when it is built; at
      ``update``, when ``grad_fn`` or ``params`` is missing or ``grad_fn``'s
      output does not match ``params``.

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
    ...   grad_fn = jax.value_and_grad(lambda p: loss(p, x))
    ...   # No clean gradient is needed with clean_weight=0: pass None.
    ...   updates, state = tx.update(None, state, params, grad_fn=grad_fn)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(20):
    ...   params, state = step(params, state)
    >>> print(f"{loss(params, x):.4f}")
    0.0000
    >>> int(state[0].count), state[0].value.shape
    (20, ())

  References:
    Zhang, Li, Ju, `Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach <https://arxiv.org/abs/2306.08553>`_,
    TMLR 2024.
  """
  settings = _make_settings(
    sigma,
    estimator.make_estimator(
      num_perturbations, noise, one_sided, param_filter, execution, data_axis
    ),
    clean_weight,
    per_shard_noise,
  )
  key = checks.canonicalize_key(_not_injected(key))
  precision_checked: list[bool] = []

  def init_fn(params: Any) -> NoiseStabilityState:
    geometry.check_fits(settings.noise_scale, params, settings.estimator.param_filter)
    if not precision_checked:  # once per transformation
      precision_checked.append(True)
      _warn_if_noise_rounds_away(settings, params, key)
    return NoiseStabilityState(
      count=jnp.zeros([], jnp.int32), key=key, value=jnp.zeros([], jnp.float32)
    )

  def update_fn(
    updates: Any,
    state: NoiseStabilityState,
    params: Any = None,
    *,
    grad_fn: estimator.GradFn | None = None,
    **extra_args: Any,
  ) -> tuple[Any, NoiseStabilityState]:
    del extra_args
    grad_fn, params = _needed(grad_fn, params)
    step_key, next_key = jax.random.split(state.key)
    sigma = settings.sigma
    sigma_now = sigma(state.count) if callable(sigma) else sigma
    pairs_key = step_key
    if settings.per_shard_noise:
      data_axes = settings.estimator.data_axes
      pairs_key = jax.random.fold_in(step_key, mesh.device_index(data_axes))
    for observer in getattr(_observing, "observers", ()):
      replaced = observer(settings, sigma_now)
      sigma_now = sigma_now if replaced is None else replaced
    value, grads = estimator.estimate(
      settings.estimator,
      grad_fn,
      params,
      pairs_key,
      sigma_now,
      geometry.relative_scales(
        settings.noise_scale, params, settings.estimator.param_filter
      ),
    )
    grads = _mix_clean_gradient(settings, updates, params, grad_fn, grads)
    new_state = NoiseStabilityState(
      count=optax.safe_increment(state.count),
      key=next_key,
      value=state.value if value is None else _scalar_value(value),
    )
    return grads, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# The functions told, in this thread, of each update traced (observe_updates).
_observing = threading.local()


@contextlib.contextmanager
def observe_updates(
  observer: Callable[[_Settings, Any], Any | None],
) -> Iterator[None]:
  """Calls ``observer(settings, sigma)`` for each ``noise_stability`` update.

  While the context is open, each update of :func:`noise_stability` that
  runs (or is traced) in this thread passes its settings and the ``sigma``
  of that step (a schedule's value at the step's count, traced under
  ``jit``) to ``observer``, before the update computes anything (an observer
  may raise to refuse it). An observer returns ``None``, or the ``sigma``
  the step uses instead; observers run from the outermost context inwards,
  each seeing the ``sigma`` the ones before it returned. This runs in Python
  only: the compiled update is the same with or without an observer that
  returns ``None``. :func:`nso_jax.curvature_readings` reads the step's
  ``sigma`` and pairs this way, and :func:`nso_jax.tune_sigma` sets it.
  """
  observers = getattr(_observing, "observers", ())
  _observing.observers = (*observers, observer)
  try:
    yield
  finally:
    _observing.observers = observers


def noise_states(opt_state: Any) -> list[NoiseStabilityState]:
  """Every :class:`NoiseStabilityState` in ``opt_state``, in tree order."""
  is_state = lambda node: isinstance(node, NoiseStabilityState)
  leaves = jax.tree.leaves(opt_state, is_leaf=is_state)
  return [leaf for leaf in leaves if is_state(leaf)]


# The recipe that keeps the settings fixing the noise out of the hyperparameters.
INJECT_RECIPE = 'static_args=("num_perturbations", "key")'


def _not_injected(key: Any) -> Any:
  """``key``, unless it is an integer JAX array, as an injected seed is.

  ``optax.inject_hyperparams`` turns an int seed into a scalar integer array
  (traced under ``jit``) and exposes it as a hyperparameter; but the key
  lives in :class:`NoiseStabilityState`, so setting that hyperparameter
  would do nothing. A seed is a Python int; a key made at run time is a
  ``jax.random.key``.
  """
  if (
    isinstance(key, jax.Array)
    and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    and jnp.issubdtype(key.dtype, jnp.integer)
    and key.shape == ()
  ):
    raise ValueError(
      f"`key` must be an int seed or a PRNG key, got an integer array {key!r}, "
      "as optax.inject_hyperparams makes of a seed that it turns into a "
      "hyperparameter: the key lives in the optimizer state "
      "(NoiseStabilityState), so setting that hyperparameter would do "
      f"nothing. Name it static: optax.inject_hyperparams(..., {INJECT_RECIPE})"
      "; a seed known only at run time goes in as jax.random.key(seed), or "
      "into the state with nso_jax.training.with_key."
    )
  return key


# Below this share of the noise held (noise_resolution), init warns.
MIN_NOISE_RESOLUTION = noise_lib.MIN_HELD_SHARE


def _warn_if_noise_rounds_away(settings: _Settings, params: Any, key: Any) -> None:
  """Warns when half-precision parameters round most of the noise away.

  With concrete parameters this is :func:`nso_jax.noise_resolution` of the
  first update's noise; with traced ones (``init`` under ``jit``) only the
  dtypes are known, and ``sigma`` is compared with the spacing of each
  perturbed half-precision dtype near 1.0. A ``sigma`` known only at run time
  is not checked; a schedule is checked at step 0. The measures warn by the
  same test (``noise.rounding_problem``).
  """
  sigma, scale = settings.sigma, settings.noise_scale
  sigma = sigma(jnp.zeros([], jnp.int32)) if callable(sigma) else sigma
  if checks.is_traced(sigma):
    return
  what = noise_lib.rounding_problem(
    params,
    sigma,
    jax.random.split(key)[0],
    settings.estimator.noise,
    settings.estimator.param_filter,
    geometry.relative_scales(scale, params, settings.estimator.param_filter),
  )
  if what is None:
    return
  given = f"{float(sigma):.3g}" if scale is None else f"{scale.geometry}({sigma:.3g})"
  warnings.warn(
    f"noise_stability: sigma={given} is {what}; W + U rounds back "
    "to W and NSO drifts towards the plain gradient. Raise sigma, or keep "
    "float32 master weights and cast them to half precision inside the loss "
    "(see 'Mixed precision' in the NSO guide).",
    stacklevel=3,
  )


def _needed(grad_fn: Any, params: Any) -> tuple[estimator.GradFn, Any]:
  """``update``'s two extra arguments, which it cannot do without."""
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
  if str(getattr(grad_fn, "__module__", "")).startswith("flax.nnx"):
    raise TypeError(
      "`grad_fn` is a function transformed by flax.nnx (such as nnx.grad), "
      "which takes the module; the optimizer calls it with the pure "
      "parameter arrays instead. Pass the gradient function built by "
      "nso_jax.training.nnx_grad_fn(model, loss_fn, *args), or use "
      "nso_jax.training.nnx_train_step."
    )
  checks.check_callable(grad_fn, "grad_fn", "(params) -> grads")
  return grad_fn, params


def _scalar_value(value: Any) -> jax.Array:
  """The mean value, as ``state.value`` keeps it: a float32 scalar."""
  if not jax.tree_util.treedef_is_leaf(jax.tree.structure(value)) or jnp.ndim(value):
    shapes = jax.tree.map(jnp.shape, value)
    raise ValueError(
      "`grad_fn` returned (value, grads) with a value of shape(s) "
      f"{shapes}; noise_stability keeps the value's mean in `state.value`, a "
      "scalar. Return a scalar loss, or call nso_jax.noise_stability_gradient "
      "directly for pytree values."
    )
  return jnp.asarray(value, jnp.float32)


def _mix_clean_gradient(
  settings: _Settings, updates: Any, params: Any, grad_fn: Any, grads: Any
) -> Any:
  """``lam * clean + (1 - lam) * G``, mixed in at least float32."""
  lam = settings.clean_weight
  if not checks.is_traced(lam) and lam == 0.0:
    return grads
  clean = _clean_gradient(settings.estimator.data_axes, updates, params, grad_fn)
  # An invalid run-time weight is NaN, and so is the update.
  lam = checks.nan_unless_valid(lam, minimum=0.0, maximum=1.0)
  mixed = jax.tree.map(
    # `where` keeps a non-finite clean gradient out when lam == 0.
    lambda c, g: jnp.where(lam != 0, lam * c + (1 - lam) * g.astype(c.dtype), g),
    clean,
    grads,
  )
  return jax.tree.map(lambda m, g: m.astype(g.dtype), mixed, grads)


def _clean_gradient(
  data_axes: tuple[str, ...], updates: Any, params: Any, grad_fn: Any
) -> Any:
  """The clean gradient at ``params``, in at least float32.

  With the batch split over ``data_axes`` it is computed, as the mean of the
  shards' gradients: the one passed in could be the shard's own, or a sum
  (``jax.grad`` inside ``shard_map`` sums the gradients of replicated
  parameters over the shards). Otherwise it is the incoming one, unless that
  is ``None`` or all zeros (a placeholder such as
  ``train_step(clean_gradient=False)`` passes). Under ``jax.vmap`` the test
  becomes a select: the clean gradient is then always computed, one more
  evaluation per step.
  """

  def compute() -> Any:
    w = jax.tree.map(lambda x: mesh.mark_varying(x, data_axes), params)
    out = grad_fn(w)
    # `estimate` has checked the output: gradients, or (value, gradients).
    grads = out if checks.same_structure(out, params) else out[1]
    grads = jax.tree.map(lambda g: g.astype(checks.accumulation_dtype(g.dtype)), grads)
    total = mesh.psum_varying(grads, data_axes)
    return jax.tree.map(lambda c: c / mesh.axis_size(data_axes), total)

  if data_axes or updates is None:
    return compute()
  if not checks.same_structure(updates, params):
    raise ValueError(
      "with clean_weight > 0, the gradient passed to `update` is the clean "
      "gradient and must have the structure of `params`; got "
      f"{jax.tree.structure(updates)} for {jax.tree.structure(params)}."
    )
  all_zero = checks.tree_all(lambda g: g == 0, updates)
  incoming = jax.tree.map(
    lambda g, c: jnp.asarray(g, c.dtype), updates, jax.eval_shape(compute)
  )
  return jax.lax.cond(all_zero, compute, lambda: incoming)


def nso(
  optimizer: optax.GradientTransformation,
  sigma: Sigma,
  num_perturbations: int = 1,
  *,
  key: checks.KeyLike,
  noise: noise_lib.NoiseName = "normal",
  one_sided: bool = False,
  param_filter: selection.ParamFilter = None,
  execution: batching.ExecutionLike = "auto",
  data_axis: mesh.AxisName | None = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Bundles :func:`noise_stability` with a base optimizer.

  ``nso(opt, sigma, k, key=key)`` is ``optax.chain(noise_stability(sigma, k,
  key=key), opt)``: the base optimizer (and its weight decay) acts at the
  unperturbed weights with the NSO gradient. With ``skip_nonfinite=True`` the
  base optimizer is wrapped in :func:`nso_jax.skip_nonfinite`: a step whose
  NSO gradient is not finite changes neither the parameters nor the
  optimizer's state.

  The options beyond the paper's setting, ``clean_weight`` and
  ``per_shard_noise``, are set on :func:`noise_stability`, chained by hand:
  ``optax.chain(noise_stability(sigma, k, key=key, clean_weight=0.1),
  optimizer)``.

  Args:
    optimizer: the base optimizer, e.g. ``optax.sgd(0.1, momentum=0.9)`` or
      ``optax.adamw(1e-3)``.
    sigma: the noise standard deviation, its schedule, or a noise geometry
      (see :func:`noise_stability`).
    num_perturbations: ``k``, the number of noise pairs per update.
    key: an int seed or a PRNG key.
    noise: the noise distribution (see :func:`noise_stability`).
    one_sided: perturb with ``+U_j`` only (random weight perturbation).
    param_filter: the leaves to perturb (see :func:`noise_stability`).
    execution: how the pairs run, a :class:`nso_jax.batching.Execution` or a
      strategy name.
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which the batch is split.
    skip_nonfinite: skip (and count) steps whose gradient is not finite.

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
  tx = noise_stability(
    sigma,
    num_perturbations,
    key=key,
    noise=noise,
    one_sided=one_sided,
    param_filter=param_filter,
    execution=execution,
    data_axis=data_axis,
  )
  if checks.check_bool(skip_nonfinite, "skip_nonfinite"):
    optimizer = nonfinite.skip_nonfinite(optimizer)
  return optax.chain(tx, optimizer)


class AccumulationState(NamedTuple):
  """State of :func:`accumulate`.

  Attributes:
    mini_step: int32 number of micro-batches taken in the current step.
    noise: the noise transformation's state, which advances (key, count) once
      per accumulated step: every micro-batch of a step draws the same noise.
    optimizer: the state of ``optax.MultiSteps(optimizer, n)``.
  """

  mini_step: jax.Array
  noise: Any
  optimizer: Any


nonfinite.refuse_to_skip(
  AccumulationState,
  "`inner` of skip_nonfinite holds nso_jax.accumulate: a skipped micro-batch "
  "would keep the step's noise, so a noise draw whose gradient is not finite "
  "would repeat at every later micro-batch. Put skip_nonfinite around the "
  "optimizer inside instead: accumulate(noise_stability(...), "
  "skip_nonfinite(optimizer), n) skips the whole step, and the noise advances.",
)


def accumulate(
  noise: optax.GradientTransformation,
  optimizer: optax.GradientTransformation,
  num_micro_batches: int,
) -> optax.GradientTransformationExtraArgs:
  """Gradient accumulation for NSO: one step over ``n`` micro-batches.

  ``optax.MultiSteps(nso(...), n)`` does not accumulate NSO gradients: it
  sums the incoming gradients and calls NSO once, with the last micro-batch's
  ``grad_fn`` (and fails on ``None`` gradients). This transformation computes
  the NSO gradient of every micro-batch with its own ``grad_fn`` and averages
  them in ``optax.MultiSteps(optimizer, n)``, which steps once every ``n``
  updates (and returns zero updates in between). The noise transformation's
  key and count advance once per accumulated step, so all ``n`` micro-batches
  of a step are evaluated at the same perturbations: with equal-sized
  micro-batches the step is the NSO step of the whole batch, up to rounding.

  Args:
    noise: :func:`noise_stability` (or it under ``optax.inject_hyperparams``).
    optimizer: the base optimizer.
    num_micro_batches: ``n``, the updates per optimizer step, an int >= 1.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` needs
    ``grad_fn``; its state is an :class:`AccumulationState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import nso_jax
    >>> tx = nso_jax.accumulate(
    ...     nso_jax.noise_stability(0.01, 2, key=0), optax.sgd(0.1), 4)
    >>> params = jnp.ones(3)
    >>> state = tx.init(params)
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w**2))
    >>> updates, state = tx.update(None, state, params, grad_fn=grad_fn)
    >>> int(state.mini_step), int(state.noise.count)
    (1, 0)
  """
  n = checks.check_positive_int(num_micro_batches, "num_micro_batches")
  multi = optax.MultiSteps(optimizer, n).gradient_transformation()
  noise = optax.with_extra_args_support(noise)

  def init_fn(params: Any) -> AccumulationState:
    return AccumulationState(
      jnp.zeros([], jnp.int32), noise.init(params), multi.init(params)
    )

  def update_fn(
    updates: Any, state: AccumulationState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, AccumulationState]:
    grads, advanced = noise.update(updates, state.noise, params, **extra_args)
    last = state.mini_step + 1 >= n
    noise_state = jax.lax.cond(last, lambda: advanced, lambda: state.noise)
    # grad_fn is NSO's alone: some optax versions trace MultiSteps' arguments.
    rest = {name: arg for name, arg in extra_args.items() if name != "grad_fn"}
    updates, multi_state = multi.update(grads, state.optimizer, params, **rest)
    # MultiSteps clears its sum by multiplying it by zero, which keeps a NaN:
    # one non-finite micro-batch would spoil every later step. Cleared here.
    multi_state = multi_state._replace(
      acc_grads=jax.tree.map(
        lambda a: jnp.where(last, jnp.zeros_like(a), a), multi_state.acc_grads
      )
    )
    mini_step = jnp.where(last, 0, state.mini_step + 1).astype(jnp.int32)
    return updates, AccumulationState(mini_step, noise_state, multi_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_chain(tx: optax.GradientTransformation, params: Any) -> None:
  """Raises if ``tx`` composes :func:`noise_stability` in a way that misleads.

  Compositions that run but compute something else, found from the structure
  of ``tx.init(params)`` (evaluated abstractly, nothing is computed):

  * ``optax.chain(optimizer, noise_stability(...))``, or anything before it
    in a chain: ``noise_stability`` replaces the incoming gradient, so the
    transformations before it are lost, and an optimizer before it makes the
    update the raw gradient, an ascent step;
  * ``optax.MultiSteps(nso(...), n)``: NSO runs once per step, with the last
    micro-batch's ``grad_fn`` (use :func:`accumulate`);
  * two ``noise_stability`` transformations;
  * ``optax.apply_if_finite(nso(...), n)``: a non-finite step keeps NSO's
    key, so the same noise repeats until the NaN is applied (put it around
    the base optimizer, or use :func:`nso_jax.skip_nonfinite` anywhere);
  * ``optax.inject_hyperparams(noise_stability)`` with ``key`` or
    ``num_perturbations`` as a hyperparameter (one that does nothing when
    set, or cannot change under ``jit``).

  A chain whose states are a dict (``optax.named_chain``) is not checked for
  order.

  Args:
    tx: the whole optimizer.
    params: the parameters, or a pytree of ``jax.ShapeDtypeStruct``.

  Raises:
    ValueError: on one of the compositions above, or when ``tx`` has no
      :func:`noise_stability`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import nso_jax
    >>> nso_jax.check_chain(nso_jax.nso(optax.sgd(0.1), 0.01, key=0), jnp.ones(3))
    >>> bad = optax.chain(optax.sgd(0.1), nso_jax.noise_stability(0.01, key=0))
    >>> nso_jax.check_chain(bad, jnp.ones(3))
    Traceback (most recent call last):
    ...
    ValueError: noise_stability must come first in the chain: ...
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    state = jax.eval_shape(tx.init, params)
  is_nso = lambda x: isinstance(x, NoiseStabilityState)
  paths = [
    path
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_nso)[0]
    if is_nso(leaf)
  ]
  if len(paths) != 1:
    raise ValueError(
      f"expected one noise_stability in the optimizer, found {len(paths)}: "
      "it replaces the gradient, so a second one discards the first."
    )
  _check_wrappers(state, paths[0])
  names = [getattr(k, "name", None) for k in paths[0]]
  if "inner_opt_state" in names:
    raise ValueError(
      "noise_stability is inside optax.MultiSteps: NSO would run once per "
      "step with the last micro-batch's grad_fn, and None gradients fail in "
      "MultiSteps. Use nso_jax.accumulate(noise_stability(...), optimizer, n)."
    )
  if any(getattr(k, "idx", 0) != 0 for k in paths[0]):
    raise ValueError(
      "noise_stability must come first in the chain: it replaces the incoming "
      "gradient by the NSO gradient, so what runs before it is discarded (an "
      "optimizer before it turns the step into gradient ascent). Write "
      "optax.chain(noise_stability(...), optimizer), or nso_jax.nso(...)."
    )


def _check_wrappers(state: Any, path: Any) -> None:
  """Raises on the wrappers around NSO that keep its key or hide it, on ``path``."""
  node = state
  for entry in path:
    if isinstance(node, optax.ApplyIfFiniteState):
      raise ValueError(
        "noise_stability is inside optax.apply_if_finite: a non-finite step "
        "keeps NSO's key, so the same noise is drawn again and the step fails "
        "again, until the NaN is applied. Put apply_if_finite around the base "
        "optimizer, optax.chain(noise_stability(...), optax.apply_if_finite("
        "optimizer, n)), or use nso_jax.skip_nonfinite (NSO's key advances "
        "wherever it is put)."
      )
    injected = getattr(node, "hyperparams", None)
    if isinstance(injected, dict) and {"key", "num_perturbations"} & set(injected):
      names = sorted({"key", "num_perturbations"} & set(injected))
      raise ValueError(
        f"noise_stability under optax.inject_hyperparams has {names} among "
        "its hyperparameters: an injected key does nothing when set (the key "
        "lives in NoiseStabilityState) and the number of pairs cannot change "
        f"under jit. Name them static: optax.inject_hyperparams(..., {INJECT_RECIPE})."
      )
    try:
      if hasattr(entry, "name"):
        node = getattr(node, entry.name)
      elif hasattr(entry, "idx"):
        node = node[entry.idx]
      else:
        node = node[entry.key]
    except (AttributeError, IndexError, KeyError, TypeError):
      return  # a custom node: the wrappers around NSO are not known


def get_sigma(state: Any) -> jax.Array:
  """``sigma`` in a state of ``optax.inject_hyperparams(noise_stability, ...)``.

  Args:
    state: the optimizer state, the injected transformation anywhere in it.

  Returns:
    The current ``sigma``, a scalar array.

  Raises:
    ValueError: when the state holds no injected ``sigma``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import nso_jax
    >>> tx = optax.chain(
    ...     optax.inject_hyperparams(
    ...         nso_jax.noise_stability, static_args=("num_perturbations", "key")
    ...     )(0.01, 2, key=0),
    ...     optax.sgd(0.1),
    ... )
    >>> state = nso_jax.set_sigma(tx.init(jnp.ones(3)), 0.02)
    >>> print(f"{float(nso_jax.get_sigma(state)):.3f}")
    0.020
  """
  sigma = optax.tree_utils.tree_get(state, "sigma")
  if sigma is None:
    raise ValueError(
      "the state holds no 'sigma': build the transformation with "
      "optax.inject_hyperparams(nso_jax.noise_stability, "
      'static_args=("num_perturbations", "key"))(sigma, k, key=key).'
    )
  return sigma


def set_sigma(state: Any, sigma: Any) -> Any:
  """The state with its injected ``sigma`` set (see :func:`get_sigma`).

  The value keeps the dtype of the one it replaces, so a jitted step is not
  traced again. An invalid value (negative, not finite) makes the next
  update NaN.

  Args:
    state: the optimizer state, as for :func:`get_sigma`.
    sigma: the new noise scale, a float or a scalar array (traced too).

  Returns:
    The new state.
  """
  old = get_sigma(state)
  return optax.tree_utils.tree_set(state, sigma=jnp.asarray(sigma, old.dtype))


def with_key(opt_state: Any, key: Any) -> Any:
  """``opt_state`` with the key of its :func:`~nso_jax.noise_stability` replaced.

  The key given when the transformation is built only seeds ``init``; the
  compiled update reads the key from the state. A seed sweep can therefore
  build the transformation and compile the step once, and start each run
  from ``with_key(tx.init(params), seed)``: the same program, another key,
  and the same trajectory as building the transformation with that key.

  Args:
    opt_state: any optimizer state holding one or more
      ``NoiseStabilityState`` (an optax chain's, ``nso``'s, or a whole
      :class:`TrainState`). Each one gets the same new key. For an
      ``nnx.Optimizer``, pass ``nnx.as_pure(optimizer.opt_state)`` and put
      the result back with ``nnx.update(optimizer.opt_state,
      nnx.state(new_state))``.
    key: an int seed, a typed key (``jax.random.key``) or a raw
      ``jax.random.PRNGKey``. An int seed makes a key of the implementation
      the state's key has, so the compiled step is reused.

  Returns:
    ``opt_state`` with every ``NoiseStabilityState.key`` replaced.

  Raises:
    ValueError: if ``opt_state`` holds no ``NoiseStabilityState``, or ``key``
      holds more than one key (or is ``None``).
    TypeError: if ``key`` is of no accepted kind.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import nso_jax
    >>> from nso_jax import training
    >>> tx = nso_jax.nso(optax.sgd(0.1), sigma=0.01, key=0)
    >>> params = {"w": jnp.ones(3)}
    >>> a = training.with_key(tx.init(params), 7)
    >>> b = nso_jax.nso(optax.sgd(0.1), sigma=0.01, key=7).init(params)
    >>> bool(jnp.all(jax.random.key_data(a[0].key) == jax.random.key_data(b[0].key)))
    True
  """
  is_seed = isinstance(key, (int, np.integer)) and not isinstance(key, bool)
  seed = int(key) if is_seed else None
  key = checks.canonicalize_key(key)
  found = []

  def replace(node: Any) -> Any:
    if not isinstance(node, NoiseStabilityState):
      return node
    found.append(node)
    if seed is None:
      return node._replace(key=key)
    impl = jax.random.key_impl(node.key)
    return node._replace(key=jax.random.key(seed, impl=impl))

  def is_state(node: Any) -> bool:
    return isinstance(node, NoiseStabilityState)

  new_state = jax.tree.map(replace, opt_state, is_leaf=is_state)
  if not found:
    raise ValueError(
      "`opt_state` holds no NoiseStabilityState, so it has no key to replace; "
      f"got a {type(opt_state).__name__}. Pass the state of an optimizer built with "
      "nso_jax.nso or nso_jax.noise_stability (e.g. tx.init(params))."
    )
  return new_state
