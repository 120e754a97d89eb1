"""One settings system: limits stated once, the same checks for every command."""

import ast
import dataclasses
import pathlib

import pytest

import nso_jax
from nso_jax.app import cli
from nso_jax.app import experiments
from nso_jax.app import job
from nso_jax.app import settings


def _settings_types():
  return [job.Config, *(e.settings for e in experiments.EXPERIMENTS.values())]


def test_every_field_has_a_spec_and_a_flag():
  for settings_type in _settings_types():
    flags = settings.flags(settings_type)
    for field in dataclasses.fields(settings_type):
      spec = settings.spec_of(field)
      assert spec.help, (settings_type, field.name)
      assert flags[field.name].startswith("--"), (settings_type, field.name)


def test_shared_fields_share_their_rules():
  for settings_type in _settings_types():
    for field in dataclasses.fields(settings_type):
      if field.name in settings.SPECS:
        rule = settings.spec_of(field).rule
        assert rule == settings.SPECS[field.name].rule, (settings_type, field.name)


@pytest.mark.parametrize(
  "argv",
  [
    ["train"],
    ["experiment", "finetune"],
    ["experiment", "label-noise"],
    ["experiment", "k-sweep"],
  ],
)
def test_the_same_bound_gives_the_same_message_in_every_command(tmp_path, capsys, argv):
  assert cli.main([*argv, "--epochs=10001", f"--out={tmp_path / 'o'}"]) == 2
  assert capsys.readouterr().err == (
    "nso-jax: error: --epochs must be at most 10,000 (250 times the default; "
    "at the default size that is hours of training), got 10001.\n"
  )


def test_help_states_each_bound(capsys):
  with pytest.raises(SystemExit):
    cli.main(["experiment", "matrix-sensing", "--help"])
  usage = " ".join(capsys.readouterr().out.split())
  assert "measurements m; at most 10,000,000" in usage
  assert "each a finite float > 0" in usage


def test_settings_are_frozen_and_checked_on_replace():
  config = job.Config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.epochs = 3  # type: ignore[misc]
  with pytest.raises(settings.SettingError, match=r"^`seeds` must be an int >= 1"):
    dataclasses.replace(config, seeds=0)


def test_no_experiment_imports_another():
  package = pathlib.Path(nso_jax.__file__).parent / "app" / "experiments"
  experiment_modules = {
    f"nso_jax.app.experiments.{path.stem}"
    for path in package.glob("*.py")
    if path.stem not in ("__init__", "classify")
  }
  for path in package.glob("*.py"):
    if path.stem == "__init__":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom):
        names = {f"{node.module}.{alias.name}" for alias in node.names}
        names.add(str(node.module))
        assert not names & experiment_modules, f"{path} imports {names}"
