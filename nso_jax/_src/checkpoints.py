"""Orbax checkpoints that are saved atomically and verified when restored.

Checkpoints are written with Orbax into a temporary folder that is renamed into
place only when complete, with a list of the files' sizes and checksums;
restoring verifies that list and ``target``'s structure before reading any
array, so a damaged checkpoint or a mismatched target raises an error that
names the file or the arrays concerned.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import numbers
import operator
import os
import re
import shutil
import threading
import uuid
import warnings
import zlib
from collections.abc import Iterator
from typing import Any
from typing import NoReturn

import jax
import numpy as np

from nso_jax._src import checks

# Orbax writes a checkpoint into "<name>.orbax-checkpoint-tmp" and renames it to
# "<name>" once complete. save_checkpoint has it write "<name>.nso-saving-<id>",
# adds the list of files it wrote, and renames the folder into place, moving an
# overwritten checkpoint aside to "<name>.nso-previous-<id>" meanwhile.
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_SAVING_SUFFIX = ".nso-saving-"
_PREVIOUS_SUFFIX = ".nso-previous-"
# Every file of the checkpoint with its size and CRC-32, as written.
_FILE_LIST = "nso_jax_files.json"
# Without a file list (a checkpoint written by an earlier nso_jax), restoring
# checks for what Orbax reads: the saved tree, the index of the array store,
# the array data, and the per-process array metadata.
_TREE_FILE = "_METADATA"
_REQUIRED_FILES = (_TREE_FILE, "manifest.ocdbt")
_DATA_FOLDER = "d"
_ARRAY_METADATA_FOLDER = "array_metadatas"
_LOCAL_FILE = re.compile(r'local file "([^"]*[^/"])"')
_EARLIER = "Restore from an earlier checkpoint; this one cannot be read."


class _LoggerSilencer:
  """A re-entrant, thread-safe context that silences one Python logger."""

  def __init__(self, name: str):
    self._logger = logging.getLogger(name)
    self._lock = threading.Lock()
    self._depth = 0
    self._level = logging.NOTSET

  @contextlib.contextmanager
  def __call__(self) -> Iterator[None]:
    with self._lock:
      if self._depth == 0:
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL + 1)
      self._depth += 1
    try:
      yield
    finally:
      with self._lock:
        self._depth -= 1
        if self._depth == 0:
          self._logger.setLevel(self._level)


# Orbax logs through absl, whose Python logger is named "absl".
_quiet_orbax = _LoggerSilencer("absl")


def _remove_tree(path: str) -> None:
  shutil.rmtree(path, ignore_errors=True)


def _crc32(path: str) -> int:
  checksum = 0
  with open(path, "rb") as stream:
    while chunk := stream.read(1 << 20):
      checksum = zlib.crc32(chunk, checksum)
  return checksum


def _write_file_list(folder: str) -> None:
  """Records the size and CRC-32 of every file under ``folder``."""
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      full = os.path.join(root, name)
      relative = os.path.relpath(full, folder).replace(os.sep, "/")
      files[relative] = {"size": os.path.getsize(full), "crc32": _crc32(full)}
  with open(os.path.join(folder, _FILE_LIST), "w", encoding="utf-8") as stream:
    json.dump({"files": files}, stream, indent=1, sort_keys=True)
    stream.flush()
    os.fsync(stream.fileno())


def _looks_like_checkpoint(path: str) -> bool:
  return os.path.isdir(path) and any(
    os.path.exists(os.path.join(path, name))
    for name in (_FILE_LIST, *_REQUIRED_FILES, "_CHECKPOINT_METADATA")
  )


def _fsync(path: str) -> None:
  """Flushes a file or a folder's entries to the disk."""
  descriptor = os.open(path, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def _fsync_tree(folder: str) -> None:
  """Flushes every file under ``folder``, then the folders themselves."""
  for root, _, files in os.walk(folder):
    for name in files:
      _fsync(os.path.join(root, name))
    _fsync(root)


def _swap_in(new: str, path: str) -> None:
  """Renames ``new`` to ``path``, deleting the old ``path`` only afterwards.

  The old checkpoint is deleted only once the rename is on the disk, so a
  power cut leaves one complete checkpoint at ``path`` or beside it.
  """
  previous = f"{path}{_PREVIOUS_SUFFIX}{uuid.uuid4().hex[:8]}"
  os.rename(path, previous)
  try:
    os.rename(new, path)
  except BaseException:
    os.rename(previous, path)
    raise
  _fsync(os.path.dirname(path))
  _remove_tree(previous)


# What Orbax's StandardCheckpointer saves (its STANDARD_ARRAY_TYPES); anything
# else with ``__array__`` is converted to a NumPy array first, as Orbax does.
_SAVABLE = (int, float, np.ndarray, jax.Array)
# NumPy dtypes that convert to an array but that the array store cannot hold.
_UNSAVABLE_KINDS = "OUSV"


def _unsavable(leaf: Any) -> bool:
  if not isinstance(leaf, (np.ndarray, jax.Array)) and hasattr(leaf, "__array__"):
    try:
      leaf = np.asarray(leaf)
    except Exception:  # Any failure to convert means it cannot be saved.
      return True
  if isinstance(leaf, np.ndarray) and leaf.dtype.kind in _UNSAVABLE_KINDS:
    return True
  return not isinstance(leaf, _SAVABLE) or isinstance(leaf, complex)


def _check_state(state: Any) -> None:
  """Raises a clear error for a ``state`` that Orbax would refuse to save."""
  if isinstance(state, (jax.Array, np.ndarray, numbers.Number)):
    raise TypeError(
      f"`state` must be a pytree of arrays (a dict, a TrainState, ...), got a "
      f"single {type(state).__name__}: wrap it, e.g. {{'w': array}}."
    )
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  if not leaves:
    raise ValueError(
      f"`state` holds no arrays to save (got {state!r:.80}): pass a pytree with "
      "at least one array, e.g. a TrainState or {'w': array}."
    )
  bad = [
    f"{_leaf_name(path)} (a {type(leaf).__name__}: {leaf!r:.40})"
    for path, leaf in leaves
    if _unsavable(leaf)
  ]
  if bad:
    count = "a leaf" if len(bad) == 1 else f"{len(bad)} leaves"
    raise TypeError(
      f"`state` holds {count} that a checkpoint cannot hold: "
      f"{_listing(bad)}. Expected arrays or Python ints and floats; keep "
      "strings and other settings out of the state (e.g. in a JSON file "
      "beside the checkpoint, or as static fields)."
    )


def _followed(path: str) -> str:
  """The checkpoint folder that ``overwrite=True`` replaces at ``path``.

  A symbolic link is followed: the folder it points to is replaced and the
  link kept. Raises a ValueError, touching nothing, unless that folder holds
  a checkpoint.
  """
  real = os.path.realpath(path) if os.path.islink(path) else path
  if not _looks_like_checkpoint(real):
    what = (
      f"is a link to {real!r}, which holds no checkpoint"
      if real != path
      else "exists but holds no checkpoint"
    )
    raise ValueError(
      f"`directory` {path!r} {what}; overwrite=True only replaces a "
      "checkpoint, so it was left untouched. Pass another folder."
    )
  return real


def _make_parent(path: str, directory: str) -> None:
  """Creates ``path``'s parent folders, or names the file that is in the way."""
  ancestor = os.path.dirname(path)
  while not os.path.lexists(ancestor) and os.path.dirname(ancestor) != ancestor:
    ancestor = os.path.dirname(ancestor)
  if os.path.lexists(ancestor) and not os.path.isdir(ancestor):
    what = "a link to nothing" if os.path.islink(ancestor) else "a file"
    raise ValueError(
      f"`directory` {directory!r} cannot be created: {ancestor!r} is {what}, "
      "not a folder. Pass a path whose parent folders are folders."
    )
  os.makedirs(os.path.dirname(path), exist_ok=True)


def _rename_new(temporary: str, path: str, overwrite: bool) -> None:
  """Renames a complete save to the new ``path``; another save may beat it."""
  try:
    os.rename(temporary, path)
  except OSError as error:
    taken = error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR)
    if not (taken and os.path.lexists(path)):
      raise
    if overwrite and _looks_like_checkpoint(path):
      _swap_in(temporary, path)
      return
    raise FileExistsError(
      f"`directory` {path!r} was created by another save (or process) while "
      "this one was writing; what is there was left as it is and this save "
      "was discarded. Save each process's checkpoint to its own folder, or "
      "pass overwrite=True to replace a checkpoint."
    ) from None
  _fsync(os.path.dirname(path))


