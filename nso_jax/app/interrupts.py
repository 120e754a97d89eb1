"""Ctrl-C during a command: deferred to safe points, reported as :class:`Interrupted`.

:func:`run_interruptibly` runs a command's body with a :class:`RunContext`:
where it prints, its safe points and the list of files it has written.

The ``nso-jax`` command itself installs :class:`CommandInterrupts` for the
whole process (:func:`install_command_handler`), so that Ctrl-C is honoured
within seconds from launch to exit: before and after the command's body it
ends the process at once with status 130 and one line; during the body it is
taken at the next safe point, or, should none come within
:data:`GRACE_SECONDS` (a long computation or compilation), the process ends
there, never while the results are being moved into place. This module
imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import TypeVar

T = TypeVar("T")

EXIT_STATUS = 130
"""The exit status of an interrupted command (128 + SIGINT)."""

GRACE_SECONDS = 2.0
"""How long a running command has to reach a safe point after Ctrl-C."""


def interruption_message(program: str, written: Sequence[str]) -> str:
  """The line a Ctrl-C ends ``program`` with, given the files already written."""
  if not written:
    return f"{program}: interrupted; no results were written"
  return f"{program}: interrupted after writing {', '.join(written)}"


class DeferredInterruptions:
  """Defers Ctrl-C (SIGINT) to the job's safe points, between computations.

  A :class:`KeyboardInterrupt` raised in the middle of a JAX computation or
  one of its callbacks can leave the computation unfinished for good (the
  next wait hangs) or crash the interpreter as it exits. While this context
  is entered, Ctrl-C is only recorded, and :meth:`safe_point` raises
  :class:`KeyboardInterrupt` at the next safe point, after the current epoch
  or measurement; pressing it again changes nothing. Outside the main thread,
  or where SIGINT has a handler other than Python's default (the command's
  :class:`CommandInterrupts`, say), nothing is deferred here.
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


def _ignore(signum, frame) -> None:
  """The Python-level SIGINT handler of the command: the watcher does the work."""
  del signum, frame


class CommandInterrupts:
  """Ctrl-C for the whole life of the ``nso-jax`` process.

  SIGINT never raises :class:`KeyboardInterrupt` (which, raised inside an
  import or a garbage-collection callback, prints a traceback or is lost).
  Python's handler is a no-op; the signal wakes a watcher thread through
  :func:`signal.set_wakeup_fd` at once, even while the main thread waits on
  a computation. Outside a command's body the watcher ends the process with
  :data:`EXIT_STATUS` and one line; inside it, it marks the request for the
  next safe point (:meth:`safe_point`) and ends the process itself if none
  is reached within :data:`GRACE_SECONDS`, but never while files are being
  put in place (:meth:`writing`).
  """

  def __init__(self, program: str):
    self.program = program
    self.requested = False
    self.written: list[str] = []
    self._running = 0
    self._writing = 0
    self._handled = False
    self._condition = threading.Condition()

  def install(self) -> None:
    """Installs the handler; from the main thread only."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGINT, _ignore)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(
      target=self._watch, args=(read_fd,), name="ctrl-c", daemon=True
    ).start()

  def _watch(self, read_fd: int) -> None:
    while True:
      received = os.read(read_fd, 64)
      if not received:
        return
      if signal.SIGINT in received:
        self._interrupted()

  def _interrupted(self) -> None:
    with self._condition:
      if self.requested:
        return
      self.requested = True
      if self._running:
        self._condition.wait_for(lambda: self._handled, timeout=GRACE_SECONDS)
      self._condition.wait_for(lambda: self._handled or not self._writing)
      if not self._handled:
        self._exit()

  def _exit(self) -> None:
    """Ends the process now: the one line, the cursor shown again, status 130."""
    line = interruption_message(self.program, self.written) + "\n"
    with contextlib.suppress(OSError):
      if os.isatty(1):
        os.write(1, b"\x1b[?25h\n")  # progress bars hide the cursor
    with contextlib.suppress(OSError):
      os.write(2, line.encode())
    os._exit(EXIT_STATUS)

  def safe_point(self) -> None:
    """Raises :class:`KeyboardInterrupt` if Ctrl-C was pressed."""
    if self.requested:
      raise KeyboardInterrupt

  def handled(self) -> None:
    """Says the main thread is reporting the interruption: the watcher stands by."""
    with self._condition:
      self._handled = True
      self._condition.notify_all()

  @contextlib.contextmanager
  def running(self, written: list[str]) -> Iterator[None]:
    """The command's body: Ctrl-C waits :data:`GRACE_SECONDS` for a safe point."""
    with self._condition:
      self._running += 1
      self.written = written
    try:
      yield
    finally:
      with self._condition:
        self._running -= 1
        self._condition.notify_all()

  @contextlib.contextmanager
  def writing(self) -> Iterator[None]:
    """Files being put in place: the process is not ended until they are."""
    with self._condition:
      self._writing += 1
    try:
      yield
    finally:
      with self._condition:
        self._writing -= 1
        self._condition.notify_all()


_COMMAND: CommandInterrupts | None = None


def install_command_handler(program: str) -> CommandInterrupts | None:
  """Installs :class:`CommandInterrupts` for this process, once; returns it.

  For a command-line process: it replaces SIGINT's handler for the rest of
  the process's life. Outside the main thread it installs nothing and
  returns ``None`` (signals are the main thread's).
  """
  global _COMMAND
  if threading.current_thread() is not threading.main_thread():
    return None
  if _COMMAND is None:
    _COMMAND = CommandInterrupts(program)
    _COMMAND.install()
  return _COMMAND


def command_handler() -> CommandInterrupts | None:
  """The process's :class:`CommandInterrupts`, if the command installed one."""
  return _COMMAND


@contextlib.contextmanager
def writing() -> Iterator[None]:
  """Files being put in place: an interruption waits for them (see
  :meth:`CommandInterrupts.writing`)."""
  if _COMMAND is None:
    yield
    return
  with _COMMAND.writing():
    yield


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

  A Ctrl-C while the files are being put in place lets them all be written,
  then ends the run as an interruption listing them.

  Args:
    body: the command; it gets a fresh :class:`RunContext`.
    printer: the context's printer.

  Returns:
    What ``body`` returns.

  Raises:
    Interrupted: on Ctrl-C, listing the files already written.
  """
  written: list[str] = []
  command = _COMMAND
  running = command.running(written) if command else contextlib.nullcontext()
  try:
    with DeferredInterruptions() as interruptions, running:

      def safe_point() -> None:
        interruptions.safe_point()
        if command is not None:
          command.safe_point()

      context = RunContext(printer, safe_point, written, time.perf_counter())
      result = body(context)
      safe_point()
      return result
  except KeyboardInterrupt:
    raise Interrupted(written) from None
