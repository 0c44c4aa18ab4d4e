"""Sphinx configuration of the ire_optax documentation.

Build (CI treats warnings as errors)::

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs docs/_build/html

The API reference is generated from the docstrings (Google style, read by
napoleon); the Markdown pages are read by MyST. No extension fetches anything
from the network, so the build works offline.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document the checkout, also without installing it

import ire_optax  # noqa: E402

project = "ire_optax"
author = "ire_optax developers"
copyright = "ire_optax developers"
release = ire_optax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Google-style docstrings (Args/Returns/Raises/Example sections).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
autosummary_generate = False  # summary tables only: nothing is written into docs/

# Markdown: $...$ math, ::: fences, and anchors for "page.md#section" links.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
# Several pages are also README sections and start at "##".
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_title = f"ire_optax {release}"
html_static_path: list[str] = []
