"""The smoke runs of the benchmarks that have no test module of their own: each one runs and
writes a results document that its renderer reads (the others: ``test_bench_<name>.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import __main__ as cli
from benchmarks import experiments, render, schema

# Every benchmark that runs (not ``summary``: render only) and has no test module of its own.
OWN_TESTS = {p.stem.removeprefix("test_bench_")
             for p in Path(__file__).parent.glob("test_bench_*.py")}
NAMES = [n for n in experiments.NAMES
         if n not in OWN_TESTS and hasattr(experiments.load(n), "run")]


@pytest.mark.parametrize("name", NAMES)
def test_smoke_run_writes_results_its_renderer_reads(name, tmp_path):
  assert cli.main([name, "--smoke", "--out", str(tmp_path)]) == 0
  doc = schema.read_results(tmp_path / f"{name}.json")
  assert doc is not None and doc["benchmark"] == name and doc["rows"]
  module = experiments.load(name)
  if hasattr(module, "render"):
    assert module.render(render.Results(tmp_path))  # reports written from this document
