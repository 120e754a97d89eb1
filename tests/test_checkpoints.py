"""Checkpoint faults: damaged files, bad folders, mismatched targets, failed saves.

Every restore of a damaged checkpoint must either raise an error that names
the damaged file, or give back the saved values bit for bit; it must print
nothing to stderr. A save that fails must leave the previous checkpoint intact.
"""

import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from nso_jax import training
from nso_jax._src import checkpoints as checkpoints_impl

EARLIER = "Restore from an earlier checkpoint"


def _state(offset=0.0):
  # "big" holds more than Orbax stores inline (1 KiB), so the checkpoint has
  # array data files of its own as well as the inline values in d/.
  return {
    "big": jnp.arange(1024.0).reshape(32, 32) + offset,
    "small": {"bias": jnp.ones(3) + offset, "step": jnp.array(7, jnp.int32)},
    "key": jax.random.key(3),
    "pair": (jnp.zeros(2, jnp.bfloat16) + offset, jnp.arange(4, dtype=jnp.uint8)),
  }


def _as_bits(tree):
  def bits(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)

  return jax.tree.map(bits, tree)


def _assert_bitwise_equal(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(
    jax.tree.leaves(_as_bits(restored)),
    jax.tree.leaves(_as_bits(expected)),
    strict=True,
  ):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def _files(folder):
  return sorted(
    os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
    for root, _, names in os.walk(folder)
    for name in names
  )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  folder = tmp_path_factory.mktemp("pristine") / "checkpoint"
  training.save_checkpoint(folder, _state())
  return folder


@pytest.fixture
def copy(pristine, tmp_path):
  def make(name="checkpoint"):
    return shutil.copytree(pristine, tmp_path / name)

  return make


def test_a_saved_checkpoint_lists_its_files_and_restores_bitwise(pristine):
  files = _files(pristine)
  for expected in ("_METADATA", "manifest.ocdbt", "nso_jax_files.json"):
    assert expected in files
  assert any(file.startswith("d/") for file in files)
  assert any(file.startswith("ocdbt.process_0/d/") for file in files)
  with open(pristine / "nso_jax_files.json") as stream:
    listed = set(json.load(stream)["files"])
  assert listed == set(files) - {"nso_jax_files.json"}
  assert not [p for p in os.listdir(pristine.parent) if p != "checkpoint"]
  _assert_bitwise_equal(training.restore_checkpoint(pristine, _state(5.0)), _state())


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_each_damaged_file_is_named_or_harmless(pristine, tmp_path, capfd, damage):
  files = _files(pristine)
  assert len(files) >= 10
  outcomes = {}
  for index, file in enumerate(files):
    folder = shutil.copytree(pristine, tmp_path / f"case{index}")
    path = folder / file
    if damage == "delete":
      path.unlink()
    else:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capfd.readouterr()
    try:
      restored = training.restore_checkpoint(folder, _state(1.0))
    except ValueError as error:
      message = str(error)
      assert f"is damaged: its file '{file}' is " in message, (file, message)
      assert EARLIER in message, message
      assert str(folder) in message, message
      outcomes[file] = "named"
    else:
      # Only the list of files itself may go missing: Orbax's own files are
      # then checked for, and all of them are intact.
      assert (damage, file) == ("delete", "nso_jax_files.json"), file
      _assert_bitwise_equal(restored, _state())
      outcomes[file] = "bitwise"
    assert capfd.readouterr().err == "", file
  assert list(outcomes.values()).count("named") == len(files) - (damage == "delete")


def test_damage_is_found_by_checksum_when_the_size_is_unchanged(copy):
  folder = copy()
  path = folder / "manifest.ocdbt"
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"'manifest\.ocdbt' is corrupt \(its checksum"):
    training.restore_checkpoint(folder, _state())


