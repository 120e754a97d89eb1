"""The public surface stays small: few parameters, one execution value, short
functions, and the ``"auto"`` rule decided in one place."""

import ast
import inspect
import pathlib

import pytest

import nso_jax
from nso_jax import batching
from nso_jax import hessian
from nso_jax import training

PACKAGE = pathlib.Path(nso_jax.__file__).resolve().parent
MAX_PARAMETERS = 10
MAX_CODE_LINES = 60
# Names that the one `execution` value replaced: no public function takes them.
MERGED_INTO_EXECUTION = {"chunk_size", "pair_axis", "probe_axis", "axis_name"}


def public_functions():
  for module in (nso_jax, hessian, training, batching):
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.isfunction(obj):
        yield f"{module.__name__}.{name}", obj


PUBLIC = dict(public_functions())


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_functions_take_few_parameters(name):
  parameters = inspect.signature(PUBLIC[name]).parameters
  assert len(parameters) <= MAX_PARAMETERS, (name, list(parameters))


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_batching_settings_travel_as_one_execution_value(name):
  parameters = set(inspect.signature(PUBLIC[name]).parameters)
  assert not parameters & MERGED_INTO_EXECUTION, name


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_functions_declare_their_parameters(name):
  kinds = {p.kind for p in inspect.signature(PUBLIC[name]).parameters.values()}
  assert inspect.Parameter.VAR_KEYWORD not in kinds, name


def code_lines(lines: list[str], node: ast.FunctionDef) -> int:
  """Lines of a function that hold code: no docstring, comment or blank line."""
  body = node.body
  first = body[0]
  if isinstance(first, ast.Expr) and isinstance(
    getattr(first, "value", None), ast.Constant
  ):
    if len(body) == 1:
      return 0
    first = body[1]
  text = lines[first.lineno - 1 : node.end_lineno]
  return sum(1 for line in text if line.strip() and not line.strip().startswith("#"))


def long_functions():
  for path in sorted(PACKAGE.rglob("*.py")):
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        count = code_lines(lines, node)
        if count > MAX_CODE_LINES:
          yield f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {count}"


def test_no_function_body_is_long():
  assert list(long_functions()) == []


def test_auto_is_decided_in_one_function():
  """Only batching.py applies the rule; the rest ask ``batching.resolve``."""
  for path in sorted((PACKAGE / "_src").glob("*.py")):
    if path.name == "batching.py":
      continue
    source = path.read_text()
    assert "default_execution(" not in source, path.name
    assert '== "auto"' not in source, path.name
