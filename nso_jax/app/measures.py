"""What the commands measure of a trained model: accuracy, loss and curvature.

One bundle serves ``nso-jax train`` and every experiment: :func:`make_measure`
compiles, once per loss and :class:`MeasurePlan`, the loss, the Hessian trace
(Hutchinson, with its standard error), the top eigenvalue (Lanczos) and, as
the plan asks, the noise stability
(:func:`nso_jax.hessian.noise_stability_measure`), the spectral density
(stochastic Lanczos quadrature) and, given a reference point, the paper's
per-layer :math:`v_l^\\top H_l v_l` with :math:`v` = ``params - reference``.
:func:`measure_seeds` measures every seed; :func:`curvature_metrics`,
:func:`accuracy_metrics` and :func:`label_fit` turn what was measured into
per-seed lists.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax import hessian
from nso_jax.app import classifier
from nso_jax.app.data import Dataset
from nso_jax.app.output import ProgressBars

LossFn = Callable[[Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class MeasurePlan:
  """What to measure, and how finely.

  Attributes:
    hessian_matvecs: Hutchinson probes for the trace.
    lanczos_steps: Lanczos steps for the top eigenvalue (at most the
      parameter count).
    noise_sigma: the noise-stability perturbation std; ``None`` skips it.
    noise_draws: the noise-stability draws (antithetic pairs).
    density_probes: the spectral density's probes; 0 skips it.
    density_steps: its Lanczos steps (at most the parameter count).
    density_grid: the points of its grid.
  """

  hessian_matvecs: int
  lanczos_steps: int
  noise_sigma: float | None = None
  noise_draws: int = 0
  density_probes: int = 0
  density_steps: int = 0
  density_grid: int = 400


class Curvature(NamedTuple):
  """What was measured of one model; ``None`` where the plan asked nothing.

  Attributes:
    loss: the loss on the measured batch.
    trace: the Hessian trace (Hutchinson).
    trace_stderr: its standard error.
    top_eigenvalue: the top Hessian eigenvalue (Lanczos).
    noise_stability: the noise stability, ``E[L(W + U)] - L(W)``.
    noise_stability_stderr: its standard error.
    density: the spectral density (a :class:`nso_jax.hessian.SpectralDensity`).
    layers: :math:`v_l^\\top H_l v_l` per parameter leaf.
    vhv: :math:`v^\\top H v` of the whole direction.
    distance: :math:`\\lVert v \\rVert`.
  """

  loss: Any
  trace: Any
  trace_stderr: Any
  top_eigenvalue: Any
  noise_stability: Any = None
  noise_stability_stderr: Any = None
  density: Any = None
  layers: Any = None
  vhv: Any = None
  distance: Any = None


def _reference_measures(
  loss_fn: LossFn, params: Any, batch: Any, reference: Any
) -> dict[str, Any]:
  """The per-layer and whole :math:`v^\\top H v` and :math:`\\lVert v\\rVert`."""
  direction = jax.tree.map(jnp.subtract, params, reference)
  squares = sum(jnp.sum(v**2) for v in jax.tree.leaves(direction))
  return {
    "layers": hessian.layer_hessian_measure(loss_fn, params, batch, reference),
    "vhv": hessian.direction_curvature(loss_fn, params, batch, direction),
    "distance": jnp.sqrt(squares),
  }


@functools.cache
def compile_measure(
  loss_fn: LossFn, plan: MeasurePlan
) -> Callable[[Any, Any, jax.Array, Any], Curvature]:
  """The jitted ``(params, batch, key, reference) -> Curvature`` of ``plan``.

  One per loss and plan, reused across data sets and runs. ``key`` splits
  into three: the trace's, the eigenvalue's, and a third that the noise
  stability uses or, without it, the spectral density. ``reference`` is
  ``None`` for no layer measures.
  """

  @jax.jit
  def measure(params, batch, key, reference):
    dim = sum(leaf.size for leaf in jax.tree.leaves(params))
    trace_key, eig_key, third_key = jax.random.split(key, 3)
    trace = hessian.trace(
      loss_fn, params, batch, trace_key, num_matvecs=plan.hessian_matvecs
    )
    top = hessian.top_eigenvalues(
      loss_fn,
      params,
      batch,
      eig_key,
      num_eigenvalues=1,
      num_steps=min(plan.lanczos_steps, dim),
    )
    out: dict[str, Any] = {}
    if plan.noise_sigma is not None:
      # Antithetic pairs: the same mean as one-sided draws, without the
      # first-order term's variance.
      stability = hessian.noise_stability_measure(
        loss_fn,
        params,
        batch,
        third_key,
        sigma=plan.noise_sigma,
        num_draws=plan.noise_draws,
        antithetic=True,
      )
      out.update(
        noise_stability=stability.value, noise_stability_stderr=stability.stderr
      )
      third_key = jax.random.fold_in(third_key, 1)
    if plan.density_probes:
      out["density"] = hessian.spectral_density(
        loss_fn,
        params,
        batch,
        third_key,
        num_probes=plan.density_probes,
        num_steps=min(plan.density_steps, dim),
        grid=hessian.DensityGrid(size=plan.density_grid),
      )
    if reference is not None:
      out.update(_reference_measures(loss_fn, params, batch, reference))
    loss = loss_fn(params, batch)
    return Curvature(loss, trace.value, trace.stderr, top[0], **out)

  return measure


def make_measure(
  loss_fn: LossFn, batch: Any, plan: MeasurePlan
) -> Callable[[Any, jax.Array, Any], Curvature]:
  """``(params, key, reference) -> Curvature`` on ``batch``, compiled once."""
  compiled = compile_measure(loss_fn, plan)

  def measure(params: Any, key: jax.Array, reference: Any = None) -> Curvature:
    return compiled(params, batch, key, reference)

  return measure


def measured_batch(data: Dataset, samples: int) -> tuple[jax.Array, jax.Array]:
  """The first ``samples`` training examples, with their training labels."""
  size = min(samples, len(data.x_train))
  return jnp.asarray(data.x_train[:size]), jnp.asarray(data.y_train[:size])


def classifier_measure(
  data: Dataset, hidden: tuple[int, ...], samples: int, plan: MeasurePlan
) -> Callable[[Any, jax.Array, Any], Curvature]:
  """:func:`make_measure` of an MLP's training loss on ``samples`` examples.

  The loss is the mean cross-entropy over the first ``samples`` training
  examples, with the labels the model was trained on (the paper measures on
  about 1000 samples).
  """
  loss_fn = classifier.loss_function(tuple(hidden), data.num_classes)
  return make_measure(loss_fn, measured_batch(data, samples), plan)


LANDSCAPE_SEED = 0
"""The seed of the landscapes' directions, the same for every model."""
LANDSCAPE_LINE_POINTS = 21
"""Grid points of a 1-D landscape, from -1 to 1."""
LANDSCAPE_PLANE_POINTS = 11
"""Grid points along each axis of a 2-D landscape, from -1 to 1."""


