"""The main job: optimizers side by side on a real data set, and their curvature.

Trains a Flax Linen MLP with plain SGD, SAM, random weight perturbation (RWP,
one-sided noise) and NSO over several seeds (all seeds of one optimizer run
together under ``jax.vmap``), following the Hessian's trace after each epoch
(NSO's free readings, :func:`nso_jax.curvature_readings`; the others
measured by :func:`nso_jax.hessian.noise_stability_measure`), then measures
the loss Hessian of every trained model: its trace (Hutchinson, with a
standard error), its top eigenvalue (Lanczos) and its spectral density
(stochastic Lanczos quadrature), and draws the loss landscape of the first
seed's SGD and NSO models along the same filter-normalised random directions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from nso_jax.app import classifier
from nso_jax.app import data as data_lib
from nso_jax.app import measures
from nso_jax.app import optimizers
from nso_jax.app import output
from nso_jax.app import settings as settings_lib
from nso_jax.app.interrupts import RunContext
from nso_jax.app.interrupts import run_interruptibly
from nso_jax.app.records import OptimizerResult
from nso_jax.app.records import mean_std
from nso_jax.app.settings import Choices
from nso_jax.app.settings import Spec
from nso_jax.app.settings import setting


@dataclasses.dataclass(frozen=True)
class Config(settings_lib.Training):
  """Settings of the main job; the defaults finish in minutes on 2 CPU cores.

  The training fields are :class:`~nso_jax.app.settings.Training`'s; every
  field's limits and help are its spec's (:data:`~nso_jax.app.settings.SPECS`).

  Raises:
    SettingError: naming the first field whose value cannot be used.
  """

  optimizers: tuple[str, ...] = setting(
    optimizers.OPTIMIZERS, Spec(Choices(optimizers.OPTIMIZERS), "optimizers")
  )
  test_fraction: float = setting(data_lib.TEST_FRACTION)
  hessian_samples: int = setting(1000)
  hessian_matvecs: int = setting(100)
  lanczos_steps: int = setting(30)
  density_steps: int = setting(40)
  density_probes: int = setting(4)
  data: str | None = setting(None)
  output: str = setting("nso_results")
  plots: bool = setting(True)
  progress: bool = setting(True)

  def measure_plan(self) -> measures.MeasurePlan:
    """What the job measures of each trained model."""
    return measures.MeasurePlan(
      hessian_matvecs=self.hessian_matvecs,
      lanczos_steps=self.lanczos_steps,
      density_probes=self.density_probes,
      density_steps=self.density_steps,
    )


def load_data(config: Config) -> data_lib.Dataset:
  """The data set ``config`` names: its ``data`` file, or else the digits.

  Raises:
    DataError: naming the Config field at fault (``data``, ``test_fraction``).
  """
  if not config.data:
    return data_lib.load_digits(config.test_fraction)
  try:
    return data_lib.load_npz(config.data, config.test_fraction)
  except data_lib.DataError as error:
    if error.field != "path":
      raise
    raise error.with_field("data") from None


CURVATURE_DRAWS = 4
"""Antithetic pairs of each per-epoch measurement of an optimizer without NSO."""

CURVATURE_SOURCES = {
  "readings": "free readings: NSO's own perturbed losses on its mini-batches "
  "and one clean forward pass per step (curvature_readings, running "
  "estimate, decay 0.9)",
  "measured": f"measured after the epoch: noise_stability_measure, "
  f"{CURVATURE_DRAWS} antithetic pairs on the Hessian's examples",
}
"""How each ``source`` of the per-epoch trace was obtained."""


def _defined(values: np.ndarray, defined: np.ndarray) -> list[Any]:
  """``values`` as nested lists, ``None`` where not ``defined`` (no reading yet)."""
  return np.where(defined, values, np.array(None, dtype=object)).tolist()


def _seed_mean(values: np.ndarray, stderrs: np.ndarray, count: np.ndarray) -> Any:
  """Per epoch: the mean over seeds and its standard error from theirs."""
  mean = values.mean(0)
  stderr = np.sqrt(np.sum(np.square(stderrs), 0)) / len(values)
  return _defined(mean, count.min(0) >= 1), _defined(stderr, count.min(0) >= 2)


def curvature_json(curvature: classifier.CurvatureCurves) -> dict[str, Any]:
  """The trace after each epoch as JSON: per seed, and the mean over seeds.

  ``trace`` is ``2 gap / sigma**2``; ``relative_gap`` the gap over the clean
  loss; each with its standard error (``None`` before a reading defines
  it); the ``*_mean`` entries are over seeds, with the standard error of
  the mean from the seeds' errors. ``extra_seconds`` is what the
  measurements added to the run (0 for readings).
  """
  count = np.asarray(curvature.count)
  trace_mean, trace_mean_stderr = _seed_mean(
    curvature.trace, curvature.trace_stderr, count
  )
  gap_mean, gap_mean_stderr = _seed_mean(
    curvature.relative_gap, curvature.relative_gap_stderr, count
  )
  return {
    "source": curvature.source,
    "how": CURVATURE_SOURCES[curvature.source],
    "sigma": curvature.sigma,
    "epochs": list(range(1, count.shape[1] + 1)),
    "trace_mean": trace_mean,
    "trace_mean_stderr": trace_mean_stderr,
    "relative_gap_mean": gap_mean,
    "relative_gap_mean_stderr": gap_mean_stderr,
    "trace": _defined(curvature.trace, count >= 1),
    "trace_stderr": _defined(curvature.trace_stderr, count >= 2),
    "relative_gap": _defined(curvature.relative_gap, count >= 1),
    "relative_gap_stderr": _defined(curvature.relative_gap_stderr, count >= 2),
    "readings": count.tolist(),
    "extra_seconds": curvature.seconds,
  }


def summarise(
  name: str, trained: classifier.Trained, curvatures: list[measures.Curvature]
) -> OptimizerResult:
  """One optimizer's row: accuracy, loss, curvature, curves, seed 0's density."""
  curves = trained.curves
  accuracy = curves.test_accuracy[:, -1]
  traces = [float(c.trace) for c in curvatures]
  stderrs = [float(c.trace_stderr) for c in curvatures]
  tops = [float(c.top_eigenvalue) for c in curvatures]
  density = curvatures[0].density
  return OptimizerResult(
    optimizer=name,
    label=trained.label,
    gradient_evaluations_per_step=trained.gradient_evaluations_per_step,
    test_accuracy=mean_std(accuracy),
    test_accuracy_per_seed=accuracy.tolist(),
    final_train_loss=mean_std(curves.train_loss[:, -1]),
    hessian_trace=mean_std(traces),
    # Standard error of the seed-mean from the Hutchinson errors alone.
    hessian_trace_stderr=float(np.sqrt(np.sum(np.square(stderrs)))) / len(traces),
    hessian_trace_per_seed=traces,
    hessian_trace_stderr_per_seed=stderrs,
    top_eigenvalue=mean_std(tops),
    top_eigenvalue_per_seed=tops,
    train_seconds=trained.train_seconds,
    curves={key: value.tolist() for key, value in curves._asdict().items()},
    spectral_density_seed0={
      "grid": np.asarray(density.grid).tolist(),
      "density": np.asarray(density.density).tolist(),
    },
    curvature_during_training=None
    if trained.curvature is None
    else curvature_json(trained.curvature),
  )


def run(config: Config, printer: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the main job and writes its outputs.

  Everything the job needs at the end is checked before it trains: the data,
  the sizes, and that the output folder can be created and written to. The
  outputs are written under temporary names and moved into place together,
  ``results.json`` last, so an interrupted or failed run leaves no file that
  looks complete. Ctrl-C stops the job at its next safe point, after the
  current epoch or measurement; once the results are being written, it lets
  the writing finish.

  Args:
    config: the settings.
    printer: where the data summary, the table and the paths written go.

  Returns:
    The results written to ``results.json``, plus the plot paths under
    ``"plots"`` when ``config.plots``. ``results.json`` is strict JSON: a
    NaN or an infinity (a diverged run) is written as ``null`` and listed
    under ``"nonfinite"`` (see :func:`~nso_jax.app.output.strict_results`),
    and no plots are drawn.

  Raises:
    SettingError: naming the Config field whose value the data cannot serve
      (a :class:`~nso_jax.app.data.DataError` for the data file and the split,
      an :class:`~nso_jax.app.output.OutputError` for the output folder).
    Interrupted: on Ctrl-C, listing the files already written.
  """
  return run_interruptibly(lambda context: _run(config, context), printer)


