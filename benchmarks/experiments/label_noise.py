"""Robustness to noisy labels: SAM (Foret et al. 2021, §3.3), IRE, mSAM, SALA, Lookahead.

A small CNN on MNIST with symmetric label noise, clean test labels (the setting: the template).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import data, metrics, runner, schema, timing
from benchmarks.render import fill, paired_cells, pm, table
from benchmarks.spec import Arm, Experiment, Task

# Every setting, as the results record it (the arms and the model are built from it).
CONFIG: dict[str, Any] = {
    "pool": 2, "epochs": 10, "batch": 128, "noise": [0.2, 0.4], "lr_grid": [0.01, 0.03, 0.1],
    "momentum": 0.9, "weight_decay": 5e-4, "sam_rho": 0.05, "msam_m": 8,
    "ire": {"kappa": 2.0, "gamma": 0.8, "refresh_every": 10, "curvature": "fisher"},
    "ire_start": 0.35, "sala": {"sync_period": 2, "slow_step_size": 0.5, "rho": 0.2},
    "lookahead": {"sync_period": 5, "slow_step_size": 0.8},
    "model": {"channels": [8, 16], "strides": [2, 2], "dense": [256], "flatten": True},
    "sharpness": {"batch": 1024, "lanczos_iters": 20}}
SMOKE = {**CONFIG, "epochs": 2, "noise": [0.4], "lr_grid": [0.1],
         "sharpness": {"batch": 128, "lanczos_iters": 3}}
GRID_HOLDOUT = 2000  # the learning-rate grid scores SGD on the last training images
IRE = {"ire": True, **{f"ire_{k}": v for k, v in CONFIG["ire"].items()},
       "ire_warmup": CONFIG["ire_start"]}
SAM = {"name": "sam", "rho": CONFIG["sam_rho"]}
# SGD (L2 on every parameter, cosine to 0, no warm-up), the base of every wrapper; the model
# is the CNN of CONFIG in place of the example's, on MNIST pooled 2x2.
SGD = {"name": "sgd", "base": "sgd", "momentum": CONFIG["momentum"], "warmup_steps": 0,
       "weight_decay": CONFIG["weight_decay"], "decay_mask": "all", "schedule": "cosine"}
LOOP = {"optimizer": SGD, "batch_size": CONFIG["batch"], "log_every": 50}
SPEC = Experiment(
    name="label_noise", claim="SAM keeps a much higher clean test accuracy than SGD under "
    "label noise (Foret et al. 2021, §3.3)",
    tasks=tuple(Task("resnet", "mnist", LOOP, name=f"noise-{n}") for n in CONFIG["noise"]),
    arms=(Arm("SGD"), Arm("SGD+IRE", IRE), Arm("SAM", SAM), Arm("SAM+IRE", {**SAM, **IRE}),
          Arm("mSAM-8", {"name": "msam", "rho": CONFIG["sam_rho"],
                         "num_microbatches": CONFIG["msam_m"], "microbatch_mode": "unroll"}),
          Arm("SALA", {"name": "sala", "rho": CONFIG["sala"]["rho"],
                       "sala_sync_period": CONFIG["sala"]["sync_period"],
                       "sala_slow_step": CONFIG["sala"]["slow_step_size"]}),
          Arm("Lookahead", {"name": "lookahead",
                            "la_sync_period": CONFIG["lookahead"]["sync_period"],
                            "la_slow_step": CONFIG["lookahead"]["slow_step_size"]})),
    seeds=(0, 1, 2), steps=0,  # CONFIG's epochs of the training set
    metrics=("eval_acc_final", "eval_acc_best", "train_acc_noisy", "memorised", "top_eig"),
    baseline="SGD", smoke={"seeds": (0,), "tasks": (Task("resnet", "digits", dict(
        LOOP, fast_compile=True), name="noise-0.4"),)})
OPTIMIZERS = tuple(a.label for a in SPEC.arms)
# The claims tested, paired by seed: (worse, better).
CLAIMS = (("SGD", "SAM"), ("SGD", "SGD+IRE"), ("SAM", "SAM+IRE"), ("SGD", "mSAM-8"),
          ("SGD", "SALA"), ("SGD", "Lookahead"))
COLUMNS = {"eval_acc_final": ("final clean test acc (%)", ".2f"),
           "eval_acc_best": ("best clean test acc (%)", ".2f"),
           "train_acc_noisy": ("train acc on noisy labels (%)", ".1f"),
           "memorised": ("corrupted labels memorised (%)", ".1f"),
           "top_eig": ("top Hessian eig", ".3g")}


def noisy_labels(y: np.ndarray, rate: float, seed: int, num_classes: int = 10
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``(labels, corrupted)``: each label replaced with probability ``rate`` by one of the
  other classes, uniformly; a pure function of ``(seed, rate)``."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), round(1000 * rate), 17]))
  corrupted = rng.random(len(y)) < rate
  shift = rng.integers(1, num_classes, len(y))
  return np.where(corrupted, (y + shift) % num_classes, y).astype(np.int32), corrupted


def measure(x: np.ndarray, y: np.ndarray, clean: np.ndarray, c: Mapping[str, Any]):
  """The runner's hook: accuracy on the noisy training labels, the corrupted labels the model
  predicts (memorised), the top Hessian eigenvalue on the first training examples."""
  def hook(cfg: Any, result: Any) -> dict[str, Any]:
    from examples.common import train

    params, stats = result.eval_params(), result.state.stats
    pred = np.concatenate([np.argmax(train.apply_model(result.graphdef, params, stats,
                                                       x[i:i + 2000], train=False)[0], -1)
                           for i in range(0, len(x), 2000)])
    bad, n = y != clean, c["sharpness"]["batch"]
    return {"train_acc_noisy": float(np.mean(pred == y)),
            "train_acc_clean": float(np.mean(pred == clean)),
            "memorised": float(np.mean(pred[bad] == y[bad])),
            "corrupted_fraction": float(np.mean(bad)),
            **runner.sharpness(result, {"x": x[:n], "y": y[:n]},
                               lanczos_iters=c["sharpness"]["lanczos_iters"],
                               fast_compile=cfg.fast_compile)}
  return hook


def row(r: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
  """One run as the report reads it: accuracy after every epoch, the measured metrics."""
  accs = [a for _, a in r["acc_curve"]]
  return {**fields, "steps": r["steps"], "params": r["params"], "eval_acc_final": accs[-1],
          "eval_acc_best": max(accs),
          "eval_acc_best_epoch": int(np.argmax(accs)) + 1, "eval_acc_curve": accs,
          "time_per_step_s": r["s_per_step"], "first_step_s": r["first_step_s"],
          "wall_s": r["wall_s"],
          **{k: r[k] for k in (*COLUMNS, "train_acc_clean", "corrupted_fraction") if k in r}}


def pool(x: np.ndarray) -> np.ndarray:
  """2x2 mean pooling of NHWC images (MNIST at 14x14: fast on one CPU core)."""
  n, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def run(spec: Experiment, args: argparse.Namespace) -> None:
  """SGD's learning rate from the grid (first noise rate, seed 0, the last training images
  held out, their labels noisy too), then every arm at every noise rate and seed."""
  c, out = (SMOKE if args.smoke else CONFIG), Path(args.out or schema.RESULTS)
  t0 = time.perf_counter()
  img = data.load_images(args.data_dir, require_mnist=not args.smoke)
  x, x_te, hold = pool(img.x_train), pool(img.x_test), 256 if args.smoke else GRID_HOLDOUT
  noise_of = {t.key: n for t, n in zip(spec.tasks, c["noise"], strict=True)}

  def inputs(task: Task, seed: int) -> dict[str, Any]:
    y = noisy_labels(img.y_train, noise_of.get(task.key, c["noise"][0]), seed)[0]
    net = data.small_net(in_shape=x.shape[1:], seed=seed, **c["model"])
    if task.key == "grid":  # scored on the held-out images' noisy labels
      return {"data": dataclasses.replace(img, x_train=x[:-hold], y_train=y[:-hold],
                                          x_test=x[-hold:], y_test=y[-hold:]), "model": net}
    return {"data": dataclasses.replace(img, x_train=x, y_train=y, x_test=x_te),
            "model": net, "measure": measure(x, y, img.y_train, c)}

  def steps(n: int, **opt: Any) -> dict[str, Any]:  # c's epochs of n images; eval per epoch
    return {"steps": c["epochs"] * (n // c["batch"]), "eval_every": n // c["batch"],
            "optimizer": {**SGD, **opt}}

  grid = dataclasses.replace(spec, name="label_noise_grid", seeds=(0,), tasks=(Task(
      "resnet", spec.tasks[0].data, {**LOOP, **steps(len(x) - hold)}, name="grid"),), arms=tuple(
      Arm(f"lr={lr:g}", {"lr": lr}) for lr in c["lr_grid"]), baseline=f"lr={c['lr_grid'][0]:g}")
  c = {**c, "data": data.describe_images(img)}  # hashed with every run: the images they get
  g = runner.run_all(grid, out=out, data_dir=args.data_dir, extra=c, inputs=inputs)
  grid_rows = [row(r, optimizer="SGD", lr=float(k[3:]), seed=0)
               for k, r in g["grid"]["0"].items()]
  lr = max(grid_rows, key=lambda r: r["eval_acc_final"])["lr"]
  main = dataclasses.replace(spec, tasks=tuple(dataclasses.replace(
      t, overrides={**t.overrides, **steps(len(x), lr=lr)}) for t in spec.tasks))
  runs = runner.run_all(main, out=out, data_dir=args.data_dir, extra=c, inputs=inputs)
  rows = [row(r, optimizer=a, lr=lr, seed=int(s), noise=noise_of[t], epochs=c["epochs"])
          for t, per in runs.items() for s, arms in per.items() for a, r in arms.items()]
  config = {**c, "data": img.name, "n_train": len(x), "n_test": len(x_te),
            "seeds": list(main.seeds), "optimizers": list(OPTIMIZERS), "lr": None}
  wall = time.perf_counter() - t0
  meta = {"command": runner.command("label_noise"),
          "machine": timing.machine(), "config": config, "wall_s": wall, "lr": lr,
          "data": data.describe_images(img), "params": rows[0]["params"],
          "wall_text": f"{len(rows)} runs + {len(grid_rows)} grid runs in {wall / 60:.1f} min."}
  schema.write_results(out / "label_noise", benchmark="label_noise", meta=meta,
                       rows=result_rows(aggregate(rows)), details={
                           "grid": grid_rows, "runs": rows, "claims": claims(rows)})


def result_rows(aggs: list[dict]) -> list[schema.Row]:
  """Each optimizer's time per step over SGD's (whole runs one after another: not
  interleaved); the accuracies are the report's, from the runs in the details."""
  rows = []
  for a in aggs:
    task = f"small CNN, MNIST, {round(100 * a['noise'])}% label noise"
    if a["optimizer"] != "SGD" and math.isfinite(a["time_ratio"]):
      opt, variant = {"mSAM-8": ("mSAM", "m=8, unroll"), "SGD+IRE": ("SGD+IRE", "fisher")}.get(
          a["optimizer"], (a["optimizer"], ""))
      rows.append(schema.time_row(opt, "SGD", task, "train step", a["time_ratio"],
                                  "label_noise", f"median of {a['n']} seeds", variant,
                                  interleaved=False, n=a["n"]))
  return rows


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


