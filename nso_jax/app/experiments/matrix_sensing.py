"""``matrix-sensing``: the paper's synthetic low-rank recovery problem.

Recover :math:`M^* = U^* U^{*\\top}` (``dim x dim``, rank ``rank``,
:math:`U^*` with N(0, 1) entries) from ``measurements`` linear measurements
:math:`y_i = \\langle A_i, M^* \\rangle` with N(0, 1) matrices :math:`A_i`,
with an over-parameterised factor :math:`U` (``dim x dim``, initialised at
``init_scale`` times N(0, 1) entries) and the loss
:math:`\\frac{1}{2m} \\sum_i (\\langle A_i, U U^\\top \\rangle - y_i)^2`.
Full-batch gradient descent (GD) against NSO on top of the same GD, at the
same learning rate; GD also runs for ``2k`` times the steps (NSO's gradient
evaluations). Each seed draws its own problem (:math:`U^*`, :math:`A_i`),
start and noise.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nso_jax
from nso_jax.app import measures
from nso_jax.app import output
from nso_jax.app import records
from nso_jax.app import settings as settings_lib
from nso_jax.app.interrupts import RunContext
from nso_jax.app.records import MethodResult
from nso_jax.app.settings import Count
from nso_jax.app.settings import Real
from nso_jax.app.settings import Spec
from nso_jax.app.settings import Values
from nso_jax.app.settings import setting

MAX_SENSING_FLOATS = 250_000_000
"""The most floats the measurement matrices may hold (1 GB in float32)."""

COLUMNS: list[output.Column] = [
  ("recovery_error", "‖UUᵀ-M*‖/‖M*‖ final", output.fmt(3)),
  ("best_recovery_error", "… best on the path", output.fmt(3)),
  ("final_train_loss", "train loss", output.fmt(3)),
  ("hessian_trace", "tr(H)", output.fmt(4)),
  ("top_eigenvalue", "top eigenvalue", output.fmt(4)),
  ("noise_stability", "noise stability", output.fmt(3)),
  ("factor_norm", "‖U‖_F", output.fmt(4)),
]

CURVES = (
  ("recovery_error", "‖UUᵀ-M*‖_F / ‖M*‖_F", True),
  ("train_loss", "training loss", True),
)

_SIZE = "U and every measurement matrix hold size^2 floats"
_STEPS = "each step is a full-batch gradient"


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """Settings of ``matrix-sensing``: the paper's d = 100, r = 5, lr, sigma."""

  seeds: int = setting(5, help="seeds 0 .. N-1: each its own problem")
  dim: int = setting(100, Spec(Count(2_000, _SIZE), "matrix size d (U is d x d)"))
  rank: int = setting(5, Spec(Count(2_000, _SIZE), "rank r of M*"))
  measurements: int = setting(
    1000, Spec(Count(10_000_000, "each is a d x d matrix"), "measurements m")
  )
  steps: int = setting(
    1000, Spec(Count(1_000_000, _STEPS), "NSO steps (GD also runs 2k times as many)")
  )
  record_every: int = setting(
    10, Spec(Count(1_000_000, _STEPS), "steps between recorded curve points")
  )
  learning_rate: float = setting(0.0025, help="GD learning rate")
  sigma: float = setting(0.02, help="NSO noise std")
  num_perturbations: int = setting(1, help="NSO pairs per step (k)")
  init_scales: tuple[float, ...] = setting(
    (0.001, 0.1),
    Spec(Values(Real(0.0)), "std of U's initial entries, one run per value"),
  )
  hessian_matvecs: int = setting(100)
  lanczos_steps: int = setting(30)
  ns_sigma: float = setting(0.01)
  ns_draws: int = setting(20)
  output: str = setting("nso_experiments/matrix-sensing")
  plots: bool = setting(True)
  progress: bool = setting(True)

  def check_together(self) -> None:
    error = settings_lib.SettingError
    if self.rank > self.dim:
      raise error("rank", f"must be at most --dim ({self.dim}).", value=self.rank)
    if self.measurements * self.dim**2 > MAX_SENSING_FLOATS:
      raise error(
        "measurements",
        f"times dim^2 = {self.measurements * self.dim**2:,} floats of "
        f"measurement matrices; at most {MAX_SENSING_FLOATS:,} are allowed "
        "(1 GB); use fewer measurements or a smaller --dim.",
        value=self.measurements,
      )
    if self.steps % self.record_every:
      raise error(
        "steps",
        f"must be a multiple of --record-every ({self.record_every}).",
        value=self.steps,
      )

  def measure_plan(self) -> measures.MeasurePlan:
    """What is measured of each solution."""
    return measures.MeasurePlan(
      hessian_matvecs=self.hessian_matvecs,
      lanczos_steps=self.lanczos_steps,
      noise_sigma=self.ns_sigma,
      noise_draws=self.ns_draws,
    )


