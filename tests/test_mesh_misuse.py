"""Mesh misuses are refused by name, or give one device's answer.

A batch split over a mesh axis that is not declared, a loss averaged twice,
axes swapped, an axis of jax.vmap given for a mesh axis: each would scale
NSO's gradient or a Hessian measure by a number of devices, silently. The
worker (tests/mesh_misuse_worker.py) runs every case once, on 8 simulated
CPU devices (8x1 and 2x4 meshes), and reports what each raised or returned
beside one device's value.
"""

import numpy as np
import pytest
from workers import run_worker

# Refused cases: the message names the axis and the fix.
DATA_AXIS_FIX = ("'data'", "data_axis='data'", "jax.lax.pmean(loss, 'data')")
REFUSED = {
  "nso_data_axis_forgotten": DATA_AXIS_FIX,
  "nso_value_data_axis_forgotten": DATA_AXIS_FIX,
  "nso_execution_axis_is_the_data_axis": (
    "'data'",
    "Execution(axis=...)",
    "data_axis='data'",
  ),
  "nso_data_and_pair_axes_swapped": (
    "'data'",
    "Execution(axis=...)",
    "data_axis='data'",
  ),
  "nso_value_data_axis_with_pmean_loss": ("`data_axis`='data'", "already averaged"),
  "trace_data_axis_forgotten": DATA_AXIS_FIX,
  "top_eigenvalues_data_axis_forgotten": DATA_AXIS_FIX,
  "max_eigenvalue_data_axis_forgotten": DATA_AXIS_FIX,
  "noise_stability_measure_data_axis_forgotten": DATA_AXIS_FIX,
  "layer_hessian_measure_data_axis_forgotten": DATA_AXIS_FIX,
  "layer_traces_data_axis_forgotten": DATA_AXIS_FIX,
  "direction_curvature_data_axis_forgotten": DATA_AXIS_FIX,
  "ggn_trace_data_axis_forgotten": ("'data'", "takes no `data_axis`"),
  "nso_execution_axis_is_a_vmap_axis": ("`execution.axis`='v'", "jax.vmap"),
  "nso_data_axis_is_a_vmap_axis": ("`data_axis`='v'", "jax.vmap"),
  "trace_execution_axis_is_a_vmap_axis": ("`execution.axis`='v'", "jax.vmap"),
  "trace_data_axis_is_a_vmap_axis": ("`data_axis`='v'", "jax.vmap"),
}
# Without the loss (a gradients-only grad_fn), a collective over the data axis
# may average the loss or only share statistics: a warning names the axis, the
# factor and the fix.
WARNED = {
  "nso_data_axis_with_pmean_loss": (
    "`data_axis`='data'",
    "8 times too small",
    "jax.value_and_grad",
  ),
}
# Cases that must give one device's answer.
CORRECT = ("layer_traces_with_data_axis", "direction_curvature_with_data_axis")


@pytest.fixture(scope="module")
def report():
  found = run_worker("mesh_misuse_worker.py")
  assert found["num_devices"] == 8
  return found


def _assert_one_device(case):
  assert not case["raised"], case.get("message")
  np.testing.assert_allclose(case["value"], case["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.fault("clear")
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_misuse_is_refused_naming_the_axis(report, name):
  case = report["cases"][name]
  assert case["raised"], f"returned {case['value']}, one device {case['reference']}"
  assert case["error"] == "ValueError", case["message"]
  for fragment in REFUSED[name]:
    assert fragment in case["message"]


@pytest.mark.fault("clear")
@pytest.mark.parametrize("name", sorted(WARNED))
def test_ambiguous_collective_is_warned_about_naming_the_axis(report, name):
  case = report["cases"][name]
  assert not case["raised"], case.get("message")
  assert len(case["warnings"]) == 1, case["warnings"]
  for fragment in WARNED[name]:
    assert fragment in case["warnings"][0]


@pytest.mark.fault("correct")
@pytest.mark.parametrize("name", CORRECT)
def test_measure_with_data_axis_equals_one_device(report, name):
  _assert_one_device(report["cases"][name])


def test_declared_uses_keep_one_devices_answer(report):
  """NSO and Hessian tools with data_axis, or a loss that pmeans, pairs or
  probes split over a second axis, a shard_map with check_vma=False: not
  refused, one device's values."""
  assert len(report["legitimate"]) == 6
  for case in report["legitimate"].values():
    _assert_one_device(case)


def test_every_case_is_checked(report):
  assert set(report["cases"]) == set(REFUSED) | set(WARNED) | set(CORRECT)
