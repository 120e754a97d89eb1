"""Benchmark models in plain JAX: an MLP, a small CNN and a transformer block.

Each ``make_*`` returns ``(params, loss_fn, batch)`` with
``loss_fn(params, batch) -> scalar`` (mean cross-entropy), so every benchmark
drives the same three problems. Sizes come from :data:`SIZES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]
Batch = tuple[jax.Array, jax.Array]
LossFn = Callable[[Params, Batch], jax.Array]

# Settings per suite size. "small" runs on a 2-core CPU within the suite's
# 10-minute budget; "full" is meant for a GPU.
SIZES: dict[str, dict[str, dict[str, int]]] = {
  "small": {
    "mlp": {"batch": 128, "inputs": 64, "hidden": 512, "depth": 2, "classes": 10},
    "cnn": {"batch": 32, "side": 16, "channels": 3, "width": 16, "classes": 10},
    "transformer": {"batch": 8, "seq": 32, "dim": 64, "heads": 4, "classes": 10},
  },
  "full": {
    "mlp": {"batch": 512, "inputs": 784, "hidden": 1024, "depth": 3, "classes": 10},
    "cnn": {"batch": 128, "side": 32, "channels": 3, "width": 32, "classes": 10},
    "transformer": {"batch": 32, "seq": 128, "dim": 256, "heads": 8, "classes": 10},
  },
}


def _dense_init(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
  w = jax.random.normal(key, (fan_in, fan_out)) / math.sqrt(fan_in)
  return {"w": w, "b": jnp.zeros(fan_out)}


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def _labels(key: jax.Array, batch: int, classes: int) -> jax.Array:
  return jax.random.randint(key, (batch,), 0, classes)


def make_mlp(
  batch: int, inputs: int, hidden: int, depth: int, classes: int, seed: int = 0
) -> tuple[Params, LossFn, Batch]:
  """A ``depth``-hidden-layer ReLU MLP on Gaussian inputs."""
  keys = jax.random.split(jax.random.key(seed), depth + 3)
  widths = [inputs] + [hidden] * depth + [classes]
  params = {
    f"dense{i}": _dense_init(keys[i], widths[i], widths[i + 1])
    for i in range(depth + 1)
  }
  x = jax.random.normal(keys[-2], (batch, inputs))
  y = _labels(keys[-1], batch, classes)

  def loss_fn(params: Params, batch: Batch) -> jax.Array:
    h, labels = batch
    for i in range(depth + 1):
      layer = params[f"dense{i}"]
      h = h @ layer["w"] + layer["b"]
      if i < depth:
        h = jax.nn.relu(h)
    return _cross_entropy(h, labels)

  return params, loss_fn, (x, y)


def _conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def make_cnn(
  batch: int, side: int, channels: int, width: int, classes: int, seed: int = 0
) -> tuple[Params, LossFn, Batch]:
  """Three 3x3 convolutions (the last two with stride 2), global pooling, dense."""
  keys = jax.random.split(jax.random.key(seed), 6)
  chans = [channels, width, 2 * width, 4 * width]
  params: Params = {}
  for i in range(3):
    fan_in = 9 * chans[i]
    params[f"conv{i}"] = {
      "w": jax.random.normal(keys[i], (3, 3, chans[i], chans[i + 1]))
      / math.sqrt(fan_in),
      "b": jnp.zeros(chans[i + 1]),
    }
  params["head"] = _dense_init(keys[3], chans[-1], classes)
  x = jax.random.normal(keys[4], (batch, side, side, channels))
  y = _labels(keys[5], batch, classes)

  def loss_fn(params: Params, batch: Batch) -> jax.Array:
    h, labels = batch
    for i, stride in enumerate((1, 2, 2)):
      layer = params[f"conv{i}"]
      h = jax.nn.relu(_conv(h, layer["w"], stride) + layer["b"])
    h = jnp.mean(h, axis=(1, 2))
    logits = h @ params["head"]["w"] + params["head"]["b"]
    return _cross_entropy(logits, labels)

  return params, loss_fn, (x, y)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias


def make_transformer(
  batch: int, seq: int, dim: int, heads: int, classes: int, seed: int = 0
) -> tuple[Params, LossFn, Batch]:
  """One pre-norm transformer block (self-attention + 4x MLP), mean-pooled head."""
  keys = jax.random.split(jax.random.key(seed), 8)
  params: Params = {
    "ln1": {"scale": jnp.ones(dim), "bias": jnp.zeros(dim)},
    "qkv": _dense_init(keys[0], dim, 3 * dim),
    "proj": _dense_init(keys[1], dim, dim),
    "ln2": {"scale": jnp.ones(dim), "bias": jnp.zeros(dim)},
    "fc1": _dense_init(keys[2], dim, 4 * dim),
    "fc2": _dense_init(keys[3], 4 * dim, dim),
    "head": _dense_init(keys[4], dim, classes),
  }
  x = jax.random.normal(keys[5], (batch, seq, dim))
  y = _labels(keys[6], batch, classes)
  head_dim = dim // heads

  def loss_fn(params: Params, batch: Batch) -> jax.Array:
    h, labels = batch
    b, t, _ = h.shape
    a = _layer_norm(h, **params["ln1"])
    qkv = a @ params["qkv"]["w"] + params["qkv"]["b"]
    q, k, v = jnp.split(qkv.reshape(b, t, 3, heads, head_dim), 3, axis=2)
    q, k, v = (z[:, :, 0] for z in (q, k, v))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    att = jax.nn.softmax(att, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, dim)
    h = h + out @ params["proj"]["w"] + params["proj"]["b"]
    a = _layer_norm(h, **params["ln2"])
    a = jax.nn.gelu(a @ params["fc1"]["w"] + params["fc1"]["b"])
    h = h + a @ params["fc2"]["w"] + params["fc2"]["b"]
    logits = jnp.mean(h, axis=1) @ params["head"]["w"] + params["head"]["b"]
    return _cross_entropy(logits, labels)

  return params, loss_fn, (x, y)


MAKERS = {"mlp": make_mlp, "cnn": make_cnn, "transformer": make_transformer}


def make_model(name: str, size: str) -> tuple[Params, LossFn, Batch, dict[str, int]]:
  """Builds model ``name`` at suite size ``size``; returns its settings too."""
  settings = SIZES[size][name]
  params, loss_fn, batch = MAKERS[name](**settings)
  return params, loss_fn, batch, settings


def make_digits_cnn(batch: int = 512, seed: int = 0) -> tuple[Params, LossFn, Batch]:
  """A 37,754-parameter CNN on scikit-learn's 8x8 digits (the first ``batch``).

  conv 3x3 1->16 (160 parameters), ReLU; conv 3x3 16->32 (4,640), ReLU; both
  ``SAME`` with stride 1, so the 8x8 map is kept; flatten (2,048); dense
  2048->16 (32,784), ReLU; dense 16->10 (170); mean cross-entropy. Pixels are
  scaled to [0, 1]. Needs scikit-learn (its digits ship with the package).
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = jnp.asarray(digits.images[:batch, :, :, None] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[:batch], jnp.int32)
  keys = jax.random.split(jax.random.key(seed), 4)
  params: Params = {
    "conv0": {
      "w": jax.random.normal(keys[0], (3, 3, 1, 16)) / 3.0,
      "b": jnp.zeros(16),
    },
    "conv1": {
      "w": jax.random.normal(keys[1], (3, 3, 16, 32)) / 12.0,
      "b": jnp.zeros(32),
    },
    "dense0": _dense_init(keys[2], 8 * 8 * 32, 16),
    "dense1": _dense_init(keys[3], 16, 10),
  }

  def loss_fn(params: Params, batch: Batch) -> jax.Array:
    h, labels = batch
    for name in ("conv0", "conv1"):
      h = jax.nn.relu(_conv(h, params[name]["w"], 1) + params[name]["b"])
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["dense0"]["w"] + params["dense0"]["b"])
    logits = h @ params["dense1"]["w"] + params["dense1"]["b"]
    return _cross_entropy(logits, labels)

  return params, loss_fn, (x, y)
