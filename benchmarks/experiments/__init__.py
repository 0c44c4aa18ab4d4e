"""The benchmarks, one module each: its spec (``SPEC``), ``run`` and ``render``.

A module declares ``SPEC`` (:class:`benchmarks.spec.Experiment` or
:class:`benchmarks.spec.Micro`), and may define

* ``add_arguments(parser)``: its own command-line options (besides the common ones);
* ``run(spec, args) -> None``: measures and writes ``results/{spec.name}.json``;
* ``render(results) -> {target: text}``: its reports and docs blocks (:mod:`benchmarks.render`).

To add a benchmark: write ``benchmarks/experiments/NAME.py`` and add ``NAME`` to :data:`NAMES`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES: tuple[str, ...] = ("pretraining", "generalization", "label_noise", "sala",
                          "multidevice", "sam", "selection", "sharpness", "train_step",
                          "compiled", "compiled_steps", "summary")


def load(name: str) -> ModuleType:
  """The module of benchmark ``name``."""
  if name not in NAMES:
    raise KeyError(f"unknown benchmark {name!r}; have {', '.join(NAMES)}.")
  return importlib.import_module(f"benchmarks.experiments.{name}")
