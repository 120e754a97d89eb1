"""What the tests need from JAX across the versions the package supports."""

import jax

# `jax.enable_x64` is the context manager of recent JAX; older releases keep it
# in `jax.experimental`.
enable_x64 = getattr(jax, "enable_x64", None)
if enable_x64 is None:
  from jax.experimental import enable_x64
