"""IRE's pre-training speed-up over AdamW (Wang et al. 2024: 2x held-out, 5.4x training loss).

Per data set and seed, a character-level Llama: ``adamw-T``, ``adamw-2T`` and one
``ire-<setting>-T`` per IRE setting, from the same initialisation on the same batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks import metrics, runner, schema, timing
from benchmarks.render import fill, pm, table
from benchmarks.spec import Arm, Experiment, Task, smoke

IRE_KEYS = ("curvature", "gamma", "kappa", "kappa_schedule", "refresh_every")
DATASETS = {
    "wikitext2": {"label": "WikiText-2", "note": "WikiText-2 has no training split here: "
                  "trained on valid.txt, evaluated on test.txt"},
    "shakespeare": {"label": "Tiny Shakespeare",
                    "note": "Tiny Shakespeare: first 90% trained on, last 10% held out"},
    "cpython-docs": {"label": "CPython docs (offline)", "note": "the offline CPython "
                     "documentation text (last 10% held out)"},
}


def ire(curvature: str = "fisher", gamma: float = 0.6, kappa: float = 3.0,
        kappa_schedule: str = "constant") -> dict[str, Any]:
  """The ``OptimizerConfig`` overrides of AdamW+IRE with K = 10."""
  return {"name": "adamw+ire", "ire_curvature": curvature, "ire_gamma": gamma,
          "ire_kappa": kappa, "ire_kappa_schedule": kappa_schedule, "ire_refresh_every": 10}


def arms(settings: Mapping[str, Mapping[str, Any]], steps: int,
         notes: Mapping[str, str] | None = None) -> tuple[Arm, ...]:
  ires = [Arm(f"ire-{v}-T", o, note=(notes or {}).get(v, "")) for v, o in settings.items()]
  return (Arm("adamw-T"), Arm("adamw-2T", train={"steps": 2 * steps}), *ires)


def tasks(names: tuple[str, ...], **overrides: Any) -> tuple[Task, ...]:
  return tuple(Task("llama", n, overrides, name=n) for n in names)


ADAMW = {"lr": 4e-3, "warmup_steps": 15, "b1": 0.9, "b2": 0.95, "weight_decay": 0.1,
         "clip_norm": 1.0, "schedule": "cosine"}
LOOP = {"model": {"size": "mini"}, "batch_size": 16, "data": {"seq_len": 64},
        "eval_batches": 16, "eval_every": 15, "log_every": 15}
SMOKE = {"model": {"size": "toy"}, "batch_size": 4, "data": {"seq_len": 16, "max_chars": 20000},
         "eval_batches": 2, "eval_every": 2, "log_every": 1, "fast_compile": True}
SMOKE_OPT = {"lr": 1e-2, "warmup_steps": 2}
# The three curvature estimators, and Fisher with kappa_t = 3 lr_t / lr_peak (the paper's
# optional schedule for small runs).
SETTINGS = {e: ire(e) for e in ("fisher", "grad_sq", "hutchinson")} | {
    "fisher-lr": ire(kappa_schedule="lr")}
SPEC = Experiment(
    name="pretraining", claim="AdamW+IRE-T reaches AdamW-2T's loss at half the steps "
    "(Wang et al. 2024, 2x)", tasks=tasks(("wikitext2", "shakespeare"), **LOOP,
                                          optimizer=ADAMW),
    arms=arms(SETTINGS, 300), seeds=(0, 1, 2), steps=300, metrics=("eval_loss",),
    baseline="adamw-T", smoke={"tasks": tasks(("cpython-docs",), **SMOKE, optimizer=SMOKE_OPT),
                               "arms": arms(SETTINGS, 8), "seeds": (0,), "steps": 8})
# The IRE authors' settings (wmz9/IRE-algorithm-framework): their small-scale model at half
# width as a Llama block, AdamW eps 1e-16 with weight decay on every parameter, no clipping,
# warm-up 1% of T, cosine to lr/20; both published IRE settings.
OFFICIAL_IRE = {"g0.6-k3": ire(gamma=0.6, kappa=3.0),
                "g0.99-k5lr": ire(gamma=0.99, kappa=5.0, kappa_schedule="lr")}
OFFICIAL_SOURCES = {
    "g0.6-k3": "README's Llama commands: rank=0.4, prog=3.0, constant "
               "(NLP/LLM/train_admire_wiki103_Llama.py)",
    "g0.99-k5lr": "NLP/small-scale/TF_IRE.ipynb: rank=0.01, prog=5.0, prog_decay=True "
                  "(kappa_t = 5 lr_t / lr_max), beta=0"}
OFFICIAL_OPT = {"lr": 6e-4, "warmup_steps": 30, "b1": 0.9, "b2": 0.95, "eps": 1e-16,
                "weight_decay": 5e-4, "decay_mask": "all", "clip_norm": 0.0,
                "final_lr_ratio": 0.05, "schedule": "cosine"}
OFFICIAL_MODEL = {"size": "mini", "dim": 64, "depth": 2, "heads": 4, "ffn_dim": 256}
OFFICIAL = Experiment(
    name="pretraining_official", claim="IRE's 5.4x (training loss) and 2x (held-out) "
    "speed-ups with the authors' settings", tasks=tasks(
        ("wikitext2",), model=OFFICIAL_MODEL, batch_size=16, data={"seq_len": 32},
        eval_batches=16, eval_every=150, log_every=10, optimizer=OFFICIAL_OPT),
    arms=arms(OFFICIAL_IRE, 3000, OFFICIAL_SOURCES), seeds=(0, 1), steps=3000,
    metrics=("eval_loss", "train_loss"), baseline="adamw-T",
    smoke={"tasks": tasks(("cpython-docs",), **SMOKE, optimizer={**OFFICIAL_OPT, **SMOKE_OPT}),
           "arms": arms(OFFICIAL_IRE, 20), "seeds": (0,), "steps": 20})
LR_CHECK = 2.4e-3  # the official preset's runs of seed 0 (AdamW-2T aside) at this peak lr
PRESETS = {"default": SPEC, "official": OFFICIAL}


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                 help="default: three estimators and a kappa schedule, two data sets; "
                      "official: the IRE authors' settings (+ a learning-rate check)")


def variant(label: str) -> str | None:
  """The IRE setting of arm ``ire-<setting>-T``; None for AdamW's arms."""
  return label[4:-2] if label.startswith("ire-") else None


