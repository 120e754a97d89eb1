"""``mnist1d``: MNIST-1D (Greydanus 2020), an MLP and a small 1-D CNN.

The data set is generated offline by the ``mnist1d`` package from its
templates (:func:`make_data`, with the generation settings of
:data:`DATA_ARGS` written out; nothing is downloaded or cached): 4000
training and 1000 test sequences of length 40, 10 classes. Each model trains
on the clean labels and with 20% of the training labels flipped (test labels
clean), with every method of :data:`METHODS` over 5 seeds, at matched
gradient evaluations (:data:`GRADIENTS_PER_STEP`): SGD runs twice the epochs
of the others. NSO runs at a grid of fixed ``sigma`` (one compiled program
for the grid: ``sigma`` is injected), filter-wise
(:func:`nso_jax.filterwise`) and with a self-tuning ``sigma``
(:func:`nso_jax.tune_sigma`).

Each run records its test accuracy and full training loss after every
epoch, and along training the Hessian trace on a fixed subset, so that the
traces can be compared at one training loss that every run reaches
(:func:`matched_trace`); each final model is measured by
:func:`nso_jax.app.measures.make_measure` (Hutchinson trace, top
eigenvalue by Lanczos).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nso_jax
from nso_jax import hessian
from nso_jax import training as training_lib
from nso_jax.app import data as data_lib
from nso_jax.app import measures
from nso_jax.app import output
from nso_jax.app import records
from nso_jax.app import settings as settings_lib
from nso_jax.app.interrupts import RunContext
from nso_jax.app.records import MethodResult
from nso_jax.app.settings import SHARE
from nso_jax.app.settings import Choices
from nso_jax.app.settings import Count
from nso_jax.app.settings import Real
from nso_jax.app.settings import Spec
from nso_jax.app.settings import Values
from nso_jax.app.settings import setting

DATA_ARGS: dict[str, Any] = {
  "num_samples": 5000,
  "train_split": 0.8,
  "template_len": 12,
  "padding": [36, 60],
  "scale_coeff": 0.4,
  "max_translation": 48,
  "corr_noise_scale": 0.25,
  "iid_noise_scale": 0.02,
  "shear_scale": 0.75,
  "shuffle_seq": False,
  "final_seq_length": 40,
  "seed": 42,
}
"""The generation settings: the ``mnist1d`` package's defaults, seed 42."""

NUM_CLASSES = 10
MODELS: tuple[str, ...] = ("mlp", "cnn")
METHODS: tuple[str, ...] = ("sgd", "sam", "rwp", "nso", "nso-filterwise", "nso-tuned")

GRADIENTS_PER_STEP = {
  "sgd": 1,
  "sam": 2,
  "rwp": 2,
  "nso": 2,
  "nso-filterwise": 2,
  "nso-tuned": 2,
}
"""Gradient evaluations per step. SAM: the clean gradient and one at the
adversarial point; RWP: two one-sided draws (no clean gradient); NSO: one
antithetic pair. The self-tuning NSO adds one forward pass at ``W`` (the
clean loss its controller reads), not counted here."""

FORWARD_PASSES_PER_STEP = {"nso-tuned": 1}
"""Forward passes per step beyond the gradient evaluations."""

LABELS = {
  "sgd": "SGD (momentum), 2x epochs",
  "sam": "SAM",
  "rwp": "RWP, 2 one-sided draws",
  "nso": "NSO",
  "nso-filterwise": "NSO, filter-wise sigma",
  "nso-tuned": "NSO, self-tuning sigma",
}

COLUMNS: list[output.Column] = [
  ("final_test_accuracy", "test acc. final (%)", output.fixed(2, 100)),
  ("best_test_accuracy", "test acc. best epoch (%)", output.fixed(2, 100)),
  ("final_train_loss", "train loss", output.fmt(3)),
  ("hessian_trace", "tr(H)", output.fmt(3)),
  ("top_eigenvalue", "top eigenvalue", output.fmt(3)),
  ("final_sigma", "final sigma", output.fmt(3)),
]


