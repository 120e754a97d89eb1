"""The batching seam: every strategy gives the same sums and stacks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nso_jax import batching

STRATEGIES = [
  dict(execution="vmap"),
  dict(execution="unroll"),
  dict(execution="map"),
  dict(execution="map", chunk_size=2),
  dict(execution="map", chunk_size=3),
  dict(execution="map", chunk_size=7),
  dict(execution="auto"),
]


def pytree_of_index(i):
  x = jnp.asarray(i, jnp.float32)
  return {"square": x**2, "vector": jnp.stack([x, jnp.sin(x), 1.0 + 0 * x])}


@pytest.mark.parametrize("options", STRATEGIES)
@pytest.mark.parametrize("size", [1, 5, 7])
def test_sum_indices_equals_the_python_sum(size, options):
  got = jax.jit(lambda: batching.sum_indices(pytree_of_index, size, **options))()
  expected = {
    "square": sum(float(i) ** 2 for i in range(size)),
    "vector": np.sum([[i, np.sin(i), 1.0] for i in range(size)], axis=0),
  }
  # float32 sums of `size` terms of magnitude <= 1 (the sines nearly cancel).
  chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=size * 1.2e-7)


@pytest.mark.parametrize("options", STRATEGIES)
@pytest.mark.parametrize("size", [1, 5, 7])
def test_map_indices_stacks_in_index_order(size, options):
  got = jax.jit(lambda: batching.map_indices(pytree_of_index, size, **options))()
  expected = jax.tree.map(
    lambda *xs: np.stack(xs), *[pytree_of_index(i) for i in range(size)]
  )
  chex.assert_trees_all_close(got, expected, rtol=1e-6)
  chex.assert_shape(got["vector"], (size, 3))


def test_map_keeps_memory_to_one_chunk():
  # The scan body sees one chunk: a vmap over `chunk_size` indices.
  jaxpr = jax.make_jaxpr(
    lambda: batching.sum_indices(lambda i: jnp.ones(4) * i, 12, execution="map")
  )()
  assert "scan" in str(jaxpr)
  unrolled = jax.make_jaxpr(
    lambda: batching.sum_indices(lambda i: jnp.ones(4) * i, 3, execution="unroll")
  )()
  assert "scan" not in str(unrolled)


def test_auto_resolves_by_the_one_rule():
  dense = lambda i: jnp.sum(jnp.arange(3.0) * i)
  conv = lambda i: jnp.convolve(jnp.arange(5.0) * i, jnp.ones(3)).sum()
  assert not batching.computes_convolutions(dense, jnp.int32(0))
  assert batching.computes_convolutions(conv, jnp.int32(0))
  expected_dense = batching.default_execution(size=4)
  assert expected_dense == ("map" if jax.default_backend() == "cpu" else "vmap")


@pytest.mark.parametrize(
  ("options", "match"),
  [
    (dict(execution="pmap"), r"`execution` must be one of .*got 'pmap'"),
    (dict(execution="vmap", chunk_size=2), r"`chunk_size` applies only"),
    (dict(execution="map", chunk_size=0), r"`chunk_size` must be an int >= 1, got 0"),
    (dict(execution="map", chunk_size=1.5), r"`chunk_size` must be an int >= 1"),
  ],
)
def test_bad_settings(options, match):
  for seam in (batching.sum_indices, batching.map_indices):
    with pytest.raises(ValueError, match=match):
      seam(lambda i: i, 3, **options)


def test_bad_size():
  with pytest.raises(ValueError, match=r"`size` must be an int >= 1, got 0"):
    batching.sum_indices(lambda i: i, 0)


def test_unrolling_thousands_is_refused_before_tracing():
  calls = []
  for seam in (batching.sum_indices, batching.map_indices):
    with pytest.raises(ValueError, match=r"`execution`='unroll' with 513 evaluations"):
      seam(lambda i: calls.append(i) or i, 513, execution="unroll")
  assert not calls
