"""Equinox models trained with NSO and measured with the Hessian tools.

The filtered model ``eqx.filter(model, eqx.is_inexact_array)`` is a pytree of
float arrays with ``None`` where the other fields were, and JAX reads ``None``
as an empty subtree: nso_jax takes it as it is, with no adapter. These tests
pin that down, and run the code of ``docs/equinox.md``.
"""

import doctest
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optional import require

import nso_jax
from nso_jax import hessian

eqx = require("equinox", reason="equinox is not installed (pip install equinox)")

DOCS_PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "equinox.md"
LAST_LAYER = ".layers[2]"


def _mlp(seed=0):
  return eqx.nn.MLP(
    in_size=4, out_size=3, width_size=16, depth=2, key=jax.random.key(seed)
  )


def _data(seed=1, n=32):
  x_key, y_key = jax.random.split(jax.random.key(seed))
  return jax.random.normal(x_key, (n, 4)), jax.random.normal(y_key, (n, 3))


def _loss(model, x, y):
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _plain_params(model):
  """The MLP's weights as a plain pytree, in the MLP's leaf order."""
  return tuple((layer.weight, layer.bias) for layer in model.layers)


def _plain_loss(params, batch):
  """The MLP written by hand: relu hidden layers, an identity output."""

  def apply(x):
    for weight, bias in params[:-1]:
      x = jax.nn.relu(weight @ x + bias)
    weight, bias = params[-1]
    return weight @ x + bias

  x, y = batch
  return jnp.mean((jax.vmap(apply)(x) - y) ** 2)


def _assert_trees_close(actual, expected, **tolerance):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, e, **tolerance)


def test_filtered_model_is_a_pytree_of_float_arrays():
  model = _mlp()
  x, y = _data()
  params, static = eqx.partition(model, eqx.is_inexact_array)
  assert params.activation is None and params.final_activation is None
  assert params.layers[0].in_features is model.layers[0].in_features  # static
  assert all(
    jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in jax.tree.leaves(params)
  )
  grads = eqx.filter_grad(_loss)(eqx.combine(params, static), x, y)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  noise = nso_jax.sample_noise(0, params)
  assert jax.tree.structure(noise) == jax.tree.structure(params)


@pytest.mark.parametrize("execution", ["vmap", "map", "unroll"])
def test_nso_step_equals_the_reference_by_hand(execution):
  model = _mlp()
  x, y = _data()
  params, static = eqx.partition(model, eqx.is_inexact_array)
  grad_fn = lambda p: eqx.filter_grad(_loss)(eqx.combine(p, static), x, y)
  sigma, k, lr, seed = 0.05, 3, 0.1, 7
  tx = nso_jax.nso(optax.sgd(lr), sigma, k, key=seed, execution=execution)
  state = tx.init(params)
  updates, new_state = tx.update(None, state, params, grad_fn=grad_fn)
  new_model = eqx.apply_updates(model, updates)

  # The state's key is split once per update; pair j draws from fold_in(step, j).
  step_key, next_key = jax.random.split(jax.random.key(seed))
  grads = []
  for j in range(k):
    z = nso_jax.sample_noise(jax.random.fold_in(step_key, j), params, "normal")
    for sign in (1.0, -1.0):
      perturbed = jax.tree.map(lambda w, zi, s=sign: w + s * sigma * zi, params, z)
      grads.append(grad_fn(perturbed))
  reference = jax.tree.map(lambda *g: sum(g) / (2 * k), *grads)
  expected_updates = jax.tree.map(lambda g: -lr * g, reference)

  _assert_trees_close(updates, expected_updates, rtol=1e-5, atol=1e-7)
  _assert_trees_close(
    eqx.filter(new_model, eqx.is_inexact_array),
    eqx.filter(eqx.apply_updates(model, expected_updates), eqx.is_inexact_array),
    rtol=1e-6,
    atol=1e-7,
  )
  nso_state = new_state[0]
  assert int(nso_state.count) == 1
  np.testing.assert_array_equal(
    jax.random.key_data(nso_state.key), jax.random.key_data(next_key)
  )


