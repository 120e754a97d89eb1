"""Convolutions inside loops: why ``execution="auto"`` unrolls CNNs on CPU.

Side by side, on the benchmark CNN (``models.make_cnn``, small size):

* two gradients summed in a ``lax.fori_loop`` against the same two gradients
  unrolled (the shape of NSO's ``"map"`` and ``"unroll"`` strategies);
* the same with forward passes only (the loss, no gradient);
* 8 Hutchinson probes of the Hessian trace through
  ``nso_jax.hessian.trace``: ``execution="map"`` (probes one at a time in
  ``lax.map``), ``execution=Execution("map", chunk_size=8)`` (vmapped, in one chunk of
  ``lax.map``) and ``execution="unroll"`` (the same 8 products unrolled).
  The one-step ``lax.map`` of the vmapped candidate is a loop too, and as slow:
  ``execution="vmap"``, no loop at all, times close to unrolled.

On XLA:CPU the backward convolutions of a loop body keep their
non-canonical dimension labels and run through the generic emitter instead
of the fast convolution kernels, so the loop versions are an order of
magnitude slower; the forward convolution is unaffected. The script records
the ratios so that a new jax/XLA release can be checked by rerunning it.

Run: ``python -m benchmarks.conv_loops``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import _common
from benchmarks import models
from nso_jax import batching
from nso_jax import hessian

NUM_PROBES = 8


def candidates(size: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Returns name -> one-argument function of the parameters, and settings."""
  params, loss_fn, batch, settings = models.make_model("cnn", size)
  grad = jax.grad(loss_fn)

  def scaled(p, i):
    return jax.tree.map(lambda x: x * (1.0 + 0.01 * i), p)

  def grads_loop(p):
    def body(i, total):
      return jax.tree.map(jnp.add, total, grad(scaled(p, i), batch))

    return jax.lax.fori_loop(0, 2, body, jax.tree.map(jnp.zeros_like, p))

  def grads_unrolled(p):
    total = jax.tree.map(jnp.zeros_like, p)
    for i in range(2):
      total = jax.tree.map(jnp.add, total, grad(scaled(p, i), batch))
    return total

  def loss_loop(p):
    body = lambda i, total: total + loss_fn(scaled(p, i), batch)
    return jax.lax.fori_loop(0, 2, body, jnp.zeros(()))

  def loss_unrolled(p):
    return sum(loss_fn(scaled(p, i), batch) for i in range(2))

  key = jax.random.key(0)

  def trace_with(
    execution: str, chunk_size: int | None = None
  ) -> Callable[[Any], jax.Array]:
    def estimate(p):
      return hessian.trace(
        loss_fn,
        p,
        batch,
        key,
        num_matvecs=NUM_PROBES,
        execution=batching.Execution(execution, chunk_size=chunk_size),
      ).value

    return estimate

  fns = {
    "grads/loop": grads_loop,
    "grads/unrolled": grads_unrolled,
    "loss/loop": loss_loop,
    "loss/unrolled": loss_unrolled,
    "trace8/lax.map": trace_with("map"),
    "trace8/vmapped": trace_with("map", chunk_size=NUM_PROBES),
    "trace8/unrolled": trace_with("unroll"),
  }
  return {name: (fn, params) for name, fn in fns.items()}, settings


def run(size: str, repeats: int) -> dict[str, Any]:
  """Times every candidate; returns the JSON payload."""
  fns, settings = candidates(size)
  timed: dict[str, Any] = {}
  compile_s: dict[str, float] = {}
  for name, (fn, params) in fns.items():
    compiled, compile_s[name] = _common.compile_timed(fn, params)
    timed[name] = lambda c=compiled, p=params: c(p)
  stats = _common.time_side_by_side(timed, repeats=repeats)
  median = {name: s["median_s"] for name, s in stats.items()}
  ratios = {
    "grads_loop_over_unrolled": median["grads/loop"] / median["grads/unrolled"],
    "loss_loop_over_unrolled": median["loss/loop"] / median["loss/unrolled"],
    "trace_map_over_unrolled": median["trace8/lax.map"] / median["trace8/unrolled"],
    "trace_vmapped_over_unrolled": median["trace8/vmapped"] / median["trace8/unrolled"],
  }
  for name, t in sorted(median.items()):
    print(f"{name:20s} {t * 1e3:9.2f} ms", flush=True)
  print(", ".join(f"{n} = {r:.1f}" for n, r in ratios.items()))
  return {
    "benchmark": "conv_loops",
    "size": size,
    "machine": _common.machine_info(),
    "cnn_settings": settings,
    "num_probes": NUM_PROBES,
    "compile_s": compile_s,
    "steady": stats,
    "ratios": ratios,
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("small", "full"), default="small")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  payload = run(args.size, args.repeats)
  path = _common.write_result(
    f"conv_loops_{_common.backend_tag()}_{args.size}", payload
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
