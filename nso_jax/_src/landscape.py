"""Loss landscapes: the loss on a line or a plane through the parameters.

A landscape is the loss :math:`L(W + a\\,d_1 + b\\,d_2)` on a grid of
coordinates :math:`(a, b)` (or :math:`L(W + a\\,d_1)` along one direction).
:func:`loss_landscape` evaluates it, in batches of grid points through
:func:`nso_jax.batching.map_indices` inside the caller's compiled program,
over one batch or a whole data set, along any directions:

* :func:`filter_normalized_direction`: a Gaussian direction whose every
  filter is rescaled to the norm of the corresponding filter of :math:`W`
  (Li et al., 2018), so that landscapes of differently scaled networks
  compare;
* :func:`eigenvector_directions`: the top eigenvectors of the loss Hessian,
  along which the loss curves most.

:func:`~nso_jax.hessian.plot_loss_landscape` draws the result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import data_plans
from nso_jax._src import lanczos
from nso_jax._src import mesh
from nso_jax._src import operators
from nso_jax._src import selection
from nso_jax._src.checks import PyTree
from nso_jax._src.operators import LossFn
from nso_jax._src.selection import ParamFilter

VECTOR_LEAVES = ("zero", "weights")
DEFAULT_POINTS = 21
MAX_DIRECTIONS = 2


class LossLandscape(NamedTuple):
  """The loss on a grid of a line or a plane through the parameters.

  Attributes:
    coordinates: one 1-D array per direction: the grid's :math:`a` (and
      :math:`b`) values.
    losses: the loss at each grid point, of shape ``(len(a),)`` or
      ``(len(a), len(b))``: ``losses[i, j]`` is
      :math:`L(W + a_i d_1 + b_j d_2)`.
    directions: the directions :math:`d_1` (and :math:`d_2`), pytrees shaped
      like the parameters (zero on the leaves ``param_filter`` excludes).
  """

  coordinates: tuple[jax.Array, ...]
  losses: jax.Array
  directions: tuple[PyTree, ...]


def _is_none(x: Any) -> bool:
  return x is None


def _fill_zeros(selected: PyTree, params: PyTree) -> PyTree:
  """``selected`` with its ``None`` leaves (unselected) replaced by zeros."""
  leaves = jax.tree.leaves(selected, is_leaf=_is_none)
  filled = [
    jnp.zeros_like(param) if leaf is None else leaf
    for leaf, param in zip(leaves, jax.tree.leaves(params), strict=True)
  ]
  return jax.tree.unflatten(jax.tree.structure(params), filled)


def _filter_normalize(
  d: jax.Array, w: jax.Array, axis: int, where: str, vectors: str
) -> jax.Array:
  """``d`` with each filter (slice at one index of ``axis``) at ``w``'s norm."""
  if d.ndim <= 1:
    return jnp.zeros_like(w) if vectors == "zero" else w
  if not -d.ndim <= axis < d.ndim:
    raise ValueError(
      f"`filter_axis`={axis} is out of range for leaf {where} of shape "
      f"{d.shape}; expected an axis in [{-d.ndim}, {d.ndim}), the axis that "
      "indexes the filters (output units or channels)."
    )
  dtype = checks.accumulation_dtype(w.dtype)
  others = tuple(i for i in range(d.ndim) if i != axis % d.ndim)
  norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(dtype)), others, keepdims=True))
  d_norm, w_norm = norm(d), norm(w)
  scale = jnp.where(d_norm > 0, w_norm / jnp.where(d_norm > 0, d_norm, 1), 0)
  return (d.astype(dtype) * scale).astype(w.dtype)