def leaves(cfg: Any) -> dict[str, Any]:
  """The fields of a nested config, flat (the report's settings)."""
  out: dict[str, Any] = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    out.update(leaves(v) if dataclasses.is_dataclass(v) else {f.name: v})
  return out


def smooth(points: list, window: int) -> list[tuple[int, float]]:
  """Logged mini-batch losses averaged over ``(step - window, step]``, from step ``window``."""
  return [(s, statistics.fmean(v for t, v in points if s - window < t <= s))
          for s, _ in points if s >= window]


def lr_check(spec: Experiment, out: Path, data_dir: str | None) -> dict[str, Any]:
  """The official preset's runs of seed 0 (AdamW-2T aside) at peak lr :data:`LR_CHECK`."""
  task = spec.tasks[0]
  opt = {**task.overrides["optimizer"], "lr": LR_CHECK}
  check = dataclasses.replace(
      spec, name=spec.name + "_lr", seeds=(0,), tasks=(dataclasses.replace(
          task, overrides={**task.overrides, "optimizer": opt}),),
      arms=tuple(a for a in spec.arms if a.label != "adamw-2T"))
  runs = runner.run_all(check, out=out, data_dir=data_dir)
  return {"lr": LR_CHECK, "runs": runs[task.key]["0"]}


def run(spec: Experiment, args: argparse.Namespace) -> None:
  """Trains (or reads) every run of ``spec`` (or of ``--preset``'s); writes its results."""
  if args.preset != "default":
    spec = PRESETS[args.preset]
    spec = smoke(spec) if args.smoke else spec  # type: ignore[assignment]
  out, t0 = Path(args.out or schema.RESULTS), time.perf_counter()
  official = spec.name == OFFICIAL.name
  window = max(1, round(spec.steps / 30)) if "train_loss" in spec.metrics else 0
  runs = runner.run_all(spec, out=out, data_dir=args.data_dir)
  check = lr_check(spec, out, args.data_dir) if official else {}
  for rec in [r for t in runs.values() for s in t.values() for r in s.values()] + [
      *check.get("runs", {}).values()]:
    if window:
      rec["train_curve"] = smooth(rec["loss_curve"], window)
  first = runner.configure(spec, spec.tasks[0], spec.arm(spec.baseline), spec.seeds[0])
  res: dict[str, Any] = {
      "stem": spec.name, "official": official, "complete": True, "machine": timing.machine(),
      "date": runner.now(), "command": runner.command("pretraining"),
      # timed_apart: IRE settings whose runs were timed in another process than AdamW's
      # (their time/step ratio compares machine loads, so no cost row); none in one run.
      "config": {**leaves(first), "seeds": list(spec.seeds), "train_window": window or None,
                 "timed_apart": [],
                 "ire_settings": {variant(a.label): {k: a.optimizer[f"ire_{k}"] for k in IRE_KEYS}
                                  | {"source": a.note} for a in spec.arms if a.optimizer}},
      "datasets": {t.key: dict(DATASETS[t.data], params=runs[t.key][str(spec.seeds[0])][
          spec.baseline]["params"]) for t in spec.tasks},
      "results": {t: {s: {"runs": r} for s, r in per.items()} for t, per in runs.items()},
      "notes": [], "total_wall_s": time.perf_counter() - t0}
  if check:
    res["lr_check"] = check
  meta = {k: res[k] for k in ("date", "machine", "command", "complete")}
  schema.write_results(out / spec.name, benchmark="pretraining", meta=meta,
                       rows=result_rows(res), details=res)


