#!/usr/bin/env bash
# The lowest declared versions: a fresh virtual environment with every direct
# requirement at its lower bound (.ci/lowest_pins.py), then the core, Hessian,
# Flax, checkpoint, Equinox and command tests, the curvature readings, the
# self-tuning sigma, noise geometry and LoRA recipes, and the docstring examples.
# pytest's exit code 5 (no tests) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv --clear .ci/venv-lowest
# shellcheck disable=SC1091
source .ci/venv-lowest/bin/activate
python -m pip install --quiet --upgrade pip
python .ci/lowest_pins.py > .ci/venv-lowest/pins.txt
echo "lowest declared versions:" $(cat .ci/venv-lowest/pins.txt)
python -m pip install --quiet -r .ci/venv-lowest/pins.txt
python -m pip install --quiet --no-deps -e .
python -m pytest -q -p no:cacheprovider --doctest-modules \
  nso_jax tests/test_estimator.py tests/test_transform.py tests/test_noise.py \
  tests/test_batching.py tests/test_checks.py tests/test_pinned.py \
  tests/test_reliability.py tests/test_hessian.py tests/test_trace.py \
  tests/test_lanczos.py tests/test_training.py tests/test_checkpoints.py \
  tests/test_equinox.py tests/test_bad_input_sweep.py tests/test_cli.py \
  tests/test_param_filter.py tests/test_flatness.py tests/test_policy_faults.py \
  tests/test_limit_faults.py tests/test_checkpoint_faults.py tests/test_readings.py \
  tests/test_command_faults.py tests/test_geometry.py tests/test_sigma_tuning.py \
  tests/test_lora_recipe.py
