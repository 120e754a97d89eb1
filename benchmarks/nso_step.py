"""NSO step time against the plain gradient step, a Python loop and SAM.

For each model and each ``k``, all candidates run side by side (interleaved,
shuffled per round) in one process, so their ratios hold on a noisy machine:

* ``plain``: one jitted SGD step on the clean gradient; the reference is
  ``2k x plain``, the floor of NSO's work;
* ``loop``: a PyTorch-style step, a Python loop dispatching ``2k`` jitted
  perturbed gradients (noise drawn once per pair), accumulating as it goes;
* ``nso/<strategy>``: one jitted ``optax.chain(noise_stability(...), sgd)``
  step for every execution strategy: ``vmap``, ``map`` with chunk sizes 1
  (sequential scan), 2, 4, ... below ``k``, and ``unroll``; plus the default
  (``auto``) with the ``normal_fast`` noise;
* ``sam`` (``k = 1``): ``optax.contrib.sam`` in opaque mode, also two
  gradients per step.

Run: ``python -m benchmarks.nso_step --size small``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import nso_jax
from benchmarks import _common
from benchmarks import models
from nso_jax import batching

SIGMA = 0.01
LEARNING_RATE = 0.01
SAM_RHO = 0.05


def strategies(k: int, chunk_sizes: tuple[int, ...]) -> dict[str, dict[str, Any]]:
  """Execution settings to compare at ``k``: every chunk size below ``k``."""
  out: dict[str, dict[str, Any]] = {"vmap": {"execution": "vmap"}}
  for chunk in chunk_sizes:
    if chunk < k or chunk == 1:
      out[f"map{chunk}"] = {"execution": batching.Execution("map", chunk_size=chunk)}
  out["unroll"] = {"execution": "unroll"}
  return out


def build_candidates(
  params: Any,
  loss_fn: Any,
  batch: Any,
  k: int,
  *,
  chunk_sizes: tuple[int, ...],
  with_loop: bool = True,
) -> tuple[dict[str, Any], dict[str, float]]:
  """Returns name -> zero-argument step, and name -> compile seconds."""
  grad_fn_of = lambda b: lambda p: jax.grad(loss_fn)(p, b)
  sgd = optax.sgd(LEARNING_RATE)
  candidates: dict[str, Any] = {}
  compile_s: dict[str, float] = {}

  # The plain gradient step.
  sgd_state = sgd.init(params)

  def plain_step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled, seconds = _common.compile_timed(plain_step, params, sgd_state, batch)
  candidates["plain"] = lambda c=compiled: c(params, sgd_state, batch)
  compile_s["plain"] = seconds

  # 2k plain steps back to back, each blocked on: the floor measured over the
  # same stretch of time as an NSO step, so that a loaded machine (which
  # preempts long jobs more than short ones) weighs both alike.
  def plain_repeated(c=compiled):
    for _ in range(2 * k):
      out = _common.block(c(params, sgd_state, batch))
    return out

  candidates["plain_x2k"] = plain_repeated
  compile_s["plain_x2k"] = seconds

  # NSO, every strategy; the default strategy also with the fast noise.
  settings = {
    f"nso/{name}": dict(kw, noise="normal")
    for name, kw in strategies(k, chunk_sizes).items()
  }
  settings["nso/auto+normal_fast"] = {"execution": "auto", "noise": "normal_fast"}
  settings["nso/auto+rademacher"] = {"execution": "auto", "noise": "rademacher"}
  for name, kw in settings.items():
    tx = optax.chain(
      nso_jax.noise_stability(SIGMA, k, key=0, **kw), optax.sgd(LEARNING_RATE)
    )
    state = tx.init(params)

    def nso_step(params, state, batch, tx=tx):
      zeros = jax.tree.map(jnp.zeros_like, params)
      updates, state = tx.update(zeros, state, params, grad_fn=grad_fn_of(batch))
      return optax.apply_updates(params, updates), state

    compiled, seconds = _common.compile_timed(nso_step, params, state, batch)
    candidates[name] = lambda c=compiled, s=state: c(params, s, batch)
    compile_s[name] = seconds

  if with_loop:
    candidates["loop"], compile_s["loop"] = _python_loop(params, loss_fn, batch, k)
  if k == 1:
    candidates["sam"], compile_s["sam"] = _sam_step(params, loss_fn, batch)
  return candidates, compile_s


def _python_loop(params: Any, loss_fn: Any, batch: Any, k: int):
  """A PyTorch-style NSO step: 2k dispatches of a jitted gradient."""
  start = time.perf_counter()
  draw = jax.jit(
    lambda key, j: jax.tree.map(
      lambda z: SIGMA * z,
      nso_jax.sample_noise(jax.random.fold_in(key, j), params, "normal"),
    )
  )
  grad_at = jax.jit(
    lambda p, u, sign, b: jax.grad(loss_fn)(
      jax.tree.map(lambda w, n: w + sign * n, p, u), b
    )
  )
  accumulate = jax.jit(lambda acc, g: jax.tree.map(jnp.add, acc, g))
  sgd = optax.sgd(LEARNING_RATE)
  sgd_state = sgd.init(params)

  @jax.jit
  def apply(params, state, total):
    grads = jax.tree.map(lambda g: g / (2 * k), total)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  key = jax.random.key(0)
  # Compile every piece once.
  u = draw(key, 0)
  g = grad_at(params, u, 1.0, batch)
  _common.block(apply(params, sgd_state, accumulate(g, g)))
  compile_s = time.perf_counter() - start

  def step():
    total = None
    for j in range(k):
      u = draw(key, j)
      for sign in (1.0, -1.0):
        g = grad_at(params, u, sign, batch)
        total = g if total is None else accumulate(total, g)
    return apply(params, sgd_state, total)

  return step, compile_s


def _sam_step(params: Any, loss_fn: Any, batch: Any):
  """``optax.contrib.sam`` (opaque mode): clean gradient + adversarial one."""
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(SAM_RHO))
  tx = optax.contrib.sam(
    optax.sgd(LEARNING_RATE), adversary, sync_period=2, opaque_mode=True
  )
  state = tx.init(params)

  def sam_step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    grad_fn = lambda p, _: jax.grad(loss_fn)(p, batch)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  compiled, seconds = _common.compile_timed(sam_step, params, state, batch)
  return (lambda: compiled(params, state, batch)), seconds


def derived_ratios(
  k: int, times: dict[str, float], convolutional: bool = False
) -> dict[str, float]:
  """Ratios against the targets: 2k x plain, the loop, and SAM."""
  # The floor: 2k plain steps timed back to back (see build_candidates);
  # 2k x the single-step median is reported too.
  floor = times.get("plain_x2k", 2 * k * times["plain"])
  nso = {n: t for n, t in times.items() if n.startswith("nso/")}
  default = f"nso/{_default_name(convolutional, k)}"
  exact_noise = {n: t for n, t in nso.items() if "+" not in n}
  best = min(exact_noise, key=exact_noise.get)
  ratios = {
    "best_strategy": best,
    "best_over_2k_plain": nso[best] / floor,
    "default_strategy": default,
    "default_over_2k_plain": nso[default] / floor,
    "default_fast_noise_over_2k_plain": nso["nso/auto+normal_fast"] / floor,
    "default_rademacher_over_2k_plain": nso["nso/auto+rademacher"] / floor,
  }
  if "loop" in times:
    ratios["best_over_loop"] = nso[best] / times["loop"]
    ratios["default_over_loop"] = nso[default] / times["loop"]
    ratios["loop_over_2k_plain"] = times["loop"] / floor
  if "sam" in times:
    ratios["default_over_sam"] = nso[default] / times["sam"]
    ratios["default_fast_noise_over_sam"] = nso["nso/auto+normal_fast"] / times["sam"]
    ratios["default_rademacher_over_sam"] = nso["nso/auto+rademacher"] / times["sam"]
    ratios["best_over_sam"] = nso[best] / times["sam"]
  for name, t in nso.items():
    ratios[f"{name}_over_2k_plain"] = t / floor
  ratios["default_over_2k_single_plain"] = nso[default] / (2 * k * times["plain"])
  ratios["plain_x2k_over_2k_single_plain"] = floor / (2 * k * times["plain"])
  return ratios


def _default_name(convolutional: bool, k: int) -> str:
  execution = batching.default_execution(convolutional=convolutional, size=k)
  return "map1" if execution == "map" else execution


def is_convolutional(loss_fn: Any, params: Any, batch: Any) -> bool:
  """Whether the gradient computes convolutions (as ``execution="auto"`` sees)."""
  return batching.computes_convolutions(jax.grad(loss_fn), params, batch)


def run(
  size: str,
  model_names: tuple[str, ...],
  ks: tuple[int, ...],
  repeats: int,
  chunk_sizes: tuple[int, ...] = (1, 2, 4),
) -> dict[str, Any]:
  """Measures every model and k; returns the JSON payload."""
  payload: dict[str, Any] = {
    "benchmark": "nso_step",
    "size": size,
    "machine": _common.machine_info(),
    "sigma": SIGMA,
    "default_execution": batching.default_execution(),
    "models": {},
  }
  for name in model_names:
    params, loss_fn, batch, settings = models.make_model(name, size)
    convolutional = is_convolutional(loss_fn, params, batch)
    entry: dict[str, Any] = {
      "settings": settings,
      "convolutional": convolutional,
      "num_params": _common.num_params(params),
      "batch_shapes": [list(x.shape) for x in batch],
      "by_k": {},
    }
    for k in ks:
      candidates, compile_s = build_candidates(
        params, loss_fn, batch, k, chunk_sizes=chunk_sizes
      )
      stats = _common.time_side_by_side(candidates, repeats=repeats)
      times = {n: s["median_s"] for n, s in stats.items()}
      entry["by_k"][str(k)] = {
        "loadavg": list(__import__("os").getloadavg()),
        "compile_s": compile_s,
        "steady": stats,
        "ratios": derived_ratios(k, times, convolutional),
      }
      print(
        f"{name} k={k}: "
        + ", ".join(f"{n}={t * 1e3:.2f}ms" for n, t in sorted(times.items()))
        + f" | 2k*plain={2 * k * times['plain'] * 1e3:.2f}ms",
        flush=True,
      )
    payload["models"][name] = entry
  return payload


def plot(payload: dict[str, Any], path: Any) -> None:
  """Step time / (2k x plain) against k, one panel per model."""
  machine = payload["machine"]
  title = f"NSO step cost, {machine['device_kind']} ({machine['backend']})"
  with _common.model_panels(payload, path, title) as panels:
    for ax, name in panels:
      by_k = payload["models"][name]["by_k"]
      ks = sorted(int(k) for k in by_k)
      series: dict[str, list[tuple[int, float]]] = {}
      for k in ks:
        entry = by_k[str(k)]
        steady = entry["steady"]
        floor = steady.get("plain_x2k", {}).get("median_s") or (
          2 * k * steady["plain"]["median_s"]
        )
        for cand, s in steady.items():
          if cand in ("plain", "plain_x2k", "sam"):
            continue
          series.setdefault(cand, []).append((k, s["median_s"] / floor))
      for cand, points in sorted(series.items()):
        xs, ys = zip(*points, strict=True)
        style = "--" if cand == "loop" else "-"
        ax.plot(xs, ys, style, marker="o", label=cand)
      ax.axhline(1.0, color="k", lw=0.8)
      ax.axhline(1.1, color="r", lw=0.8, ls=":", label="target 1.10")
      ax.set_xscale("log", base=2)
      ax.set_xlabel("k (pairs; 2k gradients)")
      ax.set_ylabel("step time / (2k x plain step)")
      ax.set_title(f"{name} ({payload['models'][name]['num_params']:,} params)")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("small", "full"), default="small")
  parser.add_argument("--models", default="mlp,cnn,transformer")
  parser.add_argument("--ks", default="1,2,4,8,16")
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args(argv)
  repeats = args.repeats or (15 if args.size == "small" else 30)
  payload = run(
    args.size,
    tuple(args.models.split(",")),
    tuple(int(k) for k in args.ks.split(",")),
    repeats,
  )
  tag = f"nso_step_{_common.backend_tag()}_{args.size}_{args.models.replace(',', '_')}"
  path = _common.write_result(tag, payload)
  plot(payload, path.with_suffix(".png"))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
