"""Property-based tests of the NSO estimator over pytrees, dtypes and settings.

Hypothesis draws pytree structures (nested dicts and lists), leaf shapes
(scalars to 3-D), leaf dtypes (float16, bfloat16, float32, float64), ``k``,
``sigma``, the noise and the execution strategy. For every draw:

* the estimate has the structure, shapes and dtypes of the parameters;
* finite parameters give a finite estimate;
* the same key gives the same bits;
* every execution strategy gives the same estimate up to the rounding of a
  sum: one unit in the last place (ulp) of the result for half-precision
  leaves (the sum runs in float32, then rounds once), and for float32 and
  float64 leaves the rounding bound of a sum of ``2k`` terms, ``2k`` ulps of
  the largest term.

The default run draws 20 examples; ``--full-scale`` draws 200.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax_compat import enable_x64

import nso_jax

DTYPES = ("float16", "bfloat16", "float32", "float64")
EXECUTIONS = (
  dict(execution="vmap"),
  dict(execution="map"),
  dict(execution=nso_jax.batching.Execution("map", chunk_size=2)),
  dict(execution="unroll"),
)
# |w| <= 2, sigma <= 0.5 and bounded noise (|z| <= sqrt(3)) keep every
# perturbed point within 2.9, where |grad| <= 2.9 + 2.9**3 / 8 < 6.
LARGEST_TERM = 6.0

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
leaves = st.tuples(shapes, st.sampled_from(DTYPES))
trees = st.recursive(
  leaves,
  lambda children: st.one_of(
    st.lists(children, min_size=1, max_size=3),
    st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
  ),
  max_leaves=5,
)


def is_spec(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], str)


def grad_fn(params):
  return jax.tree.map(lambda w: jnp.tanh(w) * w + w**3 / 8, params)


def build_params(spec, seed):
  leaves_spec, treedef = jax.tree.flatten(spec, is_leaf=is_spec)
  rng = np.random.default_rng(seed)
  leaves = [
    jnp.asarray(rng.uniform(-2, 2, size=shape), dtype=dtype)
    for shape, dtype in leaves_spec
  ]
  return jax.tree.unflatten(treedef, leaves)


@functools.cache
def compiled_estimator(sigma, k, noise, execution):
  """One jitted estimator per setting, the parameters and the key traced: a
  second call with the same key reruns the compiled program."""
  return jax.jit(
    lambda p, key: nso_jax.noise_stability_gradient(
      grad_fn,
      p,
      key,
      sigma=sigma,
      num_perturbations=k,
      noise=noise,
      execution=execution,
    )
  )


def estimate(params, key, sigma, k, noise, options):
  return compiled_estimator(sigma, k, noise, options["execution"])(params, key)


def ulp(values, dtype):
  finfo = jnp.finfo(dtype)
  magnitude = np.maximum(np.abs(values), float(finfo.tiny))
  return np.exp2(np.floor(np.log2(magnitude)) - finfo.nmant)


@settings(
  deadline=None,
  derandomize=True,
  suppress_health_check=[HealthCheck.too_slow],
)
@given(
  spec=trees,
  seed=st.integers(0, 2**31 - 1),
  k=st.integers(1, 3),
  sigma=st.floats(0.0, 0.5),
  noise=st.sampled_from(["rademacher", "uniform"]),
  options=st.sampled_from(EXECUTIONS),
)
def test_estimator_properties(spec, seed, k, sigma, noise, options):
  with enable_x64(True):
    params = build_params(spec, seed)
    key = jax.random.key(seed)
    got = estimate(params, key, sigma, k, noise, options)
    again = estimate(params, jax.random.key(seed), sigma, k, noise, options)
    reference = estimate(params, key, sigma, k, noise, dict(execution="vmap"))

  assert jax.tree.structure(got) == jax.tree.structure(params)
  for g, p, a, r in zip(
    jax.tree.leaves(got),
    jax.tree.leaves(params),
    jax.tree.leaves(again),
    jax.tree.leaves(reference),
    strict=True,
  ):
    assert g.shape == p.shape and g.dtype == p.dtype
    values = np.asarray(g, np.float64)
    assert np.all(np.isfinite(values))
    assert np.array_equal(np.asarray(a, np.float64), values, equal_nan=True)
    difference = np.abs(values - np.asarray(r, np.float64))
    if jnp.dtype(p.dtype).itemsize < 4:
      bound = ulp(
        np.maximum(np.abs(values), np.abs(np.asarray(r, np.float64))), p.dtype
      )
    else:
      bound = 2 * k * ulp(LARGEST_TERM, p.dtype)
    assert np.all(difference <= bound), (p.dtype, difference.max(), bound)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ulp_helper(dtype):
  with enable_x64(True):
    one = jnp.asarray(1.0, dtype)
    step = float(jnp.nextafter(one, jnp.asarray(2.0, dtype))) - 1.0
  assert math.isclose(float(ulp(1.0, dtype)), step)
