"""The host-driven strategy: equal to the in-graph one, deterministic, chosen
by "auto" only for eager convolutional work on CPU; Ritz residual bounds; the
documented memory model (docs/performance.md) against compiled memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nso_jax import batching
from nso_jax import hessian
from nso_jax._src import batching as batching_src


def tiny_cnn():
  """A 3x3 convolution (1 -> 2 channels) and a dense head on 4 6x6 images."""
  keys = jax.random.split(jax.random.key(0), 3)
  params = {
    "conv": jax.random.normal(keys[0], (3, 3, 1, 2)) / 3.0,
    "dense": jax.random.normal(keys[1], (72, 3)) / 8.0,
  }
  x = jax.random.normal(keys[2], (4, 6, 6, 1))
  y = jnp.array([0, 1, 2, 1])

  def loss(p, batch):
    images, labels = batch
    h = jax.lax.conv_general_dilated(
      images, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    logits = jnp.tanh(h).reshape(4, -1) @ p["dense"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

  return loss, params, (x, y)


@pytest.fixture(scope="module")
def cnn():
  return tiny_cnn()


def test_auto_drives_eager_convolutional_probes_from_the_host(cnn):
  loss, params, data = cnn
  operator, _ = hessian.hessian_operator(loss, params, data)
  fn = lambda i: operator(params)
  expected = "host" if jax.default_backend() == "cpu" else "vmap"
  if jax.default_backend() == "cpu":
    assert batching_src.resolve("auto", 12, fn).strategy == expected
  seen = {}

  def traced(p):
    seen["strategy"] = batching_src.resolve("auto", 12, lambda i: operator(p)).strategy
    seen["host"] = batching_src.resolve("host", 12, lambda i: operator(p)).strategy
    return p

  jax.jit(traced)(params)
  # Traced, both fall back to the in-graph choice of "auto".
  assert (
    seen["strategy"]
    == seen["host"]
    == batching.default_execution(convolutional=True, size=12)
  )


def test_host_trace_equals_the_in_graph_one_and_repeats_bitwise(cnn):
  loss, params, data = cnn
  run = lambda ex: hessian.trace(loss, params, data, 3, num_matvecs=10, execution=ex)
  host = run(batching.Execution("host", chunk_size=4))  # 3 chunks, the last padded
  again = run(batching.Execution("host", chunk_size=4))
  in_graph = jax.jit(lambda p: hessian.trace(loss, p, data, 3, num_matvecs=10))(params)
  np.testing.assert_array_equal(np.asarray(host), np.asarray(again))
  np.testing.assert_allclose(host.value, in_graph.value, rtol=1e-5)
  np.testing.assert_allclose(host.stderr, in_graph.stderr, rtol=1e-4)


def test_host_lanczos_equals_the_in_graph_one(cnn):
  loss, params, data = cnn
  host = hessian.top_eigenvalues(loss, params, data, 1, num_steps=12, execution="host")
  again = hessian.top_eigenvalues(loss, params, data, 1, num_steps=12, execution="host")
  in_graph = hessian.top_eigenvalues(
    loss, params, data, 1, num_steps=12, execution="map"
  )
  np.testing.assert_array_equal(np.asarray(host), np.asarray(again))
  scale = float(jnp.max(jnp.abs(in_graph)))
  np.testing.assert_allclose(host, in_graph, atol=1e-5 * scale)


def test_host_density_equals_the_in_graph_one(cnn):
  loss, params, data = cnn
  grid = hessian.DensityGrid(size=50)
  run = lambda ex: hessian.spectral_density(
    loss, params, data, 0, num_probes=2, num_steps=10, grid=grid, execution=ex
  )
  host, in_graph = run("host"), run("map")
  np.testing.assert_allclose(host.nodes, in_graph.nodes, atol=1e-4)
  np.testing.assert_allclose(host.weights, in_graph.weights, atol=1e-4)


@pytest.mark.parametrize("execution", ["host", "map"])
def test_ritz_residual_bounds_enclose_an_eigenvalue(execution):
  diagonal = jnp.linspace(-1.0, 1.0, 200).at[:3].set(jnp.array([3.0, 2.5, 2.0]))
  ritz = hessian.lanczos_ritz(
    lambda v: diagonal * v,
    jnp.zeros(200),
    0,
    num_eigenvalues=4,
    num_steps=15,
    return_eigenvectors=True,
    execution=execution,
  )
  distance = jnp.min(jnp.abs(ritz.eigenvalues[:, None] - diagonal[None]), axis=1)
  assert jnp.all(distance <= ritz.residual_bounds + 1e-5)
  # The bound is the residual of the Ritz pair (to float32 rounding).
  residual = jnp.linalg.norm(
    ritz.eigenvectors * diagonal - ritz.eigenvalues[:, None] * ritz.eigenvectors,
    axis=1,
  )
  np.testing.assert_allclose(residual, ritz.residual_bounds, rtol=0.05, atol=1e-5)
  assert float(ritz.residual_bounds[-1]) > 1e-3  # the 4th is not converged
  plain = hessian.lanczos_eigenvalues(
    lambda v: diagonal * v,
    jnp.zeros(200),
    0,
    num_eigenvalues=4,
    num_steps=15,
    execution=execution,
  )
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(ritz.eigenvalues))


N, STEPS = 4096, 20
SLACK = 0.15  # the formulas of docs/performance.md hold within 15%


def temp_bytes(fn, *args):
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  if analysis is None:  # pragma: no cover - a backend without the analysis
    pytest.skip("no memory_analysis on this backend")
  return analysis.temp_size_in_bytes


def test_memory_model_matches_the_compiled_temp_bytes():
  """Bytes per parameter, float32, a diagonal operator (no working set of its
  own): Lanczos in graph 4 (2 (m + 1) + 6), Hutchinson "map" 4 x 7 whatever
  the probes, "vmap" 4 x 5 per probe, the host product 4 x 2 at most."""
  if jax.default_backend() != "cpu":
    pytest.skip("the model's constants were fitted to XLA:CPU")
  diagonal = jnp.linspace(0.0, 1.0, N)
  template = jnp.zeros(N)

  def lanczos(d):
    return hessian.lanczos_eigenvalues(
      lambda v: d * v, template, 0, num_eigenvalues=3, num_steps=STEPS, execution="map"
    )

  def trace(execution):
    return lambda d: (
      hessian.hutchinson(
        lambda v: d * v, template, 0, num_matvecs=STEPS, execution=execution
      ).value
    )

  expected = {
    "lanczos": 4 * N * (2 * (STEPS + 1) + 6),
    "map": 4 * N * 7,
    "vmap": 4 * N * 5 * STEPS,
  }
  got = {
    "lanczos": temp_bytes(lanczos, diagonal),
    "map": temp_bytes(trace("map"), diagonal),
    "vmap": temp_bytes(trace("vmap"), diagonal),
  }
  for name, value in expected.items():
    assert abs(got[name] - value) <= SLACK * value, (name, got[name], value)
  product = batching_src.host_function(lambda v: diagonal * v, template)
  closed = jax.make_jaxpr(lambda v: diagonal * v)(template)
  compiled = batching_src._host_chunk(closed.jaxpr, 0)
  analysis = compiled.lower(closed.consts, template).compile().memory_analysis()
  host_temp = analysis.temp_size_in_bytes
  assert host_temp <= 4 * N * 2
  np.testing.assert_array_equal(product(template + 1.0), diagonal)
