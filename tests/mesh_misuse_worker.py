"""Mesh misuses on 8 simulated CPU devices: refused, or one device's answer.

Run once by tests/test_mesh_misuse.py in a fresh process, since the device
count must be set before JAX starts. For every case it reports whether the
call raised (the error's type and message) or its value, beside the value of
the same computation on one device. Prints one JSON report on stdout.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
# The simulated devices are CPU devices: on a machine with a GPU, JAX would
# otherwise pick the GPU, a single device.
os.environ["JAX_PLATFORMS"] = "cpu"

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import nso_jax
from nso_jax import batching
from nso_jax import hessian

SIGMA = 0.1
NUM_PAIRS = 4


def loss(params, batch):
  """A shard's mean loss: 8 parameters, two leaves."""
  x, y = batch
  pred = jnp.tanh(x @ params["a"]) + (x**2) @ params["b"]
  return jnp.mean((pred - y) ** 2)


def model(params, batch):
  x, _ = batch
  return jnp.tanh(x @ params["a"]) + (x**2) @ params["b"]


def squared_error(pred, batch):
  return (pred - batch[1]) ** 2


def make_problem():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "a": jax.random.normal(keys[0], (4,)) / 2,
    "b": jax.random.normal(keys[1], (4,)) / 4,
  }
  x = jax.random.normal(keys[2], (16, 4))
  y = jnp.sin(x.sum(axis=1))
  return params, (x, y)


PARAMS, BATCH = make_problem()
REFERENCE_POINT = jax.tree.map(lambda w: 0.5 * w, PARAMS)


def nso(grad_fn, params, *, data_axis=None, execution="auto"):
  return nso_jax.noise_stability_gradient(
    grad_fn,
    params,
    key=0,
    sigma=SIGMA,
    num_perturbations=NUM_PAIRS,
    execution=execution,
    data_axis=data_axis,
  )


def grads_only(batch, pmean_over=None):
  def shard_loss(p):
    value = loss(p, batch)
    return value if pmean_over is None else jax.lax.pmean(value, pmean_over)

  return jax.grad(shard_loss)


def with_value(batch, pmean_over=None):
  def shard_loss(p):
    value = loss(p, batch)
    return value if pmean_over is None else jax.lax.pmean(value, pmean_over)

  return jax.value_and_grad(shard_loss)


# Each computation: a function of (params, batch) run on one device on the
# whole batch (the reference) and inside shard_map on the batch's shard.
def nso_reference(params, batch):
  return nso(grads_only(batch), params)


def trace_value(result):
  return result.value


COMPUTATIONS = {
  "nso": nso_reference,
  "trace": lambda p, b: hessian.trace(loss, p, b, key=0, num_matvecs=8).value,
  "top_eigenvalues": lambda p, b: hessian.top_eigenvalues(
    loss, p, b, key=0, num_eigenvalues=2
  ),
  "max_eigenvalue": lambda p, b: (
    hessian.max_eigenvalue(loss, p, b, key=0, num_iters=50).eigenvalue
  ),
  "noise_stability_measure": lambda p, b: (
    hessian.noise_stability_measure(loss, p, b, key=0, sigma=SIGMA, num_draws=4).value
  ),
  "layer_hessian_measure": lambda p, b: hessian.layer_hessian_measure(
    loss, p, b, REFERENCE_POINT
  ),
  "layer_traces": lambda p, b: jax.tree.map(
    trace_value,
    hessian.layer_traces(loss, p, b, key=0, num_matvecs=8),
    is_leaf=lambda n: isinstance(n, hessian.TraceEstimate),
  ),
  "direction_curvature": lambda p, b: hessian.direction_curvature(
    loss, p, b, REFERENCE_POINT
  ),
  "ggn_trace": lambda p, b: (
    hessian.ggn_trace(model, squared_error, p, b, key=0, num_matvecs=8).value
  ),
}


def on_mesh(shape, names, fn, check_vma=True):
  """``fn(params, batch_shard)`` inside shard_map, the batch split over names[0]."""
  mesh = jax.make_mesh(shape, names)
  batch = jax.device_put(BATCH, NamedSharding(mesh, P(names[0])))
  mapped = jax.shard_map(
    fn, mesh=mesh, in_specs=(P(), P(names[0])), out_specs=P(), check_vma=check_vma
  )
  return jax.jit(mapped)(PARAMS, batch)


def flat(tree):
  return [float(v) for leaf in jax.tree.leaves(tree) for v in np.ravel(leaf)]


_REFERENCES = {}


def reference_value(name):
  """The computation ``name`` on one device, on the whole batch (computed once)."""
  if name not in _REFERENCES:
    _REFERENCES[name] = flat(jax.jit(COMPUTATIONS[name])(PARAMS, BATCH))
  return _REFERENCES[name]


def run_case(run, reference):
  """``{"raised", "error", "message", "value", "reference"}`` for one case."""
  report = {"reference": reference_value(reference)}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      value = run()
    except Exception as error:  # the outcome under test
      report.update(raised=True, error=type(error).__name__, message=str(error))
      return report
  report.update(
    raised=False, value=flat(value), warnings=[str(w.message) for w in caught]
  )
  return report


def vmapped(fn):
  """``fn(params, batch)`` for 2 copies of the batch, under jax.vmap axis 'v'."""
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), BATCH)
  return jax.jit(jax.vmap(fn, in_axes=(None, 0), axis_name="v"))(PARAMS, stacked)


M8 = ((8,), ("data",))
M24 = ((2, 4), ("data", "pair"))


