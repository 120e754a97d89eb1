"""tune_sigma: NSO's sigma moved towards a target relative gap during training."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nso_jax

# A quadratic at fixed weights (a zero learning rate): the relative gap is
# (sigma^2 / 2) tr(A) / L(w) exactly in expectation (no O(sigma^4) term).
CURVATURES = jnp.linspace(1.0, 2.0, 16)
W0 = jnp.linspace(-0.5, 0.5, 16)
TARGET = 0.02


def quadratic(w):
  return 0.5 * jnp.sum(CURVATURES * w**2) + 1.0


GRAD_FN = jax.value_and_grad(quadratic)
SIGMA_STAR = math.sqrt(2 * TARGET * float(quadratic(W0)) / float(jnp.sum(CURVATURES)))


# The configured sigma: a warm-up from sigma* / 2 to sigma* over 4 steps, so
# that the scale is seen multiplying a schedule.
SCHEDULE = optax.linear_schedule(SIGMA_STAR / 2, SIGMA_STAR, 4)


def tuned(sigma, execution, *, rate=0.3, bounds=(0.1, 10.0), k=2):
  inner = nso_jax.nso(optax.sgd(0.0), sigma, k, key=0, execution=execution)
  return nso_jax.tune_sigma(inner, target=TARGET, rate=rate, bounds=bounds)


@functools.cache
def stepper(execution="vmap"):
  """One jitted update at ``W0`` of the tuner of ``SCHEDULE``: compiled once."""
  tx = tuned(SCHEDULE, execution)
  return tx, jax.jit(lambda state: tx.update(None, state, W0, grad_fn=GRAD_FN)[1])


def trajectory(step, state, steps):
  """The state after ``steps`` updates, the sigmas they used and the scales."""
  sigmas, scales = [], []
  for _ in range(steps):
    state = step(state)
    sigmas.append(float(state[1].last_sigma))
    scales.append(float(state[1].scale))
  return state, np.array(sigmas), np.array(scales)


def with_scale(state, scale):
  readings, tuning = state
  return readings, tuning._replace(scale=jnp.float32(scale))


@functools.cache
def converging(start):
  """60 updates from the scale ``start``: the first sigma is ``start`` sigma* / 2."""
  tx, step = stepper()
  return trajectory(step, with_scale(tx.init(W0), start), 60)[1:]


@pytest.mark.parametrize("start", [0.5, 8.0])
def test_sigma_converges_to_the_target_relative_gap(start):
  # From sigma* / 4 and 4 sigma*: the scale moves by at most 2**(rate / 2)
  # per step until within sqrt(2) of sigma*, then shrinks its log-error by
  # (1 - rate) per step: within 10 % after about 3 / rate + 4 = 14 steps.
  sigmas, _ = converging(start)
  assert sigmas[0] == pytest.approx(start * SIGMA_STAR / 2, rel=1e-6)
  # The trace estimate's relative error (a reading Z^T A Z / tr(A) has sd
  # sqrt(2 tr(A^2)) / tr(A) = 0.36 with 16 weights, 0.25 with k = 2, about
  # 0.06 averaged over the readings' 19) moves sigma by half of it: 10 % is
  # three standard deviations.
  np.testing.assert_allclose(sigmas[30:], SIGMA_STAR, rtol=0.1)
  assert abs(np.mean(np.log(sigmas[30:] / SIGMA_STAR))) < 0.05


@pytest.mark.parametrize("start", [0.5, 8.0])
def test_a_schedule_is_multiplied_by_the_scale(start):
  sigmas, scales = converging(start)
  before = np.concatenate([[start], scales[:-1]])  # the scale each step used
  configured = np.array([float(SCHEDULE(count)) for count in range(len(sigmas))])
  np.testing.assert_allclose(sigmas, before * configured, rtol=1e-6)


def test_a_noise_geometry_has_its_factor_tuned():
  # With U = sigma (|w| + eps) Z the gap is (sigma^2 / 2) tr(S^2 A), S = |w| +
  # eps, and the readings' trace is tr(S^2 A): the factor sigma is tuned.
  weighted = float(jnp.sum(CURVATURES * (jnp.abs(W0) + 0.5) ** 2))
  star = math.sqrt(2 * TARGET * float(quadratic(W0)) / weighted)
  tx = tuned(nso_jax.elementwise(star / 2, eps=0.5), "vmap")
  step = jax.jit(lambda state: tx.update(None, state, W0, grad_fn=GRAD_FN)[1])
  sigmas = trajectory(step, tx.init(W0), 30)[1]
  assert sigmas[0] == pytest.approx(star / 2, rel=1e-6)
  np.testing.assert_allclose(sigmas[20:], star, rtol=0.1)


@pytest.mark.parametrize("execution", ["map", "unroll"])
def test_every_execution_gives_the_same_sigmas(execution):
  expected, _ = converging(0.5)
  tx, step = stepper(execution)
  got = trajectory(step, with_scale(tx.init(W0), 0.5), 20)[1]
  # The losses sum in another order: float32 rounding, which the loop damps.
  np.testing.assert_allclose(got, expected[:20], rtol=1e-5)


def bits(tree):
  """The leaves of ``tree`` as NumPy arrays, typed keys as their data."""
  is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return [
    np.asarray(jax.random.key_data(x) if is_key(x) else x)
    for x in jax.tree.leaves(tree)
  ]


def test_same_key_same_bits_and_a_saved_state_resumes_them():
  tx, step = stepper()
  first = trajectory(step, tx.init(W0), 8)[0]
  again = trajectory(step, tx.init(W0), 4)[0]
  # The state through the host and back: NumPy leaves, the key rebuilt.
  treedef = jax.tree.structure(again)
  saved = bits(jax.device_get(again))
  leaves = [
    jax.random.wrap_key_data(jnp.asarray(x))
    if jnp.issubdtype(old.dtype, jax.dtypes.prng_key)
    else jnp.asarray(x)
    for x, old in zip(saved, jax.tree.leaves(again), strict=True)
  ]
  resumed = trajectory(step, jax.tree.unflatten(treedef, leaves), 4)[0]
  for a, b in zip(bits(first), bits(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(resumed[0][1].count) == 8


@functools.cache
def injected_stepper():
  """A tuner of an injected sigma, bounds (0.5, 2): one compilation."""
  inner = optax.chain(
    optax.inject_hyperparams(
      nso_jax.noise_stability, static_args=("num_perturbations", "key")
    )(SIGMA_STAR, 2, key=0),
    optax.sgd(0.0),
  )
  tx = nso_jax.tune_sigma(inner, target=TARGET, rate=1.0, bounds=(0.5, 2.0))
  return tx, jax.jit(lambda state: tx.update(None, state, W0, grad_fn=GRAD_FN)[1])


@pytest.mark.parametrize("factor, bound", [(1 / 8, 2.0), (8.0, 0.5)])
def test_the_scale_stays_within_its_bounds(factor, bound):
  tx, step = injected_stepper()
  state = nso_jax.set_sigma(tx.init(W0), factor * SIGMA_STAR)
  scales = []
  for _ in range(12):
    state = step(state)
    scales.append(float(state[1].scale))
  assert min(scales) >= 0.5 and max(scales) <= 2.0
  assert scales[-1] == pytest.approx(bound)
  # The injected sigma is the configured one: the scale multiplies it.
  assert float(state[1].last_sigma) == pytest.approx(factor * SIGMA_STAR * bound)


BAD_SETTINGS = [
  ({"target": 0.0}, r"`target` must be a finite float > 0, got 0.0"),
  ({"target": -0.1}, r"`target` must be a finite float > 0"),
  ({"target": math.nan}, r"`target` must be a finite float > 0"),
  ({"target": math.inf}, r"`target` must be a finite float > 0"),
  ({"target": True}, r"`target` must be a finite float > 0"),
  ({"rate": 0.0}, r"`rate` must be a finite float in \(0, 1\]"),
  ({"rate": 1.5}, r"`rate` must be a finite float in \(0, 1\]"),
  ({"bounds": (0.0, 2.0)}, r"`bounds` must be a pair \(lo, hi\).*0 < lo"),
  ({"bounds": (1.5, 2.0)}, r"`bounds` must be a pair.*got \(1.5, 2.0\)"),
  ({"bounds": (0.5, 0.9)}, r"`bounds` must be a pair.*lo <= 1 <= hi"),
  ({"bounds": (0.5, math.inf)}, r"`bounds` must be a pair.*finite"),
  ({"bounds": 0.5}, r"`bounds` must be a pair.*got 0.5"),
  ({"decay": 1.0}, r"`decay` must be a float in \(0, 1\)"),
]


@pytest.mark.fault("clear")
@pytest.mark.parametrize(
  "settings, message", BAD_SETTINGS, ids=[str(s) for s, _ in BAD_SETTINGS]
)
def test_refuses_a_bad_setting(settings, message):
  inner = nso_jax.nso(optax.sgd(0.0), SIGMA_STAR, key=0)
  with pytest.raises(ValueError, match=message):
    nso_jax.tune_sigma(inner, **{"target": TARGET, **settings})


@pytest.mark.fault("clear")
def test_refuses_what_the_readings_refuse():
  inner = nso_jax.nso(optax.sgd(0.0), SIGMA_STAR, key=0, one_sided=True)
  tx = nso_jax.tune_sigma(inner, target=TARGET)
  with pytest.raises(ValueError, match="`one_sided`=True"):
    tx.update(None, tx.init(W0), W0, grad_fn=GRAD_FN)
