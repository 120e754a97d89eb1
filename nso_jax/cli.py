"""The ``nso-jax`` command.

``nso-jax train`` is the main job: it trains a small network on scikit-learn's
bundled digits (or ``--data FILE.npz``) with SGD, SAM, random weight
perturbation and NSO over several seeds, and reports test accuracy, training
loss and the curvature (Hessian trace, top eigenvalue, spectral density) each
optimizer reached, with the gradient evaluations each one spends per step.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nso_jax._src import experiment


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
  unknown = [n for n in names if n not in experiment.OPTIMIZERS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(
      f"unknown optimizer(s) {unknown or text!r}; choose from "
      f"{','.join(experiment.OPTIMIZERS)}"
    )
  return names


def build_parser() -> argparse.ArgumentParser:
  defaults = experiment.Config()
  parser = argparse.ArgumentParser(
    prog="nso-jax",
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
  add = train.add_argument
  add(
    "--optimizers",
    type=_names,
    default=defaults.optimizers,
    help="comma-separated subset of " + ",".join(experiment.OPTIMIZERS),
  )
  add("--epochs", type=int, default=defaults.epochs)
  add("--seeds", type=int, default=defaults.seeds, help="seeds 0 .. N-1")
  add(
    "--hidden",
    type=_int_list,
    default=defaults.hidden,
    help="hidden layer widths of the MLP, e.g. 128,128",
  )
  add("--batch-size", type=int, default=defaults.batch_size)
  add("--lr", type=float, default=defaults.learning_rate, help="SGD learning rate")
  add("--momentum", type=float, default=defaults.momentum)
  add("--weight-decay", type=float, default=defaults.weight_decay)
  add("--sigma", type=float, default=defaults.sigma, help="NSO/RWP noise std")
  add(
    "--k",
    type=int,
    default=defaults.num_perturbations,
    help="NSO/RWP perturbations per step",
  )
  add("--rho", type=float, default=defaults.rho, help="SAM radius")
  add("--test-fraction", type=float, default=defaults.test_fraction)
  add(
    "--hessian-matvecs",
    type=int,
    default=defaults.hessian_matvecs,
    help="Hutchinson probes for the Hessian trace",
  )
  add(
    "--hessian-samples",
    type=int,
    default=defaults.hessian_samples,
    help="training examples the Hessian is measured on",
  )
  add(
    "--data",
    default=None,
    metavar="FILE.npz",
    help="your own data: an .npz with X (n, d) and y (n,) labels",
  )
  add("--out", default=defaults.output, help="output folder")
  add("--no-plots", action="store_true", help="skip the PNG plots")
  add("--no-progress", action="store_true", help="no progress bars")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  args = build_parser().parse_args(argv)
  try:
    config = experiment.Config(
      optimizers=args.optimizers,
      epochs=args.epochs,
      seeds=args.seeds,
      hidden=args.hidden,
      batch_size=args.batch_size,
      learning_rate=args.lr,
      momentum=args.momentum,
      weight_decay=args.weight_decay,
      sigma=args.sigma,
      num_perturbations=args.k,
      rho=args.rho,
      test_fraction=args.test_fraction,
      hessian_matvecs=args.hessian_matvecs,
      hessian_samples=args.hessian_samples,
      data=args.data,
      output=args.out,
      plots=not args.no_plots,
      progress=not args.no_progress,
    )
  except ValueError as error:
    print(f"nso-jax: error: {error}", file=sys.stderr)
    return 2
  try:
    experiment.run(config)
  except experiment.DataError as error:
    print(f"nso-jax: error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
