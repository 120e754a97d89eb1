"""The `nso-jax train` main job at a tiny size, its input errors, its imports."""

import ast
import dataclasses
import errno
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nso_jax
from nso_jax import training
from nso_jax.app import classifier
from nso_jax.app import cli
from nso_jax.app import data
from nso_jax.app import interrupts
from nso_jax.app import job
from nso_jax.app import measures
from nso_jax.app import optimizers
from nso_jax.app import output
from nso_jax.app import settings

TINY = [
  "train",
  "--epochs=1",
  "--seeds=1",
  "--hidden=8",
  "--hessian-matvecs=4",
  "--hessian-samples=64",
  "--no-progress",
]

FAST = [
  "train",
  "--epochs=1",
  "--seeds=1",
  "--hidden=4",
  "--hessian-matvecs=2",
  "--hessian-samples=20",
  "--optimizers=sgd",
  "--no-plots",
  "--no-progress",
]
"""The smallest job: one optimizer, one epoch, no plots."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_training(monkeypatch):
  """Fails the test if the job starts to train or compile: refusals come first."""

  def forbidden(*args, **kwargs):
    raise AssertionError("the job started training before refusing its settings")

  monkeypatch.setattr(classifier, "train", forbidden)
  monkeypatch.setattr(measures, "make_measure", forbidden)


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
  for name in ("curves.png", "spectrum.png", "curvature.png", "landscape.png"):
    _check_png(out / name)
  assert sorted(os.listdir(out)) == [
    "curvature.png",
    "curves.png",
    "landscape.png",
    "results.json",
    "spectrum.png",
  ]
  for name, row in rows.items():
    during = row["curvature_during_training"]
    assert during["source"] == ("readings" if name == "nso" else "measured")
    assert during["sigma"] == 0.05 and during["epochs"] == [1]
    assert during["trace_mean"][0] > 0 and during["trace_mean_stderr"][0] > 0
    assert np.isfinite(during["relative_gap"][0][0])
  assert rows["nso"]["curvature_during_training"]["readings"] == [[39]]
  landscape = results["landscape_seed0"]
  assert len(landscape["line"]["a"]) == len(landscape["line"]["nso"]) == 21
  assert (
    np.shape(landscape["plane"]["sgd"]) == (11, 11) and "sam" not in landscape["plane"]
  )
  assert np.all(np.isfinite(landscape["plane"]["nso"]))


@pytest.mark.fault("correct")
def test_readings_without_a_standard_error_yet_are_null_not_a_divergence():
  # One step in all: one reading, whose standard error is not defined yet.
  inf = np.full((2, 1), np.inf)
  curves = classifier.CurvatureCurves(
    "readings", 0.05, np.ones((2, 1)), inf, np.ones((2, 1)), inf, np.ones((2, 1)), 0.0
  )
  during = output.strict_results({"during": job.curvature_json(curves)})["during"]
  assert during["readings"] == [[1], [1]] and during["trace"] == [[1.0], [1.0]]
  assert during["trace_stderr"] == [[None], [None]]
  assert during["trace_mean"] == [1.0] and during["relative_gap_mean_stderr"] == [None]
  # and no "nonfinite" entry: a run whose results hold one warns of divergence.
  assert "nonfinite" not in output.strict_results({"during": during})


def test_the_reading_step_takes_the_same_step():
  config = job.Config(hidden=(2,))
  model = classifier.MLP((2,), 3)
  x, y = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), jnp.array([0, 1, 2, 1])
  params = model.init(jax.random.key(0), x)["params"]
  plain = optimizers.make_optimizer("nso", config)
  read = plain._replace(tx=nso_jax.curvature_readings(plain.tx))

  def start(optimizer):
    return training.TrainState.create(
      apply_fn=model.apply, params=params, tx=optimizer.tx
    )

  after, loss = jax.jit(classifier._step, static_argnums=(0, 1))(
    model, plain, start(plain), x, y
  )
  read_after, read_loss = jax.jit(classifier._reading_step, static_argnums=(0, 1))(
    model, read, start(read), x, y
  )
  jax.tree.map(np.testing.assert_array_equal, after.params, read_after.params)
  np.testing.assert_allclose(loss, read_loss, rtol=1e-6)
  assert int(read_after.opt_state[1].count) == 1


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
    ("garbage", r"is not an \.npz archive \(the zip of arrays numpy\.savez writes\)"),
    (
      {"features": np.ones((10, 2)), "y": np.arange(10) % 2},
      r"lacks the array\(s\) \['X'\]",
    ),
    ({"X": np.ones(10), "y": np.arange(10) % 2}, "X must be a 2-D numeric array"),
    ({"X": np.ones((10, 2)), "y": np.arange(9) % 2}, "one label per row"),
    ({"X": np.full((10, 2), np.nan), "y": np.arange(10) % 2}, "NaN or infinite"),
    ({"X": np.ones((10, 2)), "y": np.zeros(10)}, "at least two classes"),
    ({"X": np.ones((10, 2)), "y": np.linspace(0, 1, 10)}, "non-integer floats"),
    ("folder", "is a folder, not an .npz file"),
    ("npy", r"is not an \.npz archive .*numpy\.savez\(path, X=features"),
    ("raw zip", r"holds \['X', 'y'\] as raw bytes, not as \.npy arrays"),
    ("truncated", r"is not an \.npz archive"),
    ("corrupted", r"is not a readable \.npz archive \(Bad CRC-32"),
    ({"X": np.ones((10, 2)) * 1j, "y": np.arange(10) % 2}, "dtype complex128"),
    (
      {"X": np.ones((10, 2), dtype="timedelta64[s]"), "y": np.arange(10) % 2},
      "dtype timedelta64",
    ),
    ({"X": np.ones((10, 0)), "y": np.arange(10) % 2}, "X has no feature columns"),
    (
      {"X": np.full((10, 2), 1e308), "y": np.arange(10) % 2},
      "too large to standardise",
    ),
    (
      {"X": np.array([[1], [2]], dtype=object), "y": np.arange(2)},
      "Object arrays cannot be loaded",
    ),
  ],
)
def test_bad_data_files_give_clear_errors(
  tmp_path, capsys, no_training, arrays, message
):
  path = tmp_path / "data.npz"
  good = {"X": np.arange(40.0).reshape(20, 2), "y": np.arange(20) % 2}
  if isinstance(arrays, dict):
    np.savez(path, **arrays)
  elif arrays == "garbage":
    path.write_text("not an archive")
  elif arrays == "folder":
    path.mkdir()
  elif arrays == "npy":
    np.save(tmp_path / "data.npy", good["X"])
    (tmp_path / "data.npy").rename(path)
  elif arrays == "raw zip":
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr("X", "1,2\n3,4")
      archive.writestr("y", "0\n1")
  elif arrays in ("truncated", "corrupted"):
    np.savez(path, **good)
    content = bytearray(path.read_bytes())
    if arrays == "truncated":
      content = content[:100]
    else:
      content[150] ^= 0xFF  # a byte of X's stored data
    path.write_bytes(bytes(content))
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
    (["--lr=nan"], "--lr must be a finite float > 0, got nan."),
    (["--sigma=inf"], "--sigma must be a finite float > 0, got inf."),
    (["--sigma=-inf"], "--sigma must be a finite float > 0, got -inf."),
    (["--rho=nan"], "--rho must be a finite float > 0, got nan."),
    (["--momentum=nan"], "--momentum must be in [0, 1), got nan."),
    (["--weight-decay=nan"], "--weight-decay must be a finite float >= 0, got nan."),
    (["--weight-decay=inf"], "--weight-decay must be a finite float >= 0, got inf."),
    (["--test-fraction=nan"], "--test-fraction must be in (0, 1), got nan."),
    (["--lr=1e999"], "--lr must be a finite float > 0, got inf."),
    (
      ["--data="],
      "--data must name an .npz file (or be left out for the digits), got ''.",
    ),
    (["--out="], "--out must name a folder, got ''."),
  ],
)
def test_bad_settings_give_clear_errors(tmp_path, capsys, no_training, argv, message):
  # The flags come after --out, which the last case overrides.
  assert cli.main([*TINY, f"--out={tmp_path}", *argv]) == 2
  assert capsys.readouterr().err == f"nso-jax: error: {message}\n"


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (
      ["--epochs=10001"],
      "--epochs must be at most 10,000 (250 times the default; at the default "
      "size that is hours of training), got 10001.",
    ),
    (
      ["--seeds=65"],
      "--seeds must be at most 64 (all seeds train at once, each with its own "
      "copy of the model), got 65.",
    ),
    (
      ["--k=65"],
      "--k must be at most 64 (NSO spends 2 gradient evaluations per "
      "perturbation), got 65.",
    ),
    (
      ["--batch-size=100001"],
      "--batch-size must be at most 100,000 (a batch's activations are held "
      "for every seed at once), got 100001.",
    ),
    (
      ["--hessian-matvecs=10001"],
      "--hessian-matvecs must be at most 10,000 (100 times the default; the "
      "trace's error shrinks only as 1/sqrt(probes)), got 10001.",
    ),
    (
      ["--hessian-samples=100001"],
      "--hessian-samples must be at most 100,000 (100 times the default; the "
      "Hessian is applied to all of them at once), got 100001.",
    ),
    (
      ["--epochs=" + "9" * 30],
      "--epochs must be at most 10,000 (250 times the default; at the default "
      f"size that is hours of training), got {'9' * 30}.",
    ),
    (
      ["--hidden=8193"],
      "--hidden must list layer widths of at most 8,192, got (8193,).",
    ),
    (
      ["--hidden=" + ",".join(["4"] * 33)],
      "--hidden must list at most 32 layers (each is compiled on its own), got 33.",
    ),
    (
      ["--hidden=8192,8192"],
      "--hidden 8192,8192 gives a model of 67,731,466 parameters on 64 "
      "features and 10 classes; at most 20,000,000 are allowed (the Hessian "
      "measurement keeps dozens of parameter-sized vectors); use narrower "
      "layers.",
    ),
    (
      ["--hidden=4096,4096", "--seeds=64"],
      "--seeds 64 would train 64 models of 17,088,522 parameters at once; at "
      "most 200,000,000 parameters in all are allowed; use fewer seeds or a "
      "smaller model.",
    ),
  ],
)
def test_absurd_sizes_are_refused_before_training(
  tmp_path, capsys, no_training, argv, message
):
  out = tmp_path / "out"
  assert cli.main([*TINY, *argv, f"--out={out}"]) == 2
  assert capsys.readouterr().err == f"nso-jax: error: {message}\n"
  assert not out.exists()


def test_sizes_at_their_bounds_are_accepted():
  widths = settings.SPECS["hidden"].rule
  config = job.Config(
    **settings.limits(job.Config), hidden=(widths.max_width,) * widths.max_depth
  )
  assert config.seeds == 64 and config.epochs == 10_000
  assert config.num_perturbations == 64 and config.hessian_matvecs == 10_000
  count = classifier.parameter_count((widths.max_width,), 64, 10)
  assert count < settings.MAX_PARAMETERS


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys, no_training):
  path = tmp_path / "results"
  path.write_text("keep me")
  assert cli.main([*FAST, f"--out={path}"]) == 2
  assert capsys.readouterr().err == (
    f"nso-jax: error: --out: {str(path)!r} exists and is not a folder; choose "
    "another path, or move the file away.\n"
  )
  assert path.read_text() == "keep me"


def test_out_under_a_file_is_refused_before_training(tmp_path, capsys, no_training):
  # Fails even for root, who ignores permissions.
  (tmp_path / "file").write_text("")
  path = tmp_path / "file" / "run"
  assert cli.main([*FAST, f"--out={path}"]) == 2
  assert capsys.readouterr().err == (
    f"nso-jax: error: --out: cannot create the folder {str(path)!r} (Not a "
    "directory: part of the path is a file, not a folder); choose a path where "
    "you can create folders.\n"
  )


@pytest.mark.skipif(
  not hasattr(os, "geteuid") or os.geteuid() == 0,
  reason="root ignores folder permissions",
)
@pytest.mark.parametrize(
  ("subfolder", "message"),
  [
    ("", "cannot write files in the folder {path!r} (Permission denied); "),
    ("run", "cannot create the folder {path!r} (Permission denied); "),
  ],
)
def test_out_in_a_read_only_folder_is_refused_before_training(
  tmp_path, capsys, no_training, subfolder, message
):
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o555)
  path = str(read_only / subfolder) if subfolder else str(read_only)
  try:
    assert cli.main([*FAST, f"--out={path}"]) == 2
  finally:
    read_only.chmod(0o755)
  error = capsys.readouterr().err
  assert error.startswith("nso-jax: error: --out: " + message.format(path=path))
  assert error.count("\n") == 1
  assert os.listdir(read_only) == []


def _failing_dump(exception):
  def dump(results, file, **kwargs):
    file.write('{"config": {"epochs": 1,')
    raise exception

  return dump


@pytest.mark.parametrize(
  ("exception", "status", "message"),
  [
    (
      OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
      2,
      "nso-jax: error: --out: cannot write the results into {out!r} (No space "
      "left on device); results.json was not written; check the folder's free "
      "space and permissions, or choose another.\n",
    ),
    (KeyboardInterrupt(), 130, "nso-jax: interrupted; no results were written\n"),
  ],
)
def test_failed_write_leaves_no_partial_results(
  tmp_path, capsys, monkeypatch, exception, status, message
):
  out = tmp_path / "run"
  out.mkdir()
  (out / "results.json").write_text('{"from": "an earlier run"}')
  monkeypatch.setattr(output.json, "dump", _failing_dump(exception))
  argv = [*FAST, f"--out={out}"]
  argv.remove("--no-plots")
  assert cli.main(argv) == status
  assert capsys.readouterr().err == message.format(out=str(out))
  # The earlier run's results stand; no plot, no temporary file was left.
  assert os.listdir(out) == ["results.json"]
  assert json.loads((out / "results.json").read_text()) == {"from": "an earlier run"}


def test_a_bug_while_writing_keeps_its_traceback_and_leaves_no_file(
  tmp_path, monkeypatch
):
  out = tmp_path / "run"
  monkeypatch.setattr(output.json, "dump", _failing_dump(RuntimeError("bug")))
  with pytest.raises(RuntimeError, match="bug"):
    cli.main([*FAST, f"--out={out}"])
  assert os.listdir(out) == []


def test_interruption_after_writing_says_what_was_written(tmp_path):
  def printer(line):
    if line.startswith("wrote"):
      raise KeyboardInterrupt

  config = job.Config(
    optimizers=("sgd",),
    epochs=1,
    seeds=1,
    hidden=(4,),
    hessian_matvecs=2,
    hessian_samples=20,
    output=str(tmp_path),
    plots=False,
    progress=False,
  )
  with pytest.raises(interrupts.Interrupted) as info:
    job.run(config, printer=printer)
  assert info.value.written == [str(tmp_path / "results.json")]
  assert cli.interruption_message(info.value.written) == (
    f"nso-jax: interrupted after writing {tmp_path / 'results.json'}"
  )
  assert json.loads((tmp_path / "results.json").read_text())["results"]


@pytest.mark.parametrize(
  "exception",
  [
    MemoryError(),
    jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 GiB."
    ),
  ],
)
def test_out_of_memory_gives_one_line(capsys, monkeypatch, exception):
  def run(config):
    raise exception

  monkeypatch.setattr(job, "run", run)
  assert cli.main(FAST) == 1
  error = capsys.readouterr().err
  assert error.startswith("nso-jax: error: out of memory (")
  assert error.endswith(
    "use smaller settings: --seeds, --hidden, --batch-size, --hessian-samples, "
    "--hessian-matvecs or --k.\n"
  )
  assert error.count("\n") == 1


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
  def run(config):
    raise jax.errors.JaxRuntimeError("INTERNAL: a bug")

  monkeypatch.setattr(job, "run", run)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    cli.main(FAST)


def test_ctrl_c_is_deferred_to_a_safe_point():
  before = signal.getsignal(signal.SIGINT)
  with interrupts.DeferredInterruptions() as interruptions:
    interruptions.safe_point()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)  # Python runs signal handlers between bytecodes
    assert interruptions.requested
    with pytest.raises(KeyboardInterrupt):
      interruptions.safe_point()
  assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_while_training_exits_130_with_one_line(tmp_path):
  out = tmp_path / "run"
  command = [sys.executable, "-u", "-m", "nso_jax.app", *FAST, "--epochs=10000"]
  command[command.index("--optimizers=sgd")] = "--optimizers=sgd,sam,rwp,nso"
  process = subprocess.Popen(
    [*command, f"--out={out}"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  lines = queue.Queue()
  reader = threading.Thread(
    target=lambda: [lines.put(line) for line in process.stdout], daemon=True
  )
  reader.start()
  try:
    # The data line is printed right before training starts; 10,000 epochs of
    # four optimizers then take minutes.
    first_line = lines.get(timeout=300)
    assert first_line.startswith("data: digits"), first_line
    time.sleep(3)
    assert process.poll() is None, "the job ended before it was interrupted"
    process.send_signal(signal.SIGINT)
    status = process.wait(timeout=120)
    errors = process.stderr.read()
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert status == 130, errors
  assert "Traceback" not in errors
  assert errors.splitlines()[-1] == "nso-jax: interrupted; no results were written"
  assert os.listdir(out) == []


def test_library_errors_name_fields_not_flags(tmp_path):
  with pytest.raises(
    settings.SettingError, match=r"^`num_perturbations` must be an int"
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
    settings.SettingError, match=r"^`batch_size` \(5000\) exceeds the 1257 training"
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


def test_version_prints_the_package_version(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--version"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out == f"nso-jax {nso_jax.__version__}\n"


def _command_parsers():
  """Every parser that takes settings: ``train`` and each experiment's."""
  parser = cli.build_parser()
  (commands,) = [a for a in parser._actions if a.dest == "command"]
  found = {"train": commands.choices["train"]}
  experiment = commands.choices["experiment"]
  (names,) = [a for a in experiment._actions if a.dest == "experiment"]
  found.update({f"experiment {n}": p for n, p in names.choices.items()})
  return found


