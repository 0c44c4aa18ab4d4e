"""benchmarks/bench_selection.py: a smoke run writes every method's rows and the table."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_selection as B  # noqa: E402


def test_smoke_times_every_method_and_writes_the_table(tmp_path):
  out = tmp_path / "selection"
  assert B.main(["--smoke", "--kinds", "one_bin", "--out", str(out)]) == 0
  doc = json.loads(out.with_suffix(".json").read_text())
  methods = B.methods_here()
  (res,) = doc["details"]
  assert set(res["refresh"]) == set(res["amortized"]) == set(methods)
  assert all(v["median"] > 0 for v in res["refresh"].values())
  assert {r["optimizer"] for r in doc["rows"]} == {
      *(f"flat_mask ({m})" for m in methods), *(f"AdamW+IRE ({m})" for m in methods)}
  assert doc["meta"]["command"].endswith("bench_selection.py --smoke --kinds one_bin --out DIR")
  md = out.with_suffix(".md").read_text()
  assert "| one_bin | 2e+04 |" in md and "Amortized" in md


def test_key_distributions():
  import numpy as np

  rng = np.random.default_rng(0)
  g2 = np.arange(7, dtype=np.float32)
  one_bin = B.keys_of("one_bin", 1000, g2, rng)
  keys = one_bin.view(np.uint32) | np.uint32(0x80000000)  # positive floats' ordered keys
  assert len(set((keys >> 16).tolist())) == 1 and len(set(keys.tolist())) > 500
  assert B.keys_of("model", 10, g2, rng).tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