@pytest.mark.parametrize(
  ("damage", "file", "expected"),
  [
    ("delete", "_METADATA", r"incomplete: '_METADATA' is missing or empty"),
    ("delete", "manifest.ocdbt", r"incomplete: 'manifest.ocdbt' is missing"),
    ("delete", "d", r"incomplete: 'd/' is missing or empty"),
    ("truncate", "_METADATA", r"its file '_METADATA' is truncated or corrupt"),
    (
      "truncate",
      "array_metadatas/process_0",
      r"its file 'array_metadatas/process_0' is truncated or corrupt",
    ),
  ],
)
def test_a_checkpoint_without_its_file_list_is_checked_for_orbax_files(
  copy, capfd, damage, file, expected
):
  folder = copy()
  (folder / "nso_jax_files.json").unlink()
  path = folder / file
  if damage == "truncate":
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  elif path.is_dir():
    shutil.rmtree(path)
  else:
    path.unlink()
  capfd.readouterr()
  with pytest.raises(ValueError, match=expected) as error:
    training.restore_checkpoint(folder, _state())
  assert EARLIER in str(error.value)
  assert capfd.readouterr().err == ""


def test_restore_from_a_missing_folder(tmp_path, capfd):
  with pytest.raises(FileNotFoundError, match="holds no checkpoint: it does not") as e:
    training.restore_checkpoint(tmp_path / "absent", _state())
  assert "Check the path" in str(e.value)
  assert capfd.readouterr().err == ""


def test_a_missing_folder_points_to_an_unfinished_save(tmp_path):
  leftover = tmp_path / "checkpoint.nso-saving-0a1b2c3d.orbax-checkpoint-tmp"
  leftover.mkdir()
  with pytest.raises(FileNotFoundError, match="A save to it did not finish") as e:
    training.restore_checkpoint(tmp_path / "checkpoint", _state())
  assert repr(str(leftover)) in str(e.value)


def test_restore_from_an_empty_folder(tmp_path, capfd):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"is empty: it holds no checkpoint\. Restore"):
    training.restore_checkpoint(tmp_path / "empty", _state())
  assert capfd.readouterr().err == ""


def test_restore_from_a_file(tmp_path):
  (tmp_path / "file").write_text("not a checkpoint")
  with pytest.raises(ValueError, match="is a file, not a checkpoint folder"):
    training.restore_checkpoint(tmp_path / "file", _state())


def test_restore_from_a_folder_of_other_files(tmp_path):
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match=r"'_METADATA', 'manifest\.ocdbt', 'd/' are"):
    training.restore_checkpoint(tmp_path / "other", _state())


@pytest.mark.parametrize("suffix", [".orbax-checkpoint-tmp", ".nso-saving-0a1b2c3d"])
def test_restore_from_an_unfinished_save(copy, suffix):
  folder = copy("checkpoint" + suffix)
  with pytest.raises(ValueError, match="is a save that did not finish"):
    training.restore_checkpoint(folder, _state())


def test_a_missing_folder_points_to_the_checkpoint_an_interrupted_overwrite_kept(
  copy,
):
  previous = copy("checkpoint.nso-previous-0a1b2c3d")
  with pytest.raises(FileNotFoundError, match="previous checkpoint is complete") as e:
    training.restore_checkpoint(previous.parent / "checkpoint", _state())
  assert repr(str(previous)) in str(e.value)
  _assert_bitwise_equal(training.restore_checkpoint(previous, _state()), _state())


@pytest.mark.parametrize(
  ("target", "expected"),
  [
    (
      {**_state(), "extra": jnp.ones(2)},
      r"1 array\(s\) of `target` not in the checkpoint \(extra\)",
    ),
    (
      {key: value for key, value in _state().items() if key != "key"},
      r"1 saved array\(s\) not in `target` \(key\)",
    ),
    (
      {**_state(), "big": jnp.zeros((32, 31))},
      r"big has shape \(32, 32\) saved, \(32, 31\) in `target`",
    ),
    (
      {**_state(), "pair": (jnp.zeros(2), jnp.arange(4, dtype=jnp.uint8))},
      r"pair.0 has dtype bfloat16 saved, float32 in `target`",
    ),
    ([jnp.ones(2)], r"6 saved array\(s\) not in `target`.*1 array\(s\) of `target`"),
  ],
)
def test_restore_into_a_mismatched_target(pristine, capfd, target, expected):
  capfd.readouterr()
  with pytest.raises(ValueError, match="does not match `target`: " + expected):
    training.restore_checkpoint(pristine, target)
  assert capfd.readouterr().err == ""


