"""The classification experiments' shared pieces: settings, methods, measures.

The methods are the main job's optimizers (:func:`nso_jax.app.job.make_optimizer`,
trained by :func:`nso_jax.app.job.train_optimizer`, all seeds at once), at
matched gradient evaluations where they differ in cost:

* ``sgd``: SGD with momentum, 1 gradient per step;
* ``sgd-long``: the same, for ``2k`` times the epochs: NSO's gradient
  evaluations;
* ``sam``: SAM, 2 gradients per step;
* ``rwp``: random weight perturbation (one-sided noise) with ``2k`` draws
  per step: NSO's ``2k`` gradients per step;
* ``nso``: NSO with ``k`` antithetic pairs, ``2k`` gradients per step;
* ``nso-head``: NSO perturbing only the output layer (``param_filter``).

Each trained model is then measured on the training loss: the Hessian trace
(Hutchinson), its top eigenvalue (Lanczos), the noise stability
(:func:`nso_jax.hessian.noise_stability_measure`) and, given a reference
(fine-tuning), the per-layer :math:`v_l^\\top H_l v_l` with
:math:`v = W - W_{\\text{start}}`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax import hessian
from nso_jax.app import data as data_lib
from nso_jax.app import job
from nso_jax.app import report
from nso_jax.app.experiments.settings import check
from nso_jax.app.experiments.settings import count
from nso_jax.app.experiments.settings import positive
from nso_jax.app.experiments.settings import setting

METHODS: tuple[str, ...] = ("sgd", "sgd-long", "sam", "rwp", "nso", "nso-head")

TEST_FRACTION = 0.3
"""The digits' stratified test share, the main job's default."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Settings shared by the classification experiments.

  The training defaults are the main job's (``nso-jax train``): one learning
  rate, momentum, weight decay and batch size for every method, SAM's rho and
  the noise sigma fixed in advance, no per-method tuning.
  """

  optimizers: tuple[str, ...] = setting(
    ("sgd", "sgd-long", "sam", "rwp", "nso"),
    "comma-separated methods",
    choices=METHODS,
    unique=True,
  )
  seeds: int = count(5, "seeds 0 .. N-1 (mean ± std over them)", 64)
  epochs: int = count(60, "training epochs (sgd-long: 2k times more)", 10_000)
  hidden: tuple[int, ...] = setting(
    (128, 128),
    "hidden layer widths of the MLP",
    valid=lambda v: 1 <= v <= job.MAX_WIDTH,
    expect=f"an int in [1, {job.MAX_WIDTH}]",
  )
  batch_size: int = count(32, "mini-batch size", 100_000)
  learning_rate: float = positive(0.05, "SGD learning rate (all methods)", flag="--lr")
  momentum: float = setting(
    0.9, "SGD momentum", valid=lambda v: 0 <= v < 1, expect="a float in [0, 1)"
  )
  weight_decay: float = setting(
    5e-4, "weight decay", valid=lambda v: v >= 0, expect="a finite float >= 0"
  )
  sigma: float = positive(0.05, "NSO/RWP noise std")
  num_perturbations: int = count(1, "NSO pairs per step (k)", 64, flag="--k")
  rho: float = positive(0.05, "SAM radius")
  hessian_samples: int = count(1000, "training examples the measures use", 100_000)
  hessian_matvecs: int = count(100, "Hutchinson probes for tr(H)", 10_000)
  lanczos_steps: int = count(30, "Lanczos steps for the top eigenvalue", 1_000)
  ns_eps: float = positive(0.01, "noise-stability perturbation std (eps)")
  ns_draws: int = count(20, "noise-stability draws", 10_000)
  output: str = setting(
    "nso_experiments",
    "output folder",
    flag="--out",
    valid=bool,
    expect="a folder name",
  )
  plots: bool = setting(True, "skip the PNG plots")
  progress: bool = setting(True, "no progress bars")

  def __post_init__(self):
    check(self)


def job_config(settings: Settings, **overrides: Any) -> job.Config:
  """The main job's :class:`~nso_jax.app.job.Config` of these settings.

  Raises:
    SettingError: from the Config's own checks, naming a shared field.
  """
  fields = {field.name for field in dataclasses.fields(job.Config)}
  values = {
    name: getattr(settings, name)
    for name in fields
    if hasattr(settings, name) and name not in ("optimizers", "plots")
  }
  values.update(optimizers=("sgd",), test_fraction=TEST_FRACTION, plots=False)
  values.update(overrides)
  return job.Config(**values)


def head_name(config: job.Config) -> str:
  """The Flax name of the MLP's output layer."""
  return f"Dense_{len(config.hidden)}"


