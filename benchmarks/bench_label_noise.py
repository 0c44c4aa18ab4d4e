"""Benchmark: robustness to label noise of SGD, IRE, SAM, mSAM, SALA and Lookahead.

Foret et al. (2021, §3.3) report that SAM is far more robust than SGD to
noisy training labels: trained on CIFAR-10 with a fraction of the labels
replaced at random, SAM keeps a much higher clean test accuracy. This script
tests that claim, and the same question for IRE, mSAM, SALA and Lookahead,
with our implementations:

* Data: MNIST from ``--data-dir`` (the training images found there; the
  official 10,000-image test set, clean labels). A fraction ``eta`` (20% and
  40%) of the training labels is replaced by a label drawn uniformly from the
  nine *other* classes ("symmetric" noise), fixed per example: drawn once per
  seed and noise rate, the same for every optimizer of that seed.
* Model: a small CNN (pure JAX, float32) on the images mean-pooled 2x2
  (MNIST at 14x14): conv 3x3/2 (1->8), conv 3x3/2 (8->16), ReLU, flatten,
  dense 256, ReLU, dense 10; about 70k parameters.
* Training: batch 128, 10 epochs of the training set (cosine decay of the
  learning rate to 0: the run converges and ends at a small learning rate,
  where memorisation of the wrong labels happens), weight decay 5e-4 (added
  to the gradient), same initialisation and batch order for every optimizer
  of a seed; 3 seeds.
* Optimizers: SGD (momentum 0.9; learning rate chosen once from ``LR_GRID``
  on a held-out part of the noisy training set, see below); SGD+IRE (kappa 2,
  gamma 0.8, K = 10, Fisher estimator, on after 35% of training, the settings
  of ``bench_generalization``); SAM (rho 0.05, Foret et al.'s CIFAR-10
  value); SAM+IRE; mSAM with m = 8 micro-batches (rho 0.05); SALA (k 2,
  alpha 0.5, rho 0.2, Tan et al.'s code); Lookahead (k 5, alpha 0.8). Every
  wrapper drives the same SGD.
* Learning-rate grid: SGD alone, 20% noise, seed 0, trained on all but the
  last 2,000 training images and scored by the accuracy on those 2,000
  (their labels noisy too: no clean label is used to tune). The chosen rate
  is used by every optimizer at both noise levels.
* Reported per optimizer and noise rate (mean ± std over seeds): clean test
  accuracy at the end and the best over the per-epoch evaluations (the best
  one is chosen on the test set: an optimistic, early-stopping number);
  accuracy on the noisy training labels (all examples, and the fraction of
  the corrupted examples predicted as their *wrong* label: memorisation);
  the top Hessian eigenvalue of the training loss at the end (Lanczos, 20
  HVPs, first 1,024 training examples with their noisy labels); time per
  step against SGD's of the same seed (whole runs, one after another, on a
  loaded machine: indicative only). Claims are tested paired by seed.

Results are written after every run (``benchmarks/results/label_noise.json``)
and a restarted run resumes from them.

Usage::

  python benchmarks/bench_label_noise.py --data-dir DIR      # 45 runs (committed: 76 min, 2 procs)
  # two processes sharing the runs, then one report:
  python benchmarks/bench_label_noise.py --data-dir DIR --out A
  python benchmarks/bench_label_noise.py --data-dir DIR --out B --only SALA Lookahead --reverse
  python benchmarks/bench_label_noise.py --out A --merge B/label_noise.json
  python benchmarks/bench_label_noise.py --smoke             # seconds; writes to a temp dir
  python benchmarks/bench_label_noise.py --report-only       # rewrite md/png from the JSON
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ire_optax
from examples.common import data as data_lib
from ire_optax import sharpness

NAME = "label_noise"
OPTIMIZERS = ("SGD", "SGD+IRE", "SAM", "SAM+IRE", "mSAM-8", "SALA", "Lookahead")
NOISE = (0.2, 0.4)
SEEDS = (0, 1, 2)
EPOCHS, BATCH = 10, 128
LR_GRID = (0.01, 0.03, 0.1)
GRID_HOLDOUT, GRID_NOISE = 2000, 0.2
MOMENTUM, WD = 0.9, 5e-4
MODEL = {"channels": (8, 16), "strides": (2, 2), "dense": (256,), "flatten": True}
POOL = 2  # images are mean-pooled 2x2 first (MNIST 28x28 -> 14x14): fast on one CPU core
SAM_RHO, MSAM_M = 0.05, 8
IRE = {"kappa": 2.0, "gamma": 0.8, "refresh_every": 10, "curvature": "fisher"}
IRE_START = 0.35  # fraction of the training steps before IRE switches on
SALA = {"sync_period": 2, "slow_step_size": 0.5, "rho": 0.2}
LOOKAHEAD = {"sync_period": 5, "slow_step_size": 0.8}
SHARP_BATCH, LANCZOS_ITERS = 1024, 20
COMPILER_OPTIONS: dict[str, Any] | None = None  # --smoke: XLA's fastest compilation
# Claims tested, paired by seed: (worse, better).
CLAIMS = (("SGD", "SAM"), ("SGD", "SGD+IRE"), ("SAM", "SAM+IRE"), ("SGD", "mSAM-8"),
          ("SGD", "SALA"), ("SGD", "Lookahead"))


# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------


def noisy_labels(y: np.ndarray, rate: float, seed: int, num_classes: int = 10
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``(labels, corrupted)``: each label replaced with probability ``rate`` by one of
  the other classes, uniformly; a pure function of ``(seed, rate)``."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), round(1000 * rate), 17]))
  corrupted = rng.random(len(y)) < rate
  shift = rng.integers(1, num_classes, len(y))
  return np.where(corrupted, (y + shift) % num_classes, y).astype(np.int32), corrupted


def pool(x: np.ndarray) -> np.ndarray:
  """``POOL`` x ``POOL`` mean pooling of NHWC images (sides divisible by ``POOL``)."""
  n, h, w, c = x.shape
  return x.reshape(n, h // POOL, POOL, w // POOL, POOL, c).mean(axis=(2, 4))


# -----------------------------------------------------------------------------
# Model and optimizers
# -----------------------------------------------------------------------------


def logits_fn(params, x):
  return C.cnn_logits(params, x, strides=MODEL["strides"], flatten=MODEL["flatten"])


def loss_fn(params, batch):
  return C.cross_entropy(logits_fn(params, batch["x"]), batch["y"])


grad_fn = jax.grad(loss_fn)


def init_params(seed: int, image_size: int, in_channels: int):
  return C.cnn_init(jax.random.key(seed), channels=MODEL["channels"], strides=MODEL["strides"],
                    image_size=image_size, in_channels=in_channels, dense=MODEL["dense"],
                    flatten=MODEL["flatten"])


def make_optimizer(name: str, lr: float, total_steps: int):
  """``(tx, kind)``; kind is how the train step calls it."""
  base = optax.chain(optax.add_decayed_weights(WD),
                     optax.sgd(optax.cosine_decay_schedule(lr, total_steps), momentum=MOMENTUM))
  ire = lambda tx: ire_optax.ire(tx, warmup_steps=int(IRE_START * total_steps), **IRE)
  if name == "SGD":
    return optax.with_extra_args_support(base), "plain"
  if name == "SGD+IRE":
    return ire(base), "plain"
  if name == "SAM":
    return ire_optax.sam(base, rho=SAM_RHO), "plain"
  if name == "SAM+IRE":
    return ire(ire_optax.sam(base, rho=SAM_RHO)), "plain"
  if name == "mSAM-8":
    return ire_optax.msam(base, rho=SAM_RHO, num_microbatches=MSAM_M,
                          microbatch_mode="unroll"), "msam"
  if name == "SALA":
    return ire_optax.sala(base, **SALA), "plain"
  if name == "Lookahead":
    return optax.lookahead(base, **LOOKAHEAD), "lookahead"
  raise ValueError(f"unknown optimizer {name!r}")


def make_step(tx, kind: str):
  def step(carry, batch):
    p, s = carry
    if kind == "msam":
      u, s = tx.update(None, s, p, grad_fn=grad_fn, batch=batch)
    elif kind == "lookahead":
      u, s = tx.update(grad_fn(p.fast, batch), s, p)
    else:
      u, s = tx.update(grad_fn(p, batch), s, p, grad_fn=lambda q: grad_fn(q, batch),
                       logits_fn=lambda q: logits_fn(q, batch["x"]))
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=0, compiler_options=COMPILER_OPTIONS)


@functools.cache
def optimizer_and_step(name: str, lr: float, total_steps: int):
  """``(tx, kind, jitted step)``, built once per setting: every seed and noise rate of an
  optimizer reuses the compiled step (the seed enters only through the data and the state)."""
  tx, kind = make_optimizer(name, lr, total_steps)
  return tx, kind, make_step(tx, kind)


def eval_params(name: str, carry):
  p, s = carry
  if name == "Lookahead":
    return p.slow
  if name == "SALA":
    return ire_optax.sala_eval_params(s)
  return p


def predictions(params, x: np.ndarray, bs: int = 2000) -> np.ndarray:
  out = []
  for i in range(0, len(x), bs):
    out.append(np.asarray(jnp.argmax(_logits_jit(params, jnp.asarray(x[i:i + bs])), -1)))
  return np.concatenate(out)


_logits_jit = jax.jit(logits_fn)
_loss_jit = jax.jit(loss_fn)


@functools.partial(jax.jit, static_argnums=3)
def _top_eig(params, batch, key, num_iters: int):
  vals, _ = sharpness.top_hessian_eigs(loss_fn, params, batch, key=key, k=1,
                                       num_iters=num_iters)
  return vals[0]


# -----------------------------------------------------------------------------
# One run
# -----------------------------------------------------------------------------


def train_run(name: str, lr: float, x_tr, y_tr, x_ev, y_ev, seed: int, epochs: int, batch: int,
              *, corrupted=None, y_clean=None, sharp: bool = True) -> dict[str, Any]:
  """Trains one optimizer; evaluates ``(x_ev, y_ev)`` after every epoch."""
  t_run = time.perf_counter()
  batcher = data_lib.ImageBatcher(x_tr, y_tr, batch, seed=seed)
  steps_per_epoch = batcher.steps_per_epoch
  total = epochs * steps_per_epoch
  tx, kind, step = optimizer_and_step(name, lr, total)
  p0 = init_params(seed, x_tr.shape[1], x_tr.shape[-1])
  if kind == "lookahead":
    p0 = optax.LookaheadParams(fast=p0, slow=jax.tree.map(jnp.copy, p0))
  carry = (p0, tx.init(p0))
  curve, epoch_s, t_step = [], [], 0
  for _ in range(epochs):
    t0 = time.perf_counter()
    for _ in range(steps_per_epoch):
      b = batcher.batch_at(t_step)
      carry = step(carry, {"x": jnp.asarray(b["x"]), "y": jnp.asarray(b["y"])})
      t_step += 1
    jax.block_until_ready(carry)
    epoch_s.append(time.perf_counter() - t0)
    ev = eval_params(name, carry)
    curve.append(float(np.mean(predictions(ev, x_ev) == y_ev)))
  ev = eval_params(name, carry)
  finite = all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(ev))
  timed = epoch_s[1:] or epoch_s  # the first epoch includes compilation
  row: dict[str, Any] = {
      "optimizer": name, "lr": lr, "seed": seed, "steps": total, "epochs": epochs,
      "eval_acc_final": curve[-1], "eval_acc_best": max(curve),
      "eval_acc_best_epoch": int(np.argmax(curve)) + 1, "eval_acc_curve": curve,
      "time_per_step_s": float(np.median(timed)) / steps_per_epoch,
      "first_epoch_s": epoch_s[0], "finite": finite,
  }
  if corrupted is not None:
    pred = predictions(ev, x_tr)
    row["train_acc_noisy"] = float(np.mean(pred == y_tr))
    row["train_acc_clean"] = float(np.mean(pred == y_clean))
    row["memorised"] = float(np.mean(pred[corrupted] == y_tr[corrupted]))
    row["corrupted_fraction"] = float(np.mean(corrupted))
    losses = [float(_loss_jit(ev, {"x": jnp.asarray(x_tr[i:i + 2000]),
                                 "y": jnp.asarray(y_tr[i:i + 2000])})) * len(x_tr[i:i + 2000])
              for i in range(0, len(x_tr), 2000)]
    row["train_loss_noisy"] = sum(losses) / len(x_tr)
  if sharp:
    n = min(SHARP_BATCH, len(x_tr))
    t0 = time.perf_counter()
    row["top_eig"] = float(_top_eig(ev, {"x": jnp.asarray(x_tr[:n]), "y": jnp.asarray(y_tr[:n])},
                                    jax.random.key(1234), LANCZOS_ITERS))
    row["sharpness_s"] = time.perf_counter() - t0
  row["wall_s"] = time.perf_counter() - t_run
  return row


# -----------------------------------------------------------------------------
# Aggregation and reports
# -----------------------------------------------------------------------------

METRICS = (("eval_acc_final", "final clean test acc (%)", 100.0, ".2f"),
           ("eval_acc_best", "best clean test acc (%)", 100.0, ".2f"),
           ("train_acc_noisy", "train acc on noisy labels (%)", 100.0, ".1f"),
           ("memorised", "corrupted labels memorised (%)", 100.0, ".1f"),
           ("top_eig", "top Hessian eig", 1.0, ".3g"))


def time_ratios(runs: list[dict], noise: float) -> dict[str, float]:
  """Median over seeds of time/step over SGD's time/step (same seed and noise)."""
  sgd = {r["seed"]: r["time_per_step_s"] for r in runs
         if r["noise"] == noise and r["optimizer"] == "SGD"}
  out: dict[str, list[float]] = {}
  for r in runs:
    if r["noise"] == noise and r["seed"] in sgd:
      out.setdefault(r["optimizer"], []).append(r["time_per_step_s"] / sgd[r["seed"]])
  return {k: C.median(v) for k, v in out.items()}