def test_hessian_of_an_equinox_mlp_equals_that_of_the_plain_pytree():
  model = _mlp()
  batch = _data()
  params, static = eqx.partition(model, eqx.is_inexact_array)
  loss_fn = lambda p, b: _loss(eqx.combine(p, static), *b)
  plain = _plain_params(model)
  assert all(
    a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain), strict=True)
  )
  np.testing.assert_array_equal(loss_fn(params, batch), _plain_loss(plain, batch))

  for method in ("hutchinson", "hutch++"):
    ours = hessian.trace(loss_fn, params, batch, 3, num_matvecs=30, method=method)
    theirs = hessian.trace(_plain_loss, plain, batch, 3, num_matvecs=30, method=method)
    np.testing.assert_allclose(ours.value, theirs.value, rtol=1e-6)
    np.testing.assert_allclose(ours.stderr, theirs.stderr, rtol=1e-6)

  ours = hessian.top_eigenvalues(loss_fn, params, batch, 3, num_eigenvalues=3)
  theirs = hessian.top_eigenvalues(_plain_loss, plain, batch, 3, num_eigenvalues=3)
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  assert ours[0] >= ours[1] >= ours[2] > 0

  _, vectors = hessian.top_eigenvalues(
    loss_fn, params, batch, 3, num_eigenvalues=2, return_eigenvectors=True
  )
  assert jax.tree.structure(vectors) == jax.tree.structure(params)
  assert vectors.layers[0].weight.shape == (2, *params.layers[0].weight.shape)


def test_one_layer_by_partition_or_param_filter():
  model = _mlp()
  batch = _data()
  params, static = eqx.partition(model, eqx.is_inexact_array)
  loss_fn = lambda p, b: _loss(eqx.combine(p, static), *b)
  spec = eqx.tree_at(
    lambda m: m.layers[-1], jax.tree.map(lambda _: False, params), replace=True
  )
  last, rest = eqx.partition(params, spec)
  last_loss = lambda p, b: _loss(eqx.combine(p, rest, static), *b)
  in_last_layer = lambda path, _: jax.tree_util.keystr(path).startswith(LAST_LAYER)

  by_partition = hessian.trace(last_loss, last, batch, 0, num_matvecs=20)
  by_filter = hessian.trace(
    loss_fn, params, batch, 0, num_matvecs=20, param_filter=in_last_layer
  )
  plain = hessian.trace(
    _plain_loss,
    _plain_params(model),
    batch,
    0,
    num_matvecs=20,
    param_filter=(False, False, True),
  )
  np.testing.assert_allclose(by_filter.value, by_partition.value, rtol=1e-6)
  np.testing.assert_allclose(plain.value, by_partition.value, rtol=1e-6)


def test_an_equinox_filter_spec_as_param_filter():
  model = _mlp()
  batch = _data()
  params, static = eqx.partition(model, eqx.is_inexact_array)
  loss_fn = lambda p, b: _loss(eqx.combine(p, static), *b)
  spec = eqx.tree_at(
    lambda m: m.layers[-1], jax.tree.map(lambda _: False, params), replace=True
  )
  in_last_layer = lambda path, _: jax.tree_util.keystr(path).startswith(LAST_LAYER)
  by_spec = hessian.trace(loss_fn, params, batch, 0, num_matvecs=20, param_filter=spec)
  by_filter = hessian.trace(
    loss_fn, params, batch, 0, num_matvecs=20, param_filter=in_last_layer
  )
  np.testing.assert_allclose(by_spec.value, by_filter.value, rtol=1e-6)


class _Scaled(eqx.Module):
  """An MLP with fields of every kind NSO must leave alone."""

  mlp: eqx.nn.MLP
  count: jax.Array  # integer state: not trainable
  scale: float  # a Python number: a pytree leaf that is not an array
  name: str = eqx.field(static=True)

  def __call__(self, x):
    return self.scale * self.mlp(x)


