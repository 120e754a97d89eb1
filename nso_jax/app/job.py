"""The main job: optimizers side by side on a real data set, and their curvature.

Trains a Flax Linen MLP with plain SGD, SAM, random weight perturbation (RWP,
one-sided noise) and NSO over several seeds (all seeds of one optimizer run
together under ``jax.vmap``), then measures the loss Hessian of every trained
model: its trace (Hutchinson, with a standard error), its top eigenvalue
(Lanczos) and its spectral density (stochastic Lanczos quadrature).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
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
from nso_jax.app import data as data_lib
from nso_jax.app import report
from nso_jax.app.interrupts import DeferredInterruptions
from nso_jax.app.interrupts import Interrupted

OPTIMIZERS: tuple[str, ...] = ("sgd", "sam", "rwp", "nso")

OPTIMIZER_LABELS = {
  "sgd": "SGD (momentum)",
  "sam": "SAM",
  "rwp": "RWP (one-sided noise)",
  "nso": "NSO",
}

SIZE_LIMITS: dict[str, tuple[int, str]] = {
  "epochs": (
    10_000,
    "250 times the default; at the default size that is hours of training",
  ),
  "seeds": (64, "all seeds train at once, each with its own copy of the model"),
  "batch_size": (
    100_000,
    "a batch's activations are held for every seed at once",
  ),
  "num_perturbations": (64, "NSO spends 2 gradient evaluations per perturbation"),
  "hessian_samples": (
    100_000,
    "100 times the default; the Hessian is applied to all of them at once",
  ),
  "hessian_matvecs": (
    10_000,
    "100 times the default; the trace's error shrinks only as 1/sqrt(probes)",
  ),
  "lanczos_steps": (1_000, "Lanczos keeps one parameter-sized vector per step"),
  "density_steps": (1_000, "Lanczos keeps one parameter-sized vector per step"),
  "density_probes": (64, "each probe runs its own Lanczos"),
}
"""Upper bounds of the int settings, and why: ``field -> (bound, reason)``.

