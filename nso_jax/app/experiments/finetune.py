"""``finetune``: pretrain on digits 0-4, fine-tune on few examples of 5-9.

Per seed, an MLP is pretrained with SGD on the digits of classes 0-4; its
output layer is then replaced by a fresh one and the whole network is
fine-tuned on ``per_class`` training examples of each of the classes 5-9 by
each method, from the same start. The test set is every other example of
classes 5-9 (never seen in pretraining or fine-tuning). Besides accuracy and
the Hessian measures, each model gets the paper's per-layer
:math:`v_l^\\top H_l v_l` with :math:`v = W - W_{\\text{start}}` (the
pretrained layers and the fresh head).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from nso_jax.app import data as data_lib
from nso_jax.app import job
from nso_jax.app import report
from nso_jax.app.experiments import classify
from nso_jax.app.experiments import output
from nso_jax.app.experiments.settings import count
from nso_jax.app.experiments.settings import setting

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)

COLUMNS: list[output.Column] = [
  ("final_test_accuracy", "test acc. final (%)", output.fixed(2, 100)),
  ("best_test_accuracy", "test acc. best epoch (%)", output.fixed(2, 100)),
  ("final_train_loss", "train loss", output.fmt(3)),
  ("hessian_trace", "tr(H)", output.fmt(3)),
  ("trace_per_loss", "tr(H) / loss", output.fmt(3)),
  ("top_eigenvalue", "top eigenvalue", output.fmt(3)),
  ("noise_stability", "noise stability", output.fmt(3)),
  ("vHv", "v^T H v", output.fmt(3)),
  ("distance", "‖W-W0‖", output.fmt(3)),
]


@dataclasses.dataclass(frozen=True)
class Settings(classify.Settings):
  """Settings of ``finetune``."""

  optimizers: tuple[str, ...] = setting(
    classify.METHODS,
    "comma-separated methods",
    choices=classify.METHODS,
    unique=True,
  )
  epochs: int = count(100, "fine-tuning epochs (sgd-long: 2k times more)", 10_000)
  per_class: int = count(20, "fine-tuning training examples per class", 1_000)
  pretrain_epochs: int = count(20, "SGD pretraining epochs on digits 0-4", 10_000)
  label_noise: float = setting(
    0.0,
    "share of fine-tuning training labels flipped",
    valid=lambda v: 0 <= v < 1,
    expect="a float in [0, 1)",
  )
  output: str = setting(
    "nso_experiments/finetune", "output folder", flag="--out", valid=bool
  )


def _subset(x, y, classes):
  keep = np.isin(y, classes)
  return x[keep], np.searchsorted(np.asarray(classes), y[keep]).astype(np.int32)


def make_data(settings: Settings) -> tuple[data_lib.Dataset, data_lib.Dataset]:
  """The pretraining and fine-tuning data sets (data seed 0, fixed).

  Raises:
    SettingError: when ``per_class`` leaves no test example of a class.
  """
  digits = data_lib.load_digits(classify.TEST_FRACTION)
  x_pre, y_pre = _subset(digits.x_train, digits.y_train, PRETRAIN_CLASSES)
  x_pre_test, y_pre_test = _subset(digits.x_test, digits.y_test, PRETRAIN_CLASSES)
  pretrain = data_lib.Dataset(
    "digits 0-4", x_pre, y_pre, x_pre_test, y_pre_test, len(PRETRAIN_CLASSES)
  )
  x = np.concatenate([digits.x_train, digits.x_test])
  y = np.concatenate([digits.y_train, digits.y_test])
  x, y = _subset(x, y, FINETUNE_CLASSES)
  rng = np.random.default_rng(0)
  chosen: list[int] = []
  for label in range(len(FINETUNE_CLASSES)):
    members = np.flatnonzero(y == label)
    if settings.per_class >= len(members):
      raise data_lib.SettingError(
        "per_class",
        f"must leave test examples: class {FINETUNE_CLASSES[label]} has "
        f"{len(members)} examples.",
        value=settings.per_class,
      )
    chosen.extend(rng.choice(members, settings.per_class, replace=False))
  train = np.sort(np.asarray(chosen))
  test = np.setdiff1d(np.arange(len(y)), train)
  y_train = flip_labels(y[train], settings.label_noise, len(FINETUNE_CLASSES), rng)
  finetune = data_lib.Dataset(
    "digits 5-9", x[train], y_train, x[test], y[test], len(FINETUNE_CLASSES)
  )
  return pretrain, finetune


def flip_labels(
  labels: np.ndarray, share: float, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
  """``labels`` with ``round(share * n)`` of them changed to another class.

  The flipped examples are drawn without replacement and each gets a
  uniformly random class other than its own (symmetric label noise).
  """
  labels = labels.copy()
  flipped = rng.choice(len(labels), round(share * len(labels)), replace=False)
  shift = rng.integers(1, num_classes, size=len(flipped))
  labels[flipped] = (labels[flipped] + shift) % num_classes
  return labels


def starting_points(pretrained: dict[str, Any], config: job.Config, data):
  """``seed -> params``: seed's pretrained layers with a fresh output layer."""
  model = job.MLP(tuple(config.hidden), data.num_classes)
  head = classify.head_name(config)

  def init_params(seed: int) -> Any:
    params = dict(classify.seed_params(pretrained, seed))
    key = jax.random.fold_in(jax.random.key(seed), 7)
    params[head] = model.init(key, data.x_train[:1])["params"][head]
    return params

  return init_params