def filter_normalized_direction(
  params: PyTree,
  key: checks.KeyLike,
  *,
  filter_axis: int = -1,
  vector_leaves: str = "zero",
  param_filter: ParamFilter = None,
) -> PyTree:
  r"""A random direction, filter by filter at the scale of the parameters.

  Li et al. (2018) compare landscapes of networks whose weights have
  different scales (a ReLU network's function is unchanged when a layer is
  scaled by :math:`c` and the next by :math:`1/c`) by drawing a Gaussian
  direction :math:`d` and rescaling each of its filters to the norm of the
  corresponding filter of :math:`W`,

  .. math::
    d_{l,j} \leftarrow \frac{d_{l,j}}{\lVert d_{l,j} \rVert}
    \lVert W_{l,j} \rVert,

  with :math:`d_{l,j}` filter :math:`j` of leaf :math:`l`: the slice of the
  leaf at index :math:`j` of its ``filter_axis``, the weights that make one
  output unit or channel. The default ``filter_axis=-1`` suits Flax and
  Haiku, whose Dense kernels are ``(in, out)`` and convolution kernels
  ``(..., in, out)``: a filter is a column of a Dense kernel, and one
  output channel's ``(..., in)`` block of a convolution kernel. Equinox and
  PyTorch put the output first (``(out, in)``, ``(out, in, ...)``): pass
  ``filter_axis=0``. Leaves with at most one axis (biases, normalisation
  scales) are set to zero by default, the authors' choice
  (``ignore='biasbn'`` in their code); ``vector_leaves="weights"`` takes
  :math:`d_l = W_l` there instead, their other option.

  The Gaussian is drawn from ``key`` as one vector of all the leaves'
  entries, in ``jax.tree.leaves`` order (one random draw to compile, not one
  per leaf), whether or not ``param_filter`` selects a leaf: the same key
  gives the same direction on a leaf whatever the selection.

  Args:
    params: the parameters :math:`W`, any pytree of float arrays.
    key: an int seed or a ``jax.random.key``.
    filter_axis: the axis of each leaf (of two or more axes) that indexes
      its filters.
    vector_leaves: ``"zero"`` or ``"weights"``, the direction on the leaves
      with at most one axis.
    param_filter: draw the direction on some leaves only, zero elsewhere
      (see :func:`~nso_jax.hessian.hessian_operator`).

  Returns:
    The direction, a pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "bias": jnp.ones(2)}
    >>> d = hessian.filter_normalized_direction(params, key=0)
    >>> jnp.linalg.norm(d["kernel"], axis=0).round(4)  # the kernel's column norms
    Array([5., 1.], dtype=float32)
    >>> d["bias"]
    Array([0., 0.], dtype=float32)

  References:
    Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of
    Neural Nets", NeurIPS 2018.
  """
  key = checks.canonicalize_key(key)
  checks.check_choice(vector_leaves, VECTOR_LEAVES, "vector_leaves")
  if isinstance(filter_axis, (bool, np.bool_)) or not isinstance(
    filter_axis, (int, np.integer)
  ):
    raise ValueError(f"`filter_axis` must be an int axis, got {filter_axis!r}.")
  selected, _ = selection.select(params, param_filter)
  checks.check_float_tree(
    selected, "params", "a direction is defined for floating-point leaves only"
  )
  paths_and_leaves = jax.tree_util.tree_leaves_with_path(params)
  sizes = [math.prod(jnp.shape(w)) for _, w in paths_and_leaves]
  gaussian = jax.random.normal(key, (sum(sizes),), _draw_dtype(params))
  offsets = np.cumsum([0, *sizes])
  mask = jax.tree.leaves(selected, is_leaf=_is_none)
  leaves = []
  for index, (keep, (path, w)) in enumerate(zip(mask, paths_and_leaves, strict=True)):
    if keep is None:
      leaves.append(jnp.zeros_like(w))
      continue
    d = gaussian[offsets[index] : offsets[index + 1]].reshape(jnp.shape(w))
    where = jax.tree_util.keystr(path) or "(root)"
    leaves.append(
      _filter_normalize(d, jnp.asarray(w), int(filter_axis), where, vector_leaves)
    )
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def _draw_dtype(params: PyTree) -> Any:
  """The dtype the Gaussian is drawn in: that of all float leaves, >= float32."""
  dtypes = [
    checks.accumulation_dtype(jnp.result_type(w))
    for w in jax.tree.leaves(params)
    if jnp.issubdtype(jnp.result_type(w), jnp.floating)
  ]
  return functools.reduce(jnp.promote_types, dtypes, np.dtype(np.float32))


def eigenvector_directions(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike,
  *,
  num_directions: int = 2,
  num_steps: int | None = None,
  param_filter: ParamFilter = None,
) -> tuple[jax.Array, tuple[PyTree, ...]]:
  """The top Hessian eigenvalues and their eigenvectors, as directions.

  :func:`~nso_jax.hessian.top_eigenvalues` with ``return_eigenvectors=True``
  (Lanczos), its eigenvectors unstacked into one unit-norm pytree per
  eigenvalue, shaped like ``params`` (zero on the leaves ``param_filter``
  excludes), ready for :func:`loss_landscape`. Along eigenvector :math:`v`
  of eigenvalue :math:`\\lambda`, the loss near a minimum rises as
  :math:`L(W) + \\tfrac{\\lambda}{2} a^2`. An eigenvector's sign is
  arbitrary.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or
      :class:`~nso_jax.hessian.StackedBatches`.
    key: an int seed or a ``jax.random.key``.
    num_directions: how many eigenvectors, largest eigenvalue first.
    num_steps: Lanczos steps; ``None`` uses ``max(40, 2 * num_directions)``,
      capped at the dimension.
    param_filter: the Hessian of some leaves only (see
      :func:`~nso_jax.hessian.hessian_operator`).

  Returns:
    ``(eigenvalues, directions)``: the ``num_directions`` largest eigenvalues,
    decreasing, and a tuple of their eigenvectors.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[1.0, 4.0, 2.0]])  # H = diag(x)
    >>> values, (v,) = hessian.eigenvector_directions(
    ...     loss, jnp.ones(3), x, key=0, num_directions=1)
    >>> values.round(4), jnp.abs(v).round(4)
    (Array([4.], dtype=float32), Array([0., 1., 0.], dtype=float32))
  """
  count = checks.check_positive_int(num_directions, "num_directions")
  operator = operators.hessian_operator(
    loss_fn, params, data_plans.reusable(data), param_filter=param_filter
  )
  values, vectors = lanczos.lanczos_eigenvalues(
    *operator,
    key,
    num_eigenvalues=count,
    num_steps=num_steps,
    which="LA",
    return_eigenvectors=True,
  )
  directions = tuple(
    _fill_zeros(jax.tree.map(lambda x, i=i: x[i], vectors), params)
    for i in range(count)
  )
  return values, directions


