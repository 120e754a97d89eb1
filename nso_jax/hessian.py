"""Hessian toolkit: curvature operators, trace estimators and spectra.

Measure the flatness that Noise Stability Optimization trains for, on any
pytree of parameters and any data set, inside ``jax.jit``. Three layers:

* operators: :func:`hvp`, :func:`hessian_operator`, :func:`ggn_operator`
  (a :class:`LinearOperator` over one batch, a list of batches or
  :class:`StackedBatches`, optionally restricted by ``param_filter``);
* estimators on any symmetric operator: :func:`hutchinson`, :func:`hutch_pp`,
  :func:`xtrace`, :func:`lanczos_eigenvalues`, :func:`lanczos_ritz` (with
  residual bounds), :func:`lanczos_tridiag`,
  :func:`power_iteration` and :func:`stochastic_lanczos_quadrature`;
* one call on a loss: :func:`trace`, :func:`weighted_trace` (the
  trace a noise geometry regularises), :func:`top_eigenvalues`,
  :func:`eigenvalues`, :func:`max_eigenvalue`, :func:`spectral_density`,
  :func:`hessian_diagonal`, :func:`hessian_frobenius_norm`, and the Fisher
  and Gauss-Newton traces :func:`empirical_fisher_trace`,
  :func:`fisher_trace`, :func:`ggn_trace`;

:func:`plot_spectral_density` to draw a density (evaluated on a
:class:`DensityGrid`); loss landscapes, the loss on a line or a plane
through the parameters (:func:`loss_landscape` along
:func:`filter_normalized_direction` or :func:`eigenvector_directions`,
drawn by :func:`plot_loss_landscape`); and the NSO paper's own
flatness measures, also one call on a loss: :func:`noise_stability_measure`,
:func:`layer_hessian_measure`, :func:`direction_curvature`,
:func:`layer_traces` and :func:`trace_bound_term` (the trace term of its
generalisation bound).

Every function that repeats an evaluation (probes, noise draws, layers)
takes one ``execution`` value, a :class:`nso_jax.batching.Execution` or a
strategy name; inside :func:`jax.shard_map`, ``Execution(axis=...)`` splits
that work over the devices of a mesh axis, while ``data_axis`` says over
which axis the data, and so the loss, are split.

The estimators run their loops as ``lax.scan``/``lax.while_loop``, which an
eager call compiles anew each time: wrap repeated measurements in
``jax.jit`` with the parameters and the key as arguments.
"""

from nso_jax._src.curvature_measures import FrobeniusEstimate
from nso_jax._src.curvature_measures import eigenvalues
from nso_jax._src.curvature_measures import hessian_frobenius_norm
from nso_jax._src.curvature_measures import max_eigenvalue
from nso_jax._src.curvature_measures import spectral_density
from nso_jax._src.curvature_measures import top_eigenvalues
from nso_jax._src.curvature_measures import trace
from nso_jax._src.curvature_measures import weighted_trace
from nso_jax._src.data_plans import StackedBatches
from nso_jax._src.diagonal import DiagonalEstimate
from nso_jax._src.diagonal import hessian_diagonal
from nso_jax._src.fisher import empirical_fisher_trace
from nso_jax._src.fisher import fisher_trace
from nso_jax._src.fisher import ggn_trace
from nso_jax._src.lanczos import DensityGrid
from nso_jax._src.lanczos import PowerIterationResult
from nso_jax._src.lanczos import RitzValues
from nso_jax._src.lanczos import SpectralDensity
from nso_jax._src.lanczos import Tridiagonal
from nso_jax._src.lanczos import lanczos_eigenvalues
from nso_jax._src.lanczos import lanczos_ritz
from nso_jax._src.lanczos import lanczos_tridiag
from nso_jax._src.lanczos import power_iteration
from nso_jax._src.lanczos import stochastic_lanczos_quadrature
from nso_jax._src.landscape import LossLandscape
from nso_jax._src.landscape import eigenvector_directions
from nso_jax._src.landscape import filter_normalized_direction
from nso_jax._src.landscape import loss_landscape
from nso_jax._src.operators import LinearOperator
from nso_jax._src.operators import ggn_operator
from nso_jax._src.operators import hessian_operator
from nso_jax._src.operators import hvp
from nso_jax._src.paper_measures import NoiseStabilityEstimate
from nso_jax._src.paper_measures import TraceBound
from nso_jax._src.paper_measures import direction_curvature
from nso_jax._src.paper_measures import layer_hessian_measure
from nso_jax._src.paper_measures import layer_traces
from nso_jax._src.paper_measures import noise_stability_measure
from nso_jax._src.paper_measures import trace_bound_term
from nso_jax._src.plotting import plot_loss_landscape
from nso_jax._src.plotting import plot_spectral_density
from nso_jax._src.stochastic_trace import TraceEstimate
from nso_jax._src.stochastic_trace import hutch_pp
from nso_jax._src.stochastic_trace import hutchinson
from nso_jax._src.stochastic_trace import xtrace

__all__ = [
  "DensityGrid",
  "DiagonalEstimate",
  "FrobeniusEstimate",
  "LinearOperator",
  "LossLandscape",
  "NoiseStabilityEstimate",
  "PowerIterationResult",
  "RitzValues",
  "SpectralDensity",
  "StackedBatches",
  "TraceBound",
  "TraceEstimate",
  "Tridiagonal",
  "direction_curvature",
  "eigenvalues",
  "eigenvector_directions",
  "empirical_fisher_trace",
  "filter_normalized_direction",
  "fisher_trace",
  "ggn_operator",
  "ggn_trace",
  "hessian_diagonal",
  "hessian_frobenius_norm",
  "hessian_operator",
  "hutch_pp",
  "hutchinson",
  "hvp",
  "lanczos_eigenvalues",
  "lanczos_ritz",
  "lanczos_tridiag",
  "layer_hessian_measure",
  "layer_traces",
  "loss_landscape",
  "max_eigenvalue",
  "noise_stability_measure",
  "plot_loss_landscape",
  "plot_spectral_density",
  "power_iteration",
  "spectral_density",
  "stochastic_lanczos_quadrature",
  "top_eigenvalues",
  "trace",
  "trace_bound_term",
  "weighted_trace",
  "xtrace",
]
