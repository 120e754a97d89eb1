"""Tests of the noise samplers, in particular the Gaussian ones."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax_compat import enable_x64

import nso_jax
from nso_jax._src import noise as noise_lib


def _ks_bound(n: int) -> float:
  """A Kolmogorov-Smirnov distance a correct sampler exceeds with p < 1e-6."""
  return math.sqrt(-0.5 * math.log(0.5e-6) / n)


def test_quantile_table_is_standardised_and_close_to_gaussian():
  table = noise_lib.gaussian_quantile_table().astype(np.float64)
  size = 1 << 16
  assert table.shape == (size,)
  assert np.all(np.diff(table) > 0)
  np.testing.assert_array_equal(table, -table[::-1])  # mean exactly 0
  assert abs(np.mean(table**2) - 1.0) < 1e-7
  assert abs(np.mean(table**4) - 3.0) < 1e-3
  assert np.abs(table).max() < 4.33
  # Each entry has mass 2**-16: the CDF jumps from i / 2**16 to (i+1) / 2**16.
  gaussian_cdf = scipy.stats.norm.cdf(table)
  steps = np.arange(size) / size
  distance = max(
    np.abs(gaussian_cdf - steps).max(), np.abs(gaussian_cdf - steps - 1 / size).max()
  )
  assert distance < 1.02e-5


@pytest.mark.parametrize("noise", ["normal", "normal_fast"])
def test_gaussian_samplers_pass_a_kolmogorov_smirnov_test(noise):
  n = 400_000
  z = nso_jax.sample_noise(jax.random.key(3), jnp.zeros(n), noise)
  x = np.asarray(z, np.float64)
  assert scipy.stats.kstest(x, "norm").statistic < _ks_bound(n)
  # Within 5 standard errors: Var(z) = 1, Var(z^2) = E z^4 - 1 = 2.
  assert abs(x.mean()) < 5 / math.sqrt(n)
  assert abs((x**2).mean() - 1.0) < 5 * math.sqrt(2.0 / n)
  # Neighbours share a threefry hash (or, for normal_fast, a word): uncorrelated.
  assert abs(np.corrcoef(x[0::2], x[1::2])[0, 1]) < 5 / math.sqrt(n // 2)
  assert abs(np.corrcoef(x[0::2] ** 2, x[1::2] ** 2)[0, 1]) < 5 / math.sqrt(n // 2)


def test_normal_fast_uses_both_halves_of_each_word():
  # An odd size: the last word contributes one sample.
  n = 300_001
  x = np.asarray(nso_jax.sample_noise(jax.random.key(4), jnp.zeros(n), "normal_fast"))
  assert np.isin(x, noise_lib.gaussian_quantile_table()).all()
  # ~4.6 expected hits per entry: almost every entry is visited.
  assert np.unique(x).size > 0.97 * (1 << 16)
  assert scipy.stats.kstest(x[0::2], "norm").statistic < _ks_bound(n // 2)
  assert scipy.stats.kstest(x[1::2], "norm").statistic < _ks_bound(n // 2)
  assert abs(np.corrcoef(x[0:-1:2], x[1::2])[0, 1]) < 5 / math.sqrt(n // 2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float64])
def test_normal_in_low_and_high_precision(dtype):
  with enable_x64(dtype == jnp.float64):
    z = nso_jax.sample_noise(jax.random.key(5), jnp.zeros(100_000, dtype), "normal")
    assert z.dtype == dtype
  x = np.asarray(z, np.float64)
  assert np.isfinite(x).all()
  # Rounding to 8 (bfloat16) or 11 (float16) significant bits moves the CDF
  # by at most about 2e-3.
  assert scipy.stats.kstest(x, "norm").statistic < _ks_bound(x.size) + 2e-3


def test_normal_with_a_non_threefry_key_uses_jax_random_normal():
  key = jax.random.key(0, impl="rbg")
  z = nso_jax.sample_noise(key, {"w": jnp.zeros(1000)}, "normal")
  (leaf_key,) = jax.random.split(key, 1)
  np.testing.assert_array_equal(z["w"], jax.random.normal(leaf_key, (1000,)))


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
  variance_of_square = 2.0  # Var(z^2) = E z^4 - 1
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
