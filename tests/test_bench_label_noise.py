"""benchmarks/experiments/label_noise.py and sala.py: aggregation, paired claims and the
reports rendered from the committed results."""

import pytest

from benchmarks import render
from benchmarks.experiments import label_noise as ln
from benchmarks.experiments import sala


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
