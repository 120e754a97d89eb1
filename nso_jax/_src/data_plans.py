"""Data sets for curvature operators: one batch, a list of batches, or stacked.

A data set is turned into a plan: batches of equal size stacked on a leading
axis (one group per distinct size) with their example counts as weights, so
that a ``lax.scan`` per group accumulates the exact example-weighted average
inside the compiled program.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax._src import checks
from nso_jax._src.checks import PyTree


class StackedBatches(NamedTuple):
  """Equal-shape batches stacked along a new leading axis.

  Attributes:
    data: a pytree whose leaves have shape ``(num_batches, batch_size, ...)``.
    weights: optional per-batch weights of shape ``(num_batches,)``, typically
      example counts (for a padded last batch whose loss masks the padding);
      ``None`` weighs batches equally.
  """

  data: PyTree
  weights: jax.Array | None = None


class _Group(NamedTuple):
  stacked: PyTree  # leaves (num_batches, ...)
  weights: jax.Array  # (num_batches,)


class DataPlan(NamedTuple):
  single_batch: PyTree | None
  groups: tuple[_Group, ...]
  total_weight: Any

  def first_batch(self) -> PyTree:
    if not self.groups:
      return self.single_batch
    return jax.tree.map(lambda x: x[0], self.groups[0].stacked)


def _is_batch_sequence(data: Any) -> bool:
  return isinstance(data, (list, collections.abc.Iterator))


def _leading_size(batch: PyTree, name: str) -> int:
  sizes = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError(
        f"`{name}` leaf {jax.tree_util.keystr(path) or '(root)'} is a scalar; "
        "every leaf of a batch needs a leading example axis."
      )
    if shape[0] == 0:
      raise ValueError(
        f"`{name}` leaf {jax.tree_util.keystr(path) or '(root)'} holds no "
        "examples (leading size 0)."
      )
    sizes.add(shape[0])
  if not sizes:
    raise ValueError(f"`{name}` is an empty pytree: a batch needs arrays.")
  if len(sizes) > 1:
    raise ValueError(
      f"`{name}` has leaves with different numbers of examples {sorted(sizes)}; "
      "expected one leading example axis shared by all leaves."
    )
  return sizes.pop()


def _plan_list(batches: list[PyTree]) -> DataPlan:
  if not batches:
    raise ValueError("`data` is an empty sequence of batches.")
  first_structure = jax.tree.structure(batches[0])
  first_shapes = [jnp.shape(x)[1:] for x in jax.tree.leaves(batches[0])]
  sizes = []
  for index, batch in enumerate(batches):
    structure = jax.tree.structure(batch)
    if not checks.same_structure(batch, batches[0]):
      raise ValueError(
        f"`data[{index}]` has structure {structure}, expected {first_structure} "
        "like `data[0]`. (A list is read as a sequence of batches; pass a "
        "single batch as a tuple or dict.)"
      )
    sizes.append(_leading_size(batch, f"data[{index}]"))
    shapes = [jnp.shape(x)[1:] for x in jax.tree.leaves(batch)]
    if shapes != first_shapes:
      raise ValueError(
        f"`data[{index}]` has per-example shapes {shapes}, expected "
        f"{first_shapes} like `data[0]`."
      )
  by_size: dict[int, list[int]] = {}
  for index, size in enumerate(sizes):
    by_size.setdefault(size, []).append(index)
  groups = []
  for size, indices in by_size.items():
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[batches[i] for i in indices])
    groups.append(_Group(stacked, jnp.full((len(indices),), float(size))))
  return DataPlan(None, tuple(groups), float(sum(sizes)))


def _plan_stacked(data: StackedBatches) -> DataPlan:
  num_batches = {
    jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(data.data)
  }
  if not num_batches:
    raise ValueError("`data.data` of StackedBatches is an empty pytree.")
  if None in num_batches or len(num_batches) > 1:
    raise ValueError(
      "`data` (StackedBatches) needs every leaf to have the same leading "
      f"batch axis, got leading sizes {sorted(map(str, num_batches))}."
    )
  (num,) = num_batches
  assert num is not None
  if num < 1:
    raise ValueError("`data` (StackedBatches) holds no batch.")
  total: Any
  if data.weights is None:
    weights = jnp.ones((num,))
    total = float(num)
  else:
    weights = jnp.asarray(data.weights)
    if weights.shape != (num,):
      raise ValueError(
        f"`data.weights` must have shape ({num},), one weight per batch, got "
        f"{weights.shape}."
      )
    if not checks.is_traced(weights):
      concrete = np.asarray(weights)
      if np.any(concrete < 0) or not concrete.sum() > 0:
        raise ValueError(
          f"`data.weights` must be >= 0 with a positive sum, got {concrete}."
        )
    total = jnp.sum(weights)
  return DataPlan(None, (_Group(data.data, weights),), total)


def _looks_like_batches(data: Any) -> bool:
  """Whether a tuple holds two or more containers of one structure: batches."""
  if type(data) is not tuple or len(data) < 2:
    return False
  structures = {jax.tree.structure(part) for part in data}
  return len(structures) == 1 and not jax.tree_util.all_leaves([data[0]])


def make_plan(data: Any) -> DataPlan:
  """Reads a data set: one batch, a list or iterator of batches, or stacked."""
  if isinstance(data, StackedBatches):
    return _plan_stacked(data)
  if _is_batch_sequence(data):
    return _plan_list(list(data))
  if data is None:
    raise ValueError(
      "`data` is None; pass a batch, a list of batches or StackedBatches."
    )
  if _looks_like_batches(data):
    raise ValueError(
      f"`data` is a tuple of {len(data)} pytrees of one structure "
      f"({jax.tree.structure(data[0])}): a tuple is read as one batch, and "
      "the loss would receive the whole tuple. Pass several batches as a "
      "list; pass one batch whose parts share a structure as a dict."
    )
  for path, leaf in jax.tree_util.tree_leaves_with_path(data):
    if jnp.ndim(leaf) and jnp.shape(leaf)[0] == 0:
      raise ValueError(
        f"`data` leaf {jax.tree_util.keystr(path) or '(root)'} holds no "
        "examples (leading size 0): the curvature of an empty batch is "
        "undefined."
      )
  return DataPlan(data, (), 1.0)


def average_over_data(
  per_batch: Callable[[PyTree, PyTree], PyTree], plan: DataPlan, v: PyTree
) -> PyTree:
  """The data-weighted average of ``per_batch(batch, v)``, accumulated in a scan."""
  if not plan.groups:
    return per_batch(plan.single_batch, v)
  total = None
  for group in plan.groups:

    def step(acc, inputs):
      batch, weight = inputs
      product = per_batch(batch, v)
      acc = jax.tree.map(lambda a, p: a + weight.astype(a.dtype) * p, acc, product)
      return acc, None

    zeros = jax.tree.map(
      lambda x: jnp.zeros(jnp.shape(x), checks.accumulation_dtype(x.dtype)), v
    )
    partial, _ = jax.lax.scan(step, zeros, (group.stacked, group.weights))
    total = partial if total is None else jax.tree.map(jnp.add, total, partial)
  return jax.tree.map(
    lambda x, like: (x / jnp.asarray(plan.total_weight).astype(x.dtype)).astype(
      like.dtype
    ),
    total,
    v,
  )


def reusable(data: Any) -> Any:
  """``data``, with an iterator of batches read into a list (it is read twice)."""
  return list(data) if isinstance(data, collections.abc.Iterator) else data
