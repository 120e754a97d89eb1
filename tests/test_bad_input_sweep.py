"""A sweep of bad inputs across every public entry point of the library.

Each case calls one function with one argument set to a bad value and
expects a ``ValueError`` or ``TypeError`` raised before any computation, whose
message names the argument (in backticks) and what was given or expected.
Nothing may pass silently, crash inside XLA, or hang. The command's bad
inputs are swept in ``tests/test_cli.py``.
"""

import math

import jax.numpy as jnp
import optax
import pytest

import nso_jax
from nso_jax import batching
from nso_jax import hessian

NAN, INF = math.nan, math.inf
W = jnp.ones(4)
BATCH = {"x": jnp.ones((6, 4)), "y": jnp.zeros(6)}


def loss(w, batch):
  return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


def model(w, batch):
  return batch["x"] @ w


def per_example(out, batch):
  return (out - batch["y"]) ** 2


def matvec(v):
  return 2.0 * v


BAD_COUNTS = [0, -1, 2.5, "3", None, True, jnp.ones(2)]
BAD_NONNEGATIVE = [-0.1, NAN, INF, "x", None, True, jnp.ones(2), jnp.array(-1.0)]
BAD_POSITIVE = [0.0, -1.0, NAN, INF, "x", True]
BAD_BOOLS = ["no", 0, 1, None]
BAD_KEYS = [None, "seed", 1.5, True, 2**64]
BAD_EXECUTIONS = ["pmap", None, 1, "VMAP"]

