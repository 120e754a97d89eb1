"""The Flax train steps with `data_axis` on 8 simulated CPU devices.

Run by tests/test_multi_device_doc.py in a fresh process (the device count
must be set before JAX starts). Prints a JSON report on stdout: the largest
differences from one device training on the whole batch.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import json
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nso_jax import training

MESH = jax.make_mesh((4, 2), ("data", "noise"))
X = jax.random.normal(jax.random.key(0), (32, 4))
Y = jnp.sin(X.sum(axis=1))
BATCH = jax.device_put((X, Y), NamedSharding(MESH, P("data")))


def largest_difference(a, b):
  return max(
    float(jnp.max(jnp.abs(u - v)))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def linen():
  """SGD with the clean gradient: the sharded step equals one device's."""
  model = nn.Dense(1)
  params = model.init(jax.random.key(1), X)["params"]

  def make_loss_fn(x, y):
    return lambda p, _: (jnp.mean((model.apply({"params": p}, x)[:, 0] - y) ** 2), {})

  def new_state():
    return training.TrainState.create(
      apply_fn=model.apply, params=params, tx=optax.sgd(0.1)
    )

  @jax.jit
  @partial(jax.shard_map, mesh=MESH, in_specs=(P(), P("data")), out_specs=(P(), P()))
  def sharded(state, batch):
    return training.train_step(state, make_loss_fn(*batch), data_axis="data")

  one = jax.jit(lambda s: training.train_step(s, make_loss_fn(X, Y)))
  a, b = new_state(), new_state()
  for _ in range(2):
    a, metrics_a = sharded(a, BATCH)
    b, metrics_b = one(b)
  return {
    "params": largest_difference(a.params, b.params),
    "loss": largest_difference(metrics_a, metrics_b),
  }


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.head = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x, normalize):
    h = self.dense(x)
    return self.head(nnx.relu(self.norm(h) if normalize else h))[:, 0]


def nnx_run(normalize):
  """Plain SGD: without BatchNorm the sharded step equals one device's; with
  it, the running mean (the mean of equal shards' means) does."""

  def loss_fn(model, x, y):
    return jnp.mean((model(x, normalize) - y) ** 2)

  def new():
    model = NNXNet(nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  graphdef, state = nnx.split(new())

  @jax.jit
  @partial(jax.shard_map, mesh=MESH, in_specs=(P(), P("data")), out_specs=(P(), P()))
  def sharded(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    metrics = training.nnx_train_step(
      model, optimizer, loss_fn, *batch, data_axis="data"
    )
    return nnx.state((model, optimizer)), metrics

  @nnx.jit
  def one(model, optimizer):
    return training.nnx_train_step(model, optimizer, loss_fn, X, Y)

  model, optimizer = new()
  for _ in range(1 if normalize else 2):
    state, metrics_a = sharded(state, BATCH)
    metrics_b = one(model, optimizer)
  sharded_model, _ = nnx.merge(graphdef, state)
  if normalize:
    return {"mean": largest_difference(sharded_model.norm.mean, model.norm.mean)}
  return {
    "params": largest_difference(
      nnx.state(sharded_model, nnx.Param), nnx.state(model, nnx.Param)
    ),
    "loss": largest_difference(metrics_a, metrics_b),
  }


if __name__ == "__main__":
  report = {
    "linen": linen(),
    "nnx": nnx_run(normalize=False),
    "nnx_batch_norm": nnx_run(normalize=True),
  }
  print(json.dumps(report))
