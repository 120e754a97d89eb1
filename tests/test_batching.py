"""The batching seam: every strategy gives the same sums and stacks, and the
one :class:`~nso_jax.batching.Execution` value is checked when it is built."""

import dataclasses
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nso_jax import batching
from nso_jax._src import batching as batching_src

STRATEGIES = [
  dict(execution="vmap"),
  dict(execution="unroll"),
  dict(execution="map"),
  dict(execution=batching.Execution("map", chunk_size=2)),
  dict(execution=batching.Execution("map", chunk_size=3)),
  dict(execution=batching.Execution("map", chunk_size=7)),
  dict(execution="auto"),
  dict(execution=batching.Execution()),
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
  # The scan body sees one chunk: a vmap over `chunk_size` indices. The chunk
  # size is explicit: the default depends on the backend (one chunk of 12 on
  # a GPU, where no scan is needed).
  jaxpr = jax.make_jaxpr(
    lambda: batching.sum_indices(
      lambda i: jnp.ones(4) * i, 12, execution=batching.Execution("map", chunk_size=4)
    )
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
  ("settings", "error", "match"),
  [
    (dict(strategy="pmap"), ValueError, r"`strategy` must be one of .*got 'pmap'"),
    (dict(strategy="VMAP"), ValueError, r"`strategy` must be one of"),
    (dict(strategy=None), ValueError, r"`strategy` must be one of"),
    (
      dict(strategy="vmap", chunk_size=2),
      ValueError,
      r"`chunk_size`=2 applies only to strategy='map' or 'host', got strategy='vmap'",
    ),
    (dict(strategy="auto", chunk_size=4), ValueError, r"`chunk_size`=4 applies only"),
    (dict(strategy="unroll", chunk_size=1), ValueError, r"applies only"),
    (dict(strategy="map", chunk_size=0), ValueError, r"`chunk_size` must be an int"),
    (dict(strategy="map", chunk_size=1.5), ValueError, r"`chunk_size` must be an int"),
    (dict(strategy="map", chunk_size=True), ValueError, r"`chunk_size` must be an"),
    (dict(axis=3), TypeError, r"`axis` must be a mesh axis name"),
    (dict(axis=()), TypeError, r"`axis` must be a mesh axis name"),
    (dict(axis=["a"]), TypeError, r"`axis` must be a mesh axis name"),
    (dict(axis=("a", 1)), TypeError, r"`axis` must name mesh axes with strings"),
    (dict(axis=("a", "a")), ValueError, r"`axis` names an axis twice"),
  ],
)
def test_execution_is_checked_when_built(settings, error, match):
  with pytest.raises(error, match=match):
    batching.Execution(**settings)


def test_execution_is_a_frozen_hashable_value():
  execution = batching.Execution("map", chunk_size=4, axis=("data", "noise"))
  assert execution == batching.Execution("map", 4, ("data", "noise"))
  assert hash(execution) == hash(batching.Execution("map", 4, ("data", "noise")))
  assert len({execution, batching.Execution("map", 4, ("data", "noise"))}) == 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    execution.chunk_size = 8  # type: ignore[misc]
  # A static argument of jax.jit must be hashable.
  run = jax.jit(
    lambda e: batching.sum_indices(lambda i: i, 5, execution=e), static_argnums=0
  )
  assert int(run(execution.__class__("map", 2))) == 10


def test_a_strategy_name_is_shorthand():
  assert batching_src.as_execution("vmap") == batching.Execution("vmap")
  execution = batching.Execution("unroll")
  assert batching_src.as_execution(execution) is execution
  by_name = batching.map_indices(pytree_of_index, 4, execution="unroll")
  by_value = batching.map_indices(pytree_of_index, 4, execution=execution)
  chex.assert_trees_all_equal(by_name, by_value)


@pytest.mark.parametrize(
  ("execution", "error", "match"),
  [
    ("pmap", ValueError, r"`execution` must be one of .*got 'pmap'"),
    (None, TypeError, r"`execution` must be a batching.Execution or one of"),
    (2, TypeError, r"`execution` must be a batching.Execution"),
    (dict(strategy="map"), TypeError, r"`execution` must be a batching.Execution"),
  ],
)
def test_bad_execution_given_to_the_seam(execution, error, match):
  for seam in (batching.sum_indices, batching.map_indices):
    with pytest.raises(error, match=match):
      seam(lambda i: i, 3, execution=execution)


def test_resolve_decides_auto_on_one_device_share():
  dense = lambda i: jnp.sum(jnp.arange(3.0) * i)
  conv = lambda i: jnp.convolve(jnp.arange(5.0) * i, jnp.ones(3)).sum()
  resolved = batching_src.resolve("auto", 20, dense)
  assert resolved.strategy == batching.default_execution(size=20)
  assert (resolved.size, resolved.local_size, resolved.num_devices) == (20, 20, 1)
  assert resolved.axes == ()
  assert resolved.chunk_size == min(batching.default_chunk_size(), 20)
  # Called eagerly (nothing it closes over is traced).
  assert batching_src.resolve("auto", 4, conv).strategy == batching.default_execution(
    convolutional=True, size=4, eager=True
  )
  # An explicit strategy is kept, and the chunk never exceeds the share.
  explicit = batching_src.resolve(batching.Execution("map", chunk_size=8), 5)
  assert (explicit.strategy, explicit.chunk_size) == ("map", 5)


def test_resolve_sees_the_share_of_one_device_of_the_axis():
  """On 4 devices of axis "probes", 12 evaluations leave 3 to each device, and
  "auto" decides for 3: a convolution is unrolled on CPU, as 3 <= 8."""
  conv = lambda i: jnp.convolve(jnp.arange(5.0) * i, jnp.ones(3)).sum()
  seen = {}

  def per_device(x):
    resolved = batching_src.resolve(batching.Execution(axis="probes"), 12, conv)
    seen["resolved"] = resolved
    return x

  jax.make_jaxpr(jax.vmap(per_device, axis_name="probes", axis_size=4))(jnp.ones(4))
  resolved = seen["resolved"]
  assert (resolved.size, resolved.local_size) == (12, 3)
  assert (resolved.num_devices, resolved.axes) == (4, ("probes",))
  expected = batching.default_execution(convolutional=True, size=3)
  assert resolved.strategy == expected
  # On one device the same 12 evaluations exceed the unrolling limit of
  # "auto"; called eagerly, they run from a host loop on CPU.
  alone = batching_src.resolve("auto", 12, conv).strategy
  assert alone == batching.default_execution(convolutional=True, size=12, eager=True)
  if jax.default_backend() == "cpu":
    assert (resolved.strategy, alone) == ("unroll", "host")


def test_an_axis_must_be_bound_where_the_work_runs():
  with pytest.raises(ValueError, match=r"`execution.axis`='noise' is not an axis"):
    batching.sum_indices(lambda i: i, 3, execution=batching.Execution(axis="noise"))


def test_bad_size():
  with pytest.raises(ValueError, match=r"`size` must be an int >= 1, got 0"):
    batching.sum_indices(lambda i: i, 0)


def test_unrolling_thousands_is_refused_before_tracing():
  calls = []
  for seam in (batching.sum_indices, batching.map_indices):
    with pytest.raises(ValueError, match=r"`execution`='unroll' with 513 evaluations"):
      seam(lambda i: calls.append(i) or i, 513, execution="unroll")
  assert not calls


def test_describe_and_the_debug_log_say_what_auto_chose(caplog):
  """``"auto"`` is not silent: describe() and the "nso_jax" logger name it."""
  conv = lambda x: jnp.convolve(x, jnp.ones(3))
  conv_grad = jax.grad(lambda x: conv(x).sum())

  seen = []

  @jax.jit
  def traced(x):
    seen.append(batching.describe("auto", 4, lambda i: conv_grad(x + i)))
    return x

  with caplog.at_level(logging.DEBUG, logger="nso_jax"):
    traced(jnp.ones(5))
  inside_jit = seen[0]
  assert inside_jit["strategy"] == batching.default_execution(
    convolutional=True, size=4
  )
  assert "convolutional=True" in caplog.text and "eager=False" in caplog.text
  plain = batching.describe(batching.Execution("map", 2), 6, lambda i: i * 2.0)
  assert plain == {
    "strategy": "map",
    "chunk_size": 2,
    "num_devices": 1,
    "local_size": 6,
  }
