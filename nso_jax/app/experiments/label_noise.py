"""``label-noise``: digits with a share of the training labels flipped.

The test labels stay clean. With enough epochs every method memorises the
flipped labels, so the final test accuracy and the best-epoch test accuracy
(the maximum over epochs, an oracle: the epoch is chosen on the test set)
are both reported, with how many flipped training labels each final model
fits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax.app import data as data_lib
from nso_jax.app import job
from nso_jax.app import report
from nso_jax.app.experiments import classify
from nso_jax.app.experiments import output
from nso_jax.app.experiments.finetune import flip_labels
from nso_jax.app.experiments.settings import setting

COLUMNS: list[output.Column] = [
  ("final_test_accuracy", "test acc. final (%)", output.fixed(2, 100)),
  ("best_test_accuracy", "test acc. best epoch (%)", output.fixed(2, 100)),
  ("memorised", "flipped labels fit (%)", output.fixed(1, 100)),
  ("final_train_loss", "train loss", output.fmt(3)),
  ("hessian_trace", "tr(H)", output.fmt(3)),
  ("trace_per_loss", "tr(H) / loss", output.fmt(3)),
  ("top_eigenvalue", "top eigenvalue", output.fmt(3)),
  ("noise_stability", "noise stability", output.fmt(3)),
]


@dataclasses.dataclass(frozen=True)
class Settings(classify.Settings):
  """Settings of ``label-noise``."""

  noise_levels: tuple[float, ...] = setting(
    (0.2, 0.4),
    "shares of training labels flipped",
    valid=lambda v: 0 <= v < 1,
    expect="a float in [0, 1)",
    unique=True,
  )
  output: str = setting(
    "nso_experiments/label-noise", "output folder", flag="--out", valid=bool
  )


def noisy_digits(level: float) -> tuple[data_lib.Dataset, np.ndarray]:
  """The digits with ``level`` of the training labels flipped; the flip mask."""
  digits = data_lib.load_digits(classify.TEST_FRACTION)
  rng = np.random.default_rng(round(1000 * level))
  noisy = flip_labels(digits.y_train, level, digits.num_classes, rng)
  name = f"digits, {100 * level:g}% of training labels flipped"
  return dataclasses.replace(digits, name=name, y_train=noisy), noisy != digits.y_train


def memorisation(data: data_lib.Dataset, config: job.Config, flipped: np.ndarray):
  """``trained -> {"memorised": ..., "clean_fit": ...}`` per seed.

  ``memorised``: the share of flipped training examples the final model
  predicts as their (wrong) training label; ``clean_fit``: the training
  accuracy on the unflipped ones.
  """
  model = job.MLP(tuple(config.hidden), data.num_classes)
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  mask = jnp.asarray(flipped)

  @jax.jit
  @jax.vmap
  def fit(params):
    right = jnp.argmax(model.apply({"params": params}, x), -1) == y
    memorised = jnp.sum(right & mask) / jnp.maximum(jnp.sum(mask), 1)
    clean = jnp.sum(right & ~mask) / jnp.maximum(jnp.sum(~mask), 1)
    return memorised, clean

  def extra(trained: dict[str, Any]) -> dict[str, list[Any]]:
    memorised, clean = fit(trained["states"].params)
    return {
      "memorised": np.asarray(memorised).tolist(),
      "clean_fit": np.asarray(clean).tolist(),
    }

  return extra


def run(settings: Settings, context: dict[str, Any]) -> dict[str, Any]:
  """Runs ``label-noise`` and writes its outputs (see
  :func:`nso_jax.app.experiments.run`)."""
  config = classify.job_config(settings)
  levels = [(level, *noisy_digits(level)) for level in settings.noise_levels]
  for _, data, _ in levels:
    job.check_fits(config, data)
  classify.check_methods(settings.optimizers, config)
  report.prepare_output(settings.output)
  context["data"] = {
    "name": "scikit-learn digits, test labels clean",
    "train_examples": len(levels[0][1].x_train),
    "test_examples": len(levels[0][1].x_test),
    "flipped_examples": {f"{level:g}": int(mask.sum()) for level, _, mask in levels},
    "measured_on": f"{min(settings.hessian_samples, len(levels[0][1].x_train))} "
    "training examples, with their (noisy) training labels",
  }
  groups = []
  with report.ProgressBars(settings.progress) as progress:
    context.update(progress=progress)
    for level, data, flipped in levels:
      context["printer"](f"{data.name}: {int(flipped.sum())} of {len(flipped)}")
      context["measure"] = classify.make_measure(data, config, settings)
      extra = memorisation(data, config, flipped)
      rows = [
        classify.run_method(method, data, config, settings, context, extra=extra)
        for method in settings.optimizers
      ]
      groups.append((level, rows))
  return _finish(settings, groups, context)


def _finish(settings, groups, context):
  metrics = tuple(metric for metric, _, _ in COLUMNS)
  sections, levels = [], []
  for level, rows in groups:
    differences = classify.paired_differences(rows, metrics)
    labels = {row["method"]: row["label"] for row in rows}
    tables = {
      "results": output.table(rows, COLUMNS),
      "versus_sgd": output.differences_table(differences, labels, COLUMNS),
    }
    levels.append(
      {"noise_level": level, "rows": rows, "versus_sgd": differences, "tables": tables}
    )
    sections += [
      (f"{100 * level:g}% flipped labels (mean ± std over seeds)", tables["results"]),
      (f"{100 * level:g}% flipped labels: against SGD", tables["versus_sgd"]),
    ]
  results = {
    "experiment": "label-noise",
    "settings": output.settings_dict(settings),
    "data": context["data"],
    "levels": levels,
  }
  markdown = output.markdown_document("label-noise: digits, flipped labels", sections)
  titles = [(f"{100 * level:g}% flipped", rows) for level, rows in groups]
  panels = [(metric, header) for metric, header, _ in COLUMNS]
  plots = {"curves.png": lambda path: output.draw_curves(titles, path)}
  for level, rows in groups:
    name = f"{100 * level:g}".replace(".", "p")
    plots[f"measures_{name}.png"] = lambda path, rows=rows, level=level: (
      output.draw_bars(
        rows, panels, path, f"{100 * level:g}% of training labels flipped"
      )
    )
  return output.finish(settings, results, markdown, plots, context)