def result_rows(res: dict[str, Any]) -> list[schema.Row]:
  """For the default preset, per data set and IRE setting: IRE's time/step over AdamW's
  (median over seeds; the speed-ups are the report's, from the runs in the details)."""
  c, rows = res["config"], list[schema.Row]()
  if res["official"]:  # the cost table takes the default preset's timings only
    return rows
  for d, per_v in aggregate(res).items():
    ds = res["datasets"][d]
    task = f"Llama {c['size']} ({ds['params']:,} params), {ds['label']}"
    rows += [schema.time_row("AdamW+IRE", "AdamW", task, "train step", statistics.median(
        a["ratio"]), "pretraining", f"median of {len(a['ratio'])} seeds", variant=v,
        interleaved=False, n=len(a["ratio"])) for v, a in per_v.items()
        if a["ratio"] and v not in c["timed_apart"]]
  return rows


def seed_metrics(runs: Mapping[str, Any], v: str) -> dict[str, Any]:
  """One seed's speed-ups of ``ire-{v}-T`` (held-out; training loss where recorded)."""
  a1, a2, r = runs["adamw-T"], runs.get("adamw-2T"), runs[f"ire-{v}-T"]
  sps = [x["s_per_step_median_window"] or x["s_per_step"] for x in (a1, a2) if x]
  mine = r["s_per_step_median_window"] or r["s_per_step"]
  m = {"vs_2T": metrics.speedup(a2["curve"], r["curve"], r["final_eval_loss"]) if a2 else
       dict(metrics.NO_SPEEDUP), "vs_T": metrics.speedup(a1["curve"], r["curve"],
                                                         a1["final_eval_loss"]),
       "ratio": mine / min(sps) if mine and all(sps) else None}
  if "train_curve" in r:
    t, t1 = r["train_curve"], a1["train_curve"]
    m.update(train_vs_T=metrics.speedup_at_end(t1, t),
             train_vs_T_first=metrics.speedup(t1, t, t1[-1][1]),
             train_vs_2T=metrics.speedup(a2["train_curve"], t, t[-1][1]) if a2 else
             dict(metrics.NO_SPEEDUP))
  return m


def final(r: Mapping[str, Any], train: bool = False) -> float:
  return r["train_curve"][-1][1] if train else r["final_eval_loss"]


