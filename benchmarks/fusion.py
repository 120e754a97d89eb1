"""What the compiled NSO step is made of, and what its parts cost, per device.

Four sections, each recorded in one JSON file,
``results/fusion_<backend>[_<device>]_<size>.json`` (``<device>`` is a short
name of the accelerator, such as ``h100``; none on CPU):

* ``hlo``: the optimized HLO of one jitted ``optax.chain(noise_stability(...),
  sgd)`` step at k = 1, 4 and 16 (the ``auto`` strategy, and ``map`` at
  k = 16; and, at k = 4, the step written out by hand as in ``noise``)
  against the plain gradient step. Counted in the computations that
  run (the entry, loop bodies and conditions, command buffers; not the bodies
  of fusions): fusions by kind, custom calls by target (cuBLAS/cuDNN),
  ``while`` loops with their known trip counts, the other kernel-like
  operations, and launches per step (loop bodies times their trip counts);
  fusions that hash random bits (``xor`` inside) are counted apart. Plus
  XLA's cost analysis (FLOPs, bytes accessed).
* ``noise``: whether the noise draw is hidden. The same NSO step (default
  strategy) with ``noise="normal"``, ``"normal_fast"``, ``"rademacher"``;
  the same step written out with ``batching.sum_indices`` drawing the same
  noise, reading k precomputed noise trees instead (no random bits), or
  adding a constant; against the plain step and the noise draw alone.
* ``execution``: the NSO step under ``vmap``, ``map`` (chunk 1 and k/4) and
  ``unroll`` (up to ``--max-unroll``, 16) at k = 4, 16, 64, and the Hessian
  trace's probes alike at 4, 16, 64 and 100 matvecs: the measurements behind
  ``nso_jax.batching.default_execution``.
* ``determinism``: the same compiled step run again on the same inputs, and
  a second compilation of the same step, compared bit for bit; ``vmap``
  against ``map`` at the same key, to rounding.

Times: ``stream`` is ``--calls`` back-to-back calls on the same inputs,
blocked once at the end, per call (device time: dispatch overlaps the work);
``blocked`` is one call blocked on, as in ``nso_step.py`` (dispatch and
synchronisation included). Medians over interleaved, shuffled repeats.

Public API only: ``nso_jax``, ``nso_jax.batching``, ``nso_jax.hessian``.

Run: ``python -m benchmarks.fusion --size full`` (for an accelerator).
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nso_jax
from benchmarks import _common
from benchmarks import models
from nso_jax import batching
from nso_jax import hessian

SIGMA = 0.01
LEARNING_RATE = 0.01
SECTIONS = ("hlo", "noise", "execution", "determinism")

# Operations that launch nothing (views, bookkeeping) when they stand alone.
NO_KERNEL = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
  "add-dependency",
  "domain",
  "while",
  "conditional",
  "call",
}


# -- Steps ---------------------------------------------------------------------


def plain_step_fn(loss_fn: Any) -> Any:
  sgd = optax.sgd(LEARNING_RATE)

  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step, sgd


def nso_step_fn(loss_fn: Any, k: int, **kw: Any) -> Any:
  tx = optax.chain(
    nso_jax.noise_stability(SIGMA, k, key=0, **kw), optax.sgd(LEARNING_RATE)
  )

  def step(params, state, batch):
    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
    updates, state = tx.update(zeros, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  return step, tx


def compiled_step(kind: str, params: Any, loss_fn: Any, batch: Any, **kw: Any):
  """(compiled executable, its arguments, compile seconds)."""
  if kind == "plain":
    step, tx = plain_step_fn(loss_fn)
  elif kind == "handmade":
    step, (state, stacked) = handmade_step_fn(loss_fn, params=params, **kw)
    args = (params, state, batch, stacked)
    compiled, seconds = _common.compile_timed(step, *args)
    return compiled, args, seconds
  else:
    step, tx = nso_step_fn(loss_fn, **kw)
  args = (params, tx.init(params), batch)
  compiled, seconds = _common.compile_timed(step, *args)
  return compiled, args, seconds


def handmade_step_fn(loss_fn: Any, k: int, noise: str, params: Any) -> Any:
  """NSO's step written out with ``batching.sum_indices``, noise drawn or not.

  ``noise`` is ``"normal"`` (``nso_jax.sample_noise`` of ``fold_in(key, i)``,
  what the library draws), ``"fixed"`` (k noise trees precomputed outside the
  step, passed in as an argument and read from memory) or ``"constant"``
  (every entry +1: nothing drawn, nothing read). Returns ``(step, args)``.
  """
  sgd = optax.sgd(LEARNING_RATE)
  key = jax.random.key(0)
  stacked = jax.tree.map(
    lambda x: jax.random.normal(jax.random.key(7), (k, *x.shape), x.dtype), params
  )

  def noise_of(i, stacked):
    if noise == "normal":
      return nso_jax.sample_noise(jax.random.fold_in(key, i), params, "normal")
    if noise == "fixed":
      return jax.tree.map(lambda z: z[i], stacked)
    return jax.tree.map(jnp.ones_like, params)

  def step(params, state, batch, stacked):
    def pair(i):
      u = noise_of(i, stacked)
      up = jax.tree.map(lambda w, z: w + SIGMA * z, params, u)
      down = jax.tree.map(lambda w, z: w - SIGMA * z, params, u)
      g1 = jax.grad(loss_fn)(up, batch)
      g2 = jax.grad(loss_fn)(down, batch)
      return jax.tree.map(jnp.add, g1, g2)

    total = batching.sum_indices(pair, k)
    grads = jax.tree.map(lambda g: g / (2 * k), total)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step, (sgd.init(params), stacked)


# -- HLO accounting ------------------------------------------------------------

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-_]*)\(")


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  comps: dict[str, list[str]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match and "=" not in line.split("{")[0].split("(")[0]:
        current = match.group(2)
        comps[current] = []
        if match.group(1):
          entry = current
    elif line.strip() == "}":
      current = None
    else:
      comps[current].append(line)
  return comps, entry


def _opcode(line: str) -> str | None:
  if " = " not in line:
    return None
  match = _OPCODE.search(line.split(" = ", 1)[1])
  return match.group(1) if match else None


def _attr(line: str, name: str) -> list[str]:
  match = re.search(rf"\b{name}=\{{?([^}},\s]+(?:,\s*%?[\w.\-]+)*)\}}?", line)
  if not match:
    return []
  return [s.strip().lstrip("%") for s in match.group(1).split(",")]


def hlo_counts(text: str) -> dict[str, Any]:
  """Counts what the computations that run contain (not fusion bodies)."""
  comps, entry = _computations(text)
  fusion_kinds: Counter = Counter()
  custom_calls: Counter = Counter()
  custom_fusions: Counter = Counter()
  others: Counter = Counter()
  loops: list[dict[str, Any]] = []
  rng_fusions = 0
  launches = 0.0

  def fused_has_xor(name: str, seen: set[str]) -> bool:
    if name in seen or name not in comps:
      return False
    seen.add(name)
    for line in comps[name]:
      op = _opcode(line)
      if op == "xor":
        return True
      if op == "fusion" and any(fused_has_xor(c, seen) for c in _attr(line, "calls")):
        return True
    return False

  def visit(name: str, weight: float, depth: int) -> None:
    nonlocal rng_fusions, launches
    for line in comps.get(name, []):
      op = _opcode(line)
      if op is None:
        continue
      if op == "fusion":
        kind = re.search(r"kind=(\w+)", line)
        fusion_kinds[kind.group(1) if kind else "?"] += 1
        emitter = re.search(r'"kind":"(__[\w$]+)"', line)
        if emitter:  # kCustom: "__triton_nested_gemm_fusion" (a GEMM), ...
          custom_fusions[emitter.group(1)] += 1
        if any(fused_has_xor(c, set()) for c in _attr(line, "calls")):
          rng_fusions += 1
        launches += weight
      elif op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        custom_calls[target.group(1) if target else "?"] += 1
        launches += weight
      elif op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        n = int(trips.group(1)) if trips else None
        loops.append({"depth": depth, "known_trip_count": n})
        for sub in _attr(line, "body") + _attr(line, "condition"):
          visit(sub, weight * (n or 1), depth + 1)
      elif op == "conditional":
        for attr in ("branch_computations", "true_computation", "false_computation"):
          for sub in _attr(line, attr):
            visit(sub, weight, depth + 1)
      elif op == "call":
        for sub in _attr(line, "to_apply"):
          visit(sub, weight, depth)
      elif op not in NO_KERNEL:
        others[op] += 1
        launches += weight

  visit(entry, 1.0, 0)
  return {
    "fusions": sum(fusion_kinds.values()),
    "fusion_kinds": dict(fusion_kinds),
    "custom_fusion_emitters": dict(custom_fusions),
    "rng_fusions": rng_fusions,
    "custom_calls": sum(custom_calls.values()),
    "custom_call_targets": dict(custom_calls),
    "while_loops": len(loops),
    "loops": loops,
    "other_kernel_ops": dict(others),
    "kernel_like_ops": sum(fusion_kinds.values())
    + sum(custom_calls.values())
    + sum(others.values()),
    "launches_per_step": launches,
    "hlo_chars": len(text),
  }


def cost_analysis(compiled: Any) -> dict[str, float] | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  if not cost:
    return None
  keep = ("flops", "bytes accessed", "transcendentals", "optimal_seconds")
  return {k: float(v) for k, v in cost.items() if k in keep}


def section_hlo(
  size: str, model_names: tuple[str, ...], dump_dir: str | None = None
) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name in model_names:
    params, loss_fn, batch, _ = models.make_model(name, size)
    configs: dict[str, tuple[str, dict[str, Any]]] = {"plain": ("plain", {})}
    for k in (1, 4, 16):
      configs[f"nso_auto_k{k}"] = ("nso", {"k": k})
    configs["nso_map_k16"] = ("nso", {"k": 16, "execution": "map"})
    for noise in ("normal", "fixed", "constant"):
      configs[f"handmade_k4_{noise}"] = ("handmade", {"k": 4, "noise": noise})
    entry: dict[str, Any] = {"num_params": _common.num_params(params)}
    for cname, (kind, kw) in configs.items():
      compiled, _, seconds = compiled_step(kind, params, loss_fn, batch, **kw)
      text = compiled.as_text()
      if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        Path(dump_dir, f"{name}_{cname}.hlo.txt").write_text(text)
      counts = hlo_counts(text)
      counts["compile_s"] = seconds
      counts["cost"] = cost_analysis(compiled)
      entry[cname] = counts
      print(
        f"hlo {name} {cname}: fusions={counts['fusions']} "
        f"custom-calls={counts['custom_calls']} whiles={counts['while_loops']} "
        f"rng-fusions={counts['rng_fusions']} "
        f"other={sum(counts['other_kernel_ops'].values())} "
        f"launches/step={counts['launches_per_step']:.0f}",
        flush=True,
      )
    out[name] = entry
  return out


# -- Timing --------------------------------------------------------------------


def time_streams(
  candidates: dict[str, Any], *, repeats: int, calls: int, seed: int = 0
) -> dict[str, dict[str, Any]]:
  """Per-call seconds: ``calls`` back-to-back calls, blocked once (stream), and
  one call blocked on (blocked); interleaved and shuffled per round."""
  names = list(candidates)
  for name in names:  # warm up
    for _ in range(2):
      _common.block(candidates[name]())
  stream: dict[str, list[float]] = {n: [] for n in names}
  blocked: dict[str, list[float]] = {n: [] for n in names}
  rng = random.Random(seed)
  for _ in range(repeats):
    rng.shuffle(names)
    for name in names:
      fn = candidates[name]
      start = time.perf_counter()
      out = None
      for _ in range(calls):
        out = fn()
      _common.block(out)
      stream[name].append((time.perf_counter() - start) / calls)
      start = time.perf_counter()
      _common.block(fn())
      blocked[name].append(time.perf_counter() - start)
  return {
    n: {
      "stream_s": float(np.median(stream[n])),
      "stream_iqr_s": float(np.subtract(*np.percentile(stream[n], [75, 25]))),
      "blocked_s": float(np.median(blocked[n])),
      "repeats": repeats,
      "calls": calls,
    }
    for n in candidates
  }


def section_noise(
  size: str, model_names: tuple[str, ...], ks: tuple[int, ...], repeats: int, calls: int
) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name in model_names:
    params, loss_fn, batch, _ = models.make_model(name, size)
    entry: dict[str, Any] = {"num_params": _common.num_params(params), "by_k": {}}
    plain, plain_args, _ = compiled_step("plain", params, loss_fn, batch)
    key = jax.random.key(0)
    draws = {}
    for noise in ("normal", "normal_fast", "rademacher"):
      draw, _ = _common.compile_timed(
        lambda key, noise=noise, p=params: nso_jax.sample_noise(key, p, noise), key
      )
      draws[f"draw/{noise}"] = lambda c=draw, key=key: c(key)
    for k in ks:
      candidates: dict[str, Any] = {"plain": lambda c=plain, a=plain_args: c(*a)}
      candidates.update(draws)
      for noise in ("normal", "normal_fast", "rademacher"):
        compiled, args, _ = compiled_step(
          "nso", params, loss_fn, batch, k=k, noise=noise
        )
        candidates[f"nso/{noise}"] = lambda c=compiled, a=args: c(*a)
      for noise in ("normal", "fixed", "constant"):
        compiled, args, _ = compiled_step(
          "handmade", params, loss_fn, batch, k=k, noise=noise
        )
        candidates[f"handmade/{noise}"] = lambda c=compiled, a=args: c(*a)
      stats = time_streams(candidates, repeats=repeats, calls=calls)
      floor = 2 * k * stats["plain"]["stream_s"]
      ratios = {
        f"{n}_over_2k_plain": s["stream_s"] / floor
        for n, s in stats.items()
        if n.startswith(("nso/", "handmade/"))
      }
      fixed = stats["handmade/fixed"]["stream_s"]
      for label in (
        "nso/normal",
        "nso/normal_fast",
        "nso/rademacher",
        "handmade/normal",
        "handmade/constant",
      ):
        ratios[f"{label}_over_handmade_fixed"] = stats[label]["stream_s"] / fixed
      entry["by_k"][str(k)] = {"steady": stats, "ratios": ratios}
      print(
        f"noise {name} k={k}: "
        + ", ".join(f"{n}={s['stream_s'] * 1e3:.3f}ms" for n, s in stats.items())
        + f" | 2k*plain={floor * 1e3:.3f}ms",
        flush=True,
      )
    out[name] = entry
  return out


def section_execution(
  size: str,
  model_names: tuple[str, ...],
  ks: tuple[int, ...],
  trace_sizes: tuple[int, ...],
  repeats: int,
  calls: int,
  max_unroll: int = 16,
  progress: Any = None,
) -> dict[str, Any]:
  out: dict[str, Any] = {"nso_step": {}, "trace": {}}
  for name in model_names:
    params, loss_fn, batch, _ = models.make_model(name, size)
    plain, plain_args, _ = compiled_step("plain", params, loss_fn, batch)
    by_k: dict[str, Any] = {}
    for k in ks:
      settings: dict[str, dict[str, Any]] = {
        "vmap": {"execution": "vmap"},
        "map1": {"execution": batching.Execution("map", chunk_size=1)},
      }
      if k >= 8:
        settings[f"map{k // 4}"] = {
          "execution": batching.Execution("map", chunk_size=k // 4)
        }
      if k <= max_unroll:
        settings["unroll"] = {"execution": "unroll"}
      candidates: dict[str, Any] = {"plain": lambda c=plain, a=plain_args: c(*a)}
      compile_s = {}
      for label, kw in settings.items():
        compiled, args, compile_s[label] = compiled_step(
          "nso", params, loss_fn, batch, k=k, **kw
        )
        candidates[label] = lambda c=compiled, a=args: c(*a)
      stats = time_streams(candidates, repeats=repeats, calls=calls)
      best = min(settings, key=lambda s: stats[s]["stream_s"])
      default = batching.default_execution(
        convolutional=batching.computes_convolutions(jax.grad(loss_fn), params, batch),
        size=k,
      )
      default_label = "map1" if default == "map" else default
      by_k[str(k)] = {
        "steady": stats,
        "compile_s": compile_s,
        "best": best,
        "default": default_label,
        "default_over_best": stats[default_label]["stream_s"] / stats[best]["stream_s"],
        "over_2k_plain": {
          s: stats[s]["stream_s"] / (2 * k * stats["plain"]["stream_s"])
          for s in settings
        },
      }
      print(
        f"execution nso {name} k={k}: "
        + ", ".join(f"{s}={stats[s]['stream_s'] * 1e3:.3f}ms" for s in stats)
        + f" | best={best}, default={default_label}",
        flush=True,
      )
    out["nso_step"][name] = by_k
    if progress:
      progress(out)

  # The Hessian trace's probes, on the first model.
  name = model_names[0]
  params, loss_fn, batch, _ = models.make_model(name, size)
  key = jax.random.key(0)
  by_n: dict[str, Any] = {}
  for n in trace_sizes:
    trace_settings = {
      "vmap": batching.Execution("vmap"),
      "map1": batching.Execution("map", chunk_size=1),
    }
    if n >= 8:
      trace_settings[f"map{n // 4}"] = batching.Execution("map", chunk_size=n // 4)
    if n <= max_unroll:
      trace_settings["unroll"] = batching.Execution("unroll")
    candidates = {}
    compile_s = {}
    for label, execution in trace_settings.items():
      fn = lambda p, b, k, e=execution, n=n: hessian.trace(
        loss_fn, p, b, k, num_matvecs=n, execution=e
      )
      compiled, compile_s[label] = _common.compile_timed(fn, params, batch, key)
      candidates[label] = lambda c=compiled: c(params, batch, key)
    stats = time_streams(candidates, repeats=repeats, calls=max(1, calls // 4))
    best = min(stats, key=lambda s: stats[s]["stream_s"])
    default = batching.default_execution(size=n)
    default_label = "map1" if default == "map" else default
    out["trace"][name] = by_n
    by_n[str(n)] = {
      "steady": stats,
      "compile_s": compile_s,
      "best": best,
      "default": default_label,
      "default_over_best": stats[default_label]["stream_s"] / stats[best]["stream_s"],
    }
    print(
      f"execution trace {name} n={n}: "
      + ", ".join(f"{s}={stats[s]['stream_s'] * 1e3:.3f}ms" for s in stats)
      + f" | best={best}, default={default_label}",
      flush=True,
    )
    if progress:
      progress(out)
  out["trace"][name] = by_n
  return out


# -- Determinism ---------------------------------------------------------------


def _bits_equal(a: Any, b: Any) -> bool:
  return all(
    np.array_equal(
      np.atleast_1d(np.asarray(x)).view(np.uint8),
      np.atleast_1d(np.asarray(y)).view(np.uint8),
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _max_rel_diff(a: Any, b: Any) -> float:
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.max(np.abs(y)), 1e-30)
    worst = max(worst, float(np.max(np.abs(x - y)) / scale))
  return worst


def section_determinism(
  size: str, model_names: tuple[str, ...], k: int, runs: int
) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name in model_names:
    params, loss_fn, batch, _ = models.make_model(name, size)
    entry: dict[str, Any] = {}

    def three_steps(compiled, args):
      p, s, b = args
      for _ in range(3):
        p, s = compiled(p, s, b)
      return p

    first, args, _ = compiled_step("nso", params, loss_fn, batch, k=k)
    reference = jax.device_get(three_steps(first, args))
    same = [
      _bits_equal(reference, jax.device_get(three_steps(first, args)))
      for _ in range(runs)
    ]
    second, args2, _ = compiled_step("nso", params, loss_fn, batch, k=k)
    recompiled = jax.device_get(three_steps(second, args2))
    entry["same_executable_bitwise"] = all(same)
    entry["same_executable_runs"] = runs
    entry["recompiled_bitwise"] = _bits_equal(reference, recompiled)
    entry["recompiled_max_rel_diff"] = _max_rel_diff(recompiled, reference)
    strategies = {}
    for label, kw in {
      "map": {"execution": "map"},
      "vmap": {"execution": "vmap"},
      "unroll": {"execution": "unroll"},
    }.items():
      compiled, a, _ = compiled_step("nso", params, loss_fn, batch, k=k, **kw)
      got = jax.device_get(three_steps(compiled, a))
      strategies[label] = {
        "bitwise_vs_default": _bits_equal(got, reference),
        "max_rel_diff_vs_default": _max_rel_diff(got, reference),
      }
    entry["strategies_vs_default"] = strategies
    key = jax.random.key(0)
    trace = jax.jit(
      lambda p, b, k, f=loss_fn: hessian.trace(f, p, b, k, num_matvecs=20)
    )
    t0 = jax.device_get(trace(params, batch, key).value)
    entry["trace_same_executable_bitwise"] = all(
      _bits_equal(t0, jax.device_get(trace(params, batch, key).value))
      for _ in range(runs)
    )
    out[name] = entry
    print(f"determinism {name}: {entry}", flush=True)
  return out


# -- Main ----------------------------------------------------------------------


def device_tag() -> str:
  """``cpu``, or the backend and a short accelerator name (``gpu_h100``)."""
  backend = jax.default_backend()
  if backend == "cpu":
    return backend
  kind = jax.devices()[0].device_kind.lower()
  match = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", kind.replace("nvidia", ""))
  short = match.group(1) if match else re.sub(r"[^a-z0-9]+", "", kind)[:12]
  return f"{backend}_{short}"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("small", "full"), default="small")
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--models", default="mlp,cnn,transformer")
  parser.add_argument("--ks", default="4,16,64", help="k for the execution section")
  parser.add_argument("--noise-ks", default="1,4,16")
  parser.add_argument("--trace-sizes", default="4,16,64,100")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--calls", type=int, default=None)
  parser.add_argument("--out", default=None, help="result name (without .json)")
  parser.add_argument("--dump-hlo", default=None, help="folder for HLO texts")
  parser.add_argument("--max-unroll", type=int, default=16)
  args = parser.parse_args(argv)
  full = args.size == "full"
  repeats = args.repeats or (15 if full else 5)
  calls = args.calls or (20 if full else 3)
  model_names = tuple(args.models.split(","))
  sections = args.sections.split(",")
  payload: dict[str, Any] = {
    "benchmark": "fusion",
    "size": args.size,
    "machine": _common.machine_info(),
    "default_execution": batching.default_execution(),
    "timing": "stream_s: per call, `calls` calls back to back blocked once; "
    "blocked_s: one call blocked on. Medians over interleaved repeats.",
  }
  name = args.out or f"fusion_{device_tag()}_{args.size}"
  start = time.perf_counter()

  def save(section: str, result: dict[str, Any]) -> None:
    # Written after every section, so that an interrupted run keeps the rest.
    payload[section] = result
    payload["seconds"] = time.perf_counter() - start
    path = _common.write_result(name, payload)
    print(f"wrote {path} ({section}, {payload['seconds']:.0f} s)", flush=True)

  for section in sections:
    if section == "hlo":
      save(section, section_hlo(args.size, model_names, args.dump_hlo))
    elif section == "noise":
      noise_ks = tuple(int(k) for k in args.noise_ks.split(","))
      save(section, section_noise(args.size, model_names, noise_ks, repeats, calls))
    elif section == "execution":
      ks = tuple(int(k) for k in args.ks.split(","))
      trace_sizes = tuple(int(n) for n in args.trace_sizes.split(","))
      save(
        section,
        section_execution(
          args.size,
          model_names,
          ks,
          trace_sizes,
          repeats,
          calls,
          max_unroll=args.max_unroll,
          progress=lambda partial, s=section: save(s, partial),
        ),
      )
    elif section == "determinism":
      save(section, section_determinism(args.size, model_names, 4, runs=3))
    else:
      raise SystemExit(f"unknown section {section!r}; known: {SECTIONS}")


if __name__ == "__main__":
  main()
