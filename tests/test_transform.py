"""Tests of the Optax transformation and its composition with Optax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nso_jax


def _problem():
  x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
  y = jnp.sin(x.sum(axis=1))

  def loss(params, x=x, y=y):
    pred = jnp.tanh(x @ params["w"]) @ params["v"] + params["b"]
    return jnp.mean((pred - y) ** 2)

  params = {
    "w": jnp.linspace(-0.5, 0.5, 12).reshape(3, 4),
    "v": jnp.ones(4) * 0.1,
    "b": jnp.zeros(()),
  }
  return loss, params


def _train(tx, num_steps=4, params=None, state=None, jit=True):
  loss, default_params = _problem()
  params = default_params if params is None else params
  state = tx.init(params) if state is None else state

  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss))
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  for _ in range(num_steps):
    params, state = step(params, state)
  return params, state


def test_same_key_same_trajectory_bitwise():
  make = lambda key: optax.chain(
    nso_jax.noise_stability(0.05, 2, key=key), optax.sgd(0.1, momentum=0.9)
  )
  a, state_a = _train(make(0))
  b, state_b = _train(make(jax.random.key(0)))
  chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(
    jax.random.key_data(state_a[0].key), jax.random.key_data(state_b[0].key)
  )
  c, _ = _train(make(1))
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(a, c)


def test_jit_and_eager_agree():
  tx = nso_jax.nso(optax.adam(1e-2), sigma=0.05, num_perturbations=2, key=3)
  jitted, _ = _train(tx, jit=True)
  eager, _ = _train(tx, jit=False)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)


def test_update_matches_estimator_with_split_key():
  loss, params = _problem()
  tx = nso_jax.noise_stability(0.05, 3, key=9)
  state = tx.init(params)
  updates, new_state = tx.update(params, state, params, grad_fn=jax.grad(loss))
  step_key, next_key = jax.random.split(jax.random.key(9))
  expected = nso_jax.noise_stability_gradient(
    jax.grad(loss), params, step_key, sigma=0.05, num_perturbations=3
  )
  chex.assert_trees_all_equal(updates, expected)
  chex.assert_trees_all_equal(
    jax.random.key_data(new_state.key), jax.random.key_data(next_key)
  )
  assert new_state.count.dtype == jnp.int32 and int(new_state.count) == 1


def test_nso_alias_is_the_chain():
  a, _ = _train(nso_jax.nso(optax.sgd(0.1), 0.05, 2, key=4))
  b, _ = _train(optax.chain(nso_jax.noise_stability(0.05, 2, key=4), optax.sgd(0.1)))
  chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize(
  "base",
  [
    optax.sgd(0.05, momentum=0.9),
    optax.adamw(1e-2, weight_decay=1e-4),
    optax.lion(1e-3),
  ],
  ids=["sgd", "adamw", "lion"],
)
def test_chains_with_optimizers_and_reduces_loss(base):
  loss, params = _problem()
  tx = optax.chain(nso_jax.noise_stability(0.01, 2, key=0), base)
  trained, _ = _train(tx, num_steps=30)
  assert loss(trained) < loss(params)


def test_no_recompilation_on_later_steps():
  loss, params = _problem()
  tx = nso_jax.nso(optax.sgd(0.1), sigma=0.05, num_perturbations=2, key=0)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(params, state, params, grad_fn=jax.grad(loss))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


def test_state_is_stable_under_lax_cond():
  loss, params = _problem()
  tx = nso_jax.noise_stability(0.05, 2, key=0)
  state = tx.init(params)

  def maybe_update(pred, state):
    return jax.lax.cond(
      pred,
      lambda s: tx.update(params, s, params, grad_fn=jax.value_and_grad(loss))[1],
      lambda s: s,
      state,
    )

  new_state = jax.jit(maybe_update)(True, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(
    jax.tree.map(jax.random.key_data, new_state.key), jax.random.key_data(state.key)
  )
  assert new_state.count.dtype == jnp.int32 and new_state.value.dtype == jnp.float32
  assert int(new_state.count) == 1
  assert int(jax.jit(maybe_update)(False, state).count) == 0


def test_inject_hyperparams_sigma():
  loss, params = _problem()
  factory = optax.inject_hyperparams(
    nso_jax.noise_stability, static_args=("num_perturbations", "key")
  )
  tx = factory(sigma=0.05, num_perturbations=2, key=0)
  state = tx.init(params)
  assert set(state.hyperparams) >= {"sigma"}
  state.hyperparams["sigma"] = jnp.asarray(0.0)
  step = jax.jit(lambda s: tx.update(params, s, params, grad_fn=jax.grad(loss)))
  updates, state = step(state)
  # sigma = 0 leaves the plain gradient.
  chex.assert_trees_all_close(updates, jax.grad(loss)(params), rtol=1e-6)
  state.hyperparams["sigma"] = jnp.asarray(0.5)
  updates, _ = step(state)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(updates, jax.grad(loss)(params), rtol=1e-3)


def test_inject_hyperparams_without_static_k_explains():
  loss, params = _problem()
  tx = optax.inject_hyperparams(nso_jax.noise_stability, static_args="key")(
    sigma=0.05, num_perturbations=2, key=0
  )
  state = tx.init(params)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(lambda s: tx.update(params, s, params, grad_fn=jax.grad(loss)))(state)


def test_sigma_schedule_is_evaluated_at_the_count():
  loss, params = _problem()
  schedule = optax.linear_schedule(0.0, 0.1, transition_steps=10)
  tx = nso_jax.noise_stability(schedule, 2, key=0)
  state = tx.init(params)
  updates, state = tx.update(params, state, params, grad_fn=jax.grad(loss))
  chex.assert_trees_all_close(updates, jax.grad(loss)(params), rtol=1e-6)
  updates, state = tx.update(params, state, params, grad_fn=jax.grad(loss))
  expected = nso_jax.noise_stability_gradient(
    jax.grad(loss),
    params,
    jax.random.split(jax.random.split(jax.random.key(0))[1])[0],
    sigma=schedule(1),
    num_perturbations=2,
  )
  chex.assert_trees_all_close(updates, expected, rtol=1e-6)


def test_multisteps_after_nso_accumulates_nso_gradients():
  loss, params = _problem()
  x2 = jnp.linspace(0.0, 2.0, 24).reshape(8, 3)
  batches = [None, x2]
  tx = optax.chain(
    nso_jax.noise_stability(0.05, 2, key=1),
    optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2).gradient_transformation(),
  )
  state = tx.init(params)
  nso_grads = []
  for x in batches:
    grad_fn = jax.grad(loss) if x is None else jax.grad(lambda p, x=x: loss(p, x=x))
    nso_grads.append(
      nso_jax.noise_stability_gradient(
        grad_fn,
        params,
        jax.random.split(state[0].key)[0],
        sigma=0.05,
        num_perturbations=2,
      )
    )
    updates, state = tx.update(params, state, params, grad_fn=grad_fn)
  expected = jax.tree.map(lambda a, b: -(a + b) / 2, *nso_grads)
  chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)


def test_nan_gradients_pass_through_and_apply_if_finite_skips():
  params = {"w": jnp.ones(2)}
  nan_grad = lambda p: {"w": jnp.full(2, jnp.nan)}
  tx = nso_jax.noise_stability(0.05, key=0)
  updates, state = tx.update(params, tx.init(params), params, grad_fn=nan_grad)
  assert bool(jnp.all(jnp.isnan(updates["w"]))) and int(state.count) == 1
  safe = optax.chain(
    nso_jax.noise_stability(0.05, key=0),
    optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3),
  )
  updates, state = safe.update(params, safe.init(params), params, grad_fn=nan_grad)
  chex.assert_trees_all_equal(updates, {"w": jnp.zeros(2)})
  assert int(state[1].total_notfinite) == 1


def test_a_value_from_grad_fn_keeps_the_mean_perturbed_loss_in_state():
  loss, params = _problem()
  tx = nso_jax.noise_stability(0.01, 2, key=0)
  state = tx.init(params)
  with_value, state = tx.update(None, state, params, grad_fn=jax.value_and_grad(loss))
  np.testing.assert_allclose(state.value, loss(params), rtol=1e-2)
  # Without a value: the same update, and the value is left as it was.
  alone, plain_state = tx.update(None, tx.init(params), params, grad_fn=jax.grad(loss))
  chex.assert_trees_all_equal(with_value, alone)
  assert float(plain_state.value) == 0.0
  assert (
    optax.tree_utils.tree_get(
      optax.chain(tx, optax.sgd(0.1)).init(params), "value"
    ).dtype
    == jnp.float32
  )


def test_mixed_pytree_dtypes_through_chain():
  params = {
    "a": jnp.ones((2, 2), jnp.bfloat16),
    "b": [jnp.ones(3), jnp.ones((), jnp.float16)],
  }
  loss = lambda p: sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p))
  tx = nso_jax.nso(optax.sgd(0.1), 0.01, 2, key=0)
  updates, _ = tx.update(params, tx.init(params), params, grad_fn=jax.grad(loss))
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)


def test_clean_weight_uses_incoming_gradient():
  loss, params = _problem()
  tx = nso_jax.noise_stability(0.05, 2, key=0, clean_weight=1.0)
  marker = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  updates, _ = tx.update(marker, tx.init(params), params, grad_fn=jax.grad(loss))
  chex.assert_trees_all_equal(updates, marker)


def test_missing_arguments_raise_clear_errors():
  loss, params = _problem()
  tx = nso_jax.noise_stability(0.05, key=0)
  state = tx.init(params)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="perturbs the parameters"):
    tx.update(params, state, grad_fn=jax.grad(loss))
  # Other extra arguments are accepted and ignored.
  tx.update(params, state, params, grad_fn=jax.grad(loss), value=1.0, batch=None)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(key=None), "`key` is required"),
    (dict(num_perturbations=0), "`num_perturbations`"),
    (dict(sigma=-1.0), "`sigma`"),
    (dict(noise="binomial"), "`noise`"),
    (dict(execution="pmap"), "`execution`"),
    (dict(execution=("map", 2)), "`execution`"),
    (dict(clean_weight=-0.5), "`clean_weight`"),
    (dict(one_sided="yes"), "`one_sided`"),
    (dict(param_filter=[1, 0]), "`param_filter`"),
    (dict(data_axis=("data", "data")), "`data_axis`"),
    (dict(per_shard_noise=True), "`per_shard_noise`"),
  ],
)
def test_bad_configuration_fails_at_build_time(kwargs, match):
  args = dict(sigma=0.01, key=0) | kwargs
  with pytest.raises((ValueError, TypeError), match=match):
    nso_jax.noise_stability(**args)


def test_settings_are_checked_when_built_not_at_update(monkeypatch):
  from nso_jax._src import estimator
  from nso_jax._src import transform

  loss, params = _problem()
  tx = nso_jax.noise_stability(0.05, 2, key=0, execution="map", clean_weight=0.5)
  state = tx.init(params)
  calls = []
  for module, name in [
    (estimator, "make_estimator"),
    (estimator, "check_sigma"),
    (estimator, "check_param_filter"),
    (transform, "_make_settings"),
  ]:
    original = getattr(module, name)
    monkeypatch.setattr(
      module,
      name,
      lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k),
    )
  jax.jit(lambda s: tx.update(None, s, params, grad_fn=jax.grad(loss)))(state)
  assert calls == []  # the update runs the algorithm only
  with pytest.raises(ValueError, match="`clean_weight`"):
    nso_jax.noise_stability(0.05, key=0, clean_weight=2.0)
  assert {"make_estimator", "_make_settings", "check_sigma"} <= set(calls)


def test_nso_declares_its_parameters():
  import inspect

  parameters = inspect.signature(nso_jax.nso).parameters
  kinds = {p.kind for p in parameters.values()}
  assert inspect.Parameter.VAR_KEYWORD not in kinds
  assert len(parameters) <= 10
  # The options beyond the paper's are set on noise_stability, chained by hand.
  assert not {"clean_weight", "per_shard_noise"} & set(parameters)
  assert set(parameters) - {"optimizer", "skip_nonfinite"} <= set(
    inspect.signature(nso_jax.noise_stability).parameters
  )


def test_a_pytree_value_is_refused_by_the_transformation():
  loss, params = _problem()
  tx = nso_jax.noise_stability(0.01, 2, key=0)

  def grad_fn(p):
    (value, aux), grads = jax.value_and_grad(lambda p: (loss(p), 1.0), has_aux=True)(p)
    return (value, aux), grads

  with pytest.raises(ValueError, match="noise_stability_gradient directly"):
    tx.update(None, tx.init(params), params, grad_fn=grad_fn)
