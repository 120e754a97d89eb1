"""Worker scripts run in fresh processes, with their own simulated devices."""

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

TESTS = pathlib.Path(__file__).parent


def run_worker(script: str) -> dict[str, Any]:
  """Runs ``tests/<script>`` and returns the JSON report it prints last.

  ``XLA_FLAGS`` is dropped, so the worker sets its own device count before it
  imports JAX.
  """
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  result = subprocess.run(
    [sys.executable, str(TESTS / script)], capture_output=True, text=True, env=env
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])