def loss_fn(u: jax.Array, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  """The measurement loss, :math:`\\frac{1}{2m}\\sum_i
  (\\langle A_i, UU^\\top\\rangle - y_i)^2`."""
  a, y = batch
  return 0.5 * jnp.mean((jnp.einsum("mij,ij->m", a, u @ u.T) - y) ** 2)


def recovery_error(u: jax.Array, target: jax.Array) -> jax.Array:
  """:math:`\\lVert UU^\\top - M^*\\rVert_F / \\lVert M^*\\rVert_F`."""
  return jnp.linalg.norm(u @ u.T - target) / jnp.linalg.norm(target)


class Problem(NamedTuple):
  """A seed's problem: the measurements ``a``, ``y``, the target and a start."""

  a: jax.Array
  y: jax.Array
  target: jax.Array
  start: jax.Array


def make_problem(settings: Settings, seed: int) -> Problem:
  """Seed ``seed``'s problem: measurements, target and the start's direction."""
  a_key, u_key, start_key = jax.random.split(jax.random.key(seed), 3)
  d = settings.dim
  a = jax.random.normal(a_key, (settings.measurements, d, d))
  u_star = jax.random.normal(u_key, (d, settings.rank))
  target = u_star @ u_star.T
  y = jnp.einsum("mij,ij->m", a, target)
  return Problem(a, y, target, jax.random.normal(start_key, (d, d)))


SEGMENT_WORK = 200_000_000
"""The most measurement floats times steps one compiled segment runs.

A segment is what runs between two safe points (where Ctrl-C is honoured);
at the paper's sizes (``d = 100``, ``m = 1000``) a whole ``record_every``
stretch of up to 20 steps is one segment.
"""


def segment_steps(settings: Settings) -> int:
  """The steps of a segment: :data:`SEGMENT_WORK` bounds it, 1 at least."""
  return max(1, SEGMENT_WORK // (settings.measurements * settings.dim**2))


def make_runner(tx: optax.GradientTransformation, chunk: int, perturbed: bool):
  """``chunk`` steps of ``tx``, jitted.

  Returns:
    ``(u, state, a, y, target) -> (u, state, loss, recovery error)``.
  """

  @jax.jit
  def run_chunk(u, state, a, y, target):
    u, state = _steps(tx, chunk, perturbed, u, state, a, y)
    return u, state, loss_fn(u, (a, y)), recovery_error(u, target)

  return run_chunk


def _steps(tx, length: int, perturbed: bool, u, state, a, y):
  """``length`` steps of ``tx`` from ``(u, state)``, as one scan."""
  grad_fn = functools.partial(jax.grad(loss_fn), batch=(a, y))

  def step(carry, _):
    u, state = carry
    if perturbed:
      updates, state = tx.update(None, state, u, grad_fn=grad_fn)
    else:
      updates, state = tx.update(grad_fn(u), state, u)
    return (optax.apply_updates(u, updates), state), None

  (u, state), _ = jax.lax.scan(step, (u, state), None, length=length)
  return u, state


class Runner(NamedTuple):
  """A method's ``every`` steps as segments, each compiled once.

  Attributes:
    advance: one segment, ``(u, state, a, y) -> (u, state)``, compiled once
      (``None`` when the stretch is a single segment).
    leads: the calls of ``advance`` before the last segment.
    finish: the last segment and the curve point (see :func:`make_runner`).
  """

  advance: Callable[..., Any] | None
  leads: int
  finish: Callable[..., Any]


def make_segments(
  tx: optax.GradientTransformation, every: int, segment: int, perturbed: bool
) -> Runner:
  """``every`` steps of ``tx`` in segments of at most ``segment`` steps.

  When ``every <= segment`` the stretch is one compiled call, as
  :func:`make_runner` builds it; else it is ``every // segment`` calls of
  one compiled segment, the last of which (or the remainder) also gives the
  curve point: two programs at most, whatever the number of steps.
  """
  if every <= segment:
    return Runner(None, 0, make_runner(tx, every, perturbed))
  rest = every % segment or segment
  advance = jax.jit(functools.partial(_steps, tx, segment, perturbed))
  return Runner(advance, (every - rest) // segment, make_runner(tx, rest, perturbed))


@dataclasses.dataclass(frozen=True)
class Method:
  """How a method runs, and its cost.

  Attributes:
    name: its short name.
    label: its name in tables and plots.
    steps: the steps it runs.
    per_step: gradient evaluations per step.
    tx: its transformation (``None``: it is the start of another's run).
    runner: ``record_every`` steps of it, in compiled segments (see
      :func:`make_segments`).
  """

  name: str
  label: str
  steps: int
  per_step: int
  tx: Any = None
  runner: Runner | None = None


def methods(settings: Settings) -> tuple[Method, Method, Method]:
  """GD, GD for NSO's gradient evaluations, and NSO.

  GD's first ``steps`` steps are the start of the long GD run: one run gives
  both.
  """
  k = settings.num_perturbations
  gd = optax.sgd(settings.learning_rate)
  nso = nso_jax.nso(gd, settings.sigma, k, key=0)
  every = settings.record_every
  segment = segment_steps(settings)
  return (
    Method("gd", "GD", settings.steps, 1),
    Method(
      "gd-long",
      f"GD, {2 * k}x steps",
      2 * k * settings.steps,
      1,
      gd,
      make_segments(gd, every, segment, perturbed=False),
    ),
    Method(
      "nso",
      f"NSO (sigma={settings.sigma:g}, k={k})",
      settings.steps,
      2 * k,
      nso,
      make_segments(nso, every, segment, perturbed=True),
    ),
  )


def train(
  method: Method,
  problem: Problem,
  u0: jax.Array,
  seed: int,
  every: int,
  chunk: int,
  advance: Callable[..., None],
  safe_point: Callable[[], None] = lambda: None,
) -> tuple[jax.Array, jax.Array, dict[str, np.ndarray]]:
  """Runs ``method`` from ``u0``: ``u`` after ``chunk`` points, final ``u``, curves.

  ``safe_point`` is called after every segment, with at most one more
  segment queued on the device: Ctrl-C is honoured within a segment or two.
  The curve points, one per ``every`` steps, are gathered on the host.
  """
  runner = method.runner
  assert method.tx is not None and runner is not None
  state = method.tx.init(u0)
  if method.per_step > 1:
    key = jax.random.fold_in(jax.random.key(seed), 3)
    state = optax.tree_utils.tree_set(state, key=key)
  u, snapshot, points, pending = u0, u0, [], None
  for index in range(method.steps // every):
    for _ in range(runner.leads):
      assert runner.advance is not None  # leads > 0 only with a segment
      u, state = runner.advance(u, state, problem.a, problem.y)
      pending = _wait(pending, u, safe_point)
    u, state, loss, error = runner.finish(
      u, state, problem.a, problem.y, problem.target
    )
    pending = _wait(pending, (loss, error), safe_point)
    points.append((loss, error))
    if index + 1 == chunk:
      snapshot = u
    advance()
  jax.block_until_ready(pending)
  values = np.asarray(jax.device_get(points), dtype=np.float32).reshape(-1, 2)
  curves = {"train_loss": values[:, 0], "recovery_error": values[:, 1]}
  return snapshot, u, curves


def _wait(previous: Any, new: Any, safe_point: Callable[[], None]) -> Any:
  """Waits for ``previous`` (so one call stays queued), then a safe point."""
  jax.block_until_ready(previous)
  safe_point()
  return new


class _Recorder:
  """Each method's per-seed measures and curves, gathered seed by seed."""

  def __init__(self, settings: Settings, names: tuple[str, ...]):
    self.measure = measures.compile_measure(loss_fn, settings.measure_plan())
    self.per_seed: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    self.curves: dict[str, dict[str, list[Any]]] = {name: {} for name in names}

  def record(self, name: str, u, curve, seed: int, problem: Problem) -> None:
    key = jax.random.key(1000 + seed)
    curvature = self.measure(u, (problem.a, problem.y), key, None)
    values = {k: v[0] for k, v in measures.curvature_metrics([curvature]).items()}
    values["final_train_loss"] = values["measured_loss"]
    values["recovery_error"] = float(recovery_error(u, problem.target))
    values["best_recovery_error"] = float(np.min(curve["recovery_error"]))
    values["factor_norm"] = float(jnp.linalg.norm(u))
    for metric, value in values.items():
      self.per_seed[name].setdefault(metric, []).append(value)
    for key_name, points in curve.items():
      self.curves[name].setdefault(key_name, []).append(np.asarray(points).tolist())


def run_scale(
  settings: Settings,
  scale: float,
  plan: tuple[Method, Method, Method],
  progress: output.ProgressBars,
  context: RunContext,
) -> list[MethodResult]:
  """All seeds at one init scale: rows for GD, GD (long) and NSO."""
  gd, gd_long, nso = plan
  every = settings.record_every
  chunks = settings.steps // every
  recorder = _Recorder(settings, (gd.name, gd_long.name, nso.name))
  seconds = {gd_long.name: 0.0, nso.name: 0.0}
  total = settings.seeds * (gd_long.steps + nso.steps)
  advance = progress.task(f"init scale {scale:g}: GD, NSO", total // every)
  for seed in range(settings.seeds):
    problem = make_problem(settings, seed)
    u0 = scale * problem.start
    start = time.perf_counter()
    middle, u, curve = train(
      gd_long, problem, u0, seed, every, chunks, advance, context.safe_point
    )
    recorder.record(
      gd.name, middle, {k: v[:chunks] for k, v in curve.items()}, seed, problem
    )
    recorder.record(gd_long.name, u, curve, seed, problem)
    seconds[gd_long.name] += time.perf_counter() - start
    start = time.perf_counter()
    _, u, curve = train(
      nso, problem, u0, seed, every, chunks, advance, context.safe_point
    )
    recorder.record(nso.name, u, curve, seed, problem)
    seconds[nso.name] += time.perf_counter() - start
    context.safe_point()
  return [
    # GD's run is the start of GD-long's: its time is counted there.
    MethodResult(
      method=method.name,
      label=method.label,
      gradient_evaluations_per_step=method.per_step,
      steps_per_epoch=every,
      total_steps=method.steps,
      train_seconds=seconds.get(method.name),
      per_seed=recorder.per_seed[method.name],
      curves=recorder.curves[method.name],
    )
    for method in plan
  ]


def run(settings: Settings, context: RunContext) -> dict[str, Any]:
  """Runs ``matrix-sensing`` and writes its outputs (see
  :func:`nso_jax.app.experiments.run`)."""
  output.prepare_output(settings.output)
  plan = methods(settings)
  context.printer(
    f"matrix-sensing: training {', '.join(m.label for m in plan[1:])} on "
    f"{settings.seeds} seed(s) x {len(settings.init_scales)} init scale(s)"
  )
  groups = []
  with output.ProgressBars(settings.progress) as progress:
    for scale in settings.init_scales:
      groups.append((scale, run_scale(settings, scale, plan, progress, context)))
  return _finish(settings, groups, context)


def _finish(
  settings: Settings,
  groups: list[tuple[float, list[MethodResult]]],
  context: RunContext,
) -> dict[str, Any]:
  metrics = [metric for metric, _, _ in COLUMNS]
  sections, scales = [], []
  for scale, rows in groups:
    differences = records.paired_differences(rows, metrics, baseline="gd")
    labels = {row.method: row.label for row in rows}
    tables = {
      "results": output.method_table(rows, COLUMNS),
      "versus_gd": output.differences_table(differences, labels, COLUMNS, "GD"),
    }
    scales.append(
      {
        "init_scale": scale,
        "rows": [row.to_json() for row in rows],
        "versus_gd": records.differences_json(differences),
        "tables": tables,
      }
    )
    sections += [
      (f"init scale {scale:g} (mean ± std over seeds)", tables["results"]),
      (f"init scale {scale:g}: against GD", tables["versus_gd"]),
    ]
  results = {
    "experiment": "matrix-sensing",
    "settings": settings_lib.as_json(settings),
    "problem": (
      f"M* = U* U*^T, U* {settings.dim}x{settings.rank} N(0,1); "
      f"{settings.measurements} measurements <A_i, M*>, A_i N(0,1); U "
      f"{settings.dim}x{settings.dim}; loss (1/2m) sum (<A_i, UU^T> - y_i)^2"
    ),
    "init_scales": scales,
  }
  title = (
    f"matrix-sensing: d={settings.dim}, r={settings.rank}, m={settings.measurements}"
  )
  markdown = output.markdown_document(title, sections)
  titled = [(f"init scale {scale:g}", rows) for scale, rows in groups]
  panels = [(metric, header) for metric, header, _ in COLUMNS]
  plots: dict[str, Callable[[str], None]] = {
    "curves.png": lambda path: output.draw_curves(titled, path, CURVES)
  }
  for scale, rows in groups:
    plots[f"measures_init_{scale:g}.png"] = functools.partial(
      output.draw_bars, rows, panels, title=f"init scale {scale:g}"
    )
  return output.finish(
    context, settings.output, results, markdown, plots if settings.plots else {}
  )
