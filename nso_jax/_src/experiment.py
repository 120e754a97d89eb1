"""The main job: optimizers side by side on a real data set, and their curvature.

Trains a Flax Linen MLP with plain SGD, SAM, random weight perturbation (RWP,
one-sided noise) and NSO over several seeds (all seeds of one optimizer run
together under ``jax.vmap``), then measures the loss Hessian of every trained
model: its trace (Hutchinson, with a standard error), its top eigenvalue
(Lanczos) and its spectral density (stochastic Lanczos quadrature).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nso_jax
from nso_jax import hessian
from nso_jax import training

OPTIMIZERS: tuple[str, ...] = ("sgd", "sam", "rwp", "nso")

OPTIMIZER_LABELS = {
  "sgd": "SGD (momentum)",
  "sam": "SAM",
  "rwp": "RWP (one-sided noise)",
  "nso": "NSO",
}


class DataError(ValueError):
  """A data file that cannot be used, with the reason."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification data set split into train and test arrays."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the main job; the defaults finish in minutes on 2 CPU cores."""

  optimizers: tuple[str, ...] = OPTIMIZERS
  epochs: int = 40
  seeds: int = 5
  hidden: tuple[int, ...] = (128, 128)
  batch_size: int = 32
  learning_rate: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4
  sigma: float = 0.05
  num_perturbations: int = 1
  rho: float = 0.05
  test_fraction: float = 0.3
  hessian_samples: int = 1000
  hessian_matvecs: int = 100
  lanczos_steps: int = 30
  density_steps: int = 40
  density_probes: int = 4
  data: str | None = None
  output: str = "nso_results"
  plots: bool = True
  progress: bool = True

  def __post_init__(self):
    unknown = [name for name in self.optimizers if name not in OPTIMIZERS]
    if unknown or not self.optimizers:
      raise ValueError(
        f"`optimizers` must be a non-empty subset of {OPTIMIZERS}, got "
        f"{self.optimizers!r}."
      )
    for name in (
      "epochs",
      "seeds",
      "batch_size",
      "num_perturbations",
      "hessian_samples",
      "hessian_matvecs",
      "lanczos_steps",
      "density_steps",
      "density_probes",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    if not self.hidden or any(h < 1 for h in self.hidden):
      raise ValueError(f"`hidden` must list layer widths >= 1, got {self.hidden!r}.")
    for name in ("learning_rate", "sigma", "rho"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite float > 0, got {value!r}.")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(
        f"`weight_decay` must be a finite float >= 0, got {self.weight_decay!r}."
      )
    if not 0 <= self.momentum < 1:
      raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum!r}.")
    if not 0 < self.test_fraction < 1:
      raise ValueError(
        f"`test_fraction` must be in (0, 1), got {self.test_fraction!r}."
      )


def _split(x, y, test_fraction, name) -> Dataset:
  from sklearn.model_selection import train_test_split

  classes, y = np.unique(y, return_inverse=True)
  try:
    x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=0, stratify=y
    )
  except ValueError as error:
    raise DataError(
      f"cannot split {len(y)} examples of {len(classes)} classes into train "
      f"and test sets with test_fraction={test_fraction}: {error}"
    ) from None
  mean, std = x_train.mean(axis=0), x_train.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  standardise = lambda a: ((a - mean) / std).astype(np.float32)
  return Dataset(
    name=name,
    x_train=standardise(x_train),
    y_train=y_train.astype(np.int32),
    x_test=standardise(x_test),
    y_test=y_test.astype(np.int32),
    num_classes=len(classes),
  )


def load_digits(test_fraction: float = 0.3) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), split."""
  from sklearn.datasets import load_digits as sklearn_digits

  bunch = sklearn_digits()
  return _split(bunch.data, bunch.target, test_fraction, "digits (scikit-learn)")


