"""Resumes Linen training from a checkpoint in a fresh process.

Usage: python resume_worker.py CHECKPOINT_DIR NUM_STEPS OUTPUT.npz
"""

import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import test_training

from nso_jax import training


def main(checkpoint, num_steps, output):
  fresh = test_training._linen_state(test_training._nso(key=5), seed=99)
  restored = training.restore_checkpoint(checkpoint, fresh)
  resumed, _ = test_training._run_linen(restored, int(num_steps))
  leaves = jax.tree.leaves((resumed.params, resumed.batch_stats))
  np.savez(output, *[np.asarray(leaf) for leaf in leaves])


if __name__ == "__main__":
  main(*sys.argv[1:])