LANDSCAPE_PLANES = ("sgd", "nso")
"""The optimizers whose seed-0 minimum gets a 2-D landscape too."""


def _train_and_measure(
  config: Config, data: data_lib.Dataset, context: RunContext
) -> tuple[list[OptimizerResult], measures.Landscapes]:
  """Every optimizer's row, trained and measured, and seed 0's landscapes."""
  measure = measures.classifier_measure(
    data, config.hidden, config.hessian_samples, config.measure_plan()
  )
  watch = classifier.CurvatureWatch(
    measures.measured_batch(data, config.hessian_samples), CURVATURE_DRAWS
  )
  rows, seed0 = [], {}
  with output.ProgressBars(config.progress) as progress:
    for name in config.optimizers:
      plan = optimizers.Plan(name, config, optimizers.LABELS[name])
      trained = classifier.train(plan, data, progress, context.safe_point, watch=watch)
      curvatures = measures.measure_seeds(
        measure,
        trained.params,
        config.seeds,
        f"Hessian {plan.label}",
        progress,
        context.safe_point,
      )
      rows.append(summarise(name, trained, curvatures))
      seed0[name] = trained.params(0)
    advance = progress.task("Loss landscapes (seed 0)", 1)
    landscapes = measures.classifier_landscapes(
      data, config.hidden, config.hessian_samples, seed0, LANDSCAPE_PLANES
    )
    advance()
  return rows, landscapes


