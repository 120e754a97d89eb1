"""The test suite on an accelerator: one pass, recorded with the machine.

Runs ``pytest`` (with the arguments given after ``--``) and writes
``gpu_test_suite.json`` beside the results: the device, driver, versions,
commit, counts of passed / failed / skipped / errors, the duration, and each
failure's name and first line. A run stopped by ``--stop-after`` seconds
(SIGINT, so pytest still reports) is recorded as incomplete.

Run: ``python -m benchmarks.gpu_suite --commit $(git rev-parse HEAD) -- -n 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Any

from benchmarks import _common


def _driver() -> str | None:
  try:
    result = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      check=True,
    )
  except (OSError, subprocess.CalledProcessError):
    return None
  return result.stdout.strip()


def _versions() -> dict[str, str]:
  import importlib.metadata

  names = ("jax", "jaxlib", "optax", "flax", "chex", "orbax-checkpoint", "numpy")
  found = {}
  for name in names:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = "not installed"
  return found


def _read_junit(path: pathlib.Path) -> dict[str, Any]:
  counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
  failures = []
  ran: dict[str, int] = {}
  if not path.exists():
    return {**counts, "failures": [], "tests_run_per_file": ran, "complete": False}
  for case in ElementTree.parse(path).getroot().iter("testcase"):
    name = f"{case.get('classname')}::{case.get('name')}"
    outcome = "passed"
    for child in case:
      if child.tag in ("failure", "error"):
        outcome = "failed" if child.tag == "failure" else "errors"
        message = (child.get("message") or "").strip().splitlines()
        failures.append(
          {
            "test": name,
            "kind": child.tag,
            "message": message[0][:300] if message else "",
          }
        )
      elif child.tag == "skipped":
        outcome = "skipped"
    counts[outcome] += 1
    module = case.get("classname") or ""
    ran[module] = ran.get(module, 0) + 1
  return {**counts, "failures": failures, "tests_run_per_file": ran, "complete": True}


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
  own = argv[: argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--commit", required=True)
  parser.add_argument("--stop-after", type=float, default=None)
  parser.add_argument("--out", default=None, help="a folder for the JSON")
  args = parser.parse_args(own)
  junit = pathlib.Path(tempfile.mkdtemp()) / "junit.xml"
  command = [sys.executable, "-m", "pytest", "-q", f"--junitxml={junit}", *pytest_args]
  start = time.perf_counter()
  process = subprocess.Popen(command)
  try:
    returncode = process.wait(timeout=args.stop_after)
    stopped = False
  except subprocess.TimeoutExpired:
    process.send_signal(signal.SIGINT)
    returncode = process.wait()
    stopped = True
  seconds = time.perf_counter() - start
  payload = {
    "benchmark": "gpu_test_suite",
    "machine": _common.machine_info(),
    "gpu_and_driver": _driver(),
    "versions": _versions(),
    "commit": args.commit,
    "command": " ".join(["pytest", "-q", *pytest_args]),
    "returncode": returncode,
    "stopped_after_s": args.stop_after if stopped else None,
    "duration_s": round(seconds, 1),
    **_read_junit(junit),
  }
  payload["complete"] = payload["complete"] and not stopped
  out = pathlib.Path(args.out) if args.out else None
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_test_suite.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
  else:
    path = _common.write_result("gpu_test_suite", payload)
  counts = {k: payload[k] for k in ("passed", "failed", "errors", "skipped")}
  print(f"{counts} in {seconds:.0f} s, complete={payload['complete']}; wrote {path}")
  for failure in payload["failures"]:
    print(f"FAILED {failure['test']}: {failure['message']}")


if __name__ == "__main__":
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  main()
