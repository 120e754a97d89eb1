"""The two-point noise stability gradient estimator.

Noise stability optimisation (NSO) minimises the smoothed loss
``F(W) = E_U[L(W + U)]``, ``U ~ N(0, sigma^2 I)``. Its gradient is estimated
from ``k`` antithetic pairs of perturbed gradients, which cancel every
odd-order term of the Taylor expansion exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import noise as noise_lib
from nso_jax._src import selection

GradFn = Callable[[Any], Any]


def check_sigma(sigma: Any) -> Any:
  """Checks a concrete ``sigma`` (finite, >= 0); a traced one passes through."""
  return checks.check_scalar(sigma, "sigma", minimum=0.0)


def check_clean_weight(clean_weight: Any) -> Any:
  """A concrete ``clean_weight`` as a float in [0, 1]; a traced one unchanged."""
  checks.check_scalar(clean_weight, "clean_weight", minimum=0.0, maximum=1.0)
  return clean_weight if checks.is_traced(clean_weight) else float(clean_weight)


def _to_accumulator(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(checks.accumulation_dtype(x.dtype)), tree)


def _check_gradient_structure(grad_fn, params, has_value):
  """Traces ``grad_fn`` once and checks what it returns.

  Returns:
    The shapes of the value (``None`` without ``has_value``) and of the
    gradients, and the jaxpr of ``grad_fn``.
  """
  jaxpr, out = jax.make_jaxpr(grad_fn, return_shape=True)(params)
  if has_value:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
        "with has_value=True, `grad_fn` must return a pair (value, grads) as "
        f"jax.value_and_grad does; it returned {out}."
      )
    value_shape, grads_shape = out
    for leaf in jax.tree.leaves(value_shape):
      if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        raise TypeError(
          "the value returned by `grad_fn` is averaged over perturbations, so "
          f"its leaves must be floating point; got a leaf of dtype {leaf.dtype}."
        )
  else:
    value_shape, grads_shape = None, out
  params_struct = jax.tree.structure(params)
  grads_struct = jax.tree.structure(grads_shape)
  if grads_struct != params_struct:
    hint = (
      " If it returns (value, grads), pass has_value=True."
      if isinstance(out, tuple) and not has_value
      else ""
    )
    raise ValueError(
      "`grad_fn(params)` must return gradients with the structure of "
      f"`params`.{hint}\n  params: {params_struct}\n  gradients: {grads_struct}"
    )
  for (path, g), p in zip(
    jax.tree_util.tree_leaves_with_path(grads_shape),
    jax.tree.leaves(params),
    strict=True,
  ):
    where = jax.tree_util.keystr(path) or "(root)"
    if g.shape != jnp.shape(p):
      raise ValueError(
        f"`grad_fn(params)` returned a gradient of shape {g.shape} at {where} "
        f"for a parameter of shape {jnp.shape(p)}."
      )
    if not jnp.issubdtype(g.dtype, jnp.floating):
      raise TypeError(
        f"`grad_fn(params)` returned a gradient of dtype {g.dtype} at {where}; "
        "gradients are averaged, so they must be floating point (an integer "
        "mean would be truncated)."
      )
  return value_shape, grads_shape, jaxpr.jaxpr


def check_axes(
  pair_axis: Any, data_axis: Any, per_shard_noise: Any, *, bound: bool = True
) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Checks the mesh axes of the pairs and the data (see ``check_axis_name``)."""
  pair_axes = batching.check_axis_name(pair_axis, "pair_axis", bound=bound)
  data_axes = batching.check_axis_name(data_axis, "data_axis", bound=bound)
  if set(pair_axes) & set(data_axes):
    raise ValueError(
      f"`pair_axis`={pair_axis!r} and `data_axis`={data_axis!r} share an axis: "
      "a device either splits the pairs or the batch along each axis."
    )
  if checks.check_bool(per_shard_noise, "per_shard_noise") and not data_axes:
    raise ValueError(
      "`per_shard_noise`=True draws each data shard's pairs from its own key: "
      "it needs `data_axis`, the mesh axis over which the batch is split."
    )
  return pair_axes, data_axes


