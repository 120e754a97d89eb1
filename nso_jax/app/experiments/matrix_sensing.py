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

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nso_jax
from nso_jax import hessian
from nso_jax.app import data as data_lib
from nso_jax.app import report
from nso_jax.app.experiments import classify
from nso_jax.app.experiments import output
from nso_jax.app.experiments.settings import check
from nso_jax.app.experiments.settings import count
from nso_jax.app.experiments.settings import positive
from nso_jax.app.experiments.settings import setting

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


@dataclasses.dataclass(frozen=True)
class Settings:
  """Settings of ``matrix-sensing``: the paper's d = 100, r = 5, lr, sigma."""

  seeds: int = count(5, "seeds 0 .. N-1: each its own problem", 64)
  dim: int = count(100, "matrix size d (U is d x d)", 2_000)
  rank: int = count(5, "rank r of M*", 2_000)
  measurements: int = count(1000, "measurements m", 10_000_000)
  steps: int = count(1000, "NSO steps (GD also runs 2k times as many)", 1_000_000)
  record_every: int = count(10, "steps between recorded curve points", 1_000_000)
  learning_rate: float = positive(0.0025, "GD learning rate", flag="--lr")
  sigma: float = positive(0.02, "NSO noise std")
  num_perturbations: int = count(1, "NSO pairs per step (k)", 64, flag="--k")
  init_scales: tuple[float, ...] = setting(
    (0.001, 0.1),
    "std of U's initial entries, one run per value",
    valid=lambda v: v > 0,
    expect="a finite float > 0",
    unique=True,
  )
  hessian_matvecs: int = count(100, "Hutchinson probes for tr(H)", 10_000)
  lanczos_steps: int = count(30, "Lanczos steps for the top eigenvalue", 1_000)
  ns_eps: float = positive(0.01, "noise-stability perturbation std (eps)")
  ns_draws: int = count(20, "noise-stability draws", 10_000)
  output: str = setting(
    "nso_experiments/matrix-sensing", "output folder", flag="--out", valid=bool
  )
  plots: bool = setting(True, "skip the PNG plots")
  progress: bool = setting(True, "no progress bars")

  def __post_init__(self):
    check(self)
    error = data_lib.SettingError
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


