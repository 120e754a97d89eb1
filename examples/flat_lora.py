"""Flat-LoRA with nso_jax: low-rank adaptation with NSO noise on the merged weight.

A two-layer tanh network is fitted to a task (task 1); then its weights are
frozen and its hidden layer is adapted to a shifted task (task 2) with rank-2
LoRA factors, ``kernel = W + a @ b``. As in Flat-LoRA (Li et al., ICML 2025),
NSO's noise goes on the merged kernel, not on the factors: it is drawn on
the frozen leaf ``W`` (``param_filter``), which adds to ``a @ b`` in the
forward pass. A masked optimizer keeps ``W`` fixed, and the gradient function
differentiates the factors only. The flatness of the merged kernel is then
measured with the same filter. See docs/lora.md.

Run it with ``python examples/flat_lora.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nso_jax
from nso_jax import hessian

D_IN, HIDDEN, RANK = 8, 16, 2
NUM_TRAIN = 64


def forward(params: dict[str, Any], x: jax.Array) -> jax.Array:
  """The network's output, with the hidden kernel merged from ``W + a @ b``."""
  base, lora = params["base"], params["lora"]
  kernel = base["hidden"] + lora["a"] @ lora["b"]
  return jnp.tanh(x @ kernel) @ base["head"]


def loss(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  """The mean squared error on ``batch = (x, y)``."""
  x, y = batch
  return jnp.mean((forward(params, x) - y) ** 2)


def merged_kernel(path: tuple[Any, ...], leaf: jax.Array) -> bool:
  """The filter: noise (and the curvature measure) on the hidden kernel only."""
  del leaf
  return jax.tree_util.keystr(path) == "['base']['hidden']"


def make_tasks(rng: np.random.Generator) -> tuple[Any, Any, Any]:
  """Task 1's data, and task 2's (train, test): a rank-2 shift of its teacher."""
  hidden = rng.normal(size=(D_IN, HIDDEN)) / np.sqrt(D_IN)
  head = rng.normal(size=HIDDEN) / np.sqrt(HIDDEN)
  shift = rng.normal(size=(D_IN, RANK)) @ rng.normal(size=(RANK, HIDDEN))
  shifted = hidden + shift / np.sqrt(D_IN * RANK)

  def sample(kernel: np.ndarray, n: int) -> tuple[jax.Array, jax.Array]:
    x = rng.normal(size=(n, D_IN))
    y = np.tanh(x @ kernel) @ head
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  return sample(hidden, 4 * NUM_TRAIN), sample(shifted, NUM_TRAIN), sample(shifted, 512)


def no_lora() -> dict[str, jax.Array]:
  """Factors whose product is zero: the pretrained network itself."""
  return {"a": jnp.zeros((D_IN, RANK)), "b": jnp.zeros((RANK, HIDDEN))}


@functools.partial(jax.jit, static_argnames="steps")
def pretrain(base: dict[str, Any], task1: Any, steps: int) -> dict[str, Any]:
  """Fits the whole network to task 1 with Adam: the "pretrained" weights."""
  base_loss = lambda base: loss({"base": base, "lora": no_lora()}, task1)
  tx = optax.adam(0.02)

  def step(carry: Any, _: None) -> tuple[Any, None]:
    base, state = carry
    updates, state = tx.update(jax.grad(base_loss)(base), state, base)
    return (optax.apply_updates(base, updates), state), None

  (base, _), _ = jax.lax.scan(step, (base, tx.init(base)), length=steps)
  return base


def lora_optimizer(sigma: Any, key: jax.Array) -> optax.GradientTransformation:
  """Adam on the factors, ``base`` frozen, NSO's noise on the merged kernel."""
  labels = {
    "base": {"hidden": "freeze", "head": "freeze"},
    "lora": {"a": "train", "b": "train"},
  }
  optimizer = optax.multi_transform(
    {"train": optax.adam(0.02), "freeze": optax.set_to_zero()}, labels
  )
  return nso_jax.nso(optimizer, sigma, 2, key=key, param_filter=merged_kernel)


@functools.partial(jax.jit, static_argnames="steps")
def adapt(params: dict[str, Any], train: Any, sigma: Any, steps: int) -> dict[str, Any]:
  """Trains the factors ``params["lora"]``; ``params["base"]`` stays frozen."""
  tx = lora_optimizer(sigma, key=0)

  def grad_fn(params: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    # Only the factors are differentiated; `base` gets zeros (it is frozen).
    lora_loss = lambda lora: loss({"base": params["base"], "lora": lora}, train)
    value, lora_grads = jax.value_and_grad(lora_loss)(params["lora"])
    zeros = jax.tree.map(jnp.zeros_like, params["base"])
    return value, {"base": zeros, "lora": lora_grads}

  def step(carry: Any, _: None) -> tuple[Any, None]:
    params, state = carry
    updates, state = tx.update(None, state, params, grad_fn=grad_fn)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=steps)
  return params


@jax.jit
def merged_kernel_trace(params: dict[str, Any], data: Any, key: Any) -> Any:
  """tr(H) of the loss in the merged kernel, through the same filter as NSO."""
  return hessian.trace(
    loss, params, data, key, num_matvecs=50, param_filter=merged_kernel
  )


def run(
  pretrain_steps: int = 300, adapt_steps: int = 200, sigma: float = 0.05, seed: int = 0
) -> dict[str, Any]:
  """Pretrains, adapts with Flat-LoRA and with plain LoRA; returns the numbers."""
  rng = np.random.default_rng(seed)
  task1, train, test = make_tasks(rng)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]))
  base = pretrain(
    {"hidden": normal(D_IN, HIDDEN), "head": normal(HIDDEN)}, task1, pretrain_steps
  )
  before = {"base": base, "lora": no_lora()}
  # The paper's B A with B = 0: here `a` is random and `b` starts at zero.
  start = {
    "base": base,
    "lora": {"a": normal(D_IN, RANK), "b": jnp.zeros((RANK, HIDDEN))},
  }
  # sigma is an argument of the compiled `adapt`: one compilation serves both.
  flat = adapt(start, train, sigma, adapt_steps)
  plain = adapt(start, train, 0.0, adapt_steps)
  trace = lambda params: merged_kernel_trace(params, train, seed)
  unchanged = jax.tree.map(lambda a, b: np.array_equal(a, b), flat["base"], base)
  evaluate = lambda params, data: float(jax.jit(loss)(params, data))
  return {
    "task1_pretrained": evaluate(before, task1),
    "task2_before": evaluate(before, train),
    "task2_after": evaluate(flat, train),
    "task2_test_after": evaluate(flat, test),
    "task2_test_plain_lora": evaluate(plain, test),
    "base_unchanged": all(jax.tree.leaves(unchanged)),
    "lora_changed": not any(
      np.array_equal(flat["lora"][name], start["lora"][name]) for name in ("a", "b")
    ),
    "rank": int(
      np.linalg.matrix_rank(
        np.asarray(flat["lora"]["a"]) @ np.asarray(flat["lora"]["b"])
      )
    ),
    "trainable": sum(x.size for x in jax.tree.leaves(flat["lora"])),
    "frozen": sum(x.size for x in jax.tree.leaves(base)),
    "trace_flat": trace(flat),
    "trace_plain": trace(plain),
  }


def main() -> None:
  """Prints the example's numbers."""
  r = run()
  print(f"task 1 loss after pretraining:   {r['task1_pretrained']:.4f}")
  print(f"task 2 train loss, before LoRA:  {r['task2_before']:.4f}")
  print(f"task 2 train loss, Flat-LoRA:    {r['task2_after']:.4f}")
  print(f"task 2 test loss, Flat-LoRA:     {r['task2_test_after']:.4f}")
  print(f"task 2 test loss, plain LoRA:    {r['task2_test_plain_lora']:.4f}")
  print(f"frozen weights bit-identical:    {r['base_unchanged']}")
  print(f"factors a and b trained:         {r['lora_changed']}")
  print(f"rank of a @ b: {r['rank']}; {r['trainable']} trained, {r['frozen']} frozen")
  for name in ("flat", "plain"):
    t = r[f"trace_{name}"]
    print(
      f"tr(H) of the merged kernel, {name + ' LoRA:':12} "
      f"{float(t.value):.3f} +/- {float(t.stderr):.3f}"
    )


if __name__ == "__main__":
  main()
