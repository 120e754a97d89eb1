"""The Hessian diagonal, tr(H^2) and the Frobenius norm, the Fisher and GGN
traces, and module grouping, against dense references on small models, each
stochastic estimate within a few of its own standard errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from nso_jax import hessian

try:  # the tests directory is a plain folder or, in some layouts, a package
  import hessian_testing as ht
except ImportError:
  from tests import hessian_testing as ht

# A stochastic estimate may sit this many standard errors from the truth.
Z = 4.0
NUM_PROBES = 200


def flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def block_slices(params) -> dict[str, slice]:
  """Per module (first path key), its slice of the flat parameter vector."""
  slices, start = {}, 0
  for name in params:
    size = ravel_pytree(params[name])[0].size
    slices[name] = slice(start, start + size)
    start += size
  return slices


@pytest.fixture(scope="module")
def tiny() -> ht.Problem:
  return ht.tiny_problem()


@pytest.fixture(scope="module")
def diagonals(tiny):
  """Every diagonal measure of the tiny MLP, in one compiled function."""

  @jax.jit
  def measure(params, batch):
    data = (ht.loss_fn, params, batch)
    return {
      "exact": hessian.hessian_diagonal(*data, method="exact"),
      "sampled": hessian.hessian_diagonal(*data, 3, num_matvecs=NUM_PROBES),
      "trace": hessian.trace(*data, 3, num_matvecs=NUM_PROBES),
      "exact_modules": hessian.hessian_diagonal(*data, method="exact", group_by=1),
      "modules": hessian.hessian_diagonal(*data, 3, num_matvecs=NUM_PROBES, group_by=1),
      "layer_traces": hessian.layer_traces(*data, 3, num_matvecs=NUM_PROBES),
      "module_traces": hessian.layer_traces(
        *data, 3, num_matvecs=NUM_PROBES, group_by=lambda path: path[0].key
      ),
    }

  return measure(tiny.params, tiny.batch)


class TestDiagonal:
  def test_exact_equals_the_dense_diagonal(self, tiny, diagonals):
    exact = diagonals["exact"]
    np.testing.assert_allclose(
      flat(exact.value), np.diag(tiny.hessian), rtol=1e-5, atol=1e-6
    )
    assert (flat(exact.stderr) == 0).all()
    assert int(exact.num_matvecs) == tiny.hessian.shape[0]

  def test_hutchinson_is_within_its_standard_errors(self, tiny, diagonals):
    sampled = diagonals["sampled"]
    truth = np.diag(tiny.hessian)
    errors = np.abs(flat(sampled.value) - truth)
    assert (errors <= Z * flat(sampled.stderr) + 1e-6).all()
    # The per-probe variance of element i is sum_{k != i} H_ik^2.
    off_diagonal = tiny.hessian - np.diag(truth)
    expected = np.sqrt(np.sum(off_diagonal**2, axis=1) / NUM_PROBES)
    ratio = flat(sampled.stderr) / expected
    assert 0.8 < np.median(ratio) < 1.2, ratio

  def test_the_elements_sum_to_hutchinsons_trace(self, diagonals):
    total = flat(diagonals["sampled"].value).sum()
    np.testing.assert_allclose(total, float(diagonals["trace"].value), rtol=1e-5)

  def test_module_sums_are_the_block_traces(self, tiny, diagonals):
    for name, block in block_slices(tiny.params).items():
      truth = np.trace(tiny.hessian[block, block])
      exact = diagonals["exact_modules"][name]
      np.testing.assert_allclose(float(exact.value), truth, rtol=1e-5)
      assert float(exact.stderr) == 0.0
      sampled = diagonals["modules"][name]
      assert abs(float(sampled.value) - truth) <= Z * float(sampled.stderr)

  def test_a_single_probe_has_an_infinite_error(self, tiny):
    one = hessian.hessian_diagonal(
      ht.loss_fn, tiny.params, tiny.batch, 0, num_matvecs=1
    )
    assert np.isinf(flat(one.stderr)).all()


class TestModuleGrouping:
  def test_layer_traces_sum_per_probe_within_a_module(self, tiny, diagonals):
    leaves, modules = diagonals["layer_traces"], diagonals["module_traces"]
    assert list(modules) == list(tiny.params)
    for name, block in block_slices(tiny.params).items():
      summed = sum(float(leaves[name][leaf].value) for leaf in leaves[name])
      np.testing.assert_allclose(float(modules[name].value), summed, rtol=1e-5)
      # Summed per probe, before the error: the diagonal's module estimates
      # use the same probes.
      np.testing.assert_allclose(
        float(modules[name].stderr),
        float(diagonals["modules"][name].stderr),
        rtol=1e-4,
      )
      truth = np.trace(tiny.hessian[block, block])
      assert abs(float(modules[name].value) - truth) <= Z * float(modules[name].stderr)

  def test_layer_hessian_measure_per_module(self, tiny):
    reference = jax.tree.map(lambda w: 0.8 * w, tiny.params)
    v = flat(tiny.params) - flat(reference)

    @jax.jit
    def measure(params, batch, reference):
      args = (ht.loss_fn, params, batch, reference)
      return (
        hessian.layer_hessian_measure(*args, group_by=1),
        hessian.layer_hessian_measure(*args, block_diagonal=False, group_by=1),
        hessian.layer_hessian_measure(*args, block_diagonal=False),
      )

    blocks, split, per_leaf = measure(tiny.params, tiny.batch, reference)
    full = tiny.hessian @ v
    for name, block in block_slices(tiny.params).items():
      vb = v[block]
      expected = vb @ tiny.hessian[block, block] @ vb
      np.testing.assert_allclose(float(blocks[name]), expected, rtol=1e-5)
      np.testing.assert_allclose(float(split[name]), vb @ full[block], rtol=1e-5)
      summed = sum(float(x) for x in jax.tree.leaves(per_leaf[name]))
      np.testing.assert_allclose(float(split[name]), summed, rtol=1e-5)

  def test_bad_group_by_is_refused(self, tiny):
    args = (ht.loss_fn, tiny.params, tiny.batch)
    with pytest.raises(ValueError, match=r"`group_by`.*got 0"):
      hessian.layer_traces(*args, 0, num_matvecs=2, group_by=0)
    with pytest.raises(ValueError, match=r"`group_by`.*got 'layer'"):
      hessian.hessian_diagonal(*args, 0, group_by="layer")
    with pytest.raises(ValueError, match="`group_by` must return a str"):
      hessian.hessian_diagonal(*args, method="exact", group_by=lambda path: 1)


class TestFrobenius:
  def test_the_square_and_the_norm_against_the_dense_hessian(self, tiny):
    estimate = hessian.hessian_frobenius_norm(
      ht.loss_fn, tiny.params, tiny.batch, 4, num_matvecs=NUM_PROBES
    )
    square = float(np.sum(tiny.hessian**2))
    assert abs(float(estimate.squared) - square) <= Z * float(estimate.squared_stderr)
    norm = np.sqrt(square)
    assert abs(float(estimate.value) - norm) <= Z * float(estimate.stderr)
    np.testing.assert_allclose(
      float(estimate.stderr),
      float(estimate.squared_stderr) / (2 * float(estimate.value)),
      rtol=1e-6,
    )

  def test_exact_on_a_diagonal_hessian(self):
    loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w**2, axis=-1))
    x = jnp.array([[1.0, -2.0, 3.0]])
    estimate = hessian.hessian_frobenius_norm(loss, jnp.ones(3), x, 0, num_matvecs=3)
    assert float(estimate.squared) == 14.0 and float(estimate.squared_stderr) == 0.0


# A small classifier: 3 inputs -> 5 tanh units -> 3 logits, 40 parameters.
CLASSIFIER = (3, 5, 3)
NUM_EXAMPLES = 24


def classifier_model(params, batch):
  return ht.apply_mlp(params, batch["x"])


def cross_entropy(outputs, batch):
  return -jnp.sum(batch["y"] * jax.nn.log_softmax(outputs), axis=-1)


def classifier_loss(params, batch):
  return jnp.mean(cross_entropy(classifier_model(params, batch), batch))


@pytest.fixture(scope="module")
def classifier():
  params = ht.init_mlp(jax.random.key(11), CLASSIFIER)
  x_key, y_key = jax.random.split(jax.random.key(12))
  x = 2.0 * jax.random.normal(x_key, (NUM_EXAMPLES, CLASSIFIER[0]))
  labels = jax.random.randint(y_key, (NUM_EXAMPLES,), 0, CLASSIFIER[-1])
  batch = {"x": x, "y": jax.nn.one_hot(labels, CLASSIFIER[-1])}
  flat_params, unravel = ravel_pytree(params)
  # Dense references: per-example gradients and the GGN J^T H_out J / n.
  per_example = jax.jacrev(
    lambda f: cross_entropy(classifier_model(unravel(f), batch), batch)
  )(flat_params)
  empirical = float(np.sum(np.asarray(per_example, np.float64) ** 2) / NUM_EXAMPLES)
  jacobian = jax.jacrev(lambda f: classifier_model(unravel(f), batch))(flat_params)
  probs = np.asarray(jax.nn.softmax(classifier_model(params, batch)), np.float64)
  jacobian = np.asarray(jacobian, np.float64)
  out_hessian = np.stack([np.diag(p) - np.outer(p, p) for p in probs])
  ggn = np.einsum("nkd,nkl,nle->de", jacobian, out_hessian, jacobian) / NUM_EXAMPLES
  return params, batch, empirical, float(np.trace(ggn))


def split(batch, sizes):
  bounds = np.cumsum([0, *sizes])
  return [
    jax.tree.map(lambda x, a=a, b=b: x[a:b], batch)
    for a, b in itertools.pairwise(bounds)
  ]


class TestFisher:
  def test_empirical_fisher_is_the_mean_squared_gradient(self, classifier):
    params, batch, empirical, _ = classifier

    @jax.jit
    def traces(params, batch):
      whole = hessian.empirical_fisher_trace(classifier_loss, params, batch)
      batches = hessian.empirical_fisher_trace(
        classifier_loss, params, split(batch, [10, 10, 4]), execution="vmap"
      )
      return whole, batches

    whole, batches = traces(params, batch)
    np.testing.assert_allclose(float(whole.value), empirical, rtol=1e-5)
    np.testing.assert_allclose(float(batches.value), empirical, rtol=1e-5)
    assert float(whole.stderr) == 0.0

  def test_monte_carlo_fisher_and_ggn_traces(self, classifier):
    params, batch, _, ggn = classifier

    @jax.jit
    def traces(params, batch):
      fisher = hessian.fisher_trace(
        classifier_model, params, split(batch, [16, 8]), 5, num_draws=16
      )
      gauss_newton = hessian.ggn_trace(
        classifier_model, cross_entropy, params, batch, 6, num_matvecs=NUM_PROBES
      )
      return fisher, gauss_newton

    fisher, gauss_newton = traces(params, batch)
    assert abs(float(fisher.value) - ggn) <= Z * float(fisher.stderr)
    assert abs(float(gauss_newton.value) - ggn) <= Z * float(gauss_newton.stderr)
    # The errors are informative: a few percent of the value.
    assert float(fisher.stderr) < 0.1 * ggn
    assert float(gauss_newton.stderr) < 0.1 * ggn

  def test_gaussian_fisher_of_a_linear_model(self):
    # F = X^T X / n for a unit-variance Gaussian likelihood: trace 2.5.
    model = lambda w, x: x @ w
    x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    estimate = hessian.fisher_trace(
      model, jnp.zeros((2, 1)), x, 0, likelihood="gaussian", num_draws=64
    )
    assert abs(float(estimate.value) - 2.5) <= Z * float(estimate.stderr)

  def test_bad_input_is_refused(self, classifier):
    params, batch, _, _ = classifier
    with pytest.raises(ValueError, match=r"`likelihood`.*'poisson'"):
      hessian.fisher_trace(classifier_model, params, batch, 0, likelihood="poisson")
    with pytest.raises(ValueError, match="`num_draws`"):
      hessian.fisher_trace(classifier_model, params, batch, 0, num_draws=0)
    with pytest.raises(ValueError, match="`method`"):
      hessian.hessian_diagonal(classifier_loss, params, batch, 0, method="dense")
    with pytest.raises(ValueError, match="`key` is None"):
      hessian.hessian_diagonal(classifier_loss, params, batch)


@pytest.mark.slow
def test_diagonal_and_frobenius_errors_are_calibrated(tiny, full_scale):
  """Over independent keys the z-scores have about unit spread."""
  num_keys = 40 if full_scale else 10

  @jax.jit
  def z_scores(key):
    diagonal = hessian.hessian_diagonal(
      ht.loss_fn, tiny.params, tiny.batch, key, num_matvecs=50
    )
    frobenius = hessian.hessian_frobenius_norm(
      ht.loss_fn, tiny.params, tiny.batch, key, num_matvecs=50
    )
    return diagonal, frobenius

  truth = np.diag(tiny.hessian)
  square = float(np.sum(tiny.hessian**2))
  diagonal_z, frobenius_z = [], []
  for seed in range(num_keys):
    diagonal, frobenius = z_scores(jax.random.key(100 + seed))
    diagonal_z.append((flat(diagonal.value) - truth) / flat(diagonal.stderr))
    frobenius_z.append(
      (float(frobenius.squared) - square) / float(frobenius.squared_stderr)
    )
  assert 0.7 < np.std(np.concatenate(diagonal_z)) < 1.3
  assert np.max(np.abs(frobenius_z)) < Z