def _methods_spec() -> Spec:
  return Spec(Choices(METHODS, "method"), "comma-separated methods")


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """Settings of ``mnist1d``, fixed before the committed run.

  One base optimizer for every method: SGD with momentum 0.9, learning rate
  0.05, weight decay 5e-4, batch 100, constant learning rate.
  """

  models: tuple[str, ...] = setting(
    MODELS, Spec(Choices(MODELS, "model"), "comma-separated models")
  )
  methods: tuple[str, ...] = setting(METHODS, _methods_spec())
  noise_levels: tuple[float, ...] = setting(
    (0.0, 0.2), Spec(Values(SHARE), "shares of training labels flipped")
  )
  seeds: int = setting(5)
  epochs: int = setting(
    20, help="epochs of the methods at 2 gradients per step (SGD: twice as many)"
  )
  train_examples: int = setting(
    4000,
    Spec(
      Count(4000, "MNIST-1D has 4000 training examples"),
      "the first N training examples train the models",
    ),
  )
  batch_size: int = setting(100)
  learning_rate: float = setting(0.05)
  momentum: float = setting(0.9)
  weight_decay: float = setting(5e-4)
  sigmas: tuple[float, ...] = setting(
    (0.01, 0.02, 0.05, 0.1),
    Spec(Values(Real(0.0)), "NSO's fixed noise stds (one run each)"),
  )
  sigma: float = setting(0.05, help="RWP's noise std and the self-tuning start")
  filter_sigma: float = setting(
    0.05, Spec(Real(0.0), "filter-wise NSO: noise std relative to each filter's norm")
  )
  targets: tuple[float, ...] = setting(
    (0.1, 0.01),
    Spec(Values(Real(0.0)), "self-tuning NSO: the relative loss gaps it tracks"),
  )
  rho: float = setting(0.05)
  hessian_samples: int = setting(1000)
  hessian_matvecs: int = setting(100)
  lanczos_steps: int = setting(30)
  track_points: int = setting(
    10,
    Spec(Count(1000, "each point measures every run"), "tr(H) points along training"),
  )
  track_samples: int = setting(
    512,
    Spec(Count(4000, "MNIST-1D has 4000 training examples"), "examples of those"),
  )
  track_matvecs: int = setting(
    20, Spec(Count(10_000, "the trace's error shrinks as 1/sqrt(probes)"), "probes")
  )
  output: str = setting("nso_experiments/mnist1d")
  plots: bool = setting(True)
  progress: bool = setting(True)

  def check_together(self) -> None:
    if self.batch_size > self.train_examples:
      raise settings_lib.SettingError(
        "batch_size",
        f"exceeds the {self.train_examples} training examples (--train-examples).",
        value=self.batch_size,
      )
    if self.track_points > self.epochs:
      raise settings_lib.SettingError(
        "track_points",
        f"must be at most --epochs ({self.epochs}).",
        value=self.track_points,
      )


# --- data ------------------------------------------------------------------


@functools.cache
def generate() -> dict[str, np.ndarray]:
  """MNIST-1D's arrays ``x``, ``y``, ``x_test``, ``y_test`` from :data:`DATA_ARGS`.

  Generated in memory (about a second), once per process; the global
  random states of NumPy and Python, which the generator seeds, are
  restored afterwards.
  """
  from mnist1d.data import make_dataset
  from mnist1d.utils import ObjectView

  state, python_state = np.random.get_state(), random.getstate()
  try:
    raw = make_dataset(ObjectView(dict(DATA_ARGS)))
  finally:
    np.random.set_state(state)
    random.setstate(python_state)
  arrays = {name: np.asarray(raw[name]) for name in ("x", "y", "x_test", "y_test")}
  for array in arrays.values():
    array.flags.writeable = False
  return arrays


def make_data(noise_level: float, train_examples: int = 4000) -> tuple[Any, np.ndarray]:
  """MNIST-1D from :data:`DATA_ARGS`, with ``noise_level`` of the labels flipped.

  The flips are drawn with seed ``round(1000 * noise_level)`` (as for the
  digits), exactly ``round(noise_level * n)`` of them, each to a uniformly
  random other class; the test labels stay clean.

  Returns:
    The :class:`~nso_jax.app.data.Dataset` and the mask of flipped labels.
  """
  raw = generate()
  clean = raw["y"][:train_examples].astype(np.int32)
  rng = np.random.default_rng(round(1000 * noise_level))
  noisy = data_lib.flip_labels(clean, noise_level, NUM_CLASSES, rng)
  name = f"MNIST-1D, {100 * noise_level:g}% of training labels flipped"
  dataset = data_lib.Dataset(
    name=name,
    x_train=raw["x"][:train_examples].astype(np.float32),
    y_train=noisy,
    x_test=raw["x_test"].astype(np.float32),
    y_test=raw["y_test"].astype(np.int32),
    num_classes=NUM_CLASSES,
  )
  return dataset, noisy != clean


