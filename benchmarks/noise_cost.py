"""Cost of drawing the NSO noise, per distribution, against a matmul.

Measured side by side in one process:

* one flat float32 vector of ``--size`` elements per sampler
  (``jax.random.normal``, raw ``jax.random.bits``, and ``nso_jax.sample_noise``
  for every noise name, ``normal_fast`` included);
* the MLP benchmark model's parameter tree, leaf by leaf (what the library
  does; and ``jax.random.normal`` leaf by leaf) against one draw for the
  concatenated size split into leaves;
* a 128x512x512 float32 matmul as a yardstick.

Run: ``python -m benchmarks.noise_cost``.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import nso_jax
from benchmarks import _common
from benchmarks import models


def _one_call_sampler(noise: str, params: Any):
  """One draw for the whole tree, split into leaves (the alternative design)."""
  leaves, treedef = jax.tree.flatten(params)
  sizes = [int(np.size(x)) for x in leaves]
  offsets = np.cumsum([0, *sizes])

  def sample(key):
    flat = nso_jax.sample_noise(key, jnp.zeros(offsets[-1]), noise)
    parts = [
      flat[offsets[i] : offsets[i + 1]].reshape(jnp.shape(leaf))
      for i, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, parts)

  return sample


def _per_leaf_jax_normal(key: jax.Array, params: Any) -> Any:
  """``jax.random.normal`` leaf by leaf, keys split as ``sample_noise`` does."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  )


def run(num_elements: int, repeats: int, size: str) -> dict[str, Any]:
  """Times every sampler; returns the JSON payload."""
  key = jax.random.key(0)
  flat = jnp.zeros(num_elements)
  params, _, _, settings = models.make_model("mlp", size)
  samplers: dict[str, Any] = {
    "flat/jax.random.normal": lambda k: jax.random.normal(k, (num_elements,)),
    "flat/jax.random.bits": lambda k: jax.random.bits(k, (num_elements,), jnp.uint32),
  }
  for name in nso_jax.NOISE_NAMES:
    samplers[f"flat/{name}"] = lambda k, name=name: nso_jax.sample_noise(k, flat, name)
  samplers["mlp_tree_per_leaf/jax.random.normal"] = lambda k: _per_leaf_jax_normal(
    k, params
  )
  for name in ("normal", "normal_fast"):
    samplers[f"mlp_tree_per_leaf/{name}"] = lambda k, name=name: nso_jax.sample_noise(
      k, params, name
    )
    samplers[f"mlp_tree_one_call/{name}"] = _one_call_sampler(name, params)

  candidates: dict[str, Any] = {}
  compile_s: dict[str, float] = {}
  for name, fn in samplers.items():
    compiled, compile_s[name] = _common.compile_timed(fn, key)
    candidates[name] = lambda c=compiled: c(key)
  x, w = jnp.ones((128, 512)), jnp.ones((512, 512))
  compiled, compile_s["matmul_128x512x512"] = _common.compile_timed(jnp.matmul, x, w)
  candidates["matmul_128x512x512"] = lambda c=compiled: c(x, w)

  stats = _common.time_side_by_side(candidates, repeats=repeats, inner=5)
  normal = stats["flat/normal"]["median_s"]
  ratios = {
    name: s["median_s"] / normal for name, s in stats.items() if name != "flat/normal"
  }
  for name, s in sorted(stats.items()):
    print(f"{name:40s} {s['median_s'] * 1e3:8.3f} ms", flush=True)
  return {
    "benchmark": "noise_cost",
    "machine": _common.machine_info(),
    "num_elements": num_elements,
    "dtype": "float32",
    "mlp_settings": settings,
    "mlp_num_params": _common.num_params(params),
    "mlp_leaf_shapes": [list(np.shape(x)) for x in jax.tree.leaves(params)],
    "compile_s": compile_s,
    "steady": stats,
    "ratio_to_flat_normal": ratios,
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("small", "full"), default="small")
  parser.add_argument("--num-elements", type=int, default=300_000)
  parser.add_argument("--repeats", type=int, default=40)
  args = parser.parse_args(argv)
  payload = run(args.num_elements, args.repeats, args.size)
  path = _common.write_result(f"noise_cost_{_common.backend_tag()}", payload)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
