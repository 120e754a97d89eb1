"""``python -m nso_jax.app``: the ``nso-jax`` command, as its console script runs it."""

import nso_jax_command

if __name__ == "__main__":
  nso_jax_command.main()