ENTRY_POINTS = {
  # name: (function, valid keyword arguments, {argument: bad values})
  "noise_stability": (
    nso_jax.noise_stability,
    dict(sigma=0.1, key=0),
    dict(
      sigma=BAD_NONNEGATIVE,
      num_perturbations=BAD_COUNTS,
      key=BAD_KEYS,
      noise=["cauchy", None, 3],
      one_sided=BAD_BOOLS,
      clean_weight=[-0.1, 1.5, NAN, "x", None],
      execution=BAD_EXECUTIONS,
      param_filter=[3, {"w": 1}, "w"],
      data_axis=[3, ("d", "d"), (), ("d", 1)],
      per_shard_noise=[*BAD_BOOLS, True],
    ),
  ),
  "nso": (
    nso_jax.nso,
    dict(optimizer=optax.sgd(0.1), sigma=0.1, key=0),
    dict(
      sigma=[-1.0, NAN],
      key=[None],
      skip_nonfinite=BAD_BOOLS,
      execution=["pmap"],
      param_filter=[3],
      data_axis=[3],
    ),
  ),
  "noise_stability_gradient": (
    nso_jax.noise_stability_gradient,
    dict(grad_fn=lambda p: 2 * p, params=W, key=0, sigma=0.1),
    dict(
      sigma=BAD_NONNEGATIVE,
      num_perturbations=BAD_COUNTS,
      key=BAD_KEYS,
      noise=["gauss"],
      one_sided=BAD_BOOLS,
      params=[{}, jnp.ones(3, jnp.int32)],
      grad_fn=[
        lambda p: p[:2],
        lambda p: (p, p, p),
        lambda p: (p, p[:2]),
        lambda p: p.astype(jnp.int32),
      ],
      execution=BAD_EXECUTIONS,
      param_filter=[3, {"w": True}],
      data_axis=[3, "data"],
    ),
  ),
  "noise_resolution": (
    nso_jax.noise_resolution,
    dict(params=W, sigma=0.1, key=0),
    dict(
      sigma=[-1.0, NAN, "x"],
      key=BAD_KEYS,
      noise=["gauss"],
      params=[{}, jnp.ones(3, jnp.int32)],
      param_filter=[3, lambda path, leaf: False],
    ),
  ),
  "sample_noise": (
    nso_jax.sample_noise,
    dict(key=0, tree=W),
    dict(noise=["gauss", None], tree=[{"n": jnp.ones(2, jnp.int32)}], key=BAD_KEYS),
  ),
  "sum_indices": (
    batching.sum_indices,
    dict(fn=lambda i: i, size=3),
    dict(size=BAD_COUNTS, execution=BAD_EXECUTIONS),
  ),
  "Execution": (
    batching.Execution,
    dict(strategy="map"),
    dict(
      strategy=BAD_EXECUTIONS,
      chunk_size=[0, -2, 2.5, "4", True],
      axis=[3, (), ("a", "a"), ("a", 1), ["a"]],
    ),
  ),
  "map_indices": (
    batching.map_indices,
    dict(fn=lambda i: i, size=3),
    dict(size=[0, -3], execution=BAD_EXECUTIONS),
  ),
  "trace": (
    hessian.trace,
    dict(loss_fn=loss, params=W, data=BATCH, key=0, num_matvecs=4),
    dict(
      num_matvecs=BAD_COUNTS,
      method=["hutch", None],
      rtol=[-1.0, NAN, "x"],
      key=BAD_KEYS,
      params=[{}, {"n": jnp.ones(2, jnp.int32)}],
      data=[None, [], (BATCH, BATCH), StopIteration],
      execution=BAD_EXECUTIONS,
      param_filter=[{"no": True}, lambda path, leaf: 1],
    ),
  ),
  "top_eigenvalues": (
    hessian.top_eigenvalues,
    dict(loss_fn=loss, params=W, data=BATCH, key=0, num_eigenvalues=2),
    dict(num_eigenvalues=[0, 5, 2.5, "x"], num_steps=[0, 1.5, 99]),
  ),
  "eigenvalues": (
    hessian.eigenvalues,
    dict(loss_fn=loss, params=W, data=BATCH, key=0, num_eigenvalues=2),
    dict(which=["BE", None, "la"]),
  ),
  "max_eigenvalue": (
    hessian.max_eigenvalue,
    dict(loss_fn=loss, params=W, data=BATCH, key=0),
    dict(num_iters=BAD_COUNTS, tol=[-1.0, NAN, "x"]),
  ),
  "spectral_density": (
    hessian.spectral_density,
    dict(
      loss_fn=loss,
      params=W,
      data=BATCH,
      key=0,
      num_steps=4,
      grid=hessian.DensityGrid(size=10),
    ),
    dict(
      num_probes=BAD_COUNTS,
      num_steps=[0, 1.5],
      grid=[
        10,
        (10, None, None),
        hessian.DensityGrid(size=1),
        hessian.DensityGrid(size=0),
        *[hessian.DensityGrid(bandwidth=bad) for bad in BAD_POSITIVE],
        *[hessian.DensityGrid(bounds=bad) for bad in [(1.0, 0.0), (0.0,), (0.0, 0.0)]],
      ],
      execution=BAD_EXECUTIONS,
    ),
  ),
  "hutchinson": (
    hessian.hutchinson,
    dict(matvec=matvec, template=W, key=0, num_matvecs=4),
    dict(
      num_matvecs=BAD_COUNTS,
      probe=["sphere"],
      template=[{}, jnp.ones(2, jnp.int32)],
      execution=BAD_EXECUTIONS,
    ),
  ),
  "hutch_pp": (
    hessian.hutch_pp,
    dict(matvec=matvec, template=W, key=0, num_matvecs=6),
    dict(num_matvecs=[2, 0, 2.5], probe=["x"]),
  ),
  "xtrace": (
    hessian.xtrace,
    dict(matvec=matvec, template=W, key=0, num_matvecs=6),
    dict(num_matvecs=[1, 0], template=[{}]),
  ),
  "lanczos_eigenvalues": (
    hessian.lanczos_eigenvalues,
    dict(matvec=matvec, template=W, key=0, num_eigenvalues=2),
    dict(num_eigenvalues=[0, 9], which=["XX"], num_steps=[1, 99]),
  ),
  "lanczos_tridiag": (
    hessian.lanczos_tridiag,
    dict(matvec=matvec, v0=W, num_steps=2, key=0),
    dict(num_steps=[0, 9, 1.5], v0=[jnp.ones((2, 2))], key=[None]),
  ),
  "power_iteration": (
    hessian.power_iteration,
    dict(matvec=matvec, template=W, key=0),
    dict(num_iters=[0, "x"], tol=[-1.0, NAN]),
  ),
  "hessian_operator": (
    hessian.hessian_operator,
    dict(loss_fn=loss, params=W, data=BATCH),
    dict(
      loss_fn=[lambda w, b: b["x"] @ w, lambda w, b: jnp.int32(1)],
      data=[None, [], {"x": jnp.ones(3), "y": jnp.ones(2)}, {"x": jnp.float32(1)}],
      param_filter=[lambda path, leaf: False],
    ),
  ),
  "ggn_operator": (
    hessian.ggn_operator,
    dict(model_fn=model, per_example_loss=per_example, params=W, data=BATCH),
    dict(
      per_example_loss=[lambda out, b: jnp.ones((2, 2))],
      params=[{}],
      data=[hessian.StackedBatches({"x": jnp.ones(3)}, None)],
    ),
  ),
  "StackedBatches": (
    lambda data: hessian.trace(loss, W, data, 0, num_matvecs=2),
    dict(
      data=hessian.StackedBatches({"x": jnp.ones((2, 6, 4)), "y": jnp.zeros((2, 6))})
    ),
    dict(
      data=[
        hessian.StackedBatches(
          {"x": jnp.ones((2, 6, 4)), "y": jnp.zeros((2, 6))}, jnp.ones(3)
        ),
        hessian.StackedBatches(
          {"x": jnp.ones((2, 6, 4)), "y": jnp.zeros((2, 6))}, -jnp.ones(2)
        ),
        hessian.StackedBatches({"x": jnp.ones((2, 6, 4)), "y": jnp.zeros((3, 6))}),
      ]
    ),
  ),
}

