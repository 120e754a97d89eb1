"""The NSO paper's flatness measures against dense references.

Noise stability against a direct Monte Carlo mean and its Taylor value,
the Hessian-based measures and the layer traces against the blocks of the
dense Hessian of a 38-parameter MLP, and the trace term of the bound against
its formula where the per-layer traces are exact. Statistical checks use five
standard errors, with the seeds fixed.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax_compat import enable_x64

from nso_jax import hessian
from nso_jax import sample_noise

try:  # the tests directory is a plain folder or, in some layouts, a package
  import hessian_testing as ht
except ImportError:
  from tests import hessian_testing as ht

Z = 5.0  # standard errors allowed in the statistical checks


@pytest.fixture(scope="module")
def tiny() -> ht.Problem:
  return ht.tiny_problem()


def flat(tree) -> np.ndarray:
  """The leaves of ``tree`` in one float64 vector, in ``ravel_pytree``'s order."""
  return np.concatenate(
    [np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)]
  )


def leaf_slices(params) -> list[slice]:
  """The slice of each leaf (in leaf order) in the flattened parameters."""
  sizes = [math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)]
  bounds = np.cumsum([0, *sizes])
  return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def split(batch, sizes):
  bounds = np.cumsum([0, *sizes])
  return [
    jax.tree.map(lambda x, a=a, b=b: x[a:b], batch)
    for a, b in itertools.pairwise(bounds)
  ]