def test_restore_into_a_different_model(tmp_path, capfd):
  def state(features):
    model = nn.Dense(features)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    return training.TrainState.create(
      apply_fn=model.apply, params=params, tx=optax.sgd(0.1)
    )

  training.save_checkpoint(tmp_path / "ckpt", state(4))
  capfd.readouterr()
  with pytest.raises(ValueError, match=r"params.bias has shape \(4,\) saved, \(5,\)"):
    training.restore_checkpoint(tmp_path / "ckpt", state(5))
  assert capfd.readouterr().err == ""


def test_save_into_an_existing_folder_refuses_and_keeps_it(copy):
  folder = copy()
  with pytest.raises(FileExistsError, match=r"already exists.*overwrite=True"):
    training.save_checkpoint(folder, _state(1.0))
  _assert_bitwise_equal(training.restore_checkpoint(folder, _state()), _state())


def test_overwrite_replaces_a_checkpoint_and_leaves_nothing_behind(copy):
  folder = copy()
  training.save_checkpoint(folder, _state(1.0), overwrite=True)
  _assert_bitwise_equal(training.restore_checkpoint(folder, _state()), _state(1.0))
  assert os.listdir(folder.parent) == ["checkpoint"]


def test_overwrite_refuses_a_folder_that_is_no_checkpoint(tmp_path):
  (tmp_path / "work").mkdir()
  (tmp_path / "work" / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="holds no checkpoint; overwrite=True only"):
    training.save_checkpoint(tmp_path / "work", _state(), overwrite=True)
  assert (tmp_path / "work" / "notes.txt").read_text() == "keep me"


def test_save_checks_overwrite(tmp_path):
  with pytest.raises(ValueError, match="`overwrite` must be True or False"):
    training.save_checkpoint(tmp_path / "ckpt", _state(), overwrite="yes")


def _fail_after_writing(monkeypatch):
  """Makes Orbax's save write its files and then fail, as a full disk would."""
  real_save = ocp.StandardCheckpointer.save

  def save_then_fail(self, directory, *args, **kwargs):
    real_save(self, directory, *args, **kwargs)
    self.wait_until_finished()
    assert os.listdir(directory)
    raise OSError("No space left on device")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_then_fail)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_save_that_fails_while_orbax_writes_leaves_nothing_behind(
  copy, monkeypatch, overwrite
):
  previous = copy()

  def write_part_then_fail(self, directory, *args, **kwargs):
    partial = f"{directory}.orbax-checkpoint-tmp"
    os.makedirs(os.path.join(partial, "d"))
    with open(os.path.join(partial, "d", "0123"), "wb") as stream:
      stream.write(b"partial")
    raise OSError("No space left on device")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", write_part_then_fail)
  target = previous if overwrite else previous.parent / "next"
  with pytest.raises(OSError, match="No space left"):
    training.save_checkpoint(target, _state(1.0), overwrite=overwrite)
  monkeypatch.undo()
  assert os.listdir(previous.parent) == ["checkpoint"]
  _assert_bitwise_equal(training.restore_checkpoint(previous, _state()), _state())


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(
  copy, monkeypatch, overwrite
):
  previous = copy()
  _fail_after_writing(monkeypatch)
  target = previous if overwrite else previous.parent / "next"
  with pytest.raises(OSError, match="No space left"):
    training.save_checkpoint(target, _state(1.0), overwrite=overwrite)
  monkeypatch.undo()
  assert os.listdir(previous.parent) == ["checkpoint"]
  _assert_bitwise_equal(training.restore_checkpoint(previous, _state()), _state())


def test_a_save_that_fails_while_listing_its_files_keeps_the_previous(
  copy, monkeypatch
):
  previous = copy()

  def fail(path):
    raise OSError("Input/output error")

  monkeypatch.setattr(checkpoints_impl, "_crc32", fail)
  with pytest.raises(OSError, match="Input/output error"):
    training.save_checkpoint(previous, _state(1.0), overwrite=True)
  monkeypatch.undo()
  assert os.listdir(previous.parent) == ["checkpoint"]
  _assert_bitwise_equal(training.restore_checkpoint(previous, _state()), _state())


