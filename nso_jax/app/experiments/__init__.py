"""``nso-jax experiment NAME``: experiments that test the NSO paper's claims.

Each experiment trains every method over several seeds, measures accuracy
and flatness, states every method's compute (gradient evaluations per step
and in total), and writes ``results.json`` (settings, per-seed numbers,
summaries), ``results.md`` (tables) and PNG plots into ``--out``:

* ``finetune``: pretrain on digits 0-4, fine-tune on few examples of 5-9
  (:mod:`.finetune`);
* ``label-noise``: digits with 20% and 40% flipped training labels
  (:mod:`.label_noise`);
* ``matrix-sensing``: the paper's synthetic low-rank recovery
  (:mod:`.matrix_sensing`);
* ``mnist1d``: MNIST-1D, an MLP and a 1-D CNN, clean and flipped labels,
  with NSO's fixed, filter-wise and self-tuning sigma (:mod:`.mnist1d`);
* ``sigma-sweep`` and ``k-sweep``: NSO's settings on noisy labels
  (:mod:`.sweeps`).

:mod:`.classify` holds the classification experiments' common settings and
their train-and-measure step; the settings, optimizers, training, measures
and output are the application's own (:mod:`nso_jax.app`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from nso_jax.app import settings as settings_lib
from nso_jax.app.experiments import finetune
from nso_jax.app.experiments import label_noise
from nso_jax.app.experiments import matrix_sensing
from nso_jax.app.experiments import mnist1d
from nso_jax.app.experiments import sweeps
from nso_jax.app.interrupts import RunContext
from nso_jax.app.interrupts import run_interruptibly


@dataclasses.dataclass(frozen=True)
class Experiment:
  """An experiment: its settings type, its run function and its help."""

  settings: type[settings_lib.Settings]
  run: Callable[[Any, RunContext], dict[str, Any]]
  help: str


EXPERIMENTS: dict[str, Experiment] = {
  "finetune": Experiment(
    finetune.Settings,
    finetune.run,
    "pretrain on digits 0-4, fine-tune on few examples of 5-9: SGD (and SGD "
    "for NSO's gradient evaluations), SAM, RWP, NSO (all weights, head only)",
  ),
  "label-noise": Experiment(
    label_noise.Settings,
    label_noise.run,
    "digits with 20%% and 40%% of the training labels flipped: SGD, SAM, RWP, NSO",
  ),
  "matrix-sensing": Experiment(
    matrix_sensing.Settings,
    matrix_sensing.run,
    "the paper's low-rank matrix sensing (d=100, r=5): GD against NSO",
  ),
  "mnist1d": Experiment(
    mnist1d.Settings,
    mnist1d.run,
    "MNIST-1D, MLP and 1-D CNN, clean and 20%% flipped labels: SGD, SAM, RWP, "
    "NSO (a sigma grid, filter-wise, self-tuning)",
  ),
  "sigma-sweep": Experiment(
    sweeps.SigmaSettings,
    sweeps.run,
    "NSO's noise std sigma from 0.005 to 0.2, on 20%% flipped labels",
  ),
  "k-sweep": Experiment(
    sweeps.KSettings,
    sweeps.run,
    "NSO's pairs per step k = 1..4, on 20%% flipped labels",
  ),
}


def add_parsers(commands: Any) -> None:
  """Adds a parser per experiment to ``commands`` (argparse subparsers)."""
  for name, experiment in EXPERIMENTS.items():
    parser = commands.add_parser(
      name,
      help=experiment.help,
      description=experiment.help.replace("%%", "%")
      + ". Writes results.json, results.md and PNG plots to --out.",
    )
    settings_lib.add_flags(parser, experiment.settings)


def flags(name: str) -> dict[str, str]:
  """Field name -> flag of experiment ``name``'s settings."""
  return settings_lib.flags(EXPERIMENTS[name].settings)


def settings_from_args(name: str, args: argparse.Namespace) -> settings_lib.Settings:
  """Experiment ``name``'s settings from parsed arguments.

  Raises:
    SettingError: naming the field whose value cannot be used.
  """
  return settings_lib.from_args(EXPERIMENTS[name].settings, args)


def run(
  name: str, settings: settings_lib.Settings, printer: Callable[[str], None] = print
) -> dict[str, Any]:
  """Runs experiment ``name`` with ``settings`` and writes its outputs.

  As the main job does (:func:`nso_jax.app.job.run`), it checks its settings,
  sizes and output folder before training, writes its files all or nothing
  (``results.json`` last) and stops at the next safe point on Ctrl-C.

  Returns:
    The results written to ``results.json``.

  Raises:
    SettingError: naming the setting that cannot be used.
    Interrupted: on Ctrl-C, listing the files already written.
  """
  experiment = EXPERIMENTS[name]
  return run_interruptibly(lambda context: experiment.run(settings, context), printer)
