"""Checkpoint faults at save time and typed keys at restore time.

Races, symbolic links, bad parent folders and states Orbax cannot save each
raise a clear error naming the path or the leaves, write nothing and print
nothing; abstract targets and typed keys restore exactly.
"""

import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nso_jax import training
from nso_jax._src import checkpoints as checkpoints_impl


def _state(offset=0.0):
  return {"w": jnp.arange(4.0) + offset, "key": jax.random.key(3)}


def _assert_restores(folder, expected, target=None):
  restored = training.restore_checkpoint(folder, target or _state(9.0))
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  np.testing.assert_array_equal(restored["w"], expected["w"])
  assert restored["key"].dtype == expected["key"].dtype
  np.testing.assert_array_equal(
    jax.random.key_data(restored["key"]), jax.random.key_data(expected["key"])
  )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  folder = tmp_path_factory.mktemp("pristine") / "checkpoint"
  training.save_checkpoint(folder, _state())
  return folder


def _winner_appears_midway(monkeypatch, pristine, path):
  """Another process's save lands at ``path`` while this one is writing."""
  real = checkpoints_impl._fsync_tree

  def fsync_then_lose(folder):
    real(folder)
    shutil.copytree(pristine, path)

  monkeypatch.setattr(checkpoints_impl, "_fsync_tree", fsync_then_lose)


@pytest.mark.fault("clear")
def test_a_save_that_loses_a_race_raises_and_keeps_the_winner(
  pristine, tmp_path, monkeypatch
):
  path = tmp_path / "checkpoint"
  _winner_appears_midway(monkeypatch, pristine, path)
  with pytest.raises(FileExistsError, match="created by another save") as error:
    training.save_checkpoint(path, _state(1.0))
  monkeypatch.undo()
  assert repr(str(path)) in str(error.value)
  assert os.listdir(tmp_path) == ["checkpoint"]
  _assert_restores(path, _state())


@pytest.mark.fault("correct")
def test_an_overwrite_that_meets_a_racing_save_replaces_it(
  pristine, tmp_path, monkeypatch
):
  path = tmp_path / "checkpoint"
  _winner_appears_midway(monkeypatch, pristine, path)
  training.save_checkpoint(path, _state(1.0), overwrite=True)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["checkpoint"]
  _assert_restores(path, _state(1.0))


@pytest.mark.fault("clear")
def test_a_manager_save_that_loses_a_race_raises_and_keeps_the_winner(
  pristine, tmp_path, monkeypatch
):
  manager = training.CheckpointManager(tmp_path / "run", max_to_keep=1)
  _winner_appears_midway(monkeypatch, pristine, manager.step_directory(3))
  with pytest.raises(FileExistsError, match=r"run/3' was created by another"):
    manager.save(3, _state(1.0))
  monkeypatch.undo()
  assert manager.all_steps() == [3]
  assert os.listdir(tmp_path / "run") == ["3"]
  _assert_restores(manager.step_directory(3), _state())


@pytest.mark.fault("correct")
def test_overwrite_through_a_link_replaces_its_folder_and_keeps_the_link(
  pristine, tmp_path
):
  real = shutil.copytree(pristine, tmp_path / "real")
  link = tmp_path / "latest"
  link.symlink_to(real)
  training.save_checkpoint(link, _state(1.0), overwrite=True)
  assert link.is_symlink() and os.readlink(link) == str(real)
  assert sorted(os.listdir(tmp_path)) == ["latest", "real"]
  _assert_restores(link, _state(1.0))


@pytest.mark.fault("clear")
def test_overwrite_through_a_link_to_nothing_refuses(tmp_path):
  link = tmp_path / "latest"
  link.symlink_to(tmp_path / "absent")
  with pytest.raises(ValueError, match=r"`directory` .*latest' is a link to .*absent"):
    training.save_checkpoint(link, _state(), overwrite=True)
  assert link.is_symlink() and os.listdir(tmp_path) == ["latest"]


@pytest.mark.fault("clear")
def test_a_parent_that_is_a_file_is_named(tmp_path):
  (tmp_path / "notes").write_text("keep me")
  path = tmp_path / "notes" / "run" / "checkpoint"
  with pytest.raises(ValueError, match=r"`directory` .*checkpoint' cannot be created"):
    training.save_checkpoint(path, _state())
  assert (tmp_path / "notes").read_text() == "keep me"
  assert os.listdir(tmp_path) == ["notes"]


@pytest.mark.fault("clear")
def test_an_empty_state_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"`state` holds no arrays to save \(got \{\}"):
    training.save_checkpoint(tmp_path / "checkpoint", {})
  assert os.listdir(tmp_path) == []


@pytest.mark.fault("clear")
def test_a_single_array_state_is_refused(tmp_path):
  with pytest.raises(TypeError, match=r"`state` must be a pytree .* single Array"):
    training.save_checkpoint(tmp_path / "checkpoint", jnp.ones(2))
  assert os.listdir(tmp_path) == []


@pytest.mark.fault("clear")
@pytest.mark.parametrize("bad", ["sgd", np.array(["a", "b"])], ids=["str", "numpy-str"])
def test_a_leaf_orbax_cannot_save_is_named_and_leaves_nothing(tmp_path, capfd, bad):
  capfd.readouterr()
  with pytest.raises(TypeError, match=r"`state` holds a leaf .*: config\.name \(a "):
    training.save_checkpoint(
      tmp_path / "checkpoint", {"w": jnp.ones(2), "config": {"name": bad}}
    )
  assert os.listdir(tmp_path) == []
  assert capfd.readouterr().err == ""


@pytest.mark.fault("correct")
def test_an_abstract_target_restores_typed_keys_exactly(pristine):
  abstract = jax.eval_shape(lambda: _state())
  assert isinstance(abstract["key"], jax.ShapeDtypeStruct)
  _assert_restores(pristine, _state(), target=abstract)


@pytest.mark.fault("clear")
def test_a_legacy_uint32_key_in_target_is_refused(pristine):
  target = {"w": jnp.zeros(4), "key": jax.random.PRNGKey(3)}
  with pytest.raises(ValueError, match=r"key is a typed PRNG key saved \(key<fry>"):
    training.restore_checkpoint(pristine, target)


@pytest.mark.fault("correct")
def test_raw_key_data_saved_is_wrapped_for_a_typed_target_with_a_warning(tmp_path):
  raw = {"w": jnp.arange(4.0), "key": jax.random.key_data(jax.random.key(3))}
  training.save_checkpoint(tmp_path / "checkpoint", raw)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _assert_restores(tmp_path / "checkpoint", _state())
  assert ["key was saved as raw uint32 key data" in str(w.message) for w in caught] == [
    True
  ]
