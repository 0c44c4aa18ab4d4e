"""Tests of benchmarks/bench_label_noise.py: the noise model, the aggregation, a smoke run."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as C  # noqa: E402
import bench_label_noise as bl  # noqa: E402


def test_noisy_labels_are_fixed_per_example_and_always_wrong_when_corrupted():
  y = np.random.default_rng(0).integers(0, 10, 20_000).astype(np.int32)
  noisy, corrupted = bl.noisy_labels(y, 0.4, seed=3)
  again, corrupted2 = bl.noisy_labels(y, 0.4, seed=3)
  np.testing.assert_array_equal(noisy, again)  # a pure function of (seed, rate)
  np.testing.assert_array_equal(corrupted, corrupted2)
  assert abs(corrupted.mean() - 0.4) < 0.015
  assert np.all(noisy[corrupted] != y[corrupted]) and np.all(noisy[~corrupted] == y[~corrupted])
  # Symmetric: the wrong label is uniform over the nine other classes.
  shift = (noisy[corrupted] - y[corrupted]) % 10
  counts = np.bincount(shift, minlength=10)
  assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()
  other, _ = bl.noisy_labels(y, 0.4, seed=4)
  assert np.mean(other != noisy) > 0.3  # another seed draws other noise
  clean, none = bl.noisy_labels(y, 0.0, seed=3)
  np.testing.assert_array_equal(clean, y)
  assert not none.any()


def _run(opt, seed, acc, t, noise=0.2, mem=0.1):
  return {"optimizer": opt, "seed": seed, "noise": noise, "eval_acc_final": acc,
          "eval_acc_best": acc + 0.01, "train_acc_noisy": 0.7, "memorised": mem, "top_eig": 3.0,
          "time_per_step_s": t, "eval_acc_curve": [acc - 0.1, acc]}


def test_aggregation_claims_and_rows_on_hand_made_numbers():
  runs = [_run("SGD", 0, 0.90, 0.01), _run("SGD", 1, 0.92, 0.02), _run("SGD", 2, 0.91, 0.01),
          _run("SAM", 0, 0.93, 0.021), _run("SAM", 1, 0.95, 0.036), _run("SAM", 2, 0.94, 0.025)]
  aggs = {a["optimizer"]: a for a in bl.aggregate(runs)}
  assert aggs["SAM"]["eval_acc_final"] == pytest.approx(0.94)
  assert aggs["SAM"]["eval_acc_final_std"] == pytest.approx(0.01)
  assert aggs["SAM"]["time_ratio"] == pytest.approx(2.1)  # median of 2.1, 1.8, 2.5
  assert aggs["SGD"]["time_ratio"] == 1.0 and aggs["SGD"]["top_eig_std"] == 0.0
  found = [c for c in bl.claims(runs) if c["metric"] == "eval_acc_final"]
  assert len(found) == 1 and found[0]["diffs"] == pytest.approx([0.03, 0.03, 0.03])
  assert found[0]["verdict"].startswith("reproduced")
  rows = bl.result_rows(bl.aggregate(runs))
  ratio = [r for r in rows if r.metric == "time_ratio"]
  assert len(ratio) == 1 and ratio[0].optimizer == "SAM" and ratio[0].base == "SGD"
  assert ratio[0].value == pytest.approx(2.1) and not ratio[0].interleaved


@pytest.mark.slow
def test_smoke_run_writes_every_output_and_resumes(tmp_path, monkeypatch):
  monkeypatch.delenv(C.DATA_ENV, raising=False)  # offline data: digits
  res = bl.main(["--smoke", "--out", str(tmp_path)])
  for name in ("label_noise.json", "label_noise.md", "label_noise.png", "label_noise_summary.md"):
    assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
  doc = C.read_results(tmp_path / "label_noise.json")
  runs = doc["details"]["runs"]
  ran = [r["optimizer"] for r in runs]
  assert sorted(ran) == sorted(bl.OPTIMIZERS) and ran[:2] == ["SGD", "SAM"]  # the claim first
  assert len(doc["details"]["grid"]) == 1 and doc["meta"]["lr"] == 0.1
  for r in runs:
    assert r["finite"] and 0.0 <= r["eval_acc_final"] <= 1.0 and r["eval_acc_best"] >= \
        r["eval_acc_final"]
    assert 0.3 < r["corrupted_fraction"] < 0.5 and math.isfinite(r["top_eig"])
    assert len(r["eval_acc_curve"]) == 2 and r["time_per_step_s"] > 0
  assert {row.metric for row in doc["rows"]} >= {"eval_acc_final", "memorised", "time_ratio"}
  assert "| SAM |" in (tmp_path / "label_noise.md").read_text()
  # A restart finds every run done and trains nothing; other settings are refused.
  before = json.loads((tmp_path / "label_noise.json").read_text())["details"]["runs"]
  again = bl.main(["--smoke", "--out", str(tmp_path)])
  assert again["details"]["runs"] == before
  with pytest.raises(SystemExit, match="other settings"):
    bl.main(["--smoke", "--out", str(tmp_path), "--epochs", "1"])
  assert res["out"] == str(tmp_path)


def test_merge_adds_the_other_process_runs_once(tmp_path):
  config = {"batch": 128, "epochs": 10, "seeds": [0, 1, 2]}
  meta = {"command": "c", "machine": {"summary": "m"}, "config": config, "lr": 0.1,
          "data": "d", "wall_s": 60.0, "params": 1}
  a = [_run("SGD", 0, 0.90, 0.01), _run("SAM", 0, 0.93, 0.02)]
  b = [_run("SAM", 0, 0.50, 0.02), _run("SGD", 1, 0.92, 0.01), _run("SAM", 1, 0.95, 0.02)]
  for name, runs, wall in (("a", a, 60.0), ("b", b, 120.0)):
    (tmp_path / name).mkdir()
    C.write_results(tmp_path / name / "label_noise", benchmark="bench_label_noise",
                    meta=dict(meta, wall_s=wall),
                    details={"config": config, "grid": [], "runs": runs})
  (tmp_path / "c").mkdir()
  C.write_results(tmp_path / "c" / "label_noise", benchmark="bench_label_noise", meta=meta,
                  details={"config": dict(config, epochs=5), "grid": [], "runs": b})
  with pytest.raises(SystemExit, match="other settings"):
    bl.main(["--out", str(tmp_path / "a"), "--merge", str(tmp_path / "c" / "label_noise.json")])
  bl.main(["--out", str(tmp_path / "a"), "--merge", str(tmp_path / "b" / "label_noise.json")])
  doc = C.read_results(tmp_path / "a" / "label_noise.json")
  got = {(r["seed"], r["optimizer"]): r["eval_acc_final"] for r in doc["details"]["runs"]}
  # The first file's run wins for a key both have; the others are added.
  assert got == {(0, "SGD"): 0.90, (0, "SAM"): 0.93, (1, "SGD"): 0.92, (1, "SAM"): 0.95}
  assert doc["meta"]["wall_s"] == 120.0
  sam = [c for c in doc["details"]["claims"] if c["worse"] == "SGD" and c["better"] == "SAM"
         and c["metric"] == "eval_acc_final"]
  assert sam[0]["n"] == 2 and sam[0]["diffs"] == pytest.approx([0.03, 0.03])