Each bound is generous for real use and refuses settings that would trace,
compile or run for hours with no sign of progress. Every int setting is at
least 1.
"""

MAX_WIDTH = 8192
"""The widest hidden layer: wider ones hold a ``width x width`` weight matrix
per layer, per seed and per optimizer state."""

MAX_DEPTH = 32
"""The most hidden layers: each one is traced and compiled on its own."""

MAX_PARAMETERS = 20_000_000
"""The largest model (of one seed): the Hessian measurement keeps one
parameter-sized vector per Lanczos step, 20 million floats being 80 MB each."""

MAX_TRAINED_PARAMETERS = 200_000_000
"""The most parameters trained at once over all seeds: with their momentum,
gradients and perturbations, about 3 GB in float32."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the main job; the defaults finish in minutes on 2 CPU cores.

  Raises:
    SettingError: naming the first field whose value cannot be used.
  """

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
    setting_error = data_lib.SettingError
    unknown = [name for name in self.optimizers if name not in OPTIMIZERS]
    if unknown or not self.optimizers:
      raise setting_error(
        "optimizers",
        f"must be a non-empty subset of {OPTIMIZERS}, got {self.optimizers!r}.",
      )
    for name, (limit, reason) in SIZE_LIMITS.items():
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise setting_error(name, f"must be an int >= 1, got {value!r}.")
      if value > limit:
        raise setting_error(
          name, f"must be at most {limit:,} ({reason}), got {value!r}."
        )
    hidden = tuple(self.hidden)
    if not hidden or any(not isinstance(h, (int, np.integer)) or h < 1 for h in hidden):
      raise setting_error(
        "hidden", f"must list layer widths >= 1, got {self.hidden!r}."
      )
    if max(hidden) > MAX_WIDTH:
      raise setting_error(
        "hidden",
        f"must list layer widths of at most {MAX_WIDTH:,}, got {self.hidden!r}.",
      )
    if len(hidden) > MAX_DEPTH:
      raise setting_error(
        "hidden",
        f"must list at most {MAX_DEPTH} layers (each is compiled on its own), "
        f"got {len(hidden)}.",
      )
    for name in ("learning_rate", "sigma", "rho"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value > 0):
        raise setting_error(name, f"must be a finite float > 0, got {value!r}.")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise setting_error(
        "weight_decay",
        f"must be a finite float >= 0, got {self.weight_decay!r}.",
      )
    if not 0 <= self.momentum < 1:
      raise setting_error("momentum", f"must be in [0, 1), got {self.momentum!r}.")
    if not 0 < self.test_fraction < 1:
      raise setting_error(
        "test_fraction", f"must be in (0, 1), got {self.test_fraction!r}."
      )
    if self.data is not None and not (isinstance(self.data, str) and self.data):
      raise setting_error(
        "data",
        f"must name an .npz file (or be left out for the digits), got {self.data!r}.",
      )
    if not (isinstance(self.output, str) and self.output):
      raise setting_error("output", f"must name a folder, got {self.output!r}.")


def load_data(config: Config) -> data_lib.Dataset:
  """The data set ``config`` names: its ``data`` file, or else the digits.

  Raises:
    DataError: naming the Config field at fault (``data``, ``test_fraction``).
  """
  if not config.data:
    return data_lib.load_digits(config.test_fraction)
  try:
    return data_lib.load_npz(config.data, config.test_fraction)
  except data_lib.DataError as error:
    if error.field != "path":
      raise
    raise error.with_field("data") from None


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


def _with_single_argument_grad_fn(
  tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  """Lets SAM (whose ``grad_fn`` takes ``(params, step)``) take ``grad_fn(params)``."""

  def update(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    return tx.update(updates, state, params, grad_fn=lambda p, _: grad_fn(p))

  return optax.GradientTransformationExtraArgs(tx.init, update)


def make_optimizer(
  name: str, config: Config, param_filter: Any = None
) -> tuple[Any, int, bool]:
  """Returns ``(tx, gradient evaluations per step, needs clean gradient)``.

  ``param_filter`` (NSO and RWP only) restricts the noise to some leaves (see
  :func:`nso_jax.noise_stability`); ``None`` perturbs every leaf.
  """
  base = optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(config.learning_rate, momentum=config.momentum),
  )
  sigma, k = config.sigma, config.num_perturbations
  noise = {} if param_filter is None else {"param_filter": param_filter}
  if name == "sgd":
    return base, 1, True
  if name == "sam":
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(config.rho))
    sam = optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True)
    return _with_single_argument_grad_fn(sam), 2, True
  if name == "rwp":
    return nso_jax.nso(base, sigma, k, key=0, one_sided=True, **noise), k, False
  return nso_jax.nso(base, sigma, k, key=0, **noise), 2 * k, False


def steps_per_epoch(config: Config, train_examples: int) -> int:
  """The full batches an epoch of ``train_examples`` examples takes.

  Raises:
    SettingError: when ``batch_size`` exceeds the training examples.
  """
  steps = train_examples // config.batch_size
  if steps < 1:
    raise data_lib.SettingError(
      "batch_size",
      f"exceeds the {train_examples} training examples.",
      value=config.batch_size,
    )
  return steps


def parameter_count(hidden: Sequence[int], features: int, num_classes: int) -> int:
  """The weights and biases of an :class:`MLP` on ``features`` inputs."""
  widths = (features, *hidden, num_classes)
  return sum((fan_in + 1) * fan_out for fan_in, fan_out in itertools.pairwise(widths))


def check_fits(config: Config, data: data_lib.Dataset) -> None:
  """Checks that the job's batches and models fit ``data``, before any compile.

  Raises:
    SettingError: when ``batch_size`` exceeds the training examples, the
      model exceeds :data:`MAX_PARAMETERS` (field ``hidden``), or the models
      of all seeds exceed :data:`MAX_TRAINED_PARAMETERS` (field ``seeds``).
  """
  steps_per_epoch(config, len(data.x_train))
  features = data.x_train.shape[1]
  count = parameter_count(config.hidden, features, data.num_classes)
  if count > MAX_PARAMETERS:
    raise data_lib.SettingError(
      "hidden",
      f"gives a model of {count:,} parameters on {features:,} features and "
      f"{data.num_classes} classes; at most {MAX_PARAMETERS:,} are allowed "
      "(the Hessian measurement keeps dozens of parameter-sized vectors); "
      "use narrower layers.",
      value=",".join(str(width) for width in config.hidden),
    )
  if count * config.seeds > MAX_TRAINED_PARAMETERS:
    raise data_lib.SettingError(
      "seeds",
      f"would train {config.seeds} models of {count:,} parameters at once; at "
      f"most {MAX_TRAINED_PARAMETERS:,} parameters in all are allowed; use "
      "fewer seeds or a smaller model.",
      value=config.seeds,
    )


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, n):
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def _no_interruption() -> None:
  pass


def train_optimizer(
  name: str,
  data: data_lib.Dataset,
  config: Config,
  progress: report.ProgressBars,
  safe_point: Callable[[], None] = _no_interruption,
  *,
  init_params: Callable[[int], Any] | None = None,
  param_filter: Any = None,
  label: str | None = None,
) -> dict[str, Any]:
  """Trains one optimizer over all seeds at once.

  ``safe_point`` is called after each epoch, once its computations have
  finished: where an interruption may stop the job (see
  :class:`DeferredInterruptions`). ``init_params(seed)``, if given, returns
  the starting parameters of each seed (e.g. pretrained ones) instead of a
  fresh initialisation; ``param_filter`` goes to :func:`make_optimizer`;
  ``label`` names the progress bar (default: the optimizer's label).

  Returns:
    The stacked train states, the per-epoch curves (``(seeds, epochs)``
    arrays), gradient evaluations per step, steps per epoch and seconds.

  Raises:
    SettingError: when ``batch_size`` exceeds the training examples.
  """
  model = MLP(tuple(config.hidden), data.num_classes)
  tx, evaluations, clean_gradient = make_optimizer(name, config, param_filter)
  x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  n = len(x_train)
  steps = steps_per_epoch(config, n)

  def init(seed):
    if init_params is None:
      key = jax.random.fold_in(jax.random.key(seed), 0)
      params = model.init(key, x_train[:1])["params"]
    else:
      params = init_params(seed)
    state = training.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
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
  per_epoch: dict[str, list[np.ndarray]] = {
    "epoch_train_loss": [],
    "train_loss": [],
    "test_accuracy": [],
  }
  advance = progress.task(f"train {label or OPTIMIZER_LABELS[name]}", config.epochs)
  start = time.perf_counter()
  for epoch_index in range(config.epochs):
    states, epoch_loss = run_epoch(states, seeds, epoch_index)
    accuracy, train_loss = run_eval(states)
    per_epoch["epoch_train_loss"].append(np.asarray(epoch_loss))
    per_epoch["train_loss"].append(np.asarray(train_loss))
    per_epoch["test_accuracy"].append(np.asarray(accuracy))
    advance()
    safe_point()
  seconds = time.perf_counter() - start
  curves = {key: np.stack(value, axis=1) for key, value in per_epoch.items()}
  return {
    "states": states,
    "curves": curves,
    "gradient_evaluations_per_step": evaluations,
    "steps_per_epoch": steps,
    "train_seconds": seconds,
  }


def make_curvature_measure(
  data: data_lib.Dataset, config: Config
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
      loss_fn, params, batch, eig_key, num_eigenvalues=1, num_steps=lanczos_steps
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
  trained: dict[str, Any],
  measure: Callable[[Any, jax.Array], tuple[Any, jax.Array, Any]],
  config: Config,
  name: str,
  progress: report.ProgressBars,
  safe_point: Callable[[], None] = _no_interruption,
) -> dict[str, Any]:
  """Hessian trace, top eigenvalue and spectral density of each trained seed.

  ``safe_point`` is called after each seed's measurement has finished.
  """
  params = _unstack(trained["states"].params, config.seeds)
  advance = progress.task(f"Hessian {OPTIMIZER_LABELS[name]}", config.seeds)
  results = []
  for seed, seed_params in enumerate(params):
    results.append(
      jax.block_until_ready(measure(seed_params, jax.random.key(1000 + seed)))
    )
    advance()
    safe_point()
  return {
    "trace": [float(r[0].value) for r in results],
    "trace_stderr": [float(r[0].stderr) for r in results],
    "top_eigenvalue": [float(r[1]) for r in results],
    "density": results[0][2],
  }


def run(config: Config, printer: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the main job and writes its outputs.

  Everything the job needs at the end is checked before it trains: the data,
  the sizes, and that the output folder can be created and written to. The
  outputs are written under temporary names and moved into place together,
  ``results.json`` last, so an interrupted or failed run leaves no file that
  looks complete. Ctrl-C stops the job at its next safe point, after the
  current epoch or measurement (see :class:`DeferredInterruptions`); once the
  results are being written, it lets the writing finish.

  Args:
    config: the settings.
    printer: where the data summary, the table and the paths written go.

  Returns:
    The results dict written to ``results.json``, plus the plot paths under
    ``"plots"`` when ``config.plots``.

  Raises:
    SettingError: naming the Config field whose value the data cannot serve
      (a :class:`DataError` for the data file and the split, an
      :class:`~nso_jax.app.report.OutputError` for the output folder).
    Interrupted: on Ctrl-C, listing the files already written.
  """
  written: list[str] = []
  try:
    with DeferredInterruptions() as interruptions:
      return _run(config, printer, written, interruptions.safe_point)
  except KeyboardInterrupt:
    raise Interrupted(written) from None


def _run(
  config: Config,
  printer: Callable[[str], None],
  written: list[str],
  safe_point: Callable[[], None],
) -> dict[str, Any]:
  """:func:`run`, adding each output file to ``written`` as it is put in place."""
  data = load_data(config)
  check_fits(config, data)
  report.prepare_output(config.output)
  printer(
    f"data: {data.name}: {len(data.x_train)} train / {len(data.x_test)} test "
    f"examples, {data.x_train.shape[1]} features, {data.num_classes} classes"
  )
  start = time.perf_counter()
  rows = []
  measure = make_curvature_measure(data, config)
  with report.ProgressBars(config.progress) as progress:
    for name in config.optimizers:
      trained = train_optimizer(name, data, config, progress, safe_point)
      curvature = measure_curvature(
        trained, measure, config, name, progress, safe_point
      )
      rows.append(report.summarise(name, OPTIMIZER_LABELS[name], trained, curvature))
  safe_point()
  table = report.format_table(rows)
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
    "environment": report.environment(),
    "results": rows,
    "table": table,
    "seconds": time.perf_counter() - start,
  }
  paths = report.write_results(
    results, rows, config.output, plots=config.plots, written=written
  )
  results_path, plot_paths = paths[-1], paths[:-1]
  if config.plots:
    results["plots"] = plot_paths
  printer(table)
  printer(
    f"wrote {results_path}"
    + ("" if not config.plots else " and " + ", ".join(plot_paths))
    + f" in {results['seconds']:.0f} s"
  )
  return results