def save_checkpoint(
  directory: str | os.PathLike[str], state: Any, *, overwrite: bool = False
) -> None:
  """Saves a pytree of arrays (a train state, typed PRNG keys included).

  The save never leaves a partial checkpoint at ``directory`` and never
  destroys the last good one, a power cut included (files and folders are
  flushed to the disk before each rename). It is written by one process: the
  temporary folder's name is drawn per process, so multi-host saves need
  Orbax's own multi-process checkpointing. Orbax writes the checkpoint into a temporary
  folder beside ``directory`` (``<name>.nso-saving-<id>``), a list of its files
  with their sizes and checksums is added (``nso_jax_files.json``, which
  :func:`restore_checkpoint` verifies), and only then is the folder renamed to
  ``directory``. If the save fails, the temporary folder is removed and
  ``directory`` is as it was. With ``overwrite=True`` the old checkpoint is
  moved aside (``<name>.nso-previous-<id>``) once the new one is complete, the
  new one is renamed into place, and only then is the old one deleted. If
  ``directory`` is a symbolic link, the checkpoint folder it points to is
  replaced and the link kept. A process killed during a save can leave such a
  folder behind; :func:`restore_checkpoint` points to it when ``directory``
  is missing. Renames are atomic on local file systems, which this function
  is meant for. If another process creates ``directory`` while this save
  writes, the other's checkpoint is kept and this save raises
  ``FileExistsError`` (with ``overwrite=True``, it replaces a checkpoint
  there). ``state`` is checked before anything is written, so a state Orbax
  cannot save raises an error naming its leaves and leaves no folder behind.
  Orbax's log messages are silenced during the save.

  Args:
    directory: the folder to write; it must not exist yet, unless
      ``overwrite``. Missing parent folders are created.
    state: any pytree of arrays and Python ints and floats, with at least one
      leaf, e.g. a :class:`TrainState` (its ``apply_fn`` and ``tx`` are static
      and not saved) or ``nnx.state(optimizer)``.
    overwrite: replace the checkpoint at ``directory``, once the new one is
      complete.

  Raises:
    FileExistsError: if ``directory`` exists and ``overwrite`` is False, or
      another process created it during the save (its content is kept).
    TypeError: if ``state`` is a single array, or has leaves a checkpoint
      cannot hold (strings, objects); the message names them.
    ValueError: if ``state`` has no leaves; if a parent of ``directory`` is a
      file; or if ``overwrite`` is True and ``directory`` exists (or a link
      there points to a folder that) is not a checkpoint (it is left
      untouched).

  Example:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> from nso_jax import training
    >>> workdir = tempfile.TemporaryDirectory()
    >>> folder = os.path.join(workdir.name, "checkpoint")
    >>> training.save_checkpoint(folder, {"w": jnp.zeros(3)})
    >>> training.save_checkpoint(folder, {"w": jnp.ones(3)}, overwrite=True)
    >>> training.restore_checkpoint(folder, {"w": jnp.zeros(3)})
    {'w': Array([1., 1., 1.], dtype=float32)}
    >>> sorted(os.listdir(workdir.name))
    ['checkpoint']
    >>> workdir.cleanup()
  """
  import orbax.checkpoint as ocp

  overwrite = checks.check_bool(overwrite, "overwrite")
  path = os.path.abspath(directory)
  _check_state(state)
  replacing = os.path.lexists(path)
  if replacing and not overwrite:
    raise FileExistsError(
      f"`directory` {path!r} already exists, and save_checkpoint never writes "
      "into an existing folder: pass a new folder (e.g. one per step), or "
      "overwrite=True to replace the checkpoint there once the new one is "
      "complete."
    )
  if replacing:
    path = _followed(path)
  else:
    _make_parent(path, os.path.abspath(directory))
  parent, name = os.path.split(path)
  temporary = os.path.join(parent, f"{name}{_SAVING_SUFFIX}{uuid.uuid4().hex[:8]}")
  try:
    with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(temporary, state)
    _write_file_list(temporary)
    _fsync_tree(temporary)
    if replacing:
      _swap_in(temporary, path)
    else:
      _rename_new(temporary, path, overwrite)
  finally:
    _remove_tree(temporary)
    for leftover in glob.glob(glob.escape(temporary + _ORBAX_TMP_SUFFIX) + "*"):
      _remove_tree(leftover)