def aggregate(res: Mapping[str, Any]) -> dict[str, dict[str, dict[str, list]]]:
  """Per data set and IRE setting: each per-seed metric and final loss, listed over seeds."""
  agg: dict[str, dict[str, dict[str, list]]] = {}
  for d, per_seed in res["results"].items():
    for v in res["config"]["ire_settings"]:
      a = agg.setdefault(d, {}).setdefault(v, {})
      for sr in per_seed.values():
        runs = sr["runs"]
        for k, x in seed_metrics(runs, v).items():
          a.setdefault(k, []).append(x)
        for k, run_kind in (("ire", f"ire-{v}-T"), ("a1", "adamw-T"), ("a2", "adamw-2T")):
          a.setdefault(k, []).append(final(runs[run_kind]))
          if "train_curve" in runs[run_kind]:
            a.setdefault("train_" + k, []).append(final(runs[run_kind], train=True))
      a["ratio"] = [x for x in a["ratio"] if x]
  return agg


def losses(a: Mapping[str, list], prefix: str = "") -> str:
  return " / ".join(pm(*metrics.mean_std(a[prefix + k]), ".3f") for k in ("ire", "a1", "a2"))


def spread(values: list[float]) -> str:
  return (f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"
          if values else "n/a")


def summary_table(res: Mapping[str, Any], short: bool = False) -> str:
  """One row per data set and IRE setting; ``short``: the claims' columns only."""
  agg, text = aggregate(res), metrics.speedups_text
  train = res["official"]
  cols = [  # (header, shown, cell of the setting's aggregate)
      ("training loss: speed-up vs AdamW-T (claim 5.4x)", train,
       lambda a: text(a["train_vs_T"])),
      ("training loss: speed-up vs AdamW-2T", train and not short,
       lambda a: text(a["train_vs_2T"])),
      ("held-out: speed-up vs AdamW-2T (claim 2x)", True, lambda a: text(a["vs_2T"])),
      ("held-out: speed-up vs AdamW-T", not short, lambda a: text(a["vs_T"])),
      ("final train loss IRE-T / AdamW-T / AdamW-2T", train and not short,
       lambda a: losses(a, "train_")),
      ("final held-out loss IRE-T / AdamW-T / AdamW-2T", True, losses),
      ("time/step IRE/AdamW, median [min, max]", not short, lambda a: spread(a["ratio"]))]
  shown = [(head, cell) for head, on, cell in cols if on]
  return table(["data", "IRE setting", *(head for head, _ in shown)],
               [[res["datasets"][d]["label"], f"`{v}`", *(cell(a) for _, cell in shown)]
                for d, per_v in agg.items() for v, a in per_v.items()])


def runs_table(res: Mapping[str, Any]) -> str:
  """Every run; an IRE run also with its seed's speed-ups."""
  speedups = {"held-out: speed-up vs 2T": "vs_2T", "held-out: speed-up vs T": "vs_T"}
  if res["official"]:
    speedups |= {"train: speed-up vs T (T / IRE-T's step at it)": "train_vs_T",
                 "train: stricter (AdamW-T's own first step at it)": "train_vs_T_first",
                 "train: speed-up vs 2T": "train_vs_2T"}
  head = ["data", "seed", "run", "steps", "final held-out loss", "final train loss", "s/step",
          "first step s (compile)", "wall s", "IRE flat fraction at end", *speedups]
  num = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
  rows = []
  for d, per_seed in res["results"].items():
    for s, sr in per_seed.items():
      for k, r in sr["runs"].items():
        m = seed_metrics(sr["runs"], v) if (v := variant(k)) else {}
        rows.append([
            res["datasets"][d]["label"], s, k, r["steps"], f"{final(r):.4f}",
            f"{final(r, True) if 'train_curve' in r else r['final_train_loss']:.4f}",
            num(r["s_per_step"], ".3f"), num(r["first_step_s"], ".1f"), f"{r['wall_s']:.0f}",
            num(r["ire_flat_fraction_end"], ".3f"),
            *(metrics.speedup_text(m[key]) if m else "-" for key in speedups.values())])
  return table(head, rows)


