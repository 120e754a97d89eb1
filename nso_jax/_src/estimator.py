"""The two-point noise stability gradient estimator.

Noise stability optimisation (NSO) minimises the smoothed loss
``F(W) = E_U[L(W + U)]``, ``U ~ N(0, sigma^2 I)``. Its gradient is estimated
from ``k`` antithetic pairs of perturbed gradients, which cancel every
odd-order term of the Taylor expansion exactly.

:func:`estimate` is the algorithm: perturb, evaluate the pairs, average. Its
settings are checked once, into an :class:`Estimator`, by whoever builds it:
:func:`noise_stability_gradient` on each call, the Optax transformation once
when it is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import geometry
from nso_jax._src import mesh
from nso_jax._src import noise as noise_lib
from nso_jax._src import selection

GradFn = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Estimator:
  """The estimator's settings, checked by :func:`make_estimator`."""

  num_perturbations: int
  noise: noise_lib.NoiseName
  one_sided: bool
  param_filter: selection.ParamFilter
  execution: batching.Execution
  data_axes: tuple[str, ...]


def make_estimator(
  num_perturbations: Any,
  noise: Any,
  one_sided: Any,
  param_filter: Any,
  execution: Any,
  data_axis: Any,
) -> Estimator:
  """Checks the estimator's settings, outside any mapped function."""
  execution = batching.as_execution(execution)
  data_axes = mesh.check_axis_name(data_axis, "data_axis", bound=False)
  if set(mesh.check_axis_name(execution.axis, "execution.axis", bound=False)) & set(
    data_axes
  ):
    raise ValueError(
      f"`execution.axis`={execution.axis!r} and `data_axis`={data_axis!r} share "
      "an axis: a device either splits the pairs or the batch along each axis."
    )
  return Estimator(
    num_perturbations=checks.check_positive_int(num_perturbations, "num_perturbations"),
    noise=noise_lib.check_noise(noise),  # type: ignore[arg-type]
    one_sided=checks.check_bool(one_sided, "one_sided"),
    param_filter=check_param_filter(param_filter),
    execution=execution,
    data_axes=data_axes,
  )


def check_param_filter(param_filter: Any) -> selection.ParamFilter:
  """Checks the kind of ``param_filter``; its fit to ``params`` is checked later."""
  if param_filter is None:
    return param_filter
  if callable(param_filter) and jax.tree_util.all_leaves([param_filter]):
    selection.check_filter_signature(param_filter)
    return param_filter
  for flag in jax.tree.leaves(param_filter):
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(
        "`param_filter` must be None, a callable (path, leaf) -> bool or a "
        f"pytree of Python bools; got a leaf {flag!r}."
      )
  return param_filter


def check_sigma(sigma: Any) -> Any:
  """Checks a concrete ``sigma`` (finite, >= 0); a traced one passes through."""
  return checks.check_scalar(sigma, "sigma", minimum=0.0)


def _to_accumulator(tree: Any) -> Any:
  def widen(x: Any) -> jax.Array:
    x = jnp.asarray(x)  # a Python float in a value's aux
    return x.astype(checks.accumulation_dtype(x.dtype))

  return jax.tree.map(widen, tree)


