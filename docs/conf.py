"""Sphinx configuration of the nso_jax documentation.

Build it with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(needs the ``docs`` extra). The build makes no network access: intersphinx is
deliberately not enabled, so names from JAX, Optax and Flax are plain text.
"""

from __future__ import annotations

import os
import sys

# The repository root, so that `nso_jax` imports from the checkout.
sys.path.insert(0, os.path.abspath(".."))

import nso_jax

project = "nso_jax"
author = "nso_jax authors"
copyright = "2024, nso_jax authors"
release = nso_jax.__version__
version = release

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
  "matplotlib.sphinxext.plot_directive",
  "sphinx_copybutton",
  # MathJax 3 from the sphinx-mathjax-offline package, copied into _static/
  # and loaded from there: math renders with no network access.
  "sphinx-mathjax-offline",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# ARCHITECTURE.md is included by module_map.md; it is not a page of its own.
exclude_patterns = ["_build", "ARCHITECTURE.md", "Thumbs.db", ".DS_Store"]

# Every cross-reference must resolve: a broken one is a warning, and the build
# runs with -W. Names of other projects cannot resolve without intersphinx
# (which would fetch inventories over the network), so they are exempt.
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(jax|jaxlib|optax|flax|orbax|numpy|np|matplotlib|chex)(\..*)?"),
  (r"py:.*", r"(typing|collections\.abc|types|os)\..*"),
  # nso_jax's alias for any pytree (`typing.Any`), as signatures show it.
  (r"py:class", r"PyTree"),
]

# MyST: $...$ math, heading anchors for links like [x](page.md#section).
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# autodoc / napoleon: Google-style docstrings, members in source order.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False
# Long signatures are written one parameter per line.
python_maximum_signature_line_length = 88

# matplotlib's plot directive: one PNG per figure, no source links.
plot_formats = [("png", 100)]
plot_html_show_formats = False
plot_html_show_source_link = False
plot_include_source = True
plot_rcparams = {"figure.figsize": (6.4, 4.0), "figure.autolayout": True}

html_theme = "sphinx_book_theme"
html_title = "nso_jax"
html_theme_options = {
  "show_toc_level": 2,
  "use_download_button": False,
  "use_fullscreen_button": False,
}
html_static_path = ["_static"]
html_css_files = ["nso_jax.css"]

# sphinx-copybutton: copy a block without its prompts (>>>, ..., $) or output.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True
