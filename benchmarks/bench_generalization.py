"""Benchmark: do IRE and the SAM family improve generalization?

Trains the Flax examples' models with every optimizer of the library from the
same initialisation, on the same batches in the same order and with the same
learning-rate schedule (per model, dataset and seed), and records for each run

* test accuracy and loss on the *full* test set, evaluated with the weights the
  optimizer means to be evaluated (``train.eval_params``: SALA's and
  Lookahead's slow weights, else the parameters);
* the final training loss: the mean minibatch loss over the last 10% of steps;
* sharpness at the evaluated weights on one fixed training batch (the first
  ``--sharp-batch`` training examples): the top Hessian eigenvalue (Lanczos,
  20 HVPs) and the Hessian trace (Hutchinson, 10 Rademacher probes), with the
  same PRNG key for every run. The loss is the eval-mode loss: BatchNorm uses
  its running statistics (``model(x, train=False)``), a fixed function of the
  weights, the same function the test accuracy is measured with. For the ResNet
  the HVP loops are unrolled (``unroll=True``): XLA:CPU runs convolutions in a
  rolled loop body ~14x slower here (6 s vs 0.43 s per HVP on 256 MNIST images);
* wall-clock per training step at steady state (the first, compiling step and
  the evaluation are excluded: the loop's ``steps_per_s``) and its ratio to the
  base optimizer's (SGD for the ResNet, AdamW for the ViT) on the same model,
  dataset and seed, in the same process (median over seeds).

Models and loops are ``examples/common`` (``cli.parse`` +
``train.run``); only the optimizer arguments differ between runs.
Compiled train steps are shared across seeds through JAX's persistent
compilation cache in a temporary directory (the step of a given optimizer and
model is the same XLA program for every seed: the seed enters only through the
initial state and the batches).

Data: MNIST from ``--data-dir`` (default ``$IRE_OPTAX_DATA``; the committed
results used a 17,435-image training subset and the official 10,000-image
test set) and scikit-learn's bundled digits (8x8, 1,437 train / 360 test
images, fixed split). Without MNIST only digits is run, and the report says so.

Usage::

  # the full run (102 runs, ~23 min on a shared 2-core CPU) -> benchmarks/results/
  # generalization.{json,csv,md,png} and generalization_summary.md
  flock /tmp/ire_bench.lock python benchmarks/bench_generalization.py --data-dir DIR
  # one model at a time (same settings)
  flock /tmp/ire_bench.lock python benchmarks/bench_generalization.py --data-dir DIR --models resnet
  # smoke run: a few steps, tiny models, one seed, every optimizer kind once, writes to a
  # temporary directory (~1-2 min on a loaded 2-core CPU)
  python benchmarks/bench_generalization.py --smoke
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import jax
import numpy as np

from examples.common import cli, optim, train
from ire_optax import sharpness

ROOT = C.ROOT
DATASETS = ("digits", "mnist")
MODELS = ("resnet", "vit")
BASE = {"resnet": "SGD", "vit": "AdamW"}

# Model and loop settings per model (identical for every optimizer).
MODEL_ARGV = {
    # ResNet-8 (one BasicBlock per stage), widths 8-16-32, BatchNorm; SGD momentum 0.9,
    # L2 weight decay 5e-4, lr 0.1 cosine to 0, no warm-up (the CIFAR recipe).
    "resnet": ["--size", "toy", "--depth", "8", "--width", "8", "--lr", "0.1",
               "--weight-decay", "5e-4", "--momentum", "0.9", "--warmup-steps", "0"],
    # ViT: width 32, 2 blocks, 2 heads, MLP 64, patch 4 (MNIST: 7x7 = 49 patches) or 2
    # (digits: 4x4); AdamW lr 1e-3, wd 0.05, 5% linear warm-up then cosine to 0.
    "vit": ["--size", "toy", "--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64",
            "--lr", "1e-3", "--weight-decay", "0.05", "--warmup-steps", "0.05"],
}
SMOKE_MODEL_ARGV = {
    "resnet": ["--size", "toy", "--depth", "8", "--width", "4", "--lr", "0.1",
               "--weight-decay", "5e-4", "--momentum", "0.9", "--warmup-steps", "0"],
    "vit": ["--size", "toy", "--lr", "1e-3", "--weight-decay", "0.05", "--warmup-steps", "0.05"],
}
# IRE: kappa 2, gamma 0.8 (the paper's ViT setting), K = 10, the paper's "fisher" estimator.
# ResNet/SGD: IRE on after 35% of training (the paper's CIFAR setting); ViT/AdamW: on right
# after the learning-rate warm-up (the paper's AdamW/Llama setting).
IRE_ARGV = ["--ire-kappa", "2", "--ire-gamma", "0.8", "--ire-refresh-every", "10",
            "--ire-curvature", "fisher"]
IRE_WARMUP = {"resnet": ["--ire-warmup", "0.35"], "vit": []}
# --smoke: every optimizer kind once, split between the two models (digits), and the base
# optimizer of each model on MNIST when it is available.
# Left out of the default full run for the time budget (run them with --opts).
DEFAULT_SKIP = {"resnet": set(), "vit": {"mSAM-8"}}
SMOKE_OPTS = {"resnet": ["SGD", "SGD+IRE", "SAM", "mSAM-4", "Lookahead"],
              "vit": ["AdamW", "SAM+IRE", "ASAM", "mSAM-8", "SALA"]}


def optimizer_table(model: str) -> list[tuple[str, list[str]]]:
  """``(label, argv)`` of every optimizer run on ``model``; the first is the base."""
  base = "sgd" if model == "resnet" else "adamw"
  ire = IRE_ARGV + IRE_WARMUP[model]
  return [
      (BASE[model], ["--opt", base]),
      (f"{BASE[model]}+IRE", ["--opt", f"{base}+ire", *ire]),
      ("SAM", ["--opt", "sam", "--base", base, "--rho", "0.05"]),
      ("SAM+IRE", ["--opt", "sam+ire", "--base", base, "--rho", "0.05", *ire]),
      ("ASAM", ["--opt", "asam", "--base", base, "--rho", "1.0"]),
      ("mSAM-4", ["--opt", "msam", "--base", base, "--rho", "0.05", "--num-microbatches", "4"]),
      ("mSAM-8", ["--opt", "msam", "--base", base, "--rho", "0.05", "--num-microbatches", "8"]),
      ("SALA", ["--opt", "sala", "--base", base, "--rho", "0.2", "--sala-sync-period", "2",
                "--sala-slow-step", "0.5"]),
      ("Lookahead", ["--opt", "lookahead", "--base", base, "--la-sync-period", "5",
                     "--la-slow-step", "0.8"]),
  ]


# Orderings claimed by the papers: (model, worse, better).
ORDERINGS = [
    ("resnet", "SGD", "SGD+IRE"), ("resnet", "SAM", "SAM+IRE"), ("resnet", "SGD", "SAM"),
    ("vit", "AdamW", "AdamW+IRE"), ("vit", "SAM", "SAM+IRE"), ("vit", "AdamW", "SAM"),
]


# -----------------------------------------------------------------------------
# Aggregation helpers
# -----------------------------------------------------------------------------


mean_std = C.mean_std
verdict = C.verdict


def time_ratios(rows: list[dict]) -> dict[tuple[str, str, str], float]:
  """Median over seeds of each run's time/step divided by its base's (same model, data, seed)."""
  base_time = {(r["model"], r["dataset"], r["seed"]): r["time_per_step_s"]
               for r in rows if r["optimizer"] == BASE[r["model"]]}
  ratios: dict[tuple[str, str, str], list[float]] = {}
  for r in rows:
    b = base_time.get((r["model"], r["dataset"], r["seed"]))
    if b and r["time_per_step_s"]:
      ratios.setdefault((r["model"], r["dataset"], r["optimizer"]), []).append(
          r["time_per_step_s"] / b)
  return {k: statistics.median(v) for k, v in ratios.items()}


def paired_difference(rows: list[dict], model: str, dataset: str, worse: str, better: str,
                      key: str = "test_acc") -> dict | None:
  """``better - worse`` of ``key``, paired by seed: mean, std and standard error of the mean."""
  by = lambda o: {r["seed"]: r[key] for r in rows
                  if r["model"] == model and r["dataset"] == dataset and r["optimizer"] == o}
  return C.paired_difference(by(worse), by(better))


def aggregate(rows: list[dict]) -> list[dict]:
  """One entry per (model, dataset, optimizer), in run order, with mean/std of every metric."""
  ratios = time_ratios(rows)
  groups: dict[tuple[str, str, str], list[dict]] = {}
  for r in rows:
    groups.setdefault((r["model"], r["dataset"], r["optimizer"]), []).append(r)
  out = []
  for (model, dataset, opt), rs in groups.items():
    agg: dict[str, Any] = {"model": model, "dataset": dataset, "optimizer": opt, "n": len(rs)}
    for k in ("test_acc", "test_loss", "train_loss", "top_eig", "trace", "time_per_step_s"):
      agg[k], agg[k + "_std"] = mean_std([r[k] for r in rs])
    agg["time_ratio"] = ratios.get((model, dataset, opt), float("nan"))
    out.append(agg)
  return out


# -----------------------------------------------------------------------------
# Sharpness
# -----------------------------------------------------------------------------


def _sharpness_fn(graphdef, params, stats, batch, key, num_iters: int, num_samples: int,
                  unroll: bool):
  def loss_fn(p, b):  # eval mode: BatchNorm running statistics, a fixed function of p
    logits, _ = train.apply_model(graphdef, p, stats, b["x"], train=False)
    return optim.cross_entropy(logits, b["y"])[0]

  k_eig, k_trace = jax.random.split(key)
  vals, _ = sharpness.top_hessian_eigs(loss_fn, params, batch, key=k_eig, k=1,
                                       num_iters=num_iters, unroll=unroll)
  trace, trace_se = sharpness.hessian_trace(loss_fn, params, batch, key=k_trace,
                                            num_samples=num_samples, unroll=unroll)
  return loss_fn(params, batch), vals[0], trace, trace_se


@functools.cache
def _sharpness_jit(fast_compile: bool):
  """One jitted sharpness function per setting: runs of one model share its compilation."""
  opts = {"xla_backend_optimization_level": 0} if fast_compile else None
  return jax.jit(_sharpness_fn, static_argnums=(0, 5, 6, 7), compiler_options=opts)


# -----------------------------------------------------------------------------
# Runs
# -----------------------------------------------------------------------------


def data_spec(dataset: str, data_dir: str | None) -> str:
  return "digits" if dataset == "digits" else f"mnist:{C.mnist_dir(data_dir)}"


def run_one(model: str, dataset: str, label: str, opt_argv: list[str], seed: int,
            cfg: argparse.Namespace, runs_dir: Path) -> dict:
  """Trains one configuration; returns its row of results."""
  argv = (cfg.model_argv[model] + opt_argv + [
      "--data", data_spec(dataset, cfg.data_dir), "--steps", str(cfg.steps[dataset]),
      "--batch-size", str(cfg.batch_size), "--seed", str(seed), "--eval-every", "0",
      "--log-every", "1", "--no-checkpoint", "--no-plot", "--no-progress",
      "--out", str(runs_dir), "--name", f"{model}-{dataset}-{label.replace('+', '_')}-s{seed}"])
  if cfg.fast_compile:
    argv.append("--fast-compile")
  args = cli.parse(model, argv)
  t0 = time.perf_counter()
  result = train.run(args, quiet=True)
  s = result.summary

  # The weights to evaluate and the model's graph.
  params, graphdef = result.eval_params(), result.graphdef
  d = train.load_data(args)
  n = min(cfg.sharp_batch, len(d.x_train))
  batch = {"x": d.x_train[:n], "y": d.y_train[:n]}
  t_sharp = time.perf_counter()
  fn = _sharpness_jit(cfg.fast_compile)
  sh_loss, top_eig, trace, trace_se = (float(v) for v in fn(
      graphdef, params, result.state.stats, batch, jax.random.key(1234), cfg.lanczos_iters,
      cfg.hutchinson_samples, cfg.sharp_unroll and model == "resnet"))
  t_sharp = time.perf_counter() - t_sharp

  records = train.read_metrics(s["run_dir"])
  last = max(1, math.ceil(0.1 * args.steps))
  tail = [r["loss"] for r in records if "loss" in r and r["step"] > args.steps - last]
  return {
      "model": model, "dataset": dataset, "optimizer": label, "opt": s["opt"], "seed": seed,
      "steps": args.steps, "params": s["params"],
      "test_acc": s["eval_acc"], "test_loss": s["eval_loss"],
      "train_loss": float(np.mean(tail)) if tail else float("nan"),
      "top_eig": top_eig, "trace": trace, "trace_se": trace_se, "sharp_batch_loss": sh_loss,
      "time_per_step_s": 1.0 / s["steps_per_s"] if s["steps_per_s"] else float("nan"),
      "first_step_s": s["first_step_s"], "sharpness_s": t_sharp,
      "wall_s": time.perf_counter() - t0,
  }


# -----------------------------------------------------------------------------
# Reports
# -----------------------------------------------------------------------------


def _pm(m: float, s: float, fmt: str) -> str:
  if not math.isfinite(m):
    return "-"
  return f"{m:{fmt}} ± {s:{fmt}}"


def settings_text(meta: dict) -> str:
  sh = meta["sharpness"]
  lines = [
      f"Run: {meta['date']} on {meta['machine']}; {meta['command']}; total wall "
      f"{meta['total_wall_s'] / 60:.1f} min for {meta['num_runs']} runs.",
      "",
      "What: each model is trained from the same initialisation on the same batches in the "
      "same order with the same learning-rate schedule for every optimizer (per seed); only "
      "the optimizer differs. Seeds: " + ", ".join(map(str, meta["seeds"])) + " (init and data "
      "order). Models, data and loop are `examples/common` (`train.run`).",
      "",
      "Data: " + "; ".join(meta["data"]) + ".",
      "",
      "Models: " + "; ".join(f"{k}: {v}" for k, v in meta["models"].items()) + ".",
      "",
      f"Steps: {meta['steps_text']}. "
      "ResNet: SGD momentum 0.9, L2 weight decay 5e-4 (kernels only), lr 0.1 cosine to 0, "
      "no warm-up. ViT: AdamW (0.9, 0.999), decoupled wd 0.05 (matrices only), lr 1e-3, 5% "
      "linear warm-up then cosine to 0. No augmentation, no label smoothing.",
      "",
      "Optimizers (paper defaults, not tuned here, the same for both models): SAM rho 0.05; "
      "ASAM rho 1.0 (Kwon et al.); mSAM rho 0.05 with m = 4 and 8 micro-batches (ViT: m = 4 "
      "only in the default run, for the time budget); SALA k 2, "
      "alpha 0.5, rho 0.2 (authors' code); Lookahead k 5, alpha 0.8; IRE kappa 2, gamma 0.8, "
      "K 10, Fisher estimator, switched on after 35% of training for the ResNet (the paper's "
      "CIFAR setting) and right after the lr warm-up (5%) for the ViT. IRE wraps SAM for "
      "SAM+IRE. All wrappers drive the model's base optimizer with its settings above.",
      "",
      "Metrics: test accuracy/loss on the full test set with the evaluated weights (SALA and "
      "Lookahead: slow weights; BatchNorm running statistics of the fast weights); train loss "
      "= mean minibatch loss (at the fast weights for SALA/Lookahead, at the clean point for "
      "the SAM family) over the last 10% of steps; top eig (Lanczos, "
      f"{sh['lanczos_iters']} HVPs) and trace (Hutchinson, {sh['hutchinson_samples']} probes) "
      "of the eval-mode loss (BatchNorm running statistics) at the evaluated weights on the "
      f"first {sh['batch']} training examples, same key for every run; time ratio = "
      "median over seeds of (s/step) / (base's s/step, same model, data and seed, same "
      "process), steady-state steps only (compile and evaluation excluded). Mean ± sample "
      "std over seeds.",
  ]
  if meta.get("note"):
    lines += ["", meta["note"]]
  return "\n".join(lines)


def table_md(aggs: list[dict], model: str, dataset: str) -> str:
  head = ["optimizer", "test acc (%)", "test loss", "final train loss", "top eig", "trace",
          "ms/step", "time ratio"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for a in aggs:
    if a["model"] != model or a["dataset"] != dataset:
      continue
    lines.append("| " + " | ".join([
        a["optimizer"],
        _pm(100 * a["test_acc"], 100 * a["test_acc_std"], ".2f"),
        _pm(a["test_loss"], a["test_loss_std"], ".4f"),
        _pm(a["train_loss"], a["train_loss_std"], ".4f"),
        _pm(a["top_eig"], a["top_eig_std"], ".3g"),
        _pm(a["trace"], a["trace_std"], ".3g"),
        f"{1e3 * a['time_per_step_s']:.1f}",
        f"{a['time_ratio']:.2f}x" if math.isfinite(a["time_ratio"]) else "-",
    ]) + " |")
  return "\n".join(lines)


def orderings_md(rows: list[dict]) -> tuple[str, list[dict]]:
  head = "| model | data | claim | Δ test acc (pp), paired mean ± std | per seed | verdict |"
  lines = [head, "|---|---|---|---|---|---|"]
  found = []
  combos = sorted({(r["model"], r["dataset"]) for r in rows},
                  key=lambda md: (MODELS.index(md[0]), DATASETS.index(md[1])))
  for model, dataset in combos:
    for om, worse, better in ORDERINGS:
      if om != model:
        continue
      d = paired_difference(rows, model, dataset, worse, better)
      if d is None:
        continue
      v = verdict(d)
      found.append({"model": model, "dataset": dataset, "worse": worse, "better": better,
                    **d, "verdict": v})
      lines.append(f"| {model} | {dataset} | {worse} < {better} | "
                   f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} | "
                   + ", ".join(f"{100 * x:+.2f}" for x in d["diffs"]) + f" | {v} |")
  return "\n".join(lines), found


def summary_md(aggs: list[dict], meta: dict) -> str:
  """The compact table for the README: one row per optimizer (base = SGD or AdamW)."""
  combos = [(m, d) for m in MODELS for d in DATASETS
            if any(a["model"] == m and a["dataset"] == d for a in aggs)]
  rows: dict[str, dict[tuple[str, str], dict]] = {}
  for a in aggs:
    name = a["optimizer"].replace(BASE[a["model"]], "base")
    rows.setdefault(name, {})[a["model"], a["dataset"]] = a
  head = ["optimizer"] + [f"{'ResNet' if m == 'resnet' else 'ViT'} {d} acc %"
                          for m, d in combos]
  time_combos = [c for c in combos if c[1] == "mnist"] or combos[:1]
  head += [f"{'ResNet' if m == 'resnet' else 'ViT'} {d} time" for m, d in time_combos]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, cells in rows.items():
    row = [name]
    for c in combos:
      cell = cells.get(c)
      row.append(_pm(100 * cell["test_acc"], 100 * cell["test_acc_std"], ".2f") if cell
                 else "-")
    for c in time_combos:
      cell = cells.get(c)
      row.append(f"{cell['time_ratio']:.2f}x" if cell and math.isfinite(cell["time_ratio"])
                 else "-")
    lines.append("| " + " | ".join(row) + " |")
  seeds = meta["seeds"]
  return (f"Test accuracy (mean ± std over {len(seeds)} seeds) and time per step relative to "
          "the base optimizer (base = SGD+momentum for the ResNet-8, AdamW for the ViT); "
          f"{meta['steps_text']}; paper-default hyperparameters, not tuned; shared 2-core CPU. "
          "These are short runs: no MNIST model is converged and the small ViT is under-fitted, "
          "so its columns measure training speed rather than generalization. Full tables, "
          "sharpness, settings and the verdict: `benchmarks/results/generalization.md`.\n\n"
          + "\n".join(lines) + "\n")


def plot(aggs: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  combos = [(m, d) for m in MODELS for d in DATASETS
            if any(a["model"] == m and a["dataset"] == d for a in aggs)]
  fig, axes = plt.subplots(2, len(combos), figsize=(4.2 * len(combos), 7), squeeze=False)
  for j, (m, d) in enumerate(combos):
    sel = [a for a in aggs if a["model"] == m and a["dataset"] == d]
    x = np.arange(len(sel))
    names = [a["optimizer"] for a in sel]
    for i, (key, scale, label) in enumerate((("test_acc", 100.0, "test accuracy (%)"),
                                             ("top_eig", 1.0, "top Hessian eigenvalue"))):
      ax = axes[i, j]
      vals = np.array([scale * a[key] for a in sel])
      errs = np.array([scale * a[key + "_std"] for a in sel])
      ax.bar(x, vals, yerr=errs, capsize=3, color=["C0" if k == 0 else "C1" if "IRE" in n
                                                    else "C2" for k, n in enumerate(names)])
      ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
      if key == "test_acc" and np.all(np.isfinite(vals)):
        lo = float(np.min(vals - errs))
        hi = float(np.max(vals + errs))
        pad = max(0.2, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
      ax.set_ylabel(label)
      ax.grid(axis="y", alpha=0.3)
      if i == 0:
        ax.set_title(f"{'ResNet-8' if m == 'resnet' else 'ViT'} on {d}")
  fig.suptitle("Generalization benchmark: mean ± std over seeds (blue: base, orange: +IRE)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_outputs(rows: list[dict], meta: dict, out: Path, verdict_file: str | None = None
                  ) -> dict:
  out.mkdir(parents=True, exist_ok=True)
  aggs = aggregate(rows)
  order_text, found = orderings_md(rows)
  details = {"meta": meta, "runs": rows, "aggregates": aggs, "orderings": found}
  C.write_results(out / "generalization", benchmark="bench_generalization",
                  meta={"machine": meta["machine"], "command": meta["command"]},
                  rows=result_rows(details), details=details)
  with (out / "generalization.csv").open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  parts = ["# Generalization: IRE and the SAM family", "",
           settings_text(meta), ""]
  for m in MODELS:
    for d in DATASETS:
      if any(a["model"] == m and a["dataset"] == d for a in aggs):
        parts += [f"## {meta['models'][m].split(':')[0]} on {d}", "", table_md(aggs, m, d), ""]
  parts += ["## The papers' orderings", "",
            "Paired by seed (same init and batches): Δ = better - worse in test accuracy, "
            "mean ± std over seeds; 'reproduced' needs the mean to be at least two standard "
            "errors (std/√n) above zero.", "", order_text, ""]
  if verdict_file:
    parts += ["## Reading", "", Path(verdict_file).read_text().strip(), ""]
  (out / "generalization.md").write_text("\n".join(parts))
  (out / "generalization_summary.md").write_text(summary_md(aggs, meta))
  plot(aggs, out / "generalization.png")
  return {"aggregates": aggs, "orderings": found}


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------


def result_rows(details: dict[str, Any]) -> list[C.Row]:
  """The time-per-step ratios to the base (whole runs one after another: not interleaved)."""
  models_ = {"resnet": "ResNet-8", "vit": "ViT"}
  out = []
  for a in details["aggregates"]:
    name, base = a["optimizer"], BASE.get(a["model"], "")
    if name == base or a.get("time_ratio") is None or not math.isfinite(a["time_ratio"]):
      continue
    variant = ""
    if name.startswith("mSAM-"):
      name, variant = "mSAM", f"m={name.split('-')[1]}"
    elif name.endswith("+IRE") and name != "SAM+IRE":
      name, variant = f"{base}+IRE", "fisher"
    out.append(C.time_row(name, base, f"{models_.get(a['model'], a['model'])}, {a['dataset']}",
                          "train step", a["time_ratio"], "bench_generalization",
                          f"median of {a['n']} seeds", variant, interleaved=False, n=a["n"]))
  return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  C.add_data_dir_argument(p)
  p.add_argument("--smoke", action="store_true",
                 help="a few steps, tiny models, one seed, fast compilation (< 90 s)")
  p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
  p.add_argument("--datasets", nargs="+", choices=DATASETS, default=None,
                 help="default: both (digits only when MNIST is not in --data-dir)")
  p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps for every dataset (default: mnist 150, digits 200)")
  p.add_argument("--batch-size", type=int, default=None, help="(default 64)")
  p.add_argument("--opts", nargs="+", default=None, metavar="LABEL",
                 help="run only these optimizer labels (e.g. SGD SAM); the base always runs")
  p.add_argument("--out", default=None,
                 help="results directory (default: benchmarks/results; with --smoke a new "
                      "temporary directory)")
  p.add_argument("--sharp-batch", type=int, default=256)
  p.add_argument("--lanczos-iters", type=int, default=20)
  p.add_argument("--hutchinson-samples", type=int, default=10)
  p.add_argument("--sharp-unroll", action=argparse.BooleanOptionalAction, default=True,
                 help="unroll the HVP loops for the ResNet (XLA:CPU runs convolutions in "
                      "rolled loops slowly; longer compile, once per model and dataset)")
  p.add_argument("--verdict-file", default=None,
                 help="markdown appended to the report as its 'Reading' section")
  p.add_argument("--report-only", default=None, metavar="JSON",
                 help="rewrite the reports from an existing generalization.json (no training)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  cfg = parse_args(argv)
  if cfg.report_only:
    saved = C.read_results(cfg.report_only)["details"]
    out = Path(cfg.out) if cfg.out else Path(cfg.report_only).parent
    result = write_outputs(saved["runs"], saved["meta"], out, cfg.verdict_file)
    return {"out": str(out), "rows": saved["runs"], "meta": saved["meta"], **result}
  t_start = time.perf_counter()
  have_mnist = C.mnist_dir(cfg.data_dir) is not None
  note = ""
  datasets = cfg.datasets or (["digits", "mnist"] if have_mnist else ["digits"])
  if "mnist" in datasets and not have_mnist:
    datasets = [d for d in datasets if d != "mnist"] or ["digits"]
    note = "MNIST requested but not found in --data-dir: ran scikit-learn digits only."
  elif not have_mnist:
    note = "no MNIST in --data-dir: ran scikit-learn digits only."
  if note:
    print(note, flush=True)
  cfg.seeds = cfg.seeds or ([0] if cfg.smoke else [0, 1, 2])
  default_steps = {"digits": 4, "mnist": 3} if cfg.smoke else {"digits": 200, "mnist": 150}
  cfg.steps = {d: cfg.steps or default_steps[d] for d in datasets}
  cfg.batch_size = cfg.batch_size or (32 if cfg.smoke else 64)
  cfg.model_argv = SMOKE_MODEL_ARGV if cfg.smoke else MODEL_ARGV
  cfg.fast_compile = cfg.smoke
  if cfg.smoke:
    cfg.sharp_batch = min(cfg.sharp_batch, 32)
    cfg.lanczos_iters = min(cfg.lanczos_iters, 4)
    cfg.hutchinson_samples = min(cfg.hutchinson_samples, 2)
  out = Path(cfg.out) if cfg.out else (
      Path(tempfile.mkdtemp(prefix="bench_generalization_smoke_")) if cfg.smoke
      else ROOT / "benchmarks" / "results")

  tmp = tempfile.TemporaryDirectory(prefix="bench_generalization_")
  if len(cfg.seeds) > 1:
    # One compilation per optimizer and model, shared by the seeds (same XLA program).
    jax.config.update("jax_compilation_cache_dir", str(Path(tmp.name) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  runs_dir = Path(tmp.name) / "runs"

  plan = []
  for model in cfg.models:
    table = optimizer_table(model)
    if cfg.opts:
      table = [t for i, t in enumerate(table) if i == 0 or t[0] in cfg.opts]
    elif cfg.smoke:
      table = [t for t in table if t[0] in SMOKE_OPTS[model]]
    else:
      table = [t for t in table if t[0] not in DEFAULT_SKIP[model]]
    for dataset in datasets:
      for seed in cfg.seeds:
        for label, opt_argv in table:
          if cfg.smoke and not cfg.opts and dataset == "mnist" and label != BASE[model]:
            continue
          plan.append((model, dataset, label, opt_argv, seed))
  # Seed-major: every configuration of seed 0 (compiles), then seed 1, ...; the reports are
  # rewritten after each seed, so an interrupted run still leaves complete seeds behind.
  plan.sort(key=lambda p: cfg.seeds.index(p[4]))
  print(f"bench_generalization: {len(plan)} runs ({', '.join(cfg.models)} x "
        f"{', '.join(datasets)} x seeds {cfg.seeds}) -> {out}", flush=True)

  rows = []
  try:
    for i, (model, dataset, label, opt_argv, seed) in enumerate(plan):
      r = run_one(model, dataset, label, opt_argv, seed, cfg, runs_dir)
      rows.append(r)
      if i + 1 < len(plan) and plan[i + 1][4] != seed:
        meta = build_meta(cfg, datasets, rows, argv, time.perf_counter() - t_start, note)
        write_outputs(rows, meta, out, cfg.verdict_file)
      print(f"[{i + 1:3d}/{len(plan)}] {model:6s} {dataset:6s} seed {seed} {label:10s} "
            f"acc {100 * r['test_acc']:6.2f}% loss {r['test_loss']:.4f} "
            f"train {r['train_loss']:.4f} eig {r['top_eig']:8.3g} tr {r['trace']:9.3g} "
            f"{1e3 * r['time_per_step_s']:6.1f} ms/step (compile {r['first_step_s']:.1f}s, "
            f"sharp {r['sharpness_s']:.1f}s, run {r['wall_s']:.0f}s, "
            f"total {time.perf_counter() - t_start:.0f}s)", flush=True)
  finally:
    tmp.cleanup()

  meta = build_meta(cfg, datasets, rows, argv, time.perf_counter() - t_start, note)
  result = write_outputs(rows, meta, out, cfg.verdict_file)
  print((out / "generalization_summary.md").read_text())
  print(f"wrote {out}/generalization.{{json,csv,md,png}} and generalization_summary.md "
        f"({meta['total_wall_s'] / 60:.1f} min)")
  return {"out": str(out), "rows": rows, "meta": meta, **result}


def build_meta(cfg, datasets, rows, argv, wall, note) -> dict:
  data = []
  for d in datasets:
    if d == "mnist":
      data.append("MNIST from --data-dir: trained on the 17,435-image training "
                  "subset available there, evaluated on the official 10,000-image test set "
                  "(28x28, standardised, no downsampling)")
    else:
      data.append("scikit-learn digits (8x8): fixed 80/20 split, 1,437 train / 360 test")
  params: dict[str, dict[str, int]] = {}
  for r in rows:
    params.setdefault(r["model"], {})[r["dataset"]] = r["params"]
  desc = {"resnet": "ResNet-8 (BatchNorm, widths 8-16-32)",
          "vit": "ViT (width 32, 2 blocks, 2 heads, MLP 64, patch 4 on MNIST / 2 on digits)"}
  if cfg.smoke:
    desc = {"resnet": "ResNet-8 (BatchNorm, widths 4-8-16)", "vit": "ViT toy (width 16, 1 block)"}
  models_meta = {m: desc[m] + ": " + ", ".join(f"{n:,} params on {d}"
                                              for d, n in params.get(m, {}).items())
                 for m in cfg.models}
  cmd = "python benchmarks/bench_generalization.py" + (" " + " ".join(argv) if argv else
                                                       " " + " ".join(sys.argv[1:]))
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "machine": C.machine()["summary"],
      "command": cmd.strip(), "total_wall_s": wall, "num_runs": len(rows),
      "seeds": cfg.seeds, "steps": cfg.steps, "batch_size": cfg.batch_size,
      "steps_text": ", ".join(f"{d} {s} steps" for d, s in cfg.steps.items())
                    + f" of batch {cfg.batch_size}",
      "data": data, "models": models_meta, "smoke": cfg.smoke, "note": note,
      "ire": IRE_ARGV, "ire_warmup": IRE_WARMUP,
      "model_argv": cfg.model_argv,
      "optimizers": {m: optimizer_table(m) for m in cfg.models},
      "sharpness": {"batch": cfg.sharp_batch, "lanczos_iters": cfg.lanczos_iters,
                    "hutchinson_samples": cfg.hutchinson_samples, "mode": "eval (BN running)"},
  }


if __name__ == "__main__":
  main()
