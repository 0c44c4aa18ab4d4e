"""Tests of benchmarks/bench_generalization.py: a smoke run end to end, and its aggregation."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import bench_generalization as bg  # noqa: E402


def test_smoke_run_writes_every_output(tmp_path):
  res = bg.main(["--smoke", "--datasets", "digits", "--out", str(tmp_path)])
  for name in ("generalization.json", "generalization.csv", "generalization.md",
               "generalization.png", "generalization_summary.md"):
    assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
  rows = json.loads((tmp_path / "generalization.json").read_text())["details"]["runs"]
  with (tmp_path / "generalization.csv").open() as f:
    assert len(list(csv.DictReader(f))) == len(rows)
  # Every optimizer kind ran once (split between the two models) and nothing else.
  ran = {(r["model"], r["optimizer"]) for r in rows}
  assert ran == {(m, o) for m, opts in bg.SMOKE_OPTS.items() for o in opts}
  assert {r["opt"] for r in rows} == {"sgd", "sgd+ire", "sam", "msam", "lookahead", "adamw",
                                      "sam+ire", "asam", "sala"}
  for r in rows:
    assert 0.0 <= r["test_acc"] <= 1.0
    for k in ("test_loss", "train_loss", "top_eig", "trace", "time_per_step_s"):
      assert math.isfinite(r[k]), (r["model"], r["optimizer"], k)
  md = (tmp_path / "generalization.md").read_text()
  assert "| SGD+IRE |" in md and "| SALA |" in md
  summary = (tmp_path / "generalization_summary.md").read_text()
  assert summary.count("\n| ") <= 13  # header + at most 12 rows
  assert res["out"] == str(tmp_path)


def _row(model, opt, seed, acc, t, dataset="digits"):
  return {"model": model, "dataset": dataset, "optimizer": opt, "seed": seed, "test_acc": acc,
          "test_loss": 1.0 - acc, "train_loss": 0.1, "top_eig": 10.0 * acc, "trace": 5.0,
          "time_per_step_s": t}


def test_aggregation_helpers_on_hand_made_numbers():
  m, s = bg.mean_std([1.0, 2.0, 3.0])
  assert m == 2.0 and s == pytest.approx(1.0)
  assert bg.mean_std([4.0]) == (4.0, 0.0)
  assert bg.mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
  assert all(math.isnan(x) for x in bg.mean_std([]))

  rows = [
      _row("resnet", "SGD", 0, 0.90, 0.010), _row("resnet", "SGD", 1, 0.92, 0.020),
      _row("resnet", "SGD", 2, 0.91, 0.010),
      _row("resnet", "SAM", 0, 0.93, 0.021), _row("resnet", "SAM", 1, 0.95, 0.036),
      _row("resnet", "SAM", 2, 0.94, 0.025),
      _row("resnet", "SGD+IRE", 0, 0.89, 0.011), _row("resnet", "SGD+IRE", 1, 0.93, 0.022),
      _row("resnet", "SGD+IRE", 2, 0.91, 0.012),
  ]
  # Ratios are per seed against the same seed's base, then the median: SAM 2.1, 1.8, 2.5.
  ratios = bg.time_ratios(rows)
  assert ratios["resnet", "digits", "SAM"] == pytest.approx(2.1)
  assert ratios["resnet", "digits", "SGD"] == 1.0
  assert ratios["resnet", "digits", "SGD+IRE"] == pytest.approx(1.1)

  d = bg.paired_difference(rows, "resnet", "digits", "SGD", "SAM")
  assert d["diffs"] == pytest.approx([0.03, 0.03, 0.03])
  assert d["mean"] == pytest.approx(0.03) and d["std"] == pytest.approx(0.0, abs=1e-12)
  d = bg.paired_difference(rows, "resnet", "digits", "SGD", "SGD+IRE")
  assert d["diffs"] == pytest.approx([-0.01, 0.01, 0.0])
  assert d["mean"] == pytest.approx(0.0, abs=1e-12) and d["std"] == pytest.approx(0.01)
  assert d["se"] == pytest.approx(0.01 / math.sqrt(3))
  assert bg.paired_difference(rows, "vit", "digits", "AdamW", "SAM") is None

  assert bg.verdict({"mean": 0.03, "se": 0.01, "n": 3}).startswith("reproduced")
  assert bg.verdict({"mean": 0.01, "se": 0.01, "n": 3}) == "same direction, within noise"
  assert bg.verdict({"mean": -0.01, "se": 0.01, "n": 3}) == "opposite direction, within noise"
  assert bg.verdict({"mean": -0.03, "se": 0.01, "n": 3}).startswith("reversed")
  assert bg.verdict({"mean": 0.03, "se": float("nan"), "n": 1}).startswith("one seed")
  assert bg.verdict(None) == "not run"

  aggs = {a["optimizer"]: a for a in bg.aggregate(rows)}
  assert list(aggs) == ["SGD", "SAM", "SGD+IRE"]  # run order kept
  assert aggs["SAM"]["test_acc"] == pytest.approx(0.94)
  assert aggs["SAM"]["test_acc_std"] == pytest.approx(0.01)
  assert aggs["SAM"]["top_eig"] == pytest.approx(9.4)
  assert aggs["SAM"]["time_ratio"] == pytest.approx(2.1)
  assert aggs["SGD"]["n"] == 3
