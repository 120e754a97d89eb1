"""Trace estimators: unbiasedness, calibrated error bars, budgets, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nso_jax import batching
from nso_jax import hessian

try:  # the tests directory is a plain folder or, in some layouts, a package
  import hessian_testing as ht
except ImportError:
  from tests import hessian_testing as ht

ESTIMATORS = {
  "hutchinson": hessian.hutchinson,
  "hutch++": hessian.hutch_pp,
  "xtrace": hessian.xtrace,
}


@pytest.fixture(scope="module")
def problem() -> ht.Problem:
  return ht.mlp_problem()


@pytest.fixture(scope="module")
def mlp_operator(problem) -> hessian.LinearOperator:
  return hessian.hessian_operator(ht.loss_fn, problem.params, problem.batch)


@pytest.fixture(scope="module")
def tiny_operator() -> hessian.LinearOperator:
  tiny = ht.tiny_problem()
  return hessian.hessian_operator(ht.loss_fn, tiny.params, tiny.batch)


def replicate(estimator, matvec, template, num_replicates, **options):
  """Runs ``estimator`` under ``num_replicates`` keys in one compiled program."""

  @jax.jit
  def run(keys):
    return jax.lax.map(lambda k: estimator(matvec, template, k, **options), keys)

  keys = jax.random.split(jax.random.key(1234), num_replicates)
  result = run(keys)
  return (
    np.asarray(result.value, np.float64),
    np.asarray(result.stderr, np.float64),
  )


def test_hutchinson_is_exact_on_a_diagonal_with_rademacher_probes():
  diagonal = jnp.arange(1.0, 51.0)
  estimate = hessian.hutchinson(lambda v: diagonal * v, jnp.zeros(50), 0, num_matvecs=3)
  assert float(estimate.value) == pytest.approx(float(diagonal.sum()), rel=1e-6)
  assert float(estimate.stderr) == 0.0
  assert int(estimate.num_matvecs) == 3


def exact_hutchinson_variance(matrix: np.ndarray, probe: str, num: int) -> float:
  """Var of the num-probe Hutchinson mean: 2 sum_{i != j} A_ij^2 / num for
  Rademacher probes, 2 ||A||_F^2 / num for Gaussian ones."""
  frobenius = np.sum(matrix**2)
  if probe == "rademacher":
    frobenius -= np.sum(np.diag(matrix) ** 2)
  return 2 * frobenius / num


@pytest.fixture(scope="module")
def replicates(request, mlp_operator):
  """Independent estimates (and their stderrs) of each estimator, 12 matvecs."""
  num_replicates = 400 if ht.full_scale(request) else 100
  runs = {
    name: replicate(estimator, *mlp_operator, num_replicates, num_matvecs=12)
    for name, estimator in ESTIMATORS.items()
  }
  runs["hutchinson-normal"] = replicate(
    hessian.hutchinson,
    *mlp_operator,
    num_replicates,
    num_matvecs=12,
    probe="normal",
  )
  return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", [*sorted(ESTIMATORS), "hutchinson-normal"])
def test_estimators_are_unbiased(replicates, problem, name):
  # The mean of the independent estimates is within 3 of its standard errors
  # (sample std / sqrt(number of replicates)) of the exact trace.
  values, _ = replicates[name]
  standard_error_of_mean = values.std(ddof=1) / np.sqrt(len(values))
  assert abs(values.mean() - problem.trace) <= 3 * standard_error_of_mean


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["rademacher", "normal"])
def test_hutchinson_stderr_matches_the_exact_variance(replicates, problem, probe):
  # stderr^2 is an unbiased estimate of the estimator's variance, known in
  # closed form from the dense Hessian; compared within 3 standard errors of
  # the mean of the replicated stderr^2.
  name = "hutchinson" if probe == "rademacher" else "hutchinson-normal"
  _, stderrs = replicates[name]
  exact = exact_hutchinson_variance(problem.hessian, probe, 12)
  tolerance = 3 * (stderrs**2).std(ddof=1) / np.sqrt(len(stderrs))
  assert abs(np.mean(stderrs**2) - exact) <= tolerance


@pytest.mark.slow
def test_hutch_pp_stderr_is_calibrated(replicates, problem):
  # E[stderr^2] = Var(estimate) (the low-rank part is exact given the sketch,
  # so all the variance is the Hutchinson part's), and E[(estimate - trace)^2]
  # is the same variance: their paired difference has mean zero, within 3
  # standard errors.
  values, stderrs = replicates["hutch++"]
  paired = stderrs**2 - (values - problem.trace) ** 2
  assert abs(paired.mean()) <= 3 * paired.std(ddof=1) / np.sqrt(len(values))


@pytest.mark.slow
def test_xtrace_stderr_is_the_right_order_of_magnitude(replicates, problem):
  # XTrace's error estimate (the paper's std(t_i) / sqrt(s)) treats the
  # leave-one-out estimates as independent though they share probes: it is a
  # heuristic, measured here about 12% optimistic in standard deviation. Check
  # that the mean stderr^2 is within a factor 2 of the mean squared error.
  values, stderrs = replicates["xtrace"]
  ratio = np.mean(stderrs**2) / np.mean((values - problem.trace) ** 2)
  assert 0.5 <= ratio <= 2.0


@pytest.mark.slow
def test_sketching_estimators_beat_hutchinson_on_a_decaying_spectrum(request):
  # Eigenvalues j^-2: a few directions carry most of the trace, the setting
  # Hutch++ and XTrace are built for. Equal budget of 30 matvecs each.
  num_replicates = 200 if ht.full_scale(request) else 60
  matrix = ht.decaying_spectrum_matrix(jax.random.key(3), 300, decay=2.0)
  exact = float(np.trace(matrix))
  operator = ht.matrix_operator(matrix)
  rmse = {}
  for name, estimator in ESTIMATORS.items():
    values, _ = replicate(estimator, *operator, num_replicates, num_matvecs=30)
    rmse[name] = np.sqrt(np.mean((values - exact) ** 2)) / exact
  assert rmse["hutch++"] < 0.5 * rmse["hutchinson"], rmse
  assert rmse["xtrace"] < 0.5 * rmse["hutchinson"], rmse
  assert rmse["xtrace"] <= rmse["hutch++"], rmse


def test_sketching_estimators_are_exact_when_the_sketch_spans_the_space():
  matrix = ht.decaying_spectrum_matrix(jax.random.key(0), 6, decay=1.0)
  operator = ht.matrix_operator(matrix)
  both = jax.jit(
    lambda key: [
      estimator(*operator, key, num_matvecs=18)
      for estimator in (hessian.hutch_pp, hessian.xtrace)
    ]
  )
  for estimate in both(0):
    assert float(estimate.value) == pytest.approx(np.trace(matrix), rel=1e-5)
    assert float(estimate.stderr) == pytest.approx(0.0, abs=1e-5)


def test_xtrace_on_an_exactly_low_rank_matrix_is_exact_without_nan():
  basis = jax.random.normal(jax.random.key(0), (100, 3))
  matrix = np.asarray(basis @ basis.T, np.float64)
  estimate = hessian.xtrace(*ht.matrix_operator(matrix), 1, num_matvecs=20)
  assert np.isfinite(float(estimate.value)) and np.isfinite(float(estimate.stderr))
  assert float(estimate.value) == pytest.approx(np.trace(matrix), rel=1e-4)


def test_hutch_pp_and_xtrace_report_the_matvecs_they_spend():
  operator = ht.matrix_operator(np.eye(40))
  hutch_pp, xtrace = jax.jit(
    lambda key: (
      hessian.hutch_pp(*operator, key, num_matvecs=10),
      hessian.xtrace(*operator, key, num_matvecs=11),
    )
  )(0)
  assert int(hutch_pp.num_matvecs) == 10
  assert int(xtrace.num_matvecs) == 10


def test_single_sample_has_infinite_stderr_not_nan():
  matrix = ht.decaying_spectrum_matrix(jax.random.key(0), 10, decay=1.0)
  estimate = hessian.hutchinson(*ht.matrix_operator(matrix), 0, num_matvecs=1)
  assert np.isinf(float(estimate.stderr))


def test_probes_are_drawn_leaf_by_leaf_in_each_dtype():
  template = {"a": jnp.zeros((3, 2), jnp.bfloat16), "b": jnp.zeros(4, jnp.float32)}
  seen = []

  def matvec(v):
    seen.append(jax.tree.map(lambda x: x.dtype, v))
    return v

  estimate = hessian.hutchinson(matvec, template, 0, num_matvecs=4)
  assert seen[0] == {"a": jnp.bfloat16, "b": jnp.float32}
  assert float(estimate.value) == pytest.approx(10.0)


class TestEarlyStopping:
  def test_equals_the_fixed_budget_estimate_on_the_probes_used(self, tiny_operator):
    stopped = hessian.hutchinson(*tiny_operator, 7, num_matvecs=100, rtol=1e-2)
    used = int(stopped.num_matvecs)
    assert 2 <= used < 100
    fixed = hessian.hutchinson(*tiny_operator, 7, num_matvecs=used)
    np.testing.assert_allclose(stopped.value, fixed.value, rtol=1e-5)
    np.testing.assert_allclose(stopped.stderr, fixed.stderr, rtol=1e-3)

  def test_does_not_depend_on_the_chunks(self, tiny_operator):
    every_execution = jax.jit(
      lambda key: [
        hessian.hutchinson(*tiny_operator, key, num_matvecs=100, rtol=1e-2, **options)
        for options in (
          {},
          dict(execution=batching.Execution("map", chunk_size=16)),
          dict(execution="vmap"),
        )
      ]
    )
    results = every_execution(7)
    for result in results[1:]:
      assert int(result.num_matvecs) == int(results[0].num_matvecs)
      np.testing.assert_allclose(result.value, results[0].value, rtol=1e-5)

  def test_zero_tolerance_spends_the_whole_budget(self, tiny_operator):
    result = hessian.hutchinson(*tiny_operator, 7, num_matvecs=9, rtol=0.0)
    assert int(result.num_matvecs) == 9

  def test_uses_a_while_loop_inside_the_compiled_program(self, tiny_operator):
    jaxpr = jax.make_jaxpr(
      lambda key: hessian.hutchinson(*tiny_operator, key, num_matvecs=50, rtol=1e-3)
    )(jax.random.key(0))
    assert "while" in str(jaxpr)


@pytest.fixture(scope="module")
def jitted(tiny_operator):
  """Each estimator compiled once, with the key as a traced argument."""
  return {
    name: jax.jit(lambda key, e=estimator: e(*tiny_operator, key, num_matvecs=9))
    for name, estimator in ESTIMATORS.items()
  }


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
class TestJitAndDeterminism:
  def test_same_key_gives_bitwise_identical_results(self, name, jitted):
    first = jitted[name](jax.random.key(5))
    second = jitted[name](jax.random.key(5))
    other = jitted[name](jax.random.key(6))
    assert np.array_equal(first.value, second.value)
    assert np.array_equal(first.stderr, second.stderr)
    assert not np.array_equal(first.value, other.value)

  def test_jit_agrees_with_eager(self, name, jitted, tiny_operator):
    eager = ESTIMATORS[name](*tiny_operator, jax.random.key(5), num_matvecs=9)
    compiled = jitted[name](jax.random.key(5))
    np.testing.assert_allclose(compiled.value, eager.value, rtol=1e-5)
    np.testing.assert_allclose(compiled.stderr, eager.stderr, rtol=1e-4, atol=1e-6)
    assert int(compiled.num_matvecs) == int(eager.num_matvecs)

  @pytest.mark.parametrize(
    "options",
    [
      dict(execution=batching.Execution("map", chunk_size=4)),
      dict(execution="vmap"),
      dict(execution="unroll"),
    ],
  )
  def test_every_execution_agrees_with_one_at_a_time(
    self, name, jitted, tiny_operator, options
  ):
    batched = jax.jit(
      lambda key: ESTIMATORS[name](*tiny_operator, key, num_matvecs=9, **options)
    )(jax.random.key(2))
    single = jitted[name](jax.random.key(2))
    np.testing.assert_allclose(batched.value, single.value, rtol=1e-5)


def test_int_seed_typed_key_and_legacy_key_agree(jitted):
  from_key = jitted["hutchinson"](jax.random.key(3))
  assert np.array_equal(jitted["hutchinson"](3).value, from_key.value)
  from_legacy = jitted["hutchinson"](jax.random.PRNGKey(3))
  assert np.array_equal(from_legacy.value, from_key.value)


class TestValidation:
  @pytest.mark.parametrize(
    ("estimator", "minimum"),
    [(hessian.hutchinson, 1), (hessian.hutch_pp, 3), (hessian.xtrace, 2)],
  )
  def test_too_few_matvecs(self, estimator, minimum):
    message = rf"`num_matvecs` must be an int >= {minimum}, got 0"
    with pytest.raises(ValueError, match=message):
      estimator(lambda v: v, jnp.zeros(3), 0, num_matvecs=0)

  def test_unknown_probe(self):
    with pytest.raises(ValueError, match=r"`probe` must be one of .*got 'sphere'"):
      hessian.hutchinson(lambda v: v, jnp.zeros(3), 0, num_matvecs=2, probe="sphere")

  def test_negative_rtol(self):
    with pytest.raises(ValueError, match=r"`rtol` must be a finite float >= 0"):
      hessian.hutchinson(lambda v: v, jnp.zeros(3), 0, num_matvecs=2, rtol=-1.0)

  def test_bad_execution(self):
    with pytest.raises(ValueError, match=r"`execution` must be one of .*got 'pmap'"):
      hessian.xtrace(lambda v: v, jnp.zeros(3), 0, num_matvecs=2, execution="pmap")
    with pytest.raises(TypeError, match=r"`execution` must be a batching.Execution"):
      hessian.hutch_pp(lambda v: v, jnp.zeros(3), 0, num_matvecs=3, execution=4)

  def test_rtol_cannot_split_the_probes_over_a_mesh_axis(self):
    with pytest.raises(ValueError, match=r"`rtol` stops after a data-dependent"):
      hessian.hutchinson(
        lambda v: v,
        jnp.zeros(3),
        0,
        num_matvecs=4,
        rtol=1e-3,
        execution=batching.Execution(axis="probes"),
      )

  def test_empty_template(self):
    with pytest.raises(ValueError, match=r"`template` is an empty pytree"):
      hessian.hutchinson(lambda v: v, {}, 0, num_matvecs=2)

  def test_integer_template(self):
    with pytest.raises(TypeError, match=r"leaf \['n'\] has dtype int32"):
      hessian.xtrace(lambda v: v, {"n": jnp.zeros(3, jnp.int32)}, 0, num_matvecs=4)

  def test_missing_key(self):
    with pytest.raises(ValueError, match=r"`key` is required"):
      hessian.hutchinson(lambda v: v, jnp.zeros(3), None, num_matvecs=2)


def test_low_precision_parameters_work_with_every_estimator():
  # H = diag(2 x) for a bfloat16 parameter vector; linear algebra runs in f32.
  x = jnp.linspace(0.1, 2.0, 40)
  loss = lambda w, x: jnp.sum(x * w.astype(jnp.float32) ** 2)
  w = jnp.ones(40, jnp.bfloat16)
  exact = float(2 * x.sum())
  methods = ("hutchinson", "hutch++", "xtrace")

  @jax.jit
  def estimates(w):
    """Every estimator in one compiled program."""
    traces = {
      method: hessian.trace(loss, w, x, 0, num_matvecs=30, method=method)
      for method in methods
    }
    top = hessian.top_eigenvalues(loss, w, x, 0, num_eigenvalues=2, num_steps=20)
    density = hessian.spectral_density(
      loss, w, x, 0, num_steps=10, grid=hessian.DensityGrid(size=50)
    )
    return traces, top, density.density

  traces, top, density = estimates(w)
  for method in methods:
    estimate = traces[method]
    assert estimate.value.dtype == jnp.float32
    # Within 4 reported standard errors, plus bfloat16 rounding of the HVPs.
    assert (
      abs(float(estimate.value) - exact) <= 4 * float(estimate.stderr) + 0.02 * exact
    )
  np.testing.assert_allclose(top, [4.0, 2 * float(x[-2])], rtol=2e-2)
  assert bool(jnp.all(jnp.isfinite(density)))


def test_xtrace_keeps_a_small_full_rank_tail():
  # Five sharp eigenvalues and a tiny tail: R is near-singular in float32 but
  # the operator is full rank, so the tail's 0.3 must not be dropped.
  diagonal = jnp.concatenate([jnp.arange(10.0, 5.0, -1.0), jnp.full(200_000, 1.5e-6)])
  estimator = jax.jit(
    lambda key: hessian.xtrace(
      lambda v: diagonal * v, jnp.zeros(diagonal.shape), key, num_matvecs=20
    )
  )
  truth = float(diagonal.sum())
  for seed in range(4):
    estimate = estimator(jax.random.key(seed))
    # The tail is kept (the dropped-tail answer was 40.0 with zero error), and
    # the estimate lies within its error bar (float32 rounding aside).
    assert abs(float(estimate.value) - 40.0) > 0.1 or float(estimate.stderr) > 0.1
    error = abs(float(estimate.value) - truth)
    assert error <= 3 * float(estimate.stderr) + 1e-5 * truth