def verdicts(res: Mapping[str, Any]) -> list[str]:
  out = []
  for d, per_v in aggregate(res).items():
    label = res["datasets"][d]["label"]
    for v, a in per_v.items():
      if "train_vs_T" in a:
        out.append(f"- {label}, `{v}`, training loss vs AdamW-T (the 5.4x claim): "
                   f"{metrics.speedup_verdict(a['train_vs_T'], 5.4)}.")
      out.append(f"- {label}, `{v}`, held-out loss vs AdamW-2T (the 2x claim): "
                 f"{metrics.speedup_verdict(a['vs_2T'], 2.0)}.")
    gap = statistics.fmean(a["a2"]) - statistics.fmean(a["a1"])
    out.append(f"- {label}: AdamW-2T ends {gap:+.3f} nats/char (held-out) from AdamW-T "
               f"({'still learning at T' if gap < -0.01 else 'nearly converged at T'}).")
  return out


def lr_verdict(res: Mapping[str, Any]) -> str:
  """The learning-rate check's verdict: is AdamW-T better at the larger lr (seed 0)?"""
  c, main = res["config"], next(iter(res["results"].values()))["0"]["runs"]
  groups = {c["lr"]: main, res["lr_check"]["lr"]: res["lr_check"]["runs"]}
  best = min(groups, key=lambda lr: final(groups[lr]["adamw-T"], True))
  if best == c["lr"]:
    return f"- Learning-rate check (seed 0): the authors' {c['lr']:g} is the best lr checked " \
           "for AdamW-T."
  ires = {k: r for k, r in main.items() if variant(k)}
  below = [final(r, True) < final(groups[best]["adamw-T"], True) for r in ires.values()]
  both = lambda r: f"{final(r, True):.3f} / {final(r):.3f}"  # noqa: E731
  return fill("pretraining_lr_check.md", {
      "best": best, "lr": c["lr"], "best_adamw": both(groups[best]["adamw-T"]),
      "adamw": both(main["adamw-T"]), "below": "all" if all(below) else "some" if any(below)
      else "none", "ires": ", ".join(f"{both(r)} ({variant(k)})" for k, r in ires.items())
  }).rstrip("\n")


def context(res: Mapping[str, Any]) -> dict[str, Any]:
  c, datasets = res["config"], list(res["datasets"].values())
  check = res.get("lr_check")  # the official preset's
  lr_runs = {next(iter(res["results"])): {"0": check}}
  return {
      "res": res, "c": c, "stem": res["stem"], "summary": summary_table(res),
      "short": summary_table(res, short=True), "runs": runs_table(res),
      "verdicts": "\n".join(verdicts(res) + ([lr_verdict(res)] if check else [])),
      "lr_table": runs_table({**res, "results": lr_runs}) if check else "",
      "n_seeds": len(c["seeds"]), "t2": 2 * c["steps"],
      "wall_min": res["total_wall_s"] / 60,
      "params": ", ".join(f"{d['label']}: {d['params']:,}" for d in datasets),
      "data_notes": "; ".join(d["note"] for d in datasets),
      "ire": "\n".join(
          f"- IRE `{v}`: {s['curvature']} estimator, gamma {s['gamma']:g}, kappa "
          f"{s['kappa']:g}{' x lr_t / lr_peak' if s['kappa_schedule'] == 'lr' else ''}, "
          f"refreshed every {s['refresh_every']} steps, on from step {c['warmup_steps']} "
          f"(right after the warm-up)." + (f" Source: {s['source']}." if s["source"] else "")
          for v, s in c["ire_settings"].items()),
      "decay": "every parameter" if c["decay_mask"] == "all" else "weight matrices only",
      "clip": f"clip {c['clip_norm']:g}" if c["clip_norm"] else "no gradient clipping",
      "notes": "".join(f"\n- Note: {n}" for n in res["notes"])
      + (f"\n- Learning rate: {c['lr_note']}" if c.get("lr_note") else "")}


def render(results: Mapping[str, Any]) -> dict[str, str]:
  out = {}
  for name in (SPEC.name, OFFICIAL.name):
    if results[name] is not None:
      ctx = context(results[name]["details"])
      out[f"benchmarks/results/{name}.md"] = fill(f"{name}.md", ctx)
      out[f"benchmarks/results/{name}_summary.md"] = fill(f"{name}_summary.md", ctx)
  return out
