"""Classification data: the bundled digits, a user's file, and their variants.

Both loaders return a :class:`Dataset` split into stratified train and test
sets and standardised with the training statistics. What cannot be used
raises :class:`DataError`, which names the argument at fault. The
experiments' variants are here too: a subset of the classes
(:func:`class_subset`), flipped labels (:func:`flip_labels`,
:func:`noisy_digits`).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any

import numpy as np

from nso_jax.app.settings import SettingError

TEST_FRACTION = 0.3
"""The digits' default stratified test share."""


class DataError(SettingError):
  """Data that cannot be used, with the reason and the argument at fault."""

  separator = ": "


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification data set split into train and test arrays."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def split_dataset(
  features: np.ndarray, labels: np.ndarray, test_fraction: float, name: str
) -> Dataset:
  """Splits examples into stratified train and test sets and standardises them.

  Args:
    features: ``(n, d)`` numeric features.
    labels: ``(n,)`` class labels of any type; they become ``0 .. C-1``.
    test_fraction: the share of examples held out for testing.
    name: the data set's name, for reports.

  Returns:
    The :class:`Dataset`, with features standardised by the training mean and
    standard deviation (constant features left unscaled) as ``float32`` and
    labels as ``int32``.

  Raises:
    DataError: when the examples cannot be split with ``test_fraction``.
  """
  from sklearn.model_selection import train_test_split

  classes, labels = np.unique(labels, return_inverse=True)
  try:
    x_train, x_test, y_train, y_test = train_test_split(
      features, labels, test_size=test_fraction, random_state=0, stratify=labels
    )
  except ValueError as error:
    raise DataError(
      "test_fraction",
      f"cannot split {len(labels)} examples of {len(classes)} classes into "
      f"train and test sets: {error}",
      value=test_fraction,
    ) from None
  mean, std = x_train.mean(axis=0), x_train.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  standardise = lambda a: ((a - mean) / std).astype(np.float32)
  return Dataset(
    name=name,
    x_train=standardise(x_train),
    y_train=y_train.astype(np.int32),
    x_test=standardise(x_test),
    y_test=y_test.astype(np.int32),
    num_classes=len(classes),
  )


