"""Shared helpers: machine description, side-by-side timing, JSON results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
  """Describes the device, software versions and current machine load."""
  device = jax.devices()[0]
  info: dict[str, Any] = {
    "backend": jax.default_backend(),
    "device": str(device),
    "device_kind": getattr(device, "device_kind", "unknown"),
    "num_devices": jax.device_count(),
    "jax_version": jax.__version__,
    "jaxlib_version": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
    "python": sys.version.split()[0],
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "loadavg_start": list(os.getloadavg()),
  }
  return info


def _jaxlib_version() -> str:
  try:
    import jaxlib

    return jaxlib.__version__
  except Exception:  # pragma: no cover - informative only
    return "unknown"


def block(tree: Any) -> Any:
  """Blocks until every array of ``tree`` is computed."""
  return jax.block_until_ready(tree)


def compile_timed(fn: Callable, *args: Any) -> tuple[Callable, float]:
  """Returns ``jax.jit(fn)`` compiled for ``args`` and the compile seconds.

  The seconds cover tracing, lowering and XLA compilation, so steady-state
  timings of the returned executable exclude them.
  """
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_side_by_side(
  candidates: dict[str, Callable[[], Any]],
  *,
  repeats: int,
  warmup: int = 2,
  inner: int = 1,
  seed: int = 0,
) -> dict[str, dict[str, Any]]:
  """Times zero-argument callables interleaved, in a shuffled order per round.

  Each round runs every candidate ``inner`` times (blocking on each result)
  and records the mean per call; rounds interleave the candidates so that a
  change of machine load affects all of them alike and their ratios hold.

  Args:
    candidates: name -> callable returning JAX arrays.
    repeats: rounds; the median over rounds is reported.
    warmup: untimed rounds first.
    inner: calls per candidate per round.
    seed: the shuffling seed.

  Returns:
    name -> ``{"median_s", "min_s", "iqr_s", "samples_s"}``.
  """
  names = list(candidates)
  rng = random.Random(seed)
  for _ in range(warmup):
    for name in names:
      block(candidates[name]())
  samples: dict[str, list[float]] = {name: [] for name in names}
  for _ in range(repeats):
    rng.shuffle(names)
    for name in names:
      fn = candidates[name]
      start = time.perf_counter()
      for _ in range(inner):
        block(fn())
      samples[name].append((time.perf_counter() - start) / inner)
  return {name: summarize(values) for name, values in samples.items()}


def summarize(values: Sequence[float]) -> dict[str, Any]:
  """Median, minimum, interquartile range and the raw samples (seconds)."""
  q1, q3 = np.percentile(values, [25, 75])
  return {
    "median_s": statistics.median(values),
    "min_s": min(values),
    "iqr_s": float(q3 - q1),
    "repeats": len(values),
    "samples_s": [float(v) for v in values],
  }


def peak_rss_bytes() -> int:
  """Peak resident set size of this process (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory_stats() -> dict[str, Any] | None:
  """``memory_stats()`` of the first device (GPU/TPU); ``None`` on CPU."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  return dict(stats) if stats else None


def memory_analysis(compiled: Any) -> dict[str, int] | None:
  """Argument, output, temporary and generated-code bytes of an executable."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:
    return None
  if analysis is None:
    return None
  fields = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
  )
  return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


def num_params(tree: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def write_result(
  name: str, payload: dict[str, Any], out_dir: Path | None = None
) -> Path:
  """Writes ``payload`` (plus the end load average) as ``results/<name>.json``."""
  out_dir = out_dir or RESULTS_DIR
  out_dir.mkdir(parents=True, exist_ok=True)
  payload = dict(payload)
  payload.setdefault("machine", machine_info())
  payload["machine"]["loadavg_end"] = list(os.getloadavg())
  path = out_dir / f"{name}.json"
  path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
  return path


def backend_tag() -> str:
  """``"cpu"``, ``"gpu"`` or ``"tpu"``: a file-name suffix for results."""
  return jax.default_backend()


@contextlib.contextmanager
def model_panels(
  payload: dict[str, Any], path: Path, title: str
) -> Iterator[list[tuple[Any, str]]]:
  """One matplotlib panel per model of ``payload``, saved to ``path`` on exit.

  Yields ``(axes, model_name)`` pairs to draw on; the last panel gets the
  legend and the figure the ``title``.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(payload["models"])
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
  yield list(zip(axes[0], names, strict=True))
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