def _run(config: Config, context: RunContext) -> dict[str, Any]:
  """:func:`run` in its :class:`RunContext`."""
  data = load_data(config)
  classifier.check_fits(config, data)
  output.prepare_output(config.output)
  context.printer(
    f"data: {data.name}: {len(data.x_train)} train / {len(data.x_test)} test "
    f"examples, {data.x_train.shape[1]} features, {data.num_classes} classes"
  )
  rows, landscapes = _train_and_measure(config, data, context)
  context.safe_point()
  table = output.optimizer_table(rows)
  results: dict[str, Any] = output.strict_results(
    {
      "config": settings_lib.as_json(config),
      "data": {
        "name": data.name,
        "hessian_examples": min(config.hessian_samples, len(data.x_train)),
        "train_examples": len(data.x_train),
        "test_examples": len(data.x_test),
        "features": int(data.x_train.shape[1]),
        "classes": data.num_classes,
      },
      "environment": output.environment(),
      "results": [row.to_json() for row in rows],
      "landscape_seed0": landscapes.to_json(),
      "table": table,
      "seconds": context.seconds(),
    }
  )
  writers: dict[str, Callable[[str], None]] = {}
  # A diverged run's curves and landscapes cannot be drawn (nor be worth it).
  plots = config.plots and "nonfinite" not in results
  if plots:
    writers["curves.png"] = lambda path: output.draw_training_curves(rows, path)
    writers["spectrum.png"] = lambda path: output.draw_spectrum(rows, path)
    writers["curvature.png"] = lambda path: output.draw_curvature_during_training(
      rows, path
    )
    writers["landscape.png"] = lambda path: output.draw_landscape(
      landscapes.lines, landscapes.planes, optimizers.LABELS, path
    )
  writers["results.json"] = lambda path: output.write_json(results, path)
  paths = output.write_outputs(writers, config.output, written=context.written)
  if plots:
    results["plots"] = paths[:-1]
  context.printer(table)
  context.printer(
    f"wrote {paths[-1]}"
    + ("" if not plots else " and " + ", ".join(paths[:-1]))
    + f" in {results['seconds']:.0f} s"
  )
  return results
