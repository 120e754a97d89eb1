"""Parameter selection: restrict a curvature operator to some leaves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax._src import checks
from nso_jax._src.checks import PyTree

ParamFilter = PyTree | Callable[[tuple[Any, ...], jax.Array], bool] | None


def selection_mask(params: PyTree, param_filter: ParamFilter) -> list[bool]:
  """Whether each leaf of ``params`` (in leaf order) is selected."""
  leaves_with_path = jax.tree_util.tree_leaves_with_path(params)
  if param_filter is None:
    return [True] * len(leaves_with_path)
  # A function is a pytree leaf; a callable pytree node (an Equinox module of
  # bools, such as a filter spec) is a pytree of flags.
  if callable(param_filter) and jax.tree_util.all_leaves([param_filter]):
    mask = [param_filter(path, leaf) for path, leaf in leaves_with_path]
  else:
    try:
      broadcast = jax.tree.map(
        lambda flag, subtree: jax.tree.map(lambda _: flag, subtree),
        param_filter,
        params,
      )
    except (ValueError, TypeError) as error:
      raise ValueError(
        "`param_filter` must be a callable (path, leaf) -> bool or a pytree "
        "of bools whose structure is a prefix of `params`; got "
        f"{jax.tree.structure(param_filter)} for params "
        f"{jax.tree.structure(params)}."
      ) from error
    mask = jax.tree.leaves(broadcast)
  for flag in mask:
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(
        "`param_filter` must give Python bools (it fixes which leaves are "
        f"measured at trace time), got {flag!r}."
      )
  if not any(mask):
    raise ValueError("`param_filter` selects no parameter leaf.")
  return [bool(flag) for flag in mask]


def select(
  params: PyTree, param_filter: ParamFilter
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
  """Returns the selected sub-pytree and a function merging one back in."""
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    raise ValueError("`params` is an empty pytree: it needs at least one array.")
  mask = selection_mask(params, param_filter)
  if all(mask):
    return params, lambda selected: selected
  selected = jax.tree.unflatten(
    treedef, [leaf if keep else None for leaf, keep in zip(leaves, mask, strict=True)]
  )

  def merge(selected: PyTree) -> PyTree:
    chosen = iter(jax.tree.leaves(selected))
    return jax.tree.unflatten(
      treedef,
      [next(chosen) if keep else leaf for leaf, keep in zip(leaves, mask, strict=True)],
    )

  return selected, merge


def _is_none(x: Any) -> bool:
  return x is None


def restrict_like(template: PyTree, tree: PyTree, params: PyTree, name: str) -> PyTree:
  """``tree`` restricted to the leaves ``template`` selects, after checks.

  ``tree`` must have the structure of ``params`` and, leaf by leaf, its shapes.
  """
  if not checks.same_structure(tree, params):
    raise ValueError(
      f"`{name}` must have the structure of `params`: got "
      f"{jax.tree.structure(tree)}, expected {jax.tree.structure(params)}."
    )
  chosen: list[jax.Array | None] = []
  template_leaves = jax.tree.leaves(template, is_leaf=_is_none)
  paths_and_leaves = jax.tree_util.tree_leaves_with_path(tree)
  for keep, (path, leaf), param in zip(
    template_leaves, paths_and_leaves, jax.tree.leaves(params), strict=True
  ):
    if jnp.shape(leaf) != jnp.shape(param):
      raise ValueError(
        f"`{name}` leaf {jax.tree_util.keystr(path) or '(root)'} has shape "
        f"{jnp.shape(leaf)}, expected {jnp.shape(param)} like `params`."
      )
    if keep is None:
      chosen.append(None)
      continue
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
        f"`{name}` leaf {jax.tree_util.keystr(path) or '(root)'} has dtype "
        f"{jnp.result_type(leaf)}; it must be floating point like `params`."
      )
    chosen.append(jnp.asarray(leaf).astype(jnp.result_type(keep)))
  return jax.tree.unflatten(jax.tree.structure(template, is_leaf=_is_none), chosen)
