"""The committed benchmark results, the cost table and the README's results block agree."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report():
  spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_readme_and_cost_table_are_generated_from_the_results():
  report = _report()
  stale = [p for p, content in report.outputs().items() if p.read_text() != content]
  assert not stale, f"run `python benchmarks/report.py`; stale: {stale}"


def test_cost_table_covers_every_optimizer_with_finite_ratios():
  rows = json.loads((ROOT / "benchmarks" / "results" / "cost.json").read_text())
  names = {r["optimizer"] for r in rows}
  assert {"AdamW+IRE", "SGD+IRE", "SAM", "ASAM", "GSAM", "mSAM", "SALA", "Lookahead"} <= names
  for r in rows:
    assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r


def test_replace_block_and_digest(tmp_path):
  report = _report()
  text = f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n"
  assert report.replace_block(text, "NEW") == "intro\nNEW\noutro\n"
  with pytest.raises(ValueError, match="no"):
    report.replace_block("no markers", "NEW")
  rows = [report._row("SAM", "SGD", f"m{i}", "train step", r, "x") for i, r in
          enumerate([1.0, 3.0, 2.0, 10.0])]
  rows.append(report._row("SAM", "SGD", "u", "update (K=10)", 99.0, "x"))  # not a train step
  digest = report.cost_digest(rows)
  assert "| SAM | 4 | 2.50 | 1.00–10.00 |" in digest
  # Every results file is read through its rows: time ratios only, in table order.
  common = report.C
  common.write_results(tmp_path / "a", benchmark="x", meta={}, rows=[
      common.time_row("SALA", "SGD", "t", "train step", 1.2, "bench_sala"),
      common.time_row("SAM", "SGD", "t", "train step", 2.0, "bench_sam"),
      common.Row("SAM", "t", "test_acc", 0.9)])  # not a cost
  (tmp_path / "legacy.json").write_text(json.dumps({"results": []}))  # other schema: skipped
  got = report.cost_rows(tmp_path)
  assert [(r["optimizer"], r["ratio"]) for r in got] == [("SAM", 2.0), ("SALA", 1.2)]
  with pytest.raises(ValueError, match="bad cost ratio"):
    common.write_results(tmp_path / "b", benchmark="x", meta={}, rows=[
        common.time_row("SAM", "SGD", "t", "train step", float("nan"), "bench_sam")])
    report.cost_rows(tmp_path)
