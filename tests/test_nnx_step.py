"""The NNX train step against a hand-written NNX step, and nnx_grad_fn's options."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import nso_jax
from nso_jax import training


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.dense = nnx.Linear(5, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.dropout(nnx.relu(self.norm(self.dense(x)))))


def _data():
  x = jax.random.normal(jax.random.key(0), (32, 5))
  return x, jnp.argmax(x[:, :3], axis=1)


def _loss(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _scaled_loss(model, x, y, *, scale=1.0):
  return scale * _loss(model, x, y)


def _arrays(tree):
  """The arrays of an NNX state, PRNG keys as their key data."""

  def data(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(a)
    return a

  return jax.tree.map(data, nnx.as_pure(tree))


def _setup():
  model = Net(nnx.Rngs(0, dropout=1))
  tx = nso_jax.nso(optax.adam(1e-2), sigma=0.1, num_perturbations=2, key=5)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def _hand_written_step(model, optimizer, x, y):
  """What nnx_train_step replaces, written with NNX alone."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)  # the state before the clean pass

  def grad_fn(params):
    return jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest, copy=True), x, y))(
      params
    )

  loss, grads = nnx.value_and_grad(_loss)(model, x, y)
  optimizer.update(model, grads, grad_fn=grad_fn)
  return loss


@pytest.mark.parametrize("clean_gradient", [True, False])
def test_nnx_train_step_equals_a_hand_written_step(clean_gradient):
  x, y = _data()
  model_a, optimizer_a = _setup()
  model_b, optimizer_b = _setup()

  @nnx.jit
  def step(model, optimizer, x, y):
    return training.nnx_train_step(
      model, optimizer, _loss, x, y, clean_gradient=clean_gradient
    )

  for _ in range(3):
    metrics = step(model_a, optimizer_a, x, y)
    loss = _hand_written_step(model_b, optimizer_b, x, y)
    chex.assert_trees_all_equal(metrics, {"loss": loss})
  # Parameters, BatchNorm statistics, dropout RNG state, optimizer state: the
  # same program, so bit for bit.
  chex.assert_trees_all_equal(_arrays(nnx.state(model_a)), _arrays(nnx.state(model_b)))
  chex.assert_trees_all_equal(
    _arrays(nnx.state(optimizer_a)), _arrays(nnx.state(optimizer_b))
  )


def test_nnx_train_step_reports_aux_and_passes_loss_keywords():
  x, y = _data()
  model, optimizer = _setup()

  def loss_fn(model, x, y, *, scale):
    logits = model(x)
    loss = scale * optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

  metrics = nnx.jit(
    lambda m, o: training.nnx_train_step(
      m, o, loss_fn, x, y, loss_kwargs={"scale": 2.0}, has_aux=True
    )
  )(model, optimizer)
  assert sorted(metrics) == ["accuracy", "loss"]
  assert int(optimizer.step[...]) == 1


def test_nnx_options_are_checked_not_forwarded():
  x, y = _data()
  model, optimizer = _setup()
  training.nnx_grad_fn(model, _scaled_loss, x, y, loss_kwargs={"scale": 2.0})
  with pytest.raises(TypeError, match="unexpected keyword argument 'scael'"):
    training.nnx_grad_fn(model, _scaled_loss, x, y, loss_kwargs={"scael": 2.0})
  with pytest.raises(TypeError, match="unexpected keyword argument"):
    training.nnx_grad_fn(model, _scaled_loss, x, y, scale=2.0)
  with pytest.raises(TypeError, match="`loss_kwargs` must be a dict"):
    training.nnx_grad_fn(model, _loss, x, y, loss_kwargs=[2.0])
  with pytest.raises(TypeError, match="`optimizer` must be an nnx"):
    training.nnx_train_step(model, optax.sgd(0.1), _loss, x, y)
  with pytest.raises(TypeError, match="pass has_aux=True"):
    training.nnx_grad_fn(model, lambda m: (_loss(m, x, y), {}))(
      nnx.as_pure(nnx.state(model, nnx.Param))
    )
  with pytest.raises(ValueError, match="has_aux"):
    training.nnx_train_step(model, optimizer, _loss, x, y, has_aux="yes")


def test_nnx_grad_fn_returns_the_loss_and_nso_keeps_it():
  x, y = _data()
  model, optimizer = _setup()
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  value, grads = training.nnx_grad_fn(model, _loss, x, y, return_value=True)(params)
  chex.assert_trees_all_equal(
    grads, training.nnx_grad_fn(model, _loss, x, y, return_value=False)(params)
  )
  assert value.shape == ()

  @nnx.jit
  def step(model, optimizer):
    grad_fn = training.nnx_grad_fn(model, _loss, x, y, return_value=True)
    optimizer.update(model, nnx.grad(_loss)(model, x, y), grad_fn=grad_fn)

  step(model, optimizer)
  assert float(optimizer.opt_state[0].value[...]) > 0.0


@pytest.mark.parametrize("opaque_mode", [False, True])
def test_nnx_train_step_runs_optax_sam(opaque_mode):
  x, y = _data()
  targets = jax.nn.one_hot(y, 3)
  model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(0.05))
  tx = optax.contrib.sam(optax.sgd(0.1), adversary, opaque_mode=opaque_mode)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  loss_fn = lambda m: jnp.mean((m(x) - targets) ** 2)
  # By hand, as optax documents SAM: opaque mode calls grad_fn(params, i).
  graphdef, params = nnx.split(model)
  params = nnx.as_pure(params)
  pure_loss = lambda p: loss_fn(nnx.merge(graphdef, p))
  opt_state = tx.init(params)
  step = nnx.jit(lambda m, o: training.nnx_train_step(m, o, loss_fn))
  for _ in range(4):
    step(model, optimizer)
    grad_fn = lambda p, _: jax.grad(pure_loss)(p)
    updates, opt_state = tx.update(
      jax.grad(pure_loss)(params), opt_state, params, grad_fn=grad_fn
    )
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(
    nnx.as_pure(nnx.state(model, nnx.Param)), params, rtol=1e-6, atol=1e-7
  )