def noise_stability_gradient(
  grad_fn: GradFn,
  params: Any,
  key: checks.KeyLike,
  *,
  sigma: Any,
  num_perturbations: int = 1,
  noise: noise_lib.NoiseName = "normal",
  one_sided: bool = False,
  clean_weight: float = 0.0,
  clean_gradient: Any = None,
  has_value: bool = False,
  execution: batching.Execution = "auto",
  chunk_size: int | None = None,
  param_filter: selection.ParamFilter = None,
  pair_axis: batching.AxisName | None = None,
  data_axis: batching.AxisName | None = None,
  per_shard_noise: bool = False,
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

  Options beyond the paper's setting:

  * ``one_sided=True``: :math:`G = \frac1k\sum_j \nabla L(W + U_j)`, random
    weight perturbation, the ablation baseline (``k`` evaluations).
  * ``clean_weight=lam``: :math:`\lambda \nabla L(W) + (1 - \lambda) G`. The
    clean gradient is ``clean_gradient`` if given, else one more call to
    ``grad_fn``.
  * ``param_filter``: perturb only the selected leaves (say, the weight
    matrices of the layers being fine-tuned); the others are evaluated
    unperturbed. The selected leaves' noise is the same, bit for bit, as
    without a filter.

  On several devices, inside :func:`jax.shard_map` (see the multi-device
  guide):

  * ``pair_axis``: the devices of this mesh axis split the ``k`` pairs (pair
    ``j`` runs on device ``j mod n``), all on the same batch. Since pair
    ``j``'s noise depends only on ``(key, j)``, the estimate does not depend
    on the number of devices. When ``n`` does not divide ``k``, the devices
    run ``ceil(k / n)`` pairs each, the surplus evaluated and discarded.
  * ``data_axis``: the batch is split over this axis (or axes): ``grad_fn``
    returns the gradient of this device's shard of the batch, and the
    estimate is the mean over the shards. One ``psum`` over the data and
    pair axes together combines everything (with ``clean_weight > 0`` and
    no ``clean_gradient``, a second one averages the clean gradient).
  * ``per_shard_noise=True``: each data shard draws its own ``k`` pairs
    from ``fold_in(key, shard)``, so ``n`` shards average ``n k`` pairs at
    the cost of ``k`` (what data-parallel implementations of NSO and SAM's
    per-device perturbations do). This is a different estimator: it changes
    with the number of shards.

  Pair ``j`` draws its noise from ``jax.random.fold_in(key, j)`` alone, so the
  result does not depend on how the pairs are executed, up to the order of
  floating-point summation:

  * ``"vmap"``: all evaluations as one batched computation (fastest on
    accelerators, memory grows with ``k``);
  * ``"map"``: a ``lax.scan`` over chunks of ``chunk_size`` pairs (default 1
    on CPU: sequential; 16 on accelerators), each chunk batched with
    ``vmap``; memory is bounded by the chunk, whatever ``k``;
  * ``"unroll"``: the evaluations one after another in the compiled graph;
  * ``"auto"``: :func:`nso_jax.batching.default_execution` for the current
    backend: ``"vmap"`` on accelerators; on CPU ``"map"``, or ``"unroll"``
    when ``grad_fn`` computes convolutions and ``k <= 8``.

  The pairs run through :func:`nso_jax.batching.sum_indices`, the seam the
  Hessian tools' probes use too.

  Gradients are accumulated in at least float32 and returned in the dtype
  ``grad_fn`` returns them in. Call it inside ``jax.jit`` (the train step):
  outside, the ``"map"`` strategy's loop is traced and compiled anew on every
  call.

  Args:
    grad_fn: maps parameters to gradients with the same structure, e.g.
      ``lambda p: jax.grad(loss)(p, batch)``. With ``has_value=True`` it
      returns ``(value, grads)`` as :func:`jax.value_and_grad` does; ``value``
      may be any pytree of floats (e.g. ``(loss, aux)``).
    params: a pytree of floating-point arrays, the point ``W``.
    key: an int seed or a PRNG key; it fully determines the noise.
    sigma: the noise scale, a float >= 0 or a scalar array.
    num_perturbations: ``k``, the number of noise draws (pairs).
    noise: ``"normal"`` (the paper's), ``"uniform"``, ``"laplace"`` or
      ``"rademacher"``, all of variance ``sigma**2``, or ``"normal_fast"``, a
      cheaper approximation of ``"normal"`` with the same first two moments;
      see :func:`nso_jax.sample_noise`.
    one_sided: evaluate at ``W + U_j`` only.
    clean_weight: ``lam`` in [0, 1]; 0 (the paper's setting) needs no clean
      gradient. A traced value is accepted (then the clean gradient is always
      used, weighted by it).
    clean_gradient: the gradient at ``params``, used when ``clean_weight > 0``
      (with ``data_axis``: the mean over the shards, not a shard's own).
    has_value: whether ``grad_fn`` returns ``(value, grads)``.
    execution: ``"auto"``, ``"vmap"``, ``"map"`` or ``"unroll"``.
    chunk_size: pairs per step of the ``"map"`` strategy.
    param_filter: the leaves to perturb: ``None`` (all), a pytree of Python
      bools whose structure is a prefix of ``params``, or a function
      ``(path, leaf) -> bool``, as the Hessian tools take it.
    pair_axis: a mesh axis name (or a tuple of them) whose devices split the
      pairs; inside ``shard_map`` only.
    data_axis: the mesh axis name(s) over which the batch is split;
      ``grad_fn`` returns the local gradient, without a ``pmean``.
    per_shard_noise: each shard of ``data_axis`` draws its own pairs.

  Returns:
    The estimate ``G``, a pytree like ``params``; with ``has_value=True`` the
    pair ``(value, G)``, ``value`` averaged over the perturbed evaluations.

  Raises:
    ValueError, TypeError: on invalid settings or a ``grad_fn`` whose output
      does not match ``params``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import nso_jax
    >>> loss = lambda w: jnp.sum(w**4) / 4
    >>> w = jnp.array([1.0, -2.0])
    >>> g = nso_jax.noise_stability_gradient(
    ...     jax.grad(loss), w, key=0, sigma=0.1, num_perturbations=4)
    >>> g.shape
    (2,)

  References:
    Zhang, Li, Ju, `Noise Stability Optimization for Finding Flat Minima: A
    Hessian-based Regularization Approach <https://arxiv.org/abs/2306.08553>`_,
    TMLR 2024.
  """
  key = checks.canonicalize_key(key)
  k = checks.check_positive_int(num_perturbations, "num_perturbations")
  noise_lib.check_noise(noise)
  check_sigma(sigma)
  one_sided = checks.check_bool(one_sided, "one_sided")
  has_value = checks.check_bool(has_value, "has_value")
  clean_weight = check_clean_weight(clean_weight)
  execution, chunk_size = batching.check_execution(execution, chunk_size)
  checks.check_float_tree(
    params,
    "params",
    "noise can only perturb floating-point "
    "parameters; keep non-trainable integer state out of them",
  )
  perturbed = selection.selection_mask(params, param_filter)
  pair_axes, data_axes = check_axes(pair_axis, data_axis, per_shard_noise)
  if per_shard_noise:
    key = jax.random.fold_in(key, batching.device_index(data_axes))
  value_shape, grads_shape, grad_jaxpr = _check_gradient_structure(
    grad_fn, params, has_value
  )
  if execution == "auto":
    pairs_here = -(-k // batching.axis_size(pair_axes))
    execution = batching.default_execution(
      convolutional=batching.jaxpr_convolves(grad_jaxpr), size=pairs_here
    )

  def evaluate(w):
    # Parameters typed as varying over the data axes make `jax.grad` inside
    # `grad_fn` return this shard's gradient; replicated ones would make it
    # all-reduce the gradient of every evaluation on its own.
    w = jax.tree.map(lambda x: batching.mark_varying(x, data_axes), w)
    out = grad_fn(w)
    value, grads = out if has_value else (None, out)
    return _to_accumulator(value), _to_accumulator(grads)

  if checks.is_traced(sigma):
    # A run-time sigma is checked where it is used: an invalid one gives NaN,
    # never a silently different step (a negative sigma would act as |sigma|).
    sigma = jnp.where((sigma >= 0) & jnp.isfinite(sigma), sigma, jnp.nan)

  leaves, treedef = jax.tree.flatten(params)

  def shifted(step, noise_leaves):
    return jax.tree.unflatten(
      treedef,
      [
        step(w, u) if keep else w
        for w, u, keep in zip(leaves, noise_leaves, perturbed, strict=True)
      ],
    )

  def pair_sum(index):
    z = noise_lib.sample_noise(jax.random.fold_in(key, index), params, noise)
    u = [zi * jnp.asarray(sigma, zi.dtype) for zi in jax.tree.leaves(z)]
    total = evaluate(shifted(jnp.add, u))
    if not one_sided:
      plus, minus = total, evaluate(shifted(jnp.subtract, u))
      total = jax.tree.map(jnp.add, plus, minus)
    return total

  total = batching.partial_sum_indices(
    pair_sum, k, execution, chunk_size, axes=pair_axes
  )
  value_sum, grad_sum = batching.psum_varying(total, data_axes + pair_axes)
  num_evaluations = k if one_sided else 2 * k
  scale = 1.0 / (num_evaluations * batching.axis_size(data_axes))
  grads = jax.tree.map(lambda g: g * scale, grad_sum)
  if isinstance(clean_weight, jax.Array) or clean_weight > 0.0:
    if clean_gradient is None:
      clean = batching.psum_varying(evaluate(params)[1], data_axes)
      clean = jax.tree.map(lambda c: c / batching.axis_size(data_axes), clean)
    else:
      clean = _to_accumulator(clean_gradient)
    lam = clean_weight
    grads = jax.tree.map(
      # `where` keeps a non-finite clean gradient out when lam == 0.
      lambda c, g: jnp.where(lam > 0, lam * c + (1 - lam) * g, g),
      clean,
      grads,
    )
    if checks.is_traced(lam):  # an invalid run-time weight gives NaN
      valid = (lam >= 0) & (lam <= 1)
      grads = jax.tree.map(lambda g: jnp.where(valid, g, jnp.nan), grads)
  grads = jax.tree.map(lambda g, s: g.astype(s.dtype), grads, grads_shape)
  if not has_value:
    return grads
  value = jax.tree.map(lambda v: v * scale, value_sum)
  value = jax.tree.map(lambda v, s: v.astype(s.dtype), value, value_shape)
  return value, grads
