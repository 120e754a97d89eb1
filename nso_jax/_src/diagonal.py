"""The diagonal of the loss Hessian: per-parameter curvature with error bars.

:func:`hessian_diagonal` estimates :math:`\\operatorname{diag}(H)` by
Hutchinson's diagonal estimator, :math:`\\mathbb{E}[z \\odot Hz]` with
Rademacher probes :math:`z`, reporting a standard error for every element,
or computes it exactly for small models (one Hessian-vector product per
parameter). Its sums over modules (``group_by``) are the modules' Hessian
traces, with standard errors from the per-probe sums. Repeated products run
through :mod:`nso_jax.batching`.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nso_jax._src import batching
from nso_jax._src import checks
from nso_jax._src import groups as groups_lib
from nso_jax._src import mesh
from nso_jax._src import noise as noise_lib
from nso_jax._src import operators
from nso_jax._src import stochastic_trace
from nso_jax._src.checks import PyTree
from nso_jax._src.operators import LossFn
from nso_jax._src.selection import ParamFilter

DIAGONAL_METHODS = ("hutchinson", "exact")


class DiagonalEstimate(NamedTuple):
  """The Hessian diagonal, element by element, with standard errors.

  Attributes:
    value: the estimate of :math:`H_{ii}`, a pytree shaped like the
      parameters (``None`` where ``param_filter`` excludes).
    stderr: the standard error of each element (0 for ``method="exact"``,
      ``inf`` from a single probe), shaped likewise.
    num_matvecs: the Hessian-vector products spent.
  """

  value: PyTree
  stderr: PyTree
  num_matvecs: jax.Array


def _probe_sampler(operator: operators.LinearOperator, key: jax.Array) -> Any:
  """Probe ``index ->`` :math:`z \\odot Hz` per leaf, in >= float32."""

  def sample(index: jax.Array) -> PyTree:
    # The probes of stochastic_trace.hutchinson: same key, Rademacher entries.
    z = noise_lib.sample_noise(
      jax.random.fold_in(key, index), operator.template, jax.random.rademacher
    )
    return jax.tree.map(
      lambda a, b: (a * b).astype(checks.accumulation_dtype(a.dtype)),
      z,
      operator.matvec(z),
    )

  return sample


def _elementwise_mean_and_stderr(
  sample: Any, num: int, execution: batching.Execution
) -> tuple[PyTree, PyTree]:
  """Per-element mean and standard error of ``num`` samples, memory of one.

  Sums of the samples and of their squares, shifted by the first sample so
  that no cancellation swamps a small spread.
  """
  shift = sample(jnp.int32(0))
  if num == 1:
    return shift, jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), shift)

  def centred(i: jax.Array) -> tuple[PyTree, PyTree]:
    x = jax.tree.map(jnp.subtract, sample(i + 1), shift)
    return x, jax.tree.map(jnp.square, x)

  first, second = batching.sum_indices(centred, num - 1, execution=execution)
  mean = jax.tree.map(lambda c, s1: c + s1 / num, shift, first)
  variance = jax.tree.map(
    lambda s1, s2: jnp.maximum(s2 - s1 * s1 / num, 0.0) / (num - 1), first, second
  )
  return mean, jax.tree.map(lambda v: jnp.sqrt(v / num), variance)


def _exact_diagonal(
  operator: operators.LinearOperator, execution: batching.Execution
) -> PyTree:
  """:math:`H_{ii} = e_i^\\top H e_i`, one product per basis vector."""
  flat = operators.flatten_operator(*operator)

  def element(index: jax.Array) -> jax.Array:
    basis = jax.nn.one_hot(index, flat.dim, dtype=flat.dtype)
    return flat.matvec(basis)[index]

  values = batching.map_indices(element, flat.dim, execution=execution)
  unravelled = flat.unravel(values)
  return jax.tree.map(
    lambda x: x.astype(checks.accumulation_dtype(x.dtype)), unravelled
  )


def _group_traces(
  operator: operators.LinearOperator,
  key: jax.Array | None,
  num: int,
  execution: batching.Execution,
  names: list[str],
) -> dict[str, stochastic_trace.TraceEstimate]:
  """Per group, the sum of the diagonal (the block's trace), with its error."""
  if key is None:  # exact: the sums of the exact diagonal
    diagonal = _exact_diagonal(operator, execution)
    sums = [jnp.sum(x) for x in jax.tree.leaves(diagonal)]
    count = jnp.asarray(operator.dim, jnp.int32)
    return {
      name: stochastic_trace.TraceEstimate(total, jnp.zeros_like(total), count)
      for name, total in groups_lib.sum_by_group(sums, names).items()
    }
  sample = _probe_sampler(operator, key)
  per_probe = lambda i: [jnp.sum(x) for x in jax.tree.leaves(sample(i))]
  samples = batching.map_indices(per_probe, num, execution=execution)
  count = jnp.asarray(num, jnp.int32)
  return {
    name: stochastic_trace.TraceEstimate(
      *stochastic_trace.mean_and_stderr(total), count
    )
    for name, total in groups_lib.sum_by_group(samples, names).items()
  }


def hessian_diagonal(
  loss_fn: LossFn,
  params: PyTree,
  data: Any,
  key: checks.KeyLike | None = None,
  *,
  num_matvecs: int = 100,
  method: str = "hutchinson",
  execution: batching.ExecutionLike = "auto",
  param_filter: ParamFilter = None,
  group_by: groups_lib.GroupBy = None,
  data_axis: mesh.AxisName | None = None,
) -> DiagonalEstimate | dict[str, stochastic_trace.TraceEstimate]:
  r"""The diagonal of the loss Hessian, each element with its standard error.

  With Rademacher probes :math:`z_j` (i.i.d. random signs),

  .. math::
    \hat H_{ii} = \frac{1}{m} \sum_{j=1}^m z_{j,i} (H z_j)_i, \qquad
    \operatorname{se}_i = \frac{s_i}{\sqrt m},

  unbiased since :math:`z_i (Hz)_i = H_{ii} + \sum_{k \neq i} z_i z_k
  H_{ik}`: the off-diagonal entries of row :math:`i` add variance
  :math:`\sum_{k \neq i} H_{ik}^2` per probe, not bias, so a diagonal
  Hessian is recovered exactly. One product per probe gives every element;
  the probes are :func:`~nso_jax.hessian.hutchinson`'s, so the elements sum
  to its trace with the same key. Memory is that of one probe's product
  (sums of the samples and of their squares are kept, not the samples).

  ``method="exact"`` computes :math:`H_{ii} = e_i^\top H e_i` with one
  product per parameter (standard errors 0; no key needed): for small
  models, or as a reference.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch.
    params: the parameters, any pytree of float arrays.
    data: one batch, a list or iterator of batches, or :class:`StackedBatches`.
    key: an int seed or a ``jax.random.key``; needed by ``"hutchinson"``.
    num_matvecs: the number of probes :math:`m` (``"hutchinson"`` only).
    method: ``"hutchinson"`` or ``"exact"``.
    execution: how the products run, a :class:`~nso_jax.batching.Execution`
      or a strategy name (see :func:`~nso_jax.hessian.hutchinson`); its
      ``axis`` splits the probes (or basis vectors) over a mesh axis.
    param_filter: restricts to some leaves (see :func:`hessian_operator`).
    group_by: report each module's sum of the diagonal, its Hessian block's
      trace, instead: a positive int (leaves sharing that many leading path
      keys form a module) or a callable ``(path) -> name``. The per-probe
      sums over a module's elements give its standard error.
    data_axis: inside :func:`jax.shard_map`, the mesh axis (or axes) over
      which ``data`` is split (see :func:`hessian_operator`).

  Returns:
    A :class:`DiagonalEstimate` ``(value, stderr, num_matvecs)``; with
    ``group_by``, a dict from module name to
    :class:`~nso_jax.hessian.TraceEstimate`.

  Raises:
    ValueError: for an unknown ``method``, a missing ``key`` with
      ``"hutchinson"``, a bad ``num_matvecs`` or ``group_by``.

  Example:
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean((x @ w) ** 2)  # H = X^T X / n
    >>> x = jnp.array([[1.0, 2.0], [0.0, 1.0]])  # H = [[0.5, 1], [1, 2.5]]
    >>> hessian.hessian_diagonal(loss, jnp.zeros(2), x, method="exact").value
    Array([0.5, 2.5], dtype=float32)
    >>> estimate = hessian.hessian_diagonal(loss, jnp.zeros(2), x, key=2,
    ...                                     num_matvecs=400)
    >>> [f"{v:.2f} ± {s:.2f}" for v, s in zip(estimate.value, estimate.stderr)]
    ['0.51 ± 0.05', '2.51 ± 0.05']

  References:
    Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of a matrix",
    Applied Numerical Mathematics, 2007.

    Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "AdaHessian: An adaptive
    second order optimizer for machine learning", AAAI 2021.
  """
  checks.check_choice(method, DIAGONAL_METHODS, "method")
  num = checks.check_positive_int(num_matvecs, "num_matvecs")
  group_by = groups_lib.check_group_by(group_by)
  execution = batching.as_execution(execution)
  if method == "hutchinson" and key is None:
    raise ValueError(
      "`key` is None: method='hutchinson' draws random probes and needs an int "
      "seed or a jax.random.key (method='exact' needs none)."
    )
  operator = operators.hessian_operator(
    loss_fn, params, data, param_filter=param_filter, data_axis=data_axis
  )
  probe_key = None if method == "exact" else checks.canonicalize_key(key)
  if group_by is not None:
    names = groups_lib.group_names(operator.template, group_by)
    return _group_traces(operator, probe_key, num, execution, names)
  if probe_key is None:
    diagonal = _exact_diagonal(operator, execution)
    zeros = jax.tree.map(jnp.zeros_like, diagonal)
    return DiagonalEstimate(diagonal, zeros, jnp.asarray(operator.dim, jnp.int32))
  mean, stderr = _elementwise_mean_and_stderr(
    _probe_sampler(operator, probe_key), num, execution
  )
  return DiagonalEstimate(mean, stderr, jnp.asarray(num, jnp.int32))
