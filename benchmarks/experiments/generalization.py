"""Do IRE and the SAM family improve generalization? The examples' ResNet-8 and ViT.

Test metrics, sharpness and time per step of every optimizer (what each means: the template).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import metrics, runner, schema, timing
from benchmarks.render import fill, paired_cells, pm, table
from benchmarks.spec import Arm, Experiment, Task

BASE = {"resnet": "SGD", "vit": "AdamW"}
MODELS = {"resnet": "ResNet-8", "vit": "ViT"}
IRE = {"ire": True, "ire_kappa": 2.0, "ire_gamma": 0.8, "ire_refresh_every": 10,
       "ire_curvature": "fisher"}
SAM = {"name": "sam", "rho": 0.05}
ARMS = (Arm("base"), Arm("base+IRE", IRE), Arm("SAM", SAM), Arm("SAM+IRE", {**SAM, **IRE}),
        Arm("ASAM", {"name": "asam", "rho": 1.0}),
        Arm("mSAM-4", {"name": "msam", "rho": 0.05, "num_microbatches": 4}),
        Arm("mSAM-8", {"name": "msam", "rho": 0.05, "num_microbatches": 8}),
        Arm("SALA", {"name": "sala", "rho": 0.2, "sala_sync_period": 2, "sala_slow_step": 0.5}),
        Arm("Lookahead", {"name": "lookahead", "la_sync_period": 5, "la_slow_step": 0.8}))
# ResNet: SGD momentum 0.9, L2 5e-4, lr 0.1 cosine, IRE on after 35% (the paper's CIFAR
# setting); ViT: AdamW, wd 0.05, 5% warm-up, IRE on after it (the paper's AdamW setting).
MODEL = {
    "resnet": {"model": {"size": "toy", "depth": 8, "width": 8}, "optimizer": {
        "name": "sgd", "base": "sgd", "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9,
        "warmup_steps": 0, "ire_warmup": 0.35}},
    "vit": {"model": {"size": "toy", "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64},
            "optimizer": {"name": "adamw", "base": "adamw", "lr": 1e-3, "weight_decay": 0.05,
                          "warmup_steps": 0.05}}}
STEPS = {"digits": 200, "mnist": 150}
LOOP = {"batch_size": 64, "eval_every": 0, "log_every": 1}
ALL = tuple(a.label for a in ARMS)


def task(example: str, data: str, arms: Sequence[str] = ALL, **loop: Any) -> Task:
  return Task(example, data, {**MODEL[example], "steps": STEPS[data], **LOOP, **loop},
              name=f"{example}-{data}", arms=tuple(arms))


SMOKE_ARMS = {"resnet": ("base", "base+IRE", "SAM", "mSAM-4", "Lookahead"),
              "vit": ("base", "SAM+IRE", "ASAM", "mSAM-8", "SALA")}
SPEC = Experiment(
    name="generalization", claim="IRE and the SAM family raise test accuracy and find flatter "
    "minima (Foret et al. 2021; Wang et al. 2024; Tan et al. 2024)",
    tasks=(task("resnet", "digits"), task("resnet", "mnist"),
           task("vit", "digits", ALL[:6] + ALL[7:]), task("vit", "mnist", ALL[:6] + ALL[7:])),
    arms=ARMS, seeds=(0, 1, 2), steps=200,
    metrics=("test_acc", "test_loss", "train_loss", "top_eig", "trace", "time_per_step_s"),
    baseline="base",
    smoke={"seeds": (0,), "tasks": tuple(
        task(m, "digits", SMOKE_ARMS[m], steps=4, batch_size=32, fast_compile=True,
             model={**MODEL[m]["model"], "width": 4} if m == "resnet" else {"size": "toy"})
        for m in MODEL)})
SHARPNESS = {"batch": 256, "lanczos_iters": 20, "hutchinson_samples": 10}
SMOKE_SHARPNESS = {"batch": 32, "lanczos_iters": 4, "hutchinson_samples": 2}
# The report's per-model columns: metric -> (header, format, scale).
COLUMNS = {"test_acc": ("test acc (%)", ".2f", 100), "test_loss": ("test loss", ".4f", 1),
           "train_loss": ("final train loss", ".4f", 1), "top_eig": ("top eig", ".3g", 1),
           "trace": ("trace", ".3g", 1)}
# The cost table's names of the arms (default: the label, no variant).
COST_NAMES = {"mSAM-4": ("mSAM", "m=4"), "mSAM-8": ("mSAM", "m=8"),
              "SGD+IRE": ("SGD+IRE", "fisher"), "AdamW+IRE": ("AdamW+IRE", "fisher")}
# The papers' orderings, tested paired by seed: (model, worse, better).
ORDERINGS = (("resnet", "SGD", "SGD+IRE"), ("resnet", "SAM", "SAM+IRE"), ("resnet", "SGD", "SAM"),
             ("vit", "AdamW", "AdamW+IRE"), ("vit", "SAM", "SAM+IRE"), ("vit", "AdamW", "SAM"))


def measure(sharp: Mapping[str, int]) -> runner.Measure:
  """The runner's hook: sharpness on the first training examples (the HVP loops unrolled for
  the ResNet: XLA:CPU runs convolutions in rolled loops slowly)."""
  def hook(cfg: Any, result: Any) -> dict[str, Any]:
    from examples.common import train
    from examples.common.data import ImageData

    d, n = train.load_data(cfg), sharp["batch"]
    assert isinstance(d, ImageData)
    return runner.sharpness(result, {"x": d.x_train[:n], "y": d.y_train[:n]},
                            lanczos_iters=sharp["lanczos_iters"],
                            hutchinson_samples=sharp["hutchinson_samples"],
                            unroll=cfg.example == "resnet", fast_compile=cfg.fast_compile)
  return hook


def row(task: str, seed: str, arm: str, r: Mapping[str, Any]) -> dict[str, Any]:
  """One run as the report reads it: test metrics, the last 10% of steps' training loss."""
  model, data = task.split("-", 1)
  tail = [v for s, v in r["loss_curve"] if s > r["steps"] - max(1, math.ceil(0.1 * r["steps"]))]
  return {"model": model, "dataset": data, "optimizer": arm.replace("base", BASE[model]),
          "seed": int(seed), "steps": r["steps"], "params": r["params"],
          "test_acc": r["final_eval_acc"], "test_loss": r["final_eval_loss"],
          "train_loss": statistics.fmean(tail) if tail else float("nan"),
          "top_eig": r["top_eig"], "trace": r["trace"], "time_per_step_s": r["s_per_step"],
          "first_step_s": r["first_step_s"], "wall_s": r["wall_s"]}


