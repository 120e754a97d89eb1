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


FILTER_SIGNATURE = "(path, leaf) -> bool"


def check_filter_signature(param_filter: Callable[..., Any]) -> None:
  """Raises a TypeError unless the function ``param_filter`` takes (path, leaf)."""
  checks.check_signature(param_filter, "param_filter", 2, FILTER_SIGNATURE)


def per_leaf(
  spec: Any, params: PyTree, name: str, kind: str, hint: str = ""
) -> list[Any]:
  """One value per leaf of ``params`` (in leaf order) from ``spec``.

  ``spec`` is a function ``(path, leaf) -> value`` or a pytree of values
  whose structure is a prefix of ``params`` (each value then holds for the
  leaves below it). A ``spec`` of another structure is refused, naming
  ``name`` and the ``kind`` of value expected, with ``hint`` appended.
  """
  # A function is a pytree leaf; a callable pytree node (an Equinox module of
  # bools, such as a filter spec) is a pytree of values.
  if callable(spec) and jax.tree_util.all_leaves([spec]):
    return [
      spec(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    ]
  try:
    broadcast = jax.tree.map(
      lambda value, subtree: jax.tree.map(lambda _: value, subtree), spec, params
    )
  except (ValueError, TypeError) as error:
    raise ValueError(
      f"`{name}` must be a callable (path, leaf) -> {kind} or a pytree of "
      f"{kind}s whose structure is a prefix of `params`; got "
      f"{jax.tree.structure(spec)} for params {jax.tree.structure(params)}."
      f"{hint}"
    ) from error
  return jax.tree.leaves(broadcast)


def selection_mask(params: PyTree, param_filter: ParamFilter) -> list[bool]:
  """Whether each leaf of ``params`` (in leaf order) is selected."""
  leaves_with_path = jax.tree_util.tree_leaves_with_path(params)
  if param_filter is None:
    return [True] * len(leaves_with_path)
  if callable(param_filter) and jax.tree_util.all_leaves([param_filter]):
    check_filter_signature(param_filter)
  mask = per_leaf(param_filter, params, "param_filter", "bool")
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


def select_by_mask(params: PyTree, mask: list[bool]) -> PyTree:
  """``params`` with the leaves ``mask`` excludes as ``None`` (dropped leaves)."""
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(
    treedef, [leaf if keep else None for leaf, keep in zip(leaves, mask, strict=True)]
  )


def _is_float(leaf: Any) -> bool:
  try:
    return bool(jnp.issubdtype(jnp.result_type(leaf), jnp.floating))
  except TypeError:  # not an array
    return False


def frozen_leaves(params: PyTree, mask: list[bool]) -> list[bool]:
  """Which leaves are excluded by ``mask`` and not floating point.

  Such a leaf (an integer step counter, say) may have any dtype: it is
  neither perturbed nor differentiated, and its gradient is zero. A non-float
  leaf that is selected is refused (:data:`nso_jax._src.checks.FLOAT_PARAMS`).
  """
  return [
    not keep and not _is_float(leaf)
    for leaf, keep in zip(jax.tree.leaves(params), mask, strict=True)
  ]


def stand_in_frozen(tree: PyTree, frozen: list[bool]) -> PyTree:
  """``tree`` with its ``frozen`` leaves replaced by float32 zero scalars.

  Noise is drawn for every leaf, in leaf order, whether or not it is
  perturbed (so that the same key gives the same noise on the selected
  leaves); a stand-in keeps that order at no cost. ``tree`` itself when
  nothing is frozen.
  """
  if not any(frozen):
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(
    treedef,
    [
      jnp.zeros((), jnp.float32) if is_frozen else leaf
      for leaf, is_frozen in zip(leaves, frozen, strict=True)
    ],
  )


def zeros_like_shape(shape: Any) -> Any:
  """Zeros of ``shape``'s shape and dtype (``float0`` included)."""
  if shape.dtype == jax.dtypes.float0:
    return np.zeros(shape.shape, jax.dtypes.float0)
  return jnp.zeros(shape.shape, shape.dtype)


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
