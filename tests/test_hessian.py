"""Curvature operators: HVP and GGN against dense references, data averaging,
parameter filters, the one-call measures, and validation of bad input."""

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


@pytest.fixture(scope="module")
def problem() -> ht.Problem:
  return ht.mlp_problem()


@pytest.fixture(scope="module")
def tiny() -> ht.Problem:
  return ht.tiny_problem()


def flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def random_like(tree, seed: int):
  flat_tree, unravel = ravel_pytree(tree)
  return unravel(jax.random.normal(jax.random.key(seed), flat_tree.shape))


def split_batch(batch, sizes):
  bounds = np.cumsum([0, *sizes])
  return [
    jax.tree.map(lambda x, a=a, b=b: x[a:b], batch)
    for a, b in itertools.pairwise(bounds)
  ]


class TestHessianProducts:
  def test_hvp_matches_the_dense_hessian(self, problem):
    v = random_like(problem.params, 0)
    product = jax.jit(hessian.hvp, static_argnums=0)(
      ht.loss_fn, problem.params, problem.batch, v
    )
    expected = problem.hessian @ flat(v)
    np.testing.assert_allclose(flat(product), expected, rtol=1e-4, atol=1e-4)

  def test_unequal_batches_average_to_the_full_batch(self, problem):
    # 96 examples as 40 + 40 + 16: the short last batch must weigh 16/96.
    v = random_like(problem.params, 1)
    batches = split_batch(problem.batch, [40, 40, 16])

    @jax.jit
    def products(params, batches, full_batch, v):
      averaged = hessian.hessian_operator(ht.loss_fn, params, batches).matvec(v)
      full = hessian.hessian_operator(ht.loss_fn, params, full_batch).matvec(v)
      return averaged, full

    averaged, full = products(problem.params, batches, problem.batch, v)
    np.testing.assert_allclose(flat(averaged), flat(full), rtol=1e-4, atol=1e-5)

  def test_an_iterator_of_batches_is_a_data_set(self, problem):
    v = random_like(problem.params, 2)
    batches = iter(split_batch(problem.batch, [50, 46]))
    averaged = hessian.hessian_operator(ht.loss_fn, problem.params, batches).matvec(v)
    np.testing.assert_allclose(
      flat(averaged), problem.hessian @ flat(v), rtol=1e-4, atol=1e-4
    )

  def test_stacked_batches_with_padding_and_weights(self, problem):
    # Three batches of 40 slots, the last holding 16 real examples and 24 of
    # padding that a masked loss ignores; the example counts as weights make
    # the average exact.
    sizes = [40, 40, 16]
    pieces = split_batch(problem.batch, sizes)
    pad = lambda x, n: jnp.pad(x, [(0, 40 - n)] + [(0, 0)] * (x.ndim - 1))
    padded = [
      jax.tree.map(lambda x, n=n: pad(x, n), piece)
      for piece, n in zip(pieces, sizes, strict=True)
    ]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *padded)
    stacked["mask"] = jnp.stack([jnp.arange(40) < n for n in sizes])

    def masked_loss(params, batch):
      losses = ht.per_example_loss(ht.model_fn(params, batch), batch)
      return jnp.sum(batch["mask"] * losses) / jnp.sum(batch["mask"])

    data = hessian.StackedBatches(stacked, weights=jnp.array(sizes, jnp.float32))
    v = random_like(problem.params, 3)
    product = hessian.hessian_operator(masked_loss, problem.params, data).matvec(v)
    np.testing.assert_allclose(
      flat(product), problem.hessian @ flat(v), rtol=1e-4, atol=1e-4
    )

  def test_batches_are_accumulated_in_one_scan(self, tiny):
    # The compiled program does not grow with the number of batches.
    def equations(num_batches):
      batches = [tiny.batch] * num_batches
      operator = hessian.hessian_operator(ht.loss_fn, tiny.params, batches)
      jaxpr = jax.make_jaxpr(operator.matvec)(tiny.params)
      return len(jaxpr.jaxpr.eqns), str(jaxpr).count("scan")

    assert equations(3) == equations(30)
    assert equations(3)[1] == 1

  def test_products_keep_each_leaf_dtype(self, tiny):
    params = {
      "low": jnp.ones((3,), jnp.bfloat16),
      "high": jnp.ones((2,), jnp.float32),
    }
    loss = lambda p, b: (
      2 * jnp.sum(p["low"].astype(jnp.float32) ** 2) + 3 * jnp.sum(p["high"] ** 2)
    )
    operator = hessian.hessian_operator(loss, params, [tiny.batch, tiny.batch])
    product = operator.matvec(params)
    assert jax.tree.map(lambda x: x.dtype, product) == {
      "low": jnp.bfloat16,
      "high": jnp.float32,
    }
    estimate = hessian.trace(loss, params, tiny.batch, 0, num_matvecs=4)
    assert estimate.value.dtype == jnp.float32
    # H = diag(4 I_3, 6 I_2): tr(H) = 3 * 4 + 2 * 6, exact for Rademacher probes.
    assert float(estimate.value) == pytest.approx(3 * 4 + 2 * 6, rel=1e-2)