def test_non_array_leaves_are_left_alone_and_the_structure_is_kept():
  original = _Scaled(_mlp(), jnp.array(3, jnp.int32), 2.0, "net")
  x, y = _data()
  params = eqx.filter(original, eqx.is_inexact_array)
  assert params.count is None and params.scale is None
  assert params.mlp.activation is None and params.name == "net"
  tx = nso_jax.nso(
    optax.sgd(0.05, momentum=0.9), sigma=0.05, num_perturbations=2, key=0
  )
  opt_state = tx.init(params)

  @eqx.filter_jit
  def step(model, opt_state):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    grad_fn = lambda p: eqx.filter_grad(_loss)(eqx.combine(p, static), x, y)
    updates, opt_state = tx.update(None, opt_state, params, grad_fn=grad_fn)
    return eqx.apply_updates(model, updates), opt_state, updates

  model = original
  for _ in range(3):
    model, opt_state, updates = step(model, opt_state)
    assert jax.tree.structure(updates) == jax.tree.structure(params)

  assert jax.tree.structure(model) == jax.tree.structure(original)
  assert model.mlp.activation is original.mlp.activation
  assert model.mlp.final_activation is original.mlp.final_activation
  assert model.scale == 2.0 and isinstance(model.scale, float)
  assert model.name == "net"
  assert model.count.dtype == jnp.int32 and int(model.count) == 3
  assert eqx.tree_equal(
    eqx.filter(model, eqx.is_inexact_array, inverse=True),
    eqx.filter(original, eqx.is_inexact_array, inverse=True),
  )
  for new, old in zip(
    jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)),
    jax.tree.leaves(params),
    strict=True,
  ):
    assert new.shape == old.shape and new.dtype == old.dtype
    assert not np.array_equal(new, old)


def test_jitted_training_reduces_the_loss_and_logs_the_smoothed_loss():
  model = _mlp()
  x, y = _data()
  tx = nso_jax.nso(optax.adamw(1e-2), sigma=0.01, num_perturbations=2, key=0)
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

  @eqx.filter_jit
  def step(model, opt_state):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    grad_fn = lambda p: eqx.filter_value_and_grad(_loss)(eqx.combine(p, static), x, y)
    updates, opt_state = tx.update(None, opt_state, params, grad_fn=grad_fn)
    return eqx.apply_updates(model, updates), opt_state

  losses = [_loss(model, x, y)]
  for _ in range(30):
    model, opt_state = step(model, opt_state)
    # The mean loss at the perturbed weights, before the step: close to the
    # clean loss at sigma = 0.01.
    np.testing.assert_allclose(opt_state[0].value, losses[-1], rtol=0.05)
    losses.append(_loss(model, x, y))
  assert losses[-1] < 0.7 * losses[0]


def test_the_whole_model_as_params_raises():
  model = _mlp()
  x, y = _data()
  grad_fn = lambda m: eqx.filter_grad(_loss)(m, x, y)
  tx = nso_jax.nso(optax.sgd(0.1), sigma=0.01, key=0)
  # Its activation functions are leaves that noise cannot perturb.
  with pytest.raises(TypeError, match=r"not an array; .*eqx.filter\(model"):
    tx.update(None, tx.init(model), model, grad_fn=grad_fn)
  with pytest.raises(TypeError):
    nso_jax.noise_stability_gradient(grad_fn, model, 0, sigma=0.01)
  with pytest.raises(TypeError):
    hessian.trace(lambda m, b: _loss(m, *b), model, (x, y), 0, num_matvecs=2)


def test_integer_arrays_in_the_params_raise_naming_the_leaf():
  model = _Scaled(_mlp(), jnp.array(0, jnp.int32), 1.0, "net")
  x, y = _data()
  params, static = eqx.partition(model, eqx.is_array)  # keeps `count`
  grad_fn = lambda p: eqx.filter_grad(_loss)(eqx.combine(p, static), x, y)
  with pytest.raises(TypeError, match=r"leaf \.count has dtype int32"):
    nso_jax.noise_stability_gradient(grad_fn, params, 0, sigma=0.01)
  loss_fn = lambda p, b: _loss(eqx.combine(p, static), *b)
  with pytest.raises(TypeError, match=r"leaf \.count has dtype int32"):
    hessian.trace(loss_fn, params, (x, y), 0, num_matvecs=2)


def test_docs_page_runs():
  """The examples of docs/equinox.md, run as doctests."""
  result = doctest.testfile(
    str(DOCS_PAGE),
    module_relative=False,
    optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
  )
  assert result.attempted > 0
  assert result.failed == 0, "an example of docs/equinox.md failed: see stdout"