def estimate(
  settings: Estimator,
  grad_fn: GradFn,
  params: Any,
  key: jax.Array,
  sigma: Any,
  scales: list[Any] | None = None,
) -> tuple[Any, Any]:
  r"""Perturbs, evaluates the pairs and averages: the estimator itself.

  Pair ``j`` draws unit-variance noise ``Z_j`` from ``fold_in(key, j)``,
  scales it, ``U_j = sigma Z_j`` (``sigma S Z_j`` with the noise geometry's
  per-leaf ``scales`` ``S``, see ``geometry.relative_scales``), and
  evaluates ``grad_fn`` at ``W + U_j`` and ``W - U_j`` (only the first if
  one-sided). The pairs run as ``settings.execution`` says; one ``psum``
  over the data and pair axes sums them and the data shards; the sum is
  scaled to the mean.

  Returns:
    ``(value, G)``: ``G`` like ``params``, ``value`` the mean of the values
    ``grad_fn`` returned at the perturbed weights (``None`` when it returns
    gradients only), each in the dtype ``grad_fn`` returns.
  """
  perturbed = selection.selection_mask(params, settings.param_filter)
  has_value, value_shapes, grad_shapes = gradient_shapes(grad_fn, params, perturbed)
  # Inside the mapped function, the axes must be shard_map axes, and the batch
  # split as declared: else the estimate is off by a number of devices.
  mesh.check_declared_axes(
    grad_fn,
    params,
    data_axes=mesh.check_bound_axes(settings.data_axes or None, "data_axis"),
    execution_axes=mesh.check_bound_axes(settings.execution.axis, "execution.axis"),
    name="grad_fn",
    returns_value=has_value,
  )
  leaves, treedef = jax.tree.flatten(params)
  # Excluded non-float leaves get no noise and no gradient (zeros).
  frozen = selection.frozen_leaves(params, perturbed)
  noise_params = selection.stand_in_frozen(params, frozen)
  # A run-time sigma is checked where it is used: an invalid one gives NaN,
  # never a silently different step (a negative sigma would act as |sigma|).
  sigma = checks.nan_unless_valid(sigma, minimum=0.0)
  std = geometry.leaf_std(sigma, scales, len(leaves))  # once, outside the pairs

  def evaluate(shift: Callable, u: list[jax.Array]) -> tuple[Any, Any]:
    """``(value, grads)`` at ``W`` shifted by ``u``, in at least float32."""
    w = [
      shift(x, ui) if keep else x
      for x, ui, keep in zip(leaves, u, perturbed, strict=True)
    ]
    # Parameters typed as varying over the data axes make `jax.grad` inside
    # `grad_fn` return this shard's gradient; replicated ones would make it
    # all-reduce the gradient of every evaluation on its own.
    w = jax.tree.map(lambda x: mesh.mark_varying(x, settings.data_axes), w)
    out = grad_fn(jax.tree.unflatten(treedef, w))
    value, grads = out if has_value else (None, out)
    return _to_accumulator((value, selection.stand_in_frozen(grads, frozen)))

  def pair_sum(index: jax.Array) -> tuple[Any, Any]:
    z = noise_lib.sample_noise(
      jax.random.fold_in(key, index), noise_params, settings.noise
    )
    u = [
      zi * jnp.asarray(si, zi.dtype)
      for zi, si in zip(jax.tree.leaves(z), std, strict=True)
    ]
    total = evaluate(jnp.add, u)
    if not settings.one_sided:
      total = jax.tree.map(jnp.add, total, evaluate(jnp.subtract, u))
    return total

  resolved = batching.resolve(
    settings.execution,
    settings.num_perturbations,
    pair_sum,
    size_name="num_perturbations",
  )
  value_sum, grad_sum = mesh.psum_varying(
    batching.partial_sum(pair_sum, resolved), settings.data_axes + resolved.axes
  )
  num_evaluations = settings.num_perturbations * (1 if settings.one_sided else 2)
  scale = 1.0 / (num_evaluations * mesh.axis_size(settings.data_axes))
  mean = lambda total, shape: (total * scale).astype(shape.dtype)
  value = jax.tree.map(mean, value_sum, value_shapes) if has_value else None
  grad_leaves = [
    selection.zeros_like_shape(shape) if is_frozen else mean(total, shape)
    for total, shape, is_frozen in zip(
      jax.tree.leaves(grad_sum), jax.tree.leaves(grad_shapes), frozen, strict=True
    )
  ]
  return value, jax.tree.unflatten(jax.tree.structure(grad_shapes), grad_leaves)


def gradient_shapes(
  grad_fn: GradFn, params: Any, perturbed: list[bool] | None = None
) -> tuple[bool, Any, Any]:
  """Traces ``grad_fn`` once and checks what it returns.

  The perturbed leaves (``perturbed``, all by default) must be floating
  point; an excluded leaf may have any dtype, and its gradient too.

  ``grad_fn`` returns gradients, with the structure of ``params``, or
  ``(value, grads)`` as :func:`jax.value_and_grad` does. The two cannot be
  confused: an output with the structure of ``params`` is gradients, since a
  pair whose second element has the structure of ``params`` cannot have that
  structure itself (a tree is never the structure of its own strict subtree).

  Returns:
    Whether ``grad_fn`` returns a value, and the shapes of the value
    (``None`` without) and of the gradients.
  """
  checks.check_callable(grad_fn, "grad_fn", "(params) -> grads")
  perturbed = perturbed or [True] * len(jax.tree.leaves(params))
  checks.check_float_tree(
    selection.select_by_mask(params, perturbed), "params", checks.FLOAT_PARAMS
  )
  out = jax.eval_shape(grad_fn, params)
  if checks.same_structure(out, params):
    has_value, value_shapes, grad_shapes = False, None, out
  elif (
    isinstance(out, tuple) and len(out) == 2 and checks.same_structure(out[1], params)
  ):
    has_value, (value_shapes, grad_shapes) = True, out
  else:
    raise ValueError(
      "`grad_fn(params)` must return gradients with the structure of "
      "`params`, or a pair (value, grads) as jax.value_and_grad does.\n"
      f"  params: {jax.tree.structure(params)}\n"
      f"  returned: {jax.tree.structure(out)}"
    )
  for leaf in jax.tree.leaves(value_shapes):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
        "the value returned by `grad_fn` is averaged over perturbations, so "
        f"its leaves must be floating point; got a leaf of dtype {leaf.dtype}."
      )
  _check_gradient_leaves(grad_shapes, params, perturbed)
  return has_value, value_shapes, grad_shapes