def _leftovers_note(path: str) -> str:
  """Describes the folders an interrupted save to ``path`` left beside it."""
  notes = []
  for leftover in sorted(glob.glob(glob.escape(path) + ".*")):
    suffix = leftover[len(path) :]
    if suffix.startswith(_PREVIOUS_SUFFIX):
      notes.append(
        " A save with overwrite=True was interrupted while replacing it; the "
        f"previous checkpoint is complete at {leftover!r}: rename it to "
        f"{path!r} to restore it."
      )
    elif suffix.startswith((_SAVING_SUFFIX, _ORBAX_TMP_SUFFIX)):
      notes.append(
        f" A save to it did not finish; what it wrote is at {leftover!r} "
        "(safe to delete)."
      )
  return "".join(notes)


def _damaged(path: str, problems: list[str]) -> ValueError:
  return ValueError(
    f"The checkpoint at {path!r} is damaged: {_listing(problems)}. {_EARLIER}"
  )


def _check_file_list(path: str) -> bool:
  """Checks every file against the list written with it; False if there is none."""
  listing = os.path.join(path, _FILE_LIST)
  if not os.path.isfile(listing):
    return False
  try:
    with open(listing, encoding="utf-8") as stream:
      files = json.load(stream)["files"]
    expected = {
      name: (int(entry["size"]), int(entry["crc32"])) for name, entry in files.items()
    }
  except (ValueError, KeyError, TypeError, AttributeError):
    raise _damaged(path, [f"its file {_FILE_LIST!r} is truncated or corrupt"]) from None
  problems = []
  for name, (size, checksum) in sorted(expected.items()):
    full = os.path.join(path, *name.split("/"))
    if not os.path.isfile(full):
      problems.append(f"its file {name!r} is missing")
    elif (actual := os.path.getsize(full)) != size:
      problems.append(
        f"its file {name!r} is truncated or altered ({actual} bytes; {size} "
        "when written)"
      )
    elif _crc32(full) != checksum:
      problems.append(f"its file {name!r} is corrupt (its checksum has changed)")
  if problems:
    raise _damaged(path, problems)
  return True


