"""Flax Linen and NNX models trained with NSO, and checkpoint/resume."""

import functools
import pathlib
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import nso_jax
from nso_jax import training

NUM_CLASSES = 3


def _data(seed=0, n=32):
  x = jax.random.normal(jax.random.key(seed), (n, 5))
  y = jnp.argmax(x[:, :NUM_CLASSES], axis=1)
  return x, y


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(NUM_CLASSES)(x)


def _linen_state(tx, seed=0):
  net = LinenNet()
  x, _ = _data()
  variables = net.init(jax.random.key(seed), x, train=False)
  return training.TrainState.create(
    apply_fn=net.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=tx,
  )


def _linen_loss_fn(apply_fn, x, y, dropout_key):
  def loss_fn(params, batch_stats):
    logits, updates = apply_fn(
      {"params": params, "batch_stats": batch_stats},
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": dropout_key},
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    return loss, {"batch_stats": updates["batch_stats"], "accuracy": accuracy}

  return loss_fn


@jax.jit
def _linen_step(state, x, y, dropout_base_key):
  dropout_key = jax.random.fold_in(dropout_base_key, state.step)
  loss_fn = _linen_loss_fn(state.apply_fn, x, y, dropout_key)
  return training.train_step(state, loss_fn, clean_gradient=False)


def _run_linen(state, num_steps, dropout_seed=42):
  dropout_base_key = jax.random.key(dropout_seed)
  x, y = _data()
  for _ in range(num_steps):
    state, metrics = _linen_step(state, x, y, dropout_base_key)
  return state, metrics


@functools.cache
def _nso(sigma=0.05, key=0):
  # One transformation per setting: train states holding the same one share
  # their compiled steps (a transformation's functions are compared by identity).
  return nso_jax.nso(optax.sgd(0.1, momentum=0.9), sigma, 2, key=key)


def test_linen_batch_stats_come_from_the_clean_pass_only():
  state = _linen_state(_nso(sigma=0.5))
  x, y = _data()
  dropout_base_key = jax.random.key(42)
  new_state, metrics = _linen_step(state, x, y, dropout_base_key)
  loss_fn = _linen_loss_fn(
    state.apply_fn, x, y, jax.random.fold_in(dropout_base_key, 0)
  )
  _, clean_aux = loss_fn(state.params, state.batch_stats)
  chex.assert_trees_all_close(
    new_state.batch_stats, clean_aux["batch_stats"], rtol=1e-6, atol=1e-6
  )
  # A perturbed pass would have moved the statistics visibly.
  noise = nso_jax.sample_noise(jax.random.key(3), state.params)
  perturbed = jax.tree.map(lambda p, z: p + 0.5 * z, state.params, noise)
  _, perturbed_aux = loss_fn(perturbed, state.batch_stats)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(
      perturbed_aux["batch_stats"], clean_aux["batch_stats"], rtol=1e-3
    )
  assert set(metrics) == {"loss", "accuracy"}
  assert int(new_state.step) == 1


def test_linen_perturbed_passes_share_the_clean_dropout_mask_and_batch():
  # With sigma = 0, every perturbed gradient equals the clean gradient only if
  # each pass uses the same batch, batch statistics and dropout mask.
  x, y = _data()
  dropout_key = jax.random.key(7)
  state = _linen_state(nso_jax.noise_stability(0.0, 3, key=0))
  loss_fn = _linen_loss_fn(state.apply_fn, x, y, dropout_key)
  clean = jax.grad(lambda p: loss_fn(p, state.batch_stats)[0])(state.params)
  new_state, _ = jax.jit(lambda s: training.train_step(s, loss_fn))(state)
  chex.assert_trees_all_close(
    jax.tree.map(jnp.subtract, new_state.params, state.params),
    clean,
    rtol=1e-5,
    atol=1e-7,
  )


def test_linen_training_is_deterministic_by_key_and_learns():
  x, y = _data()
  a, metrics_a = _run_linen(_linen_state(_nso(key=1)), 25)
  b, _ = _run_linen(_linen_state(_nso(key=1)), 25)
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.batch_stats, b.batch_stats)
  c, _ = _run_linen(_linen_state(_nso(key=2)), 25)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(a.params, c.params)
  initial = _linen_state(_nso(key=1))
  logits = initial.apply_fn(
    {"params": initial.params, "batch_stats": initial.batch_stats}, x, train=False
  )
  first = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  assert float(metrics_a["loss"]) < float(first)


