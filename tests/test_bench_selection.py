"""benchmarks.experiments.selection: a smoke run times every method and the update; the keys."""

import math
from pathlib import Path

import numpy as np

from benchmarks import data, render
from benchmarks.__main__ import main
from benchmarks.experiments import selection as B
from benchmarks.schema import RESULTS


def test_smoke_times_every_method_and_the_update_and_spares_the_committed_results(capsys):
  committed = RESULTS / "selection.json"
  before = committed.read_text()
  assert main(["selection", "--smoke"]) == 0
  out = Path(capsys.readouterr().out.split("results in ")[1].split()[0])
  doc = render.Results(out)["selection"]
  assert committed.read_text() == before
  (res,) = doc["details"]["refresh"]
  assert set(res["refresh"]) == set(res["amortized"]) == {"native", "scatter"}
  assert all(v["min"] <= v["median"] <= v["max"] and v["median"] > 0
             for v in res["refresh"].values())
  assert {r["optimizer"] for r in doc["rows"]} == {
      "flat_mask (native)", "flat_mask (scatter)", "AdamW+IRE (native)", "AdamW+IRE (scatter)",
      "AdamW+IRE"}
  (row,) = doc["details"]["update"]["rows"]
  assert row["n"] == 20_000
  for clock in ("wall", "cpu"):
    c = row[clock]
    for key in ("ire_plain_ratio", "ire_refresh_ratio", "amortized_ratio_K10",
                "radix_select_adamw_updates", "sort_select_adamw_updates",
                "radix_select_xla_scatter_adamw_updates"):
      assert math.isfinite(c[key]) and c[key] > 0, (clock, key, c[key])
  # the uint8 mask (plus a few scalars over 20,000 params)
  assert 1.0 <= row["extra_state_bytes_per_param"] < 1.01
  out = B.render({"selection": doc})
  assert "| one_bin | 2e+04 |" in out["benchmarks/results/selection.md"]
  assert "| 20,000 | cpu |" in out["benchmarks/results/selection.md"]
  assert "| 2e+04 |" in out["docs/selection.md#selection-cost"]


def test_key_distributions_and_the_tree():
  g2 = np.arange(7, dtype=np.float32)
  keys = B.keys_of("one_bin", 1000, g2).view(np.uint32) | np.uint32(0x80000000)
  assert len(set((keys >> 16).tolist())) == 1 and len(set(keys.tolist())) > 500
  assert B.keys_of("model", 10, g2).tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
  sizes = data.tree_sizes(1_000_003)
  assert len(sizes) == 63 and sum(sizes) == 1_000_003 and sizes[1] == sizes[2] < sizes[0]


def test_digest_spans_the_key_distributions():
  res = [{"kind": k, "n": 1000, "reps": 3, "load_before": None, "load_after": None,
          "adamw_ms": 1.0, "refresh": {"native": {"median": m, "min": m, "max": m}},
          "amortized": {}} for k, m in (("uniform", 0.5), ("model", 1.5))]
  doc = {"meta": {"machine": {"summary": "M"}, "model": "x", "K": 10, "methods": ["native"],
                  "command": "python -m benchmarks selection"},
         "details": {"refresh": res, "update": render.Results()["selection"]["details"]["update"]}}
  digest = B.render({"selection": doc})["docs/selection.md#selection-cost"]
  assert "| 1e+03 | 0.50–1.50 | not run |" in digest and "uniform, model" in digest