@functools.cache
def compile_landscape(
  loss_fn: LossFn,
) -> Callable[[Any, Any, jax.Array], tuple[hessian.LossLandscape, ...]]:
  """The jitted ``(params, batch, key) -> (line, plane)`` landscapes.

  Two filter-normalised directions (biases not moved) from
  ``jax.random.fold_in(key, i)``
  (:func:`nso_jax.hessian.filter_normalized_direction`); the line runs
  along the first, over :data:`LANDSCAPE_LINE_POINTS` points from -1 to 1,
  the plane along both, over :data:`LANDSCAPE_PLANE_POINTS` squared. One
  compiled function: the random draws and the loss compile once.
  """

  @jax.jit
  def landscapes(params, batch, key):
    first, second = (
      hessian.filter_normalized_direction(params, jax.random.fold_in(key, i))
      for i in range(2)
    )
    line = jnp.linspace(-1.0, 1.0, LANDSCAPE_LINE_POINTS)
    plane = jnp.linspace(-1.0, 1.0, LANDSCAPE_PLANE_POINTS)
    return (
      hessian.loss_landscape(loss_fn, params, batch, first, line),
      hessian.loss_landscape(loss_fn, params, batch, [first, second], (plane, plane)),
    )

  return landscapes


class Landscapes(NamedTuple):
  """Loss landscapes of trained models, along directions of one seed.

  Attributes:
    lines: model name -> its 1-D landscape.
    planes: model name -> its 2-D landscape (for some of the models).
  """

  lines: dict[str, hessian.LossLandscape]
  planes: dict[str, hessian.LossLandscape]

  def to_json(self) -> dict[str, Any]:
    """Coordinates and losses as lists, per model (directions left out)."""

    def losses(landscapes: dict[str, hessian.LossLandscape]) -> dict[str, Any]:
      return {name: np.asarray(x.losses).tolist() for name, x in landscapes.items()}

    first = next(iter(self.lines.values()))
    planes = list(self.planes.values())
    return {
      "directions": "filter-normalised Gaussian, biases not moved",
      "seed": LANDSCAPE_SEED,
      "line": {"a": np.asarray(first.coordinates[0]).tolist(), **losses(self.lines)},
      "plane": {
        "a": np.asarray(planes[0].coordinates[0]).tolist() if planes else [],
        "b": np.asarray(planes[0].coordinates[1]).tolist() if planes else [],
        **losses(self.planes),
      },
    }


def classifier_landscapes(
  data: Dataset,
  hidden: tuple[int, ...],
  samples: int,
  models: dict[str, Any],
  planes: tuple[str, ...],
) -> Landscapes:
  """The 1-D landscape of every model and the 2-D one of those in ``planes``.

  On the batch :func:`classifier_measure` measures the Hessian on, along
  filter-normalised directions of seed :data:`LANDSCAPE_SEED` (the same
  Gaussian draws for every model, each normalised to the model's own
  filters): 21 points from -1 to 1 along one direction, 11 x 11 on a plane.
  The plane is evaluated for every model (121 losses cost less than
  compiling anew) and kept for those of ``planes``.
  """
  loss_fn = classifier.loss_function(tuple(hidden), data.num_classes)
  batch = measured_batch(data, samples)
  key = jax.random.key(LANDSCAPE_SEED)
  compiled = compile_landscape(loss_fn)
  measured = {name: compiled(params, batch, key) for name, params in models.items()}
  return Landscapes(
    lines={name: line for name, (line, _) in measured.items()},
    planes={name: plane for name, (_, plane) in measured.items() if name in planes},
  )


