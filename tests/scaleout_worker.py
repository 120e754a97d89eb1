"""NSO and the Hessian tools on meshes of 8 simulated CPU devices.

Run by tests/test_scaleout.py in a fresh process (the device count must be
set before JAX starts). Prints a JSON report on stdout: relative differences
from one device, and the collectives in the compiled steps.
"""

import os

# LLVM's optimizations are skipped (level 0): the optimized HLO, collectives
# included, is the same as at the default level, and compiling the many small
# programs below takes about half the CPU time.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
# The simulated devices are CPU devices: on a machine with a GPU, JAX would
# otherwise pick the GPU, a single device.
os.environ["JAX_PLATFORMS"] = "cpu"

import contextlib
import dataclasses
import io
import json
import pathlib
import re
import sys
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
from nso_jax import batching
from nso_jax import hessian

MESHES = [(8, 1), (1, 8), (4, 2), (2, 4)]
NUM_STEPS = 3
SIGMA = 0.05
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")


def relative(a, b):
  """``|a - b| / |b|`` over all leaves (Euclidean norms)."""
  diff = sum(
    float(np.sum((np.asarray(u, np.float64) - np.asarray(v, np.float64)) ** 2))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )
  norm = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in jax.tree.leaves(b))
  return (diff / norm) ** 0.5


def host_difference(a, b):
  """``a - b`` in their dtype, in NumPy: the same IEEE subtraction as on the
  devices, without compiling a subtraction for every mesh and layout."""
  return np.asarray(a) - np.asarray(b)


def count_collectives(compiled_text):
  counts = {}
  for op in COLLECTIVES:
    # An op is `name(` or its asynchronous `name-start(`.
    counts[op] = len(re.findall(rf" {op}(?:-start)?\(", compiled_text))
  return counts


def mesh_of(shape):
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh(shape, ("data", "noise"), axis_types=auto)


