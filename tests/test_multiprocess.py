"""Several processes on this machine train NSO on one mesh (jax.distributed).

Two processes of 4 simulated CPU devices each form a 4 x 2 ``data x noise``
mesh over localhost (a coordinator on a free port, CPU collectives through
gloo); their training equals one device's.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

NUM_PROCESSES = 2
TIMEOUT_S = 240


def free_port():
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def cpu_collectives_unavailable():
  try:
    import jax

    return "gloo" not in str(
      jax.config.values.get("jax_cpu_collectives_implementation", "gloo")
    )
  except Exception as error:  # pragma: no cover - an unusual platform
    return f"cannot read the CPU collectives setting: {error}"


def test_two_processes_train_as_one_device(tmp_path):
  if cpu_collectives_unavailable():
    pytest.skip("this JAX has no CPU collectives (gloo) for several processes")
  worker = pathlib.Path(__file__).parent / "multiprocess_worker.py"
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  port = free_port()
  outputs = [tmp_path / f"process{i}.json" for i in range(NUM_PROCESSES)]
  processes = [
    subprocess.Popen(
      [sys.executable, str(worker), str(port), str(NUM_PROCESSES), str(i), str(out)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
    )
    for i, out in enumerate(outputs)
  ]
  logs = []
  try:
    for process in processes:
      logs.append(process.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  for process, log in zip(processes, logs, strict=True):
    assert process.returncode == 0, log[-4000:]
  reports = [json.loads(out.read_text()) for out in outputs]
  assert sorted(r["process_index"] for r in reports) == [0, 1]
  for report in reports:
    assert report["process_count"] == NUM_PROCESSES
    assert report["global_devices"] == 8
    assert report["local_devices"] == 4
    assert report["moved"] > 0.01
    # Float32 summation order across 8 devices and two processes.
    assert report["mesh_vs_single_device"] < 1e-6