def aggregate(runs: list[dict]) -> list[dict]:
  aggs = []
  for noise in NOISE:
    ratios = time_ratios(runs, noise)
    for opt in OPTIMIZERS:
      rs = [r for r in runs if r["noise"] == noise and r["optimizer"] == opt]
      if not rs:
        continue
      a: dict[str, Any] = {"noise": noise, "optimizer": opt, "n": len(rs)}
      for key, *_ in METRICS:
        a[key], a[key + "_std"] = C.mean_std(r.get(key) for r in rs)
      a["time_ratio"] = ratios.get(opt, float("nan"))
      aggs.append(a)
  return aggs


def claims(runs: list[dict]) -> list[dict]:
  out = []
  for noise in NOISE:
    for worse, better in CLAIMS:
      for key in ("eval_acc_final", "eval_acc_best"):
        by = lambda o, key=key, noise=noise: {r["seed"]: r[key] for r in runs
                                              if r["noise"] == noise and r["optimizer"] == o}
        d = C.paired_difference(by(worse), by(better))
        if d is not None:
          out.append({"noise": noise, "worse": worse, "better": better, "metric": key, **d,
                      "verdict": C.verdict(d)})
  return out


def result_rows(aggs: list[dict]) -> list[C.Row]:
  rows = []
  for a in aggs:
    task = f"small CNN, MNIST, {round(100 * a['noise'])}% label noise"
    for key, *_ in METRICS:
      if math.isfinite(a[key]):
        rows.append(C.Row(a["optimizer"], task, key, a[key], n=a["n"], spread=a[key + "_std"],
                          source="bench_label_noise"))
    if a["optimizer"] != "SGD" and math.isfinite(a["time_ratio"]):
      opt, variant = a["optimizer"], ""
      if opt.startswith("mSAM-"):
        opt, variant = "mSAM", f"m={opt.split('-')[1]}, unroll"
      elif opt == "SGD+IRE":
        variant = "fisher"
      rows.append(C.time_row(opt, "SGD", task, "train step", a["time_ratio"],
                             "bench_label_noise", f"median of {a['n']} seeds", variant,
                             interleaved=False, n=a["n"]))
  return rows