# --- models ----------------------------------------------------------------


class Conv1D(nn.Module):
  """A 'SAME'-padded 1-D convolution, as a sum of shifted matrix products.

  The kernel is ``(width, in, out)`` as Flax's ``nn.Conv`` holds it (output
  filters on the last axis). Written with slices and matrix products:
  batched over seeds with ``vmap``, it runs several times faster on a CPU
  than ``nn.Conv`` (a grouped convolution there).
  """

  features: int
  width: int = 5
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.width, x.shape[-1], self.features)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    length = x.shape[-2]
    out = -(-length // self.stride)
    pad = max((out - 1) * self.stride + self.width - length, 0)
    x = jnp.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)))
    span = (out - 1) * self.stride + 1
    y = sum(x[:, j : j + span : self.stride, :] @ kernel[j] for j in range(self.width))
    return y + bias


class CNN(nn.Module):
  """Three ReLU convolutions (25 channels, width 5, strides 2, 2, 1), a dense head."""

  channels: int = 25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x[..., None]
    for stride in (2, 2, 1):
      x = nn.relu(Conv1D(self.channels, stride=stride)(x))
    return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  """Greydanus' baseline MLP: 40 -> 100 -> 100 -> 10, ReLU."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(2):
      x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(NUM_CLASSES)(x)


@functools.cache
def model_of(name: str) -> nn.Module:
  """The model ``name`` (one of :data:`MODELS`)."""
  return MLP() if name == "mlp" else CNN()


@functools.cache
def loss_function(name: str) -> Callable[[Any, Any], jax.Array]:
  """``loss(params, (x, y))``: the mean cross-entropy of model ``name``."""
  model = model_of(name)

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  return loss_fn


# --- optimizers ------------------------------------------------------------


def _base(settings: Settings) -> optax.GradientTransformation:
  """The base optimizer every method steps with."""
  return optax.chain(
    optax.add_decayed_weights(settings.weight_decay),
    optax.sgd(settings.learning_rate, momentum=settings.momentum),
  )


def make_optimizer(method: str, settings: Settings) -> tuple[Any, str]:
  """Method ``method``'s optimizer and how a step calls it.

  Returns:
    ``(tx, kind)``: ``kind`` is ``"clean"`` (the gradient at ``W``),
    ``"sam"`` (that and ``grad_fn(params, step)``), ``"perturbed"``
    (``grad_fn`` only) or ``"value"`` (``grad_fn`` returning the loss too).
    ``nso`` has its ``sigma`` injected (:func:`nso_jax.set_sigma`), so that
    one program serves the grid.
  """
  base = _base(settings)
  if method == "sgd":
    return base, "clean"
  if method == "sam":
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(settings.rho))
    return optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True), "sam"
  if method == "rwp":
    return nso_jax.nso(base, settings.sigma, 2, key=0, one_sided=True), "perturbed"
  if method == "nso":
    injected = optax.inject_hyperparams(
      nso_jax.noise_stability, static_args=("num_perturbations", "key")
    )(settings.sigmas[0], 1, key=0)
    return optax.chain(injected, base), "perturbed"
  if method == "nso-filterwise":
    sigma = nso_jax.filterwise(settings.filter_sigma)
    return nso_jax.nso(base, sigma, key=0), "perturbed"
  tuned = nso_jax.tune_sigma(
    nso_jax.nso(base, settings.sigma, key=0), target=settings.targets[0]
  )
  return tuned, "value"


# --- training --------------------------------------------------------------


def _step_function(loss_fn: Callable, tx: Any, kind: str) -> Callable:
  """``((params, opt_state), batch) -> ((params, opt_state), None)``."""

  def step(carry, batch):
    params, opt_state = carry
    loss_of = functools.partial(loss_fn, batch=batch)
    if kind in ("clean", "sam"):
      grads = jax.grad(loss_of)(params)
      extra = {}
      if kind == "sam":
        extra["grad_fn"] = lambda p, _: jax.grad(loss_of)(p)
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
    else:
      grad_fn = jax.value_and_grad(loss_of) if kind == "value" else jax.grad(loss_of)
      updates, opt_state = tx.update(None, opt_state, params, grad_fn=grad_fn)
    return (optax.apply_updates(params, updates), opt_state), None

  return step


@functools.cache
def epoch_function(model: str, method: str, settings: Settings) -> Callable:
  """``(params, opt_state, seeds, epoch, x, y) -> (params, opt_state)``, jitted.

  Batched over runs (seeds, and sigmas of the grid); the data are
  arguments, so the clean and the noisy labels share one program. A run's
  seed orders its batches, the same for every method.
  """
  tx, kind = make_optimizer(method, settings)
  step = _step_function(loss_function(model), tx, kind)
  size = settings.batch_size
  steps = settings.train_examples // size

  def epoch(params, opt_state, seed, index, x, y):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), index)
    order = jax.random.permutation(key, x.shape[0])[: steps * size]
    batches = (x[order].reshape(steps, size, -1), y[order].reshape(steps, size))
    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state

  return jax.jit(jax.vmap(epoch, in_axes=(0, 0, 0, None, None, None)))


@functools.cache
def evaluation_function(model: str) -> Callable:
  """``(params, x, y, x_test, y_test) -> (test accuracy, training loss)``, batched."""
  loss_fn = loss_function(model)
  apply = model_of(model).apply

  def evaluate(params, x, y, x_test, y_test):
    logits = apply({"params": params}, x_test)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y_test)
    return accuracy, loss_fn(params, (x, y))

  return jax.jit(jax.vmap(evaluate, in_axes=(0, None, None, None, None)))


@functools.cache
def track_function(model: str, matvecs: int) -> Callable:
  """``(params, x, y) -> tr(H)``, batched: Hutchinson, ``matvecs`` probes, key 7."""
  loss_fn = loss_function(model)

  def trace(params, x, y):
    key = jax.random.key(7)
    return hessian.trace(loss_fn, params, (x, y), key, num_matvecs=matvecs).value

  return jax.jit(jax.vmap(trace, in_axes=(0, None, None)))


@functools.cache
def init_function(model: str, method: str, settings: Settings) -> Callable:
  """``(seeds, sigmas) -> (params, opt_state)`` of many runs at once, jitted.

  Seed ``s`` initialises with ``fold_in(key(s), 0)`` (the same start for
  every method) and draws its noise from ``fold_in(key(s), 1)``; ``nso``
  gets its injected ``sigma``.
  """
  tx, kind = make_optimizer(method, settings)
  sample = jnp.zeros((1, 40), jnp.float32)

  def init(seed, sigma):
    key = jax.random.key(seed)
    params = model_of(model).init(jax.random.fold_in(key, 0), sample)["params"]
    state = tx.init(params)
    if kind in ("perturbed", "value"):
      state = training_lib.with_key(state, jax.random.fold_in(key, 1))
    if method == "nso":
      state = nso_jax.set_sigma(state, sigma)
    return params, state

  return jax.jit(jax.vmap(init))


@dataclasses.dataclass
class Run:
  """One method trained on one data set, all lanes (seeds; sigmas x seeds).

  Attributes:
    method: the method.
    target: the self-tuning NSO's target, else ``None``.
    lanes: ``(seed, sigma)`` per lane (sigma: the grid's, else ``nan``).
    epochs: epochs trained.
    params: the final parameters, stacked over lanes.
    opt_state: the final optimizer states, stacked.
    accuracy: ``(lanes, epochs)`` test accuracy after each epoch.
    loss: ``(lanes, epochs)`` full training loss after each epoch.
    track_epochs: the epochs of the trace points (0: the start).
    track_loss: ``(lanes, points)`` the training loss there.
    track_trace: ``(lanes, points)`` tr(H) on the tracking subset there.
    seconds: the seconds training took, compiling included.
  """

  method: str
  target: float | None
  lanes: list[tuple[int, float]]
  epochs: int
  params: Any
  opt_state: Any
  accuracy: np.ndarray
  loss: np.ndarray
  track_epochs: list[int]
  track_loss: np.ndarray
  track_trace: np.ndarray
  seconds: float


def track_epochs(epochs: int, points: int) -> list[int]:
  """The epochs at which tr(H) is tracked: 0 and ``points`` spread to ``epochs``."""
  return sorted({0, *(round(epochs * i / points) for i in range(1, points + 1))})


def train_run(
  model: str,
  method: str,
  settings: Settings,
  data: data_lib.Dataset,
  advance: Callable[..., None],
  safe_point: Callable[[], None],
) -> Run:
  """Trains ``method`` on ``data`` over all its lanes; see :class:`Run`.

  SGD trains for twice the epochs (the others' gradient evaluations) and
  tracks tr(H) at twice the epochs, at the same gradient evaluations.
  """
  sigmas = settings.sigmas if method == "nso" else (float("nan"),)
  lanes = [(seed, sigma) for sigma in sigmas for seed in range(settings.seeds)]
  factor = 2 // GRADIENTS_PER_STEP[method]
  epochs = settings.epochs * factor
  tracked = [factor * e for e in track_epochs(settings.epochs, settings.track_points)]
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  tests = (jnp.asarray(data.x_test), jnp.asarray(data.y_test))
  subset = (x[: settings.track_samples], y[: settings.track_samples])
  run_epoch = epoch_function(model, method, settings)
  evaluate = evaluation_function(model)
  track = track_function(model, settings.track_matvecs)
  seeds = jnp.asarray([seed for seed, _ in lanes])
  start = time.perf_counter()
  init = init_function(model, method, settings)
  params, opt_state = init(seeds, jnp.asarray([sigma for _, sigma in lanes]))
  per_epoch, track_loss, track_trace = [], [], []
  _, loss0 = evaluate(params, x, y, *tests)
  track_loss.append(np.asarray(loss0))
  track_trace.append(np.asarray(track(params, *subset)))
  for index in range(epochs):
    params, opt_state = run_epoch(params, opt_state, seeds, index, x, y)
    accuracy, loss = evaluate(params, x, y, *tests)
    per_epoch.append((np.asarray(accuracy), np.asarray(loss)))
    if index + 1 in tracked:
      track_loss.append(per_epoch[-1][1])
      track_trace.append(np.asarray(track(params, *subset)))
    advance()
    safe_point()
  tuned = method == "nso-tuned"
  return Run(
    method=method,
    target=settings.targets[0] if tuned else None,
    lanes=lanes,
    epochs=epochs,
    params=params,
    opt_state=opt_state,
    accuracy=np.stack([a for a, _ in per_epoch], axis=1),
    loss=np.stack([loss for _, loss in per_epoch], axis=1),
    track_epochs=tracked,
    track_loss=np.stack(track_loss, axis=1),
    track_trace=np.stack(track_trace, axis=1),
    seconds=time.perf_counter() - start,
  )


LEARNED = 0.8
"""A run has learned when its lowest tracked loss is below this share of its first."""


def matched_level(runs: list[Run]) -> float:
  """The training loss every run that learned reaches.

  Over every lane of every run (the whole sigma grid included) whose lowest
  training loss at a trace point is at most :data:`LEARNED` times its loss
  at the start, the largest of those lowest losses (over all lanes, if none
  learned). A run that did not learn (stuck near chance) is left out: it
  reaches no loss the others pass through late in training.
  """
  lowest = np.concatenate([run.track_loss.min(axis=1) for run in runs])
  first = np.concatenate([run.track_loss[:, 0] for run in runs])
  learned = lowest <= LEARNED * first
  return float(np.max(lowest[learned] if learned.any() else lowest))


def matched_trace(losses: np.ndarray, traces: np.ndarray, level: float) -> float | None:
  """tr(H) where a run's training loss first falls to ``level``.

  Linear in log(loss) between the two trace points around the first
  crossing (the first point itself, if it is already at or below ``level``);
  ``None`` if the loss never falls to ``level``.
  """
  below = np.nonzero(losses <= level)[0]
  if not len(below):
    return None
  i = int(below[0])
  if i == 0:
    return float(traces[0])
  a, b = np.log(losses[i - 1]), np.log(losses[i])
  w = 0.0 if a == b else (a - np.log(level)) / (a - b)
  return float(traces[i - 1] + w * (traces[i] - traces[i - 1]))


def final_sigmas(run: Run) -> list[float]:
  """Each lane's ``sigma`` at the end: the grid's, or the self-tuning one's last."""
  if run.method == "nso":
    return [sigma for _, sigma in run.lanes]
  if run.method != "nso-tuned":
    return []
  is_state = lambda node: isinstance(node, nso_jax.SigmaTuningState)
  (state,) = [
    leaf for leaf in jax.tree.leaves(run.opt_state, is_leaf=is_state) if is_state(leaf)
  ]
  return np.asarray(state.last_sigma).tolist()


# --- measures and rows -----------------------------------------------------


def measure_run(
  run: Run,
  model: str,
  settings: Settings,
  data: data_lib.Dataset,
  safe_point: Callable[[], None],
) -> dict[str, list[float]]:
  """Per lane: the trace (and its error) and the top eigenvalue at the end.

  On the first ``hessian_samples`` training examples with their training
  labels, key ``1000 + seed`` (:func:`nso_jax.app.measures.make_measure`).
  """
  plan = measures.MeasurePlan(settings.hessian_matvecs, settings.lanczos_steps)
  batch = measures.measured_batch(data, settings.hessian_samples)
  measure = measures.make_measure(loss_function(model), batch, plan)
  curvatures = []
  for lane, (seed, _) in enumerate(run.lanes):
    params = jax.tree.map(lambda x, i=lane: x[i], run.params)
    curvatures.append(
      jax.block_until_ready(measure(params, jax.random.key(1000 + seed), None))
    )
    safe_point()
  metrics = measures.curvature_metrics(curvatures)
  del metrics["trace_per_loss"]
  return metrics


def _rows_of(
  run: Run, metrics: dict[str, list[float]], settings: Settings
) -> list[MethodResult]:
  """The rows of a run: one, or one per sigma of the grid (paired by seed)."""
  sigmas = final_sigmas(run)
  per_lane = {
    "final_test_accuracy": run.accuracy[:, -1].tolist(),
    "best_test_accuracy": run.accuracy.max(axis=1).tolist(),
    "best_epoch": (run.accuracy.argmax(axis=1) + 1).tolist(),
    "final_train_loss": run.loss[:, -1].tolist(),
    **metrics,
  }
  if sigmas:
    per_lane["final_sigma"] = sigmas
  groups = settings.sigmas if run.method == "nso" else (None,)
  steps = settings.train_examples // settings.batch_size
  rows = []
  for g, sigma in enumerate(groups):
    part = slice(g * settings.seeds, (g + 1) * settings.seeds)
    curves = {
      "test_accuracy": run.accuracy[part].tolist(),
      "train_loss": run.loss[part].tolist(),
      "track_train_loss": run.track_loss[part].tolist(),
      "track_trace": run.track_trace[part].tolist(),
    }
    method = run.method if sigma is None else f"nso-{sigma:g}"
    if run.target is not None:
      method += f"-{run.target:g}"
    label = LABELS[run.method] if sigma is None else f"NSO sigma={sigma:g}"
    if run.method == "nso-filterwise":
      label += f" s={settings.filter_sigma:g}"
    if run.method == "nso-tuned":
      label += f", target {run.target:g}"
    rows.append(
      MethodResult(
        method=method,
        label=label,
        gradient_evaluations_per_step=GRADIENTS_PER_STEP[run.method],
        steps_per_epoch=steps,
        total_steps=steps * run.epochs,
        train_seconds=run.seconds / len(groups),
        per_seed={name: values[part] for name, values in per_lane.items()},
        curves=curves,
        epochs=run.epochs,
        swept_value=sigma,
      )
    )
  return rows


def best_fixed_sigma(rows: list[MethodResult]) -> MethodResult | None:
  """The grid's row with the highest mean final test accuracy (an oracle pick)."""
  grid = [row for row in rows if row.swept_value is not None]
  if not grid:
    return None
  return max(grid, key=lambda row: row.summary("final_test_accuracy")[0])


# --- the experiment --------------------------------------------------------

MATCHED_RULE = (
  "per model and data set, the largest, over every run (method, sigma, seed) "
  "that learned (lowest loss at most 0.8 times its loss at the start), of the "
  "lowest full training loss recorded at a trace point; tr(H) on the tracking "
  "subset where a run's loss first falls to it, linear in log(loss) between "
  "the two trace points around the crossing"
)


def _variants(settings: Settings) -> list[tuple[str, Settings]]:
  """``(method, settings)`` of each run: the self-tuning NSO once per target."""
  out = []
  for method in settings.methods:
    targets = settings.targets if method == "nso-tuned" else (None,)
    for target in targets:
      one = (
        settings if target is None else dataclasses.replace(settings, targets=(target,))
      )
      out.append((method, one))
  return out


def matched_traces(rows: list[MethodResult], level: float) -> dict[str, Any]:
  """Per row: tr(H) at training loss ``level`` per seed (``None``: not reached)."""
  out = {}
  for row in rows:
    losses, traces = (np.asarray(row.curves[name]) for name in TRACKED)
    values = [matched_trace(*pair, level) for pair in zip(losses, traces, strict=True)]
    reached = [value for value in values if value is not None]
    mean, std = records.mean_std(reached) if reached else (None, None)
    out[row.method] = {
      "label": row.label,
      "per_seed": values,
      "reached": len(reached),
      "summary": [mean, std],
    }
  return out


TRACKED = ("track_train_loss", "track_trace")


def _config(
  model: str,
  level: float,
  settings: Settings,
  data: data_lib.Dataset,
  progress: output.ProgressBars,
  context: RunContext,
) -> dict[str, Any]:
  """Trains and measures every method on one model and data set."""
  runs = []
  for method, variant in _variants(settings):
    factor = 2 // GRADIENTS_PER_STEP[method]
    name = f"{model}, {100 * level:g}% flipped: {method}"
    advance = progress.task(name, settings.epochs * factor)
    runs.append(train_run(model, method, variant, data, advance, context.safe_point))
  matched = matched_level(runs)
  rows, seconds = [], {}
  for run in runs:
    start = time.perf_counter()
    metrics = measure_run(run, model, settings, data, context.safe_point)
    new = _rows_of(run, metrics, settings)
    rows += new
    measured = time.perf_counter() - start
    key = new[0].method if run.target is not None else run.method
    seconds[key] = {"train_seconds": run.seconds, "measure_seconds": measured}
  params = jax.tree.map(lambda x: x[0], runs[0].params)
  return {
    "model": model,
    "noise_level": level,
    "parameters": sum(x.size for x in jax.tree.leaves(params)),
    "matched_loss": matched,
    "matched_traces": matched_traces(rows, matched),
    "rows": rows,
    "seconds": seconds,
  }


def run(settings: Settings, context: RunContext) -> dict[str, Any]:
  """Runs ``mnist1d`` and writes its outputs (see
  :func:`nso_jax.app.experiments.run`)."""
  output.prepare_output(settings.output)
  datasets = {
    level: make_data(level, settings.train_examples) for level in settings.noise_levels
  }
  configs = []
  with output.ProgressBars(settings.progress) as progress:
    for model in settings.models:
      for level, (data, _) in datasets.items():
        configs.append(_config(model, level, settings, data, progress, context))
  flipped = {f"{level:g}": int(mask.sum()) for level, (_, mask) in datasets.items()}
  return _finish(settings, configs, flipped, context)


VERSUS = ("final_test_accuracy", "best_test_accuracy", "hessian_trace")
"""The measures compared with the best fixed sigma, paired by seed."""


def _title(config: dict[str, Any]) -> str:
  model = {"mlp": "MLP", "cnn": "CNN"}[config["model"]]
  return f"{model}, {100 * config['noise_level']:g}% flipped labels"


def matched_table(config: dict[str, Any]) -> str:
  """tr(H) at the matched training loss, per method, as Markdown."""
  lines = [
    f"Training loss {config['matched_loss']:.4g}: {MATCHED_RULE}.",
    "",
    "| method | runs reaching it | tr(H) there (tracking subset) | final tr(H) |",
    "| --- | ---: | ---: | ---: |",
  ]
  for row in config["rows"]:
    entry = config["matched_traces"][row.method]
    mean, std = entry["summary"]
    there = "n/a" if mean is None else f"{mean:.3g} ± {std:.2g}"
    final_mean, final_std = row.summary("hessian_trace")
    lines.append(
      f"| {row.label} | {entry['reached']} of {len(entry['per_seed'])} | {there} | "
      f"{final_mean:.3g} ± {final_std:.2g} |"
    )
  return "\n".join(lines)


def _versus_best(
  config: dict[str, Any],
) -> tuple[MethodResult | None, dict[str, Any], list[tuple[str, str]]]:
  """Filter-wise and self-tuning NSO against the best fixed sigma, by seed."""
  rows: list[MethodResult] = config["rows"]
  best = best_fixed_sigma(rows)
  adaptive = ("nso-filterwise", "nso-tuned")
  compared = [row for row in rows if row.method.startswith(adaptive)]
  if best is None or not compared:
    return best, {}, []
  differences = records.paired_differences([best, *compared], VERSUS, best.method)
  labels = {row.method: row.label for row in rows}
  columns = [column for column in COLUMNS if column[0] in VERSUS]
  table = output.differences_table(differences, labels, columns, baseline=best.label)
  heading = f"{_title(config)}: against the best fixed sigma ({best.label})"
  return best, records.differences_json(differences), [(heading, table)]


def _config_json(
  config: dict[str, Any],
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
  """A configuration's JSON and Markdown sections."""
  rows: list[MethodResult] = config["rows"]
  table = output.method_table(rows, COLUMNS[:-1])
  sigmas = [
    f"{row.label}: {row.summary('final_sigma')[0]:.3g} ± "
    f"{row.summary('final_sigma')[1]:.2g}"
    for row in rows
    if row.method.startswith("nso-tuned")
  ]
  if sigmas:
    table += "\n\nFinal sigma of the self-tuning NSO: " + "; ".join(sigmas) + "."
  matched = matched_table(config)
  best, versus, sections = _versus_best(config)
  sections = [
    (f"{_title(config)} (mean ± std over seeds)", table),
    (f"{_title(config)}: tr(H) at a matched training loss", matched),
    *sections,
  ]
  document = {
    "model": config["model"],
    "noise_level": config["noise_level"],
    "parameters": config["parameters"],
    "matched_loss": {
      "level": config["matched_loss"],
      "rule": MATCHED_RULE,
      "traces": config["matched_traces"],
    },
    "best_fixed_sigma": None if best is None else best.swept_value,
    "versus_best_fixed_sigma": versus,
    "seconds": config["seconds"],
    "rows": [row.to_json() for row in rows],
    "tables": {"results": table, "matched_loss": matched},
  }
  return document, sections


def compute_json(settings: Settings) -> dict[str, Any]:
  """Each method's compute per seed: gradients and forward passes, epochs."""
  steps = settings.train_examples // settings.batch_size
  out = {}
  for method in settings.methods:
    per_step = GRADIENTS_PER_STEP[method]
    epochs = settings.epochs * (2 // per_step)
    out[method] = {
      "gradient_evaluations_per_step": per_step,
      "extra_forward_passes_per_step": FORWARD_PASSES_PER_STEP.get(method, 0),
      "epochs": epochs,
      "steps": steps * epochs,
      "gradient_evaluations": per_step * steps * epochs,
    }
  return out


def _finish(
  settings: Settings,
  configs: list[dict[str, Any]],
  flipped: dict[str, int],
  context: RunContext,
) -> dict[str, Any]:
  documents, sections = [], []
  for config in configs:
    document, parts = _config_json(config)
    documents.append(document)
    sections += parts
  import mnist1d

  results = {
    "experiment": "mnist1d",
    "settings": settings_lib.as_json(settings),
    "data": {
      "generator": "mnist1d.data.make_dataset (offline, from the templates)",
      "mnist1d_version": getattr(mnist1d, "__version__", "unknown"),
      "args": DATA_ARGS,
      "train_examples": settings.train_examples,
      "test_examples": 1000,
      "flipped_examples": flipped,
      "flip_seed": "round(1000 * noise level)",
      "measured_on": f"the first {settings.hessian_samples} training examples, "
      "training labels",
      "tracked_on": f"the first {settings.track_samples} training examples, "
      f"{settings.track_matvecs} probes, key 7",
    },
    "compute": compute_json(settings),
    "configs": documents,
  }
  title = "mnist1d: MNIST-1D, MLP and CNN, clean and flipped labels"
  markdown = output.markdown_document(title, sections)
  plots = {
    "curves.png": lambda path: output.draw_curves(
      [(_title(config), config["rows"]) for config in configs], path
    ),
    "trace_vs_loss.png": lambda path: draw_trace_vs_loss(configs, path),
  }
  for config in configs:
    name = f"measures_{config['model']}_{100 * config['noise_level']:g}.png"
    plots[name] = functools.partial(
      output.draw_bars,
      config["rows"],
      [
        (metric, header)
        for metric, header, _ in COLUMNS[:-1]
        if metric != "best_test_accuracy"
      ],
      title=_title(config),
    )
  return output.finish(
    context, settings.output, results, markdown, plots if settings.plots else {}
  )


def draw_trace_vs_loss(configs: list[dict[str, Any]], path: str) -> None:
  """tr(H) (tracking subset) against the training loss, one panel per configuration.

  Each line is a method's mean over seeds at its trace points, from the start
  (right) to the end (left); the dotted line is the matched loss.
  """
  plt = output.pyplot()
  fig, axes = plt.subplots(
    1, len(configs), figsize=(5 * len(configs), 4), squeeze=False
  )
  for ax, config in zip(axes[0], configs, strict=True):
    for index, row in enumerate(config["rows"]):
      loss = np.exp(np.log(np.asarray(row.curves["track_train_loss"])).mean(0))
      trace = np.asarray(row.curves["track_trace"]).mean(0)
      ax.plot(loss, trace, ".-", color=f"C{index % 10}", label=row.label, lw=1)
    ax.axvline(config["matched_loss"], color="k", ls=":", lw=1)
    ax.set(xscale="log", xlabel="training loss", ylabel="tr(H)", title=_title(config))
  axes[0, 0].legend(fontsize=7)
  output.save(fig, path)