def run(spec: Experiment, args: argparse.Namespace) -> None:
  sharp = SMOKE_SHARPNESS if args.smoke else SHARPNESS
  out, t0 = Path(args.out or schema.RESULTS), time.perf_counter()
  runs = runner.run_all(spec, out=out, data_dir=args.data_dir, measure=measure(sharp),
                        extra=sharp)
  rows = [row(t, s, a, r) for t, per in runs.items() for s, arms in per.items()
          for a, r in arms.items()]
  meta = {"date": runner.now(), "machine": timing.machine()["summary"],
          "total_wall_s": time.perf_counter() - t0, "command": runner.command("generalization"),
          "num_runs": len(rows), "seeds": list(spec.seeds), "sharpness": sharp,
          "steps_text": ", ".join(f"{t.data} {t.overrides['steps']} steps" for t in spec.tasks
                                  if t.example == "resnet")
          + f" of batch {spec.tasks[0].overrides['batch_size']}",
          "data": [t.data for t in spec.tasks if t.example == "resnet"],
          "models": {m: f"{MODELS[m]}: " + ", ".join(f"{r['params']:,} params on {r['dataset']}"
                                                    for r in rows if r["model"] == m
                                                    and r["optimizer"] == BASE[m]
                                                    and r["seed"] == spec.seeds[0])
                     for m in dict.fromkeys(t.example for t in spec.tasks)},
          "model_argv": {t.example: settings({**t.overrides["model"], **t.overrides["optimizer"]})
                         for t in spec.tasks},
          "optimizers": {a.label: {m: settings(a.optimizer) for m in MODEL} for a in spec.arms}}
  schema.write_results(out / spec.name, benchmark="generalization", meta=meta,
                       rows=result_rows(aggregate(rows)),
                       details={"runs": rows, "orderings": orderings(rows)})


def aggregate(rows: list[dict]) -> list[dict]:
  """Per model, data set and optimizer: mean and std over seeds, time over the base's."""
  return metrics.aggregate(rows, ("model", "dataset", "optimizer"), SPEC.metrics,
                           lambda r: (r["model"], r["dataset"], BASE[r["model"]]))


