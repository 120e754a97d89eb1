"""nso_jax: Noise Stability Optimization and Hessian tools for JAX.

Noise stability optimisation (Zhang, Li, Ju, TMLR 2024) trains towards flat
minima by averaging gradients at antithetic weight perturbations ``W +/- U``.

* :func:`noise_stability` and :func:`nso`: the Optax transformation;
* :func:`accumulate`, :func:`check_chain`, :func:`get_sigma`,
  :func:`set_sigma`: composing it with Optax;
* :func:`curvature_readings`: the Hessian's trace read from NSO's own
  perturbed losses, at the cost of one forward pass;
* :func:`tune_sigma`: a ``sigma`` tuned during training towards a target
  relative gap ``(E[L(W + U)] - L(W)) / L(W)``;
* :func:`leafwise`, :func:`filterwise`, :func:`elementwise`: noise
  geometries, a scale per leaf, filter or element (:func:`noise_std`);
* :func:`noise_stability_gradient`: the estimator itself, one call;
* :func:`noise_resolution`: how much of the noise half precision holds;
* :func:`sample_noise`: the pytree noise sampler;
* :func:`skip_nonfinite`: the policy for non-finite gradients;
* :mod:`nso_jax.hessian`: curvature operators, trace estimators and spectra;
* :mod:`nso_jax.batching`: how repeated evaluations (pairs, probes) run;
* :mod:`nso_jax.training`: Flax Linen / NNX helpers and Orbax checkpoints.
"""

from nso_jax import batching
from nso_jax import hessian
from nso_jax._src.estimator import noise_stability_gradient
from nso_jax._src.geometry import NoiseScale
from nso_jax._src.geometry import elementwise
from nso_jax._src.geometry import filterwise
from nso_jax._src.geometry import leafwise
from nso_jax._src.geometry import noise_std
from nso_jax._src.noise import NOISE_DISTRIBUTIONS
from nso_jax._src.noise import NOISE_NAMES
from nso_jax._src.noise import sample_noise
from nso_jax._src.nonfinite import SkipNonfiniteState
from nso_jax._src.nonfinite import skip_nonfinite
from nso_jax._src.precision import noise_resolution
from nso_jax._src.readings import CurvatureReadings
from nso_jax._src.readings import curvature_readings
from nso_jax._src.sigma_tuning import SigmaTuningState
from nso_jax._src.sigma_tuning import tune_sigma
from nso_jax._src.transform import AccumulationState
from nso_jax._src.transform import NoiseStabilityState
from nso_jax._src.transform import accumulate
from nso_jax._src.transform import check_chain
from nso_jax._src.transform import get_sigma
from nso_jax._src.transform import noise_stability
from nso_jax._src.transform import nso
from nso_jax._src.transform import set_sigma

__version__ = "0.1.0"

__all__ = [
  "NOISE_DISTRIBUTIONS",
  "NOISE_NAMES",
  "AccumulationState",
  "CurvatureReadings",
  "NoiseScale",
  "NoiseStabilityState",
  "SigmaTuningState",
  "SkipNonfiniteState",
  "accumulate",
  "batching",
  "check_chain",
  "curvature_readings",
  "elementwise",
  "filterwise",
  "get_sigma",
  "hessian",
  "leafwise",
  "noise_resolution",
  "noise_stability",
  "noise_stability_gradient",
  "noise_std",
  "nso",
  "sample_noise",
  "set_sigma",
  "skip_nonfinite",
  "tune_sigma",
]