class TestGaussNewton:
  def test_matches_dense_jacobian_form(self, tiny):
    flat_params, unravel = ravel_pytree(tiny.params)
    outputs = lambda f: ht.model_fn(unravel(f), tiny.batch).reshape(-1)
    jacobian = np.asarray(jax.jacobian(outputs)(flat_params), np.float64)
    # Mean over examples of 0.5 |f - y|^2: the output Hessian is I / n.
    num_examples = tiny.batch["x"].shape[0]
    dense = jacobian.T @ jacobian / num_examples
    operator = hessian.ggn_operator(
      ht.model_fn, ht.per_example_loss, tiny.params, tiny.batch
    )
    v = random_like(tiny.params, 0)
    np.testing.assert_allclose(
      flat(operator.matvec(v)), dense @ flat(v), rtol=1e-4, atol=1e-5
    )

  def test_equals_the_hessian_for_a_linear_model(self):
    x = jax.random.normal(jax.random.key(0), (20, 5))
    batch = {"x": x, "y": jax.random.normal(jax.random.key(1), (20, 3))}
    params = {"w": jax.random.normal(jax.random.key(2), (5, 3))}
    model = lambda p, b: b["x"] @ p["w"]
    loss = lambda p, b: jnp.mean(ht.per_example_loss(model(p, b), b))
    v = random_like(params, 3)
    ggn = hessian.ggn_operator(model, ht.per_example_loss, params, batch).matvec(v)
    hess = hessian.hessian_operator(loss, params, batch).matvec(v)
    np.testing.assert_allclose(flat(ggn), flat(hess), rtol=1e-5, atol=1e-6)

  def test_averages_unequal_batches(self, tiny):
    v = random_like(tiny.params, 4)
    full = hessian.ggn_operator(
      ht.model_fn, ht.per_example_loss, tiny.params, tiny.batch
    ).matvec(v)
    split = hessian.ggn_operator(
      ht.model_fn, ht.per_example_loss, tiny.params, split_batch(tiny.batch, [5, 7])
    ).matvec(v)
    np.testing.assert_allclose(flat(split), flat(full), rtol=1e-5, atol=1e-6)


class TestParamFilter:
  def block(self, problem, layer):
    """The dense Hessian block of one layer, and that layer's flat indices."""
    selected = {
      name: jax.tree.map(lambda x, n=name: jnp.full(x.shape, n == layer), sub)
      for name, sub in problem.params.items()
    }
    indices = np.flatnonzero(flat(selected))
    return problem.hessian[np.ix_(indices, indices)]

  @pytest.mark.parametrize(
    "param_filter",
    [
      {"layer0": False, "layer1": True, "layer2": False},
      lambda path, leaf: path[0].key == "layer1",
    ],
    ids=["mask", "callable"],
  )
  def test_restricts_to_a_layer(self, problem, param_filter):
    operator = hessian.hessian_operator(
      ht.loss_fn, problem.params, problem.batch, param_filter=param_filter
    )
    assert operator.template["layer0"] == {"b": None, "w": None}
    assert operator.dim == 40 * 40 + 40
    v = random_like(operator.template, 0)
    expected = self.block(problem, "layer1") @ flat(v)
    np.testing.assert_allclose(flat(operator.matvec(v)), expected, rtol=1e-4, atol=1e-4)

  def test_layer_traces_match_the_dense_blocks(self, problem):
    # Each layer-wise estimate is exact in expectation: checked within 3 of
    # its own standard errors against the dense block trace.
    for layer in problem.params:
      estimate = hessian.trace(
        ht.loss_fn,
        problem.params,
        problem.batch,
        0,
        num_matvecs=30,
        param_filter=lambda path, _, layer=layer: path[0].key == layer,
      )
      exact = np.trace(self.block(problem, layer))
      assert abs(float(estimate.value) - exact) <= 3 * float(estimate.stderr) + 1e-6


