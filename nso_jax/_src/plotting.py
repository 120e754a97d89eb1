"""Plots of curvature measurements (matplotlib, imported only when called)."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from nso_jax._src.lanczos import SpectralDensity
from nso_jax._src.landscape import LossLandscape


def _pyplot(caller: str) -> Any:
  """``matplotlib.pyplot``, or an ImportError saying how to install it."""
  try:
    import matplotlib.pyplot as plt  # optional dependency
  except ImportError as error:
    raise ImportError(
      f"{caller} needs matplotlib: pip install 'nso_jax[cli]' or pip install "
      "matplotlib."
    ) from error
  return plt


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
  plt = _pyplot("plot_spectral_density")
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


def _as_landscapes(landscapes: Any) -> list[LossLandscape]:
  """One landscape or a sequence of them, all of one dimension, checked."""
  many = [landscapes] if isinstance(landscapes, LossLandscape) else list(landscapes)
  if not many or not all(isinstance(x, LossLandscape) for x in many):
    raise ValueError(
      "`landscapes` must be a LossLandscape or a non-empty sequence of them, "
      f"got {landscapes!r:.200}."
    )
  dims = {len(x.coordinates) for x in many}
  if len(dims) > 1:
    raise ValueError(
      "`landscapes` mixes 1-D and 2-D landscapes (dimensions "
      f"{[len(x.coordinates) for x in many]}); expected one dimension for all."
    )
  return many


def _labels(labels: Sequence[str] | None, count: int) -> list[str | None]:
  if labels is None:
    return [None] * count
  if isinstance(labels, str) or len(labels) != count:
    raise ValueError(
      f"`labels` must be a sequence of {count} strings, one per landscape, "
      f"got {labels!r}."
    )
  return list(labels)


def _contour_levels(
  losses: Sequence[np.ndarray], levels: int | Sequence[float], log_scale: bool
) -> np.ndarray:
  """Shared contour levels: ``levels`` values, or that many over all losses."""
  if not isinstance(levels, int):
    return np.asarray(levels, dtype=float)
  low = min(float(np.min(x)) for x in losses)
  high = max(float(np.max(x)) for x in losses)
  if log_scale:
    low = max(low, 1e-12)
    return np.geomspace(low, max(high, low * 1.001), levels)
  return np.linspace(low, max(high, low + 1e-12), levels)


def _plot_contours(
  plt: Any,
  landscapes: list[LossLandscape],
  ax: Any,
  labels: list[str | None],
  levels: np.ndarray,
  log_scale: bool,
) -> list[Any]:
  """One filled contour panel per landscape, on shared levels and axes."""
  from matplotlib import colors
  from matplotlib import ticker

  if ax is None:
    _, ax = plt.subplots(
      1, len(landscapes), figsize=(4.2 * len(landscapes) + 1, 3.8), sharex=True,
      sharey=True, squeeze=False,
    )  # fmt: skip
  axes = list(np.ravel(ax)) if isinstance(ax, (Sequence, np.ndarray)) else [ax]
  if len(axes) != len(landscapes):
    raise ValueError(
      f"`ax` holds {len(axes)} Axes, expected {len(landscapes)}: one per 2-D landscape."
    )
  norm = colors.LogNorm(levels[0], levels[-1]) if log_scale else None
  for axis, landscape, label in zip(axes, landscapes, labels, strict=True):
    a, b = (np.asarray(c) for c in landscape.coordinates)
    losses = np.asarray(landscape.losses, dtype=float)
    filled = axis.contourf(a, b, losses.T, levels=levels, norm=norm, extend="both")
    axis.contour(a, b, losses.T, levels=levels, colors="k", linewidths=0.4)
    axis.plot([0], [0], "w+", markersize=8)
    axis.set(xlabel="a (direction 1)", ylabel="b (direction 2)")
    if label is not None:
      axis.set_title(label)
  ticks = levels[:: max(1, len(levels) // 8)]
  bar = axes[0].figure.colorbar(filled, ax=axes, label="loss", ticks=ticks)
  bar.ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
  bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  return axes


def plot_loss_landscape(
  landscapes: LossLandscape | Sequence[LossLandscape],
  ax: Any = None,
  *,
  labels: Sequence[str] | None = None,
  levels: int | Sequence[float] = 20,
  log_scale: bool = False,
  plot_kwargs: Mapping[str, Any] | None = None,
) -> Any:
  """Plots loss landscapes: 1-D curves on one Axes, or 2-D contour panels.

  Several landscapes, such as those of an SGD and an NSO minimum along
  directions drawn with the same key, are drawn for comparison: 1-D ones as
  curves of the loss against the coordinate on the same Axes; 2-D ones as
  filled contour plots side by side, sharing their axes and their contour
  levels (and one colour bar), the centre :math:`W` marked ``+``.

  Matplotlib is an optional dependency (the ``cli`` extra); it is imported
  only when this function is called.

  Args:
    landscapes: a :class:`~nso_jax.hessian.LossLandscape` or a sequence of
      them, all 1-D or all 2-D.
    ax: a matplotlib ``Axes`` (1-D), or a sequence of ``Axes``, one per 2-D
      landscape; ``None`` creates a new figure.
    labels: one legend entry (1-D) or title (2-D) per landscape.
    levels: 2-D only: the number of contour levels spread over the losses of
      all the landscapes, or the levels themselves.
    log_scale: a logarithmic loss axis (1-D) or geometric contour levels
      with a logarithmic colour scale (2-D): a minimum's low loss and the
      walls around it show together.
    plot_kwargs: 1-D only: keyword arguments for every ``ax.plot`` (a line's
      ``linestyle``, ``marker``, ...).

  Returns:
    The ``Axes`` of the curves (1-D), or a list of the ``Axes``, one per
    landscape (2-D); ``.figure`` gives the figure.

  Raises:
    ValueError: for no landscapes, 1-D and 2-D ones mixed, or labels or
      Axes not one per landscape.

  Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import jax.numpy as jnp
    >>> from nso_jax import hessian
    >>> loss = lambda w, x: 0.5 * jnp.mean(jnp.sum(x * w ** 2, axis=-1))
    >>> sharp, flat = jnp.array([[4.0]]), jnp.array([[1.0]])
    >>> slices = [hessian.loss_landscape(loss, jnp.zeros(1), x, jnp.ones(1))
    ...           for x in (sharp, flat)]
    >>> ax = hessian.plot_loss_landscape(slices, labels=["sharp", "flat"])
    >>> ax.get_xlabel()
    'a (distance along the direction)'

  References:
    Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of
    Neural Nets", NeurIPS 2018.
  """
  plt = _pyplot("plot_loss_landscape")
  many = _as_landscapes(landscapes)
  names = _labels(labels, len(many))
  if len(many[0].coordinates) == 2:
    losses = [np.asarray(x.losses, dtype=float) for x in many]
    shared = _contour_levels(losses, levels, log_scale)
    return _plot_contours(plt, many, ax, names, shared, log_scale)
  if ax is None:
    _, ax = plt.subplots()
  for landscape, label in zip(many, names, strict=True):
    (a,) = landscape.coordinates
    ax.plot(np.asarray(a), np.asarray(landscape.losses), label=label,
            **(plot_kwargs or {}))  # fmt: skip
  ax.set(xlabel="a (distance along the direction)", ylabel="loss")
  if log_scale:
    ax.set_yscale("log")
  if labels is not None:
    ax.legend()
  return ax
