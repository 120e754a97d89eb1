"""Compile time of the NSO step per execution strategy, on the benchmark CNN.

Compiles one jitted ``optax.chain(noise_stability(sigma, k, key=0,
execution=strategy), sgd)`` step (tracing, lowering and XLA compilation) of
``make_model("cnn", "small")`` for k = 1, 4, 8, 9 and the strategies
``"auto"``, ``"map"``, ``"unroll"`` and ``"vmap"``, each once in a fresh
function, and records the seconds with what ``"auto"`` chose
(the resolution the step itself makes).

Run: ``python -m benchmarks.compile_time`` (writes
``results/compile_time_<backend>.json`` and ``.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import jax

from benchmarks import _common
from benchmarks import fusion
from benchmarks import models
from nso_jax._src import batching

KS = (1, 4, 8, 9)
STRATEGIES = ("auto", "map", "unroll", "vmap")


def _auto_choice(params: Any, loss_fn: Any, batch: Any, k: int) -> str:
  """The strategy ``"auto"`` resolves to for the step's pairs, traced."""
  grad_fn = lambda p: jax.grad(loss_fn)(p, batch)

  out: dict[str, str] = {}

  def probe(params: Any) -> Any:  # traced, as inside the jitted step
    def pair(i: jax.Array) -> Any:
      return grad_fn(jax.tree.map(lambda w: w + 0.0 * i, params))

    out["choice"] = batching.resolve("auto", k, pair).strategy
    return params

  jax.eval_shape(probe, params)
  return out["choice"]


def measure(size: str) -> dict[str, Any]:
  rows = []
  for k, strategy in itertools.product(KS, STRATEGIES):
    params, loss_fn, batch, _ = models.make_model("cnn", size)
    _, _, seconds = fusion.compiled_step(
      "nso", params, loss_fn, batch, k=k, execution=strategy
    )
    chosen = _auto_choice(params, loss_fn, batch, k) if strategy == "auto" else ""
    rows.append(
      {"k": k, "strategy": strategy, "auto_chose": chosen, "seconds": seconds}
    )
    print(f"k={k} {strategy:7s} {chosen:7s} {seconds:7.2f} s", flush=True)
  return {"model": f"cnn/{size}", "rows": rows}


def markdown(payload: dict[str, Any]) -> str:
  seconds = {(r["k"], r["strategy"]): r["seconds"] for r in payload["rows"]}
  chose = {r["k"]: r["auto_chose"] for r in payload["rows"] if r["auto_chose"]}
  lines = [
    f"Compile seconds of one NSO step, {payload['model']}, "
    f"{payload['machine']['backend']} ({payload['machine']['cpu_count']} cores, "
    f"shared: load {payload['machine']['loadavg_start'][0]:.1f} at start).",
    "",
    "| k | " + " | ".join(STRATEGIES) + " | auto chose |",
    "| --- | " + " | ".join("---" for _ in STRATEGIES) + " | --- |",
  ]
  for k in KS:
    cells = " | ".join(f"{seconds[k, s]:.1f}" for s in STRATEGIES)
    lines.append(f"| {k} | {cells} | {chose.get(k, '')} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--size", default="small", choices=sorted(models.SIZES))
  args = parser.parse_args()
  payload = measure(args.size)
  path = _common.write_result(f"compile_time_{_common.backend_tag()}", payload)
  written = json.loads(path.read_text())  # with the machine's description
  path.with_suffix(".md").write_text(markdown(written))
  print(path)


if __name__ == "__main__":
  main()