def _check_orbax_files(path: str) -> None:
  """Checks for the files Orbax reads, and that its JSON metadata parses."""
  missing = [
    file for file in _REQUIRED_FILES if not os.path.isfile(os.path.join(path, file))
  ]
  data = os.path.join(path, _DATA_FOLDER)
  if not os.path.isdir(data) or not os.listdir(data):
    missing.append(f"{_DATA_FOLDER}/")
  if missing:
    listing = ", ".join(repr(file) for file in missing)
    raise ValueError(
      f"The checkpoint at {path!r} is incomplete: {listing} "
      f"{'is' if len(missing) == 1 else 'are'} missing or empty. {_EARLIER}"
    )
  array_metadata = os.path.join(path, _ARRAY_METADATA_FOLDER)
  json_files = [_TREE_FILE]
  if os.path.isdir(array_metadata):
    json_files += [
      f"{_ARRAY_METADATA_FOLDER}/{file}" for file in sorted(os.listdir(array_metadata))
    ]
  for file in json_files:
    try:
      with open(os.path.join(path, file), encoding="utf-8") as stream:
        json.load(stream)
    except ValueError:
      raise _damaged(path, [f"its file {file!r} is truncated or corrupt"]) from None


def _check_checkpoint_folder(path: str) -> None:
  """Raises a clear error unless ``path`` holds a complete checkpoint."""
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"`directory` {path!r} holds no checkpoint: it does not exist."
      + (
        _leftovers_note(path)
        or " Check the path: save_checkpoint(directory, state) creates it."
      )
    )
  if not os.path.isdir(path):
    raise ValueError(
      f"`directory` {path!r} is a file, not a checkpoint folder: pass the "
      "folder that save_checkpoint wrote."
    )
  name = os.path.basename(path)
  if _SAVING_SUFFIX in name or _ORBAX_TMP_SUFFIX in name:
    raise ValueError(
      f"`directory` {path!r} is a save that did not finish, not a checkpoint. "
      "Restore from an earlier checkpoint; this folder can be deleted."
    )
  if not os.listdir(path):
    raise ValueError(
      f"`directory` {path!r} is empty: it holds no checkpoint. Restore from an "
      "earlier checkpoint; this one was never written or its files were removed."
    )
  if not _check_file_list(path):
    _check_orbax_files(path)


