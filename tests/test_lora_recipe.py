"""The recipes of docs/lora.md: Flat-LoRA and noise on chosen layers only.

Flat-LoRA trains low-rank factors ``a``, ``b`` of a frozen kernel ``W`` with
NSO's noise on the merged kernel ``W + a @ b``: the noise goes on the frozen
``base`` leaf through ``param_filter`` (the two add), a masked optimizer keeps
``base`` fixed, and a ``grad_fn`` differentiates the factors only. The worked
example, examples/flat_lora.py, runs here at a reduced size.
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import nso_jax
from nso_jax import hessian

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIGMA = 0.3
PAIRS = 2

_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(8, 3)), jnp.float32)
Y = jnp.asarray(_rng.normal(size=8), jnp.float32)
# A frozen 3x3 kernel and rank-1 factors (b nonzero, so `a` has a gradient).
PARAMS = jax.tree.map(
  lambda x: jnp.asarray(x, jnp.float32),
  {
    "base": _rng.normal(size=(3, 3)),
    "lora": {"a": 0.5 * _rng.normal(size=(3, 1)), "b": 0.5 * _rng.normal(size=(1, 3))},
  },
)


def merged_loss(kernel):
  """The loss of one kernel: a tanh layer summed into a scalar output."""
  return jnp.mean((jnp.sum(jnp.tanh(X @ kernel), axis=-1) - Y) ** 2)


def loss(params):
  lora = params["lora"]
  return merged_loss(params["base"] + lora["a"] @ lora["b"])


def base_only(path, leaf):
  del leaf
  return jax.tree_util.keystr(path) == "['base']"


def lora_grad_fn(params):
  """``(loss, grads)`` with the factors' gradient and zeros for ``base``."""

  def lora_loss(lora):
    return loss({"base": params["base"], "lora": lora})

  value, lora_grads = jax.value_and_grad(lora_loss)(params["lora"])
  return value, {"base": jnp.zeros_like(params["base"]), "lora": lora_grads}


@functools.cache
def readings():
  """What the Flat-LoRA tests compare, from one compiled function."""

  @jax.jit
  def compute(params, key):
    estimate = lambda grad_fn: nso_jax.noise_stability_gradient(
      grad_fn,
      params,
      key,
      sigma=SIGMA,
      num_perturbations=PAIRS,
      param_filter=base_only,
    )
    # By hand: pair j's noise is sample_noise(fold_in(key, j), params), drawn
    # for the whole tree; only its `base` leaf is added.
    grads, losses = [], []
    merged = params["base"] + params["lora"]["a"] @ params["lora"]["b"]
    for j in range(PAIRS):
      u = SIGMA * nso_jax.sample_noise(jax.random.fold_in(key, j), params)["base"]
      for sign in (1.0, -1.0):
        at = {"base": params["base"] + sign * u, "lora": params["lora"]}
        grads.append(jax.grad(loss)(at)["lora"])
        losses.append(merged_loss(merged + sign * u))
    # Filter-wise noise on `base`: scaled by the norms of W's columns (the
    # frozen leaf's filters), not of the merged kernel's.
    filterwise_value, _ = nso_jax.noise_stability_gradient(
      lora_grad_fn,
      params,
      key,
      sigma=nso_jax.filterwise(SIGMA),
      one_sided=True,
      param_filter=base_only,
    )
    z = nso_jax.sample_noise(jax.random.fold_in(key, 0), params)["base"]
    column_norms = jnp.linalg.norm(params["base"], axis=0)
    return {
      "filterwise": filterwise_value,
      "filterwise_by_hand": merged_loss(merged + SIGMA * column_norms * z),
      "estimate": estimate(lora_grad_fn),
      "by_hand": jax.tree.map(lambda *g: sum(g) / len(g), *grads),
      "losses": jnp.stack(losses),
      "clean": jax.value_and_grad(loss)(params),
    }

  return compute(PARAMS, jax.random.key(5))


def test_the_factors_gradient_is_the_mean_over_pairs_of_noise_on_base():
  r = readings()
  _, estimate = r["estimate"]
  for name in ("a", "b"):
    np.testing.assert_allclose(
      estimate["lora"][name], r["by_hand"][name], rtol=1e-5, atol=1e-7
    )
  np.testing.assert_array_equal(estimate["base"], np.zeros((3, 3)))
  # The noise changed the gradient: it is not the clean one.
  clean = r["clean"][1]["lora"]["a"]
  assert float(np.max(np.abs(estimate["lora"]["a"] - clean))) > 1e-3