def hessian_without_data_axis(name):
  return lambda: on_mesh(*M8, COMPUTATIONS[name])


CASES = {
  # NSO: a shard's gradient with `data_axis` forgotten (8x too large).
  "nso_data_axis_forgotten": (
    lambda: on_mesh(*M8, lambda p, b: nso(grads_only(b), p)),
    "nso",
  ),
  "nso_value_data_axis_forgotten": (
    lambda: on_mesh(*M8, lambda p, b: nso(with_value(b), p)[1]),
    "nso",
  ),
  # The data axis given as the pair axis (8x too large).
  "nso_execution_axis_is_the_data_axis": (
    lambda: on_mesh(
      *M8,
      lambda p, b: nso(grads_only(b), p, execution=batching.Execution(axis="data")),
    ),
    "nso",
  ),
  # 2x4: data_axis and the pair axis swapped (2x too large).
  "nso_data_and_pair_axes_swapped": (
    lambda: on_mesh(
      *M24,
      lambda p, b: nso(
        grads_only(b),
        p,
        data_axis="pair",
        execution=batching.Execution(axis="data"),
      ),
    ),
    "nso",
  ),
  # data_axis with a loss that already pmeans (1/8).
  "nso_data_axis_with_pmean_loss": (
    lambda: on_mesh(*M8, lambda p, b: nso(grads_only(b, "data"), p, data_axis="data")),
    "nso",
  ),
  "nso_value_data_axis_with_pmean_loss": (
    lambda: on_mesh(
      *M8, lambda p, b: nso(with_value(b, "data"), p, data_axis="data")[1]
    ),
    "nso",
  ),
  # Hessian tools and measures given a shard's loss without data_axis.
  **{
    f"{name}_data_axis_forgotten": (hessian_without_data_axis(name), name)
    for name in (
      "trace",
      "top_eigenvalues",
      "max_eigenvalue",
      "noise_stability_measure",
      "layer_hessian_measure",
      "layer_traces",
      "direction_curvature",
      "ggn_trace",
    )
  },
  # The two measures that now take data_axis: one device's answer.
  "layer_traces_with_data_axis": (
    lambda: on_mesh(
      *M8,
      lambda p, b: jax.tree.map(
        trace_value,
        hessian.layer_traces(loss, p, b, key=0, num_matvecs=8, data_axis="data"),
        is_leaf=lambda n: isinstance(n, hessian.TraceEstimate),
      ),
    ),
    "layer_traces",
  ),
  "direction_curvature_with_data_axis": (
    lambda: on_mesh(
      *M8,
      lambda p, b: hessian.direction_curvature(
        loss, p, b, REFERENCE_POINT, data_axis="data"
      ),
    ),
    "direction_curvature",
  ),
  # An axis of jax.vmap where a mesh axis is expected.
  "nso_execution_axis_is_a_vmap_axis": (
    lambda: vmapped(
      lambda p, b: nso(grads_only(b), p, execution=batching.Execution(axis="v"))
    ),
    "nso",
  ),
  "nso_data_axis_is_a_vmap_axis": (
    lambda: vmapped(lambda p, b: nso(grads_only(b), p, data_axis="v")),
    "nso",
  ),
  "trace_execution_axis_is_a_vmap_axis": (
    lambda: vmapped(
      lambda p, b: (
        hessian.trace(
          loss, p, b, key=0, num_matvecs=8, execution=batching.Execution(axis="v")
        ).value
      )
    ),
    "trace",
  ),
  "trace_data_axis_is_a_vmap_axis": (
    lambda: vmapped(
      lambda p, b: hessian.trace(loss, p, b, key=0, num_matvecs=8, data_axis="v").value
    ),
    "trace",
  ),
}

# The declared uses beside them, which must keep one device's answer.
LEGITIMATE = {
  "nso_data_axis": (
    lambda: on_mesh(*M8, lambda p, b: nso(grads_only(b), p, data_axis="data")),
    "nso",
  ),
  # Without varying types nothing is checked, and nothing is refused.
  "nso_data_axis_check_vma_off": (
    lambda: on_mesh(
      *M8, lambda p, b: nso(grads_only(b), p, data_axis="data"), check_vma=False
    ),
    "nso",
  ),
  "nso_pmean_loss": (
    lambda: on_mesh(*M8, lambda p, b: nso(grads_only(b, "data"), p)),
    "nso",
  ),
  "nso_value_data_axis_2x4_pairs_split": (
    lambda: on_mesh(
      *M24,
      lambda p, b: nso(
        with_value(b), p, data_axis="data", execution=batching.Execution(axis="pair")
      )[1],
    ),
    "nso",
  ),
  "trace_pmean_loss": (
    lambda: on_mesh(
      *M8,
      lambda p, b: (
        hessian.trace(
          lambda q, c: jax.lax.pmean(loss(q, c), "data"), p, b, key=0, num_matvecs=8
        ).value
      ),
    ),
    "trace",
  ),
  "top_eigenvalues_data_axis_probes_split": (
    lambda: on_mesh(
      *M24,
      lambda p, b: hessian.top_eigenvalues(
        loss, p, b, key=0, num_eigenvalues=2, data_axis="data"
      ),
    ),
    "top_eigenvalues",
  ),
}


def main():
  report = {
    "num_devices": jax.device_count(),
    "cases": {name: run_case(*case) for name, case in CASES.items()},
    "legitimate": {name: run_case(*case) for name, case in LEGITIMATE.items()},
  }
  print(json.dumps(report))


if __name__ == "__main__":
  main()
