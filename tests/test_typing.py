"""The package type-checks: mypy over nso_jax, with the settings of pyproject."""

import os
import pathlib
import subprocess
import sys

from optional import require

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_py_typed_marker_ships():
  assert (ROOT / "nso_jax" / "py.typed").is_file()


def test_mypy_is_clean():
  require("mypy", reason="mypy is part of the test extra")
  result = subprocess.run(
    [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "Success: no issues found" in result.stdout
