"""The validation kit: one exception type per fault, one message style."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nso_jax._src import checks


class TestCheckScalar:
  @pytest.mark.parametrize(
    "value",
    [0.1, 1, np.float32(0.1), np.float64(0.5), jnp.float32(0.2), jnp.array(3.0)],
  )
  def test_accepts_python_numpy_and_jax_scalars(self, value):
    assert checks.check_scalar(value, "sigma", minimum=0.0) is value

  @pytest.mark.parametrize(
    "value",
    [
      float("nan"),
      np.float32(np.nan),
      jnp.float32(jnp.inf),
      -0.1,
      np.float64(-0.5),
      jnp.array(-1.0),
      "big",
      None,
      True,
      np.bool_(False),
      jnp.ones(2),
      [0.1],
    ],
  )
  def test_refuses_nonfinite_negative_and_non_scalars(self, value):
    with pytest.raises(ValueError, match=r"^`sigma` must be a finite float >= 0, got"):
      checks.check_scalar(value, "sigma", minimum=0.0)

  def test_interval_in_the_message(self):
    with pytest.raises(ValueError, match=r"`w` must be a finite float in \[0, 1\]"):
      checks.check_scalar(1.5, "w", minimum=0.0, maximum=1.0)
    with pytest.raises(ValueError, match=r"`b` must be a finite float > 0, got 0.0"):
      checks.check_scalar(0.0, "b", minimum=0.0, open_minimum=True)

  def test_traced_scalar_passes_through_and_traced_array_is_refused(self):
    seen = []
    jax.jit(lambda s: seen.append(checks.check_scalar(s, "sigma", minimum=0.0)))(1.0)
    assert checks.is_traced(seen[0])
    with pytest.raises(ValueError, match=r"`sigma` .* traced value of shape \(2,\)"):
      jax.jit(lambda s: checks.check_scalar(s, "sigma"))(jnp.ones(2))


class TestIntsChoicesBools:
  @pytest.mark.parametrize("value", [3, np.int64(3), jnp.int32(3), np.array(3)])
  def test_positive_int_accepts_integer_kinds(self, value):
    assert checks.check_positive_int(value, "k") == 3

  @pytest.mark.parametrize("value", [0, -1, 2.5, "3", True, None, np.ones(2, int)])
  def test_positive_int_refuses(self, value):
    with pytest.raises(ValueError, match=r"^`k` must be an int >= 1, got"):
      checks.check_positive_int(value, "k")

  def test_traced_int_is_refused_with_the_fix(self):
    with pytest.raises(ValueError, match=r"`k` must be a concrete Python int"):
      jax.jit(lambda k: checks.check_positive_int(k, "k"))(3)

  @pytest.mark.parametrize("value", ["gauss", None, 1, ["map"]])
  def test_choice(self, value):
    with pytest.raises(ValueError, match=r"^`execution` must be one of \('map',"):
      checks.check_choice(value, ("map", "vmap"), "execution")

  @pytest.mark.parametrize("value", ["no", 0, 1, None, jnp.array(True)])
  def test_bool_refuses_truthy_values(self, value):
    with pytest.raises(ValueError, match=r"^`one_sided` must be True or False"):
      checks.check_bool(value, "one_sided")


class TestFloatTree:
  def test_integer_leaf_is_a_type_error_naming_its_path(self):
    tree = {"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match=r"`params` leaf \['step'\] has dtype int32; x"):
      checks.check_float_tree(tree, "params", "x")

  def test_empty_tree_is_a_value_error(self):
    with pytest.raises(ValueError, match=r"`params` is an empty pytree"):
      checks.check_float_tree({}, "params", "x")

  def test_returns_the_leaves(self):
    tree = {
      "a": jnp.ones(2, jnp.bfloat16),
      "b": jax.ShapeDtypeStruct((3,), jnp.float16),
    }
    assert len(checks.check_float_tree(tree, "params", "x")) == 2


def test_accumulation_dtype():
  assert checks.accumulation_dtype(jnp.bfloat16) == jnp.float32
  assert checks.accumulation_dtype(jnp.float16) == jnp.float32
  assert checks.accumulation_dtype(jnp.float32) == jnp.float32
