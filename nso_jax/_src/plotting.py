"""Plots of curvature measurements (matplotlib, imported only when called)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from nso_jax._src.lanczos import SpectralDensity


def plot_spectral_density(
  density: SpectralDensity,
  ax: Any = None,
  *,
  floor: float | None = None,
  plot_kwargs: Mapping[str, Any] | None = None,
) -> Any:
  """Plots a :class:`SpectralDensity` on a logarithmic density axis.

  Matplotlib is an optional dependency (the ``cli`` extra); it is imported
  only when this function is called.

  Args:
    density: the result of :func:`~nso_jax.hessian.stochastic_lanczos_quadrature` or
      :func:`nso_jax.hessian.spectral_density`.
    ax: a matplotlib ``Axes``; ``None`` creates a new figure.
    floor: the smallest density drawn (a log axis cannot show zero); ``None``
      uses ``1e-8`` times the peak.
    plot_kwargs: keyword arguments for ``ax.semilogy`` (a line's ``color``,
      ``label``, ...).

  Returns:
    The ``Axes``.

  Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> density = hessian.stochastic_lanczos_quadrature(
    ...     lambda v: jnp.linspace(0.0, 1.0, 50) * v, jnp.zeros(50), key=0,
    ...     num_steps=10, grid=hessian.DensityGrid(size=100))
    >>> ax = hessian.plot_spectral_density(density)
    >>> ax.get_yscale()
    'log'
  """
  try:
    import matplotlib.pyplot as plt  # optional dependency
  except ImportError as error:
    raise ImportError(
      "plot_spectral_density needs matplotlib: pip install 'nso_jax[cli]' or "
      "pip install matplotlib."
    ) from error
  grid = np.asarray(density.grid)
  values = np.asarray(density.density)
  if floor is None:
    floor = 1e-8 * float(values.max()) if values.max() > 0 else 1e-12
  if ax is None:
    _, ax = plt.subplots()
  ax.semilogy(grid, np.maximum(values, floor), **(plot_kwargs or {}))
  ax.set_xlabel("eigenvalue")
  ax.set_ylabel("density")
  return ax
