"""Tests of the noise samplers, in particular the approximate "normal_fast"."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nso_jax
from nso_jax._src import noise as noise_lib


def _byte_sum_pmf() -> np.ndarray:
  """Exact distribution of the sum of four i.i.d. uniform bytes."""
  byte = np.full(256, 1.0 / 256)
  pmf = byte
  for _ in range(3):
    pmf = np.convolve(pmf, byte)
  return pmf


def test_normal_fast_is_exactly_standardised():
  pmf = _byte_sum_pmf()
  support = (np.arange(pmf.size) - noise_lib._BYTE_SUM_MEAN) * (
    noise_lib._BYTE_SUM_INV_STD
  )
  mean = np.sum(pmf * support)
  second = np.sum(pmf * support**2)
  fourth = np.sum(pmf * support**4)
  assert abs(mean) < 1e-12
  assert abs(second - 1.0) < 1e-12
  # Irwin-Hall-like: excess kurtosis of a discrete uniform over 256 values is
  # -6 (n^2 + 1) / (5 (n^2 - 1)); a sum of four divides it by four.
  expected_fourth = 3.0 - 6 * (256**2 + 1) / (5 * (256**2 - 1)) / 4
  assert abs(fourth - expected_fourth) < 1e-10


def test_normal_fast_sample_moments_and_support():
  n = 400_000
  z = nso_jax.sample_noise(jax.random.key(3), jnp.zeros(n), "normal_fast")
  x = np.asarray(z, np.float64)
  fourth = 3.0 - 6 * (256**2 + 1) / (5 * (256**2 - 1)) / 4
  # Within 5 standard errors: Var(z) = 1, Var(z^2) = E z^4 - 1.
  assert abs(x.mean()) < 5 / math.sqrt(n)
  assert abs((x**2).mean() - 1.0) < 5 * math.sqrt((fourth - 1.0) / n)
  assert abs(x.mean() - np.median(x)) < 0.02  # symmetric
  bound = 510 * noise_lib._BYTE_SUM_INV_STD
  assert np.abs(x).max() <= bound + 1e-6
  # 1021 grid values; a sample this large visits many of them.
  assert np.unique(x).size > 500


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_normal_fast_keeps_dtypes_and_structure(dtype):
  tree = {"w": jnp.zeros((3, 5), dtype), "b": [jnp.zeros((7,), jnp.float32)]}
  z = nso_jax.sample_noise(jax.random.key(0), tree, "normal_fast")
  chex.assert_trees_all_equal_shapes_and_dtypes(z, tree)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(z))


def test_normal_fast_is_deterministic_and_keys_differ():
  tree = {"a": jnp.zeros((64, 32)), "b": jnp.zeros(10)}
  sample = jax.jit(lambda key: nso_jax.sample_noise(key, tree, "normal_fast"))
  first = sample(jax.random.key(11))
  again = sample(jax.random.key(11))
  other = sample(jax.random.key(12))
  chex.assert_trees_all_equal(first, again)
  assert not np.array_equal(first["a"], other["a"])
  # Leaves get their own keys: equal shapes do not give equal noise.
  twins = nso_jax.sample_noise(
    jax.random.key(5), [jnp.zeros(100), jnp.zeros(100)], "normal_fast"
  )
  assert not np.array_equal(twins[0], twins[1])


def test_normal_fast_is_accepted_but_not_a_distribution_name():
  assert "normal_fast" in noise_lib.NOISE_NAMES
  assert "normal_fast" not in nso_jax.NOISE_DISTRIBUTIONS
  with pytest.raises(ValueError, match="normal_fast"):
    noise_lib.check_noise("gaussian")


def test_normal_fast_quadratic_gives_exact_gradient():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 5)).astype(np.float32)
  a = jnp.asarray(a @ a.T / 5)
  b = jnp.asarray(rng.normal(size=5).astype(np.float32))
  loss = lambda w: 0.5 * w @ a @ w + b @ w
  w = jnp.linspace(-1.0, 1.0, 5)
  g = nso_jax.noise_stability_gradient(
    jax.grad(loss), w, 4, sigma=0.5, num_perturbations=3, noise="normal_fast"
  )
  np.testing.assert_allclose(g, a @ w + b, rtol=1e-5, atol=1e-4)


def test_normal_fast_quartic_mean_matches_smoothed_gradient():
  # E[G] = w^3 + 3 sigma^2 w depends on the first two moments only.
  sigma, k, num_keys = 0.3, 2, 4_000
  w = jnp.array([1.0, -0.5, 2.0, 0.0])
  loss = lambda w: jnp.sum(w**4) / 4
  estimate = jax.jit(
    jax.vmap(
      lambda key: nso_jax.noise_stability_gradient(
        jax.grad(loss), w, key, sigma=sigma, num_perturbations=k, noise="normal_fast"
      )
    )
  )
  samples = np.asarray(estimate(jax.random.split(jax.random.key(7), num_keys)))
  expected = np.asarray(w**3 + 3 * sigma**2 * w)
  variance_of_square = 1.7
  stderr = 3 * np.abs(w) * sigma**2 * math.sqrt(variance_of_square / (k * num_keys))
  np.testing.assert_array_less(
    np.abs(samples.astype(np.float64).mean(0) - expected),
    5 * stderr + 1e-5 * np.abs(expected) + 1e-6,
  )


def test_normal_fast_through_the_transformation():
  tx = nso_jax.noise_stability(0.1, 2, key=0, noise="normal_fast")
  params = {"w": jnp.ones(4)}
  state = tx.init(params)
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
  updates, _ = tx.update(params, state, params, grad_fn=grad_fn)
  np.testing.assert_allclose(updates["w"], 2 * np.ones(4), rtol=1e-5)
