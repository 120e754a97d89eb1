"""curvature_readings: the Hessian's trace read from NSO's perturbed losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nso_jax
from nso_jax import hessian
from nso_jax import training

A = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])
W0 = jnp.array([0.3, -0.2, 0.5])
SIGMA = 0.1
NUM_KEYS = 256


def quadratic(w):
  return 0.5 * w @ A @ w + 1.0  # offset: the relative gap stays finite


def readings_of(sigma, k=1, execution="auto", decay=0.9):
  inner = nso_jax.nso(optax.sgd(0.0), sigma, k, key=0, execution=execution)
  return nso_jax.curvature_readings(inner, decay=decay)


def run(tx, loss, params, state, steps):
  """``steps`` updates at fixed ``params`` (a zero learning rate)."""
  grad_fn = jax.value_and_grad(loss)

  def body(state, _):
    return tx.update(None, state, params, grad_fn=grad_fn)[1], None

  return jax.lax.scan(body, state, None, length=steps)[0]


def with_nso_key(state, key):
  (noise, sgd), readings = state
  return (noise._replace(key=key), sgd), readings


@functools.cache
def quadratic_runs(steps):
  """The readings of ``NUM_KEYS`` independent runs of ``steps`` updates."""
  tx = readings_of(SIGMA)
  state = tx.init(W0)
  keys = jax.random.split(jax.random.key(1), NUM_KEYS)
  one = lambda key: run(tx, quadratic, W0, with_nso_key(state, key), steps)[1]
  return jax.jit(jax.vmap(one))(keys)


def within(samples, expected, sds=4.0):
  samples = np.asarray(samples, np.float64)
  stderr = samples.std(ddof=1) / np.sqrt(samples.size)
  assert abs(samples.mean() - expected) < sds * stderr, (samples.mean(), expected)


STEPS, DECAY = 12, 0.9


def test_the_gap_reads_half_sigma_squared_times_the_trace():
  readings = quadratic_runs(STEPS)  # the last step's gap: one reading per key
  within(readings.gap, SIGMA**2 / 2 * float(jnp.trace(A)))
  assert np.all(np.isfinite(readings.relative_gap))
  assert np.all(readings.count == STEPS)


def test_the_running_trace_and_its_stderr_are_calibrated():
  readings = quadratic_runs(STEPS)
  within(readings.trace, float(jnp.trace(A)))
  # A reading Z^T A Z has variance 2 tr(A^2); the EMA's is that times q_t.
  q = (1 - DECAY) * (1 + DECAY**STEPS) / ((1 + DECAY) * (1 - DECAY**STEPS))
  within(readings.trace_stderr**2, 2 * float(jnp.trace(A @ A)) * q)


def mlp_loss(params, batch):
  x, y = batch
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] - y) ** 2) + 0.5


def mlp_setup():
  keys = jax.random.split(jax.random.key(3), 4)
  params = {
    "w1": jax.random.normal(keys[0], (2, 3)),
    "b1": jnp.zeros(3),
    "w2": jax.random.normal(keys[1], (3,)),
  }
  batch = (jax.random.normal(keys[2], (8, 2)), jax.random.normal(keys[3], (8,)))
  return params, batch


@functools.cache
def mlp_readings(execution, steps, k=2, sigma=0.1, decay=0.98):
  params, batch = mlp_setup()
  tx = readings_of(sigma, k, execution, decay)
  loss = lambda p: mlp_loss(p, batch)
  return jax.jit(lambda s: run(tx, loss, params, s, steps))(tx.init(params))[1]


def test_the_running_trace_agrees_with_hutchinson_on_an_mlp():
  params, batch = mlp_setup()
  readings = mlp_readings("map", 50)
  reference = hessian.trace(mlp_loss, params, batch, 0, num_matvecs=100)
  error = float(readings.trace - reference.value)
  combined = float(jnp.hypot(readings.trace_stderr, reference.stderr))
  assert abs(error) < 4 * combined, (readings.trace, reference)
  assert float(readings.relative_gap) > 0


@pytest.mark.parametrize("execution", ["vmap", "unroll"])
def test_every_execution_gives_the_same_readings(execution):
  expected = mlp_readings("map", 50)
  got = mlp_readings(execution, 50)
  # The mean loss sums in another order: a few float32 ulps of the loss (~1),
  # about 1e-5 of a gap of (sigma^2 / 2) tr(H) ~ 0.015 per reading.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def bits(tree):
  """The leaves of ``tree`` as arrays, typed keys as their data."""
  is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return [
    np.asarray(jax.random.key_data(x) if is_key(x) else x)
    for x in jax.tree.leaves(tree)
  ]


def test_same_key_same_bits_and_a_checkpoint_resumes_them(tmp_path):
  tx = readings_of(SIGMA)
  grad_fn = jax.value_and_grad(quadratic)
  step = jax.jit(lambda s: tx.update(None, s, W0, grad_fn=grad_fn)[1])
  first, second = step(tx.init(W0)), step(tx.init(W0))
  assert int(first[1].count) == 1 and np.isinf(first[1].trace_stderr)
  for _ in range(2):
    first, second = step(first), step(second)
  for a, b in zip(bits(first), bits(second), strict=True):
    np.testing.assert_array_equal(a, b)
  training.save_checkpoint(tmp_path / "ckpt", first)
  restored = training.restore_checkpoint(tmp_path / "ckpt", tx.init(W0))
  for a, b in zip(bits(step(first)), bits(step(restored)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(step(restored)[1].count) == 4


def readings_update(tx, grad_fn, params=W0):
  return tx.update(None, tx.init(W0), params, grad_fn=grad_fn)


@pytest.mark.fault("clear")
def test_refuses_an_update_without_grad_fn():
  with pytest.raises(ValueError, match=r"`tx.update.*grad_fn=grad_fn"):
    readings_update(readings_of(SIGMA), None)


@pytest.mark.fault("clear")
def test_refuses_an_update_without_params():
  with pytest.raises(ValueError, match="pass them to"):
    readings_update(readings_of(SIGMA), jax.value_and_grad(quadratic), None)


@pytest.mark.fault("clear")
def test_refuses_a_grad_fn_returning_gradients_only():
  with pytest.raises(ValueError, match="`grad_fn` returns gradients only"):
    readings_update(readings_of(SIGMA), jax.grad(quadratic))


@pytest.mark.fault("clear")
def test_refuses_an_optimizer_without_nso():
  tx = nso_jax.curvature_readings(optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"`inner`.*found 0"):
    tx.init(W0)


@pytest.mark.fault("clear")
def test_refuses_nso_under_accumulate():
  inner = nso_jax.accumulate(nso_jax.noise_stability(SIGMA, key=0), optax.sgd(0.1), 2)
  with pytest.raises(ValueError, match=r"`inner`.*accumulate"):
    nso_jax.curvature_readings(inner).init(W0)


@pytest.mark.fault("clear")
def test_refuses_one_sided_nso():
  inner = nso_jax.nso(optax.sgd(0.0), SIGMA, key=0, one_sided=True)
  tx = nso_jax.curvature_readings(inner)
  with pytest.raises(ValueError, match="`one_sided`=True"):
    readings_update(tx, jax.value_and_grad(quadratic))


@pytest.mark.fault("clear")
@pytest.mark.parametrize("decay", [1.0, "0.9"])
def test_refuses_a_bad_decay(decay):
  with pytest.raises(ValueError, match="`decay` must be a float in \\(0, 1\\)"):
    nso_jax.curvature_readings(nso_jax.nso(optax.sgd(0.1), SIGMA, key=0), decay=decay)


DIAGONAL = jnp.array([1.0, 2.0, 3.0])


def diagonal_quadratic(w):
  return 0.5 * jnp.sum(DIAGONAL * w**2) + 1.0


def test_each_step_reads_with_its_own_injected_sigma():
  # Rademacher noise on a diagonal quadratic: every reading is tr(A) exactly,
  # so a sigma from another step would show as a wrong trace.
  nso = optax.inject_hyperparams(nso_jax.nso, static_args=("num_perturbations", "key"))
  schedule = lambda count: 0.1 * (1.0 + count)
  inner = nso(optax.sgd(0.0), schedule, key=0, noise="rademacher")
  tx = nso_jax.curvature_readings(inner)
  readings = run(tx, diagonal_quadratic, W0, tx.init(W0), 3)[1]
  np.testing.assert_allclose(readings.trace, 6.0, rtol=1e-4)
  np.testing.assert_allclose(readings.gap, 0.3**2 / 2 * 6.0, rtol=1e-4)
  assert float(readings.trace_stderr) < 1e-3


@pytest.mark.fault("correct")
def test_a_step_without_noise_is_not_counted():
  # The schedule's own sigma at each step, and none at step 1.
  schedule = lambda count: jnp.where(count == 1, 0.0, 0.1 * (1.0 + count))
  inner = nso_jax.nso(optax.sgd(0.0), schedule, key=0, noise="rademacher")
  tx = nso_jax.curvature_readings(inner)
  readings = run(tx, diagonal_quadratic, W0, tx.init(W0), 3)[1]
  assert int(readings.count) == 2
  np.testing.assert_allclose(readings.trace, 6.0, rtol=1e-4)
  np.testing.assert_allclose(readings.gap, 0.3**2 / 2 * 6.0, rtol=1e-4)
  assert float(readings.trace_stderr) < 1e-3 and np.isfinite(readings.relative_gap)
