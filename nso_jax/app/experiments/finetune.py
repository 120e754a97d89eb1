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
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from nso_jax.app import classifier
from nso_jax.app import data as data_lib
from nso_jax.app import optimizers
from nso_jax.app import output
from nso_jax.app import settings as settings_lib
from nso_jax.app.experiments import classify
from nso_jax.app.interrupts import RunContext
from nso_jax.app.records import MethodResult
from nso_jax.app.settings import SHARE
from nso_jax.app.settings import Count
from nso_jax.app.settings import Spec
from nso_jax.app.settings import setting

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

  optimizers: tuple[str, ...] = setting(optimizers.METHODS, classify.METHODS_SPEC)
  epochs: int = setting(100, help="fine-tuning epochs (sgd-long: 2k times more)")
  output: str = setting("nso_experiments/finetune")
  per_class: int = setting(
    20,
    Spec(
      Count(1_000, "more than the digits hold"),
      "fine-tuning training examples per class",
    ),
  )
  pretrain_epochs: int = setting(
    20, Spec(settings_lib.SPECS["epochs"].rule, "SGD pretraining epochs on digits 0-4")
  )
  label_noise: float = setting(
    0.0, Spec(SHARE, "share of fine-tuning training labels flipped")
  )


def make_data(settings: Settings) -> tuple[data_lib.Dataset, data_lib.Dataset]:
  """The pretraining and fine-tuning data sets (data seed 0, fixed).

  Raises:
    SettingError: when ``per_class`` leaves no test example of a class.
  """
  digits = data_lib.load_digits()
  subset = data_lib.class_subset
  x_pre, y_pre = subset(digits.x_train, digits.y_train, PRETRAIN_CLASSES)
  x_pre_test, y_pre_test = subset(digits.x_test, digits.y_test, PRETRAIN_CLASSES)
  pretrain = data_lib.Dataset(
    "digits 0-4", x_pre, y_pre, x_pre_test, y_pre_test, len(PRETRAIN_CLASSES)
  )
  x = np.concatenate([digits.x_train, digits.x_test])
  y = np.concatenate([digits.y_train, digits.y_test])
  x, y = subset(x, y, FINETUNE_CLASSES)
  rng = np.random.default_rng(0)
  chosen: list[int] = []
  for label in range(len(FINETUNE_CLASSES)):
    members = np.flatnonzero(y == label)
    if settings.per_class >= len(members):
      raise settings_lib.SettingError(
        "per_class",
        f"must leave test examples: class {FINETUNE_CLASSES[label]} has "
        f"{len(members)} examples.",
        value=settings.per_class,
      )
    chosen.extend(rng.choice(members, settings.per_class, replace=False))
  train = np.sort(np.asarray(chosen))
  test = np.setdiff1d(np.arange(len(y)), train)
  y_train = data_lib.flip_labels(
    y[train], settings.label_noise, len(FINETUNE_CLASSES), rng
  )
  finetune = data_lib.Dataset(
    "digits 5-9", x[train], y_train, x[test], y[test], len(FINETUNE_CLASSES)
  )
  return pretrain, finetune


def starting_points(
  pretrained: classifier.Trained, hidden: tuple[int, ...], data: data_lib.Dataset
) -> Callable[[int], Any]:
  """``seed -> params``: seed's pretrained layers with a fresh output layer."""
  model = classifier.MLP(tuple(hidden), data.num_classes)
  head = optimizers.head_name(hidden)

  def init_params(seed: int) -> Any:
    params = dict(pretrained.params(seed))
    key = jax.random.fold_in(jax.random.key(seed), 7)
    params[head] = model.init(key, data.x_train[:1])["params"][head]
    return params

  return init_params


def run(settings: Settings, context: RunContext) -> dict[str, Any]:
  """Runs ``finetune`` and writes its outputs (see
  :func:`nso_jax.app.experiments.run`)."""
  pretrain_data, data = make_data(settings)
  pre_settings = dataclasses.replace(settings, epochs=settings.pretrain_epochs)
  classifier.check_fits(settings, data)
  classifier.check_fits(pre_settings, pretrain_data)
  settings.check_methods()
  output.prepare_output(settings.output)
  context.printer(
    f"pretrain: {len(pretrain_data.x_train)} examples of digits 0-4; fine-tune: "
    f"{len(data.x_train)} examples of digits 5-9 ({settings.per_class} per "
    f"class), test: {len(data.x_test)}"
  )
  with output.ProgressBars(settings.progress) as progress:
    pretrain_plan = optimizers.Plan("sgd", pre_settings, "pretrain on digits 0-4")
    pretrained = classifier.train(
      pretrain_plan, pretrain_data, progress, context.safe_point
    )
    init_params = starting_points(pretrained, settings.hidden, data)
    rows = classify.run_methods(
      data, settings, progress, context, init_params=init_params
    )
  return _finish(settings, rows, pretrained, pretrain_data, data, context)


def _finish(
  settings: Settings,
  rows: list[MethodResult],
  pretrained: classifier.Trained,
  pretrain_data: data_lib.Dataset,
  data: data_lib.Dataset,
  context: RunContext,
) -> dict[str, Any]:
  versus_sgd, tables = classify.comparison(rows, COLUMNS)
  layers = [name for name in rows[0].per_seed if name.startswith("vHv[")]
  tables["layers"] = output.method_table(
    rows, [(name, name, output.fmt(3)) for name in layers], compute=False
  )
  pretrain_accuracy = pretrained.curves.test_accuracy[:, -1]
  results = {
    "experiment": "finetune",
    "settings": settings_lib.as_json(settings),
    "data": {
      "pretrain": f"digits {PRETRAIN_CLASSES}, {len(pretrain_data.x_train)} examples",
      "finetune_train_examples": len(data.x_train),
      "finetune_test_examples": len(data.x_test),
      "finetune_classes": list(FINETUNE_CLASSES),
      "pretrain_test_accuracy_per_seed": pretrain_accuracy.tolist(),
      "measured_on": f"{min(settings.hessian_samples, len(data.x_train))} "
      "fine-tuning training examples",
    },
    "rows": [row.to_json() for row in rows],
    "versus_sgd": versus_sgd,
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
  return output.finish(
    context, settings.output, results, markdown, plots if settings.plots else {}
  )