def load_digits(test_fraction: float = TEST_FRACTION) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), split.

  Args:
    test_fraction: the share of examples held out for testing (stratified).

  Returns:
    The standardised, split :class:`Dataset`.
  """
  from sklearn.datasets import load_digits as sklearn_digits

  bunch = sklearn_digits()
  return split_dataset(bunch.data, bunch.target, test_fraction, "digits (scikit-learn)")


_SAVE_HINT = "save your data with numpy.savez(path, X=features, y=labels)."


def load_npz(path: str, test_fraction: float = TEST_FRACTION) -> Dataset:
  """A user's classification data: an ``.npz`` file with arrays ``X`` and ``y``.

  Args:
    path: the file; ``X`` is ``(n, d)`` numeric features, ``y`` is ``(n,)``
      class labels (integers or strings).
    test_fraction: the share of examples held out for testing (stratified).

  Returns:
    The standardised, split :class:`Dataset`.

  Raises:
    DataError: naming what is wrong with the file (field ``path``) or the
      split (field ``test_fraction``).
  """
  x, y = _check_arrays(path, _read_archive(path))
  name = os.path.basename(path)
  with np.errstate(over="ignore", invalid="ignore"):
    dataset = split_dataset(x.astype(np.float64), y, test_fraction, name)
  if not (np.all(np.isfinite(dataset.x_train)) and np.all(np.isfinite(dataset.x_test))):
    raise DataError(
      "path",
      "X's values are too large to standardise (their sums overflow); rescale them.",
    )
  return dataset


def _read_archive(path: str) -> dict[str, Any]:
  """The arrays of the ``.npz`` archive at ``path``.

  Raises:
    DataError: (field ``path``) when it is no readable ``.npz`` archive.
  """
  if os.path.isdir(path):
    raise DataError("path", f"{path!r} is a folder, not an .npz file.")
  if not os.path.exists(path):
    raise DataError("path", f"no such file: {path!r}.")
  if not os.path.isfile(path):
    raise DataError("path", f"{path!r} is not a regular file.")
  try:
    with open(path, "rb") as file:
      is_archive = zipfile.is_zipfile(file)
  except OSError as error:
    raise DataError(
      "path", f"cannot read {path!r} ({error.strerror or error})."
    ) from None
  if not is_archive:
    raise DataError(
      "path",
      f"{path!r} is not an .npz archive (the zip of arrays numpy.savez "
      f"writes); {_SAVE_HINT}",
    )
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  except Exception as error:
    raise DataError(
      "path", f"{path!r} is not a readable .npz archive ({error})."
    ) from None


def _check_arrays(path: str, arrays: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """The features ``X`` and labels ``y`` of ``arrays``, checked.

  Raises:
    DataError: (field ``path``) naming what is wrong with them.
  """
  missing = [name for name in ("X", "y") if name not in arrays]
  if missing:
    raise DataError(
      "path",
      f"{path!r} lacks the array(s) {missing}; it must hold X (n, d) features "
      f"and y (n,) labels; found {sorted(arrays)}.",
    )
  not_arrays = [name for name in ("X", "y") if not isinstance(arrays[name], np.ndarray)]
  if not_arrays:
    raise DataError(
      "path",
      f"{path!r} holds {not_arrays} as raw bytes, not as .npy arrays; {_SAVE_HINT}",
    )
  x, y = arrays["X"], arrays["y"]
  # Integers and real floats; not complex numbers, timedeltas or booleans.
  if x.ndim != 2 or x.dtype.kind not in "iuf":
    raise DataError(
      "path",
      f"X must be a 2-D numeric array (n, d), got shape {x.shape} and dtype {x.dtype}.",
    )
  if x.shape[1] == 0:
    raise DataError("path", f"X has no feature columns, got shape {x.shape}.")
  if y.ndim != 1 or len(y) != len(x):
    raise DataError(
      "path",
      f"y must be 1-D with one label per row of X ({len(x)}), got shape {y.shape}.",
    )
  if np.issubdtype(y.dtype, np.floating) and not np.all(np.mod(y, 1) == 0):
    raise DataError("path", "y must hold class labels, got non-integer floats.")
  if not np.all(np.isfinite(x)):
    raise DataError("path", "X contains NaN or infinite values.")
  if len(np.unique(y)) < 2:
    raise DataError("path", "y must contain at least two classes.")
  return x, y


def class_subset(
  x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
  """The examples of ``classes``, relabelled ``0 .. len(classes) - 1``."""
  keep = np.isin(y, classes)
  return x[keep], np.searchsorted(np.asarray(classes), y[keep]).astype(np.int32)


def flip_labels(
  labels: np.ndarray, share: float, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
  """``labels`` with ``round(share * n)`` of them changed to another class.

  The flipped examples are drawn without replacement and each gets a
  uniformly random class other than its own (symmetric label noise).
  """
  labels = labels.copy()
  flipped = rng.choice(len(labels), round(share * len(labels)), replace=False)
  shift = rng.integers(1, num_classes, size=len(flipped))
  labels[flipped] = (labels[flipped] + shift) % num_classes
  return labels


def noisy_digits(level: float) -> tuple[Dataset, np.ndarray]:
  """The digits with ``level`` of the training labels flipped; the flip mask.

  The test labels stay clean; the flips are drawn with seed
  ``round(1000 * level)``, so a level always flips the same labels.
  """
  digits = load_digits()
  rng = np.random.default_rng(round(1000 * level))
  noisy = flip_labels(digits.y_train, level, digits.num_classes, rng)
  name = f"digits, {100 * level:g}% of training labels flipped"
  return dataclasses.replace(digits, name=name, y_train=noisy), noisy != digits.y_train
