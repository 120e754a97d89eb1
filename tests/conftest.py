"""Shared pytest configuration."""

import pytest
from hypothesis import settings

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
