"""The settings of every command: typed, frozen, with their limits stated once.

A command's settings are a frozen dataclass derived from :class:`Settings`
whose fields are made with :func:`setting`. Each field has a :class:`Spec`:
its :class:`Rule` (what a valid value is, how a flag's text parses, the
bound its help states), its help text and its flag. The fields every
command shares take their spec from :data:`SPECS`, by name; a command's own
field passes its spec. From that one statement :func:`add_flags` adds the
command-line flags, :func:`from_args` builds the settings, and
``__post_init__`` checks every value, raising a :class:`SettingError` that
names the first field at fault, which the command spells as its flag
(:func:`flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from typing import Any
from typing import Protocol
from typing import TypeVar

import numpy as np


class SettingError(ValueError):
  """A setting or argument that cannot be used, naming the field at fault.

  The message is a subject naming the field, then :attr:`detail`. The subject
  is the field in backticks, followed by :attr:`value` in parentheses when the
  message quotes one: "`batch_size` (32) exceeds the 10 training examples.".
  A front end that spells the fields differently (a command line's flags)
  rebuilds the message with :meth:`message`.

  Attributes:
    field: the name of the settings field or function argument at fault.
    detail: what is wrong with it, the message after the subject.
    value: the value the subject quotes, or ``None`` when it quotes none.
  """

  separator = " "
  """What joins the subject to the detail."""

  def __init__(self, field: str, detail: str, *, value: Any = None):
    self.field = field
    self.detail = detail
    self.value = value
    super().__init__(self.message())

  def message(self, name: str | None = None) -> str:
    """The message, with the field spelt ``name``.

    Args:
      name: how to spell the field, e.g. a command-line flag; the subject is
        then ``name`` and the value, if any, without parentheses. ``None``
        spells the field in backticks.

    Returns:
      The one-line message.
    """
    if name is None:
      subject = f"`{self.field}`"
      if self.value is not None:
        subject += f" ({self.value})"
    else:
      subject = name if self.value is None else f"{name} {self.value}"
    return subject + self.separator + self.detail

  def with_field(self, field: str) -> SettingError:
    """The same error, attributed to ``field`` (e.g. the setting behind an argument).

    Args:
      field: the name the new error gives the field at fault.

    Returns:
      An error of the same type, detail and value.
    """
    return type(self)(field, self.detail, value=self.value)


class Rule(Protocol):
  """What values a setting takes: its check, its flag's parser, its bound."""

  def check(self, name: str, value: Any) -> None:
    """Raises :class:`SettingError` (field ``name``) unless ``value`` is valid."""

  def parse(self, text: str) -> Any:
    """A flag's text as a value; :class:`argparse.ArgumentTypeError` if it is none."""

  def describe(self) -> str:
    """The bound the flag's help states, or ``""``."""


def _parse_number(kind: type, text: str) -> Any:
  try:
    return kind(text.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected {kind.__name__} value(s), got {text!r}"
    ) from None


def _split(text: str, noun: str = "value") -> list[str]:
  """A comma-separated list's items; an empty one (``128,,128``) is refused."""
  parts = [part.strip() for part in text.split(",")]
  if not any(parts):
    raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
  if not all(parts):
    raise argparse.ArgumentTypeError(
      f"empty {noun} in {text!r}: give one {noun} between each pair of commas"
    )
  return parts


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Count:
  """An int in ``[1, limit]``; ``reason`` says why the limit is where it is."""

  limit: int
  reason: str

  def check(self, name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
      raise SettingError(name, f"must be an int >= 1, got {value!r}.")
    if value > self.limit:
      raise SettingError(
        name, f"must be at most {self.limit:,} ({self.reason}), got {value!r}."
      )

  def parse(self, text: str) -> int:
    return _parse_number(int, text)

  def describe(self) -> str:
    return f"at most {self.limit:,}"


@dataclasses.dataclass(frozen=True)
class Real:
  """A finite float above ``low`` (or at it, if ``closed``) and below ``high``."""

  low: float
  high: float = math.inf
  closed: bool = False

  def describe(self) -> str:
    if self.high == math.inf:
      return f"a finite float {'>=' if self.closed else '>'} {self.low:g}"
    return f"in {'[' if self.closed else '('}{self.low:g}, {self.high:g})"

  def check(self, name: str, value: Any) -> None:
    number = value if isinstance(value, float) else math.nan
    if _is_int(value):
      number = float(value)
    above = number >= self.low if self.closed else number > self.low
    if not (math.isfinite(number) and above and number < self.high):
      raise SettingError(name, f"must be {self.describe()}, got {value!r}.")

  def parse(self, text: str) -> float:
    return _parse_number(float, text)


SHARE = Real(0.0, 1.0, closed=True)
"""A share of examples, in ``[0, 1)``."""


@dataclasses.dataclass(frozen=True)
class Widths:
  """Hidden layer widths: ints in ``[1, max_width]``, at most ``max_depth`` of them."""

  max_width: int
  max_depth: int

  def check(self, name: str, value: Any) -> None:
    if (
      not isinstance(value, tuple)
      or not value
      or any(not _is_int(width) or width < 1 for width in value)
    ):
      raise SettingError(name, f"must list layer widths >= 1, got {value!r}.")
    if max(value) > self.max_width:
      raise SettingError(
        name,
        f"must list layer widths of at most {self.max_width:,}, got {value!r}.",
      )
    if len(value) > self.max_depth:
      raise SettingError(
        name,
        f"must list at most {self.max_depth} layers (each is compiled on its "
        f"own), got {len(value)}.",
      )

  def parse(self, text: str) -> tuple[int, ...]:
    return tuple(_parse_number(int, part) for part in _split(text, "layer width"))

  def describe(self) -> str:
    return f"widths at most {self.max_width:,}, at most {self.max_depth} layers"


@dataclasses.dataclass(frozen=True)
class Choices:
  """A non-empty tuple of distinct names out of ``choices``."""

  choices: tuple[str, ...]
  noun: str = "optimizer"

  def check(self, name: str, value: Any) -> None:
    if (
      not isinstance(value, tuple)
      or not value
      or any(item not in self.choices for item in value)
      or len(set(value)) != len(value)
    ):
      raise SettingError(
        name,
        f"must be a non-empty subset of {self.choices} without repeats, got {value!r}.",
      )

  def parse(self, text: str) -> tuple[str, ...]:
    names = tuple(_split(text, self.noun))
    unknown = [item for item in names if item not in self.choices]
    if unknown:
      raise argparse.ArgumentTypeError(
        f"unknown {self.noun}(s) {unknown}; choose from {','.join(self.choices)}"
      )
    return names

  def describe(self) -> str:
    return "comma-separated subset of " + ",".join(self.choices)


@dataclasses.dataclass(frozen=True)
class Values:
  """A non-empty tuple of distinct values, each valid by ``item``'s rule."""

  item: Rule

  def check(self, name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not value:
      raise SettingError(name, f"must be a non-empty tuple, got {value!r}.")
    if len(set(value)) != len(value):
      raise SettingError(name, f"must not repeat a value, got {value!r}.")
    for item in value:
      self.item.check(name, item)

  def parse(self, text: str) -> tuple[Any, ...]:
    return tuple(self.item.parse(part) for part in _split(text))

  def describe(self) -> str:
    return "each " + self.item.describe()


@dataclasses.dataclass(frozen=True)
class Text:
  """A non-empty string (or ``None``, if ``optional``) that ``names`` something."""

  names: str
  optional: bool = False

  def check(self, name: str, value: Any) -> None:
    if value is None and self.optional:
      return
    if not (isinstance(value, str) and value):
      raise SettingError(name, f"must name {self.names}, got {value!r}.")

  def parse(self, text: str) -> str:
    return text

  def describe(self) -> str:
    return ""


@dataclasses.dataclass(frozen=True)
class Switch:
  """A bool, on by default; its flag ``--no-NAME`` turns it off."""

  def check(self, name: str, value: Any) -> None:
    if not isinstance(value, bool):
      raise SettingError(name, f"must be a bool, got {value!r}.")

  def parse(self, text: str) -> bool:
    raise argparse.ArgumentTypeError("a switch takes no value")

  def describe(self) -> str:
    return ""


@dataclasses.dataclass(frozen=True)
class Spec:
  """A setting's rule, help text, and flag (default: ``--`` and its dashed name).

  ``default`` is how the flag's help states the default when the value alone
  would not say it (``None``, a switch); otherwise the help shows the value.
  """

  rule: Rule
  help: str
  flag: str | None = None
  metavar: str | None = None
  default: str | None = None


_STEPS = "Lanczos keeps one parameter-sized vector per step"

SPECS: dict[str, Spec] = {
  "epochs": Spec(
    Count(
      10_000, "250 times the default; at the default size that is hours of training"
    ),
    "training epochs",
  ),
  "seeds": Spec(
    Count(64, "all seeds train at once, each with its own copy of the model"),
    "seeds 0 .. N-1 (mean ± std over them)",
  ),
  "hidden": Spec(Widths(8192, 32), "hidden layer widths of the MLP, e.g. 128,128"),
  "batch_size": Spec(
    Count(100_000, "a batch's activations are held for every seed at once"),
    "mini-batch size",
  ),
  "learning_rate": Spec(Real(0.0), "SGD learning rate", flag="--lr"),
  "momentum": Spec(SHARE, "SGD momentum"),
  "weight_decay": Spec(Real(0.0, closed=True), "weight decay"),
  "sigma": Spec(Real(0.0), "NSO/RWP noise std"),
  "num_perturbations": Spec(
    Count(64, "NSO spends 2 gradient evaluations per perturbation"),
    "NSO/RWP perturbations per step",
    flag="--k",
  ),
  "rho": Spec(Real(0.0), "SAM radius"),
  "test_fraction": Spec(Real(0.0, 1.0), "share of examples held out for testing"),
  "hessian_samples": Spec(
    Count(
      100_000, "100 times the default; the Hessian is applied to all of them at once"
    ),
    "training examples the Hessian is measured on",
  ),
  "hessian_matvecs": Spec(
    Count(
      10_000, "100 times the default; the trace's error shrinks only as 1/sqrt(probes)"
    ),
    "Hutchinson probes for the Hessian trace",
  ),
  "lanczos_steps": Spec(Count(1_000, _STEPS), "Lanczos steps for the top eigenvalue"),
  "density_steps": Spec(Count(1_000, _STEPS), "Lanczos steps of the spectral density"),
  "density_probes": Spec(
    Count(64, "each probe runs its own Lanczos"), "probes of the spectral density"
  ),
  "ns_sigma": Spec(Real(0.0), "noise-stability measure's noise std (sigma)"),
  "ns_draws": Spec(
    Count(10_000, "each draw evaluates the loss on every measured example"),
    "noise-stability draws",
  ),
  "data": Spec(
    Text("an .npz file (or be left out for the digits)", optional=True),
    "your own data: an .npz with X (n, d) and y (n,) labels",
    metavar="FILE.npz",
    default="scikit-learn's digits",
  ),
  "output": Spec(Text("a folder"), "output folder", flag="--out"),
  "plots": Spec(Switch(), "skip the PNG plots", default="plots are written"),
  "progress": Spec(Switch(), "no progress bars", default="progress bars are shown"),
}
"""The specs of the settings several commands share, by field name.

Each bound is generous for real use and refuses settings that would trace,
compile or run for hours with no sign of progress.
"""

MAX_PARAMETERS = 20_000_000
"""The largest model (of one seed): the Hessian measurement keeps one
parameter-sized vector per Lanczos step, 20 million floats being 80 MB each."""

MAX_TRAINED_PARAMETERS = 200_000_000
"""The most parameters trained at once over all seeds: with their momentum,
gradients and perturbations, about 3 GB in float32."""


def setting(default: Any, spec: Spec | None = None, *, help: str | None = None) -> Any:
  """A settings field: its default and its spec.

  Args:
    default: the default value.
    spec: the field's spec; ``None`` takes the one :data:`SPECS` holds
      under the field's name.
    help: help text in place of the spec's (the rule stays the spec's).

  Returns:
    A :func:`dataclasses.field` carrying that metadata.
  """
  return dataclasses.field(default=default, metadata={"spec": spec, "help": help})


def spec_of(field: dataclasses.Field) -> Spec:
  """The spec of a settings field, with its help text."""
  spec = field.metadata.get("spec") or SPECS[field.name]
  flag = spec.flag or "--" + field.name.replace("_", "-")
  if isinstance(spec.rule, Switch):
    flag = "--no-" + field.name.replace("_", "-")
  return dataclasses.replace(
    spec, flag=flag, help=field.metadata.get("help") or spec.help
  )


@dataclasses.dataclass(frozen=True)
class Settings:
  """The base of every command's settings: checks each field on creation.

  Raises:
    SettingError: naming the first field whose value cannot be used.
  """

  def __post_init__(self) -> None:
    for field in dataclasses.fields(self):
      spec_of(field).rule.check(field.name, getattr(self, field.name))
    self.check_together()

  def check_together(self) -> None:
    """Checks what depends on several fields; each field alone is valid."""


@dataclasses.dataclass(frozen=True)
class Training(Settings):
  """What training a classifier takes, shared by ``train`` and the experiments."""

  epochs: int = setting(40)
  seeds: int = setting(5)
  hidden: tuple[int, ...] = setting((128, 128))
  batch_size: int = setting(32)
  learning_rate: float = setting(0.05)
  momentum: float = setting(0.9)
  weight_decay: float = setting(5e-4)
  sigma: float = setting(0.05)
  num_perturbations: int = setting(1)
  rho: float = setting(0.05)


def flags(settings_type: type[Settings]) -> dict[str, str]:
  """Field name -> flag, for every field of a settings dataclass."""
  fields = dataclasses.fields(settings_type)
  return {field.name: str(spec_of(field).flag) for field in fields}


def _shown(spec: Spec, default: Any) -> str:
  """The default as the help states it: as typed on the command line."""
  if spec.default is not None:
    return spec.default
  if isinstance(spec.rule, Switch):
    return "on; this flag turns it off" if default else "off"
  if default is None:
    return "none"
  if isinstance(default, tuple):
    return ",".join(str(item) for item in default)
  return str(default)


def add_flags(parser: argparse.ArgumentParser, settings_type: type[Settings]) -> None:
  """Adds one flag per field of ``settings_type`` to ``parser``."""
  for field in dataclasses.fields(settings_type):
    spec = spec_of(field)
    flag = str(spec.flag)
    shown = f" (default: {_shown(spec, field.default)})"
    if isinstance(spec.rule, Switch):
      parser.add_argument(
        flag, dest=field.name, action="store_false", help=spec.help + shown
      )
      continue
    help_text = spec.help
    if spec.rule.describe():
      help_text += f"; {spec.rule.describe()}"
    parser.add_argument(
      flag,
      dest=field.name,
      type=spec.rule.parse,
      default=field.default,
      metavar=spec.metavar or flag.lstrip("-").replace("-", "_").upper(),
      help=help_text + shown,
    )


SettingsT = TypeVar("SettingsT", bound=Settings)


def from_args(settings_type: type[SettingsT], args: argparse.Namespace) -> SettingsT:
  """The settings of ``settings_type`` from parsed arguments.

  Raises:
    SettingError: naming the field whose value cannot be used.
  """
  values = vars(args)
  fields = dataclasses.fields(settings_type)
  return settings_type(**{field.name: values[field.name] for field in fields})


def as_json(settings: Settings) -> dict[str, Any]:
  """The settings as JSON-ready values (tuples as lists)."""
  return {
    name: list(value) if isinstance(value, tuple) else value
    for name, value in dataclasses.asdict(settings).items()
  }


def limits(settings_type: type[Settings]) -> Mapping[str, int]:
  """The upper bound of each int setting of ``settings_type``."""
  out = {}
  for field in dataclasses.fields(settings_type):
    rule = spec_of(field).rule
    if isinstance(rule, Count):
      out[field.name] = rule.limit
  return out
