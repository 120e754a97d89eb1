"""NSO on a ``data x noise`` mesh: training, equality with one device, collectives.

``python -m benchmarks.scaleout --mesh data=4,noise=2`` trains a benchmark
model with the batch split over ``data`` and the NSO pairs over ``noise``
(inside :func:`jax.shard_map`), checks that every step equals one device's,
and reads the compiled step: how many collectives of each kind it holds and
how many bytes its all-reduce moves. Without ``--mesh`` it covers the meshes
8x1, 1x8, 4x2 and 2x4, with replicated and with sharded (FSDP-style)
parameters, and writes ``results/scaleout_<backend>.json`` and ``.md``.

On a CPU the devices are simulated (``--xla_force_host_platform_device_count``,
set before JAX starts): they share the machine's cores, so step times here say
nothing about speed-up; the collective counts and bytes are what the compiled
program does on any backend. On GPUs or TPUs the script uses the real devices.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

MESHES = ((8, 1), (1, 8), (4, 2), (2, 4))
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}


def parse_mesh(text: str) -> tuple[int, int]:
  """``"data=4,noise=2"`` -> ``(4, 2)``."""
  sizes = {}
  for part in text.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in ("data", "noise") or not value.strip().isdigit():
      raise argparse.ArgumentTypeError(
        f"--mesh expects data=D,noise=N with positive integers, got {text!r}"
      )
    sizes[name.strip()] = int(value)
  data, noise = sizes.get("data", 1), sizes.get("noise", 1)
  if data < 1 or noise < 1:
    raise argparse.ArgumentTypeError(f"--mesh sizes must be >= 1, got {text!r}")
  return data, noise


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.scaleout")
  parser.add_argument("--mesh", type=parse_mesh, help="data=D,noise=N (one mesh)")
  parser.add_argument("--model", default="mlp", choices=("mlp", "cnn", "transformer"))
  parser.add_argument("--size", default="small", choices=("small", "full"))
  parser.add_argument("--k", type=int, default=4, help="NSO pairs per step")
  parser.add_argument("--sigma", type=float, default=0.01)
  parser.add_argument("--steps", type=int, default=5, help="training steps")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps")
  return parser


def count_collectives(hlo: str) -> dict[str, int]:
  """Collectives of each kind in compiled HLO text (async starts included)."""
  return {op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def all_reduce_bytes(hlo: str) -> int:
  """The bytes of the operands of every all-reduce in compiled HLO text."""
  total = 0
  for line in hlo.splitlines():
    match = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
    if not match:
      continue
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
      size = 1
      for dim in filter(None, dims.split(",")):
        size *= int(dim)
      total += DTYPE_BYTES.get(dtype, 4) * size
  return total


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  meshes = [args.mesh] if args.mesh else list(MESHES)
  num_devices = max(d * n for d, n in meshes)
  if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={num_devices}"
    )
  if "jax" in sys.modules:
    raise RuntimeError("benchmarks.scaleout must set XLA_FLAGS before JAX starts")
  run(args, meshes)


def run(args: argparse.Namespace, meshes: list[tuple[int, int]]) -> None:
  from functools import partial

  import jax
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import nso_jax
  from benchmarks import _common
  from benchmarks import models

  params, loss_fn, batch, settings = models.make_model(args.model, args.size)
  make_tx = partial(
    nso_jax.nso, optax.sgd(0.05, momentum=0.9), args.sigma, args.k, key=0
  )
  plain_tx = make_tx()

  @jax.jit
  def single_step(params, opt_state, batch):
    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
    updates, opt_state = plain_tx.update(None, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state

  reference, opt_state = [params], plain_tx.init(params)
  for _ in range(args.steps):
    new, opt_state = single_step(reference[-1], opt_state, batch)
    reference.append(new)

  def relative(a, b):
    diff = sum(
      float(np.sum((np.asarray(u, np.float64) - np.asarray(v, np.float64)) ** 2))
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    norm = sum(
      float(np.sum(np.asarray(v, np.float64) ** 2)) for v in jax.tree.leaves(b)
    )
    return (diff / norm) ** 0.5

  def on_mesh(data: int, noise: int, layout: str) -> dict:
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((data, noise), ("data", "noise"), axis_types=auto)
    tx = make_tx(execution=nso_jax.batching.Execution(axis="noise"), data_axis="data")

    @partial(
      jax.shard_map,
      mesh=mesh,
      in_specs=(P(), P(), P("data")),
      out_specs=(P(), P()),
    )
    def inner(params, opt_state, batch):
      grad_fn = lambda p: jax.grad(loss_fn)(p, batch)  # this shard's gradient
      updates, opt_state = tx.update(None, opt_state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), opt_state

    def spec(leaf):
      # Sharded: each weight matrix stored split over all devices along its
      # last axis (FSDP-style), gathered by shard_map for the step.
      split = leaf.ndim >= 2 and leaf.shape[-1] % (data * noise) == 0
      if layout == "sharded" and split:
        return P(*([None] * (leaf.ndim - 1)), ("data", "noise"))
      return P()

    shardings = jax.tree.map(lambda leaf: NamedSharding(mesh, spec(leaf)), params)

    def step(params, opt_state, batch):
      params, opt_state = inner(params, opt_state, batch)
      return jax.lax.with_sharding_constraint(params, shardings), opt_state

    placed_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    current = jax.device_put(params, shardings)
    state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
    compiled, compile_s = _common.compile_timed(step, current, state, placed_batch)
    hlo = compiled.as_text()
    errors = []
    for t in range(args.steps):
      previous = current
      current, state = compiled(current, state, placed_batch)
      update = jax.tree.map(lambda a, b: a - b, current, previous)
      expected = jax.tree.map(lambda a, b: a - b, reference[t + 1], reference[t])
      errors.append(relative(update, expected))
    timing = _common.time_side_by_side(
      {"step": lambda: compiled(current, state, placed_batch)},
      repeats=args.repeats,
      warmup=1,
    )["step"]
    return {
      "mesh": f"{data}x{noise}",
      "data": data,
      "noise": noise,
      "parameters": layout,
      "k": args.k,
      "pairs_per_device": -(-args.k // noise),
      "collectives": count_collectives(hlo),
      "all_reduce_bytes": all_reduce_bytes(hlo),
      "gradient_bytes": 4 * _common.num_params(params),
      "max_update_relative_error": max(errors),
      "loss_start_end": (float(loss_fn(params, batch)), float(loss_fn(current, batch))),
      "compile_s": compile_s,
      "step_median_s": timing["median_s"],
    }

  rows = []
  for data, noise in meshes:
    for layout in ("replicated", "sharded"):
      row = on_mesh(data, noise, layout)
      rows.append(row)
      start_loss, end_loss = row["loss_start_end"]
      print(
        f"{row['mesh']:>4} {layout:>10}: {row['collectives']}, all-reduce "
        f"{row['all_reduce_bytes']} B (gradient {row['gradient_bytes']} B), "
        f"update vs one device {row['max_update_relative_error']:.1e}, loss "
        f"{start_loss:.4f} -> {end_loss:.4f}, step {row['step_median_s'] * 1e3:.1f} ms"
      )
  if args.mesh:
    return
  payload = {
    "benchmark": "scaleout",
    "model": args.model,
    "size": args.size,
    "settings": settings,
    "k": args.k,
    "sigma": args.sigma,
    "steps": args.steps,
    "rows": rows,
  }
  name = f"scaleout_{_common.backend_tag()}"
  payload["machine"] = _common.machine_info()
  path = _common.write_result(name, payload)
  path.with_suffix(".md").write_text(markdown(payload))
  print(f"wrote {path} and {path.with_suffix('.md')}")


def markdown(payload: dict) -> str:
  lines = [
    f"# NSO on data x noise meshes ({payload['model']}, {payload['size']}, "
    f"k = {payload['k']})",
    "",
    f"Device: {payload['machine']['device_kind']} x {payload['machine']['num_devices']}"
    f" ({payload['machine']['backend']}), JAX {payload['machine']['jax_version']}.",
    "",
    "| mesh (data x noise) | parameters | pairs per device | all-reduce | all-gather "
    "| all-reduce bytes | gradient bytes | update vs one device |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for row in payload["rows"]:
    c = row["collectives"]
    lines.append(
      f"| {row['mesh']} | {row['parameters']} | {row['pairs_per_device']} "
      f"| {c['all-reduce']} | {c['all-gather']} | {row['all_reduce_bytes']} "
      f"| {row['gradient_bytes']} | {row['max_update_relative_error']:.1e} |"
    )
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
