"""benchmarks/experiments/label_noise.py and sala.py: aggregation, paired claims and the
reports rendered from the committed results."""

import argparse
import dataclasses
import math

import numpy as np
import pytest

from benchmarks import render
from benchmarks.experiments import label_noise as ln
from benchmarks.experiments import sala
from benchmarks.spec import smoke


def _run(opt, seed, noise, final, best, t=0.01):
  return {"optimizer": opt, "seed": seed, "noise": noise, "eval_acc_final": final,
          "eval_acc_best": best, "train_acc_noisy": 0.8, "memorised": 0.01, "top_eig": 3.0,
          "time_per_step_s": t}


RUNS = [_run("SAM", s, 0.2, 0.91 + 0.01 * s, 0.92, 0.02) for s in range(3)] + [
    _run("SGD", s, 0.2, 0.90, 0.92) for s in range(3)] + [_run("SGD", 0, 0.4, 0.8, 0.8)]


def test_aggregate_in_table_order_with_time_over_sgds():
  aggs = ln.aggregate(RUNS)
  assert [(a["noise"], a["optimizer"]) for a in aggs] == [(0.2, "SGD"), (0.2, "SAM"),
                                                          (0.4, "SGD")]
  assert aggs[1]["eval_acc_final"] == pytest.approx(0.92)
  assert aggs[1]["time_ratio"] == pytest.approx(2.0) and aggs[0]["time_ratio"] == 1.0


def test_claims_pair_seeds_on_final_and_best_accuracy():
  found = ln.claims(RUNS)
  assert [(c["noise"], c["worse"], c["better"], c["metric"]) for c in found] == [
      (0.2, "SGD", "SAM", "eval_acc_final"), (0.2, "SGD", "SAM", "eval_acc_best")]
  assert found[0]["diffs"] == pytest.approx([0.01, 0.02, 0.03])
  assert found[0]["verdict"].startswith("reproduced")
  assert found[1]["mean"] == pytest.approx(0.0) and found[1]["verdict"] == "tie"


@pytest.mark.parametrize("module", [ln, sala])
def test_reports_are_rendered_from_the_committed_results(module):
  for target, text in module.render(render.Results()).items():
    assert (render.ROOT / target).read_text() == text, f"stale {target}"


def test_noisy_labels_are_fixed_per_example_and_always_wrong_when_corrupted():
  y = np.random.default_rng(0).integers(0, 10, 20_000).astype(np.int32)
  noisy, corrupted = ln.noisy_labels(y, 0.4, seed=3)
  again, corrupted2 = ln.noisy_labels(y, 0.4, seed=3)
  np.testing.assert_array_equal(noisy, again)  # a pure function of (seed, rate)
  np.testing.assert_array_equal(corrupted, corrupted2)
  assert abs(corrupted.mean() - 0.4) < 0.015
  assert np.all(noisy[corrupted] != y[corrupted]) and np.all(noisy[~corrupted] == y[~corrupted])
  counts = np.bincount((noisy[corrupted] - y[corrupted]) % 10, minlength=10)
  assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()  # uniform over others
  assert np.mean(ln.noisy_labels(y, 0.4, seed=4)[0] != noisy) > 0.3
  np.testing.assert_array_equal(ln.noisy_labels(y, 0.0, seed=3)[0], y)


def test_pool_means_2x2_blocks():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  np.testing.assert_allclose(ln.pool(x)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])


@pytest.mark.parametrize("name", ["label_noise", "sala"])
def test_rows_of_the_committed_runs_are_the_committed_rows(name):
  doc = render.Results()[name]
  rows = (ln.result_rows(ln.aggregate(doc["details"]["runs"])) if name == "label_noise"
          else sala.result_rows(doc["details"]))
  assert [dataclasses.asdict(r) for r in rows] == [
      pytest.approx(r) for r in doc["rows"]]


@pytest.mark.slow  # trains (compiles) several optimizers
def test_label_noise_smoke_run_measures_memorisation(tmp_path):
  spec = dataclasses.replace(smoke(ln.SPEC), arms=ln.SPEC.arms[:3:2])  # SGD, SAM
  ln.run(spec, argparse.Namespace(smoke=True, out=str(tmp_path), data_dir=None))
  doc = render.Results(tmp_path)["label_noise"]
  runs = doc["details"]["runs"]
  assert [r["optimizer"] for r in runs] == ["SGD", "SAM"] and doc["meta"]["lr"] == 0.1
  for r in runs:
    assert len(r["eval_acc_curve"]) == ln.SMOKE["epochs"]
    assert 0.3 < r["corrupted_fraction"] < 0.5 and 0 <= r["memorised"] <= 1
    assert math.isfinite(r["top_eig"])
  assert "| 40% | SGD < SAM | final |" in ln.render(render.Results(tmp_path))[
      "benchmarks/results/label_noise.md"]


@pytest.mark.slow  # trains (compiles) several optimizers
def test_sala_smoke_run_times_every_chunk_of_every_optimizer(tmp_path):
  sala.run(sala.SPEC, argparse.Namespace(smoke=True, out=str(tmp_path), data_dir=None))
  d = render.Results(tmp_path)["sala"]["details"]
  (run,) = d["runs"]
  rounds = len(run["steps_per_round"])
  assert run["steps"] == rounds * sala.SMOKE["chunk"]
  assert all(len(t) == rounds and min(t) > 0 for t in run["times"].values())
  assert run["sala_cycles"] == run["steps"] // sala.SMOKE["sala"]["k"]
  (cost,) = d["step_costs"].values()
  assert cost["all_finite"] and cost["sala_stage2_fraction"]["sala k=2 (rho=0)"] == 0.0
  assert "## Step cost" in sala.render(render.Results(tmp_path))["benchmarks/results/sala.md"]
