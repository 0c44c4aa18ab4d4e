"""Benchmark: SALA on a real small training run, against its base, Lookahead and SAM.

Trains the same MLP (784-512-256-10, ReLU, float32, pure JAX) on MNIST
(from ``--data-dir``: the training images found there, the official 10,000
test images; scikit-learn's digits without it) with

* ``base``      -- SGD, Nesterov momentum 0.9, lr 0.05 cosine-decayed to 0,
  weight decay 5e-4 added to the gradient (``add_decayed_weights`` + ``sgd``),
  the authors' base optimizer;
* ``lookahead`` -- ``optax.lookahead(base, sync_period=5, slow_step_size=0.8)``;
* ``sam``       -- ``ire_optax.sam(base, rho=0.05)``;
* ``sala``      -- ``ire_optax.sala(base, sync_period=2, slow_step_size=0.5, rho=0.2)``,

all from the same initialisation and the same batch order, in one process.
Epochs are interleaved (one epoch of every optimizer, in a rotating order, then
the next epoch) so that the machine's load affects them alike; each optimizer's
epoch time is divided by the base's epoch time of the same round and the median
over rounds (and seeds) is reported. Steps are jitted and compiled before
timing; the first round is not timed.

Reported: the fraction of stage-2 cycles of SALA (per epoch and overall), the
gradient-evaluation ratio (exact, from ``sala_stats``), the measured time
ratio against the base and the expected one ``1 + fraction / k``, the final
training loss (full training set) and the test accuracy, both evaluated with
the slow weights for SALA and Lookahead.

Usage::

  python benchmarks/bench_sala.py --data-dir DIR  # full run, writes results/sala.{md,json}
  python benchmarks/bench_sala.py --quick    # smoke run, prints only
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ire_optax

LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
SALA_K, SALA_ALPHA, SALA_RHO = 2, 0.5, 0.2
LA_K, LA_ALPHA = 5, 0.8
SAM_RHO = 0.05
HIDDEN = (512, 256)


# -----------------------------------------------------------------------------
# Data and model
# -----------------------------------------------------------------------------


def load_data(data_dir):
  img = C.load_images(data_dir, scale="unit")
  flat = lambda x: x.reshape(len(x), -1)
  return ((flat(img.x_train), img.y_train), (flat(img.x_test), img.y_test),
          C.describe_images(img))


init_mlp = C.mlp_init
logits_fn = C.mlp_logits


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


grad_of = jax.grad(loss_fn)


# -----------------------------------------------------------------------------
# Optimizers and train steps
# -----------------------------------------------------------------------------


def make_base(total_steps):
  lr = optax.cosine_decay_schedule(LR, total_steps)
  return optax.chain(optax.add_decayed_weights(WD), optax.sgd(lr, momentum=MOMENTUM, nesterov=True))


def make_runner(name, total_steps):
  """Returns (init(params) -> carry, step(carry, x, y) -> carry, eval_params(carry))."""
  base = make_base(total_steps)

  if name == "lookahead":
    tx = optax.lookahead(base, sync_period=LA_K, slow_step_size=LA_ALPHA)

    def init(p):
      lp = optax.LookaheadParams(fast=p, slow=jax.tree.map(jnp.copy, p))  # no shared buffers
      return lp, tx.init(lp)

    def step(carry, x, y):
      lp, s = carry
      g = grad_of(lp.fast, x, y)
      u, s = tx.update(g, s, lp)
      return optax.apply_updates(lp, u), s

    return init, jax.jit(step, donate_argnums=0), lambda c: c[0].slow

  if name == "base":
    tx = base
  elif name == "sam":
    tx = ire_optax.sam(base, rho=SAM_RHO)
  elif name == "sala":
    tx = ire_optax.sala(base, sync_period=SALA_K, slow_step_size=SALA_ALPHA, rho=SALA_RHO)
  else:
    raise ValueError(name)

  def init(p):
    return p, tx.init(p)

  def step(carry, x, y):
    p, s = carry
    g = grad_of(p, x, y)
    if name == "base":
      u, s = tx.update(g, s, p)
    else:
      u, s = tx.update(g, s, p, grad_fn=lambda q: grad_of(q, x, y))
    return optax.apply_updates(p, u), s

  if name == "sala":
    return init, jax.jit(step, donate_argnums=0), lambda c: ire_optax.sala_eval_params(c[1])
  return init, jax.jit(step, donate_argnums=0), lambda c: c[0]


@jax.jit
def _eval_batch(params, x, y):
  lg = logits_fn(params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(lg, y).sum()
  return loss, jnp.sum(jnp.argmax(lg, -1) == y)


def evaluate(params, x, y, bs=2000):
  tot_l = tot_c = 0.0
  for i in range(0, len(x), bs):
    lo, co = _eval_batch(params, x[i:i + bs], y[i:i + bs])
    tot_l, tot_c = tot_l + float(lo), tot_c + float(co)
  return tot_l / len(x), tot_c / len(x)


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------


def run_seed(seed, data, epochs, batch, names, log, chunk=34):
  (xtr, ytr), (xte, yte) = data
  steps_per_epoch = len(xtr) // batch
  total = epochs * steps_per_epoch
  params0 = init_mlp(jax.random.PRNGKey(seed), (xtr.shape[1], *HIDDEN, 10))
  runners = {n: make_runner(n, total) for n in names}
  carries = {n: runners[n][0](jax.tree.map(jnp.array, params0)) for n in names}
  # Compile each step outside the timed region.
  for n in names:
    _, step, _ = runners[n]
    step.lower(carries[n], xtr[:batch], ytr[:batch]).compile()
  rng = np.random.default_rng(seed)
  times = {n: [] for n in names}
  frac_per_epoch, prev = [], (0, 0)
  chunks = [(i, min(i + chunk, steps_per_epoch)) for i in range(0, steps_per_epoch, chunk)]

  def next_chunk(n, todo):
    """A timing block: optimizer ``n`` trains on its next chunk of the epoch's batches."""
    def block():
      lo, hi = next(todo)
      step, c = runners[n][1], carries[n]
      for i in range(lo, hi):
        c = step(c, xb[i], yb[i])
      carries[n] = c
      return c
    return block

  for ep in range(epochs):
    perm = rng.permutation(len(xtr))[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
    xb, yb = jnp.asarray(xtr[perm]), jnp.asarray(ytr[perm])
    # One repetition is one round: the same chunk of steps for every optimizer, in a rotating
    # order.
    t = C.time_interleaved({n: next_chunk(n, iter(chunks)) for n in names}, baseline="base",
                           reps=len(chunks), warmup=0)
    for n in names:
      times[n] += t.seconds[n]
    st = ire_optax.sala_stats(carries["sala"][1])
    eg, cy = int(st["extra_grads"]), int(st["cycles"])
    frac_per_epoch.append((eg - prev[0]) / max(cy - prev[1], 1))
    prev = (eg, cy)
    log(f"seed {seed} epoch {ep + 1}/{epochs}: " + ", ".join(
        f"{n} {sum(times[n][-len(chunks):]):.2f}s" for n in names) + f"; sala stage-2 "
        f"fraction {frac_per_epoch[-1]:.2f}, d={float(st['distance']):.4f}")
  res = {"times": times, "frac_per_epoch": frac_per_epoch, "final": {}}
  st = ire_optax.sala_stats(carries["sala"][1])
  res["sala_extra_grads"], res["sala_cycles"] = int(st["extra_grads"]), int(st["cycles"])
  res["steps"] = total
  res["steps_per_round"] = [hi - lo for lo, hi in chunks] * epochs
  for n in names:
    ev = runners[n][2](carries[n])
    tr_loss, tr_acc = evaluate(ev, xtr, ytr)
    te_loss, te_acc = evaluate(ev, xte, yte)
    res["final"][n] = dict(train_loss=tr_loss, train_acc=tr_acc, test_loss=te_loss,
                           test_acc=te_acc)
  return res


def step_costs(data, batch, sizes, reps, block, log):
  """Per-step time ratios on a fixed batch, interleaved blocks of ``block`` steps.

  ``sala (rho=0)`` never takes an extra gradient: it measures SALA's bookkeeping
  alone. ``sala (always stage 2)`` (rho = 1, far above the distances of a
  fixed batch; the fraction actually taken is recorded) takes one per cycle:
  1 + 1/k gradients per step.
  """
  (xtr, ytr), _ = data
  x, y = jnp.asarray(xtr[:batch]), jnp.asarray(ytr[:batch])
  configs = {
      "base": lambda b: b,
      "lookahead (k=5)": lambda b: optax.lookahead(b, sync_period=LA_K, slow_step_size=LA_ALPHA),
      "sam": lambda b: ire_optax.sam(b, rho=SAM_RHO),
      "sala k=2 (rho=0)": lambda b: ire_optax.sala(b, sync_period=2, rho=0.0),
      "sala k=2 (always stage 2)": lambda b: ire_optax.sala(b, sync_period=2, rho=1.0),
      "sala k=5 (always stage 2)": lambda b: ire_optax.sala(b, sync_period=5, rho=1.0),
  }
  out = {}
  for hidden in sizes:
    p0 = init_mlp(jax.random.PRNGKey(0), (xtr.shape[1], *hidden, 10))
    n_params = sum(v.size for v in jax.tree.leaves(p0))
    steps = {}
    for name, make in configs.items():
      tx = make(make_base(10_000))
      la = name.startswith("lookahead")

      def step(c, tx=tx, la=la, name=name):
        p, st = c
        if la:
          g = grad_of(p.fast, x, y)
          u, st = tx.update(g, st, p)
        elif name == "base":
          u, st = tx.update(grad_of(p, x, y), st, p)
        else:
          u, st = tx.update(grad_of(p, x, y), st, p, grad_fn=lambda q: grad_of(q, x, y))
        return optax.apply_updates(p, u), st

      p = jax.tree.map(jnp.copy, p0)
      if la:
        p = optax.LookaheadParams(fast=p, slow=jax.tree.map(jnp.copy, p0))
      f = jax.jit(step, donate_argnums=0)
      c = f((p, tx.init(p)))
      steps[name] = C.Stepper(f, jax.block_until_ready(c), block)
    t = C.time_interleaved(steps, baseline="base", reps=reps, units=block, warmup=0)
    key = "-".join(str(h) for h in (xtr.shape[1], *hidden, 10))
    out[key] = dict(
        params=n_params,
        base_step_ms=1e3 * t.median("base"),
        ratios={n: t.ratio(n) for n in configs},
        min_ratios={n: t.min_ratio(n) for n in configs},
        sala_stage2_fraction={
            n: float(ire_optax.sala_stats(steps[n].carry[1])["stage2_fraction"])
            for n in configs if n.startswith("sala")},
        all_finite=all(bool(jnp.all(jnp.isfinite(v)))
                       for n in configs for v in jax.tree.leaves(steps[n].carry[0])),
    )
    log(f"step cost {key}: " + ", ".join(
        f"{n} {out[key]['min_ratios'][n]:.3f} ({v:.3f})" for n, v in out[key]["ratios"].items()))
  return out


def result_rows(details: dict[str, Any]) -> list[C.Row]:
  """The cost rows of ``details``: the training run's and the fixed-batch step ratios."""
  names = {"lookahead": "Lookahead", "sam": "SAM", "sala": "SALA"}
  out = []
  for key, name in names.items():
    s = details["summary"].get(key)
    if s:
      note = (f"stage-2 fraction {details['stage2_fraction']:.2f}"
              if key == "sala" and "stage2_fraction" in details else "")
      k = details["config"].get(key, {}).get("k")
      out.append(C.time_row(name, "SGD", "MLP 784-512-256-10, MNIST training run", "train step",
                            s["time_ratio_median"], "bench_sala", note,
                            variant=f"k={k}" if k else ""))
  for task, r in details["step_costs"].items():
    for label, ratio in r["ratios"].items():
      if label == "base":
        continue
      name = label.split()[0]
      name = names.get(name, name)
      variant = label[len(label.split()[0]):].strip(" ()").replace(" (", ", ")
      out.append(C.time_row(name, "SGD", f"MLP {task}, fixed batch", "train step", ratio,
                            "bench_sala", variant=variant))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  C.add_data_dir_argument(ap)
  ap.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing")
  ap.add_argument("--epochs", type=int, default=8)
  ap.add_argument("--seeds", type=int, default=2)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--reps", type=int, default=30, help="step-cost repetitions")
  args = ap.parse_args()
  data = load_data(args.data_dir)
  data_name = data[2]
  data = data[:2]
  sizes = [(256, 128), HIDDEN, (1024, 1024)]
  if args.quick:
    args.epochs, args.seeds, args.reps = 2, 1, 3
    (xtr, ytr), te = data
    data = ((xtr[:2048], ytr[:2048]), te)
    sizes = [(64, 32)]
  names = ["base", "lookahead", "sam", "sala"]
  t_start = time.perf_counter()
  runs = [run_seed(s, data, args.epochs, args.batch, names, print) for s in range(args.seeds)]
  costs = step_costs(data, args.batch, sizes, args.reps, 10, print)
  wall = time.perf_counter() - t_start

  ratios = {n: [] for n in names}
  for r in runs:
    for e in range(1, len(r["times"]["base"])):  # round 0 not timed (first-call effects)
      for n in names:
        ratios[n].append(r["times"][n][e] / r["times"]["base"][e])
  base_step_ms = 1e3 * statistics.median(
      t / m for r in runs for t, m in zip(r["times"]["base"][1:], r["steps_per_round"][1:],
                                           strict=True))
  extra = sum(r["sala_extra_grads"] for r in runs)
  cycles = sum(r["sala_cycles"] for r in runs)
  steps = sum(r["steps"] for r in runs)
  frac = extra / cycles
  grad_ratio = {"base": 1.0, "lookahead": 1.0, "sam": 2.0, "sala": (steps + extra) / steps}
  expected = {"base": 1.0, "lookahead": 1.0, "sam": 2.0, "sala": 1.0 + frac / SALA_K}
  summary = {}
  for n in names:
    fin = [r["final"][n] for r in runs]
    summary[n] = dict(
        time_ratio_median=statistics.median(ratios[n]),
        time_ratio_q25=float(np.quantile(ratios[n], 0.25)),
        time_ratio_q75=float(np.quantile(ratios[n], 0.75)),
        grad_eval_ratio=grad_ratio[n], expected_ratio=expected[n],
        train_loss=statistics.mean(f["train_loss"] for f in fin),
        test_acc=statistics.mean(f["test_acc"] for f in fin),
        test_acc_per_seed=[f["test_acc"] for f in fin],
    )
  frac_epochs = [statistics.mean(r["frac_per_epoch"][e] for r in runs) for e in range(args.epochs)]

  mach = C.machine()
  machine = f"{mach['summary']} (shared with other jobs, noisy)"
  sam_impl = "ire_optax.sam"
  n_rounds = len(ratios["base"])
  lines = [
      "# SALA benchmark: real training run, cost and accuracy vs base, Lookahead and SAM",
      "",
      "Command: `python benchmarks/bench_sala.py` "
      f"(`--epochs {args.epochs} --seeds {args.seeds} --reps {args.reps}`).",
      "",
      "## Training run",
      "",
      f"- Data: {data_name}; MLP 784-{HIDDEN[0]}-{HIDDEN[1]}-10 (ReLU, float32), batch "
      f"{args.batch}, {args.epochs} epochs ({runs[0]['steps']} steps), {args.seeds} seeds "
      "(loss and accuracy: mean over seeds; same initialisation and batch order for all "
      "optimizers).",
      f"- Base: SGD Nesterov momentum {MOMENTUM}, lr {LR} cosine to 0, weight decay {WD} "
      f"(coupled). Lookahead: `optax.lookahead` k={LA_K}, α={LA_ALPHA}. SAM: `{sam_impl}`, "
      f"ρ={SAM_RHO}. SALA: k={SALA_K}, α={SALA_ALPHA}, ρ={SALA_RHO}.",
      f"- Machine: {machine}. All optimizers in one process, interleaved by rounds of "
      f"34 steps in a rotating order; time ratio = round time / base round time of the "
      f"same round, median and interquartile range over {n_rounds} rounds (first round "
      f"of each seed excluded). Base step (median): {base_step_ms:.2f} ms. Total wall "
      f"time of the benchmark {wall:.0f} s.",
      "- Grad-eval ratio: gradients per step relative to the base (exact; SALA's from "
      "`sala_stats`). Expected time ratio: 1 + (stage-2 fraction)/k for SALA, 2 for SAM.",
      "- Train loss (full training set) and test accuracy are evaluated with the slow weights "
      "for SALA and Lookahead.",
      "",
      "| optimizer | time ratio vs base, median (IQR) | grad-eval ratio | expected ratio "
      "| final train loss | test acc. (%) |",
      "| --- | --- | --- | --- | --- | --- |",
  ]
  for n in names:
    sm = summary[n]
    lines.append(
        f"| {n} | {sm['time_ratio_median']:.3f} ({sm['time_ratio_q25']:.2f}–"
        f"{sm['time_ratio_q75']:.2f}) | {sm['grad_eval_ratio']:.3f} | "
        f"{sm['expected_ratio']:.3f} | {sm['train_loss']:.4f} | {100 * sm['test_acc']:.2f} |"
    )
  lines += [
      "",
      f"SALA stage-2 cycles: {extra} of {cycles} ({100 * frac:.1f}%). Stage-2 fraction per "
      "epoch (mean over seeds): " + ", ".join(f"{f:.2f}" for f in frac_epochs) + ".",
      "",
      "## Step cost on a fixed batch, several sizes",
      "",
      f"Jitted train step (gradient(s) + update + apply, params and state donated), batch "
      f"{args.batch}, same process, interleaved blocks of 10 steps, {args.reps} blocks each. Each "
      "cell: fastest block / fastest base block (robust to the machine's additive load "
      "noise), then in brackets the median over rounds of block / base block of the same "
      "round. `sala (rho=0)` takes no "
      "extra gradient (its bookkeeping alone); `always stage 2` (ρ = 1, above every "
      "distance on a fixed batch; checked below) takes one per cycle, i.e. 1 + 1/k "
      "gradients per step.",
      "",
      "| MLP | params | base step (median, ms) | "
      + " | ".join(next(iter(costs.values()))["ratios"]) + " |",
      "| --- | --- | --- | " + " | ".join("---" for _ in next(iter(costs.values()))["ratios"])
      + " |",
  ]
  for key, c in costs.items():
    lines.append(f"| {key} | {c['params']:,} | {c['base_step_ms']:.2f} | "
                 + " | ".join(f"{c['min_ratios'][n]:.2f} ({v:.2f})"
                              for n, v in c["ratios"].items()) + " |")
  fr = {n: min(c["sala_stage2_fraction"][n] for c in costs.values())
        for n in next(iter(costs.values()))["sala_stage2_fraction"]}
  lines += [
      "",
      "Expected from gradient counts: lookahead 1, sam 2, sala k=2 (always stage 2) 1.5, "
      "sala k=5 (always stage 2) 1.2, sala (rho=0) 1. Measured stage-2 fractions (minimum "
      "over sizes): " + ", ".join(f"{n} {v:.2f}" for n, v in fr.items())
      + f"; all parameters finite: {all(c['all_finite'] for c in costs.values())}.",
      "",
  ]
  table = "\n".join(lines)
  print(table)
  if not args.quick:
    details = dict(
        config=dict(data=data_name, epochs=args.epochs, seeds=args.seeds, batch=args.batch,
                    hidden=HIDDEN, lr=LR, momentum=MOMENTUM, wd=WD,
                    sala=dict(k=SALA_K, alpha=SALA_ALPHA, rho=SALA_RHO),
                    lookahead=dict(k=LA_K, alpha=LA_ALPHA), sam=dict(rho=SAM_RHO, impl=sam_impl),
                    machine=machine, wall_s=wall),
        summary=summary, stage2_fraction=frac, stage2_fraction_per_epoch=frac_epochs,
        step_costs=costs, runs=runs)
    C.write_results(C.RESULTS / "sala", benchmark="bench_sala", meta={"machine": mach},
                    rows=result_rows(details), details=details, markdown=table)


if __name__ == "__main__":
  main()
