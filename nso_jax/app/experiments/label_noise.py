"""``label-noise``: digits with a share of the training labels flipped.

The test labels stay clean. With enough epochs every method memorises the
flipped labels, so the final test accuracy and the best-epoch test accuracy
(the maximum over epochs, an oracle: the epoch is chosen on the test set)
are both reported, with how many flipped training labels each final model
fits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from nso_jax.app import classifier
from nso_jax.app import data as data_lib
from nso_jax.app import measures
from nso_jax.app import output
from nso_jax.app import settings as settings_lib
from nso_jax.app.experiments import classify
from nso_jax.app.interrupts import RunContext
from nso_jax.app.records import MethodResult
from nso_jax.app.settings import SHARE
from nso_jax.app.settings import Spec
from nso_jax.app.settings import Values
from nso_jax.app.settings import setting

COLUMNS = classify.NOISY_LABEL_COLUMNS


@dataclasses.dataclass(frozen=True)
class Settings(classify.Settings):
  """Settings of ``label-noise``."""

  output: str = setting("nso_experiments/label-noise")
  noise_levels: tuple[float, ...] = setting(
    (0.2, 0.4), Spec(Values(SHARE), "shares of training labels flipped")
  )


def run(settings: Settings, context: RunContext) -> dict[str, Any]:
  """Runs ``label-noise`` and writes its outputs (see
  :func:`nso_jax.app.experiments.run`)."""
  levels = [(level, *data_lib.noisy_digits(level)) for level in settings.noise_levels]
  for _, data, _ in levels:
    classifier.check_fits(settings, data)
  settings.check_methods()
  output.prepare_output(settings.output)
  first = levels[0][1]
  about = {
    "name": "scikit-learn digits, test labels clean",
    "train_examples": len(first.x_train),
    "test_examples": len(first.x_test),
    "flipped_examples": {f"{level:g}": int(mask.sum()) for level, _, mask in levels},
    "measured_on": f"{min(settings.hessian_samples, len(first.x_train))} "
    "training examples, with their (noisy) training labels",
  }
  groups = []
  with output.ProgressBars(settings.progress) as progress:
    for level, data, flipped in levels:
      context.printer(f"{data.name}: {int(flipped.sum())} of {len(flipped)}")
      extra = measures.label_fit(data, settings.hidden, flipped)
      rows = classify.run_methods(data, settings, progress, context, extra=extra)
      groups.append((level, rows))
  return _finish(settings, groups, about, context)


def _finish(
  settings: Settings,
  groups: list[tuple[float, list[MethodResult]]],
  about: dict[str, Any],
  context: RunContext,
) -> dict[str, Any]:
  sections, levels = [], []
  for level, rows in groups:
    versus_sgd, tables = classify.comparison(rows, COLUMNS)
    levels.append(
      {
        "noise_level": level,
        "rows": [row.to_json() for row in rows],
        "versus_sgd": versus_sgd,
        "tables": tables,
      }
    )
    sections += [
      (f"{100 * level:g}% flipped labels (mean ± std over seeds)", tables["results"]),
      (f"{100 * level:g}% flipped labels: against SGD", tables["versus_sgd"]),
    ]
  results = {
    "experiment": "label-noise",
    "settings": settings_lib.as_json(settings),
    "data": about,
    "levels": levels,
  }
  markdown = output.markdown_document("label-noise: digits, flipped labels", sections)
  titles = [(f"{100 * level:g}% flipped", rows) for level, rows in groups]
  panels = [(metric, header) for metric, header, _ in COLUMNS]
  plots: dict[str, Callable[[str], None]] = {
    "curves.png": lambda path: output.draw_curves(titles, path)
  }
  for level, rows in groups:
    name = f"{100 * level:g}".replace(".", "p")
    plots[f"measures_{name}.png"] = functools.partial(
      output.draw_bars,
      rows,
      panels,
      title=f"{100 * level:g}% of training labels flipped",
    )
  return output.finish(
    context, settings.output, results, markdown, plots if settings.plots else {}
  )
