"""Ctrl-C during the job: deferred to safe points, reported as :class:`Interrupted`."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from typing import Any


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
