"""The ``nso-jax`` console script: Ctrl-C is honoured from the first instant.

Importing :mod:`nso_jax` imports JAX, which takes seconds; Python's own
Ctrl-C then raises inside an import (a traceback) or inside a garbage
collection callback (``Exception ignored``, and the run goes on). This
module, outside the package, imports only the standard library before it
installs a handler that ends the process at once with status 130 and one
line; :func:`nso_jax.app.cli.main` then installs the command's own (see
:mod:`nso_jax.app.interrupts`).
"""

import os
import signal
import sys


def _interrupted(signum, frame) -> None:
  """Ends the process while it starts: nothing has been written yet."""
  del signum, frame
  os.write(2, b"nso-jax: interrupted; no results were written\n")
  os._exit(130)


def main() -> int:
  """Runs the ``nso-jax`` command; returns its exit status."""
  signal.signal(signal.SIGINT, _interrupted)
  from nso_jax.app import cli

  return cli.main()


if __name__ == "__main__":
  sys.exit(main())