# Faults once reported. Every case of this sweep is a case of the fault sweep
# (`pytest -m fault`) whose outcome must be a clear error naming the argument.
FLOAT8 = jnp.ones(4, jnp.float8_e4m3fn)
ONE_ARGUMENT = lambda path: True  # param_filter takes (path, leaf)
REPORTED = {
  "noise_stability": dict(param_filter=[ONE_ARGUMENT]),
  "nso": dict(param_filter=[ONE_ARGUMENT]),
  "noise_stability_gradient": dict(
    grad_fn=[5], params=[FLOAT8, {"w": W, "e": FLOAT8}], param_filter=[ONE_ARGUMENT]
  ),
  "noise_resolution": dict(params=[FLOAT8]),
  "sample_noise": dict(tree=[FLOAT8]),
  "sum_indices": dict(fn=[5], size=[2**31]),
  "map_indices": dict(fn=[None], size=[2**40]),
  "trace": dict(loss_fn=[5], params=[FLOAT8], param_filter=[ONE_ARGUMENT]),
  "hessian_operator": dict(loss_fn=["loss"], param_filter=[ONE_ARGUMENT]),
  "ggn_operator": dict(model_fn=[5], per_example_loss=[None]),
  "hutchinson": dict(matvec=[5], template=[FLOAT8]),
  "lanczos_eigenvalues": dict(matvec=[None]),
  "lanczos_tridiag": dict(matvec=[5]),
  "power_iteration": dict(matvec=[5]),
}

# The argument a message must name, where it is not the argument itself.
NAMED_AS = {
  ("trace", "params"): "`params`",
  ("StackedBatches", "data"): "`data",
  ("ggn_operator", "data"): "`data",
  ("hessian_operator", "param_filter"): "`param_filter`",
  ("trace", "param_filter"): "`param_filter`",
  ("noise_stability_gradient", "grad_fn"): "`grad_fn",
  ("hessian_operator", "loss_fn"): "`loss_fn`",
  ("ggn_operator", "per_example_loss"): "`per_example_loss`",
  ("top_eigenvalues", "num_steps"): "`num_steps`",
}

FAULT = pytest.mark.fault("clear")

CASES = [
  pytest.param(name, argument, bad, id=f"{name}-{argument}-{index}", marks=FAULT)
  for name, (_, _, bad_values) in ENTRY_POINTS.items()
  for argument, values in bad_values.items()
  for index, bad in enumerate(values)
] + [
  pytest.param(
    name, argument, bad, id=f"{name}-{argument}-reported-{index}", marks=FAULT
  )
  for name, bad_values in REPORTED.items()
  for argument, values in bad_values.items()
  for index, bad in enumerate(values)
]


def test_the_sweep_is_broad():
  assert len(CASES) >= 200


@pytest.mark.parametrize(("name", "argument", "bad"), CASES)
def test_bad_input_gets_a_clear_error(name, argument, bad):
  function, valid, _ = ENTRY_POINTS[name]
  arguments = dict(valid)
  arguments[argument] = iter([]) if bad is StopIteration else bad
  with pytest.raises((ValueError, TypeError)) as raised:
    function(**arguments)
  message = str(raised.value)
  expected_name = NAMED_AS.get((name, argument), f"`{argument}")
  if name == "StackedBatches":
    expected_name = "`data"
  assert expected_name in message, message
  assert len(message) < 600, message