def _pm(m: float, s: float, scale: float, fmt: str) -> str:
  return "-" if not math.isfinite(m) else f"{scale * m:{fmt}} ± {scale * s:{fmt}}"


def table_md(aggs: list[dict], noise: float) -> str:
  head = ["optimizer"] + [label for _, label, _, _ in METRICS] + ["time / SGD"]
  lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
  for a in aggs:
    if a["noise"] != noise:
      continue
    cells = [_pm(a[k], a[k + "_std"], sc, f) for k, _, sc, f in METRICS]
    tr = f"{a['time_ratio']:.2f}" if math.isfinite(a["time_ratio"]) else "-"
    lines.append("| " + " | ".join([a["optimizer"], *cells, tr]) + " |")
  return "\n".join(lines)


def claims_md(found: list[dict]) -> str:
  lines = ["| noise | claim | metric | Δ clean test acc (pp), mean ± std | per seed | verdict |",
           "|---|---|---|---:|---|---|"]
  for c in found:
    lines.append(
        f"| {round(100 * c['noise'])}% | {c['worse']} < {c['better']} | "
        f"{'final' if c['metric'] == 'eval_acc_final' else 'best'} | "
        f"{100 * c['mean']:+.2f} ± {100 * c['std']:.2f} | "
        + ", ".join(f"{100 * x:+.2f}" for x in c["diffs"]) + f" | {c['verdict']} |")
  return "\n".join(lines)


