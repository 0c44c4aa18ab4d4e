"""SALA against its base, Lookahead and SAM: a real MNIST training run (MLP 784-512-256-10)
with the optimizers interleaved chunk by chunk in one process, and the train step's cost on a
fixed batch at three sizes. Reported: SALA's stage-2 fraction, the gradient-evaluation ratio
(exact, from ``sala_stats``) and the time ratio against the base, measured and expected
(1 + fraction / k), the final training loss and the test accuracy (slow weights for SALA and
Lookahead).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from benchmarks.render import fill, table
from benchmarks.spec import Micro

SPEC = Micro(name="sala", measures="train-step time over the base's (SGD, Nesterov momentum)",
             blocks=("base", "lookahead", "sam", "sala"), baseline="base",
             sizes=((256, 128), (512, 256), (1024, 1024)), reps=30)


def render(results: Mapping[str, Any]) -> dict[str, str]:
  doc = results["sala"]
  if doc is None:
    return {}
  d = doc["details"]
  c, costs = d["config"], d["step_costs"]
  runs = d["runs"]
  labels = list(next(iter(costs.values()))["ratios"])
  fractions = {n: min(x["sala_stage2_fraction"][n] for x in costs.values())
               for n in next(iter(costs.values()))["sala_stage2_fraction"]}
  ctx = {
      "c": c, "runs": runs, "steps": runs[0]["steps"],
      "rounds": sum(len(r["times"]["base"]) - 1 for r in runs),
      "base_ms": 1e3 * statistics.median(
          t / m for r in runs for t, m in zip(r["times"]["base"][1:], r["steps_per_round"][1:],
                                               strict=True)),
      "chunk": runs[0]["steps_per_round"][0],
      "training": table(
          ["optimizer", "time ratio vs base, median (IQR)", "grad-eval ratio", "expected ratio",
           "final train loss", "test acc. (%)"],
          [[n, f"{s['time_ratio_median']:.3f} ({s['time_ratio_q25']:.2f}–"
               f"{s['time_ratio_q75']:.2f})", f"{s['grad_eval_ratio']:.3f}",
            f"{s['expected_ratio']:.3f}", f"{s['train_loss']:.4f}", f"{100 * s['test_acc']:.2f}"]
           for n, s in d["summary"].items()]),
      "extra": sum(r["sala_extra_grads"] for r in runs),
      "cycles": sum(r["sala_cycles"] for r in runs),
      "fraction": 100 * d["stage2_fraction"],
      "per_epoch": ", ".join(f"{f:.2f}" for f in d["stage2_fraction_per_epoch"]),
      "costs": table(["MLP", "params", "base step (median, ms)", *labels],
                     [[k, f"{x['params']:,}", f"{x['base_step_ms']:.2f}"]
                      + [f"{x['min_ratios'][n]:.2f} ({x['ratios'][n]:.2f})" for n in labels]
                      for k, x in costs.items()]),
      "fractions": ", ".join(f"{n} {v:.2f}" for n, v in fractions.items()),
      "finite": all(x["all_finite"] for x in costs.values())}
  return {"benchmarks/results/sala.md": fill("sala.md", ctx)}