def single_device_trajectory(tx, params, x, y):
  @jax.jit
  def step(params, opt_state):
    grad_fn = lambda p: jax.grad(loss)(p, x, y)
    updates, opt_state = tx.update(None, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state

  path, opt_state = [params], tx.init(params)
  for _ in range(NUM_STEPS):
    params, opt_state = step(params, opt_state)
    path.append(params)
  return path


def mesh_step(mesh, tx):
  """One NSO step written per device: the batch split over `data`, the pairs
  over `noise`; parameters and optimizer state replicated inside."""

  @partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), P(), P("data"), P("data")),
    out_specs=(P(), P()),
  )
  def step(params, opt_state, x, y):
    grad_fn = lambda p: jax.grad(loss)(p, x, y)  # this shard's gradient
    updates, opt_state = tx.update(None, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state

  return step


def nso_on_meshes(params, x, y):
  report = {}
  both = ("data", "noise")
  param_specs = {"w1": P(None, both), "b1": P(both), "w2": P()}
  for k in (5, 8):  # 5: not a multiple of the pair axis's size (2, 4 or 8)
    make_tx = partial(nso_jax.nso, optax.sgd(0.1, momentum=0.9), SIGMA, k, key=0)
    reference = single_device_trajectory(make_tx(), params, x, y)
    for shape in MESHES:
      mesh = mesh_of(shape)
      tx = make_tx(execution=nso_jax.batching.Execution(axis="noise"), data_axis="data")
      inner = mesh_step(mesh, tx)
      for layout in ("replicated", "sharded"):
        specs = param_specs if layout == "sharded" else {name: P() for name in params}
        # Sharded: stored split over all 8 devices (FSDP-style), gathered by
        # shard_map for the step and split again after it.
        shardings = {name: NamedSharding(mesh, spec) for name, spec in specs.items()}

        @jax.jit
        def step(params, opt_state, x, y, shardings=shardings, inner=inner):
          params, opt_state = inner(params, opt_state, x, y)
          return jax.lax.with_sharding_constraint(params, shardings), opt_state

        by_example = NamedSharding(mesh, P("data"))
        placed_x = jax.device_put(x, by_example)
        placed_y = jax.device_put(y, by_example)
        current = jax.device_put(params, shardings)
        opt_state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
        name = f"k{k}_{shape[0]}x{shape[1]}_{layout}"
        errors = []
        for t in range(NUM_STEPS):
          previous = current
          current, opt_state = step(current, opt_state, placed_x, placed_y)
          update = jax.tree.map(host_difference, current, previous)
          expected = jax.tree.map(host_difference, reference[t + 1], reference[t])
          errors.append(relative(update, expected))
        text = step.lower(current, opt_state, placed_x, placed_y).compile().as_text()
        report[name] = {
          "update_relative_errors": errors,
          "params_relative_error": relative(current, reference[-1]),
          "devices": len(current["b1"].sharding.device_set),
          "collectives": count_collectives(text),
        }
  return report


def nso_options_on_meshes(params, x, y):
  """The transformation's other options with the pairs and data split."""
  cases = {
    # Clean gradient mixed in (computed, averaged over shards), the value
    # (grad_fn returns one) averaged, noise on two leaves only.
    "clean_value_filter": (
      (4, 2),
      ("data", "noise"),
      {
        "clean_weight": 0.5,
        "param_filter": {"w1": True, "b1": False, "w2": True},
        "num_perturbations": 3,
      },
    ),
    # One-sided, in chunks of 2 with k = 5 on 2 devices: a remainder and a
    # discarded surplus pair.
    "one_sided_chunks": (
      (4, 2),
      ("data", "noise"),
      {
        "one_sided": True,
        "execution": nso_jax.batching.Execution("map", chunk_size=2),
        "num_perturbations": 5,
      },
    ),
    # The batch split over two mesh axes.
    "two_data_axes": ((2, 2, 2), ("a", "b", "noise"), {"num_perturbations": 4}),
  }
  report = {}
  for name, (shape, names, options) in cases.items():
    has_value = name == "clean_value_filter"
    grad = jax.value_and_grad(loss) if has_value else jax.grad(loss)
    execution = options.get("execution", nso_jax.batching.Execution())
    make_tx = partial(nso_jax.noise_stability, SIGMA, key=1, **options)
    single_tx = make_tx()

    @jax.jit
    def single_step(params, state, single_tx=single_tx, grad=grad):
      zeros = jax.tree.map(jnp.zeros_like, params)
      return single_tx.update(zeros, state, params, grad_fn=lambda p: grad(p, x, y))

    expected, expected_state = single_step(params, single_tx.init(params))
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    mesh = jax.make_mesh(shape, names, axis_types=auto)
    data_axes = names[:-1] if len(names) > 2 else "data"
    pairs = dataclasses.replace(execution, axis="noise")
    mesh_tx = make_tx(execution=pairs, data_axis=data_axes)
    batch_spec = P(names[:-1]) if len(names) > 2 else P("data")

    @jax.jit
    @partial(
      jax.shard_map,
      mesh=mesh,
      in_specs=(P(), P(), batch_spec, batch_spec),
      out_specs=(P(), P()),
    )
    def mesh_step(params, state, x, y, mesh_tx=mesh_tx, grad=grad):
      zeros = jax.tree.map(jnp.zeros_like, params)
      grad_fn = lambda p: grad(p, x, y)
      return mesh_tx.update(zeros, state, params, grad_fn=grad_fn)

    updates, state = mesh_step(params, mesh_tx.init(params), x, y)
    report[name] = {
      "update": relative(updates, expected),
      "value": relative(state.value, expected_state.value) if has_value else 0.0,
      "value_moved": float(expected_state.value) if has_value else 1.0,
    }
  return report


def per_shard_noise(params, x, y):
  """Each data shard draws its own pairs: against the formula on one device."""
  mesh, k, key = mesh_of((4, 2)), 3, jax.random.key(5)
  estimate = partial(nso_jax.noise_stability_gradient, sigma=SIGMA, num_perturbations=k)
  axes = {"execution": nso_jax.batching.Execution(axis="noise"), "data_axis": "data"}
  make_tx = partial(nso_jax.noise_stability, SIGMA, k, key=key, **axes)
  per_shard_tx, shared_tx = make_tx(per_shard_noise=True), make_tx()

  @jax.jit
  @partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), P("data"), P("data")),
    out_specs=(P(), P(), P()),
  )
  def on_mesh(params, x, y):
    grad_fn = lambda p: jax.grad(loss)(p, x, y)
    update = lambda tx: tx.update(None, tx.init(params), params, grad_fn=grad_fn)[0]
    # By hand, the estimator with a key folded with the shard's index.
    shard_key = jax.random.fold_in(jax.random.split(key)[0], jax.lax.axis_index("data"))
    by_hand = estimate(grad_fn, params, shard_key, **axes)
    return update(per_shard_tx), update(shared_tx), by_hand

  per_shard, shared, by_hand = on_mesh(params, x, y)
  step_key = jax.random.split(key)[0]  # the first update's key
  shards = [(x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]) for i in range(4)]
  formula = jax.tree.map(
    lambda *g: sum(g) / 4,
    *[
      estimate(
        lambda p, xs=xs, ys=ys: jax.grad(loss)(p, xs, ys),
        params,
        jax.random.fold_in(step_key, shard),
      )
      for shard, (xs, ys) in enumerate(shards)
    ],
  )
  single = estimate(lambda p: jax.grad(loss)(p, x, y), params, step_key)
  return {
    "per_shard_vs_formula": relative(per_shard, formula),
    "per_shard_vs_by_hand": relative(per_shard, by_hand),
    "per_shard_vs_shared_noise": relative(per_shard, single),
    "shared_vs_single": relative(shared, single),
  }