def shifted(params, seed: int, scale: float):
  """``params`` plus ``scale`` times a fixed Gaussian direction (as numpy)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda w: (
      np.asarray(w) + np.float32(scale) * rng.standard_normal(w.shape, np.float32)
    ),
    params,
  )


def is_estimate(node) -> bool:
  return isinstance(node, hessian.TraceEstimate)


# --------------------------------------------------------------------------
# Noise stability


NUM_DRAWS = 400


@pytest.fixture(scope="module")
def stability():
  """One compiled noise-stability measure: (params, data, key, sigma) -> estimate."""

  @jax.jit
  def measure(params, data, key, sigma):
    return hessian.noise_stability_measure(
      ht.loss_fn, params, data, key, sigma=sigma, num_draws=NUM_DRAWS
    )

  return measure


class TestNoiseStability:
  def test_agrees_with_a_direct_monte_carlo_mean(self, tiny, stability):
    sigma = 0.05
    estimate = stability(tiny.params, tiny.batch, jax.random.key(0), sigma)

    @jax.jit
    def direct(params, key):
      # 4000 independent draws, drawn another way (one flat Gaussian vector).
      vector, unravel = ravel_pytree(params)
      noise = jax.random.normal(key, (4000, vector.size))
      perturbed = jax.vmap(
        lambda u: ht.loss_fn(unravel(vector + sigma * u), tiny.batch)
      )
      return perturbed(noise) - ht.loss_fn(params, tiny.batch)

    samples = np.asarray(direct(tiny.params, jax.random.key(99)), np.float64)
    reference, reference_se = samples.mean(), samples.std(ddof=1) / np.sqrt(4000)
    tolerance = Z * math.hypot(float(estimate.stderr), reference_se)
    assert abs(float(estimate.value) - reference) < tolerance
    assert float(estimate.value) > 0.0  # near a generic point: a loss increase

  def test_standard_error_is_that_of_the_samples(self, tiny, stability):
    estimate = stability(tiny.params, tiny.batch, jax.random.key(1), 0.05)
    samples = np.asarray(estimate.samples, np.float64)
    assert samples.shape == (NUM_DRAWS,)
    np.testing.assert_allclose(float(estimate.value), samples.mean(), rtol=1e-5)
    np.testing.assert_allclose(
      float(estimate.stderr), samples.std(ddof=1) / np.sqrt(NUM_DRAWS), rtol=1e-4
    )

  def test_draw_j_depends_only_on_the_key_and_j(self, tiny, stability):
    key, sigma = jax.random.key(3), 0.1
    estimate = stability(tiny.params, tiny.batch, key, sigma)

    @jax.jit
    def direct(params, indices):
      def increase(j):
        noise = sample_noise(jax.random.fold_in(key, j), params, "normal")
        moved = jax.tree.map(lambda w, u: w + sigma * u, params, noise)
        return ht.loss_fn(moved, tiny.batch) - ht.loss_fn(params, tiny.batch)

      return jax.vmap(increase)(indices)

    # The formula involves neither num_draws nor the other draws.
    indices = jnp.array([0, 1, 2, NUM_DRAWS - 1])
    np.testing.assert_allclose(
      estimate.samples[indices], direct(tiny.params, indices), rtol=1e-5, atol=1e-6
    )

  def test_same_key_same_bits_under_jit(self, tiny, stability):
    first = stability(tiny.params, tiny.batch, jax.random.key(5), 0.05)
    again = stability(tiny.params, tiny.batch, jax.random.key(5), 0.05)
    other = stability(tiny.params, tiny.batch, jax.random.key(6), 0.05)
    np.testing.assert_array_equal(first.samples, again.samples)
    assert not np.array_equal(first.samples, other.samples)

  def test_eps_zero_changes_nothing(self, tiny, stability):
    # The clean loss runs through the same computation: exactly zero.
    estimate = stability(tiny.params, tiny.batch, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(estimate.samples, np.zeros(NUM_DRAWS))

  def test_batches_average_to_the_whole_data_set(self, tiny, stability):
    key = jax.random.key(4)
    whole = stability(tiny.params, tiny.batch, key, 0.1)
    parts = stability(tiny.params, split(tiny.batch, [7, 5]), key, 0.1)
    np.testing.assert_allclose(parts.samples, whole.samples, rtol=1e-4, atol=1e-6)

  def test_taylor_value_for_small_sigma(self, tiny):
    # E[(L(W+U) + L(W-U))/2] - L(W) = sigma^2/2 tr(H) + O(sigma^4).
    sigma, num = 1e-2, 1000
    estimate = jax.jit(
      lambda p, k: hessian.noise_stability_measure(
        ht.loss_fn, p, tiny.batch, k, sigma=sigma, num_draws=num, antithetic=True
      )
    )(tiny.params, jax.random.key(0))
    taylor = 0.5 * sigma**2 * tiny.trace
    # Five standard errors, plus the sigma^4 term (relative size ~ sigma^2).
    tolerance = Z * float(estimate.stderr) + 10 * sigma**2 * taylor
    assert abs(float(estimate.value) - taylor) < tolerance
    assert float(estimate.stderr) < 0.05 * taylor  # the check has teeth

  def test_antithetic_draws_cancel_odd_terms(self):
    # For a quadratic plus a linear term, the antithetic increase is exactly
    # u^T H u / 2, whatever the gradient.
    loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w**2, axis=-1)) + jnp.sum(w)
    x = jnp.array([[1.0, 2.0, 3.0]])
    key, sigma = jax.random.key(0), 0.5

    @jax.jit
    def both(w):
      estimate = hessian.noise_stability_measure(
        loss, w, x, key, sigma=sigma, num_draws=4, antithetic=True
      )
      u = jax.vmap(lambda j: sigma * sample_noise(jax.random.fold_in(key, j), w))(
        jnp.arange(4)
      )
      return estimate.samples, 0.5 * jnp.sum(x[0] * u**2, axis=-1)

    samples, expected = both(jnp.ones(3))
    np.testing.assert_allclose(samples, expected, rtol=1e-5)

  def test_param_filter_perturbs_the_selected_leaves_only(self):
    f = lambda a, x: jnp.mean(jnp.sin(x @ a))
    separable = lambda p, x: f(p["a"], x) + jnp.sum(p["b"] ** 2)
    params = {"a": jnp.linspace(-1.0, 1.0, 3), "b": jnp.ones(4)}
    x = jnp.arange(6.0).reshape(2, 3) / 6
    measure = lambda loss, p, **kw: hessian.noise_stability_measure(
      loss, p, x, 7, sigma=0.3, num_draws=3, **kw
    )
    only_a, alone = jax.jit(
      lambda p: (
        measure(separable, p, param_filter={"a": True, "b": False}),
        measure(lambda q, x: f(q["a"], x), {"a": p["a"]}),
      )
    )(params)
    np.testing.assert_allclose(only_a.samples, alone.samples, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# Hessian-based measures


@pytest.fixture(scope="module")
def setup(tiny):
  """A reference point, v = params - reference (flat), and the leaf slices."""
  reference = shifted(tiny.params, 11, -0.3)
  v = flat(tiny.params) - flat(reference)
  return reference, v, leaf_slices(tiny.params)


class TestLayerHessianMeasure:
  def test_blocks_match_the_dense_hessian(self, tiny, setup):
    reference, v, slices = setup
    measure = jax.jit(
      lambda p, r: hessian.layer_hessian_measure(ht.loss_fn, p, tiny.batch, r)
    )(tiny.params, reference)
    assert jax.tree.structure(measure) == jax.tree.structure(tiny.params)
    expected = [v[s] @ tiny.hessian[s, s] @ v[s] for s in slices]
    got = [float(x) for x in jax.tree.leaves(measure)]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert all(
      x.dtype == jnp.float32 and x.shape == () for x in jax.tree.leaves(measure)
    )

  def test_split_and_total_match_the_dense_hessian(self, tiny, setup):
    reference, v, slices = setup

    @jax.jit
    def both(params, reference):
      split_measure = hessian.layer_hessian_measure(
        ht.loss_fn, params, tiny.batch, reference, block_diagonal=False
      )
      direction = jax.tree.map(jnp.subtract, params, reference)
      total = hessian.direction_curvature(ht.loss_fn, params, tiny.batch, direction)
      return split_measure, total

    split_measure, total = both(tiny.params, reference)
    hv = tiny.hessian @ v
    expected = [v[s] @ hv[s] for s in slices]
    got = [float(x) for x in jax.tree.leaves(split_measure)]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(total), v @ hv, rtol=1e-5)
    np.testing.assert_allclose(sum(got), float(total), rtol=1e-4)

  def test_executions_agree(self, tiny, setup):
    measure = lambda execution: hessian.layer_hessian_measure(
      ht.loss_fn, tiny.params, tiny.batch, setup[0], execution=execution
    )
    by_map, by_vmap, unrolled = jax.jit(
      lambda: [measure(e) for e in ("map", "vmap", "unroll")]
    )()
    np.testing.assert_allclose(flat(by_vmap), flat(by_map), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(flat(unrolled), flat(by_map), rtol=1e-5, atol=1e-7)

  def test_param_filter_and_batches(self, tiny, setup):
    reference, v, slices = setup
    second_layer = lambda path, leaf: path[0].key == "layer1"
    batches = split(tiny.batch, [5, 5, 2])

    @jax.jit
    def both(params, reference):
      measure = hessian.layer_hessian_measure(
        ht.loss_fn, params, batches, reference, param_filter=second_layer
      )
      curvature = hessian.direction_curvature(
        ht.loss_fn, params, batches, params, param_filter=second_layer
      )
      return measure, curvature

    measure, curvature = both(tiny.params, reference)
    assert measure["layer0"] == {"b": None, "w": None}
    expected = [v[s] @ tiny.hessian[s, s] @ v[s] for s in slices[2:]]
    got = [float(measure["layer1"]["b"]), float(measure["layer1"]["w"])]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    tail = slice(slices[2].start, None)
    w = flat(tiny.params)[tail]
    np.testing.assert_allclose(float(curvature), w @ tiny.hessian[tail, tail] @ w, 1e-4)

  def test_float64_leaves_give_float64_measures(self):
    loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w**2, axis=-1))
    with enable_x64(True):
      w = jnp.ones(3, jnp.float64)
      x = jnp.array([[1.0, 2.0, 1.0 / 3.0]], jnp.float64)

      @jax.jit
      def measures(w):
        return (
          hessian.layer_hessian_measure(loss, w, x, jnp.zeros(3)),
          hessian.direction_curvature(loss, w, x, w),
          hessian.noise_stability_measure(
            loss, w, x, 0, sigma=0.1, num_draws=2
          ).samples,
        )

      block, total, samples = measures(w)
    assert block.dtype == total.dtype == samples.dtype == jnp.float64
    assert float(block) == float(total) == 1.0 + 2.0 + 1.0 / 3.0

  def test_zero_at_the_reference(self, tiny):
    measure = jax.jit(
      lambda p: hessian.layer_hessian_measure(ht.loss_fn, p, tiny.batch, p)
    )(tiny.params)
    assert all(float(x) == 0.0 for x in jax.tree.leaves(measure))


# --------------------------------------------------------------------------
# Layer traces


class TestLayerTraces:
  def test_unbiased_against_the_dense_blocks(self, tiny):
    num = 3000
    traces = jax.jit(
      lambda p, k: hessian.layer_traces(ht.loss_fn, p, tiny.batch, k, num_matvecs=num)
    )(tiny.params, jax.random.key(0))
    assert jax.tree.structure(traces, is_leaf=is_estimate) == jax.tree.structure(
      tiny.params
    )
    estimates = jax.tree.leaves(traces, is_leaf=is_estimate)
    for estimate, s in zip(estimates, leaf_slices(tiny.params), strict=True):
      exact = np.trace(tiny.hessian[s, s])
      assert int(estimate.num_matvecs) == num
      assert 0.0 < float(estimate.stderr) < np.inf
      assert abs(float(estimate.value) - exact) < Z * float(estimate.stderr), (
        float(estimate.value),
        exact,
      )

  def test_layers_sum_to_the_full_hutchinson_estimate(self, tiny):
    kwargs = dict(num_matvecs=30)
    batches = split(tiny.batch, [8, 4])

    @jax.jit
    def both(params, key):
      traces = hessian.layer_traces(ht.loss_fn, params, batches, key, **kwargs)
      return traces, hessian.trace(ht.loss_fn, params, batches, key, **kwargs)

    traces, full = both(tiny.params, jax.random.key(9))
    values = [float(e.value) for e in jax.tree.leaves(traces, is_leaf=is_estimate)]
    np.testing.assert_allclose(sum(values), float(full.value), rtol=1e-5)

  def test_a_filtered_leaf_is_its_restricted_trace(self, tiny):
    only = {"layer0": {"b": False, "w": True}, "layer1": False}
    kwargs = dict(num_matvecs=20, param_filter=only)
    traces, restricted = jax.jit(
      lambda p: (
        hessian.layer_traces(ht.loss_fn, p, tiny.batch, 2, **kwargs),
        hessian.trace(ht.loss_fn, p, tiny.batch, 2, **kwargs),
      )
    )(tiny.params)
    assert traces["layer1"] == {"b": None, "w": None}
    assert traces["layer0"]["b"] is None
    np.testing.assert_allclose(
      float(traces["layer0"]["w"].value), float(restricted.value), rtol=1e-6
    )
    np.testing.assert_allclose(
      float(traces["layer0"]["w"].stderr), float(restricted.stderr), rtol=1e-5
    )


# --------------------------------------------------------------------------
# The trace term of the bound


def quadratic_loss(params, batch):
  """Diagonal Hessian blocks diag(mean x_a), diag(mean x_b): probes are exact."""
  terms = jnp.sum(batch["a"] * params["a"] ** 2, -1)
  terms = terms + jnp.sum(batch["b"] * params["b"] ** 2, -1)
  return 0.5 * jnp.mean(terms)


QUADRATIC_PARAMS = {"a": np.array([1.0, -2.0, 0.5]), "b": np.array([0.3, 1.0])}
QUADRATIC_REFERENCE = {"a": np.zeros(3), "b": np.array([0.3, -1.0])}
QUADRATIC_EXAMPLES = 1000  # the n of the bound


def quadratic_batches():
  rng = np.random.default_rng(21)
  data = {
    "a": rng.uniform(0.0, 4.0, (10, 3)).astype(np.float32),
    "b": rng.uniform(0.0, 4.0, (10, 2)).astype(np.float32),
  }
  return split(data, [4, 4, 2])


def exact_layer_traces(batch) -> list[float]:
  """tr(H_aa), tr(H_bb) of ``quadratic_loss`` on ``batch``: the Hessian is known."""
  return [float(np.sum(np.mean(batch[name], axis=0))) for name in ("a", "b")]


@pytest.fixture(scope="module")
def quadratic_bound():
  """reference -> the bound term of the quadratic over three batches, compiled once."""
  batches = quadratic_batches()
  return jax.jit(
    lambda reference: hessian.trace_bound_term(
      quadratic_loss,
      QUADRATIC_PARAMS,
      batches,
      reference,
      0,
      num_examples=QUADRATIC_EXAMPLES,
      num_matvecs=2,
    )
  )


class TestTraceBound:
  def test_max_over_batches_matches_the_formula(self, quadratic_bound):
    bound = quadratic_bound(QUADRATIC_REFERENCE)
    per_batch = np.array([exact_layer_traces(b) for b in quadratic_batches()])
    layer_maxima = per_batch.max(axis=0)
    assert per_batch.argmax(axis=0).tolist() == [0, 1]  # maxima of different batches
    distance = flat(QUADRATIC_PARAMS) - flat(QUADRATIC_REFERENCE)
    expected = np.sqrt(
      layer_maxima.clip(0).sum() * (distance @ distance) / QUADRATIC_EXAMPLES
    )
    np.testing.assert_allclose(float(bound.value), expected, rtol=1e-6)
    np.testing.assert_allclose(float(bound.squared_distance), distance @ distance)
    np.testing.assert_allclose(
      [float(bound.layer_traces["a"]), float(bound.layer_traces["b"])],
      layer_maxima,
      rtol=1e-6,
    )
    np.testing.assert_allclose(float(bound.layer_squared_distances["b"]), 4.0)

  def test_zero_at_the_reference_and_linear_in_the_distance(self, quadratic_bound):
    assert float(quadratic_bound(QUADRATIC_PARAMS).value) == 0.0
    near = jax.tree.map(
      lambda w, r: w - 0.5 * (w - r), QUADRATIC_PARAMS, QUADRATIC_REFERENCE
    )
    np.testing.assert_allclose(
      2 * float(quadratic_bound(near).value),
      float(quadratic_bound(QUADRATIC_REFERENCE).value),
      rtol=1e-6,
    )

  def test_mean_is_the_data_set_trace(self):
    batches = quadratic_batches()
    bound = jax.jit(
      lambda params: hessian.trace_bound_term(
        quadratic_loss,
        params,
        batches,
        QUADRATIC_REFERENCE,
        0,
        num_examples=10,
        num_matvecs=2,
        reduction="mean",
      )
    )(QUADRATIC_PARAMS)
    whole = {name: np.concatenate([b[name] for b in batches]) for name in ("a", "b")}
    exact = exact_layer_traces(whole)
    np.testing.assert_allclose(float(bound.trace), sum(exact), rtol=1e-6)

  def test_negative_layer_traces_count_as_zero(self):
    batches = quadratic_batches()
    concave = lambda p, batch: (
      quadratic_loss({"a": p["a"], "b": jnp.zeros(2)}, batch)
      - 0.5 * jnp.mean(jnp.sum(batch["b"] * p["b"] ** 2, -1))
    )
    bound = jax.jit(
      lambda params: hessian.trace_bound_term(
        concave,
        params,
        batches,
        QUADRATIC_REFERENCE,
        0,
        num_examples=10,
        num_matvecs=2,
      )
    )(QUADRATIC_PARAMS)
    assert float(bound.layer_traces["b"]) < 0.0
    np.testing.assert_allclose(
      float(bound.trace), float(bound.layer_traces["a"]), rtol=1e-6
    )

  def test_zero_weight_batches_are_ignored(self):
    batches = quadratic_batches()[:2]
    sharp = jax.tree.map(lambda x: 100.0 * x, batches[1])
    stacked = jax.tree.map(lambda *xs: np.stack(xs), batches[0], sharp)
    kwargs = dict(num_examples=8, num_matvecs=2)
    term = lambda data: hessian.trace_bound_term(
      quadratic_loss, QUADRATIC_PARAMS, data, QUADRATIC_REFERENCE, 0, **kwargs
    )
    weighted = hessian.StackedBatches(stacked, np.array([4.0, 0.0], np.float32))
    ignored, first_only = jax.jit(lambda: (term(weighted), term(batches[0])))()
    np.testing.assert_allclose(float(ignored.value), float(first_only.value), rtol=1e-6)

  def test_mlp_layer_traces_are_those_of_layer_traces(self, tiny):
    reference = shifted(tiny.params, 12, 0.2)

    @jax.jit
    def both(params, reference, key):
      bound = hessian.trace_bound_term(
        ht.loss_fn,
        params,
        tiny.batch,
        reference,
        key,
        num_examples=12,
        num_matvecs=16,
        reduction="mean",
      )
      single_max = hessian.trace_bound_term(
        ht.loss_fn,
        params,
        [tiny.batch],
        reference,
        key,
        num_examples=12,
        num_matvecs=16,
      )
      traces = hessian.layer_traces(ht.loss_fn, params, tiny.batch, key, num_matvecs=16)
      return bound, single_max, traces

    bound, single_max, traces = both(tiny.params, reference, jax.random.key(4))
    values = [e.value for e in jax.tree.leaves(traces, is_leaf=is_estimate)]
    np.testing.assert_allclose(flat(bound.layer_traces), values, rtol=1e-5)
    np.testing.assert_allclose(flat(single_max.layer_traces), values, rtol=1e-5)
    distance = flat(tiny.params) - flat(reference)
    expected = np.sqrt(np.clip(values, 0, None).sum() * (distance @ distance) / 12)
    np.testing.assert_allclose(float(bound.value), expected, rtol=1e-5)


# --------------------------------------------------------------------------
# Bad input


W = jnp.ones(3)
X = jnp.ones((4, 3))
LOSS = lambda w, x: jnp.mean((x @ w) ** 2)

BAD = [
  # (function, valid keyword arguments, argument, bad value, expected in message)
  *[
    (hessian.noise_stability_measure, dict(key=0, sigma=0.1), "sigma", bad, "`sigma`")
    for bad in [-0.1, math.nan, math.inf, "x", None, jnp.ones(2), True]
  ],
  *[
    (
      hessian.noise_stability_measure,
      dict(key=0, sigma=0.1),
      "num_draws",
      bad,
      "`num_draws`",
    )
    for bad in [0, -1, 2.5, True, None]
  ],
  (
    hessian.noise_stability_measure,
    dict(key=0, sigma=0.1),
    "noise",
    "cauchy",
    "`noise`",
  ),
  (
    hessian.noise_stability_measure,
    dict(key=0, sigma=0.1),
    "antithetic",
    "no",
    "`antithetic`",
  ),
  (
    hessian.noise_stability_measure,
    dict(key=0, sigma=0.1),
    "execution",
    "pmap",
    "`execution`",
  ),
  (
    hessian.noise_stability_measure,
    dict(key=0, sigma=0.1),
    "execution",
    3,
    "`execution`",
  ),
  (hessian.noise_stability_measure, dict(key=0, sigma=0.1), "key", None, "`key`"),
  (
    hessian.noise_stability_measure,
    dict(key=0, sigma=0.1),
    "param_filter",
    lambda path, leaf: False,
    "`param_filter`",
  ),
  (hessian.noise_stability_measure, dict(key=0, sigma=0.1), "data", None, "`data`"),
  (
    hessian.layer_hessian_measure,
    dict(reference=W),
    "reference",
    jnp.ones(4),
    "`reference`",
  ),
  (
    hessian.layer_hessian_measure,
    dict(reference=W),
    "reference",
    jnp.ones(3, jnp.int32),
    "`reference`",
  ),
  (
    hessian.layer_hessian_measure,
    dict(reference=W),
    "block_diagonal",
    "yes",
    "`block_diagonal`",
  ),
  (
    hessian.layer_hessian_measure,
    dict(reference=W),
    "execution",
    "VMAP",
    "`execution`",
  ),
  (hessian.direction_curvature, dict(direction=W), "direction", (W,), "`direction`"),
  *[
    (hessian.layer_traces, dict(key=0), "num_matvecs", bad, "`num_matvecs`")
    for bad in [0, 1.5, "3"]
  ],
  (hessian.layer_traces, dict(key=0), "key", "seed", "`key`"),
  (hessian.layer_traces, dict(key=0), "execution", None, "`execution`"),
  *[
    (
      hessian.trace_bound_term,
      dict(reference=W, key=0, num_examples=10),
      "num_examples",
      bad,
      "`num_examples`",
    )
    for bad in [0, 2.5, None]
  ],
  (
    hessian.trace_bound_term,
    dict(reference=W, key=0, num_examples=10),
    "reduction",
    "median",
    "`reduction`",
  ),
  (
    hessian.trace_bound_term,
    dict(reference=W, key=0, num_examples=10),
    "reference",
    {"w": W},
    "`reference`",
  ),
  (
    hessian.trace_bound_term,
    dict(reference=W, key=0, num_examples=10),
    "num_matvecs",
    0,
    "`num_matvecs`",
  ),
]


@pytest.mark.parametrize(
  ("function", "valid", "argument", "bad", "named"),
  BAD,
  ids=[f"{case[0].__name__}-{case[2]}-{index}" for index, case in enumerate(BAD)],
)
def test_bad_input_gets_a_clear_error(function, valid, argument, bad, named):
  arguments = dict(loss_fn=LOSS, params=W, data=X, **valid)
  arguments[argument] = bad
  with pytest.raises((ValueError, TypeError)) as raised:
    function(**arguments)
  assert named in str(raised.value), str(raised.value)


def test_reference_structure_mismatch_names_both_structures(tiny):
  wrong = {"layer0": tiny.params["layer0"]}
  with pytest.raises(ValueError, match="`reference` must have the structure") as raised:
    hessian.layer_hessian_measure(ht.loss_fn, tiny.params, tiny.batch, wrong)
  message = str(raised.value)
  assert str(jax.tree.structure(wrong)) in message
  assert str(jax.tree.structure(tiny.params)) in message


def test_reference_shape_mismatch_names_the_leaf(tiny):
  wrong = jax.tree.map(lambda x: x, tiny.params)
  wrong["layer1"]["w"] = jnp.zeros((2, 6))
  with pytest.raises(ValueError, match=r"\['layer1'\]\['w'\] has shape \(2, 6\)"):
    hessian.trace_bound_term(
      ht.loss_fn, tiny.params, tiny.batch, wrong, 0, num_examples=12
    )
