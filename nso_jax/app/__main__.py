"""``python -m nso_jax.app``: the ``nso-jax`` command."""

import sys

from nso_jax.app import cli

if __name__ == "__main__":
  sys.exit(cli.main())
