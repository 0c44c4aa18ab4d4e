"""The documentation's code runs: docstring examples (doctest) and the pages' Python blocks."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import re

import pytest

import ire_optax

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"

MODULES = ["ire_optax._src.ire", "ire_optax._src.sam", "ire_optax._src.sala",
           "ire_optax._src.selection", "ire_optax._src.sharpness"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
  assert tried > 0, f"{name} has no docstring examples"
  assert failures == 0


@pytest.mark.parametrize("name", ["ire", "sam", "msam", "sala"])
def test_each_optimizer_documents_math_reference_and_example(name):
  doc = getattr(ire_optax, name).__doc__
  assert ">>>" in doc, "a runnable example"
  assert ".. math::" in doc or "θ" in doc, "the math"
  assert re.search(r"\b(19|20)\d\d\b", doc), "a dated reference"


@pytest.mark.parametrize("page", ["ire.md", "nonfinite.md"])
def test_page_python_blocks_run(page):
  blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
  assert blocks
  namespace: dict = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/{page}[block {i}]", "exec"), namespace)
