"""The README's Python blocks run, in order, as a new user would paste them."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 4
  namespace: dict = {}
  for i, block in enumerate(blocks):
    try:
      exec(compile(block, f"README.md[block {i}]", "exec"), namespace)
    except Exception as e:  # pragma: no cover - the message is the point
      raise AssertionError(f"README python block {i} failed: {e!r}\n{block}") from e
  # the blocks actually trained: finite params, SALA took its steps
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(namespace["params"]))
  assert int(namespace["stats"]["cycles"]) == 2