def load_npz(path: str, test_fraction: float = 0.3) -> Dataset:
  """A user's classification data: an ``.npz`` file with arrays ``X`` and ``y``.

  Args:
    path: the file; ``X`` is ``(n, d)`` numeric features, ``y`` is ``(n,)``
      class labels (integers or strings).
    test_fraction: the share of examples held out for testing (stratified).

  Returns:
    The standardised, split :class:`Dataset`.

  Raises:
    DataError: naming what is wrong with the file.
  """
  if not os.path.isfile(path):
    raise DataError(f"--data: no such file: {path!r}.")
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {name: archive[name] for name in archive.files}
  except Exception as error:
    raise DataError(
      f"--data: {path!r} is not a readable .npz archive ({error})."
    ) from None
  missing = [name for name in ("X", "y") if name not in arrays]
  if missing:
    raise DataError(
      f"--data: {path!r} lacks the array(s) {missing}; it must hold X "
      f"(n, d) features and y (n,) labels; found {sorted(arrays)}."
    )
  x, y = arrays["X"], arrays["y"]
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
    raise DataError(
      f"--data: X must be a 2-D numeric array (n, d), got shape {x.shape} "
      f"and dtype {x.dtype}."
    )
  if y.ndim != 1 or len(y) != len(x):
    raise DataError(
      f"--data: y must be 1-D with one label per row of X ({len(x)}), got "
      f"shape {y.shape}."
    )
  if np.issubdtype(y.dtype, np.floating) and not np.all(np.mod(y, 1) == 0):
    raise DataError("--data: y must hold class labels, got non-integer floats.")
  if not np.all(np.isfinite(x)):
    raise DataError("--data: X contains NaN or infinite values.")
  if len(np.unique(y)) < 2:
    raise DataError("--data: y must contain at least two classes.")
  name = os.path.basename(path)
  return _split(x.astype(np.float64), y, test_fraction, name)


class MLP(nn.Module):
  """A ReLU multilayer perceptron classifier."""

  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _with_single_argument_grad_fn(tx):
  """Lets SAM (whose ``grad_fn`` takes ``(params, step)``) take ``grad_fn(params)``."""

  def update(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    return tx.update(updates, state, params, grad_fn=lambda p, _: grad_fn(p))

  return optax.GradientTransformationExtraArgs(tx.init, update)


def make_optimizer(name: str, config: Config) -> tuple[Any, int, bool]:
  """Returns ``(tx, gradient evaluations per step, needs clean gradient)``."""
  base = optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(config.learning_rate, momentum=config.momentum),
  )
  sigma, k = config.sigma, config.num_perturbations
  if name == "sgd":
    return base, 1, True
  if name == "sam":
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(config.rho))
    sam = optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True)
    return _with_single_argument_grad_fn(sam), 2, True
  if name == "rwp":
    return nso_jax.nso(base, sigma, k, key=0, one_sided=True), k, False
  return nso_jax.nso(base, sigma, k, key=0), 2 * k, False


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, n):
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


class _Progress:
  """A rich progress bar, or silence."""

  def __init__(self, enabled: bool):
    self.enabled = enabled

  def __enter__(self):
    if self.enabled:
      from rich.progress import BarColumn
      from rich.progress import MofNCompleteColumn
      from rich.progress import Progress
      from rich.progress import TextColumn
      from rich.progress import TimeElapsedColumn

      self._progress = Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
      )
      self._progress.__enter__()
    return self

  def __exit__(self, *exc):
    if self.enabled:
      self._progress.__exit__(*exc)

  def task(self, description: str, total: int):
    if not self.enabled:
      return lambda advance=1: None
    task_id = self._progress.add_task(description, total=total)
    return lambda advance=1: self._progress.advance(task_id, advance)


def train_optimizer(
  name: str, data: Dataset, config: Config, progress: _Progress
) -> dict[str, Any]:
  """Trains one optimizer over all seeds at once; returns curves and states."""
  model = MLP(tuple(config.hidden), data.num_classes)
  tx, evaluations, clean_gradient = make_optimizer(name, config)
  x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  n = len(x_train)
  steps = n // config.batch_size
  if steps < 1:
    raise DataError(
      f"--batch-size {config.batch_size} exceeds the {n} training examples."
    )

  def init(seed):
    params = model.init(jax.random.fold_in(jax.random.key(seed), 0), x_train[:1])
    state = training.TrainState.create(
      apply_fn=model.apply, params=params["params"], tx=tx
    )
    opt_state = state.opt_state
    if name in ("nso", "rwp"):
      noise_key = jax.random.fold_in(jax.random.key(seed), 1)
      opt_state = optax.tree_utils.tree_set(opt_state, key=noise_key)
    return state.replace(opt_state=opt_state)

  def epoch(state, seed, epoch_index):
    shuffle_key = jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), 2), epoch_index
    )
    order = jax.random.permutation(shuffle_key, n)[: steps * config.batch_size]
    batches = (
      x_train[order].reshape(steps, config.batch_size, -1),
      y_train[order].reshape(steps, config.batch_size),
    )

    def step(state, batch):
      x, y = batch

      def loss_fn(params, batch_stats):
        del batch_stats
        return cross_entropy(model.apply({"params": params}, x), y), {}

      state, metrics = training.train_step(
        state, loss_fn, clean_gradient=clean_gradient
      )
      return state, metrics["loss"]

    state, losses = jax.lax.scan(step, state, batches)
    return state, jnp.mean(losses)

  def evaluate(state):
    logits = model.apply({"params": state.params}, x_test)
    train_loss = cross_entropy(model.apply({"params": state.params}, x_train), y_train)
    return jnp.mean(jnp.argmax(logits, -1) == y_test), train_loss

  seeds = jnp.arange(config.seeds)
  states = _stack([init(int(seed)) for seed in seeds])
  run_epoch = jax.jit(jax.vmap(epoch, in_axes=(0, 0, None)))
  run_eval = jax.jit(jax.vmap(evaluate))
  curves = {"epoch_train_loss": [], "train_loss": [], "test_accuracy": []}
  advance = progress.task(f"train {OPTIMIZER_LABELS[name]}", config.epochs)
  start = time.perf_counter()
  for epoch_index in range(config.epochs):
    states, epoch_loss = run_epoch(states, seeds, epoch_index)
    accuracy, train_loss = run_eval(states)
    curves["epoch_train_loss"].append(np.asarray(epoch_loss))
    curves["train_loss"].append(np.asarray(train_loss))
    curves["test_accuracy"].append(np.asarray(accuracy))
    advance()
  seconds = time.perf_counter() - start
  curves = {key: np.stack(value, axis=1) for key, value in curves.items()}
  return {
    "states": states,
    "curves": curves,
    "gradient_evaluations_per_step": evaluations,
    "steps_per_epoch": steps,
    "train_seconds": seconds,
  }


