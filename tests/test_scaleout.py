"""NSO's pairs and the Hessian probes across devices: 8 simulated CPU devices.

The worker runs in a fresh process (the device count is fixed when JAX
starts) on meshes ``data x noise`` of 8x1, 1x8, 4x2 and 2x4, and compares
with one device; it also runs the curvature readings and the sigma controller
on a 2x2 mesh, and the mesh example of ``benchmarks/scaleout.py``.
"""

import pytest
from workers import run_worker

from nso_jax.batching import Execution

MESHES = ("8x1", "1x8", "4x2", "2x4")


@pytest.fixture(scope="module")
def report():
  return run_worker("scaleout_worker.py")


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("k", [5, 8])
def test_nso_steps_on_a_mesh_equal_one_devices(report, k, mesh, layout):
  run = report["nso"][f"k{k}_{mesh}_{layout}"]
  assert run["devices"] == 8
  # Every update of three training steps, and the parameters they reach, equal
  # one device's up to float32 summation order; k = 5 is not a multiple of the
  # pair axis (2, 4 or 8 devices).
  assert max(run["update_relative_errors"]) < 1e-6
  assert run["params_relative_error"] < 1e-6


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
@pytest.mark.parametrize("mesh", MESHES)
def test_a_step_reduces_once_over_both_axes(report, mesh, layout):
  collectives = report["nso"][f"k5_{mesh}_{layout}"]["collectives"]
  # One all-reduce for the gradient sums of all pairs and shards together; the
  # sharded parameters' gathers (two sharded leaves) for the step itself.
  assert collectives["all-reduce"] == 1
  assert collectives["all-gather"] == (2 if layout == "sharded" else 0)
  assert collectives["reduce-scatter"] == collectives["all-to-all"] == 0


@pytest.mark.parametrize(
  "case", ["clean_value_filter", "one_sided_chunks", "two_data_axes"]
)
def test_the_transformations_options_on_a_mesh_equal_one_devices(report, case):
  result = report["nso_options"][case]
  # A clean gradient (averaged over the shards), the averaged value, a
  # parameter filter, one-sided pairs in chunks with a discarded surplus pair,
  # and the batch split over two axes: one device's update and value.
  assert result["update"] < 1e-6
  assert result["value"] < 1e-6
  assert result["value_moved"] > 0


def test_per_shard_noise_is_the_mean_of_each_shards_estimate(report):
  result = report["per_shard_noise"]
  # Each data shard draws its pairs from fold_in(key, shard): the mesh result
  # is the mean over shards of one-device estimates with those keys, and the
  # estimator given that key by hand.
  assert result["per_shard_vs_formula"] < 1e-6
  assert result["per_shard_vs_by_hand"] < 1e-6
  # It is a different estimator from the shared-noise one, which is the
  # one-device estimate.
  assert result["per_shard_vs_shared_noise"] > 1e-3
  assert result["shared_vs_single"] < 1e-6


@pytest.mark.parametrize("convention", ["pmean", "data_axis"])
@pytest.mark.parametrize("mesh", MESHES)
def test_hessian_estimates_on_a_mesh_equal_one_devices(report, mesh, convention):
  # The loss either averages itself over the shards (pmean) or is the shard's
  # own, with `data_axis` averaging the products.
  result = report["hessian"][f"{mesh}_{convention}"]
  for method in ("hutchinson", "hutch++", "xtrace"):
    assert result[f"trace_{method}"] < 1e-6, method
  assert result["top_eigenvalues"] < 1e-6
  assert result["max_eigenvalue"] < 1e-5
  # The density is a sum of Gaussian kernels at the Ritz values: a rounding
  # difference in a node moves it by its slope times the difference.
  assert result["density"] < 2e-5


PAPER_MEASURE_RUNS = [f"{mesh}_noise" for mesh in MESHES] + ["4x2_data_noise"]


@pytest.mark.parametrize("run", PAPER_MEASURE_RUNS)
def test_paper_measures_split_over_a_mesh_axis_equal_one_devices(report, run):
  # Draws, layers and probes split over the devices of `Execution(axis=...)`
  # give what one device gives, up to the order of summation.
  result = report["paper_measures"][run]
  for measure in (
    "noise_stability",
    "layer_hessian_measure",
    "layer_traces",
    "trace_bound_term",
  ):
    assert result[measure] < 1e-6, measure


