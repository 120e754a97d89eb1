"""Shared pytest configuration."""

import os

import jax
import pytest
from hypothesis import settings

# On GPUs, JAX's default precision runs float32 matrix products in TF32 (10
# mantissa bits): relative errors near 1e-3, where these tests compare with
# float64 references at float32 tolerances (1e-4 to 1e-6). Measured on an
# H100 (jax 0.11.2): 48 tests failed by TF32 rounding alone (pins, dense-Hessian
# and trace comparisons). The tests check the algorithms, so on GPUs they run
# in full float32; the environment variable carries the setting into the
# worker processes the tests start.
# Two test processes (pytest-xdist) share one accelerator: neither may take
# most of its memory up front. Read when the backend starts, just below.
if "PYTEST_XDIST_WORKER" in os.environ:
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if jax.default_backend() == "gpu":
  os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
  jax.config.update("jax_default_matmul_precision", "highest")

# Worker scripts run in fresh processes with their own device count; importing
# them here (doctest collection) would build their meshes on one device.
collect_ignore_glob = ["*_worker.py"]

# Property tests draw 20 examples in the default run, 200 with --full-scale.
settings.register_profile("default_scale", max_examples=20)
settings.register_profile("full_scale", max_examples=200)


def pytest_addoption(parser):
  parser.addoption(
    "--full-scale",
    action="store_true",
    default=False,
    help="run tests marked `slow` at their full statistical size",
  )


def pytest_configure(config):
  full = config.getoption("--full-scale")
  settings.load_profile("full_scale" if full else "default_scale")


@pytest.fixture
def full_scale(request) -> bool:
  """Whether statistical checks run at full size (--full-scale)."""
  return request.config.getoption("--full-scale")


FAULT_OUTCOMES = ("clear", "correct")


def pytest_collection_modifyitems(config, items):
  for item in items:
    marker = item.get_closest_marker("fault")
    if marker is not None and tuple(marker.args) not in {(o,) for o in FAULT_OUTCOMES}:
      raise pytest.UsageError(
        f"{item.nodeid}: @pytest.mark.fault takes one of {FAULT_OUTCOMES}, "
        f"got {marker.args!r}"
      )


def pytest_terminal_summary(terminalreporter):
  """Counts the fault sweep's cases by the outcome each must give."""
  counts: dict[tuple[str, str], int] = {}
  for status in ("passed", "failed", "error", "skipped"):
    for report in terminalreporter.stats.get(status, []):
      outcome = dict(getattr(report, "user_properties", ())).get("fault")
      if outcome and (report.when == "call" or status != "passed"):
        counts[outcome, status] = counts.get((outcome, status), 0) + 1
  if counts:
    parts = ", ".join(f"{n} {o} {s}" for (o, s), n in sorted(counts.items()))
    terminalreporter.write_line(f"fault sweep: {parts}")


def pytest_runtest_setup(item):
  marker = item.get_closest_marker("fault")
  if marker is not None:
    # User properties travel with the reports, also from pytest-xdist workers.
    item.user_properties.append(("fault", marker.args[0]))