def grid_md(grid: list[dict], chosen: float | None) -> str:
  lines = ["| SGD learning rate | held-out acc, noisy labels (%) final | best |",
           "|---:|---:|---:|"]
  for g in grid:
    mark = " (chosen)" if g["lr"] == chosen else ""
    lines.append(f"| {g['lr']:g}{mark} | {100 * g['eval_acc_final']:.2f} | "
                 f"{100 * g['eval_acc_best']:.2f} |")
  return "\n".join(lines)


def _lr_text(meta: dict) -> str:
  return f"{meta['lr']:g}" if meta.get("lr") is not None else "(not chosen yet)"


def settings_md(meta: dict) -> str:
  cfg = meta["config"]
  return "\n".join([
      f"Command: `{meta['command']}`. Machine: {meta['machine']['summary']}; "
      f"{meta.get('wall_text', '')}",
      "",
      f"Data: {meta['data']}. Symmetric label noise: each training label replaced with "
      "probability η by one of the nine other classes, uniformly, drawn once per (seed, η) and "
      "shared by every optimizer of that seed; test labels clean.",
      "",
      f"Model: small CNN ({meta.get('params', 0):,} params) on the images mean-pooled 2x2 "
      "(MNIST at 14x14): conv 3x3/2 (1→8), conv 3x3/2 (8→16), ReLU, flatten, dense 256, "
      "dense 10. "
      f"Batch {cfg['batch']}, {cfg['epochs']} epochs, cosine decay to 0, weight decay "
      f"{WD} added to the gradient, SGD momentum {MOMENTUM}; seeds {cfg['seeds']} (init and "
      "batch order; every optimizer of a seed sees the same batches).",
      "",
      f"Optimizers (papers' hyperparameters, not tuned): SAM ρ {SAM_RHO} (Foret et al.'s "
      "CIFAR-10 value; their label-noise study tunes ρ, we do not); mSAM ρ "
      f"{SAM_RHO}, m = {MSAM_M} (`microbatch_mode='unroll'`); IRE κ {IRE['kappa']}, γ "
      f"{IRE['gamma']}, K {IRE['refresh_every']}, {IRE['curvature']} estimator, on after "
      f"{round(100 * IRE_START)}% of training (as in `bench_generalization`); SALA k "
      f"{SALA['sync_period']}, α {SALA['slow_step_size']}, ρ {SALA['rho']}; Lookahead k "
      f"{LOOKAHEAD['sync_period']}, α {LOOKAHEAD['slow_step_size']}. SALA and Lookahead are "
      "evaluated at their slow weights.",
      "",
      f"SGD's learning rate {_lr_text(meta)}, chosen once from the grid below (SGD, "
      f"{round(100 * GRID_NOISE)}% noise, seed 0, trained without the last {GRID_HOLDOUT:,} "
      "training images, scored by final accuracy on them with their noisy labels) and used by "
      "every optimizer at both noise levels.",
      "",
      "Metrics: clean test accuracy after the last epoch (final) and the best of the "
      "per-epoch evaluations (best: chosen on the test set, an optimistic early-stopping "
      "number); accuracy on the noisy training labels; memorised = fraction of the corrupted "
      "training examples predicted as their wrong label; top Hessian eigenvalue of the "
      f"training loss (Lanczos, {LANCZOS_ITERS} HVPs, first {SHARP_BATCH:,} training examples, "
      "noisy labels); time / SGD = median over seeds of the steady-state time per step "
      "(first epoch excluded) over SGD's of the same seed — whole runs timed one after "
      "another on a loaded shared machine, indicative only. Mean ± sample std over seeds.",
  ])