def hessian_on_meshes(params, x, y):
  """Trace (three estimators), SLQ and top eigenvalues: the data split over
  `data` (the loss the pmean of the shards' losses, or the shard's loss with
  `data_axis`), the probes over `noise`; against one device, same key."""
  key = jax.random.key(9)
  mean_loss = lambda p, batch: loss(p, *batch)

  def estimates(loss_fn, batch, probe_axis, data_axis=None):
    execution = batching.Execution(axis=probe_axis)
    trace = {
      method: hessian.trace(
        loss_fn,
        params,
        batch,
        key,
        num_matvecs=30,
        method=method,
        execution=execution,
        data_axis=data_axis,
      ).value
      for method in ("hutchinson", "hutch++", "xtrace")
    }
    density = hessian.spectral_density(
      loss_fn,
      params,
      batch,
      key,
      num_probes=5,
      num_steps=20,
      execution=execution,
      data_axis=data_axis,
    )
    top = hessian.top_eigenvalues(
      loss_fn, params, batch, key, num_eigenvalues=3, data_axis=data_axis
    )
    power = hessian.max_eigenvalue(loss_fn, params, batch, key, data_axis=data_axis)
    return trace, density.density, top, power.eigenvalue

  reference = jax.jit(lambda: estimates(mean_loss, (x, y), None))()
  report = {}
  for shape in MESHES:
    mesh = mesh_of(shape)

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
    def on_mesh(x, y):
      sharded_loss = lambda p, batch: jax.lax.pmean(mean_loss(p, batch), "data")
      return (
        estimates(sharded_loss, (x, y), "noise"),
        estimates(mean_loss, (x, y), "noise", data_axis="data"),
      )

    for convention, found in zip(("pmean", "data_axis"), on_mesh(x, y), strict=True):
      trace, density, top, power = found
      report[f"{shape[0]}x{shape[1]}_{convention}"] = {
        **{f"trace_{m}": relative(trace[m], reference[0][m]) for m in trace},
        "density": relative(density, reference[1]),
        "top_eigenvalues": relative(top, reference[2]),
        "max_eigenvalue": relative(power, reference[3]),
      }
  return report


def paper_measures_on_meshes(params, x, y):
  """The NSO paper's measures with their draws, layers and probes split over
  a mesh axis by `Execution(axis=...)` (the data replicated), against one
  device with the same key. 7 draws, 3 layers and 10 probes leave some
  devices idle on 2, 4 and 8 of them."""
  key = jax.random.key(4)
  mean_loss = lambda p, batch: loss(p, *batch)
  reference_params = jax.tree.map(lambda w: 0.5 * w, params)
  batches = [(x[:20], y[:20]), (x[20:40], y[20:40]), (x[40:], y[40:])]

  def measures(x, y, axis):
    execution = batching.Execution(axis=axis)
    stability = hessian.noise_stability_measure(
      mean_loss, params, (x, y), key, sigma=0.1, num_draws=7, execution=execution
    )
    layers = hessian.layer_hessian_measure(
      mean_loss, params, (x, y), reference_params, execution=execution
    )
    traces = hessian.layer_traces(
      mean_loss, params, (x, y), key, num_matvecs=10, execution=execution
    )
    bound = hessian.trace_bound_term(
      mean_loss,
      params,
      batches,
      reference_params,
      key,
      num_examples=64,
      num_matvecs=6,
      execution=execution,
    )
    return {
      "noise_stability": stability.samples,
      "layer_hessian_measure": layers,
      "layer_traces": jax.tree.map(
        lambda t: t.value,
        traces,
        is_leaf=lambda node: isinstance(node, hessian.TraceEstimate),
      ),
      "trace_bound_term": (bound.value, bound.layer_traces),
    }

  reference = jax.jit(lambda: measures(x, y, None))()
  report = {}
  runs = [(shape, "noise") for shape in MESHES] + [((4, 2), ("data", "noise"))]
  for shape, axis in runs:
    mesh = mesh_of(shape)
    on_mesh = jax.jit(
      jax.shard_map(
        partial(measures, axis=axis), mesh=mesh, in_specs=(P(), P()), out_specs=P()
      )
    )
    found = on_mesh(x, y)
    name = f"{shape[0]}x{shape[1]}_{'_'.join(np.atleast_1d(axis))}"
    report[name] = {m: relative(found[m], reference[m]) for m in reference}
  return report