def test_an_overwrite_that_fails_to_rename_puts_the_previous_back(copy, monkeypatch):
  previous = copy()
  real_rename = os.rename

  def rename(source, destination):
    if checkpoints_impl._SAVING_SUFFIX in os.fspath(source):
      raise OSError("Device or resource busy")
    real_rename(source, destination)

  monkeypatch.setattr(checkpoints_impl.os, "rename", rename)
  with pytest.raises(OSError, match="resource busy"):
    training.save_checkpoint(previous, _state(1.0), overwrite=True)
  monkeypatch.undo()
  assert os.listdir(previous.parent) == ["checkpoint"]
  _assert_bitwise_equal(training.restore_checkpoint(previous, _state()), _state())


def test_orbax_logging_is_silenced_and_restored(copy, caplog, capfd):
  absl_logger = logging.getLogger("absl")
  caplog.set_level(logging.INFO, logger="absl")
  folder = copy()
  training.save_checkpoint(folder, _state(1.0), overwrite=True)
  training.restore_checkpoint(folder, _state())
  (folder / "manifest.ocdbt").unlink()
  with pytest.raises(ValueError, match=r"'manifest\.ocdbt' is missing"):
    training.restore_checkpoint(folder, _state())
  assert not [record for record in caplog.records if record.name == "absl"]
  assert capfd.readouterr().err == ""
  assert absl_logger.level == logging.INFO


def _nso_problem():
  """A tiny NSO run: (params, opt_state) and a jitted step."""
  import nso_jax

  x = jax.random.normal(jax.random.key(1), (16, 3))
  y = jnp.sin(x.sum(axis=1))
  tx = nso_jax.nso(optax.adam(1e-2), sigma=0.05, num_perturbations=2, key=4)
  params = {"w": jnp.zeros(3), "b": jnp.zeros([])}

  def loss(p):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  @jax.jit
  def step(state):
    grad_fn = jax.grad(loss)
    updates, opt_state = tx.update(
      None, state["opt_state"], state["params"], grad_fn=grad_fn
    )
    return {
      "params": optax.apply_updates(state["params"], updates),
      "opt_state": opt_state,
    }

  return {"params": params, "opt_state": tx.init(params)}, step


def test_manager_keeps_the_last_n_and_resumes_from_the_latest(tmp_path):
  start, step = _nso_problem()
  straight = start
  for _ in range(5):
    straight = step(straight)
  manager = training.CheckpointManager(tmp_path / "run", max_to_keep=2)
  assert manager.all_steps() == [] and manager.latest_step() is None
  state = start
  for n in range(1, 4):
    state = step(state)
    manager.save(n, state)
  # Keep-2 deleted step 1; only the step folders are left.
  assert manager.all_steps() == [2, 3] and manager.latest_step() == 3
  assert sorted(os.listdir(tmp_path / "run")) == ["2", "3"]
  # A fresh process would start from the latest step, into a fresh target.
  resumed = training.CheckpointManager(tmp_path / "run").restore(start)
  for _ in range(2):
    resumed = step(resumed)
  _assert_bitwise_equal(resumed, straight)
  _assert_bitwise_equal(manager.restore(start, step=2), step(step(start)))


def test_manager_refuses_bad_input(tmp_path):
  with pytest.raises(ValueError, match="`max_to_keep` must be at least 1"):
    training.CheckpointManager(tmp_path, max_to_keep=0)
  with pytest.raises(TypeError, match="`max_to_keep` must be a positive int"):
    training.CheckpointManager(tmp_path, max_to_keep=2.0)
  manager = training.CheckpointManager(tmp_path / "run")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint of any step"):
    manager.restore({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="`step` must be a non-negative integer"):
    manager.save(-1, {"w": jnp.zeros(2)})
  with pytest.raises(TypeError, match="`step` must be a non-negative integer"):
    manager.save(1.5, {"w": jnp.zeros(2)})
  manager.save(jnp.int32(4), {"w": jnp.zeros(2)})
  with pytest.raises(FileExistsError):
    manager.save(4, {"w": jnp.ones(2)})
  manager.save(4, {"w": jnp.ones(2)}, overwrite=True)
  with pytest.raises(FileNotFoundError, match=r"steps saved are \[4\]"):
    manager.restore({"w": jnp.zeros(2)}, step=3)
  # A save cut short leaves a temporary folder, never a step.
  os.makedirs(tmp_path / "run" / "5.nso-saving-0a1b2c3d")
  assert manager.all_steps() == [4]
