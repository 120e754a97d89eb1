"""Run-time policies: non-finite steps, traced settings, half precision."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nso_jax
from nso_jax import hessian

SIGMA = 0.1
P0 = jnp.array([1.0, 2.0, 3.0, 4.0])
# The first update's first pair, +U, for a noise transformation built with
# key=0: its gradient, and only its, is NaN.
_STEP_KEY = jax.random.split(jax.random.key(0))[0]
BAD = P0 + SIGMA * nso_jax.sample_noise(jax.random.fold_in(_STEP_KEY, 0), P0)


def nan_at_one_perturbation(w):
  return jnp.where(jnp.all(jnp.abs(w - BAD) < 1e-6), jnp.nan, 2.0 * w)


def _noise():
  return nso_jax.noise_stability(SIGMA, key=0, execution="unroll")


# Every placement the docs give for skipping non-finite steps, with the
# number of updates per optimizer step.
PLACEMENTS = {
  "nso_flag": (
    lambda: nso_jax.nso(
      optax.sgd(0.1), SIGMA, key=0, execution="unroll", skip_nonfinite=True
    ),
    1,
  ),
  "around_optimizer": (
    lambda: optax.chain(_noise(), nso_jax.skip_nonfinite(optax.sgd(0.1))),
    1,
  ),
  "around_nso": (
    lambda: nso_jax.skip_nonfinite(
      nso_jax.nso(optax.sgd(0.1), SIGMA, key=0, execution="unroll")
    ),
    1,
  ),
  "apply_if_finite_around_optimizer": (
    lambda: optax.chain(_noise(), optax.apply_if_finite(optax.sgd(0.1), 3)),
    1,
  ),
  "inside_accumulate": (
    lambda: nso_jax.accumulate(_noise(), nso_jax.skip_nonfinite(optax.sgd(0.1)), 2),
    2,
  ),
}


@pytest.mark.fault("correct")
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_a_skipped_step_draws_fresh_noise_and_training_goes_on(placement):
  make, micro_steps = PLACEMENTS[placement]
  tx = make()

  @jax.jit
  def step(params, state):
    updates, state = tx.update(None, state, params, grad_fn=nan_at_one_perturbation)
    return optax.apply_updates(params, updates), state

  params, state = P0, tx.init(P0)
  applied = 0
  for _ in range(3):  # optimizer steps
    before = params
    for _ in range(micro_steps):
      params, state = step(params, state)
    assert bool(jnp.all(jnp.isfinite(params)))
    applied += int(not np.array_equal(params, before))
  assert applied == 2  # the first step skipped, every later one applied


@pytest.mark.fault("clear")
def test_apply_if_finite_around_nso_is_refused_by_check_chain():
  # It would keep NSO's key: the same noise, the same NaN, until applied.
  tx = optax.apply_if_finite(nso_jax.nso(optax.sgd(0.1), SIGMA, key=0), 3)
  with pytest.raises(ValueError, match=r"inside optax\.apply_if_finite"):
    nso_jax.check_chain(tx, P0)


@pytest.mark.fault("clear")
def test_skip_nonfinite_around_accumulate_is_refused():
  tx = nso_jax.skip_nonfinite(nso_jax.accumulate(_noise(), optax.sgd(0.1), 2))
  with pytest.raises(ValueError, match=r"`inner` of skip_nonfinite holds .*accumulate"):
    tx.init(P0)


def _measure_value(sigma, params=P0, **kw):
  loss = lambda w, x: jnp.sum(x * w.astype(jnp.float32) ** 2)
  return hessian.noise_stability_measure(
    loss, params, jnp.ones((1, 4)), key=1, sigma=sigma, num_draws=4, **kw
  ).value


TRACED_NOISE_SCALES = {
  "noise_stability_measure": jax.jit(_measure_value),
  "noise_resolution": jax.jit(
    lambda s: nso_jax.noise_resolution(P0.astype(jnp.bfloat16), s, 0)
  ),
}


@pytest.mark.fault("correct")
@pytest.mark.parametrize("name", sorted(TRACED_NOISE_SCALES))
def test_traced_invalid_noise_scale_gives_nan_as_in_nso(name):
  compute = TRACED_NOISE_SCALES[name]
  assert bool(jnp.isfinite(compute(0.1)))
  for invalid in (-0.1, jnp.nan):  # never |sigma|
    assert bool(jnp.isnan(compute(invalid)))


@pytest.mark.fault("clear")
@pytest.mark.parametrize("factory", ["noise_stability", "nso"])
def test_injected_key_is_refused_naming_static_args(factory):
  if factory == "nso":
    inject, args = optax.inject_hyperparams(nso_jax.nso), (optax.sgd(0.1),)
  else:
    inject, args = optax.inject_hyperparams(nso_jax.noise_stability), ()
  tx = inject(*args, sigma=0.01, num_perturbations=2, key=0)
  recipe = r"static_args=\(\"num_perturbations\", \"key\"\)"
  with pytest.raises(ValueError, match=rf"`key` must be .*{recipe}"):
    tx.init(P0)


@pytest.mark.fault("clear")
def test_injected_typed_key_is_refused_by_check_chain():
  tx = optax.inject_hyperparams(
    nso_jax.noise_stability, static_args="num_perturbations"
  )(0.01, 2, key=jax.random.key(0))
  try:
    jax.eval_shape(tx.init, P0)
  except TypeError:  # some optax versions cannot inject a typed key at all
    pytest.skip("this optax refuses to inject a typed key itself")
  with pytest.raises(ValueError, match=r"\['key'\] among its hyperparameters"):
    nso_jax.check_chain(tx, P0)


@pytest.mark.fault("correct")
def test_injected_nso_with_the_documented_static_args_sets_sigma():
  tx = optax.inject_hyperparams(nso_jax.nso, static_args=("num_perturbations", "key"))(
    optax.sgd(0.1), 0.01, key=0, execution="unroll"
  )
  state = nso_jax.set_sigma(tx.init(P0), 0.5)
  assert set(state.hyperparams) == {"sigma"}
  fresh = nso_jax.nso(optax.sgd(0.1), 0.5, key=0, execution="unroll")
  grad_fn = jax.grad(lambda w: jnp.sum(jnp.sin(w)))

  @jax.jit
  def both(state, fresh_state):
    injected, _ = tx.update(None, state, P0, grad_fn=grad_fn)
    expected, _ = fresh.update(None, fresh_state, P0, grad_fn=grad_fn)
    return injected, expected

  np.testing.assert_allclose(*both(state, fresh.init(P0)), rtol=1e-6)


@pytest.mark.fault("correct")
def test_measure_warns_when_half_precision_rounds_its_noise_away():
  half = P0.astype(jnp.float16)  # numbers 2**-9 apart near 4
  with pytest.warns(
    UserWarning, match=r"noise_stability_measure: sigma=1e-05 .*float16"
  ):
    _measure_value(1e-5, params=half)
  with warnings.catch_warnings():  # traced only: no computation
    warnings.simplefilter("error")
    jax.eval_shape(lambda: _measure_value(1e-5))  # float32 holds it
    jax.eval_shape(lambda: _measure_value(0.1, params=half))


@pytest.mark.fault("correct")
def test_noise_resolution_under_jit_rounds_a_weight_computed_in_the_step():
  # Under jit XLA may keep W (computed in the step) and W + U in float32; the
  # step itself rounds them, and its NSO gradient is the plain one.
  w0 = jnp.linspace(1.0, 8.0, 16).astype(jnp.bfloat16)
  key = jax.random.key(3)
  resolution = jax.jit(nso_jax.noise_resolution)
  in_step = jax.jit(lambda w: resolution(w * jnp.bfloat16(1.5), 1e-3, key))(w0)
  stored = resolution(w0 * jnp.bfloat16(1.5), 1e-3, key)  # W passed in, rounded
  assert float(in_step) == float(stored) < 0.05