def readings_on_a_mesh(params, x, y):
  """curvature_readings and tune_sigma on a 2 x 2 data x noise mesh (4 of the
  8 devices): the pairs split over `noise`, the batch over `data`; three
  steps against one device. The controller's rate and target make it move
  sigma by sqrt(2) a step."""
  value_and_grad = jax.value_and_grad(loss)
  make_nso = partial(nso_jax.nso, optax.sgd(0.1, momentum=0.9), SIGMA, 2, key=0)
  axes = {"execution": nso_jax.batching.Execution(axis="noise"), "data_axis": "data"}
  wrappers = {
    "readings": nso_jax.curvature_readings,
    "tune_sigma": partial(nso_jax.tune_sigma, target=1.0, rate=1.0),
  }
  mesh = mesh_of((2, 2))
  report = {}
  for name, wrap in wrappers.items():
    single_tx, mesh_tx = wrap(make_nso()), wrap(make_nso(**axes))

    def update(tx, params, state, x, y):
      grad_fn = lambda p: value_and_grad(p, x, y)  # this shard's (loss, grads)
      updates, state = tx.update(None, state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), state

    single = jax.jit(partial(update, single_tx))
    on_mesh = jax.jit(
      jax.shard_map(
        partial(update, mesh_tx),
        mesh=mesh,
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P(), P()),
      )
    )
    replicated, by_example = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    runs = [
      (single, single_tx.init(params), params, x, y),
      (
        on_mesh,
        jax.device_put(mesh_tx.init(params), replicated),
        jax.device_put(params, replicated),
        jax.device_put(x, by_example),
        jax.device_put(y, by_example),
      ),
    ]
    paths = []
    for step, state, current, xs, ys in runs:
      path = []
      for _ in range(NUM_STEPS):
        current, state = step(current, state, xs, ys)
        readings = state[1] if name == "readings" else state[0][1]
        sigma = state[1].last_sigma if name == "tune_sigma" else SIGMA
        path.append((current, readings.trace, readings.relative_gap, sigma))
      paths.append(path)
    reference, found = paths
    errors = [
      [relative(a[i], b[i]) for a, b in zip(found, reference, strict=True)]
      for i in range(4)
    ]
    report[name] = {
      "params": errors[0],
      "trace": errors[1],
      "relative_gap": errors[2],
      "sigma": errors[3],
      "sigmas": [float(point[3]) for point in reference],
      "traces": [float(point[1]) for point in reference],
    }
  return report


def mesh_example():
  """``python -m benchmarks.scaleout --mesh data=2,noise=2 --k 3 --steps 2
  --repeats 1``, run in this process (4 of its 8 devices): the lines it prints."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  from benchmarks import scaleout

  argv = ["--mesh", "data=2,noise=2", "--k", "3", "--steps", "2", "--repeats", "1"]
  args = scaleout.build_parser().parse_args(argv)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    scaleout.run(args, [args.mesh])
  return printed.getvalue().splitlines()


def main():
  params, x, y = make_problem()
  print(
    json.dumps(
      {
        "num_devices": jax.device_count(),
        "nso": nso_on_meshes(params, x, y),
        "nso_options": nso_options_on_meshes(params, x, y),
        "per_shard_noise": per_shard_noise(params, x, y),
        "hessian": hessian_on_meshes(params, x, y),
        "paper_measures": paper_measures_on_meshes(params, x, y),
        "readings": readings_on_a_mesh(params, x, y),
        "mesh_example": mesh_example(),
      }
    )
  )


if __name__ == "__main__":
  main()