def orderings(rows: list[dict]) -> list[dict]:
  """The papers' orderings, paired by seed: test-accuracy difference and verdict."""
  found = [metrics.paired(rows, {"model": m, "dataset": d}, worse, better, "test_acc")
           for m, d in dict.fromkeys((r["model"], r["dataset"]) for r in rows)
           for om, worse, better in ORDERINGS if om == m]
  return [f for f in found if f is not None]


def result_rows(aggs: list[dict]) -> list[schema.Row]:
  """The time-per-step ratios to the base (whole runs one after another: not interleaved)."""
  out = []
  for a in aggs:
    base = BASE[a["model"]]
    if a["optimizer"] == base or not math.isfinite(a["time_ratio"]):
      continue
    name, variant = COST_NAMES.get(a["optimizer"], (a["optimizer"], ""))
    out.append(schema.time_row(name, base, f"{MODELS[a['model']]}, {a['dataset']}", "train step",
                               a["time_ratio"], "generalization",
                               f"median of {a['n']} seeds", variant, interleaved=False,
                               n=a["n"]))
  return out


def settings(overrides: Mapping[str, Any]) -> str:
  """An optimizer's or model's settings as the report shows them."""
  return ", ".join(f"{k}={v}" for k, v in overrides.items())


def render(results: Mapping[str, Any]) -> dict[str, str]:
  doc = results["generalization"]
  if doc is None:
    return {}
  meta, rows = doc["meta"], doc["details"]["runs"]
  aggs, found = aggregate(rows), orderings(rows)
  combos = list(dict.fromkeys((a["model"], a["dataset"]) for a in aggs))
  sections = "\n\n".join(
      f"## {meta['models'][m].split(':')[0]} on {d}\n\n" + table(
          ["optimizer", *(c[0] for c in COLUMNS.values()), "ms/step", "time ratio"],
          [[a["optimizer"], *(pm(a[k], a[k + "_std"], f, s) for k, (_, f, s) in COLUMNS.items()),
            f"{1e3 * a['time_per_step_s']:.1f}", f"{a['time_ratio']:.2f}x"]
           for a in aggs if (a["model"], a["dataset"]) == (m, d)])
      for m, d in combos)
  by_name: dict[str, dict] = {}
  for a in aggs:
    by_name.setdefault(a["optimizer"].replace(BASE[a["model"]], "base"), {})[
        a["model"], a["dataset"]] = a
  timed = [c for c in combos if c[1] == "mnist"] or combos[:1]
  name = lambda m, d: f"{MODELS[m].split('-')[0]} {d}"  # noqa: E731
  summary = table(["optimizer"] + [f"{name(*c)} acc %" for c in combos]
                  + [f"{name(*c)} time" for c in timed],
                  [[o] + [pm(cells[c]["test_acc"], cells[c]["test_acc_std"], scale=100)
                          if c in cells else "-" for c in combos]
                   + [f"{cells[c]['time_ratio']:.2f}x" if c in cells else "-" for c in timed]
                   for o, cells in by_name.items()])
  claims = table(["model", "data", "claim", "Δ test acc (pp), paired mean ± std", "per seed",
                  "verdict"],
                 [[f["model"], f["dataset"], f"{f['worse']} < {f['better']}", *paired_cells(f)]
                  for f in found])
  ran = {(label, m) for label, cells in by_name.items() for m, _ in cells}
  opts = table(["optimizer", *(MODELS[m] for m in meta["model_argv"])],
               [[label, *(v if (label, m) in ran else "not run" for m, v in per.items())]
                for label, per in meta["optimizers"].items()])
  ctx = {"meta": meta, "sh": meta["sharpness"], "wall_min": meta["total_wall_s"] / 60,
         "data": "; ".join(meta["data"]), "sections": sections, "claims": claims,
         "summary": summary, "optimizers": opts, "n_seeds": len(meta["seeds"]),
         "models": "\n".join(f"- {meta['models'][m]}; {meta['model_argv'][m]}"
                             for m in meta["models"]),
         "seeds": ", ".join(map(str, meta["seeds"]))}
  return {"benchmarks/results/generalization.md": fill("generalization.md", ctx),
          "benchmarks/results/generalization_summary.md": fill("generalization_summary.md",
                                                               ctx)}
