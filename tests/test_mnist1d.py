"""`nso-jax experiment mnist1d`: pinned data, and a tiny run's outputs."""

import json

import numpy as np
import pytest

from nso_jax.app import cli
from nso_jax.app.experiments import mnist1d

pytest.importorskip("mnist1d")


def test_data_is_generated_as_pinned():
  data, flipped = mnist1d.make_data(0.2)
  assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
  assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
  # Values of the package's generator with DATA_ARGS (seed 42).
  np.testing.assert_allclose(
    data.x_train[0, :4], [-0.332006, -0.471910, -0.778697, -1.009741], atol=1e-5
  )
  np.testing.assert_allclose(
    data.x_test[-1, -3:], [0.659876, 0.877734, 1.193152], atol=1e-5
  )
  assert data.y_test[:10].tolist() == [2, 6, 3, 9, 4, 3, 1, 9, 5, 2]
  # Exactly 20% of the training labels flipped, each to another class.
  assert flipped.sum() == 800
  clean, none = mnist1d.make_data(0.0)
  assert not none.any()
  assert np.all(clean.y_train[flipped] != data.y_train[flipped])
  assert np.array_equal(clean.y_train[~flipped], data.y_train[~flipped])
  assert np.array_equal(clean.y_test, data.y_test)
  assert np.array_equal(mnist1d.make_data(0.2)[0].y_train, data.y_train)


def test_matched_trace_interpolates_at_the_first_crossing():
  losses = np.array([2.0, 1.0, 0.5, 0.8])
  traces = np.array([1.0, 3.0, 5.0, 7.0])
  assert mnist1d.matched_trace(losses, traces, 2.0) == 1.0
  np.testing.assert_allclose(
    mnist1d.matched_trace(losses, traces, np.sqrt(0.5)), 4.0, rtol=1e-12
  )
  assert mnist1d.matched_trace(losses, traces, 0.1) is None


def test_tiny_run_writes_valid_results(tmp_path):
  out = tmp_path / "mnist1d"
  argv = [
    "experiment",
    "mnist1d",
    "--models=mlp",
    "--methods=nso",
    "--noise-levels=0.2",
    "--sigmas=0.05",
    "--seeds=1",
    "--epochs=1",
    "--track-points=1",
    "--train-examples=100",
    "--batch-size=50",
    "--track-samples=32",
    "--track-matvecs=2",
    "--hessian-samples=32",
    "--hessian-matvecs=2",
    "--lanczos-steps=2",
    "--no-plots",
    "--no-progress",
    f"--out={out}",
  ]
  assert cli.main(argv) == 0
  text = (out / "results.json").read_text()
  results = json.loads(text, parse_constant=lambda name: pytest.fail(name))
  assert results["experiment"] == "mnist1d"
  assert results["data"]["args"] == mnist1d.DATA_ARGS
  assert results["data"]["flipped_examples"] == {"0.2": 20}
  assert results["compute"]["nso"]["gradient_evaluations"] == 4
  (config,) = results["configs"]
  rows = {row["method"]: row for row in config["rows"]}
  assert list(rows) == ["nso-0.05"]
  assert rows["nso-0.05"]["epochs"] == 1
  level = config["matched_loss"]["level"]
  for row in rows.values():
    assert row["total_gradient_evaluations"] == 4
    for metric in ("final_test_accuracy", "hessian_trace", "top_eigenvalue"):
      assert np.isfinite(row["per_seed"][metric]).all(), metric
    assert min(row["curves"]["track_train_loss"][0]) <= level + 1e-6
  traces = config["matched_loss"]["traces"]["nso-0.05"]
  assert traces["reached"] == 1 and np.isfinite(traces["per_seed"]).all()
  assert config["best_fixed_sigma"] == 0.05
  assert (out / "results.md").read_text().startswith("# mnist1d")


@pytest.mark.fault("clear")
@pytest.mark.parametrize(
  ("argv", "flag"),
  [
    (["--train-examples=100", "--batch-size=200"], "--batch-size"),
    (["--epochs=2", "--track-points=3"], "--track-points"),
  ],
)
def test_settings_that_do_not_fit_are_refused(tmp_path, capsys, argv, flag):
  out = tmp_path / "o"
  status = cli.main(["experiment", "mnist1d", *argv, "--no-progress", f"--out={out}"])
  assert status == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"nso-jax: error: {flag} ") and "\n" not in err
  assert not out.exists()
