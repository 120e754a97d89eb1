"""No silent wrong answers: each class of bad input or fault, and its outcome.

Every test names the class it covers; each asserts either the error message
(which names the argument, the value and what is expected) or the safe
result.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nso_jax
from nso_jax import hessian


def quadratic_grad(w):
  return 2.0 * w


def run_steps(tx, params, grad_fn, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(None, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


class TestInvalidScalars:
  """NaN, negative or non-bool settings: refused when known, NaN when not."""

  @pytest.mark.parametrize(
    "sigma",
    [np.float32(np.nan), jnp.float32(jnp.nan), np.float64(-0.1), jnp.array(-1.0)],
  )
  def test_numpy_and_jax_sigma_refused_at_build(self, sigma):
    with pytest.raises(ValueError, match=r"`sigma` must be a finite float >= 0"):
      nso_jax.noise_stability(sigma, key=0)

  def test_schedule_checked_at_step_zero(self):
    with pytest.raises(ValueError, match=r"`sigma\(0\)` must be a finite float >= 0"):
      nso_jax.noise_stability(lambda count: jnp.nan * count, key=0)

  def test_schedule_invalid_later_gives_nan_not_abs(self):
    schedule = lambda count: jnp.where(count < 2, 0.1, -0.1)
    tx = nso_jax.noise_stability(schedule, key=0)
    params = jnp.ones(3)
    state = tx.init(params)
    for expect_finite in (True, True, False):
      updates, state = jax.jit(
        lambda s: tx.update(None, s, params, grad_fn=quadratic_grad)
      )(state)
      assert bool(jnp.all(jnp.isfinite(updates))) == expect_finite

  @pytest.mark.parametrize(
    ("name", "value"), [("sigma", -0.5), ("sigma", jnp.nan), ("clean_weight", 1.5)]
  )
  def test_injected_invalid_value_gives_nan(self, name, value):
    tx = optax.inject_hyperparams(
      nso_jax.noise_stability, static_args=("num_perturbations", "key")
    )(sigma=0.1, key=0, clean_weight=0.5)
    params = jnp.ones(3)
    state = tx.init(params)
    state.hyperparams[name] = jnp.asarray(value)
    updates, _ = jax.jit(
      lambda s: tx.update(jnp.ones(3), s, params, grad_fn=quadratic_grad)
    )(state)
    assert bool(jnp.all(jnp.isnan(updates)))

  @pytest.mark.parametrize("flag", ["one_sided", "per_shard_noise"])
  @pytest.mark.parametrize("value", ["no", 0, None])
  def test_non_bool_flags_refused(self, flag, value):
    with pytest.raises(ValueError, match=rf"`{flag}` must be True or False"):
      nso_jax.noise_stability(0.1, key=0, **{flag: value})

  def test_skip_nonfinite_flag_refused(self):
    with pytest.raises(ValueError, match=r"`skip_nonfinite` must be True or False"):
      nso_jax.nso(optax.sgd(0.1), 0.1, key=0, skip_nonfinite="yes")

  @pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
  def test_key_outside_int64(self, seed):
    with pytest.raises(ValueError, match=r"`key` must be an int seed in \[-2\*\*63"):
      nso_jax.noise_stability(0.1, key=seed)


class TestGradientContract:
  def test_integer_gradients_refused(self):
    grad_fn = lambda w: jnp.round(w).astype(jnp.int32)
    with pytest.raises(TypeError, match=r"gradient of dtype int32 at \(root\)"):
      nso_jax.noise_stability_gradient(grad_fn, jnp.ones(3), 0, sigma=0.1)

  def test_tuple_of_batches_refused_by_the_hessian_tools(self):
    loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
    batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4)}
    with pytest.raises(
      ValueError, match=r"`data` is a tuple of 2 pytrees .* as a list"
    ):
      hessian.trace(loss, jnp.ones(3), (batch, batch), 0, num_matvecs=2)
    single = hessian.trace(loss, jnp.ones(3), [batch, batch], 0, num_matvecs=2)
    once = hessian.trace(loss, jnp.ones(3), batch, 0, num_matvecs=2)
    assert float(single.value) == pytest.approx(float(once.value))


class TestCleanWeight:
  """A clean weight never mixes in a gradient that was not computed."""

  @pytest.mark.parametrize("incoming", ["none", "zeros"])
  def test_missing_clean_gradient_is_computed(self, incoming):
    params = jnp.array([1.0, -2.0, 3.0])
    tx = nso_jax.noise_stability(0.1, 2, key=0, clean_weight=0.5)
    grads = None if incoming == "none" else jnp.zeros(3)
    updates, _ = jax.jit(lambda s: tx.update(grads, s, params, grad_fn=quadratic_grad))(
      tx.init(params)
    )
    # A quadratic's NSO gradient is exact, so the mix is the exact gradient.
    np.testing.assert_allclose(updates, 2.0 * params, rtol=1e-6)

  def test_given_clean_gradient_is_used(self):
    params = jnp.array([1.0, -2.0, 3.0])
    tx = nso_jax.noise_stability(0.1, 2, key=0, clean_weight=0.5)
    updates, _ = tx.update(jnp.ones(3), tx.init(params), params, grad_fn=quadratic_grad)
    np.testing.assert_allclose(updates, 0.5 + params, rtol=1e-6)

  def test_wrong_structure_refused(self):
    params = {"w": jnp.ones(2)}
    tx = nso_jax.noise_stability(0.1, key=0, clean_weight=0.5)
    with pytest.raises(ValueError, match=r"must have the structure of `params`"):
      tx.update(jnp.ones(2), tx.init(params), params, grad_fn=lambda p: p)


class TestHalfPrecisionNoise:
  def test_noise_resolution_reports_rounding(self):
    params = jnp.full((1000,), 4.0, jnp.float16)  # spacing 2**-8 at 4.0
    resolutions = {
      sigma: float(nso_jax.noise_resolution(params, sigma, 0)) for sigma in (1e-4, 0.5)
    }
    assert resolutions[1e-4] < 0.05  # W + U rounds back to W
    assert resolutions[0.5] == pytest.approx(1.0, abs=1e-3)

  def test_noise_resolution_is_one_in_float32(self):
    assert float(nso_jax.noise_resolution(jnp.ones(4), 1e-4, 0)) == 1.0
    assert float(nso_jax.noise_resolution(jnp.ones(4), 0.0, 0)) == 1.0

  def test_noise_resolution_measures_the_first_pair_of_the_update(self):
    # The noise of the next update's first pair, from the split state key,
    # measured by hand.
    params = {"w": jnp.linspace(1.0, 8.0, 64).astype(jnp.bfloat16), "b": jnp.ones(3)}
    state = nso_jax.noise_stability(0.01, key=5).init(params)
    step_key = jax.random.split(state.key)[0]
    z = nso_jax.sample_noise(jax.random.fold_in(step_key, 0), params)
    u = np.asarray(z["w"] * jnp.asarray(0.01, jnp.bfloat16))  # eager: rounded
    w = np.asarray(params["w"])
    moved = (w + u).astype(np.float32) - w.astype(np.float32)
    expected = np.sum(moved**2) / np.sum(u.astype(np.float32) ** 2)
    # Under jit as well: XLA's excess precision does not skip the rounding.
    for measure in (nso_jax.noise_resolution, jax.jit(nso_jax.noise_resolution)):
      np.testing.assert_allclose(measure(params, 0.01, step_key), expected, rtol=1e-6)

  def test_noise_resolution_with_zero_noise_and_under_vmap(self):
    half = jnp.full(16, 4.0, jnp.float16)
    assert float(nso_jax.noise_resolution(half, 0.0, 0)) == 1.0  # nothing asked
    sigmas = jnp.array([1e-4, 0.5])
    got = jax.vmap(lambda s: nso_jax.noise_resolution(half, s, 0))(sigmas)
    assert got.shape == (2,) and float(got[0]) < float(got[1])

  @pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
      (dict(sigma=-1.0), ValueError, "`sigma`"),
      (dict(key=None), ValueError, "`key` is required"),
      (dict(noise="gauss"), ValueError, "`noise`"),
      (dict(param_filter=3), ValueError, "`param_filter`"),
      (dict(params={"n": jnp.ones(2, jnp.int32)}), TypeError, "`params`"),
    ],
  )
  def test_noise_resolution_refuses_bad_input(self, kwargs, error, match):
    args = dict(params=jnp.ones(2), sigma=0.1, key=0) | kwargs
    with pytest.raises(error, match=match):
      nso_jax.noise_resolution(**args)


def nan_at_positive_perturbation(w):
  """Finite at W and W - U, NaN wherever W + U moved the first coordinate up."""
  return jnp.where(w[0] > 1.0, jnp.nan, 2.0 * w)


class TestNonfinitePolicy:
  def test_skipped_steps_change_nothing_and_are_counted(self):
    tx = nso_jax.nso(optax.sgd(0.1, momentum=0.9), 0.1, 2, key=0, skip_nonfinite=True)
    params = jnp.array([1.0, 2.0])
    new_params, state = run_steps(tx, params, nan_at_positive_perturbation, 5)
    assert np.array_equal(new_params, params)
    assert int(state[1].num_skipped) == 5
    assert int(state[0].count) == 5  # NSO's key still advanced
    chex.assert_trees_all_equal(state[1].inner_state, optax.sgd(0.1, 0.9).init(params))

  def test_never_applies_a_nonfinite_update_however_many_in_a_row(self):
    always_nan = lambda w: jnp.full_like(w, jnp.nan)
    params = jnp.ones(3)
    skipping = nso_jax.nso(optax.sgd(0.1), 0.1, key=0, skip_nonfinite=True)
    kept, state = run_steps(skipping, params, always_nan, 12)
    assert np.array_equal(kept, params)
    assert int(state[1].num_skipped) == 12
    # optax.apply_if_finite applies the NaN once its limit is passed.
    limited = optax.chain(
      nso_jax.noise_stability(0.1, key=0),
      optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5),
    )
    corrupted, _ = run_steps(limited, params, always_nan, 12)
    assert bool(jnp.all(jnp.isnan(corrupted)))

  def test_finite_steps_after_skipped_ones_are_applied(self):
    calls = {"nan": True}
    tx = nso_jax.nso(optax.sgd(0.25), 0.01, key=0, skip_nonfinite=True)
    params = jnp.ones(2)
    state = tx.init(params)
    for nan in (True, True, False):
      calls["nan"] = nan
      grad_fn = (lambda w: w * jnp.nan) if nan else quadratic_grad
      updates, state = tx.update(None, state, params, grad_fn=grad_fn)
      params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params, 0.5, rtol=1e-5)
    assert int(state[1].num_skipped) == 2
    assert bool(state[1].last_finite)

  def test_grad_fn_failing_mid_run_leaves_the_last_state_usable(self):
    def flaky_grad(w, fail):
      def host(value, fail):
        if fail:
          raise RuntimeError("data loader failed")
        return value

      # "auto" evaluates the pairs with vmap on accelerators (map on CPU), and
      # JAX batches a callback only when told how.
      checked = jax.pure_callback(
        host,
        jax.ShapeDtypeStruct(w.shape, w.dtype),
        w,
        fail,
        vmap_method="sequential",
      )
      return 2.0 * checked

    tx = nso_jax.nso(optax.sgd(0.1, momentum=0.9), 0.05, 2, key=3)

    @jax.jit
    def step(params, state, fail):
      updates, state = tx.update(
        None, state, params, grad_fn=lambda w: flaky_grad(w, fail)
      )
      return optax.apply_updates(params, updates), state

    params, state = jnp.ones(4), tx.init(jnp.ones(4))
    params, state = step(params, state, False)
    with pytest.raises(Exception, match="data loader failed"):
      jax.block_until_ready(step(params, state, True))
    resumed = step(*step(params, state, False), False)
    straight = step(
      *step(*step(jnp.ones(4), tx.init(jnp.ones(4)), False), False), False
    )
    chex.assert_trees_all_equal(resumed, straight)


def test_empty_batch_refused_by_the_hessian_tools():
  loss = lambda w, b: jnp.mean((b @ w) ** 2)
  with pytest.raises(ValueError, match=r"holds no examples \(leading size 0\)"):
    hessian.trace(loss, jnp.ones(3), jnp.ones((0, 3)), 0, num_matvecs=2)
  with pytest.raises(ValueError, match=r"holds no examples"):
    hessian.trace(
      loss, jnp.ones(3), [jnp.ones((2, 3)), jnp.ones((0, 3))], 0, num_matvecs=2
    )


def test_clean_weight_with_empty_params_gets_the_clear_error():
  tx = nso_jax.noise_stability(0.1, key=0, clean_weight=0.5)
  with pytest.raises(ValueError, match=r"`params` is an empty pytree"):
    tx.update({}, tx.init({}), {}, grad_fn=lambda p: p)
