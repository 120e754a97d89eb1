"""Noise geometries: the noise they draw, the penalty they imply, their measures.

Dense references: with a cubic loss, the antithetic pair average is exactly
``grad L + (1/2) T[U, U]``, so the NSO gradient's expectation is exactly the
gradient of ``L + (1/2) tr(Sigma H)`` with ``Sigma`` held at ``W``; with a
quadratic loss the antithetic gap is exactly ``(1/2) U^T H U``. The
tolerances are 4.5 standard errors of the Monte Carlo means.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nso_jax
from nso_jax import hessian

X = jnp.array(
  [[1.0, -0.5, 0.3], [0.2, 0.8, -1.0], [-0.7, 0.1, 0.4], [0.5, 0.5, 0.9]], jnp.float32
)
PARAMS = {
  "kernel": jnp.array([[0.6, -0.2], [0.3, 0.9], [-0.4, 0.5]], jnp.float32),
  "bias": jnp.array([0.1, -0.3], jnp.float32),
}
GEOMETRIES = {
  "filterwise": nso_jax.filterwise(0.3),
  "elementwise": nso_jax.elementwise(0.5, eps=0.05),
  "leafwise": {"kernel": 0.4, "bias": 0.2},
}


def cubic_loss(params, x=X):
  f = x @ params["kernel"] + params["bias"]
  return jnp.mean(jnp.sum(f**3 / 6 + f**2 / 2, axis=-1))


def quadratic_loss(params, x=X):
  f = x @ params["kernel"] + params["bias"]
  return 0.5 * jnp.mean(jnp.sum(f**2, axis=-1)) + 0.1 * jnp.sum(params["kernel"] ** 2)


def flat(tree):
  return jnp.concatenate([jnp.ravel(tree["bias"]), jnp.ravel(tree["kernel"])])


def dense_sigma_squared(sigma):
  std = nso_jax.noise_std(sigma, PARAMS)
  full = jax.tree.map(lambda s, w: jnp.broadcast_to(s, w.shape), std, PARAMS)
  return flat(full) ** 2


def unflat(vector):
  return {"bias": vector[:2], "kernel": vector[2:].reshape(3, 2)}


def dense_hessian(loss, params):
  return jax.hessian(lambda v: loss(unflat(v)))(flat(params))


def test_each_geometry_gives_the_documented_standard_deviations():
  kernel, bias = PARAMS["kernel"], PARAMS["bias"]
  std = nso_jax.noise_std(nso_jax.filterwise(0.1, eps=0.01), PARAMS)
  column_norms = jnp.linalg.norm(kernel, axis=0)
  np.testing.assert_allclose(
    std["kernel"], jnp.tile(0.1 * (column_norms + 0.01), (3, 1))
  )
  np.testing.assert_allclose(std["bias"], 0.1 * (jnp.linalg.norm(bias) + 0.01))
  rows = nso_jax.noise_std(nso_jax.filterwise(0.1, filter_axis=0), PARAMS)["kernel"]
  np.testing.assert_allclose(
    rows[:, 0], 0.1 * jnp.linalg.norm(kernel, axis=1), rtol=1e-6
  )
  std = nso_jax.noise_std(nso_jax.elementwise(0.1), PARAMS)
  np.testing.assert_allclose(std["kernel"], 0.1 * (jnp.abs(kernel) + 0.01), rtol=1e-6)
  by_path = nso_jax.leafwise(lambda path, w: 0.5 if "bias" in str(path) else 2.0, 0.1)
  std = nso_jax.noise_std(by_path, PARAMS)
  assert float(std["bias"]) == pytest.approx(0.05) and float(
    std["kernel"]
  ) == pytest.approx(0.2)
  assert nso_jax.noise_std({"kernel": 0.3, "bias": 0.0}, PARAMS)["bias"] == 0.0


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_the_drawn_noise_is_sigma_times_the_scale_times_the_unit_noise(name):
  # The gradient of 0.5 |W|^2 at W + U is W + U: one one-sided pair shows U.
  sigma = GEOMETRIES[name]
  grads = nso_jax.noise_stability_gradient(
    jax.grad(lambda p: 0.5 * sum(jnp.sum(w**2) for w in jax.tree.leaves(p))),
    PARAMS,
    key=3,
    sigma=sigma,
    one_sided=True,
  )
  z = nso_jax.sample_noise(jax.random.fold_in(jax.random.key(3), 0), PARAMS)
  std = nso_jax.noise_std(sigma, PARAMS)
  expected = jax.tree.map(lambda w, s, zi: w + s * zi, PARAMS, std, z)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, expected
  )


@pytest.fixture(scope="module")
def penalty_samples():
  """Per-key NSO gradients (16 pairs each, 256 keys) of the cubic loss."""

  def samples(sigma):
    estimate = lambda key: flat(
      nso_jax.noise_stability_gradient(
        jax.grad(cubic_loss), PARAMS, key, sigma=sigma, num_perturbations=16
      )
    )
    return jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.key(0), 256))

  return samples


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_the_averaged_gradient_is_the_gradient_of_the_weighted_trace_penalty(
  penalty_samples, name
):
  sigma = GEOMETRIES[name]
  samples = penalty_samples(sigma)
  mean = samples.mean(0)
  stderr = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
  held = dense_sigma_squared(sigma)  # Sigma at W, held fixed

  def penalised(vector):
    diagonal = jnp.diag(jax.hessian(lambda v: cubic_loss(unflat(v)))(vector))
    return cubic_loss(unflat(vector)) + 0.5 * jnp.sum(held * diagonal)

  reference = jax.grad(penalised)(flat(PARAMS))
  plain = flat(jax.grad(cubic_loss)(PARAMS))
  np.testing.assert_array_less(jnp.abs(mean - reference), 4.5 * stderr + 1e-6)
  # The penalty's gradient is resolved, not lost in the noise.
  assert float(jnp.max(jnp.abs(reference - plain) / stderr)) > 10


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_the_measures_read_the_weighted_trace_of_the_same_geometry(name):
  sigma = GEOMETRIES[name]
  loss = lambda p, x: quadratic_loss(p, x)
  exact = float(
    jnp.sum(
      dense_sigma_squared(sigma) * jnp.diag(dense_hessian(quadratic_loss, PARAMS))
    )
  )
  measured = hessian.weighted_trace(
    loss, PARAMS, X, key=1, sigma=sigma, num_matvecs=400
  )
  assert abs(float(measured.value) - exact) <= 4.5 * float(measured.stderr) + 1e-5
  stability = hessian.noise_stability_measure(
    loss, PARAMS, X, key=2, sigma=sigma, num_draws=400, antithetic=True
  )
  assert abs(float(stability.value) - exact / 2) <= 4.5 * float(stability.stderr)


def test_a_scalar_sigma_weights_the_trace_by_sigma_squared_and_a_filter_restricts():
  loss = lambda p, x: quadratic_loss(p, x)
  plain = hessian.trace(loss, PARAMS, X, key=4, num_matvecs=50)
  weighted = hessian.weighted_trace(loss, PARAMS, X, key=4, sigma=0.5, num_matvecs=50)
  np.testing.assert_allclose(weighted.value, 0.25 * plain.value, rtol=1e-5)
  only_bias = lambda path, w: "bias" in str(path)
  h = dense_hessian(quadratic_loss, PARAMS)
  restricted = hessian.weighted_trace(
    loss, PARAMS, X, key=4, sigma=nso_jax.filterwise(0.3), param_filter=only_bias
  )
  bias_std = nso_jax.noise_std(nso_jax.filterwise(0.3), PARAMS)["bias"]
  np.testing.assert_allclose(
    restricted.value, bias_std**2 * jnp.trace(h[:2, :2]), rtol=1e-5
  )


def test_a_geometry_trains_with_every_execution_strategy_and_the_readings():
  params = PARAMS
  grad_fn = jax.value_and_grad(quadratic_loss)
  results = []
  for execution in ("vmap", "map", "unroll"):
    tx = nso_jax.curvature_readings(
      nso_jax.nso(
        optax.sgd(0.05), nso_jax.filterwise(0.2), 2, key=5, execution=execution
      )
    )
    step = jax.jit(lambda state, p, tx=tx: tx.update(None, state, p, grad_fn=grad_fn))
    state, p = tx.init(params), params
    for _ in range(3):
      updates, state = step(state, p)
      p = optax.apply_updates(p, updates)
    results.append((flat(p), state[1].trace))
  for p, trace in results[1:]:
    np.testing.assert_allclose(p, results[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trace, results[0][1], rtol=1e-4)


@pytest.mark.fault("clear")
@pytest.mark.parametrize(
  ("build", "match"),
  [
    (lambda: nso_jax.filterwise(-0.1), "`sigma` must be"),
    (lambda: nso_jax.elementwise(0.1, eps=-1.0), "`eps` must be"),
    (lambda: nso_jax.filterwise(0.1, filter_axis=1.5), "`filter_axis` must be an int"),
    (lambda: nso_jax.filterwise(0.1, filter_axis=()), "`filter_axis` must be an int"),
    (lambda: nso_jax.leafwise(lambda path: 0.1), "`leaf_scales`"),
    (
      lambda: nso_jax.nso(optax.sgd(0.1), {"kernel": -0.1}, key=0),
      r"sigma \(per leaf\)",
    ),
    (
      lambda: hessian.noise_stability_measure(
        quadratic_loss,
        PARAMS,
        X,
        0,
        sigma=nso_jax.filterwise(optax.linear_schedule(0.0, 0.1, 5)),
      ),
      "schedule",
    ),
    (
      lambda: nso_jax.noise_std(nso_jax.filterwise(lambda count: 0.1), PARAMS),
      "schedule",
    ),
  ],
  ids=[
    "negative",
    "eps",
    "axis_type",
    "axis_empty",
    "fn_arity",
    "tree_negative",
    "measure_schedule",
    "std_schedule",
  ],
)
def test_bad_geometries_are_refused_when_built(build, match):
  with pytest.raises((ValueError, TypeError), match=match):
    build()


@pytest.mark.fault("clear")
@pytest.mark.parametrize(
  ("sigma", "match"),
  [
    (nso_jax.filterwise(0.1, filter_axis=2), "`filter_axis`=2 is out of range"),
    ({"kernel": 0.1, "weights": 0.2}, "prefix of `params`"),
    (nso_jax.leafwise(lambda path, w: -1.0), r"sigma at \['bias'\]"),
  ],
  ids=["axis_range", "tree_structure", "fn_negative"],
)
def test_a_geometry_that_does_not_fit_the_parameters_is_refused_at_init(sigma, match):
  tx = nso_jax.nso(optax.sgd(0.1), sigma, key=0)
  with pytest.raises(ValueError, match=match):
    tx.init(PARAMS)


def test_layers_stacked_in_one_leaf_keep_their_own_filter_norms():
  stacked = jnp.stack([PARAMS["kernel"], 100 * PARAMS["kernel"]])
  std = nso_jax.noise_std(nso_jax.filterwise(0.1, filter_axis=(0, -1)), stacked)
  for layer in range(2):
    alone = nso_jax.noise_std(nso_jax.filterwise(0.1), stacked[layer])
    np.testing.assert_allclose(std[layer], alone, rtol=1e-6)


@pytest.mark.fault("correct")
def test_a_geometry_whose_noise_rounds_away_in_bfloat16_warns():
  weights = jnp.full((256,), 1.7, jnp.bfloat16)
  with pytest.warns(UserWarning, match=r"sigma=elementwise\(0.0001\) is too small"):
    nso_jax.noise_stability(nso_jax.elementwise(1e-4, eps=0.0), key=0).init(weights)


@pytest.mark.fault("clear")
def test_a_per_leaf_sigma_missing_a_leaf_outside_the_filter_says_what_to_give():
  tx = nso_jax.noise_stability(
    {"kernel": 0.1}, key=0, param_filter={"kernel": True, "bias": False}
  )
  with pytest.raises(ValueError, match=r"Give every leaf a value, 0\.0 where no noise"):
    tx.init(PARAMS)


@pytest.mark.fault("correct")
def test_tuning_accepts_an_integer_leaf_that_the_filter_excludes():
  params = {**PARAMS, "step": jnp.array(3, jnp.int32)}
  inner = nso_jax.nso(
    optax.identity(),
    nso_jax.elementwise(0.1),
    2,
    key=0,
    param_filter=lambda path, w: "step" not in str(path),
  )
  tx = nso_jax.tune_sigma(inner, target=0.05)
  grad_fn = jax.value_and_grad(lambda p: quadratic_loss(p) + 1.0, allow_int=True)
  _, state = tx.update(None, tx.init(params), params, grad_fn=grad_fn)
  assert int(state[0][1].count) == 1