def make_curvature_measure(
  data: Dataset, config: Config
) -> Callable[[Any, jax.Array], tuple[Any, jax.Array, Any]]:
  """A jitted ``(params, key) -> (trace estimate, top eigenvalue, density)``.

  The loss is the mean cross-entropy over the first ``config.hessian_samples``
  training examples (the paper measures on about 1000 samples).
  """
  model = MLP(tuple(config.hidden), data.num_classes)
  size = min(config.hessian_samples, len(data.x_train))
  batch = (jnp.asarray(data.x_train[:size]), jnp.asarray(data.y_train[:size]))
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch[0][:1])
  dim = sum(leaf.size for leaf in jax.tree.leaves(shapes))
  lanczos_steps = min(config.lanczos_steps, dim)
  density_steps = min(config.density_steps, dim)

  def loss_fn(params, batch):
    return cross_entropy(model.apply({"params": params}, batch[0]), batch[1])

  @jax.jit
  def measure(params, key):
    trace_key, eig_key, density_key = jax.random.split(key, 3)
    estimate = hessian.trace(
      loss_fn, params, batch, trace_key, num_matvecs=config.hessian_matvecs
    )
    top = hessian.top_eigenvalues(
      loss_fn, params, batch, eig_key, k=1, num_steps=lanczos_steps
    )
    density = hessian.spectral_density(
      loss_fn,
      params,
      batch,
      density_key,
      num_probes=config.density_probes,
      num_steps=density_steps,
      grid_size=400,
    )
    return estimate, top[0], density

  return measure


def measure_curvature(
  run: dict[str, Any],
  measure: Callable[[Any, jax.Array], tuple[Any, jax.Array, Any]],
  config: Config,
  name: str,
  progress: _Progress,
) -> dict[str, Any]:
  """Hessian trace, top eigenvalue and spectral density of each trained seed."""
  params = _unstack(run["states"].params, config.seeds)
  advance = progress.task(f"Hessian {OPTIMIZER_LABELS[name]}", config.seeds)
  results = []
  for seed, p in enumerate(params):
    results.append(measure(p, jax.random.key(1000 + seed)))
    advance()
  return {
    "trace": [float(r[0].value) for r in results],
    "trace_stderr": [float(r[0].stderr) for r in results],
    "top_eigenvalue": [float(r[1]) for r in results],
    "density": results[0][2],
  }


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, dtype=np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return float(values.mean()), std


def summarise(
  name: str, run: dict[str, Any], curvature: dict[str, Any]
) -> dict[str, Any]:
  curves = run["curves"]
  accuracy = curves["test_accuracy"][:, -1]
  trace_mean, trace_std = _mean_std(curvature["trace"])
  # Standard error of the seed-mean from the Hutchinson errors alone.
  stderr = float(np.sqrt(np.sum(np.square(curvature["trace_stderr"])))) / len(
    curvature["trace"]
  )
  return {
    "optimizer": name,
    "label": OPTIMIZER_LABELS[name],
    "gradient_evaluations_per_step": run["gradient_evaluations_per_step"],
    "test_accuracy": _mean_std(accuracy),
    "test_accuracy_per_seed": accuracy.tolist(),
    "final_train_loss": _mean_std(curves["train_loss"][:, -1]),
    "hessian_trace": (trace_mean, trace_std),
    "hessian_trace_stderr": stderr,
    "hessian_trace_per_seed": curvature["trace"],
    "hessian_trace_stderr_per_seed": curvature["trace_stderr"],
    "top_eigenvalue": _mean_std(curvature["top_eigenvalue"]),
    "top_eigenvalue_per_seed": curvature["top_eigenvalue"],
    "train_seconds": run["train_seconds"],
    "curves": {key: value.tolist() for key, value in curves.items()},
    "spectral_density_seed0": {
      "grid": np.asarray(curvature["density"].grid).tolist(),
      "density": np.asarray(curvature["density"].density).tolist(),
    },
  }