def method_plan(method: str, config: job.Config) -> dict[str, Any]:
  """How ``method`` trains: the job's optimizer, its Config, filter and label."""
  k = config.num_perturbations
  plan = {"optimizer": method, "config": config, "param_filter": None}
  if method == "sgd-long":
    epochs = config.epochs * 2 * k
    if epochs > job.SIZE_LIMITS["epochs"][0]:
      raise data_lib.SettingError(
        "epochs",
        f"times 2k = {2 * k} (sgd-long's epochs) must be at most "
        f"{job.SIZE_LIMITS['epochs'][0]:,}.",
        value=config.epochs,
      )
    plan.update(optimizer="sgd", config=dataclasses.replace(config, epochs=epochs))
    plan["label"] = f"SGD, {2 * k}x epochs"
  elif method == "rwp":
    plan["config"] = dataclasses.replace(config, num_perturbations=2 * k)
    plan["label"] = f"RWP, {2 * k} one-sided draws"
  elif method == "nso-head":
    head = head_name(config)
    plan.update(optimizer="nso", label="NSO, output layer only")
    plan["param_filter"] = lambda path, leaf: getattr(path[0], "key", None) == head
  else:
    plan["label"] = job.OPTIMIZER_LABELS[method]
  return plan


def check_methods(methods: tuple[str, ...], config: job.Config) -> None:
  """Builds every method's plan before training, so bad sizes stop it first."""
  for method in methods:
    method_plan(method, config)


