"""One process of a multi-process NSO run on CPU (``jax.distributed``).

``python multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID OUT.json``: each
process holds 4 simulated CPU devices; together they form a ``data x noise``
mesh of 4 x 2 over all 8 devices, train a few NSO steps with the batch split
over ``data`` and the pairs over ``noise``, and compare with the same
training on one local device. Run by tests/test_multiprocess.py.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import json
from functools import partial

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mesh_problem import loss
from mesh_problem import make_problem

import nso_jax

NUM_STEPS = 3


def main(port, num_processes, process_id, out):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=num_processes,
    process_id=process_id,
  )
  try:
    params, x, y = make_problem()
    tx = nso_jax.nso(optax.sgd(0.1, momentum=0.9), 0.05, 5, key=0)

    @jax.jit
    def local_step(params, opt_state):
      grad_fn = lambda p: jax.grad(loss)(p, x, y)
      updates, opt_state = tx.update(None, opt_state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), opt_state

    reference, opt_state = params, tx.init(params)
    for _ in range(NUM_STEPS):
      reference, opt_state = local_step(reference, opt_state)

    mesh = jax.make_mesh(
      (4, 2), ("data", "noise"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    mesh_tx = nso_jax.nso(
      optax.sgd(0.1, momentum=0.9),
      0.05,
      5,
      key=0,
      execution=nso_jax.batching.Execution(axis="noise"),
      data_axis="data",
    )

    @jax.jit
    @partial(
      jax.shard_map,
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P()),
    )
    def mesh_step(params, opt_state, x, y):
      grad_fn = lambda p: jax.grad(loss)(p, x, y)
      updates, opt_state = mesh_tx.update(None, opt_state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), opt_state

    replicated = NamedSharding(mesh, P())
    by_example = NamedSharding(mesh, P("data"))
    # Every process builds the global arrays from the rows its devices hold.
    global_x = jax.make_array_from_callback(x.shape, by_example, lambda i: x[i])
    global_y = jax.make_array_from_callback(y.shape, by_example, lambda i: y[i])
    current = jax.tree.map(
      lambda a: jax.make_array_from_callback(a.shape, replicated, lambda i: a[i]),
      params,
    )
    state = jax.jit(mesh_tx.init, out_shardings=replicated)(current)
    for _ in range(NUM_STEPS):
      current, state = mesh_step(current, state, global_x, global_y)

    difference = max(
      float(np.max(np.abs(np.asarray(a.addressable_data(0)) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(reference), strict=True)
    )
    moved = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params), strict=True)
    )
    with open(out, "w") as file:
      json.dump(
        {
          "process_index": jax.process_index(),
          "process_count": jax.process_count(),
          "global_devices": jax.device_count(),
          "local_devices": jax.local_device_count(),
          "mesh_vs_single_device": difference,
          "moved": moved,
        },
        file,
      )
  finally:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
