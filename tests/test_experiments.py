"""`nso-jax experiment NAME` at tiny sizes: outputs, fields, compute, bad flags."""

import ast
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nso_jax
from nso_jax.app import classifier
from nso_jax.app import cli
from nso_jax.app import experiments
from nso_jax.app import optimizers
from nso_jax.app.experiments import classify

TINY = [
  "--seeds=2",
  "--epochs=2",
  "--hidden=8",
  "--hessian-matvecs=2",
  "--hessian-samples=64",
  "--lanczos-steps=3",
  "--ns-draws=2",
  "--no-progress",
]
"""Shared by the classification experiments: their measures compile once."""

MATRIX_TINY = [
  "matrix-sensing",
  "--seeds=2",
  "--dim=6",
  "--rank=2",
  "--measurements=30",
  "--steps=20",
  "--record-every=10",
  "--init-scales=0.01,0.3",
  "--hessian-matvecs=2",
  "--lanczos-steps=3",
  "--ns-draws=2",
  "--no-progress",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(argv, out):
  assert cli.main(["experiment", *argv, f"--out={out}"]) == 0
  results = json.loads((out / "results.json").read_text())
  assert (out / "results.md").read_text().startswith("# ")
  for png in out.glob("*.png"):
    assert png.read_bytes()[:8] == PNG_SIGNATURE
  assert set(results) >= {"experiment", "settings", "environment", "seconds"}
  return results


def _check_row(row, seeds, metrics):
  """Seeds, finite numbers, and compute stated."""
  assert row["gradient_evaluations_per_step"] >= 1
  assert row["total_gradient_evaluations"] == (
    row["gradient_evaluations_per_step"] * row["total_steps"]
  )
  for metric in metrics:
    values = row["per_seed"][metric]
    assert len(values) == seeds, metric
    assert np.all(np.isfinite(values)), metric
    mean, std = row["summary"][metric]
    assert np.isclose(mean, np.mean(values)) and std >= 0


ACCURACY = (
  "final_test_accuracy",
  "best_test_accuracy",
  "best_epoch",
  "final_train_loss",
  "hessian_trace",
  "hessian_trace_stderr",
  "measured_loss",
  "trace_per_loss",
  "top_eigenvalue",
  "noise_stability",
  "noise_stability_stderr",
)


def test_finetune(tmp_path):
  out = tmp_path / "finetune"
  argv = [
    "finetune",
    *TINY,
    "--optimizers=sgd,nso-head",
    "--pretrain-epochs=1",
    "--per-class=5",
    "--batch-size=8",
  ]
  results = _run(argv, out)
  assert results["settings"]["per_class"] == 5
  assert results["settings"]["optimizers"] == ["sgd", "nso-head"]
  rows = {row["method"]: row for row in results["rows"]}
  assert list(rows) == ["sgd", "nso-head"]
  assert results["data"]["finetune_train_examples"] == 25
  layers = [f"vHv[Dense_{i}/{leaf}]" for i in (0, 1) for leaf in ("bias", "kernel")]
  for row in rows.values():
    _check_row(row, 2, (*ACCURACY, "vHv", "distance", *layers))
    assert all(1 <= epoch <= row["epochs"] for epoch in row["per_seed"]["best_epoch"])
  assert rows["nso-head"]["gradient_evaluations_per_step"] == 2
  assert rows["nso-head"]["total_gradient_evaluations"] == (
    2 * rows["sgd"]["total_gradient_evaluations"]
  )
  assert set(results["versus_sgd"]) == {"nso-head"}
  assert "| NSO, output layer only | 2 |" in results["tables"]["results"]
  assert sorted(p.name for p in out.glob("*.png")) == [
    "curves.png",
    "layers.png",
    "measures.png",
  ]


@pytest.mark.parametrize("k", [1, 3])
def test_methods_are_matched_in_gradient_evaluations(k):
  settings = classify.Settings(epochs=7, num_perturbations=k, hidden=(4, 4))
  plans = {
    method: optimizers.method_plan(method, settings) for method in optimizers.METHODS
  }
  # SGD for NSO's gradient evaluations: 2k times the epochs at 1 per step.
  assert plans["sgd-long"].optimizer == "sgd"
  assert plans["sgd-long"].training.epochs == 2 * k * 7
  # RWP: 2k one-sided draws per step, NSO's 2k gradient evaluations.
  assert plans["rwp"].training.num_perturbations == 2 * k
  assert plans["nso"].training.num_perturbations == k
  rwp = optimizers.make_optimizer("rwp", plans["rwp"].training)
  nso = optimizers.make_optimizer("nso", settings)
  assert rwp.gradient_evaluations == nso.gradient_evaluations == 2 * k
  head = plans["nso-head"].param_filter
  model = classifier.MLP((4, 4), 3)
  params = model.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(params)
  chosen = [head(path, leaf) for path, leaf in leaves]
  assert chosen == [False] * 4 + [True] * 2  # Dense_2's bias and kernel


def test_label_noise(tmp_path):
  out = tmp_path / "label-noise"
  argv = ["label-noise", *TINY, "--optimizers=sgd,rwp", "--noise-levels=0.3"]
  results = _run(argv, out)
  assert results["data"]["flipped_examples"] == {"0.3": round(0.3 * 1257)}
  (level,) = results["levels"]
  assert level["noise_level"] == 0.3
  rows = {row["method"]: row for row in level["rows"]}
  assert list(rows) == ["sgd", "rwp"]
  # Matched compute: RWP draws 2k one-sided perturbations per step.
  assert rows["rwp"]["gradient_evaluations_per_step"] == 2
  for row in rows.values():
    _check_row(row, 2, (*ACCURACY, "memorised", "clean_fit"))
    assert np.asarray(row["curves"]["test_accuracy"]).shape == (2, 2)
  assert "| RWP, 2 one-sided draws | 2 |" in level["tables"]["results"]
  assert (out / "measures_30.png").exists() and (out / "curves.png").exists()


@pytest.mark.parametrize(
  ("name", "flag", "field", "values"),
  [("sigma-sweep", "--sigmas=0.1", "sigma", [0.1]), ("k-sweep", "--ks=2", "k", [2])],
)
def test_sweeps(tmp_path, name, flag, field, values):
  out = tmp_path / name
  results = _run([name, *TINY, flag, "--no-plots"], out)
  assert results["experiment"] == name
  assert [row["swept_value"] for row in results["rows"]] == values
  assert [row["method"] for row in results["references"]] == ["sgd"]
  for row in results["references"] + results["rows"]:
    _check_row(row, 2, (*ACCURACY, "memorised"))
  if field == "k":
    assert results["rows"][0]["gradient_evaluations_per_step"] == 4
  assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]


