"""NSO steps on 8 simulated CPU devices, against one device.

Run by tests/test_multidevice.py in a fresh process, since the device count
must be set before JAX starts. Prints a JSON report on stdout.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
# The simulated devices are CPU devices: on a machine with a GPU, JAX would
# otherwise pick the GPU, a single device.
os.environ["JAX_PLATFORMS"] = "cpu"

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mesh_problem import loss
from mesh_problem import make_problem

import nso_jax

NUM_STEPS = 3


def train(step, params, opt_state, x, y):
  for _ in range(NUM_STEPS):
    params, opt_state = step(params, opt_state, x, y)
  return params


def max_difference(a, b):
  return max(
    float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def main():
  params, x, y = make_problem()
  tx = nso_jax.nso(optax.sgd(0.1), sigma=0.05, num_perturbations=2, key=0)

  @jax.jit
  def step(params, opt_state, x, y):
    grad_fn = lambda p: jax.grad(loss)(p, x, y)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, opt_state = tx.update(zeros, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state

  single = train(step, params, tx.init(params), x, y)

  # Data parallel by sharding: the batch split over 8 devices, the parameters,
  # optimizer state and key replicated; XLA partitions the whole step.
  mesh = jax.make_mesh((8,), ("data",))
  replicated = NamedSharding(mesh, P())
  by_example = NamedSharding(mesh, P("data"))
  placed = (
    jax.device_put(params, replicated),
    jax.device_put(tx.init(params), replicated),
    jax.device_put(x, by_example),
    jax.device_put(y, by_example),
  )
  sharded = train(step, *placed)

  # Data parallel written per device with shard_map: each device holds its
  # slice of the batch and the loss is the pmean of the local losses (the
  # gradient of a replicated parameter is then reduced across devices by
  # shard_map itself); the replicated key gives every device the same noise.
  @jax.jit
  @partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), P(), P("data"), P("data")),
    out_specs=(P(), P()),
  )
  def per_device_step(params, opt_state, x, y):
    grad_fn = jax.grad(lambda p: jax.lax.pmean(loss(p, x, y), "data"))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, opt_state = tx.update(zeros, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state

  per_device = train(per_device_step, *placed)

  # Parameters sharded across devices (FSDP-style): same trajectory, and the
  # noise of a sharded leaf is drawn shard by shard, with no collective.
  # An Auto mesh: XLA, not the sharding-in-types rules, places the results.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  param_specs = {"w1": P(None, "data"), "b1": P("data"), "w2": P("data")}
  param_sharded = train(
    step,
    jax.tree.map(
      lambda p, spec: jax.device_put(p, NamedSharding(mesh, spec)), params, param_specs
    ),
    tx.init(params),
    x,
    y,
  )
  noise_tree = {
    "rows": jax.device_put(jnp.zeros((64, 30)), NamedSharding(mesh, P("data"))),
    "columns": jax.device_put(
      jnp.zeros((5, 128)), NamedSharding(mesh, P(None, "data"))
    ),
    "vector": jax.device_put(jnp.zeros(4096), NamedSharding(mesh, P("data"))),
  }
  noise_collectives, noise_sharded_vs_single = {}, 0.0
  for name in ("normal", "normal_fast", "rademacher"):
    draw = jax.jit(lambda key, tree, name=name: nso_jax.sample_noise(key, tree, name))
    hlo = draw.lower(jax.random.key(1), noise_tree).compile().as_text()
    noise_collectives[name] = [
      op
      for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")
      if op in hlo
    ]
    unsharded = jax.tree.map(np.asarray, noise_tree)
    noise_sharded_vs_single = max(
      noise_sharded_vs_single,
      max_difference(
        draw(jax.random.key(1), noise_tree),
        nso_jax.sample_noise(jax.random.key(1), unsharded, name),
      ),
    )

  moved = max_difference(single, params)
  print(
    json.dumps(
      {
        "num_devices": jax.device_count(),
        "sharded_batch_devices": len(sharded["w1"].sharding.device_set),
        "moved": moved,
        "sharded_vs_single": max_difference(sharded, single),
        "shard_map_vs_single": max_difference(per_device, single),
        "param_sharded_vs_single": max_difference(param_sharded, single),
        "param_sharded_devices": len(param_sharded["w1"].sharding.device_set),
        "noise_collectives": noise_collectives,
        "noise_sharded_vs_single": noise_sharded_vs_single,
      }
    )
  )


if __name__ == "__main__":
  main()
