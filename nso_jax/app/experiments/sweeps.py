"""``sigma-sweep`` and ``k-sweep``: NSO's two settings, on digits with noisy labels.

Each NSO setting trains on the same data as ``label-noise`` at one noise
level (20% by default), next to plain SGD as the reference, and gets the
same measures. ``sigma-sweep`` varies the noise std at ``k`` fixed;
``k-sweep`` varies the pairs per step (``2k`` gradient evaluations) at
``sigma`` fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from nso_jax.app import classifier
from nso_jax.app import data as data_lib
from nso_jax.app import measures
from nso_jax.app import optimizers
from nso_jax.app import output
from nso_jax.app import settings as settings_lib
from nso_jax.app.experiments import classify
from nso_jax.app.interrupts import RunContext
from nso_jax.app.records import MethodResult
from nso_jax.app.settings import SHARE
from nso_jax.app.settings import SPECS
from nso_jax.app.settings import Spec
from nso_jax.app.settings import Values
from nso_jax.app.settings import setting

COLUMNS = classify.NOISY_LABEL_COLUMNS

PANELS = [
  ("final_test_accuracy", "test accuracy, final", False),
  ("best_test_accuracy", "test accuracy, best epoch", False),
  ("final_train_loss", "training loss (noisy labels)", True),
  ("memorised", "flipped labels fit", False),
  ("hessian_trace", "tr(H)", True),
  ("trace_per_loss", "tr(H) / loss", True),
  ("top_eigenvalue", "top eigenvalue", True),
  ("noise_stability", "noise stability", True),
]
"""``(metric, title, log scale)`` of the sweep plot's panels."""

REFERENCES_SPEC = Spec(
  settings_lib.Choices(optimizers.METHODS), "reference methods, trained once"
)


@dataclasses.dataclass(frozen=True)
class SweepSettings(classify.Settings):
  """Settings shared by the sweeps: the references and the flipped share."""

  optimizers: tuple[str, ...] = setting(("sgd",), REFERENCES_SPEC)
  noise_level: float = setting(0.2, Spec(SHARE, "share of training labels flipped"))

  def swept(self) -> tuple[str, tuple[Any, ...]]:
    """The swept field and its values."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SigmaSettings(SweepSettings):
  """Settings of ``sigma-sweep``."""

  output: str = setting("nso_experiments/sigma-sweep")
  sigmas: tuple[float, ...] = setting(
    (0.005, 0.01, 0.02, 0.05, 0.1, 0.2),
    Spec(Values(SPECS["sigma"].rule), "NSO noise stds"),
  )

  def swept(self) -> tuple[str, tuple[Any, ...]]:
    return "sigma", self.sigmas


@dataclasses.dataclass(frozen=True)
class KSettings(SweepSettings):
  """Settings of ``k-sweep``."""

  output: str = setting("nso_experiments/k-sweep")
  ks: tuple[int, ...] = setting(
    (1, 2, 3, 4), Spec(Values(SPECS["num_perturbations"].rule), "NSO pairs per step")
  )

  def swept(self) -> tuple[str, tuple[Any, ...]]:
    return "num_perturbations", self.ks


def run(settings: SweepSettings, context: RunContext) -> dict[str, Any]:
  """Runs ``sigma-sweep`` or ``k-sweep`` and writes its outputs (see
  :func:`nso_jax.app.experiments.run`)."""
  field, values = settings.swept()
  # Every value's settings are checked before training.
  swept = [dataclasses.replace(settings, **{field: value}) for value in values]
  data, flipped = data_lib.noisy_digits(settings.noise_level)
  classifier.check_fits(settings, data)
  settings.check_methods()
  output.prepare_output(settings.output)
  name = "sigma" if field == "sigma" else "k"
  with output.ProgressBars(settings.progress) as progress:
    extra = measures.label_fit(data, settings.hidden, flipped)
    references = classify.run_methods(data, settings, progress, context, extra=extra)
    rows = []
    for value, training in zip(values, swept, strict=True):
      plan = optimizers.method_plan("nso", training)
      row = classify.run_method(
        plan, "nso", data, settings, progress, context, extra=extra
      )
      rows.append(
        dataclasses.replace(row, label=f"NSO {name}={value}", swept_value=value)
      )
  return _finish(settings, field, references, rows, data, context)


def _finish(
  settings: SweepSettings,
  field: str,
  references: Sequence[MethodResult],
  rows: Sequence[MethodResult],
  data: data_lib.Dataset,
  context: RunContext,
) -> dict[str, Any]:
  name = "sigma" if field == "sigma" else "k"
  everything = [*references, *rows]
  table = output.method_table(everything, COLUMNS)
  results = {
    "experiment": f"{name}-sweep",
    "settings": settings_lib.as_json(settings),
    "data": {
      "name": data.name,
      "train_examples": len(data.x_train),
      "test_examples": len(data.x_test),
    },
    "swept": field,
    "references": [row.to_json() for row in references],
    "rows": [row.to_json() for row in rows],
    "table": table,
  }
  markdown = output.markdown_document(
    f"{name}-sweep: NSO on {data.name}",
    [("Results (mean ± std over seeds)", table)],
  )
  plots = {
    "sweep.png": lambda path: output.draw_sweep(references, rows, name, PANELS, path),
    "curves.png": lambda path: output.draw_curves([(data.name, everything)], path),
  }
  return output.finish(
    context, settings.output, results, markdown, plots if settings.plots else {}
  )
