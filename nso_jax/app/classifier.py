"""The classifier the commands train: an MLP, its loss, its training loop.

:func:`train` trains one optimizer over all seeds at once (the seeds under
``jax.vmap``, one compiled call per epoch) and returns a :class:`Trained`
record, with, given a :class:`CurvatureWatch`, the Hessian's trace after each
epoch (:class:`CurvatureCurves`); :func:`check_fits` refuses, before any
compile, the sizes the data cannot serve.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nso_jax
from nso_jax import hessian
from nso_jax import training as training_lib
from nso_jax.app import optimizers
from nso_jax.app import settings as settings_lib
from nso_jax.app.data import Dataset
from nso_jax.app.output import ProgressBars


class MLP(nn.Module):
  """A ReLU multilayer perceptron classifier."""

  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The mean softmax cross-entropy of integer ``labels``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.cache
def loss_function(
  hidden: tuple[int, ...], num_classes: int
) -> Callable[[Any, Any], jax.Array]:
  """``loss(params, (x, y))``: the mean cross-entropy of an :class:`MLP`.

  One function per model shape, so that what is compiled for it is reused.
  """
  model = MLP(hidden, num_classes)

  def loss_fn(params, batch):
    return cross_entropy(model.apply({"params": params}, batch[0]), batch[1])

  return loss_fn


def parameter_count(hidden: Sequence[int], features: int, num_classes: int) -> int:
  """The weights and biases of an :class:`MLP` on ``features`` inputs."""
  widths = (features, *hidden, num_classes)
  return sum((fan_in + 1) * fan_out for fan_in, fan_out in itertools.pairwise(widths))


def steps_per_epoch(training: settings_lib.Training, train_examples: int) -> int:
  """The full batches an epoch of ``train_examples`` examples takes.

  Raises:
    SettingError: when ``batch_size`` exceeds the training examples.
  """
  steps = train_examples // training.batch_size
  if steps < 1:
    raise settings_lib.SettingError(
      "batch_size",
      f"exceeds the {train_examples} training examples.",
      value=training.batch_size,
    )
  return steps


def check_fits(training: settings_lib.Training, data: Dataset) -> None:
  """Checks that the batches and models fit ``data``, before any compile.

  Raises:
    SettingError: when ``batch_size`` exceeds the training examples, the
      model exceeds :data:`~nso_jax.app.settings.MAX_PARAMETERS` (field
      ``hidden``), or the models of all seeds exceed
      :data:`~nso_jax.app.settings.MAX_TRAINED_PARAMETERS` (field ``seeds``).
  """
  steps_per_epoch(training, len(data.x_train))
  features = data.x_train.shape[1]
  count = parameter_count(training.hidden, features, data.num_classes)
  if count > settings_lib.MAX_PARAMETERS:
    raise settings_lib.SettingError(
      "hidden",
      f"gives a model of {count:,} parameters on {features:,} features and "
      f"{data.num_classes} classes; at most {settings_lib.MAX_PARAMETERS:,} are "
      "allowed (the Hessian measurement keeps dozens of parameter-sized "
      "vectors); use narrower layers.",
      value=",".join(str(width) for width in training.hidden),
    )
  if count * training.seeds > settings_lib.MAX_TRAINED_PARAMETERS:
    raise settings_lib.SettingError(
      "seeds",
      f"would train {training.seeds} models of {count:,} parameters at once; at "
      f"most {settings_lib.MAX_TRAINED_PARAMETERS:,} parameters in all are "
      "allowed; use fewer seeds or a smaller model.",
      value=training.seeds,
    )


class Curves(NamedTuple):
  """Per-epoch curves, each a ``(seeds, epochs)`` array.

  Attributes:
    epoch_train_loss: the mean mini-batch loss over each epoch.
    train_loss: the loss on the whole training set after each epoch.
    test_accuracy: the test accuracy after each epoch.
  """

  epoch_train_loss: np.ndarray
  train_loss: np.ndarray
  test_accuracy: np.ndarray


@dataclasses.dataclass(frozen=True)
class CurvatureWatch:
  """How :func:`train` follows the Hessian's trace, epoch by epoch.

  NSO (two-sided) is wrapped in :func:`nso_jax.curvature_readings`, which
  reads ``tr(H) = 2 gap / sigma**2`` from NSO's own perturbed losses and one
  clean forward pass per step; the parameters follow the same path. Any other
  optimizer has no such readings: after each epoch, the same quantity is
  measured on ``batch`` by :func:`nso_jax.hessian.noise_stability_measure`
  at the plan's ``sigma``, with ``draws`` antithetic pairs (each seed's own
  key, the same at every epoch).

  Attributes:
    batch: the fixed ``(x, y)`` batch of the measurements.
    draws: the antithetic pairs of each measurement.
    decay: the readings' ``decay`` (see :func:`nso_jax.curvature_readings`).
  """

  batch: tuple[Any, Any]
  draws: int = 4
  decay: float = 0.9


class CurvatureCurves(NamedTuple):
  """The Hessian's trace after each epoch; arrays are ``(seeds, epochs)``.

  Attributes:
    source: ``"readings"`` (NSO's own, running estimates) or ``"measured"``.
    sigma: the noise's standard deviation of the gap.
    trace: ``2 gap / sigma**2``, the estimate of ``tr(H)``.
    trace_stderr: its standard error.
    relative_gap: the gap over the clean loss.
    relative_gap_stderr: its standard error.
    count: the readings taken (for ``"measured"``, the draws).
    seconds: the seconds the measurements took (0 for readings: their
      cost is in the training time).
  """

  source: str
  sigma: float
  trace: np.ndarray
  trace_stderr: np.ndarray
  relative_gap: np.ndarray
  relative_gap_stderr: np.ndarray
  count: np.ndarray  # type: ignore[assignment]  # shadows tuple.count
  seconds: float


@dataclasses.dataclass(frozen=True)
class Trained:
  """One optimizer trained over all seeds.

  Attributes:
    label: its name in progress bars, tables and plots.
    states: the train states, stacked over seeds.
    curves: the per-epoch curves.
    gradient_evaluations_per_step: what a step costs.
    steps_per_epoch: the optimizer steps of an epoch.
    epochs: the epochs trained.
    train_seconds: the seconds training took (without the measurements
      of ``curvature``).
    curvature: the trace after each epoch, given a :class:`CurvatureWatch`.
  """

  label: str
  states: Any
  curves: Curves
  gradient_evaluations_per_step: int
  steps_per_epoch: int
  epochs: int
  train_seconds: float
  curvature: CurvatureCurves | None = None

  @property
  def total_steps(self) -> int:
    """The optimizer steps of each seed."""
    return self.steps_per_epoch * self.epochs

  def params(self, seed: int) -> Any:
    """Seed ``seed``'s trained parameters."""
    return jax.tree.map(lambda x: x[seed], self.states.params)


def _no_interruption() -> None:
  pass


def _initial_states(
  model: MLP,
  optimizer: optimizers.Optimizer,
  name: str,
  sample: jax.Array,
  seeds: int,
  init_params: Callable[[int], Any] | None,
) -> Any:
  """The train states of all seeds, stacked: fresh or given parameters."""

  def init(seed: int) -> Any:
    if init_params is None:
      key = jax.random.fold_in(jax.random.key(seed), 0)
      params = model.init(key, sample)["params"]
    else:
      params = init_params(seed)
    state = training_lib.TrainState.create(
      apply_fn=model.apply, params=params, tx=optimizer.tx
    )
    opt_state = state.opt_state
    if name in ("nso", "rwp"):
      noise_key = jax.random.fold_in(jax.random.key(seed), 1)
      opt_state = optax.tree_utils.tree_set(opt_state, key=noise_key)
    return state.replace(opt_state=opt_state)

  states = [init(seed) for seed in range(seeds)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _epoch_function(
  model: MLP,
  optimizer: optimizers.Optimizer,
  data: Dataset,
  batch_size: int,
  steps: int,
  reads: bool = False,
) -> Callable[..., Any]:
  """``(states, seeds, epoch) -> (states, mean loss)`` over all seeds, jitted.

  With ``reads``, the optimizer is :func:`nso_jax.curvature_readings`'s,
  whose ``grad_fn`` returns ``(loss, grads)``.
  """
  x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

  def epoch(state, seed, epoch_index):
    shuffle_key = jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), 2), epoch_index
    )
    order = jax.random.permutation(shuffle_key, len(x_train))[: steps * batch_size]
    batches = (
      x_train[order].reshape(steps, batch_size, -1),
      y_train[order].reshape(steps, batch_size),
    )

    def step(state, batch):
      x, y = batch
      if reads:
        return _reading_step(model, optimizer, state, x, y)
      return _step(model, optimizer, state, x, y)

    state, losses = jax.lax.scan(step, state, batches)
    return state, jnp.mean(losses)

  return jax.jit(jax.vmap(epoch, in_axes=(0, 0, None)))