def test_every_flag_states_its_help_and_a_readable_default():
  for command, parser in _command_parsers().items():
    for action in parser._actions:
      if action.dest == "help":
        continue
      flag = action.option_strings[0]
      assert action.help and len(action.help) > 10, (command, flag)
      assert re.search(r"\(default: [^()]+\)$", action.help), (command, flag)
  help_text = _command_parsers()["train"].format_help()
  assert "(default: 128,128)" in help_text
  assert not re.search(r"default: [(\[]", help_text)


@pytest.mark.parametrize(
  ("argv", "flag"),
  [
    (["train", "--bogus"], "--bogus"),
    (["train", "--epochs=x"], "--epochs"),
    (["train", "--optimizers=adam"], "--optimizers"),
    (["train", "--hidden"], "--hidden"),
    (["experiment", "finetune", "--sigma=x"], "--sigma"),
  ],
)
def test_a_bad_flag_ends_with_one_line_naming_it(capsys, argv, flag):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.count("\n") == 1, captured.err
  assert captured.err.startswith("nso-jax: error: ")
  assert flag in captured.err and "usage:" not in captured.err


@pytest.mark.parametrize("hidden", ["128,,128", "128,", ",128", "128, ,64"])
def test_an_empty_layer_width_is_refused(capsys, no_training, hidden):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", f"--hidden={hidden}"])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert error.startswith("nso-jax: error: argument --hidden: empty layer width in ")
  assert repr(hidden) in error
