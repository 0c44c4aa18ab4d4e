"""The README's Python blocks run, each on its own, as a new user would paste one of them."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_python_blocks():
  assert len(BLOCKS) >= 4


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs_on_its_own(i):
  """Each block in a fresh namespace: its own imports and definitions, none from another."""
  block = BLOCKS[i]
  namespace: dict = {}
  try:
    exec(compile(block, f"README.md[block {i}]", "exec"), namespace)
  except Exception as e:  # pragma: no cover - the message is the point
    raise AssertionError(f"README python block {i} failed on its own: {e!r}\n{block}") from e
  # The blocks that train actually trained: finite params; SALA took its steps.
  if "params" in namespace:
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(namespace["params"]))
  if "sala_stats" in block:
    assert int(namespace["stats"]["cycles"]) == 2


def test_the_commands_in_the_readme_and_docs_name_runnable_modules():
  """``python -m examples.X`` everywhere (run from the repository root); no script paths."""
  pages = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
  modules = set()
  for page in pages:
    text = page.read_text()
    assert not re.search(r"python3? examples/", text), f"{page.name}: use python -m examples.X"
    modules |= set(re.findall(r"python3? -m (examples(?:\.\w+)+)", text))
  assert "examples.compare" in modules
  for name in sorted(modules):
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, name
    assert "def main(" in pathlib.Path(spec.origin).read_text(), name
