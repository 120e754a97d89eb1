"""The results the commands report, as typed records, and their statistics.

:class:`OptimizerResult` is a row of ``nso-jax train``; :class:`MethodResult`
a row of an experiment. Both become JSON with ``to_json``; statistics over
seeds are :func:`mean_std` pairs, and :func:`paired_differences` compares
methods seed by seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np

Stat = tuple[float, float]
"""``(mean, sample standard deviation)`` over seeds."""


def mean_std(values: Any) -> Stat:
  """The mean and the sample standard deviation (0 for a single value)."""
  values = np.asarray(values, dtype=np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return float(values.mean()), std


@dataclasses.dataclass(frozen=True)
class OptimizerResult:
  """One optimizer's row of ``nso-jax train``; pairs are :data:`Stat` over seeds.

  Attributes:
    optimizer: the optimizer's short name, e.g. ``"nso"``.
    label: its name in tables and plots.
    gradient_evaluations_per_step: what a step costs.
    test_accuracy: the final test accuracy.
    test_accuracy_per_seed: the same, per seed.
    final_train_loss: the final loss on the whole training set.
    hessian_trace: the Hessian trace (Hutchinson) over seeds.
    hessian_trace_stderr: the standard error of the seed-mean from the
      Hutchinson errors alone.
    hessian_trace_per_seed: the trace per seed.
    hessian_trace_stderr_per_seed: its Hutchinson standard error per seed.
    top_eigenvalue: the top Hessian eigenvalue (Lanczos) over seeds.
    top_eigenvalue_per_seed: the same, per seed.
    train_seconds: the seconds training took.
    curves: per-epoch curves (name -> one list per seed).
    spectral_density_seed0: seed 0's Hessian spectral density, ``grid`` and
      ``density``.
    curvature_during_training: the Hessian's trace after each epoch, read
      from NSO's own losses or measured (see
      :func:`nso_jax.app.job.curvature_json`); ``None`` if not followed.
  """

  optimizer: str
  label: str
  gradient_evaluations_per_step: int
  test_accuracy: Stat
  test_accuracy_per_seed: list[float]
  final_train_loss: Stat
  hessian_trace: Stat
  hessian_trace_stderr: float
  hessian_trace_per_seed: list[float]
  hessian_trace_stderr_per_seed: list[float]
  top_eigenvalue: Stat
  top_eigenvalue_per_seed: list[float]
  train_seconds: float
  curves: dict[str, list[list[float]]]
  spectral_density_seed0: dict[str, list[float]]
  curvature_during_training: dict[str, Any] | None = None

  def to_json(self) -> dict[str, Any]:
    """The row as JSON-ready values."""
    return dataclasses.asdict(self)


class Difference(NamedTuple):
  """A method minus the baseline, paired by seed.

  Attributes:
    difference: :data:`Stat` of the per-seed differences.
    relative: ``mean(method) / mean(baseline) - 1``; ``None`` unless the
      baseline's mean is positive.
  """

  difference: Stat
  relative: float | None


@dataclasses.dataclass(frozen=True)
class MethodResult:
  """One method's row of an experiment: its compute, per-seed measures, curves.

  Attributes:
    method: the method's short name, e.g. ``"nso-head"``.
    label: its name in tables and plots.
    gradient_evaluations_per_step: what a step costs.
    steps_per_epoch: the steps between two points of its curves.
    total_steps: the steps of each seed.
    train_seconds: the seconds training took (``None`` when counted in
      another row's).
    per_seed: measure -> its value per seed.
    curves: curve name -> one list of points per seed.
    epochs: the epochs trained, where training goes by epochs.
    swept_value: the value of a swept setting the row was trained with.
  """

  method: str
  label: str
  gradient_evaluations_per_step: int
  steps_per_epoch: int
  total_steps: int
  train_seconds: float | None
  per_seed: Mapping[str, list[float]]
  curves: Mapping[str, list[list[float]]]
  epochs: int | None = None
  swept_value: float | None = None

  @property
  def total_gradient_evaluations(self) -> int:
    """The gradient evaluations of each seed."""
    return self.gradient_evaluations_per_step * self.total_steps

  def summary(self, metric: str) -> Stat:
    """:data:`Stat` of ``metric`` over seeds."""
    return mean_std(self.per_seed[metric])

  def to_json(self) -> dict[str, Any]:
    """The row as JSON-ready values; ``epochs`` and ``swept_value`` if set."""
    row: dict[str, Any] = {
      "method": self.method,
      "label": self.label,
      "gradient_evaluations_per_step": self.gradient_evaluations_per_step,
      "steps_per_epoch": self.steps_per_epoch,
      "epochs": self.epochs,
      "total_steps": self.total_steps,
      "total_gradient_evaluations": self.total_gradient_evaluations,
      "train_seconds": self.train_seconds,
      "per_seed": dict(self.per_seed),
      "summary": {name: self.summary(name) for name in self.per_seed},
      "curves": dict(self.curves),
      "swept_value": self.swept_value,
    }
    for optional in ("epochs", "swept_value"):
      if row[optional] is None:
        del row[optional]
    return row


def paired_differences(
  rows: Sequence[MethodResult], metrics: Sequence[str], baseline: str
) -> dict[str, dict[str, Difference]]:
  """Each method minus ``baseline``, paired by seed (same data and start).

  Returns:
    ``method -> metric -> difference``; empty without the baseline.
  """
  by_method = {row.method: row for row in rows}
  if baseline not in by_method:
    return {}
  base = by_method[baseline].per_seed
  out: dict[str, dict[str, Difference]] = {}
  for row in rows:
    if row.method == baseline:
      continue
    out[row.method] = {}
    for metric in metrics:
      ours, theirs = np.asarray(row.per_seed[metric]), np.asarray(base[metric])
      relative = ours.mean() / theirs.mean() - 1 if theirs.mean() > 0 else None
      out[row.method][metric] = Difference(
        mean_std(ours - theirs), None if relative is None else float(relative)
      )
  return out


def differences_json(
  differences: Mapping[str, Mapping[str, Difference]],
) -> dict[str, dict[str, dict[str, Any]]]:
  """:func:`paired_differences` as JSON: ``{"difference": ..., "relative": ...}``."""
  return {
    method: {metric: value._asdict() for metric, value in metrics.items()}
    for method, metrics in differences.items()
  }
