"""The ``nso-jax`` console script: Ctrl-C is honoured from the first instant.

Importing :mod:`nso_jax` imports JAX, which takes seconds; Python's own
Ctrl-C then raises inside an import (a traceback) or inside a garbage
collection callback (``Exception ignored``, and the run goes on). This
module, outside the package, imports only the standard library before it
installs a handler that ends the process at once with status 130 and one
line; :func:`nso_jax.app.cli.main` then installs the command's own (see
:mod:`nso_jax.app.interrupts`).
"""

import atexit
import contextlib
import os
import signal
import sys
from typing import NoReturn


def _interrupted(signum, frame) -> None:
  """Ends the process while it starts: nothing has been written yet."""
  del signum, frame
  os.write(2, b"nso-jax: interrupted; no results were written\n")
  os._exit(130)


def main() -> NoReturn:
  """Runs the ``nso-jax`` command and ends the process with its exit status.

  The process ends here, once the exit functions have run and the output is
  flushed, rather than in the interpreter's teardown of JAX, during which
  Python restores the default SIGINT action (a Ctrl-C there would kill the
  process with no message).
  """
  signal.signal(signal.SIGINT, _interrupted)
  from nso_jax.app import cli

  status = cli.main()
  atexit._run_exitfuncs()
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(status)


if __name__ == "__main__":
  sys.exit(main())
