"""nso_jax: Noise Stability Optimization and Hessian tools for JAX.

Noise stability optimisation (Zhang, Li, Ju, TMLR 2024) trains towards flat
minima by averaging gradients at antithetic weight perturbations ``W +/- U``.
"""

from nso_jax import hessian
from nso_jax._src.estimator import default_execution
from nso_jax._src.estimator import noise_stability_gradient
from nso_jax._src.noise import NOISE_DISTRIBUTIONS
from nso_jax._src.noise import sample_noise
from nso_jax._src.transform import NoiseStabilityState
from nso_jax._src.transform import noise_stability
from nso_jax._src.transform import nso

__version__ = "0.1.0"

__all__ = [
  "NOISE_DISTRIBUTIONS",
  "NoiseStabilityState",
  "default_execution",
  "hessian",
  "noise_stability",
  "noise_stability_gradient",
  "nso",
  "sample_noise",
]
