"""The small regression problem the multi-device workers train.

Imported by the worker scripts after they have set ``XLA_FLAGS`` (it imports
JAX).
"""

import jax
import jax.numpy as jnp


def loss(params, x, y):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] - y) ** 2)


def make_problem():
  """Parameters of a 6-16-1 tanh network and 64 examples."""
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "w1": jax.random.normal(keys[0], (6, 16)) / 6**0.5,
    "b1": jnp.zeros(16),
    "w2": jax.random.normal(keys[1], (16,)) / 4.0,
  }
  x = jax.random.normal(keys[2], (64, 6))
  y = jnp.sin(x.sum(axis=1))
  return params, x, y
