"""``sigma-sweep`` and ``k-sweep``: NSO's two settings, on digits with noisy labels.

Each NSO setting trains on the same data as ``label-noise`` at one noise
level (20% by default), next to plain SGD as the reference, and gets the
same measures. ``sigma-sweep`` varies the noise std at ``k`` fixed;
``k-sweep`` varies the pairs per step (``2k`` gradient evaluations) at
``sigma`` fixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nso_jax.app import job
from nso_jax.app import report
from nso_jax.app.experiments import classify
from nso_jax.app.experiments import label_noise
from nso_jax.app.experiments import output
from nso_jax.app.experiments.settings import setting

COLUMNS = label_noise.COLUMNS

PANELS = [
  ("final_test_accuracy", "test accuracy, final"),
  ("best_test_accuracy", "test accuracy, best epoch"),
  ("final_train_loss", "training loss (noisy labels)"),
  ("memorised", "flipped labels fit"),
  ("hessian_trace", "tr(H)"),
  ("trace_per_loss", "tr(H) / loss"),
  ("top_eigenvalue", "top eigenvalue"),
  ("noise_stability", "noise stability"),
]


@dataclasses.dataclass(frozen=True)
class SigmaSettings(classify.Settings):
  """Settings of ``sigma-sweep``."""

  optimizers: tuple[str, ...] = setting(
    ("sgd",),
    "reference methods, trained once",
    choices=classify.METHODS,
    unique=True,
  )
  sigmas: tuple[float, ...] = setting(
    (0.005, 0.01, 0.02, 0.05, 0.1, 0.2),
    "NSO noise stds",
    valid=lambda v: v > 0,
    expect="a finite float > 0",
    unique=True,
  )
  noise_level: float = setting(
    0.2,
    "share of training labels flipped",
    valid=lambda v: 0 <= v < 1,
    expect="a float in [0, 1)",
  )
  output: str = setting(
    "nso_experiments/sigma-sweep", "output folder", flag="--out", valid=bool
  )


@dataclasses.dataclass(frozen=True)
class KSettings(classify.Settings):
  """Settings of ``k-sweep``."""

  optimizers: tuple[str, ...] = setting(
    ("sgd",),
    "reference methods, trained once",
    choices=classify.METHODS,
    unique=True,
  )
  ks: tuple[int, ...] = setting(
    (1, 2, 3, 4),
    "NSO pairs per step",
    valid=lambda v: 1 <= v <= 64,
    expect="an int in [1, 64]",
    unique=True,
  )
  noise_level: float = setting(
    0.2,
    "share of training labels flipped",
    valid=lambda v: 0 <= v < 1,
    expect="a float in [0, 1)",
  )
  output: str = setting(
    "nso_experiments/k-sweep", "output folder", flag="--out", valid=bool
  )


def run_sigma(settings: SigmaSettings, context: dict[str, Any]) -> dict[str, Any]:
  """Runs ``sigma-sweep`` and writes its outputs (see
  :func:`nso_jax.app.experiments.run`)."""
  return _sweep(settings, context, "sigma", settings.sigmas)


def run_k(settings: KSettings, context: dict[str, Any]) -> dict[str, Any]:
  """Runs ``k-sweep`` and writes its outputs (see
  :func:`nso_jax.app.experiments.run`)."""
  return _sweep(settings, context, "num_perturbations", settings.ks)


def _sweep(settings, context, field: str, values) -> dict[str, Any]:
  config = classify.job_config(settings)
  configs = [
    classify.job_config(settings, **{field: value}) for value in values
  ]  # checks every value before training
  data, flipped = label_noise.noisy_digits(settings.noise_level)
  job.check_fits(config, data)
  classify.check_methods(settings.optimizers, config)
  report.prepare_output(settings.output)
  name = "sigma" if field == "sigma" else "k"
  with report.ProgressBars(settings.progress) as progress:
    context.update(progress=progress)
    context["measure"] = classify.make_measure(data, config, settings)
    extra = label_noise.memorisation(data, config, flipped)
    references = [
      classify.run_method(method, data, config, settings, context, extra=extra)
      for method in settings.optimizers
    ]
    rows = []
    for value, swept in zip(values, configs, strict=True):
      row = classify.run_method("nso", data, swept, settings, context, extra=extra)
      row.update(label=f"NSO {name}={value}", swept_value=value)
      rows.append(row)
  return _finish(settings, field, references, rows, data, context)


def _finish(settings, field, references, rows, data, context):
  name = "sigma" if field == "sigma" else "k"
  everything = references + rows
  table = output.table(everything, COLUMNS)
  results = {
    "experiment": f"{name}-sweep",
    "settings": output.settings_dict(settings),
    "data": {
      "name": data.name,
      "train_examples": len(data.x_train),
      "test_examples": len(data.x_test),
    },
    "swept": field,
    "references": references,
    "rows": rows,
    "table": table,
  }
  markdown = output.markdown_document(
    f"{name}-sweep: NSO on {data.name}",
    [("Results (mean ± std over seeds)", table)],
  )
  plots = {
    "sweep.png": lambda path: draw_sweep(references, rows, name, path),
    "curves.png": lambda path: output.draw_curves([(data.name, everything)], path),
  }
  return output.finish(settings, results, markdown, plots, context)


def draw_sweep(references, rows, name: str, path: str) -> None:
  """Each measure against the swept value, mean ± std; references as bands."""
  plt = output.pyplot()
  fig, axes = plt.subplots(2, 4, figsize=(16, 7))
  x = [row["swept_value"] for row in rows]
  for ax, (metric, title) in zip(axes.ravel(), PANELS, strict=True):
    means = [row["summary"][metric][0] for row in rows]
    stds = [row["summary"][metric][1] for row in rows]
    ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label="NSO")
    for index, ref in enumerate(references):
      mean, std = ref["summary"][metric]
      color = f"C{index + 1}"
      ax.axhline(mean, color=color, ls="--", label=ref["label"])
      ax.axhspan(mean - std, mean + std, color=color, alpha=0.15)
    ax.set(title=title, xlabel=name, xscale="log" if name == "sigma" else "linear")
    if name == "k":
      ax.set_xticks(x)
    if metric not in ("final_test_accuracy", "best_test_accuracy", "memorised"):
      ax.set_yscale("log")
  axes[0, 0].legend(fontsize=8)
  output.save(fig, path)
