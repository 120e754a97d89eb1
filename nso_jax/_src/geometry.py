"""Noise geometry: how the scale of the noise varies across the parameters.

NSO's noise is ``U = sigma * Z`` by default, the same scale everywhere. A
:class:`NoiseScale` gives each element its own scale, ``U = sigma * S(W) *
Z`` element-wise: per leaf, per filter (scaled by the filter's norm) or per
element (scaled by ``|w|``). The smoothed loss is then ``L(W) + (1/2)
tr(Sigma H) + O(sigma^4)`` with ``Sigma = diag(sigma^2 S(W)^2)``, which
:func:`nso_jax.hessian.weighted_trace` measures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax._src import checks
from nso_jax._src import selection
from nso_jax._src.checks import PyTree

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]
LeafScales = PyTree | Callable[[tuple[Any, ...], jax.Array], float]

_GEOMETRIES = ("leafwise", "filterwise", "elementwise")


@dataclasses.dataclass(frozen=True)
class NoiseScale:
  """The noise's scale per element, ``sigma * S(W)``; build it with a constructor.

  Use :func:`nso_jax.leafwise`, :func:`nso_jax.filterwise` or
  :func:`nso_jax.elementwise`; pass it where a ``sigma`` is taken.

  Attributes:
    sigma: the scalar factor, a float or (in NSO) a schedule of the update
      count; :func:`nso_jax.tune_sigma` and the curvature readings act on it.
    geometry: ``"leafwise"``, ``"filterwise"`` or ``"elementwise"``.
    leaf_scales: for ``"leafwise"``, the factor of each leaf: a pytree of
      floats whose structure is a prefix of the parameters', or a function
      ``(path, leaf) -> float``.
    filter_axis: for ``"filterwise"``, the axis (or axes) indexing the filters.
    eps: added to the norm (``"filterwise"``) or to ``|w|``
      (``"elementwise"``), so that zero weights still get noise.
  """

  sigma: ScalarOrSchedule
  geometry: str
  leaf_scales: Any = None
  filter_axis: int | tuple[int, ...] = -1
  eps: float = 0.0

  def __post_init__(self) -> None:
    checks.check_choice(self.geometry, _GEOMETRIES, "geometry")
    if callable(self.sigma):
      checks.check_scalar(self.sigma(jnp.zeros([], jnp.int32)), "sigma(0)", minimum=0.0)
    else:
      checks.check_scalar(self.sigma, "sigma", minimum=0.0)
    checks.check_scalar(self.eps, "eps", minimum=0.0)
    axes = (
      self.filter_axis if isinstance(self.filter_axis, tuple) else (self.filter_axis,)
    )
    if not axes or any(
      isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer))
      for a in axes
    ):
      raise ValueError(
        "`filter_axis` must be an int axis or a non-empty tuple of int axes, got "
        f"{self.filter_axis!r}."
      )
    if self.geometry == "leafwise":
      _check_leaf_scales(self.leaf_scales)


def leafwise(leaf_scales: LeafScales, sigma: ScalarOrSchedule = 1.0) -> NoiseScale:
  """Noise of one scale per leaf: ``U_l = sigma * s_l * Z_l``.

  A pytree of floats passed as ``sigma`` to NSO or the measures is
  ``leafwise(tree)``: each leaf's noise has that standard deviation.

  Args:
    leaf_scales: each leaf's factor ``s_l >= 0``: a pytree of floats whose
      structure is a prefix of the parameters' (``{"backbone": 0.1, "head":
      1.0}``), or a function ``(path, leaf) -> float`` of the leaf's path
      (as ``jax.tree_util.tree_leaves_with_path`` gives it) and value.
    sigma: a common factor, a float >= 0 or a schedule.

  Returns:
    A :class:`NoiseScale`.

  Example:
    >>> import jax.numpy as jnp
    >>> import nso_jax
    >>> scale = nso_jax.leafwise({"backbone": 0.001, "head": 0.01})
    >>> params = {"backbone": jnp.ones(2), "head": jnp.ones(3)}
    >>> [round(float(s), 6) for s in nso_jax.noise_std(scale, params).values()]
    [0.001, 0.01]
  """
  return NoiseScale(sigma, "leafwise", leaf_scales=leaf_scales)


def filterwise(
  sigma: ScalarOrSchedule, *, filter_axis: int | tuple[int, ...] = -1, eps: float = 0.0
) -> NoiseScale:
  r"""Noise scaled by each filter's norm: ``U = sigma * (||W_f|| + eps) * Z``.

  A filter is the slice of a leaf at one index of ``filter_axis``, the
  weights that make one output unit or channel (a column of a Flax Dense
  kernel ``(in, out)``, one output channel of a convolution kernel ``(...,
  in, out)``; pass ``filter_axis=0`` for Equinox or PyTorch layouts). All
  the entries of a filter share the standard deviation ``sigma *
  (||W_f||_2 + eps)``; a leaf with at most one axis (a bias, a
  normalisation scale) is one filter. This is the filter-wise noise of
  LPF-SGD and of adaptive random weight perturbation: it is invariant to
  rescaling a layer, as a ReLU network's function is. A filter of ``n``
  weights has a norm about ``sqrt(n)`` times its typical weight, so each
  weight is perturbed by about ``sigma * sqrt(n)`` of its typical size:
  ``filterwise(s / sqrt(n))`` perturbs about as much, relatively, as
  ``elementwise(s)``.

  The scale is computed from the weights at each update and held fixed
  during it (the gradient does not flow through it): the step follows the
  gradient of ``L + (1/2) tr(Sigma H)`` with ``Sigma`` frozen at ``W``.

  Args:
    sigma: the factor, a float >= 0 or a schedule.
    filter_axis: the axis of each leaf (of two or more axes) indexing its
      filters, or a tuple of axes, each combination of their indices one
      filter: for layers stacked in one leaf along axis 0 (``nn.scan``,
      ``nnx.vmap`` over layers) pass ``(0, -1)``, so that each layer's
      filters have their own norms (a stacked bias ``(layers, out)`` then
      gets ``|b|`` per entry). The norm is taken over the leaf's values as
      the computation sees them: under :func:`jax.jit` those of the whole
      array, however it is sharded; inside :func:`jax.shard_map` over
      parameters split along the summed axes, those of the local shard.
    eps: added to each filter's norm, >= 0.

  Returns:
    A :class:`NoiseScale`.

  Example:
    >>> import jax.numpy as jnp
    >>> import nso_jax
    >>> kernel = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # column norms 5 and 1
    >>> nso_jax.noise_std(nso_jax.filterwise(0.1), kernel)
    Array([[0.5, 0.1],
           [0.5, 0.1]], dtype=float32)

  References:
    Bisla, Wang, Choromanska, `Low-Pass Filtering SGD for Recovering Flat
    Optima in the Deep Learning Optimization Landscape
    <https://arxiv.org/abs/2201.08025>`_, AISTATS 2022.

    Li, Zhang, He, Huang, Yang, `Revisiting Random Weight Perturbation for
    Efficiently Improving Generalization <https://arxiv.org/abs/2404.00357>`_,
    TMLR 2024.
  """
  return NoiseScale(sigma, "filterwise", filter_axis=filter_axis, eps=eps)


def elementwise(sigma: ScalarOrSchedule, *, eps: float = 0.01) -> NoiseScale:
  r"""Scale-invariant noise per element: ``U = sigma * (|w| + eps) * Z``.

  Each weight is perturbed in proportion to its own magnitude, as ASAM's
  adaptive neighbourhood ``T_w = |w| + eta`` is shaped (``eps = eta =
  0.01`` there). The scale is held fixed during each update (see
  :func:`filterwise`).

  Args:
    sigma: the factor, a float >= 0 or a schedule.
    eps: added to ``|w|``, >= 0, so that zero weights still get noise.

  Returns:
    A :class:`NoiseScale`.

  Example:
    >>> import jax.numpy as jnp
    >>> import nso_jax
    >>> nso_jax.noise_std(nso_jax.elementwise(0.1, eps=0.0), jnp.array([-2.0, 0.5]))
    Array([0.2 , 0.05], dtype=float32)

  References:
    Kwon, Kim, Park, Choi, `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  return NoiseScale(sigma, "elementwise", eps=eps)


def as_noise_scale(sigma: Any) -> Any:
  """``sigma`` itself, or ``leafwise(sigma)`` for a pytree of floats."""
  if sigma is None or jax.tree_util.all_leaves([sigma]):
    return sigma  # a scalar, a schedule, a NoiseScale, or an invalid leaf
  return leafwise(sigma)


def split(sigma: Any) -> tuple[Any, NoiseScale | None]:
  """The scalar factor (or schedule) of ``sigma`` and its geometry, if any."""
  sigma = as_noise_scale(sigma)
  if isinstance(sigma, NoiseScale):
    return sigma.sigma, sigma
  return sigma, None


def relative_scales(
  scale: NoiseScale | None, params: PyTree, param_filter: Any = None
) -> list[Any] | None:
  """``S(W)`` per leaf of ``params`` (``None`` for isotropic noise), float32.

  Each entry broadcasts against its leaf; it is held constant (no gradient).
  Leaves that ``param_filter`` excludes, and non-float leaves, get ``None``.
  """
  if scale is None:
    return None
  paths_and_leaves = jax.tree_util.tree_leaves_with_path(params)
  keep = selection.selection_mask(params, param_filter)
  if scale.geometry == "leafwise":
    factors = _leaf_factors(scale.leaf_scales, params, paths_and_leaves)
    return [f if k else None for f, k in zip(factors, keep, strict=True)]
  scales: list[Any] = []
  for (_, w), k in zip(paths_and_leaves, keep, strict=True):
    if not k or not jnp.issubdtype(jnp.result_type(w), jnp.floating):
      scales.append(None)  # no noise on this leaf
      continue
    magnitude = jnp.abs(jax.lax.stop_gradient(jnp.asarray(w)).astype(jnp.float32))
    if scale.geometry == "filterwise" and magnitude.ndim >= 2:
      axes = _filter_axes(scale.filter_axis, magnitude.ndim)
      others = tuple(a for a in range(magnitude.ndim) if a not in axes)
      magnitude = jnp.sqrt(jnp.sum(magnitude**2, axis=others, keepdims=True))
    elif scale.geometry == "filterwise":
      magnitude = jnp.sqrt(jnp.sum(magnitude**2))
    scales.append(magnitude + scale.eps)
  return scales


def leaf_std(sigma: Any, scales: list[Any] | None, num_leaves: int) -> list[Any]:
  """The noise's standard deviation per leaf: ``sigma``, or ``sigma * S``."""
  if scales is None:
    return [sigma] * num_leaves
  return [sigma if s is None else sigma * s for s in scales]


def noise_std(sigma: Any, params: PyTree) -> PyTree:
  """The standard deviation of the noise on each parameter, ``sigma * S(W)``.

  What a ``sigma`` (a float, a pytree of floats, or a :class:`NoiseScale`
  with a constant factor) perturbs ``params`` with: each leaf's entry
  broadcasts against the leaf.

  Args:
    sigma: a float >= 0, a pytree of floats (one per leaf) or a
      :class:`NoiseScale` whose ``sigma`` is a float.
    params: the parameters ``W``.

  Returns:
    A pytree shaped like ``params``: each leaf the standard deviation of its
    noise (a scalar for isotropic or leaf-wise noise).

  Raises:
    ValueError: for a schedule (it has no value without a step), or a
      ``sigma`` that does not fit ``params``.
  """
  factor, scale = split(sigma)
  if callable(factor):
    raise ValueError(
      "`sigma` must have a value here: got a schedule; pass its value at a "
      "step, e.g. schedule(count)."
    )
  checks.check_scalar(factor, "sigma", minimum=0.0)
  scales = relative_scales(scale, params)
  leaves, treedef = jax.tree.flatten(params)
  if scales is None:
    scales = [1.0] * len(leaves)
  return jax.tree.unflatten(
    treedef,
    [
      jnp.broadcast_to(
        factor * jnp.asarray(0.0 if s is None else s, jnp.float32), _scale_shape(s, w)
      )
      for s, w in zip(scales, leaves, strict=True)
    ],
  )


def _scale_shape(s: Any, w: Any) -> tuple[int, ...]:
  return jnp.shape(w) if jnp.ndim(s) == jnp.ndim(w) and jnp.ndim(s) else ()


def _filter_axes(filter_axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
  axes = (filter_axis,) if isinstance(filter_axis, (int, np.integer)) else filter_axis
  for axis in axes:
    if not -ndim <= axis < ndim:
      raise ValueError(
        f"`filter_axis`={filter_axis} is out of range for a leaf of {ndim} axes: "
        f"expected axes in [{-ndim}, {ndim})."
      )
  return tuple(int(axis) % ndim for axis in axes)


def _check_leaf_scales(leaf_scales: Any) -> None:
  if callable(leaf_scales) and jax.tree_util.all_leaves([leaf_scales]):
    checks.check_signature(leaf_scales, "leaf_scales", 2, "(path, leaf) -> float")
    return
  leaves = jax.tree.leaves(leaf_scales)
  if not leaves:
    raise ValueError(
      "`sigma` per leaf must be a pytree of floats or a function (path, leaf) "
      f"-> float, got {leaf_scales!r}."
    )
  for value in leaves:
    checks.check_scalar(value, "sigma (per leaf)", minimum=0.0)


def _leaf_factors(
  leaf_scales: Any, params: PyTree, paths_and_leaves: list[Any]
) -> list[Any]:
  factors = selection.per_leaf(
    leaf_scales,
    params,
    "sigma",
    "float",
    " Give every leaf a value, 0.0 where no noise is wanted (leaves outside "
    "`param_filter` too: their value is not used).",
  )
  for (path, _), value in zip(paths_and_leaves, factors, strict=True):
    checks.check_scalar(
      value, f"sigma at {jax.tree_util.keystr(path) or '(root)'}", minimum=0.0
    )
  return [jnp.asarray(value, jnp.float32) for value in factors]


def check_fits(
  scale: NoiseScale | None, params: PyTree, param_filter: Any = None
) -> None:
  """Raises a clear error unless the geometry ``scale`` fits ``params``."""
  if scale is not None:
    jax.eval_shape(lambda p: relative_scales(scale, p, param_filter), params)
