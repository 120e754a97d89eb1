"""What the main job shows and writes: progress bars, summaries, tables, plots.

The output folder is checked before the job trains (:func:`prepare_output`),
and the outputs are written all or nothing (:func:`write_results`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import nso_jax
from nso_jax.app import data as data_lib


class OutputError(data_lib.SettingError):
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


def mean_std(values) -> tuple[float, float]:
  """The mean and the sample standard deviation (0 for a single value)."""
  values = np.asarray(values, dtype=np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return float(values.mean()), std


def summarise(
  name: str, label: str, trained: dict[str, Any], curvature: dict[str, Any]
) -> dict[str, Any]:
  """One optimizer's results row: accuracy, loss, curvature, curves, density.

  Args:
    name: the optimizer's short name, e.g. ``"nso"``.
    label: its name in tables and plots.
    trained: the training record (curves, gradient evaluations, time).
    curvature: the per-seed Hessian measurements and seed 0's density.

  Returns:
    A JSON-ready dict; ``(mean, std)`` pairs are over seeds.
  """
  curves = trained["curves"]
  accuracy = curves["test_accuracy"][:, -1]
  trace_mean, trace_std = mean_std(curvature["trace"])
  # Standard error of the seed-mean from the Hutchinson errors alone.
  stderr = float(np.sqrt(np.sum(np.square(curvature["trace_stderr"])))) / len(
    curvature["trace"]
  )
  return {
    "optimizer": name,
    "label": label,
    "gradient_evaluations_per_step": trained["gradient_evaluations_per_step"],
    "test_accuracy": mean_std(accuracy),
    "test_accuracy_per_seed": accuracy.tolist(),
    "final_train_loss": mean_std(curves["train_loss"][:, -1]),
    "hessian_trace": (trace_mean, trace_std),
    "hessian_trace_stderr": stderr,
    "hessian_trace_per_seed": curvature["trace"],
    "hessian_trace_stderr_per_seed": curvature["trace_stderr"],
    "top_eigenvalue": mean_std(curvature["top_eigenvalue"]),
    "top_eigenvalue_per_seed": curvature["top_eigenvalue"],
    "train_seconds": trained["train_seconds"],
    "curves": {key: value.tolist() for key, value in curves.items()},
    "spectral_density_seed0": {
      "grid": np.asarray(curvature["density"].grid).tolist(),
      "density": np.asarray(curvature["density"].density).tolist(),
    },
  }


def format_table(rows: list[dict[str, Any]]) -> str:
  """The results rows as a Markdown table."""
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


def write_json(results: dict[str, Any], path: str) -> None:
  """Writes ``results`` to ``path`` as indented JSON."""
  with open(path, "w") as f:
    json.dump(results, f, indent=1)


def write_results(
  results: dict[str, Any],
  rows: list[dict[str, Any]],
  folder: str,
  *,
  plots: bool = True,
  written: list[str] | None = None,
  field: str = "output",
) -> list[str]:
  """Writes ``curves.png`` and ``spectrum.png`` (if ``plots``) and ``results.json``.

  All or nothing, as :func:`write_outputs` writes.

  Args:
    results: the JSON-ready results.
    rows: the results rows, as :func:`summarise` makes them, for the plots.
    folder: the output folder; it must exist.
    plots: whether to draw the plots.
    written: a list each path is appended to once the file is in place.
    field: the setting that names ``folder``, for the error.

  Returns:
    The paths written, ``results.json`` last.

  Raises:
    OutputError: when a file cannot be written (a full disk, a folder removed
      or made read-only meanwhile).
  """
  writers: dict[str, Callable[[str], None]] = {}
  if plots:
    writers["curves.png"] = lambda path: draw_curves(rows, path)
    writers["spectrum.png"] = lambda path: draw_spectrum(rows, path)
  writers["results.json"] = lambda path: write_json(results, path)
  return write_outputs(writers, folder, written=written, field=field)


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
  it was; the temporary files are removed in every case.

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


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def draw_curves(rows: list[dict[str, Any]], path: str) -> None:
  """Draws the training loss and test accuracy curves to ``path`` as a PNG.

  Args:
    rows: the results rows, as :func:`summarise` makes them.
    path: the file to write.
  """
  plt = _pyplot()
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
  try:
    fig.savefig(path, dpi=120, format="png")
  finally:
    plt.close(fig)


def draw_spectrum(rows: list[dict[str, Any]], path: str) -> None:
  """Draws seed 0's Hessian spectral density of each optimizer to ``path`` as a PNG.

  Args:
    rows: the results rows, as :func:`summarise` makes them.
    path: the file to write.
  """
  plt = _pyplot()
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
  try:
    fig.savefig(path, dpi=120, format="png")
  finally:
    plt.close(fig)