def test_noise_on_base_is_noise_on_the_merged_kernel():
  # The perturbed losses are L(W + a @ b + U) and L(W + a @ b - U), U the
  # noise drawn on `base`: their mean is the value NSO reports.
  r = readings()
  value, _ = r["estimate"]
  np.testing.assert_allclose(value, np.mean(r["losses"]), rtol=1e-6)
  assert float(np.min(np.abs(np.asarray(r["losses"]) - r["clean"][0]))) > 1e-4


def test_filterwise_noise_on_base_is_scaled_by_the_frozen_kernels_filters():
  r = readings()
  np.testing.assert_allclose(r["filterwise"], r["filterwise_by_hand"], rtol=1e-6)


# Noise on one layer of a two-layer network.
LAYERS = {
  "hidden": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2),
  "head": jnp.array([0.7, -1.3]),
}
BATCH = {"x": X, "y": Y}


def layers_loss(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["hidden"])
  return jnp.mean((hidden @ params["head"] - batch["y"]) ** 2)


def hidden_only(path, leaf):
  del leaf
  return jax.tree_util.keystr(path) == "['hidden']"


NUM_PROBES = 512
HUGE_SIGMA = 100.0


@functools.cache
def layer_readings():
  """What the two layer tests compare, from one compiled function."""
  key = jax.random.key(2)
  grad_fn = jax.value_and_grad(lambda p: layers_loss(p, BATCH))

  @jax.jit
  def compute(params):
    # A noise scale far above the weights': it would swamp the head's
    # contribution if it reached the head.
    one_pair = nso_jax.noise_stability_gradient(
      grad_fn, params, key, sigma=HUGE_SIGMA, one_sided=True, param_filter=hidden_only
    )
    z = nso_jax.sample_noise(jax.random.fold_in(key, 0), params)["hidden"]
    at = {"hidden": params["hidden"] + HUGE_SIGMA * z, "head": params["head"]}
    full = jax.hessian(layers_loss)(params, BATCH)
    return {
      "one_pair": one_pair,
      "one_pair_by_hand": grad_fn(at),
      "block": full["hidden"]["hidden"].reshape(6, 6),
      "head_trace": jnp.trace(full["head"]["head"]),
      "trace": hessian.trace(
        layers_loss,
        params,
        BATCH,
        0,
        num_matvecs=NUM_PROBES,
        param_filter=hidden_only,
      ),
    }

  return compute(LAYERS)


def test_a_layer_outside_the_filter_is_evaluated_unperturbed():
  r = layer_readings()
  (value, grads), (expected_value, expected) = r["one_pair"], r["one_pair_by_hand"]
  np.testing.assert_allclose(value, expected_value, rtol=1e-6)
  for name in ("hidden", "head"):
    np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5, atol=1e-7)


def test_the_measures_read_the_block_the_filter_selects():
  r = layer_readings()
  block = np.asarray(r["block"])
  exact = float(np.trace(block))
  # Rademacher probes: each sample's variance is twice the sum of the squared
  # off-diagonal entries.
  off_diagonal = float(np.sum(block**2) - np.sum(np.diag(block) ** 2))
  tolerance = 5 * np.sqrt(2 * off_diagonal / NUM_PROBES) + 1e-5
  assert abs(float(r["trace"].value) - exact) < tolerance, (r["trace"], exact)
  # A trace that took in the head's block would be told apart.
  assert float(r["head_trace"]) > tolerance


def test_the_worked_example_trains_the_factors_and_leaves_base_bit_identical():
  spec = importlib.util.spec_from_file_location(
    "flat_lora", ROOT / "examples" / "flat_lora.py"
  )
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  result = example.run(pretrain_steps=100, adapt_steps=60)
  # The frozen weights are bit-identical, the factors trained, of rank 2.
  assert result["base_unchanged"]
  assert result["lora_changed"]
  assert result["rank"] == 2
  assert result["task2_after"] < 0.5 * result["task2_before"]