def train_method(
  method: str,
  data: data_lib.Dataset,
  config: job.Config,
  progress: report.ProgressBars,
  safe_point: Callable[[], None],
  init_params: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
  """Trains ``method`` over all seeds; adds its compute to the record."""
  plan = method_plan(method, config)
  trained = job.train_optimizer(
    plan["optimizer"],
    data,
    plan["config"],
    progress,
    safe_point,
    init_params=init_params,
    param_filter=plan["param_filter"],
    label=plan["label"],
  )
  per_step = trained["gradient_evaluations_per_step"]
  steps = trained["steps_per_epoch"] * plan["config"].epochs
  trained.update(
    method=method,
    label=plan["label"],
    epochs=plan["config"].epochs,
    total_steps=steps,
    total_gradient_evaluations=per_step * steps,
  )
  return trained


def loss_function(model: job.MLP) -> Callable[[Any, Any], jax.Array]:
  """``loss(params, (x, y))``: the mean cross-entropy of ``model``."""

  def loss_fn(params, batch):
    return job.cross_entropy(model.apply({"params": params}, batch[0]), batch[1])

  return loss_fn


def make_measure(
  data: data_lib.Dataset, config: job.Config, settings: Settings
) -> Callable[[Any, jax.Array, Any], dict[str, Any]]:
  """``(params, key, reference) -> measures`` on the training loss.

  The loss is the mean cross-entropy over the first ``hessian_samples``
  training examples (with the labels the model was trained on); the
  measures include that loss and :math:`\\operatorname{tr}(H)` divided by it
  (near zero loss, the cross-entropy's Hessian shrinks with the loss, so a
  lower trace at a lower loss says less about the shape). With
  ``reference`` (``None`` for none), it adds the paper's per-layer
  :math:`v_l^\\top H_l v_l` and the whole :math:`v^\\top H v`, with
  :math:`v` = ``params - reference``, and the distance :math:`\\lVert v \\rVert`.
  """
  size = min(settings.hessian_samples, len(data.x_train))
  batch = (jnp.asarray(data.x_train[:size]), jnp.asarray(data.y_train[:size]))
  dim = job.parameter_count(config.hidden, data.x_train.shape[1], data.num_classes)
  measure = _compiled_measure(
    tuple(config.hidden),
    data.num_classes,
    settings.hessian_matvecs,
    min(settings.lanczos_steps, dim),
    settings.ns_eps,
    settings.ns_draws,
  )
  return lambda params, key, reference: measure(params, key, reference, batch)


@functools.cache
def _compiled_measure(
  hidden: tuple[int, ...],
  num_classes: int,
  matvecs: int,
  lanczos_steps: int,
  eps: float,
  draws: int,
) -> Callable[..., dict[str, Any]]:
  """The jitted measures of one model and settings, reused across data sets."""
  loss_fn = loss_function(job.MLP(hidden, num_classes))

  @jax.jit
  def measure(params, key, reference, batch):
    trace_key, eig_key, noise_key = jax.random.split(key, 3)
    trace = hessian.trace(loss_fn, params, batch, trace_key, num_matvecs=matvecs)
    top = hessian.top_eigenvalues(
      loss_fn, params, batch, eig_key, num_eigenvalues=1, num_steps=lanczos_steps
    )
    # Antithetic pairs: the same mean as one-sided draws, without the
    # first-order term's variance.
    stability = hessian.noise_stability_measure(
      loss_fn, params, batch, noise_key, eps=eps, num_draws=draws, antithetic=True
    )
    loss = loss_fn(params, batch)
    out = {
      "measured_loss": loss,
      "hessian_trace": trace.value,
      "hessian_trace_stderr": trace.stderr,
      "trace_per_loss": trace.value / loss,
      "top_eigenvalue": top[0],
      "noise_stability": stability.value,
      "noise_stability_stderr": stability.stderr,
    }
    if reference is not None:
      out["layer_measure"] = hessian.layer_hessian_measure(
        loss_fn, params, batch, reference
      )
      direction = jax.tree.map(jnp.subtract, params, reference)
      out["vHv"] = hessian.direction_curvature(loss_fn, params, batch, direction)
      out["distance"] = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(direction)))
    return out

  return measure


def seed_params(trained: dict[str, Any], seed: int) -> Any:
  """Seed ``seed``'s trained parameters."""
  return jax.tree.map(lambda x: x[seed], trained["states"].params)


def leaf_names(tree: Any) -> list[str]:
  """``"Dense_0/kernel"``-style names of a parameter tree's leaves."""
  return [
    "/".join(str(getattr(key, "key", key)) for key in path)
    for path, _ in jax.tree_util.tree_leaves_with_path(tree)
  ]


def measure_seeds(
  trained: dict[str, Any],
  measure: Callable[[Any, jax.Array, Any], dict[str, Any]],
  seeds: int,
  progress: report.ProgressBars,
  safe_point: Callable[[], None],
  reference: Callable[[int], Any] | None = None,
) -> dict[str, list[Any]]:
  """Every seed's measures: ``metric -> per-seed list`` (layers: name -> list)."""
  advance = progress.task(f"measure {trained['label']}", seeds)
  per_seed: dict[str, list[Any]] = {}
  for seed in range(seeds):
    params = seed_params(trained, seed)
    ref = None if reference is None else reference(seed)
    values = jax.block_until_ready(measure(params, jax.random.key(1000 + seed), ref))
    layers = values.pop("layer_measure", None)
    for name, value in values.items():
      per_seed.setdefault(name, []).append(float(value))
    if layers is not None:
      names = leaf_names(layers)
      for name, value in zip(names, jax.tree.leaves(layers), strict=True):
        per_seed.setdefault(f"vHv[{name}]", []).append(float(value))
    advance()
    safe_point()
  return per_seed