def _check_gradient_leaves(
  grad_shapes: Any, params: Any, perturbed: list[bool]
) -> None:
  frozen = selection.frozen_leaves(params, perturbed)
  for (path, g), p, is_frozen in zip(
    jax.tree_util.tree_leaves_with_path(grad_shapes),
    jax.tree.leaves(params),
    frozen,
    strict=True,
  ):
    where = jax.tree_util.keystr(path) or "(root)"
    if g.shape != jnp.shape(p):
      raise ValueError(
        f"`grad_fn(params)` returned a gradient of shape {g.shape} at {where} "
        f"for a parameter of shape {jnp.shape(p)}."
      )
    if not is_frozen and not jnp.issubdtype(g.dtype, jnp.floating):
      raise TypeError(
        f"`grad_fn(params)` returned a gradient of dtype {g.dtype} at {where}; "
        "gradients are averaged, so they must be floating point (an integer "
        "mean would be truncated)."
      )


def noise_stability_gradient(
  grad_fn: GradFn,
  params: Any,
  key: checks.KeyLike,
  *,
  sigma: Any,
  num_perturbations: int = 1,
  noise: noise_lib.NoiseName = "normal",
  one_sided: bool = False,
  param_filter: selection.ParamFilter = None,
  execution: batching.ExecutionLike = "auto",
  data_axis: mesh.AxisName | None = None,
) -> Any:
  r"""Estimates the gradient of the noise-smoothed loss at ``params``.

  With ``k = num_perturbations`` and unit-variance noise
  ``Z_j = sample_noise(fold_in(key, j), params, noise)``, ``U_j = sigma Z_j``,
  the two-point estimate is

  .. math::

    G = \frac{1}{2k} \sum_{j=1}^{k}
        \left[\nabla L(W + U_j) + \nabla L(W - U_j)\right].

  The pair cancels every odd-order term of the Taylor expansion: for a
  quadratic loss ``G`` is the exact gradient for any noise, and in general
  :math:`E[G] = \nabla L(W) + \tfrac{\sigma^2}{2}\nabla \operatorname{tr}
  H(W) + O(\sigma^4)` for Gaussian noise, the gradient of the smoothed loss
  :math:`F(W) = E[L(W + U)]`.

  ``grad_fn`` returns gradients, with the structure of ``params``, or a pair
  ``(value, grads)`` as :func:`jax.value_and_grad` does; which one is read
  from its output when it is traced (a pair whose second element has the
  structure of ``params`` cannot have that structure itself, so the two
  never clash). With a value, the result is ``(value, G)``, ``value``
  averaged over the perturbed evaluations; it may be any pytree of floats
  (e.g. ``(loss, aux)`` from ``jax.value_and_grad(loss, has_aux=True)``).

  Options beyond the paper's setting:

  * ``one_sided=True``: :math:`G = \frac1k\sum_j \nabla L(W + U_j)`, random
    weight perturbation, the ablation baseline (``k`` evaluations).
  * ``param_filter``: perturb only the selected leaves (say, the weight
    matrices of the layers being fine-tuned); the others are evaluated
    unperturbed. The selected leaves' noise is the same, bit for bit, as
    without a filter.
  * Mixing in the clean gradient, which :func:`nso_jax.noise_stability`
    does with ``clean_weight=lam``, is by hand ``lam * clean + (1 - lam) *
    G``, with ``clean = grad_fn(params)``.

  On several devices, inside :func:`jax.shard_map` (see the multi-device
  guide):

  * ``execution=Execution(axis=...)``: the devices of this mesh axis split
    the ``k`` pairs (pair ``j`` runs on device ``j mod n``), all on the same
    batch. Since pair ``j``'s noise depends only on ``(key, j)``, the
    estimate does not depend on the number of devices. When ``n`` does not
    divide ``k``, the devices run ``ceil(k / n)`` pairs each, the surplus
    evaluated and discarded.
  * ``data_axis``: the batch is split over this axis (or axes): ``grad_fn``
    returns the gradient of this device's shard of the batch, and the
    estimate is the mean over the shards. One ``psum`` over the data and
    pair axes together combines everything.
  * Per-shard noise, which :func:`nso_jax.noise_stability` draws with
    ``per_shard_noise=True`` (each data shard its own ``k`` pairs: ``n``
    shards average ``n k`` pairs at the cost of ``k``), is by hand a key
    folded with the shard's index: ``key = jax.random.fold_in(key,
    jax.lax.axis_index(data_axis))``. This is a different estimator: it
    changes with the number of shards.

  Pair ``j`` draws its noise from ``jax.random.fold_in(key, j)`` alone, so the
  result does not depend on how the pairs are executed, up to the order of
  floating-point summation. ``execution`` (a
  :class:`nso_jax.batching.Execution` or a strategy name) says how:

  * ``"vmap"``: all evaluations as one batched computation (fastest on
    accelerators, memory grows with ``k``);
  * ``"map"``: a ``lax.scan`` over chunks of ``Execution.chunk_size`` pairs
    (default 1 on CPU: sequential; 16 on accelerators), each chunk batched
    with ``vmap``; memory is bounded by the chunk, whatever ``k``;
  * ``"unroll"``: the evaluations one after another in the compiled graph;
  * ``"auto"``: :func:`nso_jax.batching.default_execution` for the current
    backend: ``"vmap"`` on accelerators; on CPU ``"map"``, or ``"unroll"``
    when ``grad_fn`` computes convolutions and ``k <= 8``.

  The pairs run through :mod:`nso_jax.batching`, the seam the Hessian tools'
  probes use too. Gradients are accumulated in at least float32 and returned
  in the dtype ``grad_fn`` returns them in. Call it inside ``jax.jit`` (the
  train step): outside, the ``"map"`` strategy's loop is traced and compiled
  anew on every call.

  Args:
    grad_fn: maps parameters to gradients with the same structure, e.g.
      ``lambda p: jax.grad(loss)(p, batch)``, or to ``(value, grads)``.
    params: a pytree of floating-point arrays, the point ``W``.
    key: an int seed or a PRNG key; it fully determines the noise.
    sigma: the noise scale, a float >= 0 or a scalar array.
    num_perturbations: ``k``, the number of noise draws (pairs).
    noise: ``"normal"`` (the paper's), ``"uniform"``, ``"laplace"`` or
      ``"rademacher"``, all of variance ``sigma**2``, or ``"normal_fast"``, a
      cheaper approximation of ``"normal"`` with the same first two moments;
      see :func:`nso_jax.sample_noise`.
    one_sided: evaluate at ``W + U_j`` only.
    param_filter: the leaves to perturb: ``None`` (all), a pytree of Python
      bools whose structure is a prefix of ``params``, or a function
      ``(path, leaf) -> bool``, as the Hessian tools take it.
    execution: how the pairs run, a :class:`nso_jax.batching.Execution` or
      ``"auto"``, ``"vmap"``, ``"map"`` or ``"unroll"``; its ``axis`` (inside
      ``shard_map`` only) names the mesh axis whose devices split the pairs.
    data_axis: the mesh axis name(s) over which the batch is split;
      ``grad_fn`` returns the local gradient, without a ``pmean``.

  Returns:
    The estimate ``G``, a pytree like ``params``; when ``grad_fn`` returns
    ``(value, grads)``, the pair ``(value, G)``.

  Raises:
    ValueError, TypeError: on invalid settings or a ``grad_fn`` whose output
      does not match ``params``; inside :func:`jax.shard_map`, a
      ``ValueError`` naming the axis for a ``grad_fn`` whose loss varies over
      a mesh axis that is neither ``data_axis`` nor one the parameters vary
      over (a batch split there: the estimate would be that many times too
      large), or, returned with the gradient, does not vary over
      ``data_axis`` (already averaged: that many times too small), and for a
      ``data_axis`` or execution axis that is a :func:`jax.vmap` axis. A
      gradients-only ``grad_fn`` that applies a collective over ``data_axis``
      gets a warning (it may average the loss or share statistics).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import nso_jax
    >>> loss = lambda w: jnp.sum(w**4) / 4
    >>> w = jnp.array([1.0, -2.0])
    >>> g = nso_jax.noise_stability_gradient(
    ...     jax.grad(loss), w, key=0, sigma=0.1, num_perturbations=4)
    >>> g.shape
    (2,)
    >>> value, g = nso_jax.noise_stability_gradient(
    ...     jax.value_and_grad(loss), w, key=0, sigma=0.1, num_perturbations=4)
    >>> value.shape
    ()

  References:
    Zhang, Li, Ju, `Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach <https://arxiv.org/abs/2306.08553>`_,
    TMLR 2024.
  """
  settings = make_estimator(
    num_perturbations, noise, one_sided, param_filter, execution, data_axis
  )
  factor, scale = geometry.split(sigma)
  check_sigma(factor)
  value, grads = estimate(
    settings,
    grad_fn,
    params,
    checks.canonicalize_key(key),
    factor,
    geometry.relative_scales(scale, params, param_filter),
  )
  return grads if value is None else (value, grads)
