"""Ctrl-C during a command: deferred to safe points, reported as :class:`Interrupted`.

:func:`run_interruptibly` runs a command's body with a :class:`RunContext`:
where it prints, its safe points and the list of files it has written.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import TypeVar

T = TypeVar("T")


class DeferredInterruptions:
  """Defers Ctrl-C (SIGINT) to the job's safe points, between computations.

  A :class:`KeyboardInterrupt` raised in the middle of a JAX computation or
  one of its callbacks can leave the computation unfinished for good (the
  next wait hangs) or crash the interpreter as it exits. While this context
  is entered, Ctrl-C is only recorded, and :meth:`safe_point` raises
  :class:`KeyboardInterrupt` at the next safe point, after the current epoch
  or measurement; pressing it again changes nothing. Outside the main thread,
  or where SIGINT has a handler other than Python's default, nothing is
  deferred.
  """

  def __init__(self):
    self.requested = False
    self._previous: Any = None

  def __enter__(self) -> DeferredInterruptions:
    if (
      threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
      self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None

  def _on_interrupt(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def safe_point(self) -> None:
    """Raises :class:`KeyboardInterrupt` if Ctrl-C was pressed."""
    if self.requested:
      raise KeyboardInterrupt


class Interrupted(KeyboardInterrupt):
  """The job was interrupted (Ctrl-C).

  Attributes:
    written: the output files it had already put in place; none unless the
      interruption reached the job after it began to move them into place.
  """

  def __init__(self, written: Sequence[str]):
    super().__init__()
    self.written = list(written)


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What a running command is given.

  Attributes:
    printer: where its summaries, tables and the paths written go.
    safe_point: to call between computations; raises
      :class:`KeyboardInterrupt` there if Ctrl-C was pressed.
    written: the output files put in place so far; the writer appends to it.
    start: :func:`time.perf_counter` when the command started.
  """

  printer: Callable[[str], None]
  safe_point: Callable[[], None]
  written: list[str]
  start: float

  def seconds(self) -> float:
    """The seconds since the command started."""
    return time.perf_counter() - self.start


def run_interruptibly(
  body: Callable[[RunContext], T], printer: Callable[[str], None] = print
) -> T:
  """Runs ``body`` with Ctrl-C deferred to its safe points.

  Args:
    body: the command; it gets a fresh :class:`RunContext`.
    printer: the context's printer.

  Returns:
    What ``body`` returns.

  Raises:
    Interrupted: on Ctrl-C, listing the files already written.
  """
  written: list[str] = []
  try:
    with DeferredInterruptions() as interruptions:
      context = RunContext(
        printer, interruptions.safe_point, written, time.perf_counter()
      )
      return body(context)
  except KeyboardInterrupt:
    raise Interrupted(written) from None
