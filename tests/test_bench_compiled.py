"""benchmarks/bench_compiled.py: a smoke run compiles every program and writes the table."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_compiled as B  # noqa: E402


def test_smoke_writes_every_program_and_the_table(tmp_path):
  out = tmp_path / "compiled"
  assert B.main(["--smoke", "--targets", "cpu", "--leaves", "1", "63",
                 "--out", str(out)]) == 0
  doc = json.loads(out.with_suffix(".json").read_text())
  targets = doc["meta"]["targets"]
  assert targets == ["cpu"]
  assert {(r["target"], r["leaves"]) for r in doc["details"]} == {
      (t, leaves) for t in targets for leaves in (1, 63)}
  for r in doc["details"]:
    assert set(r["programs"]) == set(B.PROGRAMS)
    assert r["ratios"]["adamw"]["bytes"] == 1.0
    assert all(p["bytes"] > 0 for p in r["programs"].values())
    assert r["programs"]["plain step"]["conditionals_executed"] == 0
    assert r["programs"]["unhinted"]["conditionals_executed"] == 1
  assert {row["metric"] for row in doc["rows"]} >= {"compiled_bytes_ratio"}
  assert all(row["metric"] != "time_ratio" for row in doc["rows"])  # not in the cost table
  md = out.with_suffix(".md").read_text()
  assert "| cpu | 1e+05 | 1 |" in md and "time model" in md