def run(settings: Settings, context: dict[str, Any]) -> dict[str, Any]:
  """Runs ``finetune`` and writes its outputs (see
  :func:`nso_jax.app.experiments.run`)."""
  pretrain_data, data = make_data(settings)
  config = classify.job_config(settings)
  pre_config = classify.job_config(settings, epochs=settings.pretrain_epochs)
  job.check_fits(config, data)
  job.check_fits(pre_config, pretrain_data)
  classify.check_methods(settings.optimizers, config)
  report.prepare_output(settings.output)
  context["printer"](
    f"pretrain: {len(pretrain_data.x_train)} examples of digits 0-4; fine-tune: "
    f"{len(data.x_train)} examples of digits 5-9 ({settings.per_class} per "
    f"class), test: {len(data.x_test)}"
  )
  with report.ProgressBars(settings.progress) as progress:
    context.update(progress=progress)
    pretrained = job.train_optimizer(
      "sgd", pretrain_data, pre_config, progress, context["safe_point"],
      label="pretrain on digits 0-4",
    )  # fmt: skip
    init_params = starting_points(pretrained, config, data)
    context["measure"] = classify.make_measure(data, config, settings)
    rows = [
      classify.run_method(method, data, config, settings, context, init_params)
      for method in settings.optimizers
    ]
  return _finish(settings, rows, pretrained, pretrain_data, data, context)


def _finish(settings, rows, pretrained, pretrain_data, data, context):
  metrics = tuple(metric for metric, _, _ in COLUMNS)
  differences = classify.paired_differences(rows, metrics)
  labels = {row["method"]: row["label"] for row in rows}
  layers = [name for name in rows[0]["per_seed"] if name.startswith("vHv[")]
  tables = {
    "results": output.table(rows, COLUMNS),
    "versus_sgd": output.differences_table(differences, labels, COLUMNS),
    "layers": output.table(
      rows, [(name, name, output.fmt(3)) for name in layers], compute=False
    ),
  }
  pretrain_accuracy = np.asarray(pretrained["curves"]["test_accuracy"])[:, -1]
  results = {
    "experiment": "finetune",
    "settings": output.settings_dict(settings),
    "data": {
      "pretrain": f"digits {PRETRAIN_CLASSES}, {len(pretrain_data.x_train)} examples",
      "finetune_train_examples": len(data.x_train),
      "finetune_test_examples": len(data.x_test),
      "finetune_classes": list(FINETUNE_CLASSES),
      "pretrain_test_accuracy_per_seed": pretrain_accuracy.tolist(),
      "measured_on": f"{min(settings.hessian_samples, len(data.x_train))} "
      "fine-tuning training examples",
    },
    "rows": rows,
    "versus_sgd": differences,
    "tables": tables,
  }
  markdown = output.markdown_document(
    "finetune: digits 0-4 -> 5-9",
    [
      ("Results (mean ± std over seeds)", tables["results"]),
      ("Against SGD", tables["versus_sgd"]),
      ("Per-layer v_l^T H_l v_l, v = W - W_start", tables["layers"]),
    ],
  )
  plots = {
    "curves.png": lambda path: output.draw_curves([("fine-tuning", rows)], path),
    "measures.png": lambda path: output.draw_bars(
      rows, [(metric, header) for metric, header, _ in COLUMNS], path
    ),
    "layers.png": lambda path: output.draw_bars(
      rows,
      [(name, name) for name in layers],
      path,
      "v_l^T H_l v_l per layer (v = W - W_start)",
    ),
  }
  return output.finish(settings, results, markdown, plots, context)