def _step(
  model: MLP, optimizer: optimizers.Optimizer, state: Any, x: Any, y: Any
) -> tuple[Any, jax.Array]:
  """A step of the MLP on the batch ``(x, y)``: the new state and the loss."""

  def loss_fn(params, batch_stats):
    del batch_stats
    return cross_entropy(model.apply({"params": params}, x), y), {}

  state, metrics = training_lib.train_step(
    state, loss_fn, clean_gradient=optimizer.clean_gradient
  )
  return state, metrics["loss"]


def _reading_step(
  model: MLP, optimizer: optimizers.Optimizer, state: Any, x: Any, y: Any
) -> tuple[Any, jax.Array]:
  """:func:`_step`, with a ``grad_fn`` that returns the loss too (as readings need)."""

  def loss_of(params):
    return cross_entropy(model.apply({"params": params}, x), y)

  if optimizer.clean_gradient:
    loss, grads = jax.value_and_grad(loss_of)(state.params)
  else:
    loss, grads = loss_of(state.params), jax.tree.map(jnp.zeros_like, state.params)
  state = state.apply_gradients(grads=grads, grad_fn=jax.value_and_grad(loss_of))
  return state, loss


@functools.partial(jax.jit, static_argnames=("loss_fn", "sigma", "draws"))
def _measured_gaps(
  params: Any, seeds: jax.Array, batch: Any, *, loss_fn: Any, sigma: float, draws: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Every seed's gap on ``batch``, its standard error and the clean loss.

  Compiled once per loss, ``sigma`` and ``draws``, for every optimizer.
  """

  def measure(params, seed):
    key = jax.random.fold_in(jax.random.key(seed), 3)
    gap = hessian.noise_stability_measure(
      loss_fn, params, batch, key, sigma=sigma, num_draws=draws, antithetic=True
    )
    return gap.value, gap.stderr, loss_fn(params, batch)

  return jax.vmap(measure)(params, seeds)


class _Watcher:
  """Collects :class:`CurvatureCurves` after each epoch."""

  def __init__(
    self, watch: CurvatureWatch, reads: bool, training: Any, num_classes: int
  ) -> None:
    self.sigma = float(training.sigma)
    self.reads = reads
    self.watch = watch
    self.loss_fn = loss_function(tuple(training.hidden), num_classes)
    self.points: list[tuple[np.ndarray, ...]] = []
    self.seconds = 0.0

  def __call__(self, states: Any, seeds: jax.Array) -> None:
    start = time.perf_counter()
    if self.reads:
      r = states.opt_state[1]
      point = (r.trace, r.trace_stderr, r.relative_gap, r.relative_gap_stderr)
      count = r.count
    else:
      gap, stderr, loss = _measured_gaps(
        states.params,
        seeds,
        self.watch.batch,
        loss_fn=self.loss_fn,
        sigma=self.sigma,
        draws=self.watch.draws,
      )
      scale = 2 / self.sigma**2
      point = (scale * gap, scale * stderr, gap / loss, stderr / loss)
      count = jnp.full(gap.shape, self.watch.draws)
    self.points.append(tuple(np.asarray(v) for v in (*point, count)))
    if not self.reads:
      self.seconds += time.perf_counter() - start

  def curves(self) -> CurvatureCurves:
    trace, trace_stderr, gap, gap_stderr, count = [
      np.stack(values, axis=1) for values in zip(*self.points, strict=True)
    ]
    return CurvatureCurves(
      "readings" if self.reads else "measured",
      self.sigma,
      trace,
      trace_stderr,
      gap,
      gap_stderr,
      count,
      self.seconds,
    )


def _evaluation_function(model: MLP, data: Dataset) -> Callable[..., Any]:
  """``states -> (test accuracy, training loss)`` of every seed, jitted."""
  x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

  def evaluate(state):
    logits = model.apply({"params": state.params}, x_test)
    train_loss = cross_entropy(model.apply({"params": state.params}, x_train), y_train)
    return jnp.mean(jnp.argmax(logits, -1) == y_test), train_loss

  return jax.jit(jax.vmap(evaluate))


def train(
  plan: optimizers.Plan,
  data: Dataset,
  progress: ProgressBars,
  safe_point: Callable[[], None] = _no_interruption,
  *,
  init_params: Callable[[int], Any] | None = None,
  watch: CurvatureWatch | None = None,
) -> Trained:
  """Trains ``plan``'s optimizer over all seeds at once.

  Args:
    plan: the optimizer, its settings, noise filter and label (see
      :func:`~nso_jax.app.optimizers.method_plan`).
    data: the data set.
    progress: where its progress bar goes.
    safe_point: called after each epoch, once its computations have finished:
      where an interruption may stop the run.
    init_params: ``seed -> parameters`` to start from (e.g. pretrained ones)
      instead of a fresh initialisation.
    watch: follow the Hessian's trace after each epoch: NSO's free readings,
      or the same quantity measured for other optimizers (see
      :class:`CurvatureWatch`); ``None`` (the default): not followed.

  Returns:
    The trained states, the per-epoch curves and the compute spent.

  Raises:
    SettingError: when ``batch_size`` exceeds the training examples.
  """
  training = plan.training
  model = MLP(tuple(training.hidden), data.num_classes)
  optimizer = optimizers.make_optimizer(plan.optimizer, training, plan.param_filter)
  reads = watch is not None and plan.optimizer == "nso"
  if reads:
    assert watch is not None
    tx = nso_jax.curvature_readings(optimizer.tx, decay=watch.decay)
    optimizer = optimizer._replace(tx=tx)
  steps = steps_per_epoch(training, len(data.x_train))
  sample = jnp.asarray(data.x_train[:1])
  states = _initial_states(
    model, optimizer, plan.optimizer, sample, training.seeds, init_params
  )
  run_epoch = _epoch_function(model, optimizer, data, training.batch_size, steps, reads)
  run_eval = _evaluation_function(model, data)
  watcher = (
    None if watch is None else _Watcher(watch, reads, training, data.num_classes)
  )
  seeds = jnp.arange(training.seeds)
  per_epoch: list[tuple[np.ndarray, ...]] = []
  advance = progress.task(f"train {plan.label}", training.epochs)
  start = time.perf_counter()
  for epoch_index in range(training.epochs):
    states, epoch_loss = run_epoch(states, seeds, epoch_index)
    accuracy, train_loss = run_eval(states)
    per_epoch.append(tuple(np.asarray(v) for v in (epoch_loss, train_loss, accuracy)))
    if watcher is not None:
      watcher(states, seeds)
    advance()
    safe_point()
  seconds = time.perf_counter() - start - (watcher.seconds if watcher else 0.0)
  curves = Curves(
    *(np.stack(values, axis=1) for values in zip(*per_epoch, strict=True))
  )
  return Trained(
    label=plan.label,
    states=states,
    curves=curves,
    gradient_evaluations_per_step=optimizer.gradient_evaluations,
    steps_per_epoch=steps,
    epochs=training.epochs,
    train_seconds=seconds,
    curvature=None if watcher is None else watcher.curves(),
  )
