"""Tests of the two-point estimator against exact formulas."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import nso_jax
from nso_jax import batching
from nso_jax._src import noise as noise_lib

EXECUTIONS = [
  dict(execution="vmap"),
  dict(execution="unroll"),
  dict(execution="map"),
  dict(execution=batching.Execution("map", chunk_size=2)),
  dict(execution=batching.Execution("map", chunk_size=3)),
  dict(execution=batching.Execution("map", chunk_size=8)),
]

# E[(z^2 - 1)^2] for unit-variance noise: Var(z^2) = E z^4 - 1.
VARIANCE_OF_SQUARE = {"normal": 2.0, "uniform": 0.8, "laplace": 5.0, "rademacher": 0.0}


def _quadratic(dim=5, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(dim, dim)).astype(np.float32)
  a = jnp.asarray(a @ a.T / dim)
  b = jnp.asarray(rng.normal(size=dim).astype(np.float32))
  loss = lambda w: 0.5 * w @ a @ w + b @ w
  return loss, a, b


def test_sample_noise_moments():
  tree = {"a": jnp.zeros((200_000,)), "b": [jnp.zeros((3, 4), jnp.bfloat16)]}
  for name in nso_jax.NOISE_DISTRIBUTIONS:
    z = nso_jax.sample_noise(jax.random.key(1), tree, name)
    chex.assert_trees_all_equal_shapes_and_dtypes(z, tree)
    x = np.asarray(z["a"], np.float64)
    n = x.size
    # Mean and variance within 5 standard errors of 0 and 1.
    assert abs(x.mean()) < 5 / math.sqrt(n), name
    var_se = math.sqrt(VARIANCE_OF_SQUARE[name] / n) + 1e-12
    assert abs((x**2).mean() - 1.0) <= 5 * var_se + 1e-6, name


@settings(max_examples=25, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  sigma=st.floats(0.0, 1.0),
  k=st.integers(1, 4),
  noise=st.sampled_from(nso_jax.NOISE_DISTRIBUTIONS),
)
def test_quadratic_loss_gives_exact_gradient(seed, sigma, k, noise):
  loss, a, b = _quadratic()
  w = jnp.linspace(-1.0, 1.0, 5)
  g = nso_jax.noise_stability_gradient(
    jax.grad(loss), w, seed, sigma=sigma, num_perturbations=k, noise=noise
  )
  # The +U and -U terms cancel exactly; what remains is float32 rounding of
  # A(W + U) with |U| up to ~5 sigma.
  np.testing.assert_allclose(g, a @ w + b, rtol=1e-5, atol=2e-5 * (1 + 5 * sigma))


@pytest.mark.slow
@pytest.mark.parametrize("noise", nso_jax.NOISE_DISTRIBUTIONS)
@pytest.mark.parametrize("one_sided", [False, True])
def test_quartic_loss_mean_matches_smoothed_gradient(noise, one_sided, full_scale):
  sigma, k = 0.3, 2
  num_keys = 20_000 if full_scale else 2_000
  w = jnp.array([1.0, -0.5, 2.0, 0.0])
  loss = lambda w: jnp.sum(w**4) / 4
  estimate = jax.jit(
    jax.vmap(
      lambda key: nso_jax.noise_stability_gradient(
        jax.grad(loss),
        w,
        key,
        sigma=sigma,
        num_perturbations=k,
        noise=noise,
        one_sided=one_sided,
      )
    )
  )
  samples = np.asarray(
    estimate(jax.random.split(jax.random.key(7), num_keys)), np.float64
  )
  expected = np.asarray(w**3 + 3 * sigma**2 * w)
  # Two-sided: G_i = w^3 + 3 w mean_j(u_j^2) exactly, so the standard error of
  # the mean is 3 |w| sigma^2 sqrt(Var(z^2) / (k num_keys)). One-sided adds the
  # odd terms 3 w^2 u + u^3: use the empirical standard error there.
  if one_sided:
    stderr = samples.std(axis=0, ddof=1) / math.sqrt(num_keys)
  else:
    stderr = (
      3 * np.abs(w) * sigma**2 * math.sqrt(VARIANCE_OF_SQUARE[noise] / (k * num_keys))
    )
  float32_rounding = 1e-5 * np.abs(expected) + 1e-6
  np.testing.assert_array_less(
    np.abs(samples.mean(0) - expected), 5 * stderr + float32_rounding
  )


def test_same_key_is_bitwise_identical_and_keys_differ():
  loss = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["b"] ** 4)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  run = lambda key: nso_jax.noise_stability_gradient(
    jax.grad(loss), params, key, sigma=0.1, num_perturbations=3
  )
  chex.assert_trees_all_equal(run(3), run(jax.random.key(3)))
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(run(3), run(4))


def test_jit_matches_eager():
  loss = lambda p: jnp.sum(jnp.cos(p) * p**2)
  w = jnp.linspace(-2, 2, 7)
  fn = lambda key: nso_jax.noise_stability_gradient(
    jax.grad(loss), w, key, sigma=0.2, num_perturbations=3
  )
  key = jax.random.key(0)
  chex.assert_trees_all_close(fn(key), jax.jit(fn)(key), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", EXECUTIONS, ids=str)
def test_every_execution_strategy_agrees(strategy):
  def loss(p):
    h = jnp.tanh(p["w1"] @ jnp.ones(4))
    return jnp.sum((p["w2"] * h) ** 2) + jnp.sum(p["w1"] ** 4)

  params = {"w1": jnp.linspace(-1, 1, 12).reshape(3, 4), "w2": jnp.ones(3)}
  kwargs = dict(sigma=0.1, num_perturbations=5)
  reference = nso_jax.noise_stability_gradient(
    jax.grad(loss), params, 11, execution="vmap", **kwargs
  )
  got = jax.jit(
    lambda p: nso_jax.noise_stability_gradient(
      jax.grad(loss), p, 11, **strategy, **kwargs
    )
  )(params)
  chex.assert_trees_all_close(got, reference, rtol=1e-5, atol=1e-6)


def _conv_loss(params, x):
  h = jax.lax.conv_general_dilated(
    x, params["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jnp.mean(jax.nn.relu(h) ** 2) + jnp.sum(params["w"] ** 4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU default")
def test_auto_on_cpu_unrolls_convolutional_gradients_only():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  conv_params = {"w": 0.3 * jax.random.normal(jax.random.key(1), (3, 3, 3, 5))}
  conv_grad = lambda p: jax.grad(_conv_loss)(p, x)
  dense_grad = jax.grad(lambda p: jnp.sum(jnp.tanh(p["w"]) ** 2))

  def estimator(grad_fn, **options):
    return lambda params: nso_jax.noise_stability_gradient(
      grad_fn, params, 3, sigma=0.1, num_perturbations=4, **options
    )

  def has_loop(grad_fn, params):
    jaxpr = jax.make_jaxpr(estimator(grad_fn))(params).jaxpr
    return "scan" in str(jaxpr)

  assert not has_loop(conv_grad, conv_params)
  # Found inside nested jaxprs too (here a rematerialised gradient).
  assert not has_loop(jax.checkpoint(conv_grad), conv_params)
  assert has_loop(dense_grad, {"w": jnp.ones(6)})
  chex.assert_trees_all_close(
    jax.jit(estimator(conv_grad))(conv_params),
    jax.jit(estimator(conv_grad, execution="map"))(conv_params),
    rtol=1e-5,
    atol=1e-6,
  )


def test_default_execution_per_backend():
  default_execution = nso_jax.batching.default_execution
  assert default_execution("gpu") == "vmap"
  assert default_execution("tpu", convolutional=True) == "vmap"
  assert default_execution("cpu") == "map"
  assert default_execution("cpu", convolutional=True) == "unroll"
  assert default_execution("cpu", convolutional=True, size=8) == "unroll"
  assert default_execution("cpu", convolutional=True, size=9) == "map"


def test_pair_noise_depends_only_on_key_and_index():
  loss = lambda w: jnp.sum(w**4) / 4
  w = jnp.array([0.5, -1.0, 1.5])
  key, sigma = jax.random.key(5), 0.2
  grad = jax.grad(loss)
  g = lambda k: nso_jax.noise_stability_gradient(
    grad, w, key, sigma=sigma, num_perturbations=k
  )
  u = sigma * nso_jax.sample_noise(jax.random.fold_in(key, 2), w)
  pair_2 = (grad(w + u) + grad(w - u)) / 2
  np.testing.assert_allclose(3 * g(3) - 2 * g(2), pair_2, rtol=1e-5, atol=1e-5)


def test_sigma_zero_gives_plain_gradient():
  loss = lambda w: jnp.sum(jnp.exp(w))
  w = jnp.array([0.1, 0.2])
  g = nso_jax.noise_stability_gradient(jax.grad(loss), w, 0, sigma=0.0)
  np.testing.assert_allclose(g, jnp.exp(w), rtol=1e-6)


def test_one_sided_uses_only_plus_perturbations():
  loss = lambda w: jnp.sum(w**3)
  w, key, sigma = jnp.array([1.0, 2.0]), jax.random.key(2), 0.5
  g = nso_jax.noise_stability_gradient(
    jax.grad(loss), w, key, sigma=sigma, one_sided=True
  )
  u = sigma * nso_jax.sample_noise(jax.random.fold_in(key, 0), w)
  np.testing.assert_allclose(g, 3 * (w + u) ** 2, rtol=1e-6)


def test_a_value_is_read_from_the_output_and_averaged():
  loss = lambda w: jnp.sum(w**2)
  w, key, sigma = jnp.array([1.0, 2.0]), jax.random.key(4), 0.1
  kw = dict(sigma=sigma, num_perturbations=2)
  value, grads = nso_jax.noise_stability_gradient(
    jax.value_and_grad(loss), w, key, **kw
  )
  us = [sigma * nso_jax.sample_noise(jax.random.fold_in(key, j), w) for j in (0, 1)]
  expected = np.mean([loss(w + s * u) for u in us for s in (1, -1)])
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  # Without a value, the same gradient, bit for bit.
  alone = nso_jax.noise_stability_gradient(jax.grad(loss), w, key, **kw)
  chex.assert_trees_all_equal(grads, alone)
  np.testing.assert_allclose(grads, 2 * w, rtol=1e-5)


def test_gradients_shaped_like_a_pair_are_gradients():
  # params is itself a pair: a gradient with its structure is read as the
  # gradient, never as (value, grads).
  params = (jnp.ones(2), jnp.ones(2))
  loss = lambda p: jnp.sum(p[0] ** 2) + jnp.sum(p[1] ** 2)
  g = nso_jax.noise_stability_gradient(jax.grad(loss), params, 0, sigma=0.0)
  chex.assert_trees_all_close(g, (2 * jnp.ones(2), 2 * jnp.ones(2)))
  value, g = nso_jax.noise_stability_gradient(
    jax.value_and_grad(loss), params, 0, sigma=0.0
  )
  assert float(value) == 4.0
  chex.assert_trees_all_close(g, (2 * jnp.ones(2), 2 * jnp.ones(2)))


def test_pytree_value_with_aux():
  def loss(w):
    return jnp.sum(w**2), {"norm": jnp.linalg.norm(w)}

  (value, aux), grads = nso_jax.noise_stability_gradient(
    jax.value_and_grad(loss, has_aux=True), jnp.ones(3), 0, sigma=0.01
  )
  assert value.shape == () and aux["norm"].shape == ()
  np.testing.assert_allclose(aux["norm"], math.sqrt(3), rtol=1e-3)
  np.testing.assert_allclose(grads, 2 * jnp.ones(3), rtol=1e-5)


def test_mixed_pytree_keeps_structure_and_dtypes():
  params = {
    "dense": [jnp.ones((3, 2), jnp.bfloat16), jnp.zeros(2)],
    "nested": ({"scale": jnp.ones((), jnp.float32)}, jnp.ones(4, jnp.float16)),
  }

  def loss(p):
    leaves = jax.tree.leaves(p)
    return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in leaves)

  every_strategy = jax.jit(
    lambda params: [
      nso_jax.noise_stability_gradient(
        jax.grad(loss), params, 0, sigma=0.01, num_perturbations=2, **strategy
      )
      for strategy in EXECUTIONS[:3]
    ]
  )
  for g in every_strategy(params):
    chex.assert_trees_all_equal_shapes_and_dtypes(g, params)
    chex.assert_trees_all_close(
      jax.tree.map(lambda x: x.astype(jnp.float32), g),
      jax.tree.map(lambda x: 2 * x.astype(jnp.float32), params),
      rtol=2e-2,
      atol=1e-2,
    )


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    (dict(key=None), ValueError, "`key` is required"),
    (dict(key="seed"), TypeError, "`key` must be"),
    (
      dict(num_perturbations=0),
      ValueError,
      "`num_perturbations` must be an int >= 1, got 0",
    ),
    (dict(num_perturbations=2.5), ValueError, "`num_perturbations`"),
    (dict(sigma=-0.1), ValueError, "`sigma` must be a finite float >= 0, got -0.1"),
    (dict(sigma=float("nan")), ValueError, "`sigma`"),
    (dict(sigma="big"), ValueError, "`sigma` must be a finite float >= 0, got 'big'"),
    (dict(sigma=jnp.ones(2)), ValueError, "`sigma` must be a finite float >= 0"),
    (dict(sigma=jnp.float32(jnp.nan)), ValueError, "`sigma` must be a finite"),
    (dict(sigma=np.float64(-0.5)), ValueError, "`sigma` must be a finite"),
    (dict(one_sided="no"), ValueError, "`one_sided` must be True or False"),
    (dict(noise="cauchy"), ValueError, "`noise` must be one of"),
    (dict(execution="pmap"), ValueError, "`execution` must be one of"),
    (dict(execution=3), TypeError, "`execution` must be a batching.Execution"),
    (dict(param_filter=3), ValueError, "`param_filter` must be None, a callable"),
    (dict(data_axis=3), TypeError, "`data_axis` must be a mesh axis name"),
  ],
)
def test_bad_settings_raise_clear_errors(kwargs, error, match):
  args = dict(key=0, sigma=0.1) | kwargs
  with pytest.raises(error, match=match):
    nso_jax.noise_stability_gradient(lambda w: w, jnp.ones(2), **args)


def test_bad_params_and_grad_fn_raise_clear_errors():
  with pytest.raises(ValueError, match="empty pytree"):
    nso_jax.noise_stability_gradient(lambda p: p, {}, 0, sigma=0.1)
  with pytest.raises(TypeError, match=r"\['step'\] has dtype int32"):
    nso_jax.noise_stability_gradient(
      lambda p: p, {"w": jnp.ones(2), "step": jnp.array(1)}, 0, sigma=0.1
    )
  with pytest.raises(ValueError, match=r"or a pair \(value, grads\)"):
    nso_jax.noise_stability_gradient(lambda w: (w, w, w), jnp.ones(2), 0, sigma=0.1)
  with pytest.raises(ValueError, match=r"or a pair \(value, grads\)"):
    nso_jax.noise_stability_gradient(
      lambda p: (1.0, p["w"]), {"w": jnp.ones(2)}, 0, sigma=0.1
    )
  with pytest.raises(TypeError, match="must be floating point"):
    nso_jax.noise_stability_gradient(
      lambda w: (jnp.int32(1), w), jnp.ones(2), 0, sigma=0.1
    )
  with pytest.raises(ValueError, match="gradient of shape"):
    nso_jax.noise_stability_gradient(lambda w: w[:1], jnp.ones(2), 0, sigma=0.1)


def test_sample_noise_accepts_int_seeds():
  tree = {"w": jnp.zeros(5)}
  chex.assert_trees_all_equal(
    nso_jax.sample_noise(3, tree), nso_jax.sample_noise(jax.random.key(3), tree)
  )


def test_noise_names_are_checked():
  with pytest.raises(ValueError, match="`noise`"):
    noise_lib.check_noise("binomial")
