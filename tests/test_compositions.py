"""NSO composed with Optax: the mistakes that run silently, and their fixes."""

import jax
import jax.numpy as jnp
import optax
import pytest

import nso_jax

X = jax.random.normal(jax.random.key(0), (8, 4))
Y = X @ jnp.array([1.0, -2.0, 0.5, 3.0])


def loss(w, x=X, y=Y):
  return jnp.mean((x @ w - y) ** 2)


def _run(tx, steps=5):
  params = jnp.zeros(4)
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(None, state, params, grad_fn=jax.grad(loss))
    params = optax.apply_updates(params, updates)
  return float(loss(params))


def test_optimizer_before_noise_stability_ascends_and_check_chain_says_so():
  nso = nso_jax.noise_stability(0.01, key=0)
  wrong = optax.chain(optax.sgd(0.05), nso)
  right = optax.chain(nso, optax.sgd(0.05))
  start = float(loss(jnp.zeros(4)))
  assert _run(wrong) > start > _run(right)  # the symptom: the loss rises
  nso_jax.check_chain(right, jnp.zeros(4))
  with pytest.raises(ValueError, match="must come first"):
    nso_jax.check_chain(wrong, jnp.zeros(4))
  clip_first = optax.chain(optax.clip_by_global_norm(1.0), nso, optax.sgd(0.1))
  with pytest.raises(ValueError, match="must come first"):
    nso_jax.check_chain(clip_first, jnp.zeros(4))


def test_check_chain_accepts_the_library_compositions():
  params = {"w": jnp.zeros(4)}
  nso = nso_jax.noise_stability(0.01, key=0)
  nso_jax.check_chain(nso_jax.nso(optax.adam(1e-3), 0.01, key=0), params)
  skipping = nso_jax.nso(optax.sgd(0.1), 0.01, key=0, skip_nonfinite=True)
  nso_jax.check_chain(skipping, params)
  nso_jax.check_chain(nso_jax.accumulate(nso, optax.sgd(0.1), 2), params)
  injected = optax.inject_hyperparams(
    nso_jax.noise_stability, static_args=("num_perturbations", "key")
  )(0.01, 1, key=0)
  nso_jax.check_chain(optax.chain(injected, optax.sgd(0.1)), params)
  with pytest.raises(ValueError, match="found 0"):
    nso_jax.check_chain(optax.sgd(0.1), params)
  with pytest.raises(ValueError, match="found 2"):
    nso_jax.check_chain(optax.chain(nso, nso), params)


def test_multisteps_around_nso_fails_on_none_and_check_chain_explains():
  tx = optax.MultiSteps(nso_jax.nso(optax.sgd(0.1), 0.01, key=0), 2)
  params = jnp.zeros(4)
  state = tx.init(params)
  with pytest.raises((TypeError, ValueError)):
    tx.update(None, state, params, grad_fn=jax.grad(loss))
  with pytest.raises(ValueError, match=r"nso_jax\.accumulate"):
    nso_jax.check_chain(tx, params)


@pytest.mark.parametrize("k", [1, 3])
def test_accumulation_equals_the_large_batch_step_with_the_same_noise(k):
  n, sigma = 4, 0.3
  big = optax.chain(nso_jax.noise_stability(sigma, k, key=5), optax.sgd(0.1))
  acc = nso_jax.accumulate(nso_jax.noise_stability(sigma, k, key=5), optax.sgd(0.1), n)
  micro = [(X[i::n], Y[i::n]) for i in range(n)]
  grad = jax.grad(lambda w, x, y: jnp.mean(jnp.tanh(x @ w - y) ** 2))
  w_big = w_acc = jnp.ones(4)
  s_big, s_acc = big.init(w_big), acc.init(w_acc)
  xs = jnp.concatenate([x for x, _ in micro])
  ys = jnp.concatenate([y for _, y in micro])

  @jax.jit
  def step(state, w, x, y):
    return acc.update(None, state, w, grad_fn=lambda v: grad(v, x, y))

  for _ in range(2):  # two optimizer steps: the key advances once per step
    u, s_big = big.update(None, s_big, w_big, grad_fn=lambda w: grad(w, xs, ys))
    w_big = optax.apply_updates(w_big, u)
    for i, (x, y) in enumerate(micro):
      before = w_acc
      u, s_acc = step(s_acc, w_acc, x, y)
      w_acc = optax.apply_updates(w_acc, u)
      if i < n - 1:
        assert jnp.array_equal(w_acc, before)  # no step between micro-batches
    assert jnp.allclose(w_acc, w_big, rtol=1e-5, atol=1e-6)
  assert int(s_acc.noise.count) == int(s_big[0].count) == 2


def test_accumulate_checks_its_count():
  with pytest.raises(ValueError, match="num_micro_batches"):
    nso_jax.accumulate(nso_jax.noise_stability(0.1, key=0), optax.sgd(0.1), 0)


def test_injected_sigma_is_read_and_set_and_key_is_no_hyperparameter():
  injected = optax.inject_hyperparams(
    nso_jax.noise_stability, static_args=("num_perturbations", "key")
  )(0.01, 2, key=0)
  tx = optax.chain(injected, optax.sgd(0.1))
  params = jnp.ones(4)
  state = tx.init(params)
  assert set(state[0].hyperparams) == {"sigma", "clean_weight"}
  assert float(nso_jax.get_sigma(state)) == pytest.approx(0.01)

  # Not quadratic: the antithetic pairs would cancel any sigma exactly.
  grad_fn = jax.grad(lambda w: jnp.sum(jnp.sin(X @ w)))

  @jax.jit
  def update(state):
    return tx.update(None, state, params, grad_fn=grad_fn)[0]

  # sigma set at run time changes the update as a fresh transformation does.
  state = nso_jax.set_sigma(state, 0.5)
  assert nso_jax.get_sigma(state).dtype == jnp.float32
  fresh = optax.chain(nso_jax.noise_stability(0.5, 2, key=0), optax.sgd(0.1))
  expected = fresh.update(None, fresh.init(params), params, grad_fn=grad_fn)[0]
  assert jnp.allclose(update(state), expected, rtol=1e-6)
  assert not jnp.allclose(update(nso_jax.set_sigma(state, 0.01)), expected)
  with pytest.raises(ValueError, match="inject_hyperparams"):
    nso_jax.get_sigma(optax.sgd(0.1).init(params))
