"""Hessian toolkit: curvature operators, trace estimators and spectra.

Measure the flatness that Noise Stability Optimization trains for, on any
pytree of parameters and any data set, inside ``jax.jit``:

* one call on a loss: :func:`trace`, :func:`top_eigenvalues`,
  :func:`eigenvalues`, :func:`max_eigenvalue`, :func:`spectral_density`;
* operators: :func:`hvp`, :func:`hessian_operator`, :func:`ggn_operator`
  (a :class:`LinearOperator` over one batch, a list of batches or
  :class:`StackedBatches`, optionally restricted by ``param_filter``);
* estimators on any symmetric operator: :func:`hutchinson`, :func:`hutch_pp`,
  :func:`xtrace`, :func:`lanczos_eigenvalues`, :func:`lanczos_tridiag`,
  :func:`power_iteration`, :func:`stochastic_lanczos_quadrature` and
  :func:`plot_spectral_density`.

The estimators run their loops as ``lax.scan``/``lax.while_loop``, which an
eager call compiles anew each time: wrap repeated measurements in
``jax.jit`` with the parameters and the key as arguments.
"""

from nso_jax._src.hessian import LinearOperator as LinearOperator
from nso_jax._src.hessian import StackedBatches as StackedBatches
from nso_jax._src.hessian import eigenvalues as eigenvalues
from nso_jax._src.hessian import ggn_operator as ggn_operator
from nso_jax._src.hessian import hessian_operator as hessian_operator
from nso_jax._src.hessian import hvp as hvp
from nso_jax._src.hessian import max_eigenvalue as max_eigenvalue
from nso_jax._src.hessian import spectral_density as spectral_density
from nso_jax._src.hessian import top_eigenvalues as top_eigenvalues
from nso_jax._src.hessian import trace as trace
from nso_jax._src.lanczos import PowerIterationResult as PowerIterationResult
from nso_jax._src.lanczos import SpectralDensity as SpectralDensity
from nso_jax._src.lanczos import Tridiagonal as Tridiagonal
from nso_jax._src.lanczos import lanczos_eigenvalues as lanczos_eigenvalues
from nso_jax._src.lanczos import lanczos_tridiag as lanczos_tridiag
from nso_jax._src.lanczos import plot_spectral_density as plot_spectral_density
from nso_jax._src.lanczos import power_iteration as power_iteration
from nso_jax._src.lanczos import (
  stochastic_lanczos_quadrature as stochastic_lanczos_quadrature,
)
from nso_jax._src.trace import TraceEstimate as TraceEstimate
from nso_jax._src.trace import hutch_pp as hutch_pp
from nso_jax._src.trace import hutchinson as hutchinson
from nso_jax._src.trace import xtrace as xtrace

__all__ = [
  "LinearOperator",
  "PowerIterationResult",
  "SpectralDensity",
  "StackedBatches",
  "TraceEstimate",
  "Tridiagonal",
  "eigenvalues",
  "ggn_operator",
  "hessian_operator",
  "hutch_pp",
  "hutchinson",
  "hvp",
  "lanczos_eigenvalues",
  "lanczos_tridiag",
  "max_eigenvalue",
  "plot_spectral_density",
  "power_iteration",
  "spectral_density",
  "stochastic_lanczos_quadrature",
  "top_eigenvalues",
  "trace",
  "xtrace",
]
