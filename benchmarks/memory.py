"""Peak memory of the NSO step against k and execution strategy.

Two measures per configuration:

* the compiled step's own accounting, ``jax.jit(step).lower(...).compile()
  .memory_analysis()``: argument, output and temporary bytes (in process);
* the peak actually reached while running it, in a fresh subprocess per
  configuration: on CPU the process's peak resident set size (``VmHWM``), reset
  after compilation and warm-up through ``/proc/self/clear_refs`` so that it
  covers the steps alone; on GPU/TPU the device's ``peak_bytes_in_use`` from
  ``jax.devices()[0].memory_stats()``.

The plain gradient step is measured the same way as the baseline.

Run: ``python -m benchmarks.memory --size small``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import nso_jax
from benchmarks import _common
from benchmarks import models

STRATEGIES: dict[str, dict[str, Any]] = {
  "vmap": {"execution": "vmap"},
  "map1": {"execution": nso_jax.batching.Execution("map", chunk_size=1)},
  "map2": {"execution": nso_jax.batching.Execution("map", chunk_size=2)},
  "map4": {"execution": nso_jax.batching.Execution("map", chunk_size=4)},
  "unroll": {"execution": "unroll"},
}


def build_step(model: str, size: str, strategy: str, k: int):
  """Returns (step, args) for the plain step (``strategy == "plain"``) or NSO."""
  params, loss_fn, batch, _ = models.make_model(model, size)
  sgd = optax.sgd(0.01)
  if strategy == "plain":
    state = sgd.init(params)

    def step(params, state, batch):
      grads = jax.grad(loss_fn)(params, batch)
      updates, state = sgd.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step, (params, state, batch)
  tx = optax.chain(nso_jax.noise_stability(0.01, k, key=0, **STRATEGIES[strategy]), sgd)
  state = tx.init(params)

  def step(params, state, batch):
    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
    updates, state = tx.update(zeros, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  return step, (params, state, batch)


def _status_kib(field: str) -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  return -1


def child(config: dict[str, Any]) -> dict[str, Any]:
  """Runs one configuration in this (fresh) process and reports its peaks."""
  step, args = build_step(
    config["model"], config["size"], config["strategy"], config["k"]
  )
  compiled = jax.jit(step).lower(*args).compile()
  _common.block(compiled(*args))
  rss_before_kib = _status_kib("VmRSS")
  reset = False
  try:
    Path("/proc/self/clear_refs").write_text("5")
    reset = True
  except OSError:
    pass
  for _ in range(config.get("steps", 3)):
    _common.block(compiled(*args))
  out = {
    "rss_before_steps_bytes": rss_before_kib * 1024,
    "peak_rss_steps_bytes": _status_kib("VmHWM") * 1024 if reset else None,
    "peak_rss_process_bytes": _common.peak_rss_bytes(),
    "device_memory_stats": _common.device_memory_stats(),
  }
  if reset and out["peak_rss_steps_bytes"] is not None:
    out["rss_growth_in_steps_bytes"] = (
      out["peak_rss_steps_bytes"] - out["rss_before_steps_bytes"]
    )
  return out


def measure_subprocess(config: dict[str, Any]) -> dict[str, Any]:
  """Runs :func:`child` in a fresh interpreter; returns its JSON report."""
  cmd = [sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(config)]
  root = Path(__file__).resolve().parent.parent
  proc = subprocess.run(
    cmd, capture_output=True, text=True, check=True, cwd=root, env=dict(os.environ)
  )
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run(size: str, model_names: tuple[str, ...], ks: tuple[int, ...]) -> dict[str, Any]:
  """Measures every (model, strategy, k); returns the JSON payload."""
  payload: dict[str, Any] = {
    "benchmark": "memory",
    "size": size,
    "machine": _common.machine_info(),
    "models": {},
  }
  for model in model_names:
    entry: dict[str, Any] = {
      "settings": models.SIZES[size][model],
      "configs": {},
    }
    configs = [("plain", 1)] + [(s, k) for s in STRATEGIES for k in ks]
    for strategy, k in configs:
      step, args = build_step(model, size, strategy, k)
      analysis = _common.memory_analysis(jax.jit(step).lower(*args).compile())
      measured = measure_subprocess(
        {"model": model, "size": size, "strategy": strategy, "k": k}
      )
      entry["configs"][f"{strategy}/k{k}"] = {
        "strategy": strategy,
        "k": k,
        "memory_analysis": analysis,
        "measured": measured,
        "loadavg": list(os.getloadavg()),
      }
      temp = (analysis or {}).get("temp_size_in_bytes", -1)
      growth = measured.get("rss_growth_in_steps_bytes")
      print(
        f"{model} {strategy} k={k}: temp={temp / 2**20:.2f} MiB, "
        f"peak RSS={measured['peak_rss_process_bytes'] / 2**20:.1f} MiB, "
        f"growth in steps={(growth or 0) / 2**20:.2f} MiB",
        flush=True,
      )
    entry["ratios"] = _ratios(entry["configs"], ks)
    payload["models"][model] = entry
  return payload


def _total_bytes(analysis: dict[str, int]) -> int:
  return (
    analysis["argument_size_in_bytes"]
    + analysis["output_size_in_bytes"]
    + analysis["temp_size_in_bytes"]
    - analysis.get("alias_size_in_bytes", 0)
  )


def _ratios(configs: dict[str, Any], ks: tuple[int, ...]) -> dict[str, Any]:
  """Largest k over k=1 for each strategy, on every measure."""
  out: dict[str, Any] = {}
  k_max, k_min = max(ks), min(ks)
  for strategy in STRATEGIES:
    hi, lo = configs[f"{strategy}/k{k_max}"], configs[f"{strategy}/k{k_min}"]
    item: dict[str, Any] = {"k_max": k_max, "k_min": k_min}
    if hi["memory_analysis"] and lo["memory_analysis"]:
      item["temp_ratio"] = hi["memory_analysis"]["temp_size_in_bytes"] / max(
        lo["memory_analysis"]["temp_size_in_bytes"], 1
      )
      item["total_compiled_ratio"] = _total_bytes(hi["memory_analysis"]) / max(
        _total_bytes(lo["memory_analysis"]), 1
      )
    item["peak_rss_process_ratio"] = (
      hi["measured"]["peak_rss_process_bytes"]
      / lo["measured"]["peak_rss_process_bytes"]
    )
    if hi["measured"].get("peak_rss_steps_bytes"):
      item["peak_rss_steps_ratio"] = (
        hi["measured"]["peak_rss_steps_bytes"] / lo["measured"]["peak_rss_steps_bytes"]
      )
    stats_hi = hi["measured"].get("device_memory_stats") or {}
    stats_lo = lo["measured"].get("device_memory_stats") or {}
    if "peak_bytes_in_use" in stats_hi and "peak_bytes_in_use" in stats_lo:
      item["device_peak_ratio"] = (
        stats_hi["peak_bytes_in_use"] / stats_lo["peak_bytes_in_use"]
      )
    out[strategy] = item
  return out


def plot(payload: dict[str, Any], path: Path) -> None:
  """Compiled temporary bytes against k per strategy, one panel per model."""
  title = f"NSO step memory ({payload['machine']['backend']})"
  with _common.model_panels(payload, path, title) as panels:
    for ax, name in panels:
      configs = payload["models"][name]["configs"]
      for strategy in STRATEGIES:
        points = sorted(
          (c["k"], c["memory_analysis"]["temp_size_in_bytes"] / 2**20)
          for c in configs.values()
          if c["strategy"] == strategy and c["memory_analysis"]
        )
        if points:
          xs, ys = zip(*points, strict=True)
          ax.plot(xs, ys, marker="o", label=strategy)
      plain = configs["plain/k1"]["memory_analysis"]
      if plain:
        ax.axhline(
          plain["temp_size_in_bytes"] / 2**20, color="k", lw=0.8, label="plain"
        )
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("k")
      ax.set_ylabel("compiled temporary memory (MiB)")
      ax.set_title(name)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("small", "full"), default="small")
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--ks", default="1,2,4,8,16")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return
  payload = run(
    args.size, tuple(args.models.split(",")), tuple(int(k) for k in args.ks.split(","))
  )
  path = _common.write_result(f"memory_{_common.backend_tag()}_{args.size}", payload)
  plot(payload, path.with_suffix(".png"))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