def _no_interruption() -> None:
  pass


def measure_seeds(
  measure: Callable[[Any, jax.Array, Any], Curvature],
  params: Callable[[int], Any],
  seeds: int,
  label: str,
  progress: ProgressBars,
  safe_point: Callable[[], None] = _no_interruption,
  reference: Callable[[int], Any] | None = None,
) -> list[Curvature]:
  """Measures every seed's model, with key ``1000 + seed``.

  Args:
    measure: as :func:`make_measure` makes it.
    params: ``seed -> trained parameters``.
    seeds: how many seeds.
    label: the progress bar's name.
    progress: where the bar goes.
    safe_point: called after each seed's measurement has finished.
    reference: ``seed -> reference point`` of the layer measures, if any.

  Returns:
    Each seed's :class:`Curvature`, computed.
  """
  advance = progress.task(label, seeds)
  results = []
  for seed in range(seeds):
    ref = None if reference is None else reference(seed)
    key = jax.random.key(1000 + seed)
    results.append(jax.block_until_ready(measure(params(seed), key, ref)))
    advance()
    safe_point()
  return results


def leaf_names(tree: Any) -> list[str]:
  """``"Dense_0/kernel"``-style names of a parameter tree's leaves."""
  return [
    "/".join(str(getattr(key, "key", key)) for key in path)
    for path, _ in jax.tree_util.tree_leaves_with_path(tree)
  ]


def curvature_metrics(curvatures: list[Curvature]) -> dict[str, list[float]]:
  """Per-seed lists of what was measured, by the names the experiments report.

  ``measured_loss``, ``hessian_trace`` (and ``_stderr``), ``trace_per_loss``
  (near zero loss, the cross-entropy's Hessian shrinks with the loss, so a
  lower trace at a lower loss says less about the shape), ``top_eigenvalue``;
  as measured, ``noise_stability`` (and ``_stderr``), ``vHv``, ``distance``
  and ``vHv[LAYER]`` per parameter leaf.
  """
  names = {
    "measured_loss": "loss",
    "hessian_trace": "trace",
    "hessian_trace_stderr": "trace_stderr",
    "top_eigenvalue": "top_eigenvalue",
    "noise_stability": "noise_stability",
    "noise_stability_stderr": "noise_stability_stderr",
    "vHv": "vhv",
    "distance": "distance",
  }
  out: dict[str, list[float]] = {}
  for metric, field in names.items():
    values = [getattr(c, field) for c in curvatures]
    if values[0] is not None:
      out[metric] = [float(value) for value in values]
  out["trace_per_loss"] = [float(c.trace / c.loss) for c in curvatures]
  if curvatures[0].layers is not None:
    for index, name in enumerate(leaf_names(curvatures[0].layers)):
      out[f"vHv[{name}]"] = [
        float(jax.tree.leaves(c.layers)[index]) for c in curvatures
      ]
  return out


def accuracy_metrics(curves: classifier.Curves) -> dict[str, list[float]]:
  """Final and best-epoch test accuracy, the best epoch, the final train loss."""
  accuracy = np.asarray(curves.test_accuracy)
  return {
    "final_test_accuracy": accuracy[:, -1].tolist(),
    "best_test_accuracy": accuracy.max(axis=1).tolist(),
    "best_epoch": (accuracy.argmax(axis=1) + 1).tolist(),
    "final_train_loss": np.asarray(curves.train_loss)[:, -1].tolist(),
  }


def label_fit(
  data: Dataset, hidden: tuple[int, ...], flipped: np.ndarray
) -> Callable[[classifier.Trained], dict[str, list[float]]]:
  """``trained -> {"memorised": ..., "clean_fit": ...}``, per seed.

  ``memorised``: the share of flipped training examples the final model
  predicts as their (wrong) training label; ``clean_fit``: the training
  accuracy on the unflipped ones.
  """
  model = classifier.MLP(tuple(hidden), data.num_classes)
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  mask = jnp.asarray(flipped)

  @jax.jit
  @jax.vmap
  def fit(params):
    right = jnp.argmax(model.apply({"params": params}, x), -1) == y
    memorised = jnp.sum(right & mask) / jnp.maximum(jnp.sum(mask), 1)
    clean = jnp.sum(right & ~mask) / jnp.maximum(jnp.sum(~mask), 1)
    return memorised, clean

  def measure(trained: classifier.Trained) -> dict[str, list[float]]:
    memorised, clean = fit(trained.states.params)
    return {
      "memorised": np.asarray(memorised).tolist(),
      "clean_fit": np.asarray(clean).tolist(),
    }

  return measure
