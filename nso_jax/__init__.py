"""nso_jax: Noise Stability Optimization and Hessian tools for JAX."""

__version__ = "0.1.0"
