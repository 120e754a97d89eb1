"""The ``nso-jax`` command.

``nso-jax train`` is the main job: it trains a small network on scikit-learn's
bundled digits (or ``--data FILE.npz``) with SGD, SAM, random weight
perturbation and NSO over several seeds, and reports test accuracy, training
loss and the curvature (Hessian trace, top eigenvalue, spectral density) each
optimizer reached, with the gradient evaluations each one spends per step.
``nso-jax experiment NAME`` runs one of the experiments of
:mod:`nso_jax.app.experiments`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import Any

import jax

from nso_jax.app import data
from nso_jax.app import experiments
from nso_jax.app import job

PROGRAM = "nso-jax"

FLAGS: dict[str, str] = {
  "optimizers": "--optimizers",
  "epochs": "--epochs",
  "seeds": "--seeds",
  "hidden": "--hidden",
  "batch_size": "--batch-size",
  "learning_rate": "--lr",
  "momentum": "--momentum",
  "weight_decay": "--weight-decay",
  "sigma": "--sigma",
  "num_perturbations": "--k",
  "rho": "--rho",
  "test_fraction": "--test-fraction",
  "hessian_matvecs": "--hessian-matvecs",
  "hessian_samples": "--hessian-samples",
  "data": "--data",
  "output": "--out",
  "plots": "--no-plots",
  "progress": "--no-progress",
}
"""The flag that sets each :class:`~nso_jax.app.job.Config` field."""


def _int_list(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(part) for part in text.split(",") if part.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated integers, got {text!r}"
    ) from None
  if not values or any(v < 1 for v in values):
    raise argparse.ArgumentTypeError(f"expected widths >= 1, got {text!r}")
  return values


def _names(text: str) -> tuple[str, ...]:
  names = tuple(part.strip() for part in text.split(",") if part.strip())
  unknown = [n for n in names if n not in job.OPTIMIZERS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(
      f"unknown optimizer(s) {unknown or text!r}; choose from "
      f"{','.join(job.OPTIMIZERS)}"
    )
  return names


def build_parser() -> argparse.ArgumentParser:
  """The parser of the ``nso-jax`` command line."""
  defaults = job.Config()
  parser = argparse.ArgumentParser(
    prog=PROGRAM,
    description="Noise Stability Optimization in JAX: experiments.",
  )
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser(
    "train",
    help="compare SGD, SAM, RWP and NSO on real data (the main job)",
    description=(
      "Train an MLP with several optimizers over several seeds on "
      "scikit-learn's digits (default) or your own data, then measure the "
      "loss Hessian of each trained model. Writes results.json, "
      "curves.png and spectrum.png to the output folder."
    ),
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )

  def add(field: str, **options: Any) -> None:
    flag = FLAGS[field]
    options.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
    if field in job.SIZE_LIMITS:
      bound = f"at most {job.SIZE_LIMITS[field][0]:,}"
      options["help"] = f"{options['help']}; {bound}" if "help" in options else bound
    train.add_argument(flag, dest=field, default=getattr(defaults, field), **options)

  add(
    "optimizers",
    type=_names,
    help="comma-separated subset of " + ",".join(job.OPTIMIZERS),
  )
  add("epochs", type=int)
  add("seeds", type=int, help="seeds 0 .. N-1")
  add(
    "hidden",
    type=_int_list,
    help=f"hidden layer widths of the MLP, e.g. 128,128; widths at most "
    f"{job.MAX_WIDTH:,}, at most {job.MAX_DEPTH} layers",
  )
  add("batch_size", type=int)
  add("learning_rate", type=float, help="SGD learning rate")
  add("momentum", type=float)
  add("weight_decay", type=float)
  add("sigma", type=float, help="NSO/RWP noise std")
  add("num_perturbations", type=int, help="NSO/RWP perturbations per step")
  add("rho", type=float, help="SAM radius")
  add("test_fraction", type=float)
  add("hessian_matvecs", type=int, help="Hutchinson probes for the Hessian trace")
  add("hessian_samples", type=int, help="training examples the Hessian is measured on")
  add(
    "data",
    metavar="FILE.npz",
    help="your own data: an .npz with X (n, d) and y (n,) labels",
  )
  add("output", help="output folder")
  train.add_argument(FLAGS["plots"], action="store_true", help="skip the PNG plots")
  train.add_argument(FLAGS["progress"], action="store_true", help="no progress bars")
  experiment = commands.add_parser(
    "experiment",
    help="run an experiment that tests the NSO paper's claims",
    description=(
      "Experiments that test the NSO paper's claims: fine-tuning, label "
      "noise, matrix sensing, and sweeps of NSO's sigma and k. Each writes "
      "results.json, results.md and PNG plots to its --out folder. "
      "`nso-jax experiment NAME --help` lists an experiment's flags."
    ),
  )
  experiments.add_parsers(
    experiment.add_subparsers(dest="experiment", required=True, metavar="NAME")
  )
  return parser


def config_from_args(args: argparse.Namespace) -> job.Config:
  """The job's settings from parsed ``train`` arguments.

  Raises:
    SettingError: naming the Config field whose value cannot be used.
  """
  settings = {
    field: getattr(args, field) for field in FLAGS if field not in ("plots", "progress")
  }
  return job.Config(**settings, plots=not args.no_plots, progress=not args.no_progress)


def error_message(error: data.SettingError, flags: dict[str, str] = FLAGS) -> str:
  """``error``'s message with the field spelt as the flag that sets it."""
  return f"{PROGRAM}: error: {error.message(flags.get(error.field))}"


def interruption_message(written: Sequence[str]) -> str:
  """The line a Ctrl-C ends the command with, given the files already written."""
  if not written:
    return f"{PROGRAM}: interrupted; no results were written"
  return f"{PROGRAM}: interrupted after writing {', '.join(written)}"


def _is_out_of_memory(error: BaseException) -> bool:
  """Whether ``error`` says the host or the accelerator ran out of memory."""
  if isinstance(error, MemoryError):
    return True
  return isinstance(error, jax.errors.JaxRuntimeError) and (
    "RESOURCE_EXHAUSTED" in str(error)
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status.

  Faults of the user's making end in one line on stderr rather than a
  traceback: a setting, data file or output folder that cannot be used
  (status 2), too little memory for the settings (status 1) and Ctrl-C
  (status 130, after which no partial results remain). A traceback is left
  to what would be a bug.
  """
  flags = FLAGS
  try:
    args = build_parser().parse_args(argv)
    if args.command == "experiment":
      flags = experiments.flags(args.experiment)
      settings = experiments.settings_from_args(args.experiment, args)
      experiments.run(args.experiment, settings)
    else:
      job.run(config_from_args(args))
  except data.SettingError as error:
    print(error_message(error, flags), file=sys.stderr)
    return 2
  except KeyboardInterrupt as error:
    if argv is None:
      # The command is ending: a further Ctrl-C must not break its exit.
      with contextlib.suppress(ValueError):  # ValueError: not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(interruption_message(getattr(error, "written", ())), file=sys.stderr)
    return 130
  except (MemoryError, jax.errors.JaxRuntimeError) as error:
    if not _is_out_of_memory(error):
      raise
    detail = str(error).strip().partition("\n")[0] or type(error).__name__
    print(
      f"{PROGRAM}: error: out of memory ({detail}); "
      f"use smaller settings: {FLAGS['seeds']}, {FLAGS['hidden']}, "
      f"{FLAGS['batch_size']}, {FLAGS['hessian_samples']}, "
      f"{FLAGS['hessian_matvecs']} or {FLAGS['num_perturbations']}.",
      file=sys.stderr,
    )
    return 1
  return 0