def test_matrix_sensing(tmp_path):
  out = tmp_path / "matrix-sensing"
  results = _run(MATRIX_TINY, out)
  assert [group["init_scale"] for group in results["init_scales"]] == [0.01, 0.3]
  metrics = (
    "recovery_error",
    "best_recovery_error",
    "final_train_loss",
    "hessian_trace",
    "top_eigenvalue",
    "noise_stability",
    "factor_norm",
  )
  for group in results["init_scales"]:
    rows = {row["method"]: row for row in group["rows"]}
    assert list(rows) == ["gd", "gd-long", "nso"]
    for row in rows.values():
      _check_row(row, 2, metrics)
    assert rows["gd-long"]["total_steps"] == 2 * rows["gd"]["total_steps"] == 40
    assert rows["nso"]["total_gradient_evaluations"] == 40
    assert np.asarray(rows["gd-long"]["curves"]["recovery_error"]).shape == (2, 4)
    # GD's curve is the start of the long GD run.
    assert np.allclose(
      np.asarray(rows["gd"]["curves"]["recovery_error"]),
      np.asarray(rows["gd-long"]["curves"]["recovery_error"])[:, :2],
    )
  assert (out / "curves.png").exists() and (out / "measures_init_0.3.png").exists()


@pytest.mark.parametrize(
  ("argv", "flag"),
  [
    (["finetune", "--seeds=0"], "--seeds"),
    (["finetune", "--sigma=-1"], "--sigma"),
    (["finetune", "--label-noise=1.5"], "--label-noise"),
    (["finetune", "--per-class=500"], "--per-class"),
    (["label-noise", "--noise-levels=0.2,1"], "--noise-levels"),
    (["label-noise", "--batch-size=5000"], "--batch-size"),
    (["sigma-sweep", "--sigmas=0.1,0.1"], "--sigmas"),
    (["k-sweep", "--ks=0"], "--ks"),
    (["k-sweep", "--epochs=6000", "--optimizers=sgd-long"], "--epochs"),
    (["matrix-sensing", "--rank=200", "--dim=10"], "--rank"),
    (["matrix-sensing", "--measurements=100000"], "--measurements"),
    (["matrix-sensing", "--steps=25", "--record-every=10"], "--steps"),
  ],
)
def test_bad_settings_end_in_one_line_naming_the_flag(tmp_path, capsys, argv, flag):
  status = cli.main(["experiment", *argv, "--no-progress", f"--out={tmp_path / 'o'}"])
  assert status == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"nso-jax: error: {flag} ") and "\n" not in err
  assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.parametrize(
  ("argv", "flag"),
  [
    (["finetune", "--seeds=two"], "--seeds"),
    (["label-noise", "--optimizers=sgd,adam"], "--optimizers"),
    (["matrix-sensing", "--init-scales="], "--init-scales"),
    (["sigma-sweep", "--no-such-flag"], "--no-such-flag"),
  ],
)
def test_bad_flags_are_refused_by_the_parser(capsys, argv, flag):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["experiment", *argv])
  assert exit_info.value.code == 2
  assert flag in capsys.readouterr().err


def test_unknown_experiment_is_refused(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["experiment", "imagenet"])
  assert exit_info.value.code == 2
  assert "imagenet" in capsys.readouterr().err


def test_every_setting_has_a_flag_in_the_help(capsys):
  for name in experiments.EXPERIMENTS:
    with pytest.raises(SystemExit):
      cli.main(["experiment", name, "--help"])
    usage = capsys.readouterr().out
    for flag in experiments.flags(name).values():
      assert flag in usage, (name, flag)


def test_experiments_use_only_the_public_api():
  package = pathlib.Path(nso_jax.__file__).parent / "app" / "experiments"
  for path in sorted(package.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom):
        assert node.level == 0, f"{path}: relative import"
        modules = [node.module]
      elif isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
      else:
        continue
      for module in modules:
        assert not module.startswith("nso_jax._src"), f"{path} imports {module}"
