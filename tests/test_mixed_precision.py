"""Half precision: NSO warns when the parameters' dtype rounds its noise away."""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import nso_jax

W = jax.random.normal(jax.random.key(1), (64,))


def _init_warnings(params, sigma, **kw):
  tx = nso_jax.noise_stability(sigma, key=0, **kw)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tx.init(params)
    tx.init(params)  # warned once per transformation
  return [str(w.message) for w in caught]


def test_bfloat16_with_a_small_sigma_warns_once():
  (message,) = _init_warnings(W.astype(jnp.bfloat16), 1e-4)
  assert "sigma=0.0001" in message and "bfloat16" in message
  assert "Raise sigma" in message and "float32 master weights" in message


@pytest.mark.parametrize(
  ("dtype", "sigma"),
  [(jnp.float32, 1e-4), (jnp.bfloat16, 0.1), (jnp.bfloat16, 0.0)],
)
def test_no_warning_when_the_noise_is_held(dtype, sigma):
  assert _init_warnings(W.astype(dtype), sigma) == []


def test_unperturbed_half_precision_leaves_do_not_warn():
  params = {"w": W, "scale": W.astype(jnp.bfloat16)}
  only_w = {"w": True, "scale": False}
  assert _init_warnings(params, 1e-4, param_filter=only_w) == []


def test_traced_init_compares_sigma_with_the_spacing_near_one():
  tx = nso_jax.noise_stability(1e-4, key=0)
  with pytest.warns(UserWarning, match="spacing of bfloat16 numbers near 1.0"):
    jax.jit(tx.init)(W.astype(jnp.bfloat16))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(nso_jax.noise_stability(0.05, key=0).init)(W.astype(jnp.bfloat16))


def test_master_weights_in_float32_hold_the_noise_in_bfloat16_compute():
  # The documented recipe: float32 parameters, the loss computed in bfloat16.
  x = jax.random.normal(jax.random.key(2), (16, 64)).astype(jnp.bfloat16)

  def loss(w):
    return jnp.mean((x @ w.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)

  tx = optax.chain(nso_jax.noise_stability(1e-4, key=0), optax.sgd(0.01))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state = tx.init(W)
  updates, _ = tx.update(None, state, W, grad_fn=jax.grad(loss))
  assert updates.dtype == jnp.float32
  assert float(nso_jax.noise_resolution(W, 1e-4, key=0)) == 1.0
