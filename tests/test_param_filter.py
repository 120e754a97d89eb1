"""NSO with noise on chosen parameters only (``param_filter``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nso_jax


def separable_loss(params):
  """A sum of one term per leaf: each leaf's gradient sees only that leaf."""
  return (
    jnp.sum(params["dense"]["kernel"] ** 4) / 4
    + jnp.sum(jnp.cos(params["dense"]["bias"]))
    + jnp.sum(params["head"] ** 3) / 3
  )


PARAMS = {
  "dense": {
    "kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
    "bias": jnp.linspace(0.5, 2.0, 4),
  },
  "head": jnp.linspace(-2.0, 0.5, 5),
}
KERNELS_ONLY = {"dense": {"kernel": True, "bias": False}, "head": False}


def kernels_only(path, leaf):
  del leaf
  return jax.tree_util.keystr(path).endswith("['kernel']")


def estimate(param_filter, **options):
  options = {"sigma": 0.3, "num_perturbations": 2, **options}
  return jax.jit(
    lambda p: nso_jax.noise_stability_gradient(
      jax.grad(separable_loss), p, 7, param_filter=param_filter, **options
    )
  )(PARAMS)


@pytest.mark.parametrize("execution", ["vmap", "map", "unroll"])
@pytest.mark.parametrize("one_sided", [False, True])
def test_unselected_leaves_get_their_plain_gradient_exactly(execution, one_sided):
  # Two pairs (four evaluations, or two one-sided): sums and the 1/n scale of
  # identical gradients are exact in floating point.
  filtered = estimate(KERNELS_ONLY, execution=execution, one_sided=one_sided)
  plain = jax.grad(separable_loss)(PARAMS)
  np.testing.assert_array_equal(filtered["dense"]["bias"], plain["dense"]["bias"])
  np.testing.assert_array_equal(filtered["head"], plain["head"])


@pytest.mark.parametrize("execution", ["vmap", "map", "unroll"])
@pytest.mark.parametrize("noise", ["normal", "rademacher", "uniform"])
def test_selected_leaves_are_perturbed_as_without_a_filter_bit_for_bit(
  execution, noise
):
  filtered = estimate(KERNELS_ONLY, execution=execution, noise=noise)
  unfiltered = estimate(None, execution=execution, noise=noise)
  np.testing.assert_array_equal(
    filtered["dense"]["kernel"], unfiltered["dense"]["kernel"]
  )
  # The kernel is perturbed: its quartic gradient moves away from the plain one.
  plain = jax.grad(separable_loss)(PARAMS)["dense"]["kernel"]
  assert float(jnp.max(jnp.abs(filtered["dense"]["kernel"] - plain))) > 1e-3


def test_unselected_leaves_match_their_plain_gradient_for_any_pair_count():
  filtered = estimate(KERNELS_ONLY, num_perturbations=3)
  plain = jax.grad(separable_loss)(PARAMS)
  np.testing.assert_allclose(filtered["head"], plain["head"], rtol=1e-6)


def test_a_function_filter_selects_as_the_pytree_of_flags():
  by_flags = estimate(KERNELS_ONLY)
  by_function = estimate(kernels_only)
  for a, b in zip(jax.tree.leaves(by_flags), jax.tree.leaves(by_function), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_prefix_of_flags_selects_whole_subtrees():
  dense_only = estimate({"dense": True, "head": False})
  unfiltered = estimate(None)
  np.testing.assert_array_equal(
    dense_only["dense"]["bias"], unfiltered["dense"]["bias"]
  )
  np.testing.assert_array_equal(
    dense_only["head"], jax.grad(separable_loss)(PARAMS)["head"]
  )


def test_the_transformation_passes_the_filter_on():
  tx = nso_jax.nso(optax.sgd(0.1), 0.3, 2, key=3, param_filter=KERNELS_ONLY)
  state = tx.init(PARAMS)
  step = jax.jit(lambda p, s: tx.update(None, s, p, grad_fn=jax.grad(separable_loss)))
  updates, _ = step(PARAMS, state)
  plain = jax.grad(separable_loss)(PARAMS)
  np.testing.assert_array_equal(updates["head"], -0.1 * plain["head"])
  step_key = jax.random.split(state[0].key)[0]
  expected = nso_jax.noise_stability_gradient(
    jax.grad(separable_loss), PARAMS, step_key, sigma=0.3, num_perturbations=2
  )["dense"]["kernel"]
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * expected, rtol=1e-6)


def test_noise_resolution_reads_only_the_perturbed_leaves():
  params = {"half": jnp.full(8, 4.0, jnp.float16), "full": jnp.ones(8)}
  resolution = lambda param_filter: float(
    nso_jax.noise_resolution(params, 1e-4, 0, param_filter=param_filter)
  )
  assert resolution({"half": False, "full": True}) == 1.0
  assert resolution(None) < 0.05


@pytest.mark.parametrize(
  ("param_filter", "message"),
  [
    ({"dense": False, "head": False}, "selects no parameter leaf"),
    ({"dense": 1, "head": True}, "Python bools"),
    ({"other": True}, "prefix of `params`"),
  ],
)
def test_bad_filters_are_refused_with_a_clear_error(param_filter, message):
  with pytest.raises(ValueError, match=message):
    estimate(param_filter)
