"""benchmarks.experiments.selection: a smoke run writes every method's rows; the key layouts."""

import argparse

import numpy as np

from benchmarks import data, render
from benchmarks.experiments import selection as B
from benchmarks.spec import smoke


def test_smoke_times_every_method_and_renders_its_report(tmp_path):
  args = argparse.Namespace(out=str(tmp_path), data_dir=None, sizes=None, reps=None,
                            kinds=["one_bin"], methods=["native", "scatter"], resume=False)
  B.run(smoke(B.SPEC), args)
  doc = render.Results(tmp_path)["selection"]
  (res,) = doc["details"]
  assert set(res["refresh"]) == set(res["amortized"]) == {"native", "scatter"}
  assert all(v["min"] <= v["median"] <= v["max"] and v["median"] > 0
             for v in res["refresh"].values())
  assert {r["optimizer"] for r in doc["rows"]} == {
      "flat_mask (native)", "flat_mask (scatter)", "AdamW+IRE (native)", "AdamW+IRE (scatter)"}
  out = B.render({"selection": doc})
  assert "| one_bin | 2e+04 |" in out["benchmarks/results/selection.md"]
  assert "| 2e+04 |" in out["docs/selection.md#selection-cost"]
  B.run(smoke(B.SPEC), argparse.Namespace(**{**vars(args), "resume": True}))  # nothing new
  assert render.Results(tmp_path)["selection"]["details"] == doc["details"]


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
  doc = {"meta": {"machine": {"summary": "M"}, "model": "x", "K": 10, "methods": ["native"]},
         "details": res}
  digest = B.render({"selection": doc})["docs/selection.md#selection-cost"]
  assert "| 1e+03 | 0.50–1.50 | not run |" in digest and "uniform, model" in digest