class TestOneCallMeasures:
  def test_trace_under_jit_with_the_key_as_argument(self, tiny):
    @jax.jit
    def measure(params, batches, key):
      return hessian.trace(ht.loss_fn, params, batches, key, num_matvecs=20)

    batches = split_batch(tiny.batch, [8, 4])
    first = measure(tiny.params, batches, jax.random.key(0))
    again = measure(tiny.params, batches, jax.random.key(0))
    assert np.array_equal(first.value, again.value)
    assert int(first.num_matvecs) == 20
    # The estimate is within 4 of its standard errors of the exact trace.
    assert abs(float(first.value) - tiny.trace) <= 4 * float(first.stderr)

  @pytest.mark.parametrize("method", ["hutch++", "xtrace"])
  def test_trace_methods(self, tiny, method):
    estimate = hessian.trace(
      ht.loss_fn, tiny.params, tiny.batch, 0, num_matvecs=40, method=method
    )
    assert abs(float(estimate.value) - tiny.trace) <= 4 * float(estimate.stderr) + 1e-4

  def test_paper_protocol_stops_early(self, tiny):
    estimate = hessian.trace(
      ht.loss_fn, tiny.params, tiny.batch, 0, num_matvecs=100, rtol=1e-3
    )
    assert 2 <= int(estimate.num_matvecs) <= 100

  def test_eigenvalues_and_max_eigenvalue(self, tiny):
    top = hessian.top_eigenvalues(
      ht.loss_fn, tiny.params, tiny.batch, 0, num_eigenvalues=2
    )
    np.testing.assert_allclose(top, tiny.eigenvalues[::-1][:2], rtol=1e-4)
    bottom = hessian.eigenvalues(
      ht.loss_fn, tiny.params, tiny.batch, 0, num_eigenvalues=2, which="SA"
    )
    np.testing.assert_allclose(bottom, tiny.eigenvalues[:2], rtol=1e-4, atol=1e-5)
    power = hessian.max_eigenvalue(ht.loss_fn, tiny.params, tiny.batch, 0)
    largest = tiny.eigenvalues[np.argmax(np.abs(tiny.eigenvalues))]
    assert float(power.eigenvalue) == pytest.approx(largest, rel=1e-3)

  def test_spectral_density(self, tiny):
    density = hessian.spectral_density(
      ht.loss_fn,
      tiny.params,
      tiny.batch,
      0,
      num_probes=2,
      num_steps=20,
      grid=hessian.DensityGrid(size=100),
    )
    assert density.grid.shape == density.density.shape == (100,)
    assert density.nodes.shape == (2, 20)


