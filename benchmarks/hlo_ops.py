"""Whether the compiled NSO step changed: HLO op counts of the default step.

Compiles one jitted ``optax.chain(noise_stability(sigma, k, key=0), sgd)``
step (the default execution) at k = 1 and 4 on the benchmark MLP and CNN,
and records, for the optimized HLO as XLA runs it:

* ``ops``: every instruction counted by opcode, fusion bodies included;
* ``kernels``: the summary of :func:`benchmarks.fusion.hlo_counts` (fusions,
  loops, launches per step);
* the same for the NSO gradient alone (``noise_stability_gradient`` under
  ``jit``, configurations ``<model>_gradient_k<k>``), which leaves the
  optimizer state out;
* ``op_sequence_sha256``: a hash of the opcodes in program order, names and
  constants left out, so two programs with the same hash differ at most in
  their names.

Compare two labels with ``--compare``: it prints, per configuration, whether
the counts and the hash agree. The refactors of the public API were checked
with it (``results/hlo_ops_cpu_<label>.json``).

Run: ``python -m benchmarks.hlo_ops --label after --compare before``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import optax

import nso_jax
from benchmarks import _common
from benchmarks import fusion
from benchmarks import models

RESULTS = Path(__file__).parent / "results"
CONFIGS = (("mlp", 1), ("mlp", 4), ("cnn", 1), ("cnn", 4))


def op_counts(text: str) -> tuple[dict[str, int], str]:
  """Opcode counts over every computation, and a hash of their sequence."""
  comps, _ = fusion._computations(text)
  ops: Counter = Counter()
  sequence = []
  for lines in comps.values():
    for line in lines:
      op = fusion._opcode(line)
      if op is not None:
        ops[op] += 1
        sequence.append(op)
  digest = hashlib.sha256(" ".join(sequence).encode()).hexdigest()
  return dict(sorted(ops.items())), digest


def compiled_gradient(params: Any, loss_fn: Any, batch: Any, k: int) -> Any:
  """The NSO gradient alone, ``noise_stability_gradient`` under ``jit``."""

  def gradient(params, key, batch):
    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
    return nso_jax.noise_stability_gradient(
      grad_fn, params, key, sigma=fusion.SIGMA, num_perturbations=k
    )

  return jax.jit(gradient).lower(params, jax.random.key(0), batch).compile()


def measure(size: str) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for (name, k), kind in itertools.product(CONFIGS, ("step", "gradient")):
    params, loss_fn, batch, _ = models.make_model(name, size)
    if kind == "step":
      compiled, _, _ = fusion.compiled_step("nso", params, loss_fn, batch, k=k)
    else:
      compiled = compiled_gradient(params, loss_fn, batch, k)
      name = f"{name}_gradient"
    text = compiled.as_text()
    ops, digest = op_counts(text)
    kernels = fusion.hlo_counts(text)
    out[f"{name}_k{k}"] = {
      "total_ops": sum(ops.values()),
      "ops": ops,
      "op_sequence_sha256": digest,
      "kernels": {
        key: kernels[key]
        for key in ("fusions", "while_loops", "kernel_like_ops", "launches_per_step")
      },
    }
    print(f"{name} k={k}: {sum(ops.values())} ops, sha256 {digest[:12]}", flush=True)
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("small", "full"), default="small")
  parser.add_argument("--label", required=True, help="result name suffix")
  parser.add_argument("--compare", default=None, help="a label to compare with")
  args = parser.parse_args(argv)
  record = {
    "machine": _common.machine_info(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "nso_jax": nso_jax.__version__,
    "size": args.size,
    "configs": measure(args.size),
  }
  path = RESULTS / f"hlo_ops_{jax.default_backend()}_{args.label}.json"
  path.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {path}")
  if args.compare:
    other = json.loads(
      (RESULTS / f"hlo_ops_{jax.default_backend()}_{args.compare}.json").read_text()
    )["configs"]
    for name, now in record["configs"].items():
      if name not in other:
        continue
      then = other[name]
      same = (
        now["ops"] == then["ops"]
        and now["op_sequence_sha256"] == then["op_sequence_sha256"]
      )
      changes = {
        op: now["ops"].get(op, 0) - then["ops"].get(op, 0)
        for op in sorted(set(now["ops"]) | set(then["ops"]))
      }
      diff = ", ".join(f"{op} {n:+d}" for op, n in changes.items() if n)
      print(
        f"{name}: {then['total_ops']} -> {now['total_ops']} ops, "
        f"{'identical' if same else 'DIFFERENT: ' + (diff or 'same counts, order')}"
      )


if __name__ == "__main__":
  main()
