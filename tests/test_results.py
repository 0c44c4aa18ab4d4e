"""The committed reports are generated from the results, and the summary's cost table agrees."""

import json
import math
from pathlib import Path

import pytest

from benchmarks import render
from benchmarks.experiments import summary
from benchmarks.schema import Row, time_row, write_results

ROOT = Path(__file__).resolve().parents[1]


def test_every_report_and_docs_block_is_generated_from_the_results():
  stale = [p for p, content in render.outputs().items() if p.read_text() != content]
  assert not stale, f"run `python -m benchmarks render`; stale: {stale}"


def test_cost_table_covers_every_optimizer_with_finite_ratios():
  rows = json.loads((ROOT / "benchmarks" / "results" / "cost.json").read_text())
  names = {r["optimizer"] for r in rows}
  assert {"AdamW+IRE", "SGD+IRE", "SAM", "ASAM", "GSAM", "mSAM", "SALA", "Lookahead"} <= names
  for r in rows:
    assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r


def test_replace_block_keeps_the_markers():
  text = "intro\n<!-- x:begin -->\nold\n<!-- x:end -->\noutro\n"
  assert render.replace_block(text, "x", "NEW") == (
      "intro\n<!-- x:begin -->\nNEW\n<!-- x:end -->\noutro\n")
  with pytest.raises(ValueError, match="markers"):
    render.replace_block("no markers", "x", "NEW")


def test_digest_is_the_median_and_range_of_the_interleaved_train_steps():
  rows = [dict(optimizer="SAM", variant="", ratio=r, what="train step", interleaved=True)
          for r in (1.0, 3.0, 2.0, 10.0)]
  rows.append(dict(optimizer="SAM", variant="", ratio=99.0, what="update (K=10)",
                   interleaved=True))  # not a train step
  rows.append(dict(optimizer="SAM", variant="", ratio=99.0, what="train step",
                   interleaved=False))  # whole runs one after another
  rows.append(dict(optimizer="mSAM", variant="m=8", ratio=1.5, what="train step",
                   interleaved=True))
  digest = summary.cost_digest(rows)
  assert "| SAM | 4 | 2.50 | 1.00–10.00 |" in digest
  assert "| mSAM (m=8) | 1 | 1.50 | 1.50–1.50 |" in digest


def test_cost_rows_read_every_results_file_in_table_order(tmp_path):
  write_results(tmp_path / "a", benchmark="x", meta={}, rows=[
      time_row("SALA", "SGD", "t", "train step", 1.2, "sala"),
      time_row("SAM", "SGD", "t", "train step", 2.0, "sam"),
      time_row("flat_mask (native)", "AdamW", "t", "refresh", 0.5, "selection"),  # internal
      Row("SAM", "t", "test_acc", 0.9)])  # not a cost
  (tmp_path / "legacy.json").write_text(json.dumps({"results": []}))  # other schema: skipped
  got = summary.cost_rows(render.Results(tmp_path))
  assert [(r["optimizer"], r["ratio"], r["source"]) for r in got] == [
      ("SAM", 2.0, "sam"), ("SALA", 1.2, "sala")]
  write_results(tmp_path / "b", benchmark="x", meta={}, rows=[
      time_row("SAM", "SGD", "t", "train step", float("nan"), "sam")])
  with pytest.raises(ValueError, match="bad cost ratio"):
    summary.cost_rows(render.Results(tmp_path))
