"""SALA against its base, Lookahead and SAM: an MNIST training run and the step cost.

Both parts run the examples' optimizers and train step (what is reported: the template).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Mapping
from typing import Any

from benchmarks import data, metrics, runner, schema, timing
from benchmarks.render import fill, renders, table
from benchmarks.spec import Micro

# Every setting, as the results record it; the optimizers are built from it.
CONFIG: dict[str, Any] = {
    "epochs": 8, "seeds": 2, "batch": 128, "hidden": [512, 256], "lr": 0.05, "momentum": 0.9,
    "wd": 5e-4, "sala": {"k": 2, "alpha": 0.5, "rho": 0.2}, "lookahead": {"k": 5, "alpha": 0.8},
    "sam": {"rho": 0.05, "impl": "ire_optax.sam"}, "chunk": 34, "reps": 30,
    "sizes": [[256, 128], [512, 256], [1024, 1024]]}
SMOKE = {**CONFIG, "epochs": 2, "seeds": 1, "chunk": 4, "reps": 3, "sizes": [[64, 32]]}
# The base: SGD with Nesterov momentum, L2 on every parameter, cosine to 0; the others wrap it.
BASE = {"name": "sgd", "base": "sgd", "lr": CONFIG["lr"], "momentum": CONFIG["momentum"],
        "nesterov": True, "weight_decay": CONFIG["wd"], "decay_mask": "all", "warmup_steps": 0}
SALA = {"name": "sala", "sala_sync_period": CONFIG["sala"]["k"],
        "sala_slow_step": CONFIG["sala"]["alpha"], "rho": CONFIG["sala"]["rho"]}
ARMS = {"base": {}, "lookahead": {"name": "lookahead", "la_sync_period": CONFIG["lookahead"]["k"],
                                  "la_slow_step": CONFIG["lookahead"]["alpha"]},
        "sam": {"name": "sam", "rho": CONFIG["sam"]["rho"]}, "sala": SALA}
# The fixed-batch step costs: SALA without its SAM step (rho 0: its bookkeeping alone) and
# with it every cycle (rho 1, above every distance on a fixed batch).
COSTS = {"base": {}, "lookahead (k=5)": ARMS["lookahead"], "sam": ARMS["sam"],
         "sala k=2 (rho=0)": {**SALA, "rho": 0.0},
         "sala k=2 (always stage 2)": {**SALA, "rho": 1.0},
         "sala k=5 (always stage 2)": {**SALA, "rho": 1.0, "sala_sync_period": 5}}
SPEC = Micro(name="sala", measures="train-step time over the base's (SGD, Nesterov momentum)",
             blocks=tuple(ARMS), baseline="base", sizes=tuple(map(tuple, CONFIG["sizes"])),
             reps=CONFIG["reps"])


def stepper(opt: Mapping[str, Any], hidden: list[int], shape: tuple, total: int, seed: int,
            args_at: Any, steps: int) -> tuple[timing.Stepper, Any, Any]:
  """A timing block of ``steps`` train steps of the examples' loop (optimizer ``opt`` over
  the base, an MLP of widths ``hidden``); with its optimizer and the model's graph."""
  from examples.common import optim, train
  from examples.common.config import OptimizerConfig

  graphdef, params, stats = train.split_model(data.small_net(in_shape=shape, dense=hidden,
                                                             seed=seed))
  spec = optim.build_optimizer(OptimizerConfig(**{**BASE, **opt}), total, seed=seed)
  step, state = train.make_train_step(graphdef, spec, num_classes=10), train.init_state(
      spec, params, stats)
  step.compile(state, args_at(0)[0], range(total))
  return timing.Stepper(lambda s, b, i: step(s, b, i)[0], state, steps, args_at), spec, graphdef


def train_seed(img: Any, c: Mapping[str, Any], seed: int) -> dict[str, Any]:
  """Every arm trained from one initialisation on the same batches, chunk by chunk in a
  rotating order (time per chunk over the base's of the same round), then evaluated."""
  import ire_optax
  from examples.common import data as data_lib
  from examples.common import train

  batcher = data_lib.ImageBatcher(img.x_train, img.y_train, c["batch"], seed=seed)
  rounds = batcher.steps_per_epoch // c["chunk"]
  total = c["epochs"] * rounds * c["chunk"]
  at = lambda i: (batcher.batch_at(i), i)  # noqa: E731
  arms = {n: stepper(o, c["hidden"], img.image_shape, total, seed, at, c["chunk"])
          for n, o in ARMS.items()}
  times: dict[str, list[float]] = {n: [] for n in arms}
  fractions, prev = [], (0, 0)
  for _ in range(c["epochs"]):
    t = timing.time_interleaved({n: a[0] for n, a in arms.items()}, baseline="base",
                                reps=rounds, warmup=0)
    for n in arms:
      times[n] += t.seconds[n]
    st = ire_optax.sala_stats(arms["sala"][0].carry.opt_state)
    done = int(st["extra_grads"]), int(st["cycles"])
    fractions.append((done[0] - prev[0]) / max(done[1] - prev[1], 1))
    prev = done
  final = {}
  for n, (block, spec, graphdef) in arms.items():
    params = train.eval_params(spec, block.carry)
    ev = {k: train.evaluate(graphdef, params, block.carry.stats, data_lib.image_eval_batches(
        x, y, 2000)) for k, x, y in (("train", img.x_train, img.y_train),
                                     ("test", img.x_test, img.y_test))}
    final[n] = {f"{k}_{m}": ev[k][f"eval_{m}"] for k in ev for m in ("loss", "acc")}
  return {"times": times, "frac_per_epoch": fractions, "final": final, "steps": total,
          "steps_per_round": [c["chunk"]] * (rounds * c["epochs"]),
          "sala_extra_grads": prev[0], "sala_cycles": prev[1]}


