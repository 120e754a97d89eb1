"""What the experiments write: Markdown tables, plots, and the files themselves.

Rows are the JSON rows the experiments build: ``label``, compute fields,
``per_seed`` (metric -> list over seeds) and ``summary`` (metric ->
``(mean, std)``). Files are written all or nothing
(:func:`nso_jax.app.report.write_outputs`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nso_jax.app import report

Column = tuple[str, str, Callable[[float], str]]
"""``(metric, header, format)`` of a table column."""


def fmt(digits: int = 3, scale: float = 1.0) -> Callable[[float], str]:
  """Formats ``value * scale`` with ``digits`` significant digits."""
  return lambda value: f"{value * scale:.{digits}g}"


def fixed(places: int, scale: float = 1.0) -> Callable[[float], str]:
  """Formats ``value * scale`` with ``places`` decimals."""
  return lambda value: f"{value * scale:.{places}f}"


def cell(row: dict[str, Any], metric: str, form: Callable[[float], str]) -> str:
  """``mean ± std`` of ``metric`` in ``row``."""
  mean, std = row["summary"][metric]
  return f"{form(mean)} ± {form(std)}"


def table(
  rows: list[dict[str, Any]], columns: list[Column], compute: bool = True
) -> str:
  """A Markdown table: a row per method, ``mean ± std`` per column.

  With ``compute``, the first columns are the method's gradient evaluations
  per step and in total (per seed).
  """
  headers = ["method"]
  if compute:
    headers += ["grads/step", "grads (total)"]
  headers += [header for _, header, _ in columns]
  lines = [
    "| " + " | ".join(headers) + " |",
    "| --- | " + " | ".join("---:" for _ in headers[1:]) + " |",
  ]
  for row in rows:
    cells = [row["label"]]
    if compute:
      cells += [
        str(row["gradient_evaluations_per_step"]),
        f"{row['total_gradient_evaluations']:,}",
      ]
    cells += [cell(row, metric, form) for metric, _, form in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def differences_table(
  differences: dict[str, dict[str, Any]],
  labels: dict[str, str],
  columns: list[Column],
  baseline: str = "SGD",
) -> str:
  """A Markdown table of each method minus the baseline, paired by seed.

  Each cell is the mean ± std over seeds of the difference, then the change
  of the means in percent (their ratio, past ten times).
  """
  headers = ["method", *(f"Δ {header}" for _, header, _ in columns)]
  lines = [
    f"Paired by seed, method minus {baseline}: mean ± std of the difference "
    "(change of the means in %).",
    "",
    "| " + " | ".join(headers) + " |",
    "| --- | " + " | ".join("---:" for _ in headers[1:]) + " |",
  ]
  for method, metrics in differences.items():
    cells = [labels[method]]
    for metric, _, form in columns:
      (mean, std), relative = metrics[metric]["difference"], metrics[metric]["relative"]
      percent = "n/a" if relative is None else f"{100 * relative:+.1f}%"
      if relative is not None and relative > 9:
        percent = f"{relative + 1:.3g} times"
      cells.append(f"{form(mean)} ± {form(std)} ({percent})")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def settings_dict(settings: Any) -> dict[str, Any]:
  """The settings as JSON-ready values."""
  return {
    name: list(value) if isinstance(value, tuple) else value
    for name, value in dataclasses.asdict(settings).items()
  }


def markdown_document(title: str, sections: list[tuple[str, str]]) -> str:
  """A Markdown document: the title and ``(heading, body)`` sections."""
  parts = [f"# {title}", ""]
  for heading, body in sections:
    parts += [f"## {heading}", "", body.strip(), ""]
  return "\n".join(parts)


def write(
  folder: str,
  results: dict[str, Any],
  markdown: str,
  plots: dict[str, Callable[[str], None]],
  written: list[str],
) -> list[str]:
  """Writes the plots, ``results.md`` and ``results.json`` (last), all or nothing."""
  writers = dict(plots)
  writers["results.md"] = lambda path: _write_text(markdown, path)
  writers["results.json"] = lambda path: report.write_json(results, path)
  return report.write_outputs(writers, folder, written=written)


def _write_text(text: str, path: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def finish(
  settings: Any,
  results: dict[str, Any],
  markdown: str,
  plots: dict[str, Callable[[str], None]],
  context: dict[str, Any],
) -> dict[str, Any]:
  """Writes an experiment's outputs and prints its tables and the paths."""
  results["seconds"] = time.perf_counter() - context["start"]
  results["environment"] = report.environment()
  paths = write(
    settings.output,
    results,
    markdown,
    plots if settings.plots else {},
    context["written"],
  )
  context["printer"](markdown)
  context["printer"](f"wrote {', '.join(paths)} in {results['seconds']:.0f} s")
  return results