def accuracy_metrics(trained: dict[str, Any]) -> dict[str, list[Any]]:
  """Final and best-epoch test accuracy, the best epoch, the final train loss."""
  accuracy = np.asarray(trained["curves"]["test_accuracy"])
  return {
    "final_test_accuracy": accuracy[:, -1].tolist(),
    "best_test_accuracy": accuracy.max(axis=1).tolist(),
    "best_epoch": (accuracy.argmax(axis=1) + 1).tolist(),
    "final_train_loss": np.asarray(trained["curves"]["train_loss"])[:, -1].tolist(),
  }


def summarise(
  trained: dict[str, Any], per_seed: dict[str, list[Any]]
) -> dict[str, Any]:
  """One method's JSON row: compute, per-seed numbers, their mean ± std, curves."""
  return {
    "method": trained["method"],
    "label": trained["label"],
    "gradient_evaluations_per_step": trained["gradient_evaluations_per_step"],
    "steps_per_epoch": trained["steps_per_epoch"],
    "epochs": trained["epochs"],
    "total_steps": trained["total_steps"],
    "total_gradient_evaluations": trained["total_gradient_evaluations"],
    "train_seconds": trained["train_seconds"],
    "per_seed": per_seed,
    "summary": {name: report.mean_std(values) for name, values in per_seed.items()},
    "curves": {
      name: np.asarray(values).tolist()
      for name, values in trained["curves"].items()
      if name in ("test_accuracy", "train_loss")
    },
  }


def run_method(
  method: str,
  data: data_lib.Dataset,
  config: job.Config,
  settings: Settings,
  context: dict[str, Any],
  init_params: Callable[[int], Any] | None = None,
  extra: Callable[[dict[str, Any]], dict[str, list[Any]]] | None = None,
) -> dict[str, Any]:
  """Trains and measures one method; returns its row.

  ``context`` holds ``progress``, ``safe_point`` and ``measure``; with
  ``init_params`` the layer measure's reference is the starting point;
  ``extra(trained)`` adds per-seed metrics.
  """
  trained = train_method(
    method, data, config, context["progress"], context["safe_point"], init_params
  )
  per_seed = accuracy_metrics(trained)
  if extra is not None:
    per_seed.update(extra(trained))
  per_seed.update(
    measure_seeds(
      trained,
      context["measure"],
      settings.seeds,
      context["progress"],
      context["safe_point"],
      reference=init_params,
    )
  )
  return summarise(trained, per_seed)


def paired_differences(
  rows: list[dict[str, Any]], metrics: tuple[str, ...], baseline: str = "sgd"
) -> dict[str, dict[str, Any]]:
  """Each method minus ``baseline``, paired by seed, and the relative change.

  Returns:
    ``method -> metric -> {"difference": (mean, std), "relative": r}`` where
    the difference is over seeds (same seed, same data and start) and
    ``r = mean(method) / mean(baseline) - 1`` (``None`` unless the
    baseline's mean is positive); empty without the baseline.
  """
  by_method = {row["method"]: row for row in rows}
  if baseline not in by_method:
    return {}
  base = by_method[baseline]["per_seed"]
  out: dict[str, dict[str, Any]] = {}
  for row in rows:
    if row["method"] == baseline:
      continue
    out[row["method"]] = {}
    for metric in metrics:
      ours, theirs = np.asarray(row["per_seed"][metric]), np.asarray(base[metric])
      relative = ours.mean() / theirs.mean() - 1 if theirs.mean() > 0 else None
      out[row["method"]][metric] = {
        "difference": report.mean_std(ours - theirs),
        "relative": None if relative is None else float(relative),
      }
  return out