class TestValidation:
  def test_non_scalar_loss(self, tiny):
    per_example = lambda p, b: ht.per_example_loss(ht.model_fn(p, b), b)
    with pytest.raises(ValueError, match=r"`loss_fn` must return a float scalar .*12"):
      hessian.hessian_operator(per_example, tiny.params, tiny.batch)

  def test_empty_params(self, tiny):
    with pytest.raises(ValueError, match=r"`params` is an empty pytree"):
      hessian.trace(lambda p, b: 0.0, {}, tiny.batch, 0, num_matvecs=2)

  def test_integer_params_leaf(self, tiny):
    params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match=r"leaf \['step'\] has dtype int32"):
      hessian.hessian_operator(lambda p, b: jnp.sum(p["w"]), params, tiny.batch)

  def test_integer_leaf_can_be_filtered_out(self, tiny):
    params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
    operator = hessian.hessian_operator(
      lambda p, b: jnp.sum(p["w"] ** 2),
      params,
      tiny.batch,
      param_filter={"w": True, "step": False},
    )
    product = operator.matvec({"w": jnp.ones(3), "step": None})
    np.testing.assert_allclose(product["w"], 2.0)

  def test_mismatched_example_counts_within_a_batch(self, tiny):
    bad = {"x": tiny.batch["x"], "y": tiny.batch["y"][:5]}
    message = r"`data\[1\]` has leaves with different numbers"
    with pytest.raises(ValueError, match=message):
      hessian.hessian_operator(ht.loss_fn, tiny.params, [tiny.batch, bad])

  def test_mismatched_example_shapes_across_batches(self, tiny):
    bad = {"x": tiny.batch["x"][:, :2], "y": tiny.batch["y"]}
    with pytest.raises(ValueError, match=r"`data\[1\]` has per-example shapes"):
      hessian.hessian_operator(ht.loss_fn, tiny.params, [tiny.batch, bad])

  def test_mismatched_structure_across_batches(self, tiny):
    with pytest.raises(ValueError, match=r"`data\[1\]` has structure"):
      hessian.hessian_operator(ht.loss_fn, tiny.params, [tiny.batch, {"x": 1}])

  def test_empty_list_of_batches(self, tiny):
    with pytest.raises(ValueError, match=r"`data` is an empty sequence"):
      hessian.hessian_operator(ht.loss_fn, tiny.params, [])

  def test_stacked_weights_shape(self, tiny):
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), tiny.batch)
    data = hessian.StackedBatches(stacked, weights=jnp.ones(3))
    with pytest.raises(ValueError, match=r"`data.weights` must have shape \(2,\)"):
      hessian.hessian_operator(ht.loss_fn, tiny.params, data)

  def test_filter_that_selects_nothing(self, tiny):
    with pytest.raises(ValueError, match=r"`param_filter` selects no parameter"):
      hessian.hessian_operator(
        ht.loss_fn, tiny.params, tiny.batch, param_filter=lambda *_: False
      )

  def test_filter_with_the_wrong_structure(self, tiny):
    with pytest.raises(ValueError, match=r"`param_filter` must be a callable"):
      hessian.hessian_operator(
        ht.loss_fn, tiny.params, tiny.batch, param_filter={"nope": True}
      )

  def test_unknown_method_and_rtol_misuse(self, tiny):
    with pytest.raises(ValueError, match=r"`method` must be one of"):
      hessian.trace(ht.loss_fn, tiny.params, tiny.batch, 0, method="exact")
    message = r"`rtol`=0.001 applies to method='hutchinson'"
    with pytest.raises(ValueError, match=message):
      hessian.trace(ht.loss_fn, tiny.params, tiny.batch, 0, method="xtrace", rtol=1e-3)

  def test_more_eigenvalues_than_the_dimension(self, tiny):
    with pytest.raises(ValueError, match=r"`num_eigenvalues` must be .*\(38\)"):
      hessian.top_eigenvalues(
        ht.loss_fn, tiny.params, tiny.batch, 0, num_eigenvalues=39
      )

  def test_num_matvecs_below_one(self, tiny):
    with pytest.raises(ValueError, match=r"`num_matvecs` must be an int >= 1, got 0"):
      hessian.trace(ht.loss_fn, tiny.params, tiny.batch, 0, num_matvecs=0)

  def test_traced_integer_setting(self, tiny):
    measure = lambda n: hessian.trace(
      ht.loss_fn, tiny.params, tiny.batch, 0, num_matvecs=n
    )
    message = r"`num_matvecs` must be a concrete Python int"
    with pytest.raises(ValueError, match=message):
      jax.jit(measure)(3)


def test_data_average_accumulates_low_precision_in_float32():
  # 100 batches of 30 examples of a bfloat16 model: the weighted sum is kept in
  # float32, so only the final cast rounds.
  x = jax.random.uniform(jax.random.key(0), (3000, 4), minval=0.5, maxval=1.5)
  loss = lambda w, x: jnp.mean(jnp.sum(x * w.astype(jnp.float32) ** 2, axis=-1))
  batches = [x[i : i + 30] for i in range(0, 3000, 30)]
  operator = hessian.hessian_operator(loss, jnp.ones(4, jnp.bfloat16), batches)
  product = operator.matvec(jnp.ones(4, jnp.bfloat16))
  assert product.dtype == jnp.bfloat16
  exact = 2 * np.asarray(x, np.float64).mean(axis=0)
  # One bfloat16 rounding: relative error at most 2^-8.
  np.testing.assert_allclose(np.asarray(product, np.float64), exact, rtol=2**-8)
