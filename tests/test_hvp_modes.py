"""Hessian-vector products on losses without forward-mode rules.

A ``jax.custom_vjp`` softplus inside a small MLP and a ``jax.custom_vjp``
cross-entropy cannot be differentiated by ``jax.jvp``; ``mode="auto"`` falls
back to reverse over reverse. References: the dense Hessian of a twin model
written with ordinary operations (``jax.hessian`` + ``eigh``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from nso_jax import hessian

try:  # the tests directory is a plain folder or, in some layouts, a package
  import hessian_testing as ht
except ImportError:
  from tests import hessian_testing as ht

SIZES = (3, 6, 3)  # 45 parameters
NUM_EXAMPLES = 16


@jax.custom_vjp
def custom_softplus(x):
  return jnp.logaddexp(x, 0.0)


def _softplus_fwd(x):
  return custom_softplus(x), x


def _softplus_bwd(x, g):
  return (g * jax.nn.sigmoid(x),)


custom_softplus.defvjp(_softplus_fwd, _softplus_bwd)


@jax.custom_vjp
def custom_cross_entropy(logits, onehot):
  return -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)


def _ce_fwd(logits, onehot):
  return custom_cross_entropy(logits, onehot), (jax.nn.softmax(logits), onehot)


def _ce_bwd(residuals, g):
  probs, onehot = residuals
  return g[..., None] * (probs - onehot), jnp.zeros_like(onehot)


custom_cross_entropy.defvjp(_ce_fwd, _ce_bwd)


def model(params, batch, activation=custom_softplus):
  hidden = activation(batch["x"] @ params["Dense_0"]["w"] + params["Dense_0"]["b"])
  return hidden @ params["Dense_1"]["w"] + params["Dense_1"]["b"]


def plain_model(params, batch):
  return model(params, batch, jax.nn.softplus)


def custom_per_example(outputs, batch):
  return custom_cross_entropy(outputs, batch["y"])


def plain_per_example(outputs, batch):
  return -jnp.sum(batch["y"] * jax.nn.log_softmax(outputs), axis=-1)


def custom_loss(params, batch):
  return jnp.mean(custom_per_example(model(params, batch), batch))


def plain_loss(params, batch):
  return jnp.mean(plain_per_example(plain_model(params, batch), batch))


def flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0], np.float64)


@pytest.fixture(scope="module")
def setup():
  raw = ht.init_mlp(jax.random.key(5), SIZES)
  params = {"Dense_0": raw["layer0"], "Dense_1": raw["layer1"]}
  x_key, y_key = jax.random.split(jax.random.key(6))
  x = jax.random.normal(x_key, (NUM_EXAMPLES, SIZES[0]))
  labels = jax.random.randint(y_key, (NUM_EXAMPLES,), 0, SIZES[-1])
  batch = {"x": x, "y": jax.nn.one_hot(labels, SIZES[-1])}
  matrix = ht.dense_hessian(plain_loss, params, batch)
  flat_params, unravel = ravel_pytree(params)
  v = unravel(jax.random.normal(jax.random.key(7), flat_params.shape))
  return params, batch, matrix, v


def test_forward_mode_cannot_differentiate_the_custom_loss(setup):
  params, batch, _, v = setup
  with pytest.raises(TypeError, match="custom_vjp"):
    hessian.hvp(custom_loss, params, batch, v, mode="forward")


def test_auto_hvp_of_a_custom_vjp_loss_equals_the_dense_hessian(setup):
  params, batch, matrix, v = setup
  product = jax.jit(hessian.hvp, static_argnums=0)(custom_loss, params, batch, v)
  np.testing.assert_allclose(flat(product), matrix @ flat(v), rtol=1e-5, atol=1e-6)
  # The custom loss's own dense Hessian, reverse over reverse.
  flat_params, unravel = ravel_pytree(params)
  own = jax.jacrev(jax.jacrev(lambda f: custom_loss(unravel(f), batch)))(flat_params)
  np.testing.assert_allclose(flat(product), own @ flat(v), rtol=1e-5, atol=1e-6)


def test_the_two_modes_agree_on_an_ordinary_loss():
  problem = ht.tiny_problem()
  flat_params, unravel = ravel_pytree(problem.params)
  v = unravel(jax.random.normal(jax.random.key(8), flat_params.shape))

  @jax.jit
  def products(params, batch, v):
    return [
      hessian.hvp(ht.loss_fn, params, batch, v, mode=mode)
      for mode in ("auto", "forward", "reverse")
    ]

  auto, forward, reverse = products(problem.params, problem.batch, v)
  assert (flat(auto) == flat(forward)).all()  # "auto" keeps forward mode, bitwise
  np.testing.assert_allclose(flat(reverse), flat(forward), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    flat(forward), problem.hessian @ flat(v), rtol=1e-4, atol=1e-5
  )


def test_trace_and_eigenvalues_of_a_custom_vjp_loss(setup):
  params, batch, matrix, _ = setup
  dim = matrix.shape[0]
  eigenvalues = np.linalg.eigvalsh(matrix)

  @jax.jit
  def measures(params, batch):
    # XTrace with 2 * dim products spans the whole space: the exact trace.
    exact = hessian.trace(
      custom_loss, params, batch, 0, num_matvecs=2 * dim, method="xtrace"
    )
    sampled = hessian.trace(custom_loss, params, batch, 1, num_matvecs=64)
    top = hessian.top_eigenvalues(
      custom_loss, params, batch, 2, num_eigenvalues=3, num_steps=dim
    )
    return exact, sampled, top

  exact, sampled, top = measures(params, batch)
  np.testing.assert_allclose(float(exact.value), np.trace(matrix), rtol=1e-5)
  assert abs(float(sampled.value) - np.trace(matrix)) < 4 * float(sampled.stderr)
  np.testing.assert_allclose(np.asarray(top), eigenvalues[::-1][:3], rtol=1e-5)


def test_paper_measures_of_a_custom_vjp_loss(setup):
  params, batch, matrix, v = setup
  reference = jax.tree.map(jnp.subtract, params, v)  # params - reference = v
  curvature = hessian.direction_curvature(custom_loss, params, batch, v)
  per_module = hessian.layer_hessian_measure(
    custom_loss, params, batch, reference, group_by=1
  )
  vector = flat(v)
  np.testing.assert_allclose(float(curvature), vector @ matrix @ vector, rtol=1e-5)
  split = ravel_pytree(params["Dense_0"])[0].size
  first, second = vector[:split], vector[split:]
  np.testing.assert_allclose(
    float(per_module["Dense_0"]), first @ matrix[:split, :split] @ first, rtol=1e-5
  )
  np.testing.assert_allclose(
    float(per_module["Dense_1"]),
    second @ matrix[split:, split:] @ second,
    rtol=1e-5,
    atol=1e-7,
  )


def dense_ggn(params, batch) -> np.ndarray:
  """J^T H_out J / n of the plain twin, from dense Jacobians."""
  flat_params, unravel = ravel_pytree(params)
  jacobian = jax.jacrev(lambda f: plain_model(unravel(f), batch))(flat_params)
  probs = jax.nn.softmax(plain_model(params, batch))
  out_hessian = jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p))(probs)
  ggn = jnp.einsum("nkd,nkl,nle->de", jacobian, out_hessian, jacobian)
  return np.asarray(ggn, np.float64) / NUM_EXAMPLES


def test_ggn_of_a_custom_vjp_model_and_loss(setup):
  params, batch, _, v = setup
  expected = dense_ggn(params, batch) @ flat(v)

  @jax.jit
  def products(params, batch, v):
    return [
      hessian.ggn_operator(model, custom_per_example, params, batch, mode=mode).matvec(
        v
      )
      for mode in ("auto", "reverse")
    ] + [
      hessian.ggn_operator(
        plain_model, plain_per_example, params, batch, mode=mode
      ).matvec(v)
      for mode in ("forward", "reverse")
    ]

  custom_auto, custom_reverse, forward, reverse = products(params, batch, v)
  for product in (custom_auto, custom_reverse, forward, reverse):
    np.testing.assert_allclose(flat(product), expected, rtol=1e-5, atol=1e-6)


def test_a_bad_mode_is_refused(setup):
  params, batch, _, v = setup
  with pytest.raises(ValueError, match="`mode`"):
    hessian.hvp(custom_loss, params, batch, v, mode="backward")
  with pytest.raises(ValueError, match="`mode`"):
    hessian.hessian_operator(custom_loss, params, batch, mode="fwd")
  with pytest.raises(ValueError, match="`mode`"):
    hessian.ggn_operator(model, custom_per_example, params, batch, mode=None)
