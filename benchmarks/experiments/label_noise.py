"""Is SAM far more robust than SGD to noisy training labels (Foret et al. 2021, §3.3)? The same
question for IRE, mSAM, SALA and Lookahead, on MNIST with 20% and 40% symmetric label noise
(fixed per example and seed), clean test labels; SGD's learning rate chosen once on a held-out
part of the noisy training set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks import metrics
from benchmarks.render import fill, table
from benchmarks.spec import Arm, Experiment, Task

IRE = {"ire": True, "ire_kappa": 2.0, "ire_gamma": 0.8, "ire_refresh_every": 10,
       "ire_curvature": "fisher", "ire_warmup": 0.35}
SAM = {"name": "sam", "rho": 0.05}
SPEC = Experiment(
    name="label_noise", claim="SAM keeps a much higher clean test accuracy than SGD under "
    "label noise (Foret et al. 2021, §3.3)",
    tasks=tuple(Task("cnn", "mnist", {"label_noise": n}, name=f"noise-{n}") for n in (0.2, 0.4)),
    arms=(Arm("SGD"), Arm("SGD+IRE", IRE), Arm("SAM", SAM), Arm("SAM+IRE", {**SAM, **IRE}),
          Arm("mSAM-8", {"name": "msam", "rho": 0.05, "num_microbatches": 8,
                         "microbatch_mode": "unroll"}),
          Arm("SALA", {"name": "sala", "rho": 0.2, "sala_sync_period": 2, "sala_slow_step": 0.5}),
          Arm("Lookahead", {"name": "lookahead", "la_sync_period": 5, "la_slow_step": 0.8})),
    seeds=(0, 1, 2), steps=1360,
    metrics=("eval_acc_final", "eval_acc_best", "train_acc_noisy", "memorised", "top_eig"),
    baseline="SGD")
OPTIMIZERS = tuple(a.label for a in SPEC.arms)
# The claims tested, paired by seed: (worse, better).
CLAIMS = (("SGD", "SAM"), ("SGD", "SGD+IRE"), ("SAM", "SAM+IRE"), ("SGD", "mSAM-8"),
          ("SGD", "SALA"), ("SGD", "Lookahead"))
COLUMNS = {"eval_acc_final": ("final clean test acc (%)", ".2f"),
           "eval_acc_best": ("best clean test acc (%)", ".2f"),
           "train_acc_noisy": ("train acc on noisy labels (%)", ".1f"),
           "memorised": ("corrupted labels memorised (%)", ".1f"),
           "top_eig": ("top Hessian eig", ".3g")}


def aggregate(runs: list[dict]) -> list[dict]:
  """Per noise rate and optimizer (in table order): mean and std over seeds, time over SGD's."""
  aggs = metrics.aggregate(runs, ("noise", "optimizer"), SPEC.metrics,
                           lambda r: (r["noise"], "SGD"))
  return sorted(aggs, key=lambda a: (a["noise"], OPTIMIZERS.index(a["optimizer"])))


def claims(runs: list[dict]) -> list[dict]:
  """Every claim at every noise rate, on the final and the best clean test accuracy."""
  found = [dict(metrics.paired(runs, {"noise": n}, worse, better, key) or {}, metric=key)
           for n in sorted({r["noise"] for r in runs}) for worse, better in CLAIMS
           for key in ("eval_acc_final", "eval_acc_best")]
  return [f for f in found if "mean" in f]


def cell(a: Mapping[str, Any], key: str) -> str:
  scale = 1.0 if key == "top_eig" else 100.0
  return f"{scale * a[key]:{COLUMNS[key][1]}} ± {scale * a[key + '_std']:{COLUMNS[key][1]}}"


def render(results: Mapping[str, Any]) -> dict[str, str]:
  doc = results["label_noise"]
  if doc is None:
    return {}
  meta, det = doc["meta"], doc["details"]
  aggs, found = aggregate(det["runs"]), claims(det["runs"])
  noises = sorted({a["noise"] for a in aggs})
  pct = lambda x: f"{round(100 * x)}%"  # noqa: E731
  tables = "\n\n".join(f"## {pct(n)} label noise\n\n" + table(
      ["optimizer", *(c[0] for c in COLUMNS.values()), "time / SGD"],
      [[a["optimizer"], *(cell(a, k) for k in COLUMNS), f"{a['time_ratio']:.2f}"]
       for a in aggs if a["noise"] == n], "l" + "r" * 6) for n in noises)
  sam = [c for c in found if (c["worse"], c["better"], c["metric"]) ==
         ("SGD", "SAM", "eval_acc_final")]
  by_opt = {o: {a["noise"]: a for a in aggs if a["optimizer"] == o} for o in OPTIMIZERS}
  flatter = {n: [o for o in OPTIMIZERS if by_opt[o][n]["top_eig"] < by_opt["SGD"][n]["top_eig"]]
             for n in noises}
  ctx = {
      "meta": meta, "c": meta["config"], "tables": tables,
      "grid": table(["SGD learning rate", "held-out acc, noisy labels (%) final", "best"],
                    [[f"{g['lr']:g}" + (" (chosen)" if g["lr"] == meta["lr"] else ""),
                      f"{100 * g['eval_acc_final']:.2f}", f"{100 * g['eval_acc_best']:.2f}"]
                     for g in det["grid"]], "rrr"),
      "claims": table(["noise", "claim", "metric", "Δ clean test acc (pp), mean ± std",
                       "per seed", "verdict"],
                      [[pct(c["noise"]), f"{c['worse']} < {c['better']}",
                        "final" if c["metric"] == "eval_acc_final" else "best",
                        f"{100 * c['mean']:+.2f} ± {100 * c['std']:.2f}",
                        ", ".join(f"{100 * x:+.2f}" for x in c["diffs"]), c["verdict"]]
                       for c in found], "lllrll"),
      "summary": table(["optimizer"] + [f"{pct(n)} noise: final / best test acc %"
                                        for n in noises]
                       + [f"{pct(n)} noise: memorised %" for n in noises],
                       [[o] + [f"{100 * by_opt[o][n]['eval_acc_final']:.2f} / "
                               f"{100 * by_opt[o][n]['eval_acc_best']:.2f}" for n in noises]
                        + [f"{100 * by_opt[o][n]['memorised']:.1f}" for n in noises]
                        for o in OPTIMIZERS if by_opt[o]], "l" + "r" * 2 * len(noises)),
      "sam": "; ".join(f"{pct(c['noise'])} noise {100 * c['mean']:+.2f} ± {100 * c['std']:.2f} "
                       f"pp ({c['verdict']})" for c in sam),
      "max_memorised": 100 * max(r["memorised"] for r in det["runs"]),
      "max_drop": 100 * max(r["eval_acc_best"] - r["eval_acc_final"] for r in det["runs"]),
      "flatter": "; ".join(f"{pct(n)} noise: {', '.join(flatter[n]) or 'none'}"
                           for n in noises),
      "beyond": "; ".join(f"{c['worse']} < {c['better']} at {pct(c['noise'])} noise "
                          f"({'final' if c['metric'] == 'eval_acc_final' else 'best'}: "
                          f"{100 * c['mean']:+.2f} pp, {c['verdict']})" for c in found
                          if "2 SE" in c["verdict"]) or "none",
      "n_seeds": len(meta["config"]["seeds"]),
      "params": meta.get("params", 0)}
  return {"benchmarks/results/label_noise.md": fill("label_noise.md", ctx),
          "benchmarks/results/label_noise_summary.md": fill("label_noise_summary.md", ctx)}