def summary_md(aggs: list[dict], found: list[dict], meta: dict) -> str:
  """The compact table of the README's results block."""
  noises = [n for n in NOISE if any(a["noise"] == n for a in aggs)]
  head = ["optimizer"] + [f"{round(100 * n)}% noise: final / best test acc %" for n in noises] \
      + [f"{round(100 * n)}% noise: memorised %" for n in noises]
  lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
  for opt in OPTIMIZERS:
    by = {a["noise"]: a for a in aggs if a["optimizer"] == opt}
    if not by:
      continue
    cells = [opt]
    for n in noises:
      a = by.get(n)
      cells.append(f"{100 * a['eval_acc_final']:.2f} / {100 * a['eval_acc_best']:.2f}" if a
                   else "-")
    for n in noises:
      a = by.get(n)
      cells.append(f"{100 * a['memorised']:.1f}" if a else "-")
    lines.append("| " + " | ".join(cells) + " |")
  sam = [c for c in found if c["worse"] == "SGD" and c["better"] == "SAM"
         and c["metric"] == "eval_acc_final"]
  sam_text = "; ".join(f"{round(100 * c['noise'])}% noise {100 * c['mean']:+.2f} ± "
                       f"{100 * c['std']:.2f} pp ({c['verdict']})" for c in sam)
  cfg = meta["config"]
  return (f"Clean MNIST test accuracy after training on noisy labels (mean over "
          f"{len(cfg['seeds'])} seeds; small CNN, {cfg['epochs']} epochs, SGD lr "
          f"{_lr_text(meta)} tuned once, papers' hyperparameters for the others). "
          f"SAM − SGD, final accuracy, paired by seed: {sam_text or 'not run'}. "
          "Memorised = corrupted training labels the model predicts. Full table: "
          "`benchmarks/results/label_noise.md`.\n\n" + "\n".join(lines) + "\n")