def render(results: Mapping[str, Any]) -> dict[str, str]:
  doc = results["label_noise"]
  if doc is None:
    return {}
  meta, det = doc["meta"], doc["details"]
  aggs, found = aggregate(det["runs"]), claims(det["runs"])
  noises = sorted({a["noise"] for a in aggs})
  pct = lambda x: f"{round(100 * x)}%"  # noqa: E731
  which = lambda c: "final" if c["metric"] == "eval_acc_final" else "best"  # noqa: E731
  memorised = max(r["memorised"] for r in det["runs"])
  drop = max(r["eval_acc_best"] - r["eval_acc_final"] for r in det["runs"])
  tables = "\n\n".join(f"## {pct(n)} label noise\n\n" + table(
      ["optimizer", *(c[0] for c in COLUMNS.values()), "time / SGD"],
      [[a["optimizer"], *(pm(a[k], a[k + "_std"], f, 1 if k == "top_eig" else 100)
                          for k, (_, f) in COLUMNS.items()), f"{a['time_ratio']:.2f}"]
       for a in aggs if a["noise"] == n], "l" + "r" * 6) for n in noises)
  sam = [c for c in found if (c["worse"], c["better"], c["metric"]) ==
         ("SGD", "SAM", "eval_acc_final")]
  by_opt = {o: {a["noise"]: a for a in aggs if a["optimizer"] == o} for o in OPTIMIZERS}
  flatter = {n: [o for o in OPTIMIZERS if n in by_opt[o]
                 and by_opt[o][n]["top_eig"] < by_opt["SGD"][n]["top_eig"]] for n in noises}
  ctx = {
      "meta": meta, "c": meta["config"], "tables": tables,
      "grid": table(["SGD learning rate", "held-out acc, noisy labels (%) final", "best"],
                    [[f"{g['lr']:g}" + (" (chosen)" if g["lr"] == meta["lr"] else ""),
                      f"{100 * g['eval_acc_final']:.2f}", f"{100 * g['eval_acc_best']:.2f}"]
                     for g in det["grid"]], "rrr"),
      "claims": table(["noise", "claim", "metric", "Δ clean test acc (pp), mean ± std",
                       "per seed", "verdict"],
                      [[pct(c["noise"]), f"{c['worse']} < {c['better']}",
                        which(c), *paired_cells(c)] for c in found], "lllrll"),
      "summary": table(["optimizer"] + [f"{pct(n)} noise: final / best test acc %"
                                        for n in noises]
                       + [f"{pct(n)} noise: memorised %" for n in noises],
                       [[o] + [f"{100 * by_opt[o][n]['eval_acc_final']:.2f} / "
                               f"{100 * by_opt[o][n]['eval_acc_best']:.2f}" for n in noises]
                        + [f"{100 * by_opt[o][n]['memorised']:.1f}" for n in noises]
                        for o in OPTIMIZERS if by_opt[o]], "l" + "r" * 2 * len(noises)),
      "sam": "; ".join(f"{pct(c['noise'])} noise {100 * c['mean']:+.2f} ± {100 * c['std']:.2f} "
                       f"pp ({c['verdict']})" for c in sam),
      "max_memorised": 100 * memorised, "max_drop": 100 * drop,
      "flatter": "; ".join(f"{pct(n)} noise: {', '.join(flatter[n]) or 'none'}"
                           for n in noises),
      "beyond": "; ".join(f"{c['worse']} < {c['better']} at {pct(c['noise'])} noise "
                          f"({which(c)}: {100 * c['mean']:+.2f} pp, {c['verdict']})" for c in found
                          if "2 SE" in c["verdict"]) or "none",
      "regime": "with little to memorise, this setting cannot show the protection the claim is "
                "about" if memorised < 0.1 and drop < 0.01
                else "the models memorise, so the claim can show here",
      "n_seeds": len(meta["config"]["seeds"]),
      "params": meta["params"]}
  return {"benchmarks/results/label_noise.md": fill("label_noise.md", ctx),
          "benchmarks/results/label_noise_summary.md": fill("label_noise_summary.md", ctx)}
