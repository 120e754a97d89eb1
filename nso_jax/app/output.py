"""What the commands show and write: progress, tables, JSON, plots, files.

The output folder is checked before a command trains (:func:`prepare_output`);
the files are written all or nothing (:func:`write_outputs`, :func:`finish`);
tables are Markdown built from the typed records of
:mod:`nso_jax.app.records`; the plots use one lazily imported pyplot
(:func:`pyplot`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import secrets
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

import nso_jax
from nso_jax.app import interrupts
from nso_jax.app.interrupts import RunContext
from nso_jax.app.records import Difference
from nso_jax.app.records import MethodResult
from nso_jax.app.records import OptimizerResult
from nso_jax.app.settings import SettingError


class OutputError(SettingError):
  """An output folder or file that cannot be written, naming the setting."""

  separator = ": "


def _new_temporary_file(folder: str, name: str) -> str:
  """Creates an empty, hidden, uniquely named file in ``folder`` to write ``name`` to.

  Unlike :func:`tempfile.mkstemp` (which makes private files), the file gets
  the permissions an ordinary new file would, since it replaces ``name``.
  """
  path = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
  with open(path, "x"):
    pass
  return path


def prepare_output(folder: str, field: str = "output") -> None:
  """Creates ``folder`` if needed and checks that files can be written in it.

  Writability is tested the way the results are written: by creating (and
  removing) a temporary file inside it.

  Args:
    folder: the output folder.
    field: the setting that names it, for the error.

  Raises:
    OutputError: saying what is wrong and what to do.
  """
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise OutputError(
      field,
      f"{folder!r} exists and is not a folder; choose another path, or move "
      "the file away.",
    )
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as error:
    reason = error.strerror or str(error)
    if isinstance(error, (NotADirectoryError, FileExistsError)):
      reason += ": part of the path is a file, not a folder"
    raise OutputError(
      field,
      f"cannot create the folder {folder!r} ({reason}); choose a path where "
      "you can create folders.",
    ) from None
  try:
    os.remove(_new_temporary_file(folder, "write-test"))
  except OSError as error:
    raise OutputError(
      field,
      f"cannot write files in the folder {folder!r} "
      f"({error.strerror or error}); choose a folder you can write to, or "
      "change its permissions.",
    ) from None


class ProgressBars:
  """Rich progress bars, one per task, or silence when disabled.

  Use as a context manager; :meth:`task` adds a bar and returns the function
  that advances it.
  """

  def __init__(self, enabled: bool):
    self.enabled = enabled

  def __enter__(self) -> ProgressBars:
    if self.enabled:
      from rich import progress

      self._progress = progress.Progress(
        progress.TextColumn("{task.description:<34}"),
        progress.BarColumn(),
        progress.MofNCompleteColumn(),
        progress.TimeElapsedColumn(),
        transient=False,
      )
      self._progress.__enter__()
    return self

  def __exit__(self, *exc_info) -> None:
    if self.enabled:
      self._progress.__exit__(*exc_info)

  def task(self, description: str, total: int) -> Callable[..., None]:
    """Adds a bar of ``total`` steps; returns ``advance(steps=1)``."""
    if not self.enabled:
      return lambda advance=1: None
    task_id = self._progress.add_task(description, total=total)
    return lambda advance=1: self._progress.advance(task_id, advance)


def environment() -> dict[str, str]:
  """The versions and the device the results were computed with."""
  return {
    "jax": jax.__version__,
    "optax": optax.__version__,
    "nso_jax": nso_jax.__version__,
    "device": str(jax.devices()[0].device_kind),
    "backend": jax.default_backend(),
    "python": platform.python_version(),
  }


NONFINITE_NOTE = (
  "NaN or infinite values (a diverged run), written as null; field -> how many"
)
"""The note of the ``nonfinite`` entry :func:`strict_results` adds."""


def _finite(value: Any, path: str, found: dict[str, int]) -> Any:
  """``value`` with non-finite floats as ``None``, counted in ``found`` by field."""
  if isinstance(value, Mapping):
    return {
      key: _finite(item, f"{path}.{key}" if path else str(key), found)
      for key, item in value.items()
    }
  if isinstance(value, (list, tuple)):
    rows = any(isinstance(item, Mapping) for item in value)
    return [
      _finite(item, f"{path}[{index}]" if rows else path, found)
      for index, item in enumerate(value)
    ]
  if isinstance(value, (float, np.floating)) and not math.isfinite(value):
    found[path] = found.get(path, 0) + 1
    return None
  return value


def strict_results(results: Mapping[str, Any]) -> dict[str, Any]:
  """``results`` as strict JSON allows: every NaN or infinity becomes ``null``.

  When there are any, a ``nonfinite`` entry says so: ``{"note": ...,
  "fields": {field path: count}}`` (list positions of numbers left out of
  the path); :func:`nso_jax.app.cli.main` then warns and ends with status 3.
  """
  found: dict[str, int] = {}
  clean = _finite(results, "", found)
  if found:
    clean["nonfinite"] = {"note": NONFINITE_NOTE, "fields": found}
  return clean


def write_json(results: Mapping[str, Any], path: str) -> None:
  """Writes ``results`` to ``path`` as indented, strict JSON.

  Raises:
    ValueError: if ``results`` holds a NaN or an infinity (see
      :func:`strict_results`): strict readers refuse them.
  """
  with open(path, "w") as f:
    json.dump(results, f, indent=1, allow_nan=False)


def write_text(text: str, path: str) -> None:
  """Writes ``text`` to ``path``."""
  with open(path, "w") as f:
    f.write(text)


def write_outputs(
  writers: dict[str, Callable[[str], None]],
  folder: str,
  *,
  written: list[str] | None = None,
  field: str = "output",
) -> list[str]:
  """Writes files all or nothing: ``writers[name](path)`` writes file ``name``.

  Each file is first written under a temporary name in ``folder``, and only
  once all are written are they moved into place with :func:`os.replace`
  (atomic within a folder), in the order of ``writers`` (put the results
  file last). A failure or an interruption before then leaves the folder as
  it was; the temporary files are removed in every case. A Ctrl-C meanwhile
  waits for the files (:func:`nso_jax.app.interrupts.writing`).

  Args:
    writers: file name -> the function that writes it to a given path.
    folder: the output folder; it must exist.
    written: a list each path is appended to once the file is in place.
    field: the setting that names ``folder``, for the error.

  Returns:
    The paths written, in the order of ``writers``.

  Raises:
    OutputError: when a file cannot be written (a full disk, a folder removed
      or made read-only meanwhile).
  """
  names = list(writers)
  paths = [os.path.join(folder, name) for name in names]
  with interrupts.writing():  # an interruption waits for the files
    temporary: dict[str, str] = {}
    try:
      for name in names:
        temporary[name] = _new_temporary_file(folder, name)
      for name in names:
        writers[name](temporary[name])
      for name, path in zip(names, paths, strict=True):
        os.replace(temporary[name], path)
        del temporary[name]
        if written is not None:
          written.append(path)
    except OSError as error:
      raise OutputError(
        field,
        f"cannot write the results into {folder!r} ({error.strerror or error}); "
        f"{names[-1]} was not written; check the folder's free space and "
        "permissions, or choose another.",
      ) from None
    finally:
      for path in temporary.values():
        with contextlib.suppress(OSError):
          os.remove(path)
  return paths


def optimizer_table(rows: Sequence[OptimizerResult]) -> str:
  """``nso-jax train``'s rows as a Markdown table."""
  header = (
    "| optimizer | grads/step | test accuracy (%) | final train loss | "
    "tr(H) | tr(H) s.e. | top eigenvalue |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  )
  lines = [header]
  for row in rows:
    acc_mean, acc_std = row.test_accuracy
    loss_mean, loss_std = row.final_train_loss
    tr_mean, tr_std = row.hessian_trace
    eig_mean, eig_std = row.top_eigenvalue
    lines.append(
      f"| {row.label} | {row.gradient_evaluations_per_step} | "
      f"{100 * acc_mean:.2f} ± {100 * acc_std:.2f} | "
      f"{loss_mean:.4f} ± {loss_std:.4f} | {tr_mean:.3g} ± {tr_std:.2g} | "
      f"{row.hessian_trace_stderr:.2g} | {eig_mean:.3g} ± {eig_std:.2g} |"
    )
  return "\n".join(lines)


Column = tuple[str, str, Callable[[float], str]]
"""``(metric, header, format)`` of a table column."""


def fmt(digits: int = 3, scale: float = 1.0) -> Callable[[float], str]:
  """Formats ``value * scale`` with ``digits`` significant digits."""
  return lambda value: f"{value * scale:.{digits}g}"


def fixed(places: int, scale: float = 1.0) -> Callable[[float], str]:
  """Formats ``value * scale`` with ``places`` decimals."""
  return lambda value: f"{value * scale:.{places}f}"


def method_table(
  rows: Sequence[MethodResult], columns: Sequence[Column], compute: bool = True
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
    cells = [row.label]
    if compute:
      cells += [
        str(row.gradient_evaluations_per_step),
        f"{row.total_gradient_evaluations:,}",
      ]
    for metric, _, form in columns:
      mean, std = row.summary(metric)
      cells.append(f"{form(mean)} ± {form(std)}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def differences_table(
  differences: Mapping[str, Mapping[str, Difference]],
  labels: Mapping[str, str],
  columns: Sequence[Column],
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
      (mean, std), relative = metrics[metric]
      percent = "n/a" if relative is None else f"{100 * relative:+.1f}%"
      if relative is not None and relative > 9:
        percent = f"{relative + 1:.3g} times"
      cells.append(f"{form(mean)} ± {form(std)} ({percent})")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown_document(title: str, sections: Sequence[tuple[str, str]]) -> str:
  """A Markdown document: the title and ``(heading, body)`` sections."""
  parts = [f"# {title}", ""]
  for heading, body in sections:
    parts += [f"## {heading}", "", body.strip(), ""]
  return "\n".join(parts)


def finish(
  context: RunContext,
  folder: str,
  results: Mapping[str, Any],
  markdown: str,
  plots: Mapping[str, Callable[[str], None]],
) -> dict[str, Any]:
  """Writes an experiment's files and prints its tables and the paths.

  Writes ``plots`` (file name -> drawer; none if the results hold a NaN or
  an infinity), ``results.md`` and ``results.json`` (last), all or nothing
  (:func:`write_outputs`).

  Returns:
    ``results`` with the ``seconds`` taken and the ``environment``, as
    written to ``results.json`` (non-finite numbers as ``None``, listed
    under ``nonfinite``: see :func:`strict_results`).
  """
  document = strict_results(
    {**results, "seconds": context.seconds(), "environment": environment()}
  )
  # A diverged run's curves and bars cannot be drawn (nor be worth drawing).
  writers = {} if "nonfinite" in document else dict(plots)
  writers["results.md"] = lambda path: write_text(markdown, path)
  writers["results.json"] = lambda path: write_json(document, path)
  paths = write_outputs(writers, folder, written=context.written)
  context.printer(markdown)
  context.printer(f"wrote {', '.join(paths)} in {document['seconds']:.0f} s")
  return document


def pyplot() -> Any:
  """matplotlib's pyplot on the Agg backend, imported when first drawn."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save(fig: Any, path: str, dpi: int = 80) -> None:
  """Saves ``fig`` to ``path`` as a PNG and closes it."""
  plt = pyplot()
  try:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
  finally:
    plt.close(fig)


def draw_training_curves(rows: Sequence[OptimizerResult], path: str) -> None:
  """``nso-jax train``'s training loss and test accuracy per epoch, as a PNG."""
  plt = pyplot()
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for row in rows:
    for ax, key in ((ax_loss, "train_loss"), (ax_acc, "test_accuracy")):
      values = np.asarray(row.curves[key])
      epochs = np.arange(1, values.shape[1] + 1)
      ax.plot(epochs, values.mean(0), label=row.label)
      ax.fill_between(epochs, values.min(0), values.max(0), alpha=0.2)
  ax_loss.set(
    xlabel="epoch",
    ylabel="training loss (full training set)",
    yscale="log",
    title="Training loss (mean; band: min to max over seeds)",
  )
  ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
  ax_acc.legend()
  save(fig, path, dpi=120)


def draw_spectrum(rows: Sequence[OptimizerResult], path: str) -> None:
  """Seed 0's Hessian spectral density of each optimizer, as a PNG."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row in rows:
    density = row.spectral_density_seed0
    values = np.maximum(np.asarray(density["density"]), 1e-8)
    ax.semilogy(density["grid"], values, label=row.label)
  ax.set(
    xlabel="Hessian eigenvalue",
    ylabel="density",
    title="Hessian spectral density (SLQ, seed 0)",
    ylim=(1e-6, None),
  )
  ax.legend()
  save(fig, path, dpi=120)


def _as_floats(values: Any) -> np.ndarray:
  """A JSON list with ``None`` (not yet defined) as a float array with NaN."""
  return np.array(values, dtype=float)


def draw_curvature_during_training(rows: Sequence[OptimizerResult], path: str) -> None:
  """The Hessian's trace and relative gap after each epoch, per optimizer, as a PNG.

  NSO's free readings (solid) and the measurements of the other optimizers
  (dashed, dots) on the same axes; each line is the mean over seeds with a
  band of ± its standard error. A cross marks each trained model's
  Hutchinson trace (the mean over seeds) at the last epoch.
  """
  plt = pyplot()
  fig, (ax_trace, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
  for index, row in enumerate(rows):
    curvature = row.curvature_during_training
    if curvature is None:
      continue
    reads = curvature["source"] == "readings"
    style = {"ls": "-"} if reads else {"ls": "--", "marker": ".", "ms": 4}
    label = f"{row.label} ({'free readings' if reads else 'measured'})"
    epochs = np.asarray(curvature["epochs"])
    for ax, key in ((ax_trace, "trace"), (ax_gap, "relative_gap")):
      mean = _as_floats(curvature[f"{key}_mean"])
      stderr = _as_floats(curvature[f"{key}_mean_stderr"])
      ax.plot(epochs, mean, color=f"C{index}", label=label, lw=1.2, **style)
      ax.fill_between(
        epochs, mean - stderr, mean + stderr, color=f"C{index}", alpha=0.2
      )
    ax_trace.plot(epochs[-1], row.hessian_trace[0], "x", color=f"C{index}", ms=8, mew=2)
  sigma = next(
    (r.curvature_during_training["sigma"] for r in rows if r.curvature_during_training),
    None,
  )
  ax_trace.set(
    xlabel="epoch",
    ylabel="tr(H) = 2 gap / sigma^2" + ("" if sigma is None else f", sigma {sigma:g}"),
    yscale="log",
    title="tr(H) read during training, per optimizer",
  )
  ax_gap.set(
    xlabel="epoch",
    ylabel="gap / loss",
    yscale="log",
    title="Relative gap (band: ± standard error of the seed mean)",
  )
  ax_trace.legend(
    fontsize=8, title="x: Hutchinson tr(H) of the trained models", title_fontsize=8
  )
  save(fig, path, dpi=120)


def draw_landscape(
  lines: Mapping[str, Any],
  planes: Mapping[str, Any],
  labels: Mapping[str, str],
  path: str,
) -> None:
  """Seed 0's loss landscapes, as a PNG: 1-D slices, then 2-D contours.

  The first panel holds every model's 1-D landscape (log loss); one contour
  panel per model of ``planes`` follows, on shared levels. ``lines`` and
  ``planes`` map optimizer names to :class:`nso_jax.hessian.LossLandscape`;
  ``labels`` names them.
  """
  from nso_jax import hessian

  plt = pyplot()
  widths = [1.25] + [1.0] * len(planes)
  fig, axes = plt.subplots(
    1, len(widths), figsize=(5.2 + 4.4 * len(planes), 4.2), layout="constrained",
    gridspec_kw={"width_ratios": widths}, squeeze=False,
  )  # fmt: skip
  ax_line, *ax_planes = axes[0]
  hessian.plot_loss_landscape(
    list(lines.values()), ax_line, labels=[labels[name] for name in lines],
    log_scale=True, plot_kwargs={"marker": ".", "lw": 1.2},
  )  # fmt: skip
  ax_line.set(
    xlabel="a: step along one filter-normalised direction",
    ylabel="training loss (Hessian subset)",
    title="1-D slices (seed 0)",
  )
  if planes:
    hessian.plot_loss_landscape(
      list(planes.values()), ax_planes, labels=[labels[name] for name in planes],
      levels=16, log_scale=True,
    )  # fmt: skip
  fig.suptitle(
    "Loss landscapes along the same random filter-normalised directions "
    "(Li et al., 2018)",
    fontsize=10,
  )
  try:  # the constrained layout makes room for the colour bar
    fig.savefig(path, dpi=110, format="png")
  finally:
    plt.close(fig)


def draw_bars(
  rows: Sequence[MethodResult],
  panels: Sequence[tuple[str, str]],
  path: str,
  title: str = "",
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
    per_seed = [scale * np.asarray(row.per_seed[metric]) for row in rows]
    means = [values.mean() for values in per_seed]
    stds = [values.std(ddof=1) if values.size > 1 else 0.0 for values in per_seed]
    ax.bar(positions, means, yerr=stds, capsize=3, color=[f"C{i}" for i in positions])
    for i, values in enumerate(per_seed):
      ax.plot(np.full(len(values), i), values, "k.", markersize=3)
    ax.set_xticks(positions, [row.label for row in rows], rotation=35, ha="right")
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
"""The curves of the classification experiments: ``(key, label, log scale)``."""


def draw_curves(
  groups: Sequence[tuple[str, Sequence[MethodResult]]],
  path: str,
  curves: Sequence[tuple[str, str, bool]] = ACCURACY_CURVES,
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
      per_point = row.gradient_evaluations_per_step * row.steps_per_epoch
      # A longer run of a method shown too starts as it: dash it.
      style = "--" if row.method.endswith("-long") else "-"
      for line, (key, _, _) in enumerate(curves):
        values = np.asarray(row.curves[key])
        x = per_point * np.arange(1, values.shape[1] + 1)
        ax = axes[line, column]
        ax.plot(x, values.mean(0), style, color=f"C{index}", label=row.label, lw=1.2)
        ax.fill_between(x, values.min(0), values.max(0), color=f"C{index}", alpha=0.15)
    axes[0, column].set_title(title)
    for line, (_, label, log) in enumerate(curves):
      axes[line, column].set(ylabel=label, yscale="log" if log else "linear")
    axes[-1, column].set_xlabel("gradient evaluations")
  axes[0, 0].legend(fontsize=8)
  save(fig, path)


def draw_sweep(
  references: Sequence[MethodResult],
  rows: Sequence[MethodResult],
  name: str,
  panels: Sequence[tuple[str, str, bool]],
  path: str,
) -> None:
  """Each ``(metric, title, log scale)`` of ``panels`` against the swept value.

  NSO's rows as mean ± std against their ``swept_value`` (named ``name``;
  a log axis for ``sigma``), the references as horizontal bands.
  """
  plt = pyplot()
  fig, axes = plt.subplots(2, math.ceil(len(panels) / 2), figsize=(16, 7))
  x = [row.swept_value for row in rows]
  for ax, (metric, title, log) in zip(axes.ravel(), panels, strict=True):
    stats = [row.summary(metric) for row in rows]
    ax.errorbar(
      x, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
      label="NSO",
    )  # fmt: skip
    for index, ref in enumerate(references):
      mean, std = ref.summary(metric)
      color = f"C{index + 1}"
      ax.axhline(mean, color=color, ls="--", label=ref.label)
      ax.axhspan(mean - std, mean + std, color=color, alpha=0.15)
    ax.set(title=title, xlabel=name, xscale="log" if name == "sigma" else "linear")
    if name == "k":
      ax.set_xticks(x)
    if log:
      ax.set_yscale("log")
  axes[0, 0].legend(fontsize=8)
  save(fig, path)
