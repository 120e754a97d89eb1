"""The `nso-jax train` main job at a tiny size, its input errors, its imports."""

import ast
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import nso_jax
from nso_jax.app import cli
from nso_jax.app import data
from nso_jax.app import job

TINY = [
  "train",
  "--epochs=1",
  "--seeds=1",
  "--hidden=8",
  "--hessian-matvecs=4",
  "--hessian-samples=64",
  "--no-progress",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
  import matplotlib.image

  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_train_writes_results_and_plots(tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main([*TINY, f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert "| NSO | 2 |" in printed and "| SAM | 2 |" in printed
  results = json.loads((out / "results.json").read_text())
  assert set(results) >= {"config", "data", "environment", "results", "table"}
  assert results["data"]["classes"] == 10
  rows = {row["optimizer"]: row for row in results["results"]}
  assert list(rows) == ["sgd", "sam", "rwp", "nso"]
  evaluations = {
    name: row["gradient_evaluations_per_step"] for name, row in rows.items()
  }
  assert evaluations == {"sgd": 1, "sam": 2, "rwp": 1, "nso": 2}
  for row in rows.values():
    mean, std = row["test_accuracy"]
    assert 0.0 <= mean <= 1.0 and std == 0.0
    assert len(row["test_accuracy_per_seed"]) == 1
    assert np.isfinite(row["hessian_trace"][0]) and row["hessian_trace_stderr"] >= 0
    assert np.isfinite(row["top_eigenvalue"][0])
    assert np.isfinite(row["final_train_loss"][0])
    density = row["spectral_density_seed0"]
    assert len(density["grid"]) == len(density["density"]) == 400
    assert np.all(np.asarray(density["density"]) >= 0)
    assert len(row["curves"]["test_accuracy"][0]) == 1
  for name in ("curves.png", "spectrum.png"):
    _check_png(out / name)


def test_train_on_user_data_with_chosen_optimizers(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 5))
  y = np.where(x[:, 0] > 0, "yes", "no")
  np.savez(tmp_path / "mine.npz", X=x, y=y)
  out = tmp_path / "run"
  argv = [*TINY, "--optimizers=nso,sgd", "--k=2", "--no-plots"]
  assert cli.main([*argv, f"--data={tmp_path / 'mine.npz'}", f"--out={out}"]) == 0
  results = json.loads((out / "results.json").read_text())
  assert results["data"] | {"name": "mine.npz", "classes": 2} == results["data"]
  assert [row["optimizer"] for row in results["results"]] == ["nso", "sgd"]
  assert results["results"][0]["gradient_evaluations_per_step"] == 4
  assert not (out / "curves.png").exists()


@pytest.mark.parametrize(
  ("arrays", "message"),
  [
    (None, "no such file"),
    ("garbage", "not a readable .npz"),
    (
      {"features": np.ones((10, 2)), "y": np.arange(10) % 2},
      r"lacks the array\(s\) \['X'\]",
    ),
    ({"X": np.ones(10), "y": np.arange(10) % 2}, "X must be a 2-D numeric array"),
    ({"X": np.ones((10, 2)), "y": np.arange(9) % 2}, "one label per row"),
    ({"X": np.full((10, 2), np.nan), "y": np.arange(10) % 2}, "NaN or infinite"),
    ({"X": np.ones((10, 2)), "y": np.zeros(10)}, "at least two classes"),
    ({"X": np.ones((10, 2)), "y": np.linspace(0, 1, 10)}, "non-integer floats"),
  ],
)
def test_bad_data_files_give_clear_errors(tmp_path, capsys, arrays, message):
  path = tmp_path / "data.npz"
  if isinstance(arrays, dict):
    np.savez(path, **arrays)
  elif arrays == "garbage":
    path.write_text("not an archive")
  assert cli.main([*TINY, f"--data={path}", f"--out={tmp_path / 'out'}"]) == 2
  error = capsys.readouterr().err
  assert error.startswith("nso-jax: error: --data: ")
  assert "`path`" not in error and "`data`" not in error
  assert re.search(message, error), error


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--epochs=0"], "--epochs must be an int >= 1, got 0."),
    (["--sigma=-1"], "--sigma must be a finite float > 0, got -1.0."),
    (["--lr=inf"], "--lr must be a finite float > 0, got inf."),
    (["--k=0"], "--k must be an int >= 1, got 0."),
    (["--test-fraction=1.5"], "--test-fraction must be in (0, 1), got 1.5."),
    (["--batch-size=5000"], "--batch-size 5000 exceeds the 1257 training examples."),
  ],
)
def test_bad_settings_give_clear_errors(tmp_path, capsys, argv, message):
  assert cli.main([*TINY, *argv, f"--out={tmp_path}"]) == 2
  assert capsys.readouterr().err == f"nso-jax: error: {message}\n"


def test_library_errors_name_fields_not_flags(tmp_path):
  with pytest.raises(
    data.SettingError, match=r"^`num_perturbations` must be an int"
  ) as info:
    job.Config(num_perturbations=0)
  assert info.value.field == "num_perturbations"
  missing = str(tmp_path / "x.npz")
  with pytest.raises(data.DataError, match=r"^`path`: no such file") as info:
    data.load_npz(missing)
  assert info.value.field == "path"
  with pytest.raises(data.DataError, match=r"^`data`: no such file") as info:
    job.run(job.Config(data=missing, output=str(tmp_path / "out")))
  assert info.value.field == "data"
  tiny = job.Config(batch_size=5000, output=str(tmp_path / "out"), progress=False)
  with pytest.raises(
    data.SettingError, match=r"^`batch_size` \(5000\) exceeds the 1257 training"
  ) as info:
    job.run(tiny, printer=lambda _: None)
  assert info.value.field == "batch_size"


def test_flags_set_config_fields(capsys):
  assert set(cli.FLAGS) <= {field.name for field in dataclasses.fields(job.Config)}
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", "--help"])
  assert exit_info.value.code == 0
  usage = capsys.readouterr().out
  for flag in cli.FLAGS.values():
    assert re.search(rf"{flag}\b", usage), flag


def test_unknown_optimizer_is_rejected_by_the_parser(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", "--optimizers=adam"])
  assert exit_info.value.code == 2
  assert "unknown optimizer" in capsys.readouterr().err


def test_console_script_is_installed():
  # Console scripts sit beside the interpreter, whether or not the virtual
  # environment is activated.
  search_path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
  executable = shutil.which("nso-jax", path=search_path)
  if executable is None:
    pytest.fail(
      "the `nso-jax` console script is not on PATH: is the package installed?"
    )
  result = subprocess.run(
    [executable, "train", "--help"], capture_output=True, text=True, check=True
  )
  assert "--data FILE.npz" in result.stdout


def test_module_entry_point_runs_the_command():
  result = subprocess.run(
    [sys.executable, "-m", "nso_jax.app", "train", "--help"],
    capture_output=True,
    text=True,
    check=True,
  )
  assert result.stdout.startswith("usage: nso-jax train")


PACKAGE_ROOT = pathlib.Path(nso_jax.__file__).parent


def _imported_modules(path):
  """The absolute module names a source file imports (``from a import b``: a.b)."""
  names = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}: relative import"
      names += [f"{node.module}.{alias.name}" for alias in node.names]
  return names


def _is_within(module, package):
  return module == package or module.startswith(package + ".")


def test_app_uses_only_the_public_api():
  app_files = sorted((PACKAGE_ROOT / "app").glob("*.py"))
  assert {path.name for path in app_files} >= {"cli.py", "job.py", "data.py"}
  for path in app_files:
    for module in _imported_modules(path):
      assert not _is_within(module, "nso_jax._src"), f"{path} imports {module}"


def test_library_internals_import_neither_the_app_nor_the_public_package():
  for path in sorted((PACKAGE_ROOT / "_src").rglob("*.py")):
    for module in _imported_modules(path):
      if _is_within(module, "nso_jax"):
        assert _is_within(module, "nso_jax._src"), f"{path} imports {module}"
