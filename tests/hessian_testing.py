"""Small models and dense references shared by the Hessian toolkit tests."""

from __future__ import annotations

import functools
import itertools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

PyTree = Any

# 10 inputs -> 40 -> 40 -> 4 outputs: 2,244 parameters, a dense Hessian of
# 5M entries, cheap enough to form and diagonalise in a test.
LAYER_SIZES = (10, 40, 40, 4)
NUM_EXAMPLES = 96


def init_mlp(key: jax.Array, sizes: tuple[int, ...] = LAYER_SIZES) -> PyTree:
  params = {}
  for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
    key, weight_key, bias_key = jax.random.split(key, 3)
    params[f"layer{index}"] = {
      "w": jax.random.normal(weight_key, (fan_in, fan_out)) / np.sqrt(fan_in),
      "b": 0.1 * jax.random.normal(bias_key, (fan_out,)),
    }
  return params


def apply_mlp(params: PyTree, inputs: jax.Array) -> jax.Array:
  hidden = inputs
  names = sorted(params)
  for name in names[:-1]:
    hidden = jnp.tanh(hidden @ params[name]["w"] + params[name]["b"])
  return hidden @ params[names[-1]]["w"] + params[names[-1]]["b"]


def model_fn(params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
  return apply_mlp(params, batch["x"])


def per_example_loss(outputs: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  return 0.5 * jnp.sum((outputs - batch["y"]) ** 2, axis=-1)


def loss_fn(params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean squared error over the batch."""
  return jnp.mean(per_example_loss(model_fn(params, batch), batch))


def make_data(
  key: jax.Array,
  num_examples: int = NUM_EXAMPLES,
  sizes: tuple[int, ...] = LAYER_SIZES,
) -> dict[str, jax.Array]:
  """Regression data whose input scales differ, so the top of the spectrum is
  made of a few well-separated sharp directions."""
  input_key, target_key = jax.random.split(key)
  scales = jnp.geomspace(3.0, 0.3, sizes[0])
  x = scales * jax.random.normal(input_key, (num_examples, sizes[0]))
  y = jax.random.normal(target_key, (num_examples, sizes[-1]))
  return {"x": x, "y": y}


def dense_hessian(loss: Any, params: PyTree, batch: PyTree) -> np.ndarray:
  """The Hessian of ``loss(params, batch)`` as a dense float64 numpy matrix."""
  flat, unravel = ravel_pytree(params)
  matrix = jax.jit(jax.hessian(lambda f: loss(unravel(f), batch)))(flat)
  matrix = np.asarray(matrix, np.float64)
  return 0.5 * (matrix + matrix.T)


class Problem(NamedTuple):
  params: PyTree
  batch: dict[str, jax.Array]
  hessian: np.ndarray  # dense, float64
  eigenvalues: np.ndarray  # ascending, float64

  @property
  def trace(self) -> float:
    return float(np.trace(self.hessian))


@functools.cache
def mlp_problem() -> Problem:
  params = init_mlp(jax.random.key(0))
  batch = make_data(jax.random.key(1))
  matrix = dense_hessian(loss_fn, params, batch)
  # LAPACK's divide-and-conquer driver: numpy's default is far slower here.
  return Problem(params, batch, matrix, scipy.linalg.eigvalsh(matrix, driver="evd"))


TINY_SIZES = (3, 6, 2)


@functools.cache
def tiny_problem() -> Problem:
  """A 38-parameter MLP: quick to compile, for API and determinism checks."""
  params = init_mlp(jax.random.key(2), TINY_SIZES)
  batch = make_data(jax.random.key(3), 12, TINY_SIZES)
  matrix = dense_hessian(loss_fn, params, batch)
  return Problem(params, batch, matrix, scipy.linalg.eigvalsh(matrix))


def full_scale(request: pytest.FixtureRequest) -> bool:
  """Whether statistical checks run at full size (``--full-scale``)."""
  try:
    return bool(request.config.getoption("--full-scale"))
  except ValueError:
    return False


def matrix_operator(matrix: np.ndarray, dtype=jnp.float32):
  """A (matvec, template) pair for a dense symmetric matrix on flat vectors."""
  dense = jnp.asarray(matrix, dtype)
  return (lambda v: dense @ v), jnp.zeros(matrix.shape[0], dtype)


def decaying_spectrum_matrix(key: jax.Array, dim: int, decay: float) -> np.ndarray:
  """A random symmetric matrix with eigenvalues ``j ** -decay``, j = 1..dim."""
  gaussian = np.asarray(jax.random.normal(key, (dim, dim)), np.float64)
  orthogonal, _ = np.linalg.qr(gaussian)
  eigenvalues = np.arange(1, dim + 1, dtype=np.float64) ** -decay
  return (orthogonal * eigenvalues) @ orthogonal.T
