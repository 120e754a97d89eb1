"""Flax training helpers for noise stability optimisation (needs ``flax``).

Linen: :class:`TrainState` and :func:`train_step`; NNX: :func:`nnx_train_step`
and :func:`nnx_grad_fn`; seed sweeps on one compiled step: :func:`with_key`;
checkpoints with Orbax: :func:`save_checkpoint` (atomic: a failed save keeps
the previous checkpoint), :func:`restore_checkpoint` (verified: a damaged
checkpoint or a mismatched target is a clear error), and
:class:`CheckpointManager` (numbered steps, the latest, keep the last N).
"""

from nso_jax._src.checkpoints import CheckpointManager
from nso_jax._src.checkpoints import restore_checkpoint
from nso_jax._src.checkpoints import save_checkpoint
from nso_jax._src.training import TrainState
from nso_jax._src.training import nnx_grad_fn
from nso_jax._src.training import nnx_train_step
from nso_jax._src.training import train_step
from nso_jax._src.transform import with_key

__all__ = [
  "CheckpointManager",
  "TrainState",
  "nnx_grad_fn",
  "nnx_train_step",
  "restore_checkpoint",
  "save_checkpoint",
  "train_step",
  "with_key",
]
