"""Lanczos eigenvalues, power iteration and SLQ densities against dense references.

The test MLP (2,244 parameters, see hessian_testing) has a well-separated top
of the Hessian spectrum, so float32 Lanczos reaches the dense eigenvalues to
1e-4 relative in 30 steps; no float64 is needed. Its most negative
eigenvalues are closer together and need 60 steps; negating the loss turns
the separated top into a separated bottom, reached in 30 steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from nso_jax import batching
from nso_jax import hessian

try:  # the tests directory is a plain folder or, in some layouts, a package
  import hessian_testing as ht
except ImportError:
  from tests import hessian_testing as ht

RTOL = 1e-4


@pytest.fixture(scope="module")
def problem() -> ht.Problem:
  return ht.mlp_problem()


@pytest.fixture(scope="module")
def eigenvalues_fn():
  """hessian.eigenvalues compiled with the data and the key as arguments."""

  def run(loss, params, batch, key, *, num_eigenvalues, which, num_steps):
    return hessian.eigenvalues(
      loss,
      params,
      batch,
      key,
      num_eigenvalues=num_eigenvalues,
      which=which,
      num_steps=num_steps,
    )

  static = ("loss", "num_eigenvalues", "which", "num_steps")
  return jax.jit(run, static_argnames=static)


def relative_error(got, expected) -> float:
  got = np.asarray(got, np.float64)
  return float(np.max(np.abs(got - expected) / np.abs(expected)))


class TestEigenvaluesAgainstDense:
  @pytest.mark.parametrize("seed", [0, 1])
  def test_top_5_in_30_steps(self, problem, eigenvalues_fn, seed):
    got = eigenvalues_fn(
      ht.loss_fn,
      problem.params,
      problem.batch,
      jax.random.key(seed),
      num_eigenvalues=5,
      which="LA",
      num_steps=30,
    )
    assert relative_error(got, problem.eigenvalues[::-1][:5]) <= RTOL

  def test_bottom_5_in_60_steps(self, problem, eigenvalues_fn):
    got = eigenvalues_fn(
      ht.loss_fn,
      problem.params,
      problem.batch,
      jax.random.key(0),
      num_eigenvalues=5,
      which="SA",
      num_steps=60,
    )
    assert relative_error(got, problem.eigenvalues[:5]) <= RTOL

  def test_bottom_5_of_a_separated_bottom_in_30_steps(self, problem, eigenvalues_fn):
    negated = lambda params, batch: -ht.loss_fn(params, batch)
    got = eigenvalues_fn(
      negated,
      problem.params,
      problem.batch,
      jax.random.key(0),
      num_eigenvalues=5,
      which="SA",
      num_steps=30,
    )
    assert relative_error(got, -problem.eigenvalues[::-1][:5]) <= RTOL

  def test_largest_magnitude(self, problem, eigenvalues_fn):
    got = eigenvalues_fn(
      ht.loss_fn,
      problem.params,
      problem.batch,
      jax.random.key(0),
      num_eigenvalues=3,
      which="LM",
      num_steps=40,
    )
    by_magnitude = problem.eigenvalues[np.argsort(-np.abs(problem.eigenvalues))]
    assert relative_error(got, by_magnitude[:3]) <= RTOL

  def test_eigenvectors_are_unit_pytrees_with_small_residuals(self, problem):
    values, vectors = hessian.top_eigenvalues(
      ht.loss_fn,
      problem.params,
      problem.batch,
      0,
      num_eigenvalues=3,
      num_steps=30,
      return_eigenvectors=True,
    )
    assert jax.tree.structure(vectors) == jax.tree.structure(problem.params)
    for leaf, param in zip(
      jax.tree.leaves(vectors), jax.tree.leaves(problem.params), strict=True
    ):
      assert leaf.shape == (3, *param.shape)
    flat = np.stack(
      [
        np.asarray(ravel_pytree(jax.tree.map(lambda x, i=i: x[i], vectors))[0])
        for i in range(3)
      ]
    ).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, rtol=1e-5)
    residuals = problem.hessian @ flat.T - flat.T * np.asarray(values, np.float64)
    # Residual of a Ritz pair bounds its eigenvalue error; the top gap is ~1.
    assert np.max(np.linalg.norm(residuals, axis=0)) <= 1e-2 * abs(float(values[0]))


class TestLanczosTridiag:
  def test_basis_is_orthonormal_and_tridiagonalises(self, problem):
    matvec, template = ht.matrix_operator(problem.hessian)
    v0 = jax.random.normal(jax.random.key(0), template.shape)
    result = jax.jit(hessian.lanczos_tridiag, static_argnums=(0, 2))(
      matvec, v0, 50, jax.random.key(1)
    )
    basis = np.asarray(result.basis, np.float64)
    np.testing.assert_allclose(basis @ basis.T, np.eye(50), atol=1e-5)
    tridiagonal = (
      np.diag(result.diagonal)
      + np.diag(result.off_diagonal, 1)
      + np.diag(result.off_diagonal, -1)
    )
    scale = np.abs(problem.eigenvalues).max()
    np.testing.assert_allclose(
      basis @ problem.hessian @ basis.T, tridiagonal, atol=1e-5 * scale
    )

  def test_invariant_subspace_restarts_without_nan(self):
    # Three distinct eigenvalues: the Krylov space of any start is invariant
    # after three steps. The restart must keep T's eigenvalues on the spectrum.
    diagonal = jnp.repeat(jnp.array([1.0, 2.0, 3.0]), 4)
    result = hessian.lanczos_tridiag(lambda v: diagonal * v, jnp.ones(12), 12, 0)
    ritz = np.linalg.eigvalsh(
      np.diag(result.diagonal)
      + np.diag(result.off_diagonal, 1)
      + np.diag(result.off_diagonal, -1)
    )
    assert np.all(np.isfinite(ritz))
    np.testing.assert_allclose(np.sort(ritz), np.sort(np.asarray(diagonal)), atol=1e-5)
    assert float(result.off_diagonal[2]) == 0.0

  def test_full_dimension_gives_every_eigenvalue(self):
    matrix = ht.decaying_spectrum_matrix(jax.random.key(0), 20, decay=0.5)
    matrix = matrix - 0.5 * np.eye(20)  # some negative eigenvalues too
    got = hessian.lanczos_eigenvalues(
      *ht.matrix_operator(matrix), 0, num_eigenvalues=20, num_steps=20, which="SA"
    )
    np.testing.assert_allclose(got, np.linalg.eigvalsh(matrix), atol=1e-5)


class TestPowerIteration:
  def test_matches_the_largest_eigenvalue(self, problem):
    result = jax.jit(
      lambda params, batch, key: hessian.max_eigenvalue(ht.loss_fn, params, batch, key)
    )(problem.params, problem.batch, jax.random.key(0))
    assert relative_error(result.eigenvalue, problem.eigenvalues[-1]) <= RTOL
    assert 1 <= int(result.num_iters) <= 100
    assert jax.tree.structure(result.eigenvector) == jax.tree.structure(problem.params)

  def test_a_loose_tolerance_stops_early(self):
    diagonal = jnp.linspace(0.0, 1.0, 50)
    result = hessian.power_iteration(
      lambda v: diagonal * v, jnp.zeros(50), 0, num_iters=100, tol=1e-2
    )
    assert int(result.num_iters) < 100

  def test_zero_operator_gives_zero_not_nan(self):
    result = hessian.power_iteration(lambda v: 0 * v, jnp.zeros(5), 0)
    assert float(result.eigenvalue) == 0.0
    assert np.all(np.isfinite(result.eigenvector))


@pytest.fixture(scope="module")
def density(problem):
  return jax.jit(
    lambda params, batch, key: hessian.spectral_density(
      ht.loss_fn,
      params,
      batch,
      key,
      num_probes=8,
      num_steps=60,
      grid=hessian.DensityGrid(size=2000),
    )
  )(problem.params, problem.batch, jax.random.key(0))


class TestSpectralDensity:
  def test_integrates_to_one(self, density):
    grid, values = np.asarray(density.grid), np.asarray(density.density)
    assert np.all(values >= 0)
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-4)

  def test_mean_is_the_normalised_trace(self, density, problem):
    # Per probe, sum_j tau_j theta_j = v^T H v / |v|^2 exactly; its average is
    # an unbiased estimate of tr(H) / n, compared within 3 standard errors
    # over the 8 probes. The density's mean on the grid equals the nodes' mean.
    grid, values = np.asarray(density.grid, np.float64), np.asarray(density.density)
    per_probe = np.sum(np.asarray(density.nodes) * np.asarray(density.weights), axis=1)
    quadrature_mean = per_probe.mean()
    assert np.trapezoid(grid * values, grid) == pytest.approx(
      quadrature_mean, abs=1e-3 * np.abs(problem.eigenvalues).max()
    )
    standard_error = per_probe.std(ddof=1) / np.sqrt(len(per_probe))
    exact = problem.trace / problem.hessian.shape[0]
    assert abs(quadrature_mean - exact) <= 3 * standard_error

  def test_nodes_reach_the_extreme_eigenvalues(self, density, problem):
    nodes = np.asarray(density.nodes)
    assert nodes.max() == pytest.approx(problem.eigenvalues[-1], rel=RTOL)
    assert nodes.min() == pytest.approx(problem.eigenvalues[0], rel=1e-2)
    np.testing.assert_allclose(np.asarray(density.weights).sum(axis=1), 1.0, rtol=1e-5)

  def test_fixed_bounds_and_bandwidth(self):
    diagonal = jnp.linspace(0.0, 1.0, 40)
    density = hessian.stochastic_lanczos_quadrature(
      lambda v: diagonal * v,
      jnp.zeros(40),
      0,
      num_probes=2,
      num_steps=10,
      grid=hessian.DensityGrid(size=50, bounds=(-1.0, 2.0), bandwidth=0.1),
    )
    assert float(density.grid[0]) == -1.0 and float(density.grid[-1]) == 2.0
    assert float(density.bandwidth) == pytest.approx(0.1)

  def test_deterministic_and_independent_of_probe_batching(self):
    diagonal = jnp.linspace(-1.0, 1.0, 40) ** 3
    run = jax.jit(
      lambda key, chunk_size: hessian.stochastic_lanczos_quadrature(
        lambda v: diagonal * v,
        jnp.zeros(40),
        key,
        num_probes=3,
        num_steps=10,
        grid=hessian.DensityGrid(size=50),
        execution=batching.Execution("map", chunk_size=chunk_size),
      ),
      static_argnums=1,
    )
    first, again, batched = run(4, None), run(4, None), run(4, 2)
    assert np.array_equal(first.density, again.density)
    np.testing.assert_allclose(batched.nodes, first.nodes, atol=1e-5)

  def test_plot_uses_a_log_scale(self, density):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ax = hessian.plot_spectral_density(density, plot_kwargs={"color": "k"})
    assert ax.get_yscale() == "log"
    assert len(ax.lines[0].get_xdata()) == density.grid.shape[0]
    matplotlib.pyplot.close(ax.figure)


class TestJitAndDeterminism:
  def test_same_key_bitwise_and_jit_matches_eager(self):
    tiny = ht.tiny_problem()
    run = lambda params, batch, key: hessian.top_eigenvalues(
      ht.loss_fn, params, batch, key, num_eigenvalues=3, num_steps=10
    )
    compiled = jax.jit(run)
    first = compiled(tiny.params, tiny.batch, jax.random.key(1))
    again = compiled(tiny.params, tiny.batch, jax.random.key(1))
    assert np.array_equal(first, again)
    eager = run(tiny.params, tiny.batch, jax.random.key(1))
    np.testing.assert_allclose(first, eager, rtol=1e-5)


class TestValidation:
  def test_more_eigenvalues_than_the_dimension(self):
    message = r"`num_eigenvalues` must be at most the dimension .*\(5\), got 6"
    with pytest.raises(ValueError, match=message):
      hessian.lanczos_eigenvalues(lambda v: v, jnp.zeros(5), 0, num_eigenvalues=6)

  def test_num_steps_below_k(self):
    message = r"`num_steps` must be between num_eigenvalues=4 and .* got 3"
    with pytest.raises(ValueError, match=message):
      hessian.lanczos_eigenvalues(
        lambda v: v, jnp.zeros(10), 0, num_eigenvalues=4, num_steps=3
      )

  def test_unknown_which(self):
    with pytest.raises(ValueError, match=r"`which` must be one of .* got 'BE'"):
      hessian.lanczos_eigenvalues(
        lambda v: v, jnp.zeros(10), 0, num_eigenvalues=1, which="BE"
      )

  def test_tridiag_steps_beyond_the_dimension(self):
    message = r"`num_steps` must be at most the dimension 3"
    with pytest.raises(ValueError, match=message):
      hessian.lanczos_tridiag(lambda v: v, jnp.ones(3), 4, 0)

  def test_tridiag_needs_a_flat_start(self):
    with pytest.raises(ValueError, match=r"`v0` must be a flat vector"):
      hessian.lanczos_tridiag(lambda v: v, jnp.ones((3, 2)), 2, 0)

  @pytest.mark.parametrize(
    ("grid", "error", "message"),
    [
      (hessian.DensityGrid(bandwidth=-1.0), ValueError, r"`grid.bandwidth` must be"),
      (hessian.DensityGrid(bounds=(1.0, 0.0)), ValueError, r"`grid.bounds` must sat"),
      (hessian.DensityGrid(bounds=(1.0,)), ValueError, r"`grid.bounds` must be a"),
      (hessian.DensityGrid(size=1), ValueError, r"`grid.size` must be an int >= 2"),
      (50, TypeError, r"`grid` must be a hessian.DensityGrid"),
    ],
  )
  def test_bad_grid(self, grid, error, message):
    with pytest.raises(error, match=message):
      hessian.stochastic_lanczos_quadrature(lambda v: v, jnp.zeros(4), 0, grid=grid)

  def test_power_iteration_num_iters(self):
    with pytest.raises(ValueError, match=r"`num_iters` must be an int >= 1, got 0"):
      hessian.power_iteration(lambda v: v, jnp.zeros(4), 0, num_iters=0)