def loss_fn(u: jax.Array, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  """The measurement loss, :math:`\\frac{1}{2m}\\sum_i
  (\\langle A_i, UU^\\top\\rangle - y_i)^2`."""
  a, y = batch
  return 0.5 * jnp.mean((jnp.einsum("mij,ij->m", a, u @ u.T) - y) ** 2)


def recovery_error(u: jax.Array, target: jax.Array) -> jax.Array:
  """:math:`\\lVert UU^\\top - M^*\\rVert_F / \\lVert M^*\\rVert_F`."""
  return jnp.linalg.norm(u @ u.T - target) / jnp.linalg.norm(target)


def make_problem(settings: Settings, seed: int) -> dict[str, jax.Array]:
  """Seed ``seed``'s problem: measurements, target and the start's direction."""
  a_key, u_key, start_key = jax.random.split(jax.random.key(seed), 3)
  d = settings.dim
  a = jax.random.normal(a_key, (settings.measurements, d, d))
  u_star = jax.random.normal(u_key, (d, settings.rank))
  target = u_star @ u_star.T
  y = jnp.einsum("mij,ij->m", a, target)
  return {
    "a": a,
    "y": y,
    "target": target,
    "start": jax.random.normal(start_key, (d, d)),
  }


def make_runner(tx: optax.GradientTransformation, chunk: int, perturbed: bool):
  """``chunk`` steps of ``tx``, jitted.

  Returns:
    ``(u, state, a, y, target) -> (u, state, loss, recovery error)``.
  """

  @jax.jit
  def run_chunk(u, state, a, y, target):
    grad_fn = functools.partial(jax.grad(loss_fn), batch=(a, y))

    def step(carry, _):
      u, state = carry
      if perturbed:
        updates, state = tx.update(None, state, u, grad_fn=grad_fn)
      else:
        updates, state = tx.update(grad_fn(u), state, u)
      return (optax.apply_updates(u, updates), state), None

    (u, state), _ = jax.lax.scan(step, (u, state), None, length=chunk)
    return u, state, loss_fn(u, (a, y)), recovery_error(u, target)

  return run_chunk


def make_measure(settings: Settings) -> Callable[..., dict[str, jax.Array]]:
  """A jitted ``(u, key, a, y, target) -> measures`` of the solution ``u``."""
  lanczos_steps = min(settings.lanczos_steps, settings.dim**2)

  @jax.jit
  def measure(u, key, a, y, target):
    batch = (a, y)
    trace_key, eig_key, noise_key = jax.random.split(key, 3)
    trace = hessian.trace(
      loss_fn, u, batch, trace_key, num_matvecs=settings.hessian_matvecs
    )
    top = hessian.top_eigenvalues(
      loss_fn, u, batch, eig_key, num_eigenvalues=1, num_steps=lanczos_steps
    )
    stability = hessian.noise_stability_measure(
      loss_fn,
      u,
      batch,
      noise_key,
      eps=settings.ns_eps,
      num_draws=settings.ns_draws,
      antithetic=True,
    )
    return {
      "recovery_error": recovery_error(u, target),
      "final_train_loss": loss_fn(u, batch),
      "hessian_trace": trace.value,
      "hessian_trace_stderr": trace.stderr,
      "top_eigenvalue": top[0],
      "noise_stability": stability.value,
      "noise_stability_stderr": stability.stderr,
      "factor_norm": jnp.linalg.norm(u),
    }

  return measure


def methods(settings: Settings) -> dict[str, dict[str, Any]]:
  """GD, GD for NSO's gradient evaluations, and NSO: how each runs, its cost.

  GD's first ``steps`` steps are the start of the long GD run: one run gives
  both.
  """
  k = settings.num_perturbations
  gd = optax.sgd(settings.learning_rate)
  nso = nso_jax.nso(gd, settings.sigma, k, key=0)
  gd_runner = make_runner(gd, settings.record_every, perturbed=False)
  return {
    "gd": {"label": "GD", "steps": settings.steps, "per_step": 1},
    "gd-long": {
      "label": f"GD, {2 * k}x steps",
      "tx": gd,
      "runner": gd_runner,
      "steps": 2 * k * settings.steps,
      "per_step": 1,
    },
    "nso": {
      "label": f"NSO (sigma={settings.sigma:g}, k={k})",
      "tx": nso,
      "runner": make_runner(nso, settings.record_every, perturbed=True),
      "steps": settings.steps,
      "per_step": 2 * k,
    },
  }


def train(method: dict[str, Any], problem, u0, seed: int, chunk: int, advance):
  """Runs ``method`` from ``u0``: ``u`` after ``chunk`` chunks, final ``u``, curves."""
  state = method["tx"].init(u0)
  if method["per_step"] > 1:
    key = jax.random.fold_in(jax.random.key(seed), 3)
    state = optax.tree_utils.tree_set(state, key=key)
  u, losses, errors, snapshot = u0, [], [], u0
  for index in range(method["steps"] // method["every"]):
    u, state, loss, error = method["runner"](
      u, state, problem["a"], problem["y"], problem["target"]
    )
    losses.append(loss)
    errors.append(error)
    if index + 1 == chunk:
      snapshot = u
    advance()
  curves = {"train_loss": jnp.stack(losses), "recovery_error": jnp.stack(errors)}
  return snapshot, u, curves


def run_scale(settings: Settings, scale: float, context: dict[str, Any]):
  """All seeds at one init scale: rows for GD, GD (long) and NSO."""
  plan = context["methods"]
  names = ("gd", "gd-long", "nso")
  chunks = settings.steps // settings.record_every
  for name in names:
    plan[name]["every"] = settings.record_every
  per_seed: dict[str, dict[str, list[Any]]] = {name: {} for name in names}
  curves: dict[str, dict[str, list[Any]]] = {name: {} for name in names}
  seconds = {"gd-long": 0.0, "nso": 0.0}
  total = settings.seeds * (plan["gd-long"]["steps"] + settings.steps)
  advance = context["progress"].task(
    f"init scale {scale:g}: GD, NSO", total // settings.record_every
  )

  def record(name, u, curve, seed, problem):
    values = context["measure"](
      u, jax.random.key(1000 + seed), problem["a"], problem["y"], problem["target"]
    )
    values = {key: float(value) for key, value in values.items()}
    values["best_recovery_error"] = float(jnp.min(curve["recovery_error"]))
    for key, value in values.items():
      per_seed[name].setdefault(key, []).append(value)
    for key, value in curve.items():
      curves[name].setdefault(key, []).append(np.asarray(value).tolist())

  for seed in range(settings.seeds):
    problem = make_problem(settings, seed)
    u0 = scale * problem["start"]
    start = time.perf_counter()
    middle, u, curve = train(plan["gd-long"], problem, u0, seed, chunks, advance)
    record("gd", middle, {k: v[:chunks] for k, v in curve.items()}, seed, problem)
    record("gd-long", u, curve, seed, problem)
    seconds["gd-long"] += time.perf_counter() - start
    start = time.perf_counter()
    _, u, curve = train(plan["nso"], problem, u0, seed, chunks, advance)
    record("nso", u, curve, seed, problem)
    seconds["nso"] += time.perf_counter() - start
    context["safe_point"]()
  return [
    # GD's run is the start of GD-long's: its time is counted there.
    _row(name, plan[name], per_seed[name], curves[name], seconds.get(name), settings)
    for name in names
  ]


def _row(name, method, per_seed, curves, seconds, settings):
  return {
    "method": name,
    "label": method["label"],
    "gradient_evaluations_per_step": method["per_step"],
    "steps_per_epoch": settings.record_every,
    "total_steps": method["steps"],
    "total_gradient_evaluations": method["steps"] * method["per_step"],
    "seconds": seconds,
    "per_seed": per_seed,
    "summary": {key: report.mean_std(values) for key, values in per_seed.items()},
    "curves": curves,
  }


def run(settings: Settings, context: dict[str, Any]) -> dict[str, Any]:
  """Runs ``matrix-sensing`` and writes its outputs (see
  :func:`nso_jax.app.experiments.run`)."""
  report.prepare_output(settings.output)
  context["measure"] = make_measure(settings)
  context["methods"] = methods(settings)
  groups = []
  with report.ProgressBars(settings.progress) as progress:
    context.update(progress=progress)
    for scale in settings.init_scales:
      groups.append((scale, run_scale(settings, scale, context)))
  return _finish(settings, groups, context)


def _finish(settings, groups, context):
  metrics = tuple(metric for metric, _, _ in COLUMNS)
  sections, scales = [], []
  for scale, rows in groups:
    differences = classify.paired_differences(rows, metrics, baseline="gd")
    labels = {row["method"]: row["label"] for row in rows}
    tables = {
      "results": output.table(rows, COLUMNS),
      "versus_gd": output.differences_table(differences, labels, COLUMNS, "GD"),
    }
    scales.append(
      {"init_scale": scale, "rows": rows, "versus_gd": differences, "tables": tables}
    )
    sections += [
      (f"init scale {scale:g} (mean ± std over seeds)", tables["results"]),
      (f"init scale {scale:g}: against GD", tables["versus_gd"]),
    ]
  results = {
    "experiment": "matrix-sensing",
    "settings": output.settings_dict(settings),
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
  groups_titled = [(f"init scale {scale:g}", rows) for scale, rows in groups]
  panels = [(metric, header) for metric, header, _ in COLUMNS]
  plots = {
    "curves.png": lambda path: output.draw_curves(groups_titled, path, CURVES),
  }
  for scale, rows in groups:
    plots[f"measures_init_{scale:g}.png"] = lambda path, rows=rows, scale=scale: (
      output.draw_bars(rows, panels, path, f"init scale {scale:g}")
    )
  return output.finish(settings, results, markdown, plots, context)
