"""The documentation: a warning-free Sphinx build, the API reference, the examples.

The build needs the ``docs`` extra (Sphinx, sphinx-book-theme, myst-parser) and
matplotlib; it is skipped when Sphinx is not installed. The guide's examples
(``>>>`` in docs/*.md) are doctested whether or not Sphinx is installed.
"""

import doctest
import html
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest
from optional import require

import nso_jax
from nso_jax import batching
from nso_jax import hessian

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# docs/equinox.md is doctested by tests/test_equinox.py.
TESTED_ELSEWHERE = {"equinox.md"}
PAGES_WITH_EXAMPLES = sorted(
  path.name
  for path in DOCS.glob("*.md")
  if path.name not in TESTED_ELSEWHERE and ">>> " in path.read_text("utf-8")
)


def _public_names() -> list[str]:
  modules = [nso_jax, hessian, batching]
  if importlib.util.find_spec("flax") is not None:
    from nso_jax import training

    modules.append(training)
  names = []
  for module in modules:
    for name in module.__all__:
      if not isinstance(getattr(module, name), type(nso_jax)):  # not a module
        names.append(f"{module.__name__}.{name}")
  return names


@pytest.fixture(scope="module")
def html_build(tmp_path_factory) -> pathlib.Path:
  require(
    "sphinx",
    reason="Sphinx is not installed: pip install -e '.[docs]' to build the "
    "documentation (sphinx, sphinx-book-theme, myst-parser)",
  )
  out = tmp_path_factory.mktemp("docs_html")
  command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q"]
  result = subprocess.run(
    [*command, "-b", "html", str(DOCS), str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert result.returncode == 0, (
    f"sphinx-build -W failed (exit {result.returncode}):\n"
    f"{result.stderr[-6000:]}\n{result.stdout[-2000:]}"
  )
  return out


def test_docs_build_without_warnings(html_build):
  assert (html_build / "index.html").is_file()
  # The worked example's figure is computed by matplotlib's plot directive.
  assert list((html_build / "_images").glob("worked_example-*.png"))


def test_api_reference_documents_every_public_name(html_build):
  ids = set()
  for page in (html_build / "api").glob("*.html"):
    ids.update(
      html.unescape(i) for i in re.findall(r'id="([^"]+)"', page.read_text("utf-8"))
    )
  missing = [name for name in _public_names() if name not in ids]
  assert not missing, f"public names missing from docs/api/: {missing}"


def _imported_modules(text: str) -> set[str]:
  """The top-level modules that a page's examples import."""
  found = re.findall(r"^>>> +(?:import|from) +([A-Za-z_]\w*)", text, re.MULTILINE)
  return set(found)


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES)
def test_guide_examples(page):
  text = (DOCS / page).read_text("utf-8")
  for module in sorted(_imported_modules(text)):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"docs/{page} imports {module}, which is not installed")
  failures, attempted = doctest.testfile(
    str(DOCS / page),
    module_relative=False,
    optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    verbose=False,
    raise_on_error=False,
  )
  assert attempted > 0
  assert failures == 0, f"{failures} of {attempted} examples in docs/{page} failed"
