"""Shared pytest configuration."""

import pytest


def pytest_addoption(parser):
  parser.addoption(
    "--full-scale",
    action="store_true",
    default=False,
    help="run tests marked `slow` at their full statistical size",
  )


@pytest.fixture
def full_scale(request) -> bool:
  """Whether statistical checks run at full size (--full-scale)."""
  return request.config.getoption("--full-scale")