def format_table(rows: list[dict[str, Any]]) -> str:
  """The results as a Markdown table."""
  header = (
    "| optimizer | grads/step | test accuracy (%) | final train loss | "
    "tr(H) | tr(H) s.e. | top eigenvalue |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  )
  lines = [header]
  for row in rows:
    acc_mean, acc_std = row["test_accuracy"]
    loss_mean, loss_std = row["final_train_loss"]
    tr_mean, tr_std = row["hessian_trace"]
    eig_mean, eig_std = row["top_eigenvalue"]
    lines.append(
      f"| {row['label']} | {row['gradient_evaluations_per_step']} | "
      f"{100 * acc_mean:.2f} ± {100 * acc_std:.2f} | "
      f"{loss_mean:.4f} ± {loss_std:.4f} | {tr_mean:.3g} ± {tr_std:.2g} | "
      f"{row['hessian_trace_stderr']:.2g} | {eig_mean:.3g} ± {eig_std:.2g} |"
    )
  return "\n".join(lines)


def plot_results(rows: list[dict[str, Any]], output: str) -> list[str]:
  """Writes ``curves.png`` and ``spectrum.png``; returns their paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for row in rows:
    for ax, key in ((ax_loss, "train_loss"), (ax_acc, "test_accuracy")):
      values = np.asarray(row["curves"][key])
      epochs = np.arange(1, values.shape[1] + 1)
      ax.plot(epochs, values.mean(0), label=row["label"])
      ax.fill_between(epochs, values.min(0), values.max(0), alpha=0.2)
  ax_loss.set(
    xlabel="epoch",
    ylabel="training loss (full training set)",
    yscale="log",
    title="Training loss (mean; band: min to max over seeds)",
  )
  ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
  ax_acc.legend()
  fig.tight_layout()
  paths.append(os.path.join(output, "curves.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row in rows:
    density = row["spectral_density_seed0"]
    values = np.maximum(np.asarray(density["density"]), 1e-8)
    ax.semilogy(density["grid"], values, label=row["label"])
  ax.set(
    xlabel="Hessian eigenvalue",
    ylabel="density",
    title="Hessian spectral density (SLQ, seed 0)",
    ylim=(1e-6, None),
  )
  ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(output, "spectrum.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


def run(config: Config, printer: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the main job and writes its outputs; returns the results dict."""
  data = (
    load_npz(config.data, config.test_fraction)
    if config.data
    else load_digits(config.test_fraction)
  )
  os.makedirs(config.output, exist_ok=True)
  printer(
    f"data: {data.name}: {len(data.x_train)} train / {len(data.x_test)} test "
    f"examples, {data.x_train.shape[1]} features, {data.num_classes} classes"
  )
  start = time.perf_counter()
  rows = []
  measure = make_curvature_measure(data, config)
  with _Progress(config.progress) as progress:
    for name in config.optimizers:
      trained = train_optimizer(name, data, config, progress)
      curvature = measure_curvature(trained, measure, config, name, progress)
      rows.append(summarise(name, trained, curvature))
  table = format_table(rows)
  results = {
    "config": dataclasses.asdict(config),
    "data": {
      "name": data.name,
      "hessian_examples": min(config.hessian_samples, len(data.x_train)),
      "train_examples": len(data.x_train),
      "test_examples": len(data.x_test),
      "features": int(data.x_train.shape[1]),
      "classes": data.num_classes,
    },
    "environment": {
      "jax": jax.__version__,
      "optax": optax.__version__,
      "nso_jax": nso_jax.__version__,
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(),
      "python": platform.python_version(),
    },
    "results": rows,
    "table": table,
    "seconds": time.perf_counter() - start,
  }
  with open(os.path.join(config.output, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  if config.plots:
    results["plots"] = plot_results(rows, config.output)
  printer(table)
  printer(
    f"wrote {os.path.join(config.output, 'results.json')}"
    + ("" if not config.plots else " and " + ", ".join(results["plots"]))
    + f" in {results['seconds']:.0f} s"
  )
  return results