def _as_direction_list(directions: Any, params: PyTree) -> list[PyTree]:
  """One or two directions: a pytree like ``params``, or a list/tuple of them."""
  if checks.same_structure(directions, params):
    return [directions]
  if isinstance(directions, (list, tuple)) and 1 <= len(directions) <= MAX_DIRECTIONS:
    return list(directions)
  count = f" of {len(directions)}" if isinstance(directions, (list, tuple)) else ""
  raise ValueError(
    f"`directions` must be a pytree shaped like `params` or a list of one or "
    f"{MAX_DIRECTIONS} such pytrees, got a {type(directions).__name__}{count} "
    f"with structure {jax.tree.structure(directions)}; `params` has structure "
    f"{jax.tree.structure(params)}."
  )


def _check_direction(direction: PyTree, name: str) -> None:
  """Refuses a concrete direction that is zero or not finite."""
  leaves = jax.tree.leaves(direction)
  if any(checks.is_traced(leaf) for leaf in leaves):
    return
  values = [np.asarray(leaf, np.float64) for leaf in leaves]
  if not all(np.all(np.isfinite(v)) for v in values):
    raise ValueError(f"`{name}` holds NaN or infinite values; expected finite ones.")
  if not any(np.any(v != 0) for v in values):
    raise ValueError(
      f"`{name}` is zero on every selected leaf: the loss would be constant "
      "along it. Expected a non-zero direction (filter_normalized_direction "
      "gives zero on leaves with at most one axis: select others)."
    )


def _grid_axes(coordinates: Any, count: int) -> list[jax.Array]:
  """The grid's 1-D coordinate arrays, one per direction, checked."""
  if coordinates is None:
    return [jnp.linspace(-1.0, 1.0, DEFAULT_POINTS) for _ in range(count)]
  several = isinstance(coordinates, (list, tuple)) and any(
    np.ndim(c) >= 1 for c in coordinates
  )
  axes = list(coordinates) if several else [coordinates]
  if len(axes) != count:
    raise ValueError(
      f"`coordinates` has {len(axes)} axes, expected {count}: one 1-D array "
      "of coordinates per direction."
    )
  checked = []
  for index, axis in enumerate(axes):
    name = "coordinates" if count == 1 and not several else f"coordinates[{index}]"
    if checks.is_traced(axis):
      values = axis
    else:
      values = np.asarray(axis)
      if values.dtype == object or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"`{name}` must be a 1-D array of numbers, got {axis!r}.")
    if np.ndim(values) != 1 or np.shape(values)[0] < 2:
      raise ValueError(
        f"`{name}` must be a 1-D array of at least 2 coordinates, got shape "
        f"{np.shape(values)}."
      )
    if not checks.is_traced(axis) and not (
      np.all(np.isfinite(values)) and np.all(np.diff(values) > 0)
    ):
      raise ValueError(
        f"`{name}` must be finite and strictly increasing, got {values.tolist()}."
      )
    checked.append(jnp.asarray(values))
  return checked


def _loss_dtype(loss_fn: LossFn, params: PyTree, plan: data_plans.DataPlan) -> Any:
  return checks.accumulation_dtype(
    jax.eval_shape(loss_fn, params, plan.first_batch()).dtype
  )


