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


def _pages(html_build: pathlib.Path) -> list[pathlib.Path]:
  skip = {"_static", "_modules", "_sources", "_images"}
  return [
    page
    for page in html_build.rglob("*.html")
    if not skip & set(page.relative_to(html_build).parts)
  ]


def test_math_renders_offline_from_a_bundled_mathjax(html_build):
  with_math = [page for page in _pages(html_build) if 'class="math' in page.read_text()]
  assert len(with_math) >= 3
  for page in with_math:
    scripts = re.findall(r'<script[^>]*src="([^"]*)"', page.read_text("utf-8"))
    mathjax = [src for src in scripts if "mathjax" in src.lower()]
    assert mathjax, f"{page.name} has math but loads no MathJax"
    for src in mathjax:
      assert "://" not in src and not src.startswith("//"), f"{page.name}: {src}"
      assert (page.parent / src.split("?")[0]).is_file(), f"{page.name}: {src}"


def _sidebar_titles(page: pathlib.Path) -> list[str]:
  text = page.read_text("utf-8")
  nav = re.search(r'<nav class="[^"]*\bbd-docs-nav\b[^"]*"(.*?)</nav>', text, re.DOTALL)
  assert nav, f"no sidebar in {page.name}"
  links = re.findall(r'<a class="[^"]*reference internal"[^>]*>(.*?)</a>', nav.group(1))
  return [html.unescape(re.sub(r"<[^>]+>", "", link)).strip() for link in links]


def test_sidebar_titles_are_unique(html_build):
  # experiments.html shows its own entries (the result pages) unfolded.
  for page in ("index.html", "experiments.html"):
    titles = _sidebar_titles(html_build / page)
    assert len(titles) >= 10, titles
    repeated = sorted({title for title in titles if titles.count(title) > 1})
    assert not repeated, f"sidebar titles shown twice in {page}: {repeated}"


def test_code_blocks_have_copy_buttons_and_api_pages_link_to_source(html_build):
  assert (html_build / "_static" / "copybutton.js").is_file()
  assert "copybutton.js" in (html_build / "getting_started.html").read_text("utf-8")
  api = "".join(page.read_text("utf-8") for page in (html_build / "api").glob("*.html"))
  assert 'class="viewcode-link"' in api
  assert list((html_build / "_modules" / "nso_jax").rglob("*.html"))


def test_wide_tables_scroll_sideways(html_build):
  css = (html_build / "_static" / "nso_jax.css").read_text("utf-8")
  assert ".pst-scrollable-table-container" in css and "overflow-x: auto" in css
  assert "_static/nso_jax.css" in (html_build / "experiments.html").read_text("utf-8")


_PNG_REFERENCE = re.compile(
  r"(?:\{(?:image|figure)\}\s+|!\[[^\]]*\]\()([^)\s]+\.png)", re.IGNORECASE
)


def test_every_committed_plot_is_shown_on_a_page():
  shown = set()
  for page in DOCS.rglob("*.md"):
    if "_build" in page.relative_to(DOCS).parts:
      continue
    for target in _PNG_REFERENCE.findall(page.read_text("utf-8")):
      shown.add((page.parent / target).resolve())
  plots = [
    path
    for path in DOCS.rglob("*.png")
    if not {"_build", "_static"} & set(path.relative_to(DOCS).parts)
  ]
  assert plots
  unshown = sorted(str(p.relative_to(DOCS)) for p in plots if p.resolve() not in shown)
  assert not unshown, f"plots under docs/ shown on no page: {unshown}"
