"""Hessian trace, top eigenvalues and density: nso_jax against its peers.

One smooth (tanh) MLP and one batch, small enough for the exact Hessian
(``jax.hessian`` of the flattened loss, then ``eigvalsh``), so every estimate
is scored against the truth. At an equal budget of Hessian-vector products:

* trace, 99 matvecs, Rademacher probes: ``nso_jax.hessian.trace`` (probes one
  at a time in ``lax.map``), matfree's ``estimator_monte_carlo`` +
  ``monte_carlo_trace`` + ``sampler_signs`` (its documented recipe, probes
  vmapped), and PyHessian's ``hessian.trace(maxIter=99, tol=0)``;
* top-5 eigenvalues, 30 Lanczos steps with full reorthogonalisation:
  ``nso_jax.hessian.top_eigenvalues`` and matfree's ``tridiag_sym`` +
  ``eigvalsh``; PyHessian has power iteration with deflation only, run at its
  defaults (``maxIter=100, tol=1e-3``) and at the same 30 matvecs (6 each);
* spectral density, one SLQ run of 90 steps: ``nso_jax.hessian.
  spectral_density`` and PyHessian's ``density(iter=90, n_v=1)``.

PyHessian runs on CPU PyTorch with the same weights and data (same loss to
float32 rounding). Its ``density`` calls ``torch.eig``, which PyTorch removed;
a shim with ``torch.linalg.eigh`` stands in (the tridiagonal is symmetric).
Timings are side by side, medians; the accuracy is the mean over seeds.

Run: ``python -m benchmarks.hessian_peers --size small``.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from benchmarks import _common
from nso_jax import hessian

SIZES = {
  "small": {"batch": 256, "inputs": 16, "hidden": 32, "depth": 2, "classes": 10},
  "full": {"batch": 1024, "inputs": 32, "hidden": 64, "depth": 2, "classes": 10},
}
TRACE_MATVECS = 99
LANCZOS_STEPS = 30
TOP_K = 5
DENSITY_STEPS = 90


def make_problem(batch: int, inputs: int, hidden: int, depth: int, classes: int):
  """A tanh MLP with softmax cross-entropy, its parameters and one batch."""
  keys = jax.random.split(jax.random.key(0), depth + 3)
  widths = [inputs] + [hidden] * depth + [classes]
  params = [
    {
      "w": jax.random.normal(keys[i], (widths[i], widths[i + 1]))
      / math.sqrt(widths[i]),
      "b": 0.1 * jax.random.normal(jax.random.fold_in(keys[i], 1), (widths[i + 1],)),
    }
    for i in range(depth + 1)
  ]
  x = jax.random.normal(keys[-2], (batch, inputs))
  y = jax.random.randint(keys[-1], (batch,), 0, classes)

  def loss_fn(params, batch):
    h, labels = batch
    for i, layer in enumerate(params):
      h = h @ layer["w"] + layer["b"]
      if i < len(params) - 1:
        h = jnp.tanh(h)
    logp = jax.nn.log_softmax(h)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

  return params, loss_fn, (x, y)


def exact_spectrum(params, loss_fn, batch) -> np.ndarray:
  """All Hessian eigenvalues, from the dense Hessian (float64 eigvalsh)."""
  flat, unravel = ravel_pytree(params)
  dense = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat)
  dense = np.asarray(dense, np.float64)
  return np.linalg.eigvalsh(0.5 * (dense + dense.T))


def jax_candidates(params, loss_fn, batch):
  """nso_jax and matfree estimators, each ``key -> result``, jitted."""
  import matfree.decomp
  import matfree.stochtrace

  flat, unravel = ravel_pytree(params)

  def flat_matvec(v):
    tangent = unravel(v)
    out = hessian.hvp(loss_fn, params, batch, tangent)
    return ravel_pytree(out)[0]

  def nso_trace(key):
    return hessian.trace(
      loss_fn, params, batch, key, num_matvecs=TRACE_MATVECS, execution="map"
    ).value

  def matfree_trace(key):
    sampler = matfree.stochtrace.sampler_signs(flat, num=TRACE_MATVECS)
    estimate = matfree.stochtrace.estimator_monte_carlo(
      matfree.stochtrace.monte_carlo_trace(), sampler
    )
    return estimate(flat_matvec, key)

  def nso_top(key):
    return hessian.top_eigenvalues(
      loss_fn, params, batch, key, num_eigenvalues=TOP_K, num_steps=LANCZOS_STEPS
    )

  def matfree_top(key):
    start = jax.random.normal(key, flat.shape)
    tridiag = matfree.decomp.tridiag_sym(LANCZOS_STEPS, reortho="full")
    _, dense_tridiag, *_ = tridiag(flat_matvec, start)
    return jnp.linalg.eigvalsh(dense_tridiag)[::-1][:TOP_K]

  def nso_density(key):
    return hessian.spectral_density(
      loss_fn,
      params,
      batch,
      key,
      num_probes=1,
      num_steps=DENSITY_STEPS,
      execution="map",
    ).density

  return {
    "trace/nso_jax": nso_trace,
    "trace/matfree": matfree_trace,
    "top5/nso_jax": nso_top,
    "top5/matfree": matfree_top,
    "density/nso_jax": nso_density,
  }


class PyHessianPeer:
  """The same model in PyTorch, measured with PyHessian."""

  def __init__(self, params, batch):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)

    # PyHessian 0.1's density() calls torch.eig, which PyTorch removed (it
    # raises); the tridiagonal is symmetric, so eigh gives the same result.
    def _eig(matrix, eigenvectors=True):
      values, vectors = torch.linalg.eigh(matrix)
      return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    torch.eig = _eig
    import sys

    import pyhessian  # noqa: F401  (the package shadows its module's name)

    pyhessian_module = sys.modules["pyhessian.hessian"]

    self.torch = torch
    self.module = pyhessian_module
    self.matvecs = 0
    original = pyhessian_module.hessian_vector_product

    def counted(*args, **kwargs):
      self.matvecs += 1
      return original(*args, **kwargs)

    pyhessian_module.hessian_vector_product = counted
    layers = []
    for i, layer in enumerate(params):
      linear = torch.nn.Linear(*layer["w"].shape)
      with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.asarray(layer["w"]).T.copy()))
        linear.bias.copy_(torch.from_numpy(np.asarray(layer["b"]).copy()))
      layers.append(linear)
      if i < len(params) - 1:
        layers.append(torch.nn.Tanh())
    self.model = torch.nn.Sequential(*layers)
    self.criterion = torch.nn.CrossEntropyLoss()
    x, y = batch
    self.data = (
      torch.from_numpy(np.asarray(x)),
      torch.from_numpy(np.asarray(y)).long(),
    )

  def loss(self) -> float:
    with self.torch.no_grad():
      return float(self.criterion(self.model(self.data[0]), self.data[1]))

  def _hessian(self, seed: int):
    self.torch.manual_seed(seed)
    return self.module.hessian(self.model, self.criterion, data=self.data, cuda=False)

  def trace(self, seed: int) -> float:
    return float(np.mean(self._hessian(seed).trace(maxIter=TRACE_MATVECS, tol=0.0)))

  def top(self, seed: int, max_iter: int = 100, tol: float = 1e-3) -> np.ndarray:
    values, _ = self._hessian(seed).eigenvalues(maxIter=max_iter, tol=tol, top_n=TOP_K)
    return np.sort(np.asarray(values))[::-1]

  def density(self, seed: int) -> Any:
    return self._hessian(seed).density(iter=DENSITY_STEPS, n_v=1)


def run(
  size: str, repeats: int, num_seeds: int, with_pyhessian: bool
) -> dict[str, Any]:
  """Times and scores every estimator; returns the JSON payload."""
  settings = SIZES[size]
  params, loss_fn, batch = make_problem(**settings)
  spectrum = exact_spectrum(params, loss_fn, batch)
  exact_trace = float(spectrum.sum())
  exact_top = spectrum[::-1][:TOP_K]
  dim = int(spectrum.size)

  key = jax.random.key(0)
  compiled: dict[str, Any] = {}
  compile_s: dict[str, float] = {}
  for name, fn in jax_candidates(params, loss_fn, batch).items():
    compiled[name], compile_s[name] = _common.compile_timed(fn, key)
  candidates = {name: (lambda c=c: c(key)) for name, c in compiled.items()}

  peer = PyHessianPeer(params, batch) if with_pyhessian else None
  matvecs: dict[str, float] = {
    "trace/nso_jax": TRACE_MATVECS,
    "trace/matfree": TRACE_MATVECS,
    "top5/nso_jax": LANCZOS_STEPS,
    "top5/matfree": LANCZOS_STEPS,
    "density/nso_jax": DENSITY_STEPS,
  }
  if peer is not None:
    candidates["trace/pyhessian"] = lambda: peer.trace(0)
    candidates["top5/pyhessian"] = lambda: peer.top(0)
    candidates["top5/pyhessian@30"] = lambda: peer.top(0, max_iter=6, tol=0.0)
    candidates["density/pyhessian"] = lambda: peer.density(0)
    for name, fn in [
      ("trace/pyhessian", lambda: peer.trace(0)),
      ("top5/pyhessian", lambda: peer.top(0)),
      ("top5/pyhessian@30", lambda: peer.top(0, max_iter=6, tol=0.0)),
      ("density/pyhessian", lambda: peer.density(0)),
    ]:
      peer.matvecs = 0
      fn()
      matvecs[name] = peer.matvecs

  stats = _common.time_side_by_side(candidates, repeats=repeats, warmup=1)

  # Accuracy over seeds.
  seeds = range(num_seeds)
  errors: dict[str, list[float]] = {}

  def record(name: str, value: float) -> None:
    errors.setdefault(name, []).append(value)

  for seed in seeds:
    k = jax.random.key(seed)
    for method in ("nso_jax", "matfree"):
      est = float(compiled[f"trace/{method}"](k))
      record(f"trace/{method}", abs(est - exact_trace) / abs(exact_trace))
      top = np.asarray(compiled[f"top5/{method}"](k))
      record(
        f"top5/{method}", float(np.max(np.abs(top - exact_top) / np.abs(exact_top)))
      )
    if peer is not None:
      record("trace/pyhessian", abs(peer.trace(seed) - exact_trace) / abs(exact_trace))
      for name, kwargs in [
        ("top5/pyhessian", {}),
        ("top5/pyhessian@30", {"max_iter": 6, "tol": 0.0}),
      ]:
        top = peer.top(seed, **kwargs)
        record(name, float(np.max(np.abs(top - exact_top) / np.abs(exact_top))))

  results: dict[str, Any] = {}
  for name, s in stats.items():
    results[name] = {
      "steady": s,
      "compile_s": compile_s.get(name),
      "matvecs": matvecs.get(name),
      "mean_relative_error": (float(np.mean(errors[name])) if name in errors else None),
      "relative_errors": errors.get(name),
    }
  t = {name: s["median_s"] for name, s in stats.items()}
  ratios = {
    "trace_nso_over_matfree": t["trace/nso_jax"] / t["trace/matfree"],
    "top5_nso_over_matfree": t["top5/nso_jax"] / t["top5/matfree"],
  }
  if peer is not None:
    ratios.update(
      {
        "trace_pyhessian_over_nso": t["trace/pyhessian"] / t["trace/nso_jax"],
        "top5_pyhessian_over_nso": t["top5/pyhessian"] / t["top5/nso_jax"],
        "top5_pyhessian30_over_nso": t["top5/pyhessian@30"] / t["top5/nso_jax"],
        "density_pyhessian_over_nso": t["density/pyhessian"] / t["density/nso_jax"],
      }
    )
  for name, r in sorted(results.items()):
    err = r["mean_relative_error"]
    print(
      f"{name:22s} {r['steady']['median_s'] * 1e3:9.2f} ms  matvecs={r['matvecs']}"
      + (f"  rel.err={err:.3g}" if err is not None else ""),
      flush=True,
    )
  versions = {"matfree": _version("matfree")}
  if peer is not None:
    versions.update({"torch": _version("torch"), "pyhessian": _version("pyhessian")})
  return {
    "benchmark": "hessian_peers",
    "size": size,
    "machine": _common.machine_info(),
    "peer_versions": versions,
    "settings": settings,
    "num_params": dim,
    "pytorch_loss_minus_jax_loss": (
      peer.loss() - float(loss_fn(params, batch)) if peer is not None else None
    ),
    "exact": {"trace": exact_trace, "top5": exact_top.tolist()},
    "budgets": {
      "trace_matvecs": TRACE_MATVECS,
      "lanczos_steps": LANCZOS_STEPS,
      "density_steps": DENSITY_STEPS,
    },
    "num_seeds": num_seeds,
    "results": results,
    "ratios": ratios,
  }


def _version(package: str) -> str:
  from importlib import metadata

  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "absent"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("small", "full"), default="small")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--no-pyhessian", action="store_true")
  args = parser.parse_args(argv)
  with_pyhessian = not args.no_pyhessian
  if with_pyhessian:
    try:
      import pyhessian  # noqa: F401
      import torch  # noqa: F401
    except ImportError:
      print("PyHessian/PyTorch not installed: measuring JAX libraries only.")
      with_pyhessian = False
  payload = run(args.size, args.repeats, args.seeds, with_pyhessian)
  path = _common.write_result(
    f"hessian_peers_{_common.backend_tag()}_{args.size}", payload
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
