"""Hessian trace and top eigenvalues of a CNN on CPU: probe counts and peers.

The model is ``models.make_digits_cnn``: 37,754 parameters (conv 3x3 1->16,
conv 3x3 16->32, dense 2048->16, dense 16->10) on the 1,797 8x8 digits of
scikit-learn, all in one batch. Measured:

* ``hessian.trace`` with 8, 9, 16 and 100 Rademacher probes, default
  execution, called eagerly (``eager``: the first call, which traces and
  compiles, and warm calls) and inside ``jax.jit`` (``jit``: compile apart
  from run);
* ``hessian.top_eigenvalues``, top 5, its default 40 steps, the same ways;
* SciPy's ``eigsh`` (``k=5, which="LA"``, float32 ARPACK at its default
  tolerance) on a ``LinearOperator`` over the flattened jitted
  ``hessian.hvp``, with its number of products;
* matfree 0.6: ``estimator_monte_carlo`` + ``sampler_signs`` (100 probes)
  and ``tridiag_sym`` (40 steps, full reorthogonalisation) + ``eigvalsh``,
  jitted.

Candidates named in ``--isolate`` run one by one in a child process stopped
after ``--cap`` seconds: a stopped one is recorded as a lower bound
(``timed_out``). Candidates that take under 30 s per run are then timed
again side by side, interleaved, in one process, and their medians
reported. Values are recorded so that they can be compared: the traces
share their first probes (same key), the eigenvalues should agree with
eigsh's.

Run: ``python -m benchmarks.curvature_cnn --label before``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from benchmarks import _common
from benchmarks import models
from nso_jax import hessian

PROBES = (8, 9, 16, 100)
TOP_K = 5
MATFREE_STEPS = 40
REPEATS = 3
# Candidates faster than this per run are timed again side by side.
STEADY_BELOW_S = 30.0


def _as_list(tree: Any) -> Any:
  return np.asarray(tree).tolist()


def measure(fn: Callable[..., Any], args: tuple, mode: str) -> dict[str, Any]:
  """One candidate: first call (eager) or compile (jit), then one run.

  ``fn(*args)`` takes the parameters and data as arguments, so that under
  ``jax.jit`` they are inputs, not constants XLA would fold.
  """
  if mode == "jit":
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    run = lambda: compiled(*args)
  else:
    start = time.perf_counter()
    _common.block(fn(*args))
    compile_s = None
    first_s = time.perf_counter() - start
    run = lambda: fn(*args)
  start = time.perf_counter()
  out = _common.block(run())
  run_s = time.perf_counter() - start
  record: dict[str, Any] = {"mode": mode, "run_s": run_s, "compile_s": compile_s}
  if mode == "eager":
    record["first_call_s"] = first_s
    record["compile_s"] = max(first_s - run_s, 0.0)
  record["value"] = _as_list(out)
  record["_run"] = run
  return record


def library_candidates(params, loss_fn, data, modes) -> dict[str, tuple]:
  key = jax.random.key(0)
  out: dict[str, tuple] = {}
  for n in PROBES:
    fn = lambda p, d, n=n: hessian.trace(loss_fn, p, d, key, num_matvecs=n).value
    for mode in modes:
      out[f"trace{n}/{mode}"] = (fn, mode)
  top = lambda p, d: hessian.top_eigenvalues(loss_fn, p, d, key, num_eigenvalues=TOP_K)
  for mode in modes:
    out[f"top{TOP_K}/{mode}"] = (top, mode)
  return out


def flat_hvp(params, loss_fn, data) -> tuple[Callable, int]:
  flat, unravel = ravel_pytree(params)

  @jax.jit
  def product(p, d, v):
    return ravel_pytree(hessian.hvp(loss_fn, p, d, unravel(v)))[0]

  return (lambda v: product(params, data, v)), flat.size


def eigsh_candidate(params, loss_fn, data) -> tuple[Callable, dict[str, Any]]:
  import scipy.sparse.linalg as sla

  product, dim = flat_hvp(params, loss_fn, data)
  start = time.perf_counter()
  _common.block(product(jnp.zeros(dim)))
  info: dict[str, Any] = {"compile_s": time.perf_counter() - start, "matvecs": 0}

  def matvec(v: np.ndarray) -> np.ndarray:
    info["matvecs"] += 1
    return np.asarray(product(jnp.asarray(v.reshape(-1), jnp.float32)))

  operator = sla.LinearOperator((dim, dim), matvec=matvec, dtype=np.float32)
  v0 = np.asarray(jax.random.rademacher(jax.random.key(1), (dim,), jnp.float32))

  def run() -> np.ndarray:
    info["matvecs"] = 0
    values = sla.eigsh(operator, k=TOP_K, which="LA", v0=v0, return_eigenvectors=False)
    return np.sort(values)[::-1]

  return run, info


def matfree_candidates(params, loss_fn, data) -> dict[str, Callable]:
  import matfree.decomp
  import matfree.stochtrace

  flat, unravel = ravel_pytree(params)
  key = jax.random.key(0)

  def trace(params, data):
    product = lambda v: ravel_pytree(hessian.hvp(loss_fn, params, data, unravel(v)))[0]
    sampler = matfree.stochtrace.sampler_signs(flat, num=100)
    estimate = matfree.stochtrace.estimator_monte_carlo(
      matfree.stochtrace.monte_carlo_trace(), sampler
    )
    return estimate(product, key)

  def top(params, data):
    product = lambda v: ravel_pytree(hessian.hvp(loss_fn, params, data, unravel(v)))[0]
    start = jax.random.normal(key, flat.shape)
    tridiag = matfree.decomp.tridiag_sym(MATFREE_STEPS, reortho="full")
    _, dense, *_ = tridiag(product, start)
    return jnp.linalg.eigvalsh(dense)[::-1][:TOP_K]

  return {"matfree/trace100": trace, f"matfree/top{TOP_K}": top}


def isolated(name: str, batch: int, cap: float) -> dict[str, Any]:
  """Measures candidate ``name`` in a child process, stopped after ``cap`` s."""
  with tempfile.TemporaryDirectory() as tmp:
    out = f"{tmp}/record.json"
    command = [sys.executable, "-m", "benchmarks.curvature_cnn", "--only", name]
    command += ["--batch", str(batch), "--record", out]
    start = time.perf_counter()
    try:
      subprocess.run(command, check=True, timeout=cap)
    except subprocess.TimeoutExpired:
      return {
        "mode": "jit" if name.startswith("matfree") else name.split("/")[-1],
        "timed_out": True,
        "compile_s": None,
        "run_s": time.perf_counter() - start,
        "value": None,
        "note": f"stopped after {cap:.0f} s (compile and first run): a lower bound",
      }
    with open(out) as f:
      return json.load(f)


def only(name: str, batch: int, path: str) -> None:
  """Measures one library or matfree candidate; writes its record to ``path``."""
  params, loss_fn, data = models.make_digits_cnn(batch)
  candidates = library_candidates(params, loss_fn, data, ["eager", "jit"])
  if name.startswith("matfree"):
    fn, mode = matfree_candidates(params, loss_fn, data)[name], "jit"
  else:
    fn, mode = candidates[name]
  record = measure(fn, (params, data), mode)
  record.pop("_run")
  record["isolated"] = True
  with open(path, "w") as f:
    json.dump(record, f)


def run(
  label: str,
  batch: int,
  modes: list[str],
  cap: float,
  skip: list[str],
  isolate: list[str],
):
  params, loss_fn, data = models.make_digits_cnn(batch)
  records: dict[str, dict[str, Any]] = {}
  timed: dict[str, Callable] = {}

  def note(name: str, record: dict[str, Any]) -> None:
    run_fn = record.pop("_run", None)
    records[name] = record
    if run_fn is not None and record["run_s"] < STEADY_BELOW_S:
      timed[name] = run_fn
    print(f"{name:22s} {record}", flush=True)

  candidates = library_candidates(params, loss_fn, data, modes)
  for name, (fn, mode) in candidates.items():
    if any(s in name for s in skip):
      continue
    if name in isolate:
      note(name, isolated(name, batch, cap))
    else:
      note(name, measure(fn, (params, data), mode))
  eigsh_run, info = eigsh_candidate(params, loss_fn, data)
  start = time.perf_counter()
  values = eigsh_run()
  note(
    "scipy/eigsh",
    {
      "mode": "eager",
      "compile_s": info["compile_s"],
      "run_s": time.perf_counter() - start,
      "matvecs": info["matvecs"],
      "value": _as_list(values),
      "_run": eigsh_run,
    },
  )
  try:
    for name, fn in matfree_candidates(params, loss_fn, data).items():
      if any(s in name for s in skip):
        continue
      if name in isolate:
        note(name, isolated(name, batch, cap))
      else:
        note(name, measure(fn, (params, data), "jit"))
  except ImportError as error:  # pragma: no cover - optional peer
    records["matfree"] = {"skipped": str(error)}
  stats = _common.time_side_by_side(timed, repeats=REPEATS, warmup=0)
  for name, stat in stats.items():
    records[name]["steady"] = stat
  return {
    "benchmark": "curvature_cnn",
    "label": label,
    "machine": _common.machine_info(),
    "model": {
      "name": "digits_cnn",
      "architecture": "conv3x3 1->16, conv3x3 16->32 (SAME, ReLU), dense "
      "2048->16 (ReLU), dense 16->10, cross-entropy",
      "num_params": _common.num_params(params),
      "batch": int(data[0].shape[0]),
    },
    "results": records,
  }


def best_time(record: dict[str, Any]) -> float:
  """The steady median where measured, else the single run."""
  return record.get("steady", {}).get("median_s", record["run_s"])


def markdown(payload: dict[str, Any]) -> str:
  results, model = payload["results"], payload["model"]
  lines = [
    f"# curvature_cnn ({payload['label']})",
    "",
    f"Model: {model['architecture']}; {model['num_params']} parameters, batch "
    f"{model['batch']}. Machine: {payload['machine']['platform']}, "
    f"{payload['machine']['cpu_count']} CPUs, jax {payload['machine']['jax_version']}"
    f", load average {payload['machine']['loadavg_start']} at the start "
    f"(shared machine).",
    "",
    "| candidate | mode | compile / first-call overhead (s) | run (s) | value |",
    "| --- | --- | --- | --- | --- |",
  ]
  for name, r in results.items():
    if "run_s" not in r:
      lines.append(f"| {name} | skipped | | | {r} |")
      continue
    if r.get("timed_out"):
      lines.append(f"| {name} | {r['mode']} | | > {r['run_s']:.0f} ({r['note']}) | |")
      continue
    value = np.round(np.asarray(r["value"]), 4).tolist()
    compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
    lines.append(
      f"| {name} | {r['mode']} | {compile_s} | {best_time(r):.3f} | {value} |"
    )
  eigsh = results.get("scipy/eigsh")
  top = results.get(f"top{TOP_K}/eager") or results.get(f"top{TOP_K}/jit")
  if eigsh and top:
    bound = "> " if top.get("timed_out") else ""
    lines += [
      "",
      f"eigsh used {eigsh['matvecs']} products. top_eigenvalues / eigsh run "
      f"time: {bound}{best_time(top) / best_time(eigsh):.2f}",
    ]
  for note in payload.get("notes", []):
    lines += ["", note]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--label", default="after")
  parser.add_argument("--batch", type=int, default=1797)
  parser.add_argument("--modes", default="eager,jit")
  parser.add_argument("--cap", type=float, default=600.0)
  parser.add_argument("--skip", default="", help="comma-separated name parts")
  parser.add_argument("--isolate", default="", help="comma-separated names")
  parser.add_argument("--only", help=argparse.SUPPRESS)
  parser.add_argument("--record", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.only:
    only(args.only, args.batch, args.record)
    return
  skip = [s for s in args.skip.split(",") if s]
  isolate = [s for s in args.isolate.split(",") if s]
  payload = run(args.label, args.batch, args.modes.split(","), args.cap, skip, isolate)
  name = f"curvature_cnn_{_common.backend_tag()}_{args.label}"
  path = _common.write_result(name, payload)
  path.with_suffix(".md").write_text(markdown(payload))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
