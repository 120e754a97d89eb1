"""Optional test dependencies: skipped where absent, required under CI.

The test extra installs every one of them, so in CI (the ``CI`` environment
variable set) a missing one is a broken install and must fail, not skip.
"""

import importlib
import os
from types import ModuleType

import pytest


def require(module: str, reason: str) -> ModuleType:
  """Imports ``module``; if it is missing, skips, or fails under CI."""
  if os.environ.get("CI"):
    return importlib.import_module(module)
  return pytest.importorskip(module, reason=reason)