def test_train_state_forwards_extra_args():
  seen = {}

  def spy(updates, state, params=None, **extra):
    seen.update(extra)
    return updates, state

  tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), spy)
  state = _linen_state(tx)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  state.apply_gradients(grads=zeros, grad_fn=len, update_args={"value": 1.0})
  assert seen == {"grad_fn": len, "value": 1.0}


def test_train_step_works_with_transformations_without_extra_args():
  state = _linen_state(optax.scale_by_adam())
  x, y = _data()
  loss_fn = _linen_loss_fn(state.apply_fn, x, y, jax.random.key(0))
  new_state, _ = training.train_step(state, loss_fn)
  assert int(new_state.step) == 1


def _dense_state(tx):
  model = nn.Dense(1)
  x = jnp.ones((4, 3))
  params = model.init(jax.random.key(0), x)["params"]
  state = training.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  outputs = lambda p: model.apply({"params": p}, x)[:, 0]
  return state, outputs


_BAD_LOSS_FNS = {
  "a bare scalar": (
    lambda out: jnp.mean(out**2),
    TypeError,
    r"must return a pair \(loss, aux\).*it returned an array of shape \(\) and "
    r"dtype float32\. Return \(loss, \{\}\)",
  ),
  "a triple": (
    lambda out: (jnp.mean(out**2), {}, 1),
    TypeError,
    r"must return a pair \(loss, aux\).*it returned a tuple of 3 items",
  ),
  "None as aux": (
    lambda out: (jnp.mean(out**2), None),
    TypeError,
    r"`aux`, the second item returned by `loss_fn`, must be a dict.*it is None",
  ),
  "a non-scalar loss": (
    lambda out: (out**2, {}),
    ValueError,
    r"loss returned by `loss_fn` must be a scalar; it is an array of shape "
    r"\(4,\).*jnp\.mean",
  ),
  "an integer loss": (
    lambda out: (jnp.sum(out > 0), {}),
    TypeError,
    r"must be floating point.*dtype int32",
  ),
  "a string loss": (
    lambda out: ("loss", {}),
    TypeError,
    r"must be a scalar float array; it is a str",
  ),
}


@pytest.mark.parametrize("clean_gradient", [True, False])
@pytest.mark.parametrize("case", sorted(_BAD_LOSS_FNS))
def test_train_step_says_what_loss_fn_returned(case, clean_gradient):
  make_output, error, message = _BAD_LOSS_FNS[case]
  state, outputs = _dense_state(_nso(sigma=0.01))
  loss_fn = lambda params, batch_stats: make_output(outputs(params))
  with pytest.raises(error, match=message):
    training.train_step(state, loss_fn, clean_gradient=clean_gradient)
  with pytest.raises(error, match=message):
    jax.jit(lambda s: training.train_step(s, loss_fn, clean_gradient=clean_gradient))(
      state
    )


def test_train_step_accepts_a_list_pair_and_a_python_float_loss():
  state, outputs = _dense_state(optax.sgd(0.1))
  new_state, metrics = training.train_step(
    state, lambda params, batch_stats: [jnp.mean(outputs(params) ** 2), {"n": 4}]
  )
  assert int(new_state.step) == 1 and metrics["n"] == 4
  _, metrics = training.train_step(
    state, lambda params, batch_stats: (1.5, {}), clean_gradient=False
  )
  assert metrics == {"loss": 1.5}


def test_train_step_needs_the_nso_jax_train_state():
  state, outputs = _dense_state(optax.sgd(0.1))
  flax_state = train_state.TrainState.create(
    apply_fn=state.apply_fn, params=state.params, tx=state.tx
  )
  loss_fn = lambda params, batch_stats: (jnp.mean(outputs(params) ** 2), {})
  with pytest.raises(
    TypeError,
    match=r"must be an nso_jax\.training\.TrainState.*"
    r"got flax\.training\.train_state\.TrainState",
  ):
    training.train_step(flax_state, loss_fn)
  with pytest.raises(ValueError, match="`clean_gradient` must be True or False"):
    training.train_step(state, loss_fn, clean_gradient="no")


def test_flax_train_state_drops_grad_fn_and_the_error_points_here():
  # Flax's own apply_gradients calls tx.update(grads, opt_state, params) with
  # no extra arguments and hands any other keyword to `replace`.
  state, outputs = _dense_state(_nso(sigma=0.01))
  grad_fn = jax.grad(lambda params: jnp.mean(outputs(params) ** 2))
  grads = grad_fn(state.params)
  flax_nso = train_state.TrainState.create(
    apply_fn=state.apply_fn, params=state.params, tx=state.tx
  )
  with pytest.raises(ValueError, match=r"nso_jax\.training\.TrainState"):
    flax_nso.apply_gradients(grads=grads, grad_fn=grad_fn)
  flax_sgd = flax_nso.replace(tx=optax.sgd(0.1), opt_state=optax.sgd(0.1).init(grads))
  with pytest.raises(TypeError, match="unexpected keyword argument 'grad_fn'"):
    flax_sgd.apply_gradients(grads=grads, grad_fn=grad_fn)
  assert int(state.apply_gradients(grads=grads, grad_fn=grad_fn).step) == 1


