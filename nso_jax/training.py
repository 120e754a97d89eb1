"""Flax training helpers for noise stability optimisation (needs ``flax``).

Linen: :class:`TrainState` and :func:`train_step`; NNX: :func:`nnx_grad_fn`;
checkpoints with Orbax: :func:`save_checkpoint` (atomic: a failed save keeps
the previous checkpoint) and :func:`restore_checkpoint` (verified: a damaged
checkpoint or a mismatched target is a clear error).
"""

from nso_jax._src.checkpoints import restore_checkpoint
from nso_jax._src.checkpoints import save_checkpoint
from nso_jax._src.training import TrainState
from nso_jax._src.training import nnx_grad_fn
from nso_jax._src.training import train_step

__all__ = [
  "TrainState",
  "nnx_grad_fn",
  "restore_checkpoint",
  "save_checkpoint",
  "train_step",
]