def _leaf_name(path: tuple[Any, ...]) -> str:
  """A key path as dotted names, alike for a pytree and Orbax's saved tree."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts) or "(root)"


def _leaves_by_name(tree: Any) -> dict[str, Any]:
  return {
    _leaf_name(path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _listing(items: list[str], limit: int = 4) -> str:
  shown = "; ".join(items[:limit])
  return shown if len(items) <= limit else f"{shown}; and {len(items) - limit} more"


def _check_matches(path: str, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
  """Raises a ValueError naming where the saved arrays and ``target`` differ."""
  import orbax.checkpoint as ocp

  only_saved = sorted(saved.keys() - wanted.keys())
  only_wanted = sorted(wanted.keys() - saved.keys())
  differing = []
  for name in sorted(saved.keys() & wanted.keys()):
    saved_leaf, wanted_leaf = saved[name], wanted[name]
    saved_shape = getattr(saved_leaf, "shape", None)
    wanted_shape = tuple(np.shape(wanted_leaf))
    if saved_shape is not None and tuple(saved_shape) != wanted_shape:
      differing.append(
        f"{name} has shape {tuple(saved_shape)} saved, {wanted_shape} in `target`"
      )
      continue
    # Python scalars (a step count, say) are saved and restored loosely typed.
    saved_dtype = getattr(saved_leaf, "dtype", None)
    wanted_dtype = getattr(wanted_leaf, "dtype", None)
    if (
      saved_dtype is not None
      and wanted_dtype is not None
      and not isinstance(saved_leaf, ocp.metadata.ScalarMetadata)
      and np.dtype(saved_dtype) != np.dtype(wanted_dtype)
    ):
      differing.append(
        f"{name} has dtype {np.dtype(saved_dtype)} saved, "
        f"{np.dtype(wanted_dtype)} in `target`"
      )
  problems = []
  if only_saved:
    problems.append(
      f"{len(only_saved)} saved array(s) not in `target` "
      f"({', '.join(only_saved[:4])}{', ...' if len(only_saved) > 4 else ''})"
    )
  if only_wanted:
    problems.append(
      f"{len(only_wanted)} array(s) of `target` not in the checkpoint "
      f"({', '.join(only_wanted[:4])}{', ...' if len(only_wanted) > 4 else ''})"
    )
  problems += differing
  if problems:
    raise ValueError(
      f"The checkpoint at {path!r} does not match `target`: {_listing(problems)}. "
      "Pass a `target` built like the saved state (the same model, optimizer "
      "and settings)."
    )


def _raise_read_error(path: str, error: Exception) -> NoReturn:
  """Raises a short error for a checkpoint that Orbax could not read."""
  causes: list[BaseException] = []
  cause: BaseException | None = error
  while cause is not None and len(causes) < 8:
    causes.append(cause)
    cause = cause.__cause__ or cause.__context__
  for cause in causes:
    if match := _LOCAL_FILE.search(str(cause)):
      file = os.path.relpath(match.group(1), path)
      if not file.startswith(".."):
        problem = "missing" if "NOT_FOUND" in str(cause) else "truncated or corrupt"
        raise _damaged(path, [f"its file {file!r} is {problem}"]) from None
  reason = str(causes[-1]).split("\n", 1)[0][:200]
  raise ValueError(
    f"The checkpoint at {path!r} could not be read: {reason}. If it is "
    "damaged, restore from an earlier checkpoint."
  ) from error


def _is_key(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _stored_as(leaf: Any) -> Any:
  """The array Orbax stores for a leaf of ``target``: a key as its key data."""
  import orbax.checkpoint as ocp

  if isinstance(leaf, jax.ShapeDtypeStruct) and _is_key(leaf):
    data = jax.eval_shape(jax.random.key_data, leaf)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)
  return ocp.utils.to_shape_dtype_struct(leaf)


def _key_impl(leaf: Any) -> Any:
  """The PRNG implementation of a typed key array or ShapeDtypeStruct."""
  if isinstance(leaf, jax.Array):
    return jax.random.key_impl(leaf)
  for name in ("threefry2x32", "rbg", "unsafe_rbg"):
    if jax.random.key(0, impl=name).dtype == leaf.dtype:
      return name
  return leaf.dtype._impl  # A custom implementation, registered by the user.


def _keys_as_in_target(path: str, restored: Any, target: Any) -> Any:
  """Checks that typed keys come back where ``target`` has them.

  A typed key saved where ``target`` holds a raw ``uint32`` array is refused;
  raw key data saved where ``target`` holds a typed key is wrapped in
  ``target``'s implementation, bit for bit, with a warning.
  """
  problems, wrapped = [], []

  def match(key_path: tuple[Any, ...], want: Any, got: Any) -> Any:
    name = _leaf_name(key_path)
    if _is_key(want) and not _is_key(got):
      wrapped.append(name)
      return jax.random.wrap_key_data(got, impl=_key_impl(want))
    if _is_key(got) and not _is_key(want):
      problems.append(
        f"{name} is a typed PRNG key saved ({got.dtype}), an array of dtype "
        f"{np.dtype(want.dtype) if hasattr(want, 'dtype') else type(want)} in "
        "`target`"
      )
    elif _is_key(got) and got.dtype != want.dtype:
      problems.append(f"{name} is a key of {got.dtype} saved, {want.dtype} in `target`")
    return got

  result = jax.tree_util.tree_map_with_path(match, target, restored)
  if problems:
    raise ValueError(
      f"The checkpoint at {path!r} does not match `target`: {_listing(problems)}. "
      "Pass a typed key where one was saved (e.g. jax.random.key(0), or "
      "jax.random.wrap_key_data(raw) for a legacy uint32 key); restoring is "
      "exact, so a typed key is never turned into raw key data."
    )
  if wrapped:
    verb = "was" if len(wrapped) == 1 else "were"
    warnings.warn(
      f"restore_checkpoint: {_listing(wrapped)} {verb} saved as raw uint32 "
      "key data where `target` holds typed keys; restored "
      "as typed keys of `target`'s implementation (jax.random.wrap_key_data), "
      "bit for bit.",
      stacklevel=3,
    )
  return result


def restore_checkpoint(directory: str | os.PathLike[str], target: Any) -> Any:
  """Restores a pytree saved by :func:`save_checkpoint` into ``target``'s shape.

  The folder is checked before any array is read: every file must be as
  :func:`save_checkpoint` wrote it (the size and checksum it recorded), and
  the saved arrays must have ``target``'s names, shapes and dtypes. (For a
  checkpoint without the list of files, from an earlier nso_jax, the files
  Orbax reads are checked for.) Orbax's log messages are silenced, so a failed
  restore reports only the error raised here.

  Typed PRNG keys are restored exactly as ``target`` holds them: a typed key
  (``jax.random.key``, as in NSO's state) where a typed key of the same
  implementation was saved. A legacy ``uint32`` key array in ``target`` where
  a typed key was saved is refused with a ``ValueError`` naming the leaf
  (converting would drop the key's implementation). Raw ``uint32`` key data
  saved where ``target`` holds a typed key is wrapped in ``target``'s
  implementation (:func:`jax.random.wrap_key_data`, bit for bit), with a
  warning naming the leaves.

  Args:
    directory: where the checkpoint was written.
    target: a pytree with the structure, shapes and dtypes to restore, such as
      a freshly created :class:`TrainState`; its values are not used. Its
      leaves may be :class:`jax.ShapeDtypeStruct` (typed keys included), e.g.
      ``jax.eval_shape(init_fn)``, so that no state is computed to restore
      one.

  Returns:
    A pytree like ``target`` holding the saved values bit for bit.

  Raises:
    FileNotFoundError: if ``directory`` does not exist.
    ValueError: if ``directory`` is not a complete, intact checkpoint (the
      message names the missing or damaged files), or if the saved arrays do
      not match ``target`` (the message names them), a typed key included.

  Example:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> from nso_jax import training
    >>> workdir = tempfile.TemporaryDirectory()
    >>> folder = os.path.join(workdir.name, "checkpoint")
    >>> training.save_checkpoint(folder, {"w": jnp.arange(3.0)})
    >>> try:
    ...   training.restore_checkpoint(folder, {"w": jnp.zeros(4)})
    ... except ValueError as error:
    ...   print(error)
    The checkpoint at '...' does not match `target`: w has shape (3,) saved,
    (4,) in `target`. Pass a `target` built like the saved state (the same
    model, optimizer and settings).
    >>> workdir.cleanup()
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(directory)
  _check_checkpoint_folder(path)
  abstract = jax.tree.map(_stored_as, target)
  with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
    try:
      metadata = checkpointer.metadata(path)
    except Exception as error:
      _raise_read_error(path, error)
    saved = getattr(metadata, "item_metadata", metadata)
    if saved is not None:
      _check_matches(path, _leaves_by_name(saved), _leaves_by_name(abstract))
    try:
      restored = checkpointer.restore(path, abstract)
    except Exception as error:
      _raise_read_error(path, error)
  return _keys_as_in_target(path, restored, target)


_STEP_FOLDER = re.compile(r"[0-9]+")
_DELETING_SUFFIX = ".nso-deleting-"


def _check_step(step: Any) -> int:
  """``step`` as a non-negative Python int, or a clear error."""
  if isinstance(step, (bool, np.bool_)):
    raise TypeError(f"`step` must be a non-negative integer, got {step!r}.")
  try:
    value = operator.index(step)
  except TypeError:
    raise TypeError(
      f"`step` must be a non-negative integer (e.g. int(state.step)), got {step!r}."
    ) from None
  if value < 0:
    raise ValueError(f"`step` must be a non-negative integer, got {value}.")
  return value


class CheckpointManager:
  """Numbered checkpoints in one folder: save by step, find the latest, keep N.

  A thin layer over :func:`save_checkpoint` and :func:`restore_checkpoint`:
  step ``n`` is the checkpoint folder ``<directory>/<n>`` (the layout Orbax's
  own manager uses), so every save is atomic and every restore verified as
  theirs are. A folder appears under its step's name only when complete, so
  :meth:`latest_step` never finds a partial save. After each save, the
  checkpoints of all but the ``max_to_keep`` highest steps are deleted (each
  renamed aside first, so a deletion cut short leaves no damaged step).
  Written by one process, as :func:`save_checkpoint`.

  Args:
    directory: the folder of the step folders; created by the first save.
    max_to_keep: how many checkpoints to keep (the highest steps), at least
      1; ``None`` keeps all.

  Raises:
    TypeError: if ``max_to_keep`` is not an int or ``None``.
    ValueError: if ``max_to_keep`` is below 1.

  Example:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> from nso_jax import training
    >>> workdir = tempfile.TemporaryDirectory()
    >>> manager = training.CheckpointManager(workdir.name, max_to_keep=2)
    >>> for step in (10, 20, 30):
    ...   manager.save(step, {"w": jnp.full(2, float(step))})
    >>> manager.all_steps(), manager.latest_step()
    ([20, 30], 30)
    >>> manager.restore({"w": jnp.zeros(2)})
    {'w': Array([30., 30.], dtype=float32)}
    >>> manager.restore({"w": jnp.zeros(2)}, step=20)
    {'w': Array([20., 20.], dtype=float32)}
    >>> workdir.cleanup()
  """

  def __init__(
    self, directory: str | os.PathLike[str], *, max_to_keep: int | None = None
  ):
    if max_to_keep is not None:
      if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int):
        raise TypeError(
          f"`max_to_keep` must be a positive int or None, got {max_to_keep!r}."
        )
      if max_to_keep < 1:
        raise ValueError(
          f"`max_to_keep` must be at least 1 (or None to keep all), got {max_to_keep}."
        )
    self._directory = os.path.abspath(directory)
    self._max_to_keep = max_to_keep

  @property
  def directory(self) -> str:
    """The absolute path of the folder holding the step folders."""
    return self._directory

  def step_directory(self, step: int) -> str:
    """The checkpoint folder of ``step`` (which may not exist)."""
    return os.path.join(self._directory, str(_check_step(step)))

  def all_steps(self) -> list[int]:
    """The steps saved, in increasing order (``[]`` for none)."""
    if not os.path.isdir(self._directory):
      return []
    return sorted(
      int(name)
      for name in os.listdir(self._directory)
      if _STEP_FOLDER.fullmatch(name)
      and os.path.isdir(os.path.join(self._directory, name))
    )

  def latest_step(self) -> int | None:
    """The highest step saved, or ``None`` if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, *, overwrite: bool = False) -> None:
    """Saves ``state`` as step ``step``, then deletes the oldest beyond N.

    Args:
      step: a non-negative int (e.g. ``int(state.step)``).
      state: any pytree of arrays, as for :func:`save_checkpoint`.
      overwrite: replace an existing checkpoint of this step.

    Raises:
      FileExistsError: if step ``step`` exists and ``overwrite`` is False, or
        another process saved it during this save (its checkpoint is kept).
      TypeError, ValueError: if ``step`` is not a non-negative int, or as
        :func:`save_checkpoint` for ``state`` and the folder.
    """
    save_checkpoint(self.step_directory(step), state, overwrite=overwrite)
    steps = self.all_steps()
    if self._max_to_keep is not None:
      for old in steps[: max(0, len(steps) - self._max_to_keep)]:
        self._delete(old)

  def _delete(self, step: int) -> None:
    path = self.step_directory(step)
    aside = f"{path}{_DELETING_SUFFIX}{uuid.uuid4().hex[:8]}"
    try:
      os.rename(path, aside)
    except FileNotFoundError:
      return  # Another manager of the same folder deleted it first.
    _remove_tree(aside)

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores step ``step`` (the latest if ``None``) into ``target``'s shape.

    Args:
      target: a pytree with the structure, shapes and dtypes to restore, as
        for :func:`restore_checkpoint`.
      step: the step to restore; ``None`` for the latest.

    Returns:
      A pytree like ``target`` holding the saved values bit for bit.

    Raises:
      FileNotFoundError: if there is no checkpoint (of ``step``).
      ValueError: if the checkpoint is damaged or does not match ``target``.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(
          f"`directory` {self._directory!r} holds no checkpoint of any step: "
          "save one first (manager.save(step, state)), or check the path."
        )
    path = self.step_directory(step)
    if not os.path.exists(path):
      raise FileNotFoundError(
        f"There is no checkpoint of step {step} in {self._directory!r}; the "
        f"steps saved are {self.all_steps()}."
      )
    return restore_checkpoint(path, target)
