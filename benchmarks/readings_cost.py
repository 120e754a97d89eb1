"""What the curvature readings cost: the NSO step with and without them.

On the MLP of ``nso_step.py``, for each ``k``, three jitted candidates run side
by side (interleaved, shuffled per round) in one process:

* ``nso``: ``optax.chain(noise_stability(sigma, k), sgd)``, one step, with
  ``grad_fn = jax.value_and_grad(loss)`` (NSO keeps the mean perturbed loss);
* ``nso+readings``: the same optimizer wrapped in
  ``nso_jax.curvature_readings``, which adds the clean loss ``L(W)``;
* ``nso+tune_sigma``: the same optimizer in ``nso_jax.tune_sigma``, which
  reads the same way and moves ``sigma`` (a few scalar operations more);
* ``forward``: one forward pass, ``loss(params, batch)``.

It reports ``(nso+readings - nso) / forward`` (and the same for
``nso+tune_sigma``), the readings' cost in forward
passes (1 if the unused gradient of the clean evaluation is removed as dead
code), and the HLO op counts of each compiled program (as
``benchmarks/hlo_ops.py`` counts them), whose difference shows the same
without timing noise.

Run: ``python -m benchmarks.readings_cost --size small``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax
import optax

import nso_jax
from benchmarks import _common
from benchmarks import hlo_ops
from benchmarks import models
from benchmarks import nso_step


def build(params: Any, loss_fn: Any, batch: Any, k: int) -> dict[str, Any]:
  """name -> (compiled program, its arguments), for the four candidates."""
  nso = optax.chain(
    nso_jax.noise_stability(nso_step.SIGMA, k, key=0),
    optax.sgd(nso_step.LEARNING_RATE),
  )
  out: dict[str, Any] = {}
  for name, tx in (
    ("nso", nso),
    ("nso+readings", nso_jax.curvature_readings(nso)),
    ("nso+tune_sigma", nso_jax.tune_sigma(nso, target=0.05)),
  ):

    def step(params, state, batch, tx=tx):
      grad_fn = jax.value_and_grad(lambda p: loss_fn(p, batch))
      updates, state = tx.update(None, state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), state

    args = (params, tx.init(params), batch)
    out[name] = (_common.compile_timed(step, *args), args)
  out["forward"] = (_common.compile_timed(loss_fn, params, batch), (params, batch))
  return out


def measure(size: str, k: int, repeats: int, inner: int) -> dict[str, Any]:
  params, loss_fn, batch, settings = models.make_model("mlp", size)
  built = build(params, loss_fn, batch, k)
  candidates = {
    name: (lambda c=compiled, a=args: c(*a))
    for name, ((compiled, _), args) in built.items()
  }
  stats = _common.time_side_by_side(candidates, repeats=repeats, inner=inner)
  times = {name: s["median_s"] for name, s in stats.items()}
  ops = {}
  for name, ((compiled, _), _) in built.items():
    counts, digest = hlo_ops.op_counts(compiled.as_text())
    ops[name] = {"total_ops": sum(counts.values()), "ops": counts, "sha256": digest}
  extra = times["nso+readings"] - times["nso"]
  tuning_extra = times["nso+tune_sigma"] - times["nso"]
  return {
    "settings": settings,
    "num_params": _common.num_params(params),
    "k": k,
    "loadavg": list(os.getloadavg()),
    "compile_s": {name: seconds for name, ((_, seconds), _) in built.items()},
    "steady": stats,
    "hlo": ops,
    "ratios": {
      "readings_extra_over_forward": extra / times["forward"],
      "readings_over_nso": times["nso+readings"] / times["nso"],
      "tune_sigma_extra_over_forward": tuning_extra / times["forward"],
      "extra_ops": ops["nso+readings"]["total_ops"] - ops["nso"]["total_ops"],
      "forward_ops": ops["forward"]["total_ops"],
    },
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("small", "full"), default="small")
  parser.add_argument("--ks", default="1,4")
  parser.add_argument("--repeats", type=int, default=40)
  parser.add_argument("--inner", type=int, default=5)
  args = parser.parse_args(argv)
  payload: dict[str, Any] = {
    "benchmark": "readings_cost",
    "size": args.size,
    "machine": _common.machine_info(),
    "sigma": nso_step.SIGMA,
    "by_k": {},
  }
  for k in (int(k) for k in args.ks.split(",")):
    entry = measure(args.size, k, args.repeats, args.inner)
    payload["by_k"][str(k)] = entry
    times = {n: s["median_s"] * 1e3 for n, s in entry["steady"].items()}
    print(
      f"mlp k={k}: "
      + ", ".join(f"{n}={t:.3f}ms" for n, t in times.items())
      + f" | extra/forward={entry['ratios']['readings_extra_over_forward']:.2f}"
      + f" (tune_sigma {entry['ratios']['tune_sigma_extra_over_forward']:.2f})"
      + f" | ops: nso {entry['hlo']['nso']['total_ops']}, +readings "
      + f"{entry['hlo']['nso+readings']['total_ops']}, forward "
      + f"{entry['hlo']['forward']['total_ops']}",
      flush=True,
    )
  path = _common.write_result(
    f"readings_cost_{_common.backend_tag()}_{args.size}", payload
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
