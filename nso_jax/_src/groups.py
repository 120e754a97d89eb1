"""Groups of parameter leaves: the modules that per-layer measures report.

A per-layer measure reports one value per leaf of the parameters; with
``group_by`` it reports one per group of leaves instead, a module's kernel and
bias together. ``group_by`` is

* ``None``: no grouping, one value per leaf;
* a positive int ``depth``: leaves whose key paths share their first
  ``depth`` keys form a group, named by those keys joined with ``"/"``
  (``depth=1`` on Flax's ``{"Dense_0": {"kernel", "bias"}}`` gives the group
  ``"Dense_0"``; on ``{"params": {"Dense_0": ...}}`` use ``depth=2``);
* a callable ``(path) -> str`` on the key paths of
  ``jax.tree_util.tree_leaves_with_path``, returning the group's name.

This module only names the groups and adds per-leaf values within them; the
measures sum per-probe samples within a group before taking a standard error.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nso_jax._src.checks import PyTree

GroupBy = int | Callable[[tuple[Any, ...]], str] | None


def key_name(key: Any) -> str:
  """One key of a path as text: a dict key, a sequence index or an attribute."""
  for field in ("key", "idx", "name"):
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def check_group_by(group_by: Any) -> GroupBy:
  """Raises unless ``group_by`` is ``None``, a positive int or a callable."""
  if group_by is None or callable(group_by):
    return group_by
  if isinstance(group_by, int) and not isinstance(group_by, bool) and group_by >= 1:
    return group_by
  raise ValueError(
    "`group_by` must be None, a positive int (the number of leading path keys "
    f"that name a group) or a callable (path) -> str, got {group_by!r}."
  )


def group_names(template: PyTree, group_by: GroupBy) -> list[str]:
  """The group of each leaf of ``template`` (``None`` leaves skipped), in order."""
  group_by = check_group_by(group_by)
  names = []
  for path, _ in jax.tree_util.tree_leaves_with_path(template):
    if callable(group_by):
      name = group_by(path)
      if not isinstance(name, str):
        raise ValueError(
          f"`group_by` must return a str (the group's name), got {name!r} for "
          f"the leaf {jax.tree_util.keystr(path) or '(root)'}."
        )
    else:
      name = "/".join(key_name(key) for key in path[:group_by]) or "(root)"
    names.append(name)
  return names


def distinct(names: Sequence[str]) -> list[str]:
  """The names in order of first appearance, each once."""
  return list(dict.fromkeys(names))


def sum_by_group(values: Sequence[jax.Array], names: Sequence[str]) -> dict:
  """Per group, the sum of the per-leaf ``values`` (arrays of one shape)."""
  totals: dict[str, jax.Array] = {}
  for value, name in zip(values, names, strict=True):
    totals[name] = totals[name] + value if name in totals else jnp.asarray(value)
  return {name: totals[name] for name in distinct(names)}
