"""The optimizers the commands compare, and the experiments' matched-compute methods.

``nso-jax train`` compares :data:`OPTIMIZERS`; the classification
experiments compare :data:`METHODS`, the same optimizers at matched gradient
evaluations where they differ in cost (:func:`method_plan`):

* ``sgd``: SGD with momentum, 1 gradient per step;
* ``sgd-long``: the same, for ``2k`` times the epochs: NSO's gradient
  evaluations;
* ``sam``: SAM, 2 gradients per step;
* ``rwp``: random weight perturbation (one-sided noise) with ``2k`` draws
  per step: NSO's ``2k`` gradients per step;
* ``nso``: NSO with ``k`` antithetic pairs, ``2k`` gradients per step;
* ``nso-head``: NSO perturbing only the output layer (``param_filter``).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import optax

import nso_jax
from nso_jax.app import settings as settings_lib

OPTIMIZERS: tuple[str, ...] = ("sgd", "sam", "rwp", "nso")

LABELS = {
  "sgd": "SGD (momentum)",
  "sam": "SAM",
  "rwp": "RWP (one-sided noise)",
  "nso": "NSO",
}
"""Each optimizer's name in tables and plots."""

METHODS: tuple[str, ...] = ("sgd", "sgd-long", "sam", "rwp", "nso", "nso-head")


class Optimizer(NamedTuple):
  """An optimizer and what a step of it costs.

  Attributes:
    tx: the Optax transformation.
    gradient_evaluations: gradient evaluations per step.
    clean_gradient: whether a step needs the gradient at the current weights.
  """

  tx: Any
  gradient_evaluations: int
  clean_gradient: bool


def _with_single_argument_grad_fn(
  tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  """Lets SAM (whose ``grad_fn`` takes ``(params, step)``) take ``grad_fn(params)``."""

  def update(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    return tx.update(updates, state, params, grad_fn=lambda p, _: grad_fn(p))

  return optax.GradientTransformationExtraArgs(tx.init, update)


def make_optimizer(
  name: str, training: settings_lib.Training, param_filter: Any = None
) -> Optimizer:
  """Optimizer ``name`` (one of :data:`OPTIMIZERS`) with ``training``'s settings.

  ``param_filter`` (NSO and RWP only) restricts the noise to some leaves (see
  :func:`nso_jax.noise_stability`); ``None`` perturbs every leaf.
  """
  base = optax.chain(
    optax.add_decayed_weights(training.weight_decay),
    optax.sgd(training.learning_rate, momentum=training.momentum),
  )
  sigma, k = training.sigma, training.num_perturbations
  noise = {} if param_filter is None else {"param_filter": param_filter}
  if name == "sgd":
    return Optimizer(base, 1, True)
  if name == "sam":
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(training.rho))
    sam = optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True)
    return Optimizer(_with_single_argument_grad_fn(sam), 2, True)
  if name == "rwp":
    tx = nso_jax.nso(base, sigma, k, key=0, one_sided=True, **noise)
    return Optimizer(tx, k, False)
  return Optimizer(nso_jax.nso(base, sigma, k, key=0, **noise), 2 * k, False)


def head_name(hidden: tuple[int, ...]) -> str:
  """The Flax name of the output layer of an MLP with ``hidden`` layers."""
  return f"Dense_{len(hidden)}"


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a method trains: the optimizer, its settings, its noise filter, its label."""

  optimizer: str
  training: settings_lib.Training
  label: str
  param_filter: Any = None


def method_plan(method: str, training: settings_lib.Training) -> Plan:
  """How ``method`` (one of :data:`METHODS`) trains with ``training``'s settings.

  Raises:
    SettingError: when ``sgd-long``'s ``2k`` times the epochs exceed the
      epochs' limit.
  """
  k = training.num_perturbations
  if method == "sgd-long":
    epochs = training.epochs * 2 * k
    limit = settings_lib.limits(type(training))["epochs"]
    if epochs > limit:
      raise settings_lib.SettingError(
        "epochs",
        f"times 2k = {2 * k} (sgd-long's epochs) must be at most {limit:,}.",
        value=training.epochs,
      )
    longer = dataclasses.replace(training, epochs=epochs)
    return Plan("sgd", longer, f"SGD, {2 * k}x epochs")
  if method == "rwp":
    more = dataclasses.replace(training, num_perturbations=2 * k)
    return Plan("rwp", more, f"RWP, {2 * k} one-sided draws")
  if method == "nso-head":
    head = head_name(training.hidden)
    return Plan(
      "nso",
      training,
      "NSO, output layer only",
      lambda path, leaf: getattr(path[0], "key", None) == head,
    )
  return Plan(method, training, LABELS[method])
