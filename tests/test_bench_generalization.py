"""benchmarks/experiments/generalization.py: the aggregation, the paired orderings, the cost
rows and the reports rendered from the committed results."""

import argparse
import dataclasses
import math

import pytest

from benchmarks import metrics, render
from benchmarks.experiments import generalization as gen


def _row(opt, seed, acc, t, model="resnet", dataset="digits"):
  return {"model": model, "dataset": dataset, "optimizer": opt, "seed": seed, "test_acc": acc,
          "test_loss": 1.0 - acc, "train_loss": 0.1, "top_eig": 10.0 * acc, "trace": 5.0,
          "time_per_step_s": t}


ROWS = [_row("SGD", 0, 0.90, 0.010), _row("SGD", 1, 0.92, 0.020), _row("SGD", 2, 0.91, 0.010),
        _row("SAM", 0, 0.93, 0.021), _row("SAM", 1, 0.95, 0.036), _row("SAM", 2, 0.94, 0.025),
        _row("SGD+IRE", 0, 0.89, 0.011), _row("SGD+IRE", 1, 0.93, 0.022),
        _row("SGD+IRE", 2, 0.91, 0.012), _row("mSAM-4", 0, 0.9, 0.05)]


def test_mean_std_and_verdicts_on_hand_made_numbers():
  assert metrics.mean_std([1.0, 2.0, 3.0]) == (2.0, pytest.approx(1.0))
  assert metrics.mean_std([4.0]) == (4.0, 0.0)
  assert metrics.mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
  assert metrics.verdict({"mean": 0.03, "se": 0.01, "n": 3}).startswith("reproduced")
  assert metrics.verdict({"mean": 0.01, "se": 0.01, "n": 3}) == "same direction, within noise"
  assert metrics.verdict({"mean": -0.03, "se": 0.01, "n": 3}).startswith("reversed")
  assert metrics.verdict({"mean": 0.03, "se": float("nan"), "n": 1}).startswith("one seed")


def test_aggregate_pairs_each_time_with_the_same_seeds_base():
  aggs = {a["optimizer"]: a for a in gen.aggregate(ROWS)}
  assert list(aggs) == ["SGD", "SAM", "SGD+IRE", "mSAM-4"]  # run order kept
  assert aggs["SAM"]["test_acc"] == pytest.approx(0.94)
  assert aggs["SAM"]["test_acc_std"] == pytest.approx(0.01)
  assert aggs["SAM"]["time_ratio"] == pytest.approx(2.1)  # median of 2.1, 1.8, 2.5
  assert aggs["SGD+IRE"]["time_ratio"] == pytest.approx(1.1)
  assert aggs["SGD"]["time_ratio"] == 1.0 and aggs["SGD"]["n"] == 3


def test_orderings_are_paired_by_seed():
  found = {(f["worse"], f["better"]): f for f in gen.orderings(ROWS)}
  assert set(found) == {("SGD", "SGD+IRE"), ("SGD", "SAM")}  # no SAM+IRE run
  d = found["SGD", "SAM"]
  assert d["diffs"] == pytest.approx([0.03, 0.03, 0.03]) and d["verdict"].startswith(
      "reproduced")
  d = found["SGD", "SGD+IRE"]
  assert d["diffs"] == pytest.approx([-0.01, 0.01, 0.0])
  assert d["se"] == pytest.approx(0.01 / math.sqrt(3))
  assert d["mean"] == pytest.approx(0.0, abs=1e-12) and d["verdict"].endswith("within noise")


def test_cost_rows_name_optimizers_as_the_cost_table_does():
  rows = {(r.optimizer, r.variant): r for r in gen.result_rows(gen.aggregate(ROWS))}
  assert set(rows) == {("SAM", ""), ("SGD+IRE", "fisher"), ("mSAM", "m=4")}
  assert rows["mSAM", "m=4"].value == pytest.approx(5.0)
  assert all(r.base == "SGD" and not r.interleaved and r.task == "ResNet-8, digits"
             for r in rows.values())


def test_spec_declares_every_arm_once_per_model():
  assert [t.key for t in gen.SPEC.tasks] == ["resnet-digits", "resnet-mnist", "vit-digits",
                                             "vit-mnist"]
  assert "mSAM-8" not in gen.SPEC.tasks[2].arms and "mSAM-8" in gen.SPEC.tasks[0].arms
  assert {t.overrides["steps"] for t in gen.SPEC.tasks} == {150, 200}


def test_reports_are_rendered_from_the_committed_results():
  for target, text in gen.render(render.Results()).items():
    assert (render.ROOT / target).read_text() == text, f"stale {target}"


def test_rows_of_the_committed_runs_are_the_committed_rows():
  doc = render.Results()["generalization"]
  rows = gen.result_rows(gen.aggregate(doc["details"]["runs"]))
  assert [dataclasses.asdict(r) for r in rows] == [
      pytest.approx(r) for r in doc["rows"]]


@pytest.mark.slow  # trains (compiles) several optimizers
def test_smoke_run_measures_every_run(tmp_path):
  spec = dataclasses.replace(gen.SPEC.smoke["tasks"][0], arms=("base", "SAM+IRE"))
  spec = dataclasses.replace(gen.SPEC, seeds=(0,), tasks=(spec,))
  gen.run(spec, argparse.Namespace(smoke=True, out=str(tmp_path), data_dir=None))
  doc = render.Results(tmp_path)["generalization"]
  rows = doc["details"]["runs"]
  assert [r["optimizer"] for r in rows] == ["SGD", "SAM+IRE"]
  for r in rows:
    assert 0.0 <= r["test_acc"] <= 1.0
    for k in ("test_loss", "train_loss", "top_eig", "trace", "time_per_step_s"):
      assert math.isfinite(r[k]), k
  assert [(r["optimizer"], r["metric"]) for r in doc["rows"]] == [("SAM+IRE", "time_ratio")]
  assert "| SAM+IRE |" in gen.render(render.Results(tmp_path))[
      "benchmarks/results/generalization.md"]
