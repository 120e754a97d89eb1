"""A scaling model of the NSO step on 8 to 256 devices, on paper.

From a measured single-device NSO step (an ``nso_step`` result file) and the
bytes one step moves (one all-reduce of the float32 gradient; the noise draw
moves none), the expected step time and efficiency on data-only, noise-only
and 2-D ``data x noise`` meshes:

* compute: the single-device step ``T1`` (``2k`` gradient evaluations on the
  global batch ``B``) divided among the devices. A device holding ``B / D``
  examples and ``ceil(k / N)`` of the ``k`` pairs computes for
  ``T1 * ceil(k / N) / k * max(B / D, b_sat) / B``: below ``b_sat`` examples
  a device is no faster (it is latency-bound), the assumption that limits
  data parallelism at a fixed global batch;
* communication: one ring all-reduce of the gradient over all ``n = D N``
  devices, ``2 (n - 1) / n * bytes / bandwidth + 2 log2(n) * latency``, with
  the bandwidth of the slowest link the ring crosses (no overlap with
  compute is assumed: a lower bound on efficiency).

Efficiency is ``T1 / (n * Tn)``. Interconnects (per device, one direction):

* NVIDIA H100 SXM: NVLink 4, 900 GB/s bidirectional per GPU within an
  8-GPU node (https://www.nvidia.com/en-us/data-center/h100/); across nodes
  one 400 Gb/s NDR InfiniBand adapter per GPU, as in DGX H100
  (https://www.nvidia.com/en-us/data-center/dgx-h100/): 450 and 50 GB/s.
* Google TPU v5p: inter-chip interconnect 1200 GB/s bidirectional per chip
  within a slice of up to 6144 chips
  (https://cloud.google.com/tpu/docs/v5p): 600 GB/s.

``python -m benchmarks.scaling_model results/nso_step_gpu_full_mlp.json``
prints the tables as Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DEVICES = (8, 16, 32, 64, 128, 256)
LATENCY_S = 10e-6  # per all-reduce stage: an assumption, stated in the output
INTERCONNECTS = {
  "H100 (NVLink in a node, NDR InfiniBand across)": lambda n: 450e9 if n <= 8 else 50e9,
  "TPU v5p (ICI)": lambda n: 600e9,
}


def all_reduce_s(num_bytes: float, n: int, bandwidth: float) -> float:
  if n == 1:
    return 0.0
  return 2 * (n - 1) / n * num_bytes / bandwidth + 2 * math.log2(n) * LATENCY_S


def step_s(
  t1: float, k: int, batch: int, b_sat: int, data: int, noise: int, comm: float
) -> float:
  pairs = math.ceil(k / noise) / k
  examples = max(batch / data, b_sat) / batch
  return t1 * pairs * examples + comm


def meshes(n: int, k: int) -> dict[str, tuple[int, int]]:
  """Data-only, noise-only and the 2-D mesh with the pair axis of size k."""
  noise_2d = math.gcd(n, k)
  return {"data only": (n, 1), "noise only": (1, n), "2-D": (n // noise_2d, noise_2d)}


def tables(t1: float, params: int, k: int, batch: int, b_sat: int) -> str:
  gradient_bytes = 4 * params
  out = []
  for name, bandwidth in INTERCONNECTS.items():
    out += [
      f"**{name}**: step time in ms (efficiency)",
      "",
      "| devices | data only | noise only | 2-D (data x noise) |",
      "| --- | --- | --- | --- |",
    ]
    for n in DEVICES:
      comm = all_reduce_s(gradient_bytes, n, bandwidth(n))
      cells = []
      for label, (data, noise) in meshes(n, k).items():
        seconds = step_s(t1, k, batch, b_sat, data, noise, comm)
        shape = f"{data}x{noise} " if label == "2-D" else ""
        cells.append(f"{shape}{seconds * 1e3:.3g} ({t1 / (n * seconds):.0%})")
      out.append(f"| {n} | " + " | ".join(cells) + " |")
    out.append("")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling_model")
  parser.add_argument("result", type=Path, help="an nso_step result JSON file")
  parser.add_argument("--model", default="mlp")
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument(
    "--b-sat", type=int, default=32, help="examples below which a device is no faster"
  )
  parser.add_argument(
    "--global-batch",
    type=int,
    help="model a larger global batch: the step time scaled linearly from the measured",
  )
  args = parser.parse_args(argv)
  result = json.loads(args.result.read_text())
  model = result["models"][args.model]
  steady = model["by_k"][str(args.k)]["steady"]
  default = result.get("default_execution", "vmap")
  nso = [name for name in steady if name.startswith("nso/")]
  key = next((name for name in nso if name.startswith(f"nso/{default}")), nso[0])
  t1 = steady[key]["median_s"]
  batch = model["settings"]["batch"]
  machine = result["machine"]
  measured = f"{t1 * 1e3:.3g} ms at batch {batch}"
  if args.global_batch:
    t1, batch = t1 * args.global_batch / batch, args.global_batch
  print(
    f"Measured on {machine['device_kind']} ({machine['backend']}, JAX "
    f"{machine['jax_version']}): the {args.model} ({model['num_params']} "
    f"parameters) NSO step at k = {args.k} ({key}) takes {measured}; modelled "
    f"at global batch {batch}: {t1 * 1e3:.3g} ms. The gradient all-reduce moves "
    f"{4 * model['num_params']} "
    f"bytes. Assumed: b_sat = {args.b_sat} examples, {LATENCY_S * 1e6:.0f} us "
    "per all-reduce stage, no overlap of communication with compute.\n"
  )
  print(tables(t1, model["num_params"], args.k, batch, args.b_sat))


if __name__ == "__main__":
  main()