def loss_landscape(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  directions: Any,
  coordinates: Any = None,
  *,
  param_filter: ParamFilter = None,
  execution: batching.ExecutionLike = "auto",
  data_axis: mesh.AxisName | None = None,
) -> LossLandscape:
  r"""The loss on a grid of a line or a plane through the parameters.

  Along one direction :math:`d_1`, the loss :math:`L(W + a_i d_1)` at each
  coordinate :math:`a_i`; along two, :math:`L(W + a_i d_1 + b_j d_2)` at
  each point of the grid, with :math:`L` the mean loss over the data set
  (batches weighted by their example counts, as in
  :func:`~nso_jax.hessian.hessian_operator`). Use
  :func:`filter_normalized_direction` for the random directions of Li et al.
  (2018), whose distances compare across networks, or
  :func:`eigenvector_directions` for the sharpest ones.

  The grid's points are independent evaluations, run by
  :func:`nso_jax.batching.map_indices` as ``execution`` says (point
  :math:`(i, j)` is index ``i * len(b) + j``): with ``"map"``, memory is
  that of one chunk of points whatever the grid's size, and inside
  :func:`jax.shard_map`, ``Execution(axis=...)`` splits the points over the
  devices of a mesh axis.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the centre :math:`W`, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or
      :class:`~nso_jax.hessian.StackedBatches`.
    directions: :math:`d_1`, a pytree shaped like ``params``, or a list or
      tuple of one or two such pytrees (:math:`d_1, d_2`).
    coordinates: the grid: a 1-D array of coordinates per direction
      (a 1-D array for one direction, a pair of them for two), each finite
      and strictly increasing; ``None`` uses 21 points from -1 to 1 each.
    param_filter: move some leaves only, the others held at :math:`W`; the
      directions' other leaves are ignored (see
      :func:`~nso_jax.hessian.hessian_operator`).
    execution: how the grid's points run, a
      :class:`~nso_jax.batching.Execution` or a strategy name.
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which ``data`` is split, ``loss_fn`` being the shard's loss: each
      point's loss is the mean of the shards' (one ``psum``).

  Returns:
    A :class:`LossLandscape` ``(coordinates, losses, directions)``.

  Raises:
    ValueError: for directions not shaped like ``params``, zero or not
      finite, more than two of them, or coordinates that are not 1-D,
      finite and increasing, or not one array per direction.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> x = jnp.array([[1.0, 4.0]])  # H = diag(1, 4)
    >>> d1, d2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    >>> grid = (jnp.array([0.0, 1.0]), jnp.array([0.0, 1.0]))
    >>> landscape = hessian.loss_landscape(loss, jnp.zeros(2), x, [d1, d2], grid)
    >>> landscape.losses  # 0.5 a^2 + 2 b^2
    Array([[0. , 2. ],
           [0.5, 2.5]], dtype=float32)

  References:
    Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of
    Neural Nets", NeurIPS 2018.
  """
  execution = batching.as_execution(execution)
  data = data_plans.reusable(data)
  # Validates params, data, loss_fn and param_filter as every measure does.
  operator = operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter, data_axis=data_axis
  )
  selected, merge = selection.select(params, param_filter)
  given = _as_direction_list(directions, params)
  names = ["directions"] if len(given) == 1 else ["directions[0]", "directions[1]"]
  moves = [
    selection.restrict_like(operator.template, d, params, name)
    for d, name in zip(given, names, strict=True)
  ]
  for move, name in zip(moves, names, strict=True):
    _check_direction(move, name)
  axes = _grid_axes(coordinates, len(moves))
  shape = tuple(int(axis.shape[0]) for axis in axes)
  plan = data_plans.make_plan(data)
  dtype = _loss_dtype(loss_fn, params, plan)
  losses = batching.map_indices(
    _point_loss(
      loss_fn, plan, dtype, (selected, merge), list(zip(axes, moves, strict=True))
    ),
    math.prod(shape),
    execution=execution,
  )
  data_axes = mesh.check_axis_name(data_axis, "data_axis")
  if data_axes:
    losses = mesh.psum_varying(losses, data_axes) / mesh.axis_size(data_axes)
  directions_used = tuple(_fill_zeros(move, params) for move in moves)
  return LossLandscape(tuple(axes), losses.reshape(shape), directions_used)


def _point_loss(
  loss_fn: LossFn,
  plan: data_plans.DataPlan,
  dtype: Any,
  selection_pair: tuple[PyTree, Any],
  steps: Sequence[tuple[jax.Array, PyTree]],
) -> Any:
  """``index ->`` the mean loss at grid point ``index`` (row-major)."""
  selected, merge = selection_pair
  shape = tuple(int(axis.shape[0]) for axis, _ in steps)
  zero = jnp.zeros((), dtype)

  def point_loss(index: jax.Array) -> jax.Array:
    moved = selected
    for (axis, move), i in zip(steps, jnp.unravel_index(index, shape), strict=True):
      step = axis[i]
      moved = jax.tree.map(
        lambda w, v, step=step: w + (step * v).astype(w.dtype), moved, move
      )
    full = merge(moved)
    per_batch = lambda batch, _: loss_fn(full, batch).astype(dtype)
    return data_plans.average_over_data(per_batch, plan, zero)

  return point_loss
