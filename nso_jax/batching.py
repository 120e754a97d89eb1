"""How repeated evaluations run: NSO's pairs, the probes, the noise draws.

NSO evaluates ``k`` pairs of perturbed gradients, the Hessian tools evaluate
many random probes and the noise-stability measure many perturbed losses: all
are ``size`` independent evaluations of one function of an index, and all run
through :func:`sum_indices` or :func:`map_indices` as one :class:`Execution`
value says (a strategy, a chunk size, a mesh axis), with one ``"auto"`` rule,
:func:`default_execution`.
"""

from nso_jax._src.batching import STRATEGIES
from nso_jax._src.batching import Execution
from nso_jax._src.batching import ExecutionLike
from nso_jax._src.batching import computes_convolutions
from nso_jax._src.batching import default_chunk_size
from nso_jax._src.batching import default_execution
from nso_jax._src.batching import describe
from nso_jax._src.batching import map_indices
from nso_jax._src.batching import sum_indices

__all__ = [
  "STRATEGIES",
  "Execution",
  "ExecutionLike",
  "computes_convolutions",
  "default_chunk_size",
  "default_execution",
  "describe",
  "map_indices",
  "sum_indices",
]
