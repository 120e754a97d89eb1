"""Writes ``benchmarks/results/SUMMARY.md`` from the committed JSON results.

Every figure in the summary is read from a result file, never typed in:
``python -m benchmarks.summarize``.
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks._common import RESULTS_DIR


def _load(pattern: str) -> list[tuple[str, dict[str, Any]]]:
  return [
    (p.name, json.loads(p.read_text())) for p in sorted(RESULTS_DIR.glob(pattern))
  ]


def _verdict(holds: bool) -> str:
  return "holds" if holds else "**missed**"


def _machine_line(name: str, payload: dict[str, Any]) -> str:
  m = payload["machine"]
  return (
    f"`{name}`: {m['device_kind']} ({m['backend']}), jax {m['jax_version']}, "
    f"{m['cpu_count']} CPUs, load {m['loadavg_start'][0]:.1f} -> "
    f"{m['loadavg_end'][0]:.1f}"
  )


def nso_section(lines: list[str]) -> None:
  for name, payload in _load("nso_step_*.json"):
    lines.append(f"\n### NSO step, {name}\n")
    lines.append(_machine_line(name, payload) + "\n")
    lines.append(
      "| model | k | 2k plain steps (ms) | default: strategy, ms | default / 2k plain "
      "| + normal_fast / 2k plain | + rademacher / 2k plain | loop / 2k plain "
      "| default / loop | best strategy (/ 2k plain) | vmap / map1 |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, entry in payload["models"].items():
      for k, item in entry["by_k"].items():
        steady = item["steady"]
        r = item["ratios"]
        floor_s = steady.get("plain_x2k", {}).get("median_s")
        floor = (floor_s or 2 * int(k) * steady["plain"]["median_s"]) * 1e3
        default = steady[r["default_strategy"]]["median_s"] * 1e3
        vmap_over_map = steady["nso/vmap"]["median_s"] / steady["nso/map1"]["median_s"]
        lines.append(
          f"| {model} ({entry['num_params']:,}) | {k} | {floor:.2f} "
          f"| {r['default_strategy'][4:]}, {default:.2f} "
          f"| {r['default_over_2k_plain']:.2f} "
          f"| {r['default_fast_noise_over_2k_plain']:.2f} "
          f"| {r.get('default_rademacher_over_2k_plain', float('nan')):.2f} "
          f"| {r.get('loop_over_2k_plain', float('nan')):.2f} "
          f"| {r.get('default_over_loop', float('nan')):.2f} "
          f"| {r['best_strategy'][4:]} ({r['best_over_2k_plain']:.2f}) "
          f"| {vmap_over_map:.2f} |"
        )
    sam_rows = [
      (model, entry["by_k"]["1"]["ratios"])
      for model, entry in payload["models"].items()
      if "1" in entry["by_k"] and "default_over_sam" in entry["by_k"]["1"]["ratios"]
    ]
    if sam_rows:
      lines.append("\nk = 1 against `optax.contrib.sam` (both two gradients):\n")
      lines.append(
        "| model | default / sam | + normal_fast / sam | + rademacher / sam "
        "| best / sam |"
      )
      lines.append("|---|---|---|---|---|")
      for model, r in sam_rows:
        lines.append(
          f"| {model} | {r['default_over_sam']:.2f} "
          f"| {r['default_fast_noise_over_sam']:.2f} "
          f"| {r.get('default_rademacher_over_sam', float('nan')):.2f} "
          f"| {r['best_over_sam']:.2f} |"
        )


def noise_section(lines: list[str]) -> None:
  for name, payload in _load("noise_cost_*.json"):
    s = payload["steady"]
    lines.append(f"\n### Noise cost, {name}\n")
    lines.append(_machine_line(name, payload) + "\n")
    lines.append(f"{payload['num_elements']:,} float32 values, median of repeats:\n")
    lines.append("| sampler | ms | / normal |")
    lines.append("|---|---|---|")
    normal = s["flat/normal"]["median_s"]
    for key in sorted(s):
      seconds = s[key]["median_s"]
      lines.append(f"| {key} | {seconds * 1e3:.3f} | {seconds / normal:.2f} |")


def memory_section(lines: list[str]) -> None:
  for name, payload in _load("memory_*.json"):
    lines.append(f"\n### Memory, {name}\n")
    lines.append(_machine_line(name, payload) + "\n")
    lines.append(
      "| model | config | compiled temp (MiB) | args+out+temp (MiB) "
      "| measured peak (MiB) | RSS growth during steps (MiB) |"
    )
    lines.append("|---|---|---|---|---|---|")
    for model, entry in payload["models"].items():
      for config, c in entry["configs"].items():
        a = c["memory_analysis"] or {}
        total = (
          a.get("argument_size_in_bytes", 0)
          + a.get("output_size_in_bytes", 0)
          + a.get("temp_size_in_bytes", 0)
          - a.get("alias_size_in_bytes", 0)
        )
        m = c["measured"]
        growth = m.get("rss_growth_in_steps_bytes")
        peak = _measured_peak(m)
        lines.append(
          f"| {model} | {config} | {a.get('temp_size_in_bytes', 0) / 2**20:.2f} "
          f"| {total / 2**20:.2f} | {'' if peak is None else f'{peak / 2**20:.1f}'} "
          f"| {'' if growth is None else f'{growth / 2**20:.2f}'} |"
        )
      lines.append(
        "\nMeasured peak: the device's `peak_bytes_in_use` on GPU/TPU; on CPU the "
        "process's peak RSS during the timed steps (VmHWM reset after "
        "compilation), which includes the runtime's own few hundred MiB.\n"
      )
      lines.append("Largest k over smallest k, per strategy:\n")
      lines.append("| strategy | temp | args+out+temp | measured peak |")
      lines.append("|---|---|---|---|")
      for strategy, r in entry["ratios"].items():
        peak_ratio = r.get("device_peak_ratio", r.get("peak_rss_steps_ratio"))
        lines.append(
          f"| {strategy} (k={r['k_max']} / k={r['k_min']}) "
          f"| {r.get('temp_ratio', float('nan')):.2f} "
          f"| {r.get('total_compiled_ratio', float('nan')):.2f} "
          f"| {'' if peak_ratio is None else f'{peak_ratio:.2f}'} |"
        )


def _measured_peak(measured: dict[str, Any]) -> int | None:
  stats = measured.get("device_memory_stats") or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"]
  return measured.get("peak_rss_steps_bytes")


def hessian_section(lines: list[str]) -> None:
  for name, payload in _load("hessian_peers_*.json"):
    lines.append(f"\n### Hessian tools, {name}\n")
    lines.append(_machine_line(name, payload))
    lines.append(
      f"; peers {payload['peer_versions']}; {payload['num_params']:,} parameters, "
      f"exact trace {payload['exact']['trace']:.4g}; accuracy = mean relative "
      f"error over {payload['num_seeds']} seeds (top-5: worst of the five).\n"
    )
    lines.append("| estimator | matvecs | median (ms) | compile (s) | rel. error |")
    lines.append("|---|---|---|---|---|")
    for est, r in sorted(payload["results"].items()):
      err = r["mean_relative_error"]
      comp = r["compile_s"]
      lines.append(
        f"| {est} | {r['matvecs']} | {r['steady']['median_s'] * 1e3:.2f} "
        f"| {'' if comp is None else f'{comp:.2f}'} "
        f"| {'' if err is None else f'{err:.3g}'} |"
      )
    lines.append(
      "\nRatios: " + ", ".join(f"{k} = {v:.2f}" for k, v in payload["ratios"].items())
    )


def conv_loops_section(lines: list[str]) -> None:
  for name, payload in _load("conv_loops_*.json"):
    lines.append(f"\n### Convolutions inside loops, {name}\n")
    lines.append(_machine_line(name, payload) + "\n")
    lines.append("| candidate | median (ms) | compile (s) |")
    lines.append("|---|---|---|")
    for candidate, stats in sorted(payload["steady"].items()):
      lines.append(
        f"| {candidate} | {stats['median_s'] * 1e3:.2f} "
        f"| {payload['compile_s'][candidate]:.2f} |"
      )
    ratios = ", ".join(f"{n} = {r:.1f}" for n, r in payload["ratios"].items())
    lines.append(f"\nRatios: {ratios}")


def main() -> None:
  lines = ["# Benchmark results (generated by `python -m benchmarks.summarize`)"]
  nso_section(lines)
  noise_section(lines)
  memory_section(lines)
  hessian_section(lines)
  conv_loops_section(lines)
  text = "\n".join(lines) + "\n"
  (RESULTS_DIR / "TABLES.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
