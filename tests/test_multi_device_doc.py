"""docs/multi_device.md's example runs as pasted, and the Flax train steps work
inside shard_map with `data_axis` (8 simulated CPU devices, fresh processes)."""

import json
import os
import pathlib
import re
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
DEVICE_FLAG = "--xla_force_host_platform_device_count=8"


def _environment():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # each script sets the device count itself
  env["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(ROOT), str(TESTS), env.get("PYTHONPATH")])
  )
  return env


def _example():
  """The Python block of docs/multi_device.md that simulates its devices."""
  text = (ROOT / "docs" / "multi_device.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
  examples = [block for block in blocks if DEVICE_FLAG in block]
  assert len(examples) == 1, "one self-contained example sets the device count"
  return examples[0]


def test_the_multi_device_example_runs_as_pasted(tmp_path):
  script = tmp_path / "example.py"
  script.write_text(_example())
  result = subprocess.run(
    [sys.executable, str(script)],
    cwd=tmp_path,
    env=_environment(),
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "NSO on a 4x2 mesh: loss" in result.stdout
  assert "Linen train_step on a 4x2 mesh: loss" in result.stdout


def test_flax_train_steps_average_over_the_data_axis():
  result = subprocess.run(
    [sys.executable, str(TESTS / "flax_mesh_worker.py")],
    env=_environment(),
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for case, differences in report.items():
    for name, difference in differences.items():
      assert difference < 1e-6, (case, name, difference)
