"""The classification experiments' common settings and train-and-measure step.

``finetune``, ``label-noise`` and the sweeps train the methods of
:data:`~nso_jax.app.optimizers.METHODS` (matched in gradient evaluations,
:func:`~nso_jax.app.optimizers.method_plan`) with :func:`run_method`, which
trains a method over all seeds and measures each trained model on the
training loss (:mod:`nso_jax.app.measures`): the Hessian trace, its top
eigenvalue, the noise stability and, given a starting point (fine-tuning),
the per-layer :math:`v_l^\\top H_l v_l` with :math:`v = W - W_{\\text{start}}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from nso_jax.app import classifier
from nso_jax.app import measures
from nso_jax.app import optimizers
from nso_jax.app import output
from nso_jax.app import records
from nso_jax.app import settings as settings_lib
from nso_jax.app.data import Dataset
from nso_jax.app.interrupts import RunContext
from nso_jax.app.settings import Choices
from nso_jax.app.settings import Spec
from nso_jax.app.settings import setting

METHODS_SPEC = Spec(Choices(optimizers.METHODS), "comma-separated methods")

NOISY_LABEL_COLUMNS: list[output.Column] = [
  ("final_test_accuracy", "test acc. final (%)", output.fixed(2, 100)),
  ("best_test_accuracy", "test acc. best epoch (%)", output.fixed(2, 100)),
  ("memorised", "flipped labels fit (%)", output.fixed(1, 100)),
  ("final_train_loss", "train loss", output.fmt(3)),
  ("hessian_trace", "tr(H)", output.fmt(3)),
  ("trace_per_loss", "tr(H) / loss", output.fmt(3)),
  ("top_eigenvalue", "top eigenvalue", output.fmt(3)),
  ("noise_stability", "noise stability", output.fmt(3)),
]
"""The table of the experiments on flipped labels (``label-noise``, sweeps)."""


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Training):
  """Settings shared by the classification experiments.

  The training defaults are the main job's (``nso-jax train``): one learning
  rate, momentum, weight decay and batch size for every method, SAM's rho and
  the noise sigma fixed in advance, no per-method tuning.
  """

  optimizers: tuple[str, ...] = setting(
    ("sgd", "sgd-long", "sam", "rwp", "nso"), METHODS_SPEC
  )
  epochs: int = setting(60, help="training epochs (sgd-long: 2k times more)")
  hessian_samples: int = setting(1000)
  hessian_matvecs: int = setting(100)
  lanczos_steps: int = setting(30)
  ns_sigma: float = setting(0.01)
  ns_draws: int = setting(20)
  output: str = setting("nso_experiments")
  plots: bool = setting(True)
  progress: bool = setting(True)

  def measure_plan(self) -> measures.MeasurePlan:
    """What the experiments measure of each trained model."""
    return measures.MeasurePlan(
      hessian_matvecs=self.hessian_matvecs,
      lanczos_steps=self.lanczos_steps,
      noise_sigma=self.ns_sigma,
      noise_draws=self.ns_draws,
    )

  def measure(self, data: Dataset) -> Callable[[Any, Any, Any], measures.Curvature]:
    """The measures of a model trained on ``data``."""
    return measures.classifier_measure(
      data, self.hidden, self.hessian_samples, self.measure_plan()
    )

  def check_methods(self) -> None:
    """Plans every method before training, so that bad sizes stop it first.

    Raises:
      SettingError: naming the setting a method cannot use.
    """
    for method in self.optimizers:
      optimizers.method_plan(method, self)


def run_method(
  plan: optimizers.Plan,
  method: str,
  data: Dataset,
  settings: Settings,
  progress: output.ProgressBars,
  context: RunContext,
  *,
  init_params: Callable[[int], Any] | None = None,
  extra: Callable[[classifier.Trained], dict[str, list[float]]] | None = None,
) -> records.MethodResult:
  """Trains and measures one method; returns its row.

  Args:
    plan: how it trains.
    method: its name in the row.
    data: the data set.
    settings: the experiment's settings (seeds, measures).
    progress: where the progress bars go.
    context: the running experiment's safe points.
    init_params: ``seed -> starting parameters``; they are then also the
      layer measures' reference.
    extra: ``trained -> per-seed metrics`` to add to the row.
  """
  trained = classifier.train(
    plan, data, progress, context.safe_point, init_params=init_params
  )
  per_seed = measures.accuracy_metrics(trained.curves)
  if extra is not None:
    per_seed.update(extra(trained))
  curvatures = measures.measure_seeds(
    settings.measure(data),
    trained.params,
    settings.seeds,
    f"measure {plan.label}",
    progress,
    context.safe_point,
    reference=init_params,
  )
  per_seed.update(measures.curvature_metrics(curvatures))
  curves = trained.curves
  return records.MethodResult(
    method=method,
    label=plan.label,
    gradient_evaluations_per_step=trained.gradient_evaluations_per_step,
    steps_per_epoch=trained.steps_per_epoch,
    total_steps=trained.total_steps,
    train_seconds=trained.train_seconds,
    per_seed=per_seed,
    curves={
      "test_accuracy": curves.test_accuracy.tolist(),
      "train_loss": curves.train_loss.tolist(),
    },
    epochs=trained.epochs,
  )


def run_methods(
  data: Dataset,
  settings: Settings,
  progress: output.ProgressBars,
  context: RunContext,
  **options: Any,
) -> list[records.MethodResult]:
  """:func:`run_method` for each of ``settings.optimizers``, in order."""
  return [
    run_method(
      optimizers.method_plan(method, settings),
      method,
      data,
      settings,
      progress,
      context,
      **options,
    )
    for method in settings.optimizers
  ]


def comparison(
  rows: list[records.MethodResult], columns: list[output.Column]
) -> tuple[dict[str, Any], dict[str, str]]:
  """The rows against SGD: JSON-ready differences and the two tables.

  Returns:
    ``(versus_sgd, tables)``: the paired differences of every column's
    metric (:func:`~nso_jax.app.records.paired_differences`) and the tables
    ``results`` and ``versus_sgd``.
  """
  metrics = [metric for metric, _, _ in columns]
  differences = records.paired_differences(rows, metrics, baseline="sgd")
  labels = {row.method: row.label for row in rows}
  tables = {
    "results": output.method_table(rows, columns),
    "versus_sgd": output.differences_table(differences, labels, columns),
  }
  return records.differences_json(differences), tables
