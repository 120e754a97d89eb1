"""Loss landscapes: grid values, filter normalisation, eigen-directions, plots."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nso_jax import batching
from nso_jax import hessian


def mlp_loss(params, batch):
  x, y = batch
  hidden = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
  return jnp.mean((hidden @ params["out"]["kernel"] - y) ** 2)


def make_problem():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {
    "dense": {
      "kernel": jax.random.normal(k1, (3, 4)),
      "bias": 0.1 * jnp.arange(4.0),
    },
    "out": {"kernel": jax.random.normal(k2, (4, 1))},
  }
  x = jax.random.normal(k3, (10, 3))
  y = jax.random.normal(k4, (10, 1))
  return params, (x, y)


def shifted(params, pairs):
  """``params + sum(a * d)``, in the order the landscape adds the steps."""
  for a, d in pairs:
    params = jax.tree.map(lambda w, v, a=a: w + a * v, params, d)
  return params


GRID = (jnp.array([-0.5, 0.0, 0.25]), jnp.array([-1.0, -0.1, 0.3, 0.8]))


@pytest.mark.parametrize(
  "execution",
  ["vmap", "map", batching.Execution("map", chunk_size=5), "unroll"],
  ids=["vmap", "map", "map-chunk5", "unroll"],
)
def test_landscape_equals_direct_loss_evaluations(execution):
  params, batch = make_problem()
  d1 = hessian.filter_normalized_direction(params, key=1)
  d2 = hessian.filter_normalized_direction(params, key=2)
  landscape = hessian.loss_landscape(
    mlp_loss, params, batch, [d1, d2], GRID, execution=execution
  )
  assert landscape.losses.shape == (3, 4)
  expected = [
    [float(mlp_loss(shifted(params, [(a, d1), (b, d2)]), batch)) for b in GRID[1]]
    for a in GRID[0]
  ]
  np.testing.assert_allclose(landscape.losses, expected, rtol=2e-6, atol=1e-7)
  np.testing.assert_array_equal(landscape.coordinates[1], GRID[1])
  for used, given in zip(landscape.directions, (d1, d2), strict=True):
    jax.tree.map(np.testing.assert_array_equal, used, given)


def test_landscape_over_a_data_set_under_jit():
  """Unequal batches weigh by their sizes; key and params traced under jit."""
  params, (x, y) = make_problem()
  batches = [(x[:7], y[:7]), (x[7:], y[7:])]
  coordinates = jnp.linspace(-1.0, 1.0, 5)

  @jax.jit
  def landscape(params, key):
    d = hessian.filter_normalized_direction(params, key)
    return hessian.loss_landscape(mlp_loss, params, batches, d, coordinates)

  result = landscape(params, jax.random.key(3))
  (d,) = result.directions
  expected = [float(mlp_loss(shifted(params, [(a, d)]), (x, y))) for a in coordinates]
  np.testing.assert_allclose(result.losses, expected, rtol=2e-6)
  same = hessian.filter_normalized_direction(params, jax.random.key(3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), d, same)


def test_param_filter_moves_the_selected_leaves_only():
  params, batch = make_problem()
  only_out = {"dense": False, "out": True}
  d = hessian.filter_normalized_direction(params, key=4, param_filter=only_out)
  assert not np.any(d["dense"]["kernel"]) and not np.any(d["dense"]["bias"])
  full = hessian.filter_normalized_direction(params, key=4)
  np.testing.assert_array_equal(d["out"]["kernel"], full["out"]["kernel"])
  # The direction's other leaves are ignored: `full` moves the output only.
  landscape = hessian.loss_landscape(
    mlp_loss, params, batch, full, jnp.array([-1.0, 1.0]), param_filter=only_out
  )
  expected = [float(mlp_loss(shifted(params, [(a, d)]), batch)) for a in (-1.0, 1.0)]
  np.testing.assert_allclose(landscape.losses, expected, rtol=2e-6)
  assert not np.any(landscape.directions[0]["dense"]["kernel"])


def filter_norms(x, axis):
  others = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
  return np.sqrt(np.sum(np.square(np.asarray(x, np.float64)), axis=others))


def test_every_filter_has_the_norm_of_the_weights_filter():
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  params = {
    "dense": jax.random.normal(k1, (6, 5)),  # Flax Dense: (in, out)
    "conv": jax.random.normal(k2, (3, 3, 2, 4)),  # Flax Conv: (h, w, in, out)
    "bias": jnp.ones(4),
  }
  params["dense"] = params["dense"].at[:, 2].set(0.0)  # a dead unit stays dead
  d = hessian.filter_normalized_direction(params, key=0)
  for name in ("dense", "conv"):
    np.testing.assert_allclose(
      filter_norms(d[name], -1), filter_norms(params[name], -1), rtol=1e-6
    )
    assert not np.allclose(d[name], params[name])  # a new direction, not W
  assert not np.any(d["dense"][:, 2])
  np.testing.assert_array_equal(d["bias"], 0.0)
  kept = hessian.filter_normalized_direction(params, key=0, vector_leaves="weights")
  np.testing.assert_array_equal(kept["bias"], params["bias"])
  # Equinox and PyTorch: (out, in, h, w), the filters along axis 0.
  conv = jax.random.normal(k3, (4, 2, 3, 3))
  d0 = hessian.filter_normalized_direction(conv, key=0, filter_axis=0)
  np.testing.assert_allclose(filter_norms(d0, 0), filter_norms(conv, 0), rtol=1e-6)


def test_directions_are_determined_by_the_key():
  params, _ = make_problem()
  first = hessian.filter_normalized_direction(params, key=7)
  again = hessian.filter_normalized_direction(params, key=jax.random.key(7))
  other = hessian.filter_normalized_direction(params, key=8)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not np.allclose(first["out"]["kernel"], other["out"]["kernel"])


def test_slice_along_the_top_eigenvector_of_a_quadratic_is_its_parabola():
  rng = np.random.default_rng(0)
  root = rng.normal(size=(6, 6)).astype(np.float32)
  curvature = jnp.asarray(root @ root.T / 6)
  centre = jnp.asarray(rng.normal(size=6).astype(np.float32))

  def loss(w, data):
    offset = w - centre
    return 0.5 * offset @ data @ offset + 0.3

  values, (v,) = hessian.eigenvector_directions(
    loss, centre, curvature, key=0, num_directions=1, num_steps=6
  )
  np.testing.assert_allclose(values[0], np.linalg.eigvalsh(curvature)[-1], rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(v), 1.0, rtol=1e-6)
  a = jnp.linspace(-2.0, 2.0, 9)
  landscape = hessian.loss_landscape(loss, centre, curvature, v, a)
  np.testing.assert_allclose(
    landscape.losses, 0.3 + 0.5 * values[0] * a**2, rtol=1e-5, atol=1e-6
  )


BAD_CALLS = [
  (
    {"directions": "three"},
    "`directions` must be a pytree shaped like `params` or a list of one or 2",
  ),
  ({"directions": "wrong shape"}, r"`directions` leaf \['out'\]\['kernel'\] has shape"),
  ({"directions": "zero"}, "`directions` is zero on every selected leaf"),
  ({"directions": "nan"}, r"`directions\[1\]` holds NaN or infinite values"),
  (
    {"coordinates": jnp.zeros((2, 3))},
    r"`coordinates` must be a 1-D array .* \(2, 3\)",
  ),
  ({"coordinates": jnp.array([0.5])}, "at least 2 coordinates, got shape \\(1,\\)"),
  (
    {"coordinates": jnp.array([1.0, 0.0, 2.0])},
    r"`coordinates` must be finite and strictly increasing, got \[1.0, 0.0, 2.0\]",
  ),
  ({"coordinates": (GRID[0], GRID[1])}, "`coordinates` has 2 axes, expected 1"),
  ({"coordinates": ["a", "b"]}, "`coordinates` must be a 1-D array of numbers"),
]


@pytest.mark.parametrize(("change", "message"), BAD_CALLS)
def test_bad_directions_and_grids_are_refused_by_name(change, message):
  params, batch = make_problem()
  d = jax.tree.map(jnp.ones_like, params)
  directions = {
    "three": [d, d, d],
    "wrong shape": {**d, "out": {"kernel": jnp.ones((4, 2))}},
    "zero": jax.tree.map(jnp.zeros_like, d),
    "nan": [d, jax.tree.map(lambda x: x * jnp.nan, d)],
  }.get(change.get("directions"), d)
  coordinates = change.get("coordinates")
  with pytest.raises(ValueError, match=message):
    hessian.loss_landscape(mlp_loss, params, batch, directions, coordinates)


def test_bad_filter_settings_are_refused_by_name():
  params, _ = make_problem()
  with pytest.raises(ValueError, match="`vector_leaves` must be one of"):
    hessian.filter_normalized_direction(params, key=0, vector_leaves="keep")
  with pytest.raises(ValueError, match=r"`filter_axis`=2 is out of range .* \(3, 4\)"):
    hessian.filter_normalized_direction(params, key=0, filter_axis=2)
  with pytest.raises(ValueError, match=r"`filter_axis` must be an int axis, got 0\.5"):
    hessian.filter_normalized_direction(params, key=0, filter_axis=0.5)


def test_plots_run_headless_and_share_axes():
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  params, batch = make_problem()
  d1 = hessian.filter_normalized_direction(params, key=1)
  d2 = hessian.filter_normalized_direction(params, key=2)
  line = hessian.loss_landscape(mlp_loss, params, batch, d1, GRID[1])
  flatter = line._replace(losses=0.5 * line.losses)
  ax = hessian.plot_loss_landscape(
    [line, flatter], labels=["sharp", "flat"], log_scale=True
  )
  assert len(ax.get_lines()) == 2 and ax.get_yscale() == "log"
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sharp", "flat"]
  plane = hessian.loss_landscape(mlp_loss, params, batch, [d1, d2], GRID)
  axes = hessian.plot_loss_landscape(
    [plane, plane._replace(losses=2 * plane.losses)], labels=["SGD", "NSO"], levels=8
  )
  assert len(axes) == 2 and axes[1].get_title() == "NSO"
  assert axes[0].get_shared_x_axes().joined(axes[0], axes[1])
  with pytest.raises(ValueError, match="mixes 1-D and 2-D landscapes"):
    hessian.plot_loss_landscape([line, plane])
  with pytest.raises(ValueError, match="`labels` must be a sequence of 2 strings"):
    hessian.plot_loss_landscape([line, flatter], labels=["one"])
  plt.close("all")


MESH_SCRIPT = textwrap.dedent(
  """
  import json
  from functools import partial
  import jax, jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  from nso_jax import batching, hessian

  def loss(w, x):
    return jnp.mean(jnp.tanh(x @ w) ** 2)

  w = jax.random.normal(jax.random.key(0), (3, 2))
  x = jax.random.normal(jax.random.key(1), (8, 3))
  d = hessian.filter_normalized_direction(w, key=2)
  e = hessian.filter_normalized_direction(w, key=3)
  grid = (jnp.linspace(-1.0, 1.0, 3), jnp.linspace(-1.0, 1.0, 5))
  single = hessian.loss_landscape(loss, w, x, [d, e], grid).losses
  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((2, 2), ("points", "data"), axis_types=auto)

  @jax.jit
  @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
  def split(w, x):
    return hessian.loss_landscape(
      loss, w, x, [d, e], grid, execution=batching.Execution(axis="points"),
      data_axis="data").losses

  print(json.dumps({"difference": float(jnp.max(jnp.abs(split(w, x) - single)))}))
  """
)


def test_mesh_axes_split_the_points_and_the_data():
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
    [sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, env=env
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["difference"] < 1e-6
