"""The layering of docs/ARCHITECTURE.md, checked on the imports of each module."""

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "nso_jax" / "_src"
NSO_CORE = {"estimator", "transform", "readings", "nonfinite", "precision"}
CURVATURE = {
  "operators",
  "data_plans",
  "stochastic_trace",
  "lanczos",
  "curvature_measures",
  "paper_measures",
  "diagonal",
  "fisher",
  "groups",
  "landscape",
  "plotting",
}
FOUNDATION = {"checks", "mesh", "batching", "noise", "selection"}
# Each curvature layer imports only the layers below it.
CURVATURE_ORDER = [
  {"data_plans", "groups"},
  {"operators"},
  {"stochastic_trace", "lanczos"},
  {"curvature_measures", "paper_measures", "diagonal", "fisher", "landscape"},
  {"plotting"},
]


def src_imports(module: str) -> set[str]:
  tree = ast.parse((SRC / f"{module}.py").read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "nso_jax._src":
        names |= {alias.name for alias in node.names}
      elif node.module.startswith("nso_jax._src."):
        names.add(node.module.removeprefix("nso_jax._src.").split(".")[0])
  return names


@pytest.mark.parametrize("module", sorted(NSO_CORE))
def test_nso_core_never_imports_the_curvature_tools(module):
  assert not src_imports(module) & CURVATURE


@pytest.mark.parametrize("module", sorted(CURVATURE))
def test_curvature_tools_never_import_the_nso_core(module):
  assert not src_imports(module) & (NSO_CORE | {"training", "checkpoints"})


@pytest.mark.parametrize("module", sorted(FOUNDATION))
def test_foundation_imports_only_the_foundation(module):
  assert src_imports(module) <= FOUNDATION


@pytest.mark.parametrize("level", range(len(CURVATURE_ORDER)))
def test_curvature_layers_import_downwards(level):
  below = set().union(*CURVATURE_ORDER[:level])
  for module in CURVATURE_ORDER[level]:
    assert src_imports(module) & CURVATURE <= below, module


def test_training_glue_imports_neither_side():
  for module in ("training", "checkpoints"):
    assert not src_imports(module) & (NSO_CORE | CURVATURE)
