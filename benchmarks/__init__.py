"""Runnable benchmarks of nso_jax (not unit tests); see benchmarks/README.md."""
