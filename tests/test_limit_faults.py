"""Limits and rules once reported broken: memory of a batch, non-float leaves,
counts beyond int32, and the signatures of the functions passed in."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nso_jax
from nso_jax import batching
from nso_jax import hessian
from nso_jax import training
from nso_jax._src import batching as batching_src

# 4096 floats: 16 KiB per evaluation, so 2**30 of them (16 TiB) exceed any
# memory; nothing is computed, the count is refused first.
WIDE = jnp.ones(4096)
HUGE = 2**30


def quadratic(w, x):
  return 0.5 * jnp.mean(jnp.sum(x * w**2, axis=-1))


@pytest.mark.fault("clear")
def test_a_vmap_of_draws_beyond_memory_is_refused_naming_the_count():
  with pytest.raises(ValueError, match=r"`num_draws`.*Execution\('map', chunk_size="):
    hessian.noise_stability_measure(
      quadratic,
      WIDE,
      jnp.ones((1, 4096)),
      key=0,
      sigma=0.1,
      num_draws=HUGE,
      execution="vmap",
    )


@pytest.mark.fault("clear")
def test_a_vmap_of_pairs_beyond_memory_is_refused_naming_the_count():
  with pytest.raises(ValueError, match=r"`num_perturbations`.*TiB"):
    nso_jax.noise_stability_gradient(
      lambda p: 2 * p, WIDE, 0, sigma=0.1, num_perturbations=HUGE, execution="vmap"
    )


@pytest.mark.fault("correct")
def test_auto_runs_chunks_that_fit_where_a_vmap_would_not(monkeypatch):
  # An accelerator's choice for 12 evaluations, a vmap, with memory for 5.
  fn = lambda i: jnp.arange(4.0) * i  # 16 bytes per evaluation
  monkeypatch.setattr(batching_src, "default_execution", lambda **_: "vmap")
  monkeypatch.setattr(batching_src, "memory_bound", lambda backend=None: 80)
  resolved = batching_src.resolve("auto", 12, fn)
  assert (resolved.strategy, resolved.chunk_size) == ("map", 5)
  np.testing.assert_array_equal(
    batching.map_indices(fn, 12), batching.map_indices(fn, 12, execution="unroll")
  )
  with pytest.raises(ValueError, match="`size`"):
    batching_src.resolve("vmap", 12, fn)


PARAMS = {"w": jnp.linspace(0.5, 2.0, 4), "step": jnp.int32(3)}


def counted_loss(params, x):
  return jnp.mean((x @ params["w"]) ** 2) + 0.0 * params["step"]


X = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
ONLY_W = {"w": True, "step": False}


def cosine_loss(params, x):
  return jnp.mean(jnp.cos(x @ params["w"])) + 0.0 * params["step"]


@pytest.mark.fault("correct")
def test_nso_accepts_an_integer_leaf_that_param_filter_excludes():
  tx = nso_jax.nso(optax.sgd(0.1), sigma=0.1, key=0, param_filter=ONLY_W)

  def w_grad(p):  # the gradient of an integer leaf: zeros of its dtype
    grad = jax.grad(lambda w: cosine_loss({"w": w, "step": p["step"]}, X))(p["w"])
    return {"w": grad, "step": p["step"] * 0}

  @jax.jit
  def run(params, float_params):
    grad_fn = lambda p: jax.grad(cosine_loss, allow_int=True)(p, X)
    options = dict(sigma=0.1, num_perturbations=2, param_filter=ONLY_W)
    got = nso_jax.noise_stability_gradient(grad_fn, params, 0, **options)
    as_float = nso_jax.noise_stability_gradient(w_grad, float_params, 0, **options)
    updates, _ = tx.update(w_grad(params), tx.init(params), params, grad_fn=w_grad)
    return got, as_float, optax.apply_updates(params, updates)

  got, as_float, stepped = run(PARAMS, {**PARAMS, "step": jnp.float32(3.0)})
  # The same noise on `w` as with a float leaf in its place: equal bit for bit.
  np.testing.assert_array_equal(got["w"], as_float["w"])
  assert got["step"].dtype == jax.dtypes.float0
  assert stepped["step"] == 3 and stepped["step"].dtype == jnp.int32


@pytest.mark.fault("clear")
def test_an_included_integer_leaf_gets_one_message_from_nso_and_the_hessian_tools():
  messages = []
  for call in (
    lambda: nso_jax.noise_stability_gradient(lambda p: p, PARAMS, 0, sigma=0.1),
    lambda: hessian.hessian_operator(counted_loss, PARAMS, X),
  ):
    with pytest.raises(TypeError, match=r"`params` leaf \['step'\] has dtype int32"):
      call()
    try:
      call()
    except TypeError as error:
      messages.append(str(error))
  assert messages[0] == messages[1]
  assert "`param_filter`" in messages[0]


@pytest.mark.fault("correct")
def test_trace_bound_term_takes_a_count_beyond_int32():
  batches = [jnp.array([[1.0, 1.0]]), jnp.array([[2.0, 6.0]])]
  bound = hessian.trace_bound_term(
    quadratic,
    jnp.ones(2),
    batches,
    jnp.zeros(2),
    key=0,
    num_examples=3 * 10**9,
    num_matvecs=2,
  )
  np.testing.assert_allclose(bound.value, np.sqrt(8.0 * 2.0 / 3e9), rtol=1e-5)


@pytest.mark.fault("clear")
def test_train_step_names_a_loss_fn_of_one_argument():
  model = nn.Dense(1)
  params = model.init(jax.random.key(0), X)["params"]
  state = training.TrainState.create(
    apply_fn=model.apply, params=params, tx=optax.sgd(0.1)
  )
  with pytest.raises(TypeError, match=r"`loss_fn`.*\(params, batch_stats\)"):
    training.train_step(state, lambda params: (jnp.float32(0.0), {}))


@pytest.mark.fault("clear")
def test_nnx_update_with_an_nnx_grad_names_nnx_grad_fn():
  model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
  loss_fn = lambda m: jnp.mean(m(X) ** 2)
  optimizer = nnx.Optimizer(
    model, nso_jax.nso(optax.sgd(0.1), sigma=0.01, key=0), wrt=nnx.Param
  )
  grads = nnx.grad(loss_fn)(model)
  with pytest.raises(TypeError, match=r"`grad_fn`.*nnx_grad_fn"):
    optimizer.update(model, grads, grad_fn=nnx.grad(loss_fn))


@pytest.mark.fault("clear")
def test_update_names_a_grad_fn_that_is_not_callable():
  tx = nso_jax.noise_stability(sigma=0.1, key=0)
  w = jnp.ones(4)
  with pytest.raises(TypeError, match="`grad_fn` must be a function"):
    tx.update(w, tx.init(w), w, grad_fn=5)
