"""Runs the whole benchmark suite: ``python -m benchmarks.run --size small``.

``--size small`` (the MLP and the CNN at every k, the transformer block at
k = 1 and 4) aims at 10 minutes on an idle 2-core CPU; ``--size full`` is for
a GPU (bigger models, more repeats). Each benchmark writes
``benchmarks/results/<name>_<backend>_<size>.json`` (and PNG plots); a
failing benchmark is reported and the others still run.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback

from benchmarks import conv_loops
from benchmarks import hessian_peers
from benchmarks import memory
from benchmarks import noise_cost
from benchmarks import nso_step

SUITES = {
  "small": {
    "noise_cost": ["--repeats", "40"],
    "nso_step_mlp": ["--size", "small", "--models", "mlp", "--repeats", "7"],
    "nso_step_other": [
      "--size",
      "small",
      "--models",
      "transformer",
      "--ks",
      "1,4",
      "--repeats",
      "5",
    ],
    "nso_step_cnn": ["--size", "small", "--models", "cnn", "--repeats", "3"],
    "memory": ["--size", "small", "--models", "mlp", "--ks", "1,4,16"],
    "conv_loops": ["--size", "small"],
    "hessian_peers": ["--size", "small", "--repeats", "5", "--seeds", "3"],
  },
  "full": {
    "noise_cost": ["--repeats", "100", "--size", "full"],
    "nso_step_mlp": ["--size", "full", "--models", "mlp,cnn,transformer"],
    "memory": ["--size", "full", "--models", "mlp,cnn,transformer"],
    "hessian_peers": ["--size", "full"],
    "conv_loops": ["--size", "full"],
  },
}

MAINS = {
  "conv_loops": conv_loops.main,
  "noise_cost": noise_cost.main,
  "nso_step_mlp": nso_step.main,
  "nso_step_other": nso_step.main,
  "nso_step_cnn": nso_step.main,
  "memory": memory.main,
  "hessian_peers": hessian_peers.main,
}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=tuple(SUITES), default="small")
  parser.add_argument(
    "--only", default=None, help="comma-separated benchmark names to run"
  )
  args = parser.parse_args(argv)
  suite = SUITES[args.size]
  names = args.only.split(",") if args.only else list(suite)
  start = time.perf_counter()
  failures = []
  for name in names:
    print(f"== {name} (load {os.getloadavg()[0]:.2f})", flush=True)
    t = time.perf_counter()
    try:
      MAINS[name](suite[name])
    except Exception:
      traceback.print_exc()
      failures.append(name)
    print(f"== {name}: {time.perf_counter() - t:.0f} s", flush=True)
  print(f"suite {args.size}: {time.perf_counter() - start:.0f} s; failed: {failures}")
  if failures:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
