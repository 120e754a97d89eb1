"""How repeated evaluations run: NSO's perturbation pairs and the probes.

NSO evaluates ``k`` pairs of perturbed gradients and the Hessian tools
evaluate many random probes: both are ``size`` independent evaluations of one
function of an index, and both run through :func:`sum_indices` or
:func:`map_indices` with one ``execution`` choice (``"auto"``, ``"vmap"``,
``"map"``, ``"unroll"``), one ``chunk_size`` and one ``"auto"`` rule,
:func:`default_execution`.
"""

from nso_jax._src.batching import EXECUTIONS
from nso_jax._src.batching import computes_convolutions
from nso_jax._src.batching import default_chunk_size
from nso_jax._src.batching import default_execution
from nso_jax._src.batching import map_indices
from nso_jax._src.batching import sum_indices

__all__ = [
  "EXECUTIONS",
  "computes_convolutions",
  "default_chunk_size",
  "default_execution",
  "map_indices",
  "sum_indices",
]
