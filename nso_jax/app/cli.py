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
from typing import NoReturn

import jax

import nso_jax
from nso_jax.app import experiments
from nso_jax.app import interrupts
from nso_jax.app import job
from nso_jax.app import settings

PROGRAM = "nso-jax"

FLAGS: dict[str, str] = settings.flags(job.Config)
"""The flag that sets each :class:`~nso_jax.app.job.Config` field."""

SIZE_FIELDS = (
  "seeds",
  "hidden",
  "batch_size",
  "hessian_samples",
  "hessian_matvecs",
  "num_perturbations",
)
"""The settings an out-of-memory error suggests making smaller."""


class Parser(argparse.ArgumentParser):
  """An argument parser whose errors end the command with one line.

  argparse's own error prints the whole usage block; here a bad flag or value
  ends with one line that names it and says where the flags are listed, with
  argparse's exit status 2. Subcommands' parsers are of this class too.
  """

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"{PROGRAM}: error: {message} (see `{self.prog} --help`)\n")


def _add_train_parser(commands: Any) -> None:
  train = commands.add_parser(
    "train",
    help="compare SGD, SAM, RWP and NSO on real data (the main job)",
    description=(
      "Train an MLP with several optimizers over several seeds on "
      "scikit-learn's digits (default) or your own data, then measure the "
      "loss Hessian of each trained model. Writes results.json, "
      "curves.png and spectrum.png to the output folder."
    ),
  )
  settings.add_flags(train, job.Config)


def _add_experiment_parser(commands: Any) -> None:
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


def build_parser() -> argparse.ArgumentParser:
  """The parser of the ``nso-jax`` command line."""
  parser = Parser(
    prog=PROGRAM,
    description="Noise Stability Optimization in JAX: experiments.",
  )
  parser.add_argument(
    "--version",
    action="version",
    version=f"{PROGRAM} {nso_jax.__version__}",
    help="print the version and exit",
  )
  commands = parser.add_subparsers(dest="command", required=True)
  _add_train_parser(commands)
  _add_experiment_parser(commands)
  return parser


def config_from_args(args: argparse.Namespace) -> job.Config:
  """The job's settings from parsed ``train`` arguments.

  Raises:
    SettingError: naming the Config field whose value cannot be used.
  """
  return settings.from_args(job.Config, args)


def error_message(error: settings.SettingError, flags: dict[str, str] = FLAGS) -> str:
  """``error``'s message with the field spelt as the flag that sets it."""
  return f"{PROGRAM}: error: {error.message(flags.get(error.field))}"


def interruption_message(written: Sequence[str]) -> str:
  """The line a Ctrl-C ends the command with, given the files already written."""
  return interrupts.interruption_message(PROGRAM, written)


DIVERGED = 3
"""The exit status of a run whose results hold a NaN or an infinity."""


def nonfinite_message(fields: dict[str, int], flags: dict[str, str] = FLAGS) -> str:
  """The warning a run with non-finite results ends with (status 3)."""
  shown = ", ".join(list(fields)[:3]) + (", ..." if len(fields) > 3 else "")
  lr = flags.get("learning_rate", "--learning-rate")
  return (
    f"{PROGRAM}: warning: the run diverged: {sum(fields.values()):,} numbers "
    f"of its results are NaN or infinite ({shown}); results.json has them as "
    f'null, listed under "nonfinite", and no plots were drawn; try a smaller '
    f"{lr} (exit status {DIVERGED})."
  )


def _is_out_of_memory(error: BaseException) -> bool:
  """Whether ``error`` says the host or the accelerator ran out of memory."""
  if isinstance(error, MemoryError):
    return True
  return isinstance(error, jax.errors.JaxRuntimeError) and (
    "RESOURCE_EXHAUSTED" in str(error)
  )


def out_of_memory_message(detail: str, flags: dict[str, str] = FLAGS) -> str:
  """The line an out-of-memory error ends the command with."""
  smaller = [flags[name] for name in SIZE_FIELDS if name in flags]
  return (
    f"{PROGRAM}: error: out of memory ({detail}); use smaller settings: "
    f"{', '.join(smaller[:-1])} or {smaller[-1]}."
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status.

  Faults of the user's making end in one line on stderr rather than a
  traceback: a setting, data file or output folder that cannot be used
  (status 2), too little memory for the settings (status 1) and Ctrl-C
  (status 130, after which no partial results remain). A run that diverged
  (a NaN or an infinity among its results, e.g. at too large a learning
  rate) writes its results, the non-finite values as ``null``, then warns
  in one line and ends with status 3 (:data:`DIVERGED`). A traceback is
  left to what would be a bug.

  Called without ``argv`` (as the command), it first installs the process's
  Ctrl-C handling (:func:`~nso_jax.app.interrupts.install_command_handler`):
  Ctrl-C is then honoured within seconds at any time, with status 130 and
  one line. With ``argv``, as in a test, SIGINT is only deferred to the
  run's safe points.
  """
  flags = FLAGS
  command = None
  if argv is None:
    command = interrupts.install_command_handler(PROGRAM)
  try:
    args = build_parser().parse_args(argv)
    if args.command == "experiment":
      flags = experiments.flags(args.experiment)
      chosen = experiments.settings_from_args(args.experiment, args)
      results = experiments.run(args.experiment, chosen)
    else:
      results = job.run(config_from_args(args))
  except settings.SettingError as error:
    print(error_message(error, flags), file=sys.stderr)
    return 2
  except KeyboardInterrupt as error:
    if command is not None:
      command.handled()
      # The command is ending: a further Ctrl-C must not break its exit.
      with contextlib.suppress(ValueError):  # ValueError: not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(interruption_message(getattr(error, "written", ())), file=sys.stderr)
    return 130
  except (MemoryError, jax.errors.JaxRuntimeError) as error:
    if not _is_out_of_memory(error):
      raise
    detail = str(error).strip().partition("\n")[0] or type(error).__name__
    print(out_of_memory_message(detail, flags), file=sys.stderr)
    return 1
  if "nonfinite" in results:
    print(nonfinite_message(results["nonfinite"]["fields"], flags), file=sys.stderr)
    return DIVERGED
  return 0