def pyplot():
  """matplotlib's pyplot on the Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save(fig: Any, path: str) -> None:
  """Saves ``fig`` to ``path`` as a small PNG and closes it."""
  plt = pyplot()
  try:
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
  finally:
    plt.close(fig)


def draw_bars(
  rows: list[dict[str, Any]], panels: list[tuple[str, str]], path: str, title: str = ""
) -> None:
  """Bars of mean ± std per method, one panel per ``(metric, title)``, seeds as dots."""
  plt = pyplot()
  columns = min(len(panels), 3)
  lines = math.ceil(len(panels) / columns)
  fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines))
  axes = np.atleast_1d(axes).ravel()
  positions = np.arange(len(rows))
  for ax, (metric, name) in zip(axes, panels, strict=False):
    scale = 100.0 if "(%)" in name else 1.0
    per_seed = [scale * np.asarray(row["per_seed"][metric]) for row in rows]
    means = [values.mean() for values in per_seed]
    stds = [values.std(ddof=1) if values.size > 1 else 0.0 for values in per_seed]
    ax.bar(positions, means, yerr=stds, capsize=3, color=[f"C{i}" for i in positions])
    for i, values in enumerate(per_seed):
      ax.plot(np.full(len(values), i), values, "k.", markersize=3)
    ax.set_xticks(positions, [row["label"] for row in rows], rotation=35, ha="right")
    ax.set_title(name, fontsize=10)
    low = min(values.min() for values in per_seed)
    high = max(values.max() for values in per_seed)
    if low > 0 and high / low < 1.5:
      span = high - low or abs(high) * 0.01
      ax.set_ylim(low - 0.5 * span, high + 0.5 * span)
  for ax in axes[len(panels) :]:
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=11)
  save(fig, path)


ACCURACY_CURVES = (
  ("test_accuracy", "test accuracy", False),
  ("train_loss", "training loss (training labels)", True),
)


def draw_curves(
  groups: list[tuple[str, list[dict[str, Any]]]],
  path: str,
  curves: tuple[tuple[str, str, bool], ...] = ACCURACY_CURVES,
) -> None:
  """Curves against the gradient evaluations spent (per seed).

  One column per ``(title, rows)`` group and one line of panels per
  ``(key, label, log scale)`` in ``curves``; each curve is the mean over
  seeds with a min-max band. A row's curve has a point every
  ``steps_per_epoch`` steps.
  """
  plt = pyplot()
  fig, axes = plt.subplots(
    len(curves),
    len(groups),
    figsize=(5.5 * len(groups), 3.5 * len(curves)),
    squeeze=False,
    sharex="col",
  )
  for column, (title, rows) in enumerate(groups):
    for index, row in enumerate(rows):
      per_point = row["gradient_evaluations_per_step"] * row["steps_per_epoch"]
      for line, (key, _, _) in enumerate(curves):
        values = np.asarray(row["curves"][key])
        x = per_point * np.arange(1, values.shape[1] + 1)
        ax = axes[line, column]
        # A longer run of a method shown too starts as it: dash it.
        style = "--" if row.get("method", "").endswith("-long") else "-"
        ax.plot(x, values.mean(0), style, color=f"C{index}", label=row["label"], lw=1.2)
        ax.fill_between(x, values.min(0), values.max(0), color=f"C{index}", alpha=0.15)
    axes[0, column].set_title(title)
    for line, (_, label, log) in enumerate(curves):
      axes[line, column].set(ylabel=label, yscale="log" if log else "linear")
    axes[-1, column].set_xlabel("gradient evaluations")
  axes[0, 0].legend(fontsize=8)
  save(fig, path)