def test_linen_checkpoint_resume_follows_the_same_trajectory(tmp_path):
  total, split = 6, 2
  straight, _ = _run_linen(_linen_state(_nso(key=5)), total)
  first, _ = _run_linen(_linen_state(_nso(key=5)), split)
  training.save_checkpoint(tmp_path / "ckpt", first)
  fresh = _linen_state(_nso(key=5), seed=99)
  restored = training.restore_checkpoint(tmp_path / "ckpt", fresh)
  chex.assert_trees_all_equal(
    jax.tree.map(jax.random.key_data, restored.opt_state[0].key),
    jax.random.key_data(first.opt_state[0].key),
  )
  resumed, _ = _run_linen(restored, total - split)
  chex.assert_trees_all_equal(resumed.params, straight.params)
  chex.assert_trees_all_equal(resumed.batch_stats, straight.batch_stats)
  chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)
  assert int(resumed.step) == total


def test_linen_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
  total, split = 6, 2
  straight, _ = _run_linen(_linen_state(_nso(key=5)), total)
  first, _ = _run_linen(_linen_state(_nso(key=5)), split)
  training.save_checkpoint(tmp_path / "ckpt", first)
  worker = pathlib.Path(__file__).parent / "resume_worker.py"
  output = tmp_path / "resumed.npz"
  subprocess.run(
    [
      sys.executable,
      str(worker),
      str(tmp_path / "ckpt"),
      str(total - split),
      str(output),
    ],
    check=True,
    capture_output=True,
  )
  with np.load(output) as resumed:
    resumed_leaves = [resumed[f"arr_{i}"] for i in range(len(resumed.files))]
  expected = jax.tree.leaves((straight.params, straight.batch_stats))
  assert len(resumed_leaves) == len(expected)
  for got, want in zip(resumed_leaves, expected, strict=True):
    if jax.default_backend() == "cpu":
      np.testing.assert_array_equal(got, np.asarray(want))
    else:
      # XLA:GPU picks cuBLAS/cuDNN algorithms by timing them when it compiles,
      # in each process anew, so a fresh process may sum in another order:
      # measured on an H100, the resumed run differs in the last bits.
      np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-6)


