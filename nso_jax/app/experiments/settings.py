"""Experiment settings: dataclass fields that carry their flag, help and check.

Each experiment's settings are a frozen dataclass whose fields are made with
:func:`setting` (or a shorthand), so that the command line, the validation
and the error messages come from one place: :func:`add_flags` adds a flag per
field, :func:`from_args` builds the settings, and :func:`check` (called by
each dataclass's ``__post_init__``) raises a
:class:`~nso_jax.app.data.SettingError` naming the first field at fault,
which the command spells as its flag (:func:`flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from nso_jax.app import data as data_lib


def setting(
  default: Any,
  help: str,
  *,
  flag: str | None = None,
  valid: Callable[[Any], bool] | None = None,
  expect: str = "",
  choices: tuple[str, ...] | None = None,
  unique: bool = False,
) -> Any:
  """A settings field with its command-line flag, help text and check.

  Args:
    default: the default value; its type (or, for a tuple, its items' type)
      is the type the flag parses.
    help: the flag's help text.
    flag: the flag; default ``--`` and the field name with dashes.
    valid: a check of the value (of each item, for a tuple).
    expect: what a valid value is, for the error message.
    choices: the allowed strings (each item, for a tuple of strings).
    unique: a tuple's items must differ (e.g. the values of a sweep).

  Returns:
    A :func:`dataclasses.field` carrying that metadata.
  """
  metadata = {
    "help": help,
    "flag": flag,
    "valid": valid,
    "expect": expect,
    "choices": choices,
    "unique": unique,
  }
  return dataclasses.field(default=default, metadata=metadata)


def count(default: int, help: str, limit: int, *, flag: str | None = None) -> Any:
  """An int setting in ``[1, limit]``."""
  return setting(
    default,
    help,
    flag=flag,
    valid=lambda v: 1 <= v <= limit,
    expect=f"an int in [1, {limit:,}]",
  )


def positive(default: float, help: str, *, flag: str | None = None) -> Any:
  """A finite float setting > 0."""
  return setting(
    default,
    help,
    flag=flag,
    valid=lambda v: 0 < v < math.inf,
    expect="a finite float > 0",
  )


def flag_of(field: dataclasses.Field) -> str:
  """The command-line flag that sets ``field``."""
  if field.type in (bool, "bool"):
    return "--no-" + field.name.replace("_", "-")
  return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def flags(settings_type: type) -> dict[str, str]:
  """Field name -> flag, for every field of a settings dataclass."""
  return {field.name: flag_of(field) for field in dataclasses.fields(settings_type)}


def _item_type(default: Any) -> type:
  value = default[0] if isinstance(default, tuple) else default
  return type(value)


def _parser_for(field: dataclasses.Field) -> Callable[[str], Any]:
  item_type = _item_type(field.default)
  choices = field.metadata.get("choices")

  def parse_item(text: str) -> Any:
    text = text.strip()
    if choices is not None and text not in choices:
      raise argparse.ArgumentTypeError(
        f"unknown choice {text!r}; choose from {','.join(choices)}"
      )
    try:
      return item_type(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
        f"expected {item_type.__name__} value(s), got {text!r}"
      ) from None

  if not isinstance(field.default, tuple):
    return parse_item

  def parse_list(text: str) -> tuple[Any, ...]:
    items = tuple(parse_item(part) for part in text.split(",") if part.strip())
    if not items:
      raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items

  return parse_list


def add_flags(parser: argparse.ArgumentParser, settings_type: type) -> None:
  """Adds one flag per field of ``settings_type`` to ``parser``."""
  for field in dataclasses.fields(settings_type):
    flag = flag_of(field)
    if field.type in (bool, "bool"):
      parser.add_argument(
        flag, dest=field.name, action="store_false", help=field.metadata["help"]
      )
      continue
    help_text = field.metadata["help"]
    if field.metadata.get("expect"):
      each = "each " if isinstance(field.default, tuple) else ""
      help_text += f"; {each}{field.metadata['expect']}"
    default = field.default
    if isinstance(default, tuple):
      default = ",".join(str(item) for item in default)
    parser.add_argument(
      flag,
      dest=field.name,
      type=_parser_for(field),
      default=field.default,
      metavar=flag.lstrip("-").replace("-", "_").upper(),
      help=f"{help_text} (default: {default})",
    )


def from_args(settings_type: type, args: argparse.Namespace) -> Any:
  """The settings of ``settings_type`` from parsed arguments.

  Raises:
    SettingError: naming the field whose value cannot be used.
  """
  names = [field.name for field in dataclasses.fields(settings_type)]
  return settings_type(**{name: getattr(args, name) for name in names})


def check(settings: Any) -> None:
  """Checks every field of ``settings`` against its metadata.

  Raises:
    SettingError: naming the first field whose value cannot be used.
  """
  for field in dataclasses.fields(settings):
    value = getattr(settings, field.name)
    _check_value(field, value)


def _check_value(field: dataclasses.Field, value: Any) -> None:
  error = data_lib.SettingError
  if isinstance(field.default, tuple):
    if not isinstance(value, tuple) or not value:
      raise error(field.name, f"must be a non-empty tuple, got {value!r}.")
    if field.metadata.get("unique") and len(set(value)) != len(value):
      raise error(field.name, f"must not repeat a value, got {value!r}.")
    items = value
  else:
    items = (value,)
  item_type = _item_type(field.default)
  for item in items:
    if item_type is float and isinstance(item, int) and not isinstance(item, bool):
      item = float(item)
    if type(item) is not item_type:
      raise error(field.name, f"must be of type {item_type.__name__}, got {item!r}.")
    choices = field.metadata.get("choices")
    if choices is not None and item not in choices:
      raise error(field.name, f"must be one of {choices}, got {item!r}.")
    valid = field.metadata.get("valid")
    finite = not isinstance(item, float) or math.isfinite(item)
    if valid is not None and not (finite and valid(item)):
      raise error(
        field.name, f"must be {field.metadata['expect']}, got {item!r}.", value=None
      )