def step_costs(img: Any, c: Mapping[str, Any]) -> dict[str, Any]:
  """Per-step time over the base's on one fixed batch, interleaved blocks of 10 steps."""
  import jax
  import numpy as np

  import ire_optax

  batch = {"x": img.x_train[:c["batch"]], "y": img.y_train[:c["batch"]],
           "w": np.ones(c["batch"], np.float32)}
  out = {}
  for hidden in c["sizes"]:
    blocks = {n: stepper(o, hidden, img.image_shape, 10_000, 0, lambda i: (batch, i), 10)[0]
              for n, o in COSTS.items()}
    t = timing.time_interleaved(blocks, baseline="base", reps=c["reps"], units=10, warmup=1)
    out["-".join(map(str, (int(np.prod(img.image_shape)), *hidden, 10)))] = {
        "params": sum(v.size for v in jax.tree.leaves(blocks["base"].carry.params)),
        "base_step_ms": 1e3 * t.median("base"),
        "ratios": {n: t.ratio(n) for n in COSTS}, "min_ratios": {n: t.min_ratio(n) for n in COSTS},
        "sala_stage2_fraction": {n: float(ire_optax.sala_stats(b.carry.opt_state)[
            "stage2_fraction"]) for n, b in blocks.items() if n.startswith("sala")},
        "all_finite": all(bool(np.isfinite(v).all()) for b in blocks.values()
                          for v in jax.tree.leaves(b.carry.params))}
  return out


def run(spec: Micro, args: argparse.Namespace) -> None:
  c, t0 = (SMOKE if args.smoke else CONFIG), time.perf_counter()
  img = data.load_images(args.data_dir, scale="unit")
  runs = [train_seed(img, c, s) for s in range(c["seeds"])]
  costs = step_costs(img, c)
  ratios = {n: [r["times"][n][i] / r["times"]["base"][i] for r in runs
                for i in range(1, len(r["times"]["base"]))] for n in ARMS}
  extra, cycles = (sum(r[k] for r in runs) for k in ("sala_extra_grads", "sala_cycles"))
  steps, frac = sum(r["steps"] for r in runs), extra / max(cycles, 1)
  grads = {"base": 1.0, "lookahead": 1.0, "sam": 2.0, "sala": (steps + extra) / steps}
  summary = {n: {"time_ratio_median": statistics.median(v),
                 "time_ratio_q25": metrics.quantile(sorted(v), 0.25),
                 "time_ratio_q75": metrics.quantile(sorted(v), 0.75), "grad_eval_ratio": grads[n],
                 "expected_ratio": 1.0 + frac / c["sala"]["k"] if n == "sala" else grads[n],
                 **{k: statistics.fmean(r["final"][n][k] for r in runs)
                    for k in ("train_loss", "test_acc")},
                 "test_acc_per_seed": [r["final"][n]["test_acc"] for r in runs]}
             for n, v in ratios.items()}
  details = {"config": {**c, "data": data.describe_images(img),
                        "inputs": math.prod(img.x_train.shape[1:]),
                        "machine": timing.machine()["summary"],
                        "wall_s": time.perf_counter() - t0,
                        "command": runner.command("sala")},
             "summary": summary, "stage2_fraction": frac, "step_costs": costs, "runs": runs,
             "stage2_fraction_per_epoch": [statistics.fmean(r["frac_per_epoch"][e] for r in runs)
                                           for e in range(c["epochs"])]}
  schema.write_micro(spec.name, args.out, rows=result_rows(details), details=details)


def result_rows(details: Mapping[str, Any]) -> list[schema.Row]:
  """The training run's time ratios and the fixed-batch step costs, over SGD's."""
  names, c = {"lookahead": "Lookahead", "sam": "SAM", "sala": "SALA"}, details["config"]
  # (784: MNIST's, the committed run's, from before the inputs were recorded)
  widths = "-".join(str(w) for w in (c.get("inputs", 784), *c["hidden"], 10))
  run = f"MLP {widths}, {c['data'].split(' (')[0]} training run"
  out = [schema.time_row(name, "SGD", run, "train step",
                         details["summary"][key]["time_ratio_median"], "sala",
                         f"stage-2 fraction {details['stage2_fraction']:.2f}" if key == "sala"
                         else "", variant=f"k={c[key]['k']}" if "k" in c[key] else "")
         for key, name in names.items()]
  for task, r in details["step_costs"].items():
    for label, ratio in r["ratios"].items():
      if label != "base":
        head, _, rest = label.partition(" ")
        out.append(schema.time_row(names.get(head, head), "SGD", f"MLP {task}, fixed batch",
                                   "train step", ratio, "sala",
                                   variant=rest.strip(" ()").replace(" (", ", ")))
  return out


@renders("sala")
def render(doc: Mapping[str, Any]) -> dict[str, str]:
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