def test_restore_missing_checkpoint_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    training.restore_checkpoint(tmp_path / "nothing", {"w": jnp.ones(2)})


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.dense = nnx.Linear(5, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(16, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.head(self.dropout(nnx.relu(self.norm(self.dense(x)))))


def _nnx_loss(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  grad_fn = training.nnx_grad_fn(model, _nnx_loss, x, y)
  loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
  optimizer.update(model, grads, grad_fn=grad_fn)
  return loss


def _nnx_setup(tx, seed=0):
  model = NNXNet(nnx.Rngs(seed, dropout=seed + 1))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _run_nnx(model, optimizer, num_steps):
  x, y = _data()
  losses = [_nnx_step(model, optimizer, x, y) for _ in range(num_steps)]
  return np.asarray(losses)


def test_nnx_batch_stats_from_clean_pass_and_determinism():
  x, _ = _data()
  model, optimizer = _nnx_setup(_nso(sigma=0.5, key=3))
  reference = nnx.clone(model)
  _run_nnx(model, optimizer, 1)
  reference(x)  # one clean forward pass in training mode
  chex.assert_trees_all_close(
    nnx.state(model, nnx.BatchStat), nnx.state(reference, nnx.BatchStat), rtol=1e-6
  )
  losses_a = _run_nnx(model, optimizer, 5)
  model_b, optimizer_b = _nnx_setup(_nso(sigma=0.5, key=3))
  losses_b = _run_nnx(model_b, optimizer_b, 6)
  np.testing.assert_array_equal(losses_a, losses_b[1:])
  chex.assert_trees_all_equal(nnx.state(model), nnx.state(model_b))
  model_c, optimizer_c = _nnx_setup(_nso(sigma=0.5, key=4))
  _run_nnx(model_c, optimizer_c, 6)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(
      nnx.state(model, nnx.Param), nnx.state(model_c, nnx.Param)
    )


def test_nnx_sigma_zero_matches_plain_sgd():
  model_nso, opt_nso = _nnx_setup(nso_jax.nso(optax.sgd(0.1), 0.0, 2, key=0))
  model_sgd, opt_sgd = _nnx_setup(
    optax.chain(
      nso_jax.noise_stability(0.0, 1, key=0, clean_weight=1.0), optax.sgd(0.1)
    )
  )
  losses_nso = _run_nnx(model_nso, opt_nso, 4)
  losses_sgd = _run_nnx(model_sgd, opt_sgd, 4)
  np.testing.assert_allclose(losses_nso, losses_sgd, rtol=1e-5)
  chex.assert_trees_all_close(
    nnx.state(model_nso, nnx.Param),
    nnx.state(model_sgd, nnx.Param),
    rtol=1e-5,
    atol=1e-7,
  )


def test_nnx_checkpoint_resume(tmp_path):
  model, optimizer = _nnx_setup(_nso(key=8))
  straight = _run_nnx(model, optimizer, 5)
  model_a, optimizer_a = _nnx_setup(_nso(key=8))
  _run_nnx(model_a, optimizer_a, 2)
  training.save_checkpoint(tmp_path / "nnx", nnx.state((model_a, optimizer_a)))
  model_b, optimizer_b = _nnx_setup(_nso(key=8), seed=11)
  restored = training.restore_checkpoint(
    tmp_path / "nnx", nnx.state((model_b, optimizer_b))
  )
  nnx.update((model_b, optimizer_b), restored)
  resumed = _run_nnx(model_b, optimizer_b, 3)
  np.testing.assert_array_equal(resumed, straight[2:])
  chex.assert_trees_all_equal(nnx.state(model_b), nnx.state(model))


def _sam_problem():
  model = nn.Dense(1)
  x = jax.random.normal(jax.random.key(2), (8, 3))
  y = jnp.sin(x.sum(axis=1))
  params = model.init(jax.random.key(0), x)["params"]

  def loss(p):
    return jnp.mean((model.apply({"params": p}, x)[:, 0] - y) ** 2)

  return model, params, loss


@pytest.mark.parametrize("opaque_mode", [False, True])
def test_train_step_runs_optax_sam(opaque_mode):
  model, params, loss = _sam_problem()
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(0.05))
  tx = optax.contrib.sam(optax.sgd(0.1), adversary, opaque_mode=opaque_mode)
  state = training.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  step = jax.jit(lambda s: training.train_step(s, lambda p, _: (loss(p), {})))
  # By hand, as optax documents SAM: opaque mode calls grad_fn(params, i).
  hand_params, opt_state = params, tx.init(params)
  for _ in range(4):
    state, _ = step(state)
    grad_fn = lambda p, _: jax.grad(loss)(p)
    updates, opt_state = tx.update(
      jax.grad(loss)(hand_params), opt_state, hand_params, grad_fn=grad_fn
    )
    hand_params = optax.apply_updates(hand_params, updates)
  chex.assert_trees_all_close(state.params, hand_params, rtol=1e-6)
  assert float(loss(state.params)) < float(loss(params))


def _sweep_problem(key):
  x, y = _data()
  state = _linen_state(_nso(key=key))
  return state, x, y


def test_with_key_sweeps_seeds_on_one_compiled_step():
  base, x, y = _sweep_problem(0)

  def two_steps(state):
    for _ in range(2):
      loss_fn = _linen_loss_fn(state.apply_fn, x, y, jax.random.key(1))
      state, _ = training.train_step(state, loss_fn, clean_gradient=False)
    return state

  run = jax.jit(two_steps)
  run_built = jax.jit(lambda s: two_steps(s))  # a cache of its own
  for seed in (3, 4):
    swept = run(training.with_key(base, seed))
    built, _, _ = _sweep_problem(seed)  # the transformation built with the seed
    reference = run_built(built)
    chex.assert_trees_all_equal(swept.params, reference.params)
    chex.assert_trees_all_equal(
      jax.random.key_data(swept.opt_state[0].key),
      jax.random.key_data(reference.opt_state[0].key),
    )
  assert run._cache_size() == 1  # every seed ran the one compiled program
  typed = training.with_key(base.opt_state, jax.random.key(3))
  chex.assert_trees_all_equal(
    jax.random.key_data(typed[0].key), jax.random.key_data(jax.random.key(3))
  )
  with pytest.raises(ValueError, match="holds no NoiseStabilityState"):
    training.with_key(optax.sgd(0.1).init(base.params), 3)
  with pytest.raises(ValueError, match="`key` is required"):
    training.with_key(base.opt_state, None)