@pytest.mark.parametrize("wrapper", ["readings", "tune_sigma"])
def test_readings_and_the_sigma_controller_on_a_mesh_equal_one_devices(report, wrapper):
  # curvature_readings, and tune_sigma (which reads them and scales sigma),
  # on a 2 x 2 data x noise mesh, three steps: one device's parameters and
  # sigmas up to float32 summation order.
  result = report["readings"][wrapper]
  assert max(result["params"]) < 1e-6
  assert max(result["sigma"]) < 1e-6
  # The gap is a difference of nearly equal losses: their rounding, about
  # 1e-7 of the loss, is about 1e-5 of the gap here.
  assert max(result["trace"]) < 1e-4
  assert max(result["relative_gap"]) < 1e-4
  assert min(result["traces"]) > 0
  sigmas = result["sigmas"]
  if wrapper == "tune_sigma":  # it moved sigma, by sqrt(2) a step
    assert sigmas[-1] > 1.9 * sigmas[0]
  else:
    assert sigmas == [0.05] * 3


def test_the_mesh_example_trains_and_reduces_once(report):
  # `python -m benchmarks.scaleout --mesh data=2,noise=2 --k 3 --steps 2
  # --repeats 1`, run by the worker: the lines it printed.
  lines = [line for line in report["mesh_example"] if "2x2" in line]
  assert len(lines) == 2  # replicated and sharded parameters
  for line in lines:
    assert "'all-reduce': 1" in line
    error = float(line.split("update vs one device ")[1].split(",")[0])
    assert error < 2e-6


# Settings are checked on one device, in this process.


def test_axis_names_outside_a_mapped_function_are_refused_by_name():
  import jax
  import jax.numpy as jnp

  import nso_jax
  from nso_jax import batching
  from nso_jax import hessian

  grad_fn = jax.grad(lambda w: jnp.sum(w**2))
  w = jnp.ones(3)
  with pytest.raises(ValueError, match=r"`execution.axis`='noise' is not an axis"):
    nso_jax.noise_stability_gradient(
      grad_fn, w, 0, sigma=0.1, execution=batching.Execution(axis="noise")
    )
  with pytest.raises(ValueError, match=r"`data_axis`='data' is not an axis"):
    nso_jax.noise_stability_gradient(grad_fn, w, 0, sigma=0.1, data_axis="data")
  on_noise = batching.Execution(axis="noise")
  with pytest.raises(ValueError, match=r"`execution.axis`='noise' is not an axis"):
    batching.sum_indices(lambda i: i, 3, execution=on_noise)
  with pytest.raises(ValueError, match=r"`execution.axis`='noise' is not an axis"):
    hessian.hutchinson(lambda v: v, w, 0, num_matvecs=4, execution=on_noise)
  with pytest.raises(ValueError, match=r"`execution.axis`='noise' is not an axis"):
    hessian.layer_traces(
      lambda p, x: jnp.sum(x * p**2), w, w[None], 0, execution=on_noise
    )


@pytest.mark.parametrize(
  ("options", "error", "message"),
  [
    ({"execution": 3}, TypeError, "`execution` must be a batching.Execution"),
    ({"data_axis": ("data", 1)}, TypeError, "must name mesh axes with strings"),
    ({"data_axis": ()}, TypeError, "`data_axis` must be a mesh axis name"),
    ({"per_shard_noise": True}, ValueError, "it needs `data_axis`"),
    ({"per_shard_noise": 1, "data_axis": "d"}, ValueError, "per_shard_noise"),
    (
      {"execution": Execution(axis="x"), "data_axis": ("x", "y")},
      ValueError,
      "share an axis",
    ),
  ],
)
def test_bad_axis_settings_are_refused_when_the_transformation_is_built(
  options, error, message
):
  import nso_jax

  with pytest.raises(error, match=message):
    nso_jax.noise_stability(0.1, 2, key=0, **options)


def test_an_early_stop_cannot_be_split_over_devices():
  import jax.numpy as jnp

  from nso_jax import batching
  from nso_jax import hessian

  with pytest.raises(ValueError, match="`rtol`"):
    hessian.hutchinson(
      lambda v: v,
      jnp.ones(3),
      0,
      num_matvecs=4,
      rtol=1e-3,
      execution=batching.Execution(axis="noise"),
    )
