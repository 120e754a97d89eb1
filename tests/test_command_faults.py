"""Faults of the `nso-jax` command: Ctrl-C at any time, divergence, sizes.

The two Ctrl-C cases run the command as its console script does
(`python -m nso_jax_command`), in a subprocess; the others run in-process.
"""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import nso_jax_command
from nso_jax.app import cli
from nso_jax.app import interrupts
from nso_jax.app import output
from nso_jax.app.experiments import matrix_sensing

# A matrix-sensing run of a million steps: hours, were it not interrupted.
LONG_SEED = [
  "experiment",
  "matrix-sensing",
  "--seeds=1",
  "--dim=4",
  "--rank=1",
  "--measurements=8",
  "--steps=1000000",
  "--record-every=10",
  "--init-scales=0.1",
  "--no-progress",
  "--no-plots",
]

TINY_SENSING = [
  "experiment",
  "matrix-sensing",
  "--seeds=1",
  "--dim=3",
  "--rank=1",
  "--measurements=6",
  "--steps=20",
  "--record-every=10",
  "--init-scales=0.1",
  "--hessian-matvecs=2",
  "--lanczos-steps=2",
  "--ns-draws=2",
  "--no-progress",
]


def _interrupt(out, wait_for_line):
  """Launches the long run, sends SIGINT; returns (status, stderr)."""
  process = subprocess.Popen(
    [sys.executable, "-u", "-m", "nso_jax_command", *LONG_SEED, f"--out={out}"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    if wait_for_line:
      line = process.stdout.readline()
      assert line.startswith("matrix-sensing: training"), line
      time.sleep(0.5)
    else:
      time.sleep(0.2)
    assert process.poll() is None, "the run ended before it was interrupted"
    process.send_signal(signal.SIGINT)
    status = process.wait(timeout=20)  # a hang guard, not a timing claim
    return status, process.stderr.read()
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()


def _assert_interrupted(status, errors, out):
  assert status == 130, errors
  assert "Traceback" not in errors and "Exception ignored" not in errors, errors
  assert errors.splitlines()[-1] == "nso-jax: interrupted; no results were written"
  assert not (out / "results.json").exists()


@pytest.mark.fault("correct")
def test_ctrl_c_during_a_long_seed_exits_130_with_no_results(tmp_path):
  out = tmp_path / "run"
  status, errors = _interrupt(out, wait_for_line=True)
  _assert_interrupted(status, errors, out)
  assert os.listdir(out) == []


@pytest.mark.fault("correct")
def test_ctrl_c_right_after_launch_exits_130_with_one_line(tmp_path):
  out = tmp_path / "run"
  status, errors = _interrupt(out, wait_for_line=False)
  _assert_interrupted(status, errors, out)


@pytest.mark.fault("correct")
def test_a_diverged_run_writes_strict_json_warns_and_exits_3(
  tmp_path, capsys, monkeypatch
):
  out = tmp_path / "run"
  diverged = {"per_seed": {"final_train_loss": [np.float32("nan"), 0.5]}}
  diverged["curves"] = [[1.0, float("inf")], [1.0, 0.5]]

  def undrawable(path):
    raise AssertionError("a diverged run's plots are not drawn")

  def run(name, chosen):
    output.prepare_output(chosen.output)
    return interrupts.run_interruptibly(
      lambda context: output.finish(
        context, chosen.output, diverged, "# t", {"c.png": undrawable}
      ),
      printer=lambda _: None,
    )

  monkeypatch.setattr(cli.experiments, "run", run)
  status = cli.main([*TINY_SENSING, "--lr=1e4", f"--out={out}"])
  errors = capsys.readouterr().err
  assert status == cli.DIVERGED == 3, errors
  assert errors.startswith("nso-jax: warning: the run diverged: 2 numbers ")
  assert "try a smaller --lr" in errors and "\n" not in errors.strip()

  def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")

  results = json.loads((out / "results.json").read_text(), parse_constant=refuse)
  assert results["per_seed"]["final_train_loss"] == [None, 0.5]
  assert results["curves"] == [[1.0, None], [1.0, 0.5]]
  assert results["nonfinite"]["fields"] == {
    "per_seed.final_train_loss": 1,
    "curves": 1,
  }
  assert sorted(os.listdir(out)) == ["results.json", "results.md"]
  with pytest.raises(ValueError, match="JSON compliant"):
    output.write_json({"x": float("nan")}, str(tmp_path / "x.json"))


@pytest.mark.fault("clear")
def test_an_empty_out_is_refused_naming_the_flag(tmp_path, capsys):
  assert cli.main(["train", "--out=", "--no-progress"]) == 2
  errors = capsys.readouterr().err
  assert errors == "nso-jax: error: --out must name a folder, got ''.\n"


def _compilations(caplog, run):
  caplog.clear()
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    result = run()
  count = sum("Finished XLA compilation" in r.getMessage() for r in caplog.records)
  return count, result


@pytest.mark.fault("correct")
def test_longer_runs_compile_nothing_more_and_segments_keep_the_path(caplog):
  settings = matrix_sensing.Settings(
    seeds=1, dim=3, rank=1, measurements=6, steps=20, record_every=10
  )
  problem = matrix_sensing.make_problem(settings, 0)
  u0 = 0.1 * problem.start
  _, gd_long, _ = matrix_sensing.methods(settings)

  def train(method, steps):
    method = matrix_sensing.dataclasses.replace(method, steps=steps)
    return matrix_sensing.train(method, problem, u0, 0, 10, 1, lambda: None)

  first, _ = _compilations(caplog, lambda: train(gd_long, 20))
  again, (_, u, curves) = _compilations(caplog, lambda: train(gd_long, 200))
  assert first > 0 and again == 0  # 20 curve points cost no compilation
  assert curves["train_loss"].shape == (20,) and isinstance(u, jax.Array)
  # The same 10 steps between points in segments of 4, 4 and 2 steps.
  runner = matrix_sensing.make_segments(gd_long.tx, 10, 4, perturbed=False)
  assert runner.leads == 2
  segmented = matrix_sensing.dataclasses.replace(gd_long, runner=runner)
  _, u_segmented, curves_segmented = train(segmented, 200)
  np.testing.assert_allclose(u_segmented, u, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
    curves_segmented["train_loss"], curves["train_loss"], rtol=1e-5
  )


def test_the_console_script_module_imports_no_jax_before_its_handler():
  source = pathlib.Path(nso_jax_command.__file__).read_text()
  head = source[: source.index("def main")]
  assert "import jax" not in head and "import nso_jax" not in head