def plot(runs: list[dict], aggs: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  noises = [n for n in NOISE if any(a["noise"] == n for a in aggs)]
  fig, axes = plt.subplots(2, len(noises), figsize=(6 * len(noises), 8), squeeze=False)
  for j, noise in enumerate(noises):
    ax = axes[0, j]
    for opt in OPTIMIZERS:
      curves = [r["eval_acc_curve"] for r in runs if r["noise"] == noise and r["optimizer"] == opt]
      if curves:
        c = 100 * np.mean(np.array(curves), axis=0)
        ax.plot(np.arange(1, len(c) + 1), c, "o-", ms=3, label=opt)
    ax.set(xlabel="epoch", ylabel="clean test accuracy (%)",
           title=f"{round(100 * noise)}% symmetric label noise (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1, j]
    sel = [a for a in aggs if a["noise"] == noise]
    x = np.arange(len(sel))
    ax.bar(x - 0.2, [100 * a["eval_acc_final"] for a in sel], 0.4,
           yerr=[100 * a["eval_acc_final_std"] for a in sel], label="final clean test acc")
    ax.bar(x + 0.2, [100 * a["memorised"] for a in sel], 0.4,
           yerr=[100 * a["memorised_std"] for a in sel], label="corrupted labels memorised")
    ax.set_xticks(x, [a["optimizer"] for a in sel], rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_outputs(details: dict, meta: dict, out: Path) -> dict:
  runs = details["runs"]
  aggs = aggregate(runs)
  found = claims(runs)
  parts = ["# Robustness to label noise: SGD, IRE, SAM, mSAM, SALA, Lookahead", "",
           settings_md(meta), ""]
  if details.get("grid"):
    parts += ["## SGD learning-rate grid", "", grid_md(details["grid"], meta["lr"]),
              ""]
  for noise in NOISE:
    if any(a["noise"] == noise for a in aggs):
      parts += [f"## {round(100 * noise)}% label noise", "", table_md(aggs, noise), ""]
  if found:
    parts += ["## The claims, paired by seed", "",
              "Δ = better − worse in clean test accuracy, per seed (same initialisation, "
              "batches and noisy labels); 'reproduced' needs the mean to be at least two "
              "standard errors (std/√n) above zero.", "", claims_md(found), ""]
  if meta.get("reading"):
    parts += ["## Reading", "", meta["reading"], ""]
  C.write_results(out / NAME, benchmark="bench_label_noise", meta=meta, rows=result_rows(aggs),
                  details={**details, "aggregates": aggs, "claims": found},
                  markdown="\n".join(parts))
  if aggs:
    (out / f"{NAME}_summary.md").write_text(summary_md(aggs, found, meta))
    plot(runs, aggs, out / f"{NAME}.png")
  return {"aggregates": aggs, "claims": found}


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  C.add_data_dir_argument(p)
  p.add_argument("--smoke", action="store_true",
                 help="tiny run (1,024 images, 2 epochs, one seed, every optimizer once)")
  p.add_argument("--out", default=None,
                 help="results directory (default benchmarks/results; --smoke: a temp dir)")
  p.add_argument("--seeds", nargs="+", type=int, default=None)
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--lr", type=float, default=None, help="skip the grid and use this SGD rate")
  p.add_argument("--fresh", action="store_true", help="ignore (overwrite) saved results")
  p.add_argument("--only", nargs="+", choices=OPTIMIZERS, default=None, metavar="OPT",
                 help="train only these optimizers (the settings and the JSON stay the same)")
  p.add_argument("--reverse", action="store_true", help="train the remaining runs last first")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="add the runs of other label_noise.json files with the same settings "
                      "(made with --only/--reverse), then report")
  p.add_argument("--report-only", action="store_true",
                 help="rewrite the reports from the saved JSON (no training)")
  p.add_argument("--reading", default=None, metavar="FILE",
                 help="markdown for the report's 'Reading' section (kept in the JSON)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  out = Path(args.out) if args.out else (
      Path(tempfile.mkdtemp(prefix="bench_label_noise_")) if args.smoke else C.RESULTS)
  saved = None if args.fresh else C.read_results(out / f"{NAME}.json")
  if args.report_only or args.merge:
    if saved is None:
      raise SystemExit(f"no {out / NAME}.json to report from")
    meta = saved["meta"]
    for other in args.merge or ():
      doc = C.read_results(other)
      if doc["details"]["config"] != saved["details"]["config"]:
        raise SystemExit(f"{other} was made with other settings")
      have = {(r["noise"], r["seed"], r["optimizer"]) for r in saved["details"]["runs"]}
      saved["details"]["runs"] += [r for r in doc["details"]["runs"]
                                   if (r["noise"], r["seed"], r["optimizer"]) not in have]
      meta["wall_s"] = max(meta["wall_s"], doc["meta"]["wall_s"])
      meta["wall_text"] = (f"{len(saved['details']['runs'])} runs + "
                           f"{len(saved['details']['grid'])} grid runs in two processes, each "
                           f"pinned to one core, {meta['wall_s'] / 60:.0f} min.")
    if args.reading:
      meta["reading"] = Path(args.reading).read_text().strip()
    return {"out": str(out), **write_outputs(saved["details"], meta, out)}

  img = C.load_images(args.data_dir, require_mnist=not args.smoke)
  x_tr, x_te = pool(img.x_train), pool(img.x_test)
  y_tr, y_te = img.y_train, img.y_test
  seeds = args.seeds or ([0] if args.smoke else list(SEEDS))
  epochs = args.epochs or (2 if args.smoke else EPOCHS)
  noises = (0.4,) if args.smoke else NOISE
  grid_values = (0.1,) if args.smoke else LR_GRID
  global COMPILER_OPTIONS, LANCZOS_ITERS, SHARP_BATCH
  if args.smoke:
    COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
    LANCZOS_ITERS, SHARP_BATCH = 3, 128
    x_tr, y_tr, x_te, y_te = x_tr[:1024], y_tr[:1024], x_te[:512], y_te[:512]
  config = {"data": img.name, "pool": POOL, "n_train": len(x_tr), "n_test": len(x_te),
            "epochs": epochs, "batch": BATCH, "seeds": seeds, "noise": list(noises),
            "optimizers": list(OPTIMIZERS),
            "model": MODEL, "lr_grid": list(grid_values), "lr": args.lr, "momentum": MOMENTUM,
            "weight_decay": WD, "sam_rho": SAM_RHO, "msam_m": MSAM_M, "ire": IRE,
            "ire_start": IRE_START, "sala": SALA, "lookahead": LOOKAHEAD,
            "sharpness": {"batch": SHARP_BATCH, "lanczos_iters": LANCZOS_ITERS}}
  config = json.loads(json.dumps(config))  # as it reads back from the JSON (lists, not tuples)
  details: dict[str, Any] = {"grid": [], "runs": []}
  if saved is not None:
    if saved["details"]["config"] != config:
      raise SystemExit(f"{out / NAME}.json was made with other settings; pass --fresh to "
                       "start over (or --report-only).")
    details = saved["details"]
  details["config"] = config
  cmd = "python benchmarks/bench_label_noise.py" + "".join(
      f" {'DIR' if a.startswith('/') else a}" for a in (argv if argv is not None else sys.argv[1:]))
  t_start = time.perf_counter()
  prior_wall = saved["meta"].get("wall_s", 0.0) if saved else 0.0

  def meta_now() -> dict:
    wall = prior_wall + time.perf_counter() - t_start
    return {"command": cmd, "machine": C.machine(), "config": config, "wall_s": wall,
            "lr": details.get("lr"),
            "data": C.describe_images(img) + (" (smoke subset)" if args.smoke else ""),
            "wall_text": f"{len(details['runs'])} runs + {len(details['grid'])} grid runs in "
                         f"{wall / 60:.1f} min (one process pinned to one core).",
            "params": sum(int(v.size) for v in jax.tree.leaves(
                init_params(0, x_tr.shape[1], x_tr.shape[-1])))}

  def save() -> None:
    write_outputs(details, meta_now(), out)

  log = lambda msg: print(f"[label_noise {time.perf_counter() - t_start:6.0f}s] {msg}",
                          flush=True)
  # 1. The SGD learning rate, once, on a held-out part of the noisy training set.
  lr = args.lr
  if lr is None:
    y_noisy, _ = noisy_labels(y_tr, GRID_NOISE, 0)
    hold = GRID_HOLDOUT if not args.smoke else 256
    done = {g["lr"] for g in details["grid"]}
    for g in grid_values:
      if g in done:
        continue
      r = train_run("SGD", g, x_tr[:-hold], y_noisy[:-hold], x_tr[-hold:], y_noisy[-hold:], 0,
                    epochs, BATCH, sharp=False)
      details["grid"].append(r)
      log(f"grid lr {g:g}: held-out acc {100 * r['eval_acc_final']:.2f}% "
          f"(best {100 * r['eval_acc_best']:.2f}%) in {r['wall_s']:.0f}s")
      save()
    lr = max(details["grid"], key=lambda g: g["eval_acc_final"])["lr"]
  details["lr"] = lr
  log(f"SGD learning rate {lr:g}")

  # 2. Every optimizer, paired by seed: SGD and SAM (the claim of Foret et al.) for every seed
  # and noise rate first, then the others seed-major, so an interrupted run leaves complete
  # pairs behind.
  done = {(r["noise"], r["seed"], r["optimizer"]) for r in details["runs"]}
  plan = [(s, n, o) for s in seeds for n in noises for o in OPTIMIZERS if (n, s, o) not in done]
  plan.sort(key=lambda p: (p[2] not in ("SGD", "SAM"), p[0], p[1], OPTIMIZERS.index(p[2])))
  if args.only:  # a second process can share the work (results merged with --merge)
    plan = [p for p in plan if p[2] in args.only]
  if args.reverse:
    plan.reverse()
  for i, (seed, noise, opt) in enumerate(plan):
    y_noisy, corrupted = noisy_labels(y_tr, noise, seed)
    r = train_run(opt, lr, x_tr, y_noisy, x_te, y_te, seed, epochs, BATCH, corrupted=corrupted,
                  y_clean=y_tr)
    r["noise"] = noise
    details["runs"].append(r)
    save()
    log(f"[{i + 1}/{len(plan)}] noise {noise:.0%} seed {seed} {opt:9s} test "
        f"{100 * r['eval_acc_final']:.2f}% (best {100 * r['eval_acc_best']:.2f}%), noisy "
        f"train {100 * r['train_acc_noisy']:.1f}%, memorised {100 * r['memorised']:.1f}%, eig "
        f"{r['top_eig']:.3g}, {1e3 * r['time_per_step_s']:.1f} ms/step, {r['wall_s']:.0f}s")
  meta = meta_now()
  if args.reading:
    meta["reading"] = Path(args.reading).read_text().strip()
  result = write_outputs(details, meta, out)
  print(Path(out / f"{NAME}_summary.md").read_text() if result["aggregates"] else "")
  return {"out": str(out), "details": details, **result}


if __name__ == "__main__":
  main()
