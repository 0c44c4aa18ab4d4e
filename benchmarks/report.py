"""Gathers the committed benchmark results into one cost table and the README's results section.

Every number here is read from the machine-readable results that the benchmark
scripts write under ``benchmarks/results/`` (nothing is measured or typed in
by hand). Every script writes its results in one schema
(``_common.write_results``: a list of ``Row`` records plus the script's own
details); this script reads the rows, and a few scripts' details for their
own blocks:

* ``cost.md`` / ``cost.json``: the per-step cost of every optimizer relative
  to its base optimizer (every row with ``metric == "time_ratio"``), one row
  per (optimizer, model, source).
* the block of ``README.md`` between ``<!-- results:begin -->`` and
  ``<!-- results:end -->``: the summary tables of the paper-claim
  benchmarks and a digest of the cost table;
* the blocks of ``docs/choosing.md`` between ``<!-- claims:begin -->`` and
  ``<!-- claims:end -->`` (every accuracy claim tested, paired by seed) and
  between ``<!-- costs:begin -->`` and ``<!-- costs:end -->`` (the cost digest);
* the block of ``docs/performance.md`` between ``<!-- branch-hints:begin -->``
  and ``<!-- branch-hints:end -->``: the ResNet train step with and without
  the branch hints (``train_step.json``);
* the block of ``docs/selection.md`` between ``<!-- selection-cost:begin -->``
  and ``<!-- selection-cost:end -->``: the exact selection's cost per counting
  method (``selection.json``), and the block between
  ``<!-- selection-train-step:begin -->`` and ``<!-- selection-train-step:end -->``:
  the examples' IRE train step with each counting method
  (``train_step_selection.json``);

Usage::

  python benchmarks/report.py           # rewrite cost.md, cost.json and the blocks
  python benchmarks/report.py --check   # exit 1 if any of them is stale (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT, RESULTS = C.ROOT, C.RESULTS
README = ROOT / "README.md"
CHOOSING = ROOT / "docs" / "choosing.md"
PERFORMANCE = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CLAIMS_BEGIN, CLAIMS_END = "<!-- claims:begin -->", "<!-- claims:end -->"
HINTS_BEGIN, HINTS_END = "<!-- branch-hints:begin -->", "<!-- branch-hints:end -->"
COSTS_BEGIN, COSTS_END = "<!-- costs:begin -->", "<!-- costs:end -->"
SELECTION = ROOT / "docs" / "selection.md"
SEL_BEGIN, SEL_END = "<!-- selection-cost:begin -->", "<!-- selection-cost:end -->"
SEL_STEP_BEGIN = "<!-- selection-train-step:begin -->"
SEL_STEP_END = "<!-- selection-train-step:end -->"

# Optimizers in the order the cost table lists them, and the benchmarks within each.
ORDER = ("AdamW+IRE", "SGD+IRE", "SAM", "SAM+IRE", "ASAM", "GSAM", "mSAM", "SALA", "Lookahead")
SOURCES = ("bench_ire", "bench_selection", "bench_sam", "bench_sala", "bench_multidevice",
           "bench_train_step", "bench_generalization", "bench_label_noise", "bench_pretraining")


def _row(optimizer: str, base: str, task: str, what: str, ratio: float, source: str,
         note: str = "", variant: str = "", *, interleaved: bool = True) -> dict:
  """One cost-table entry. ``interleaved``: optimizer and base timed in alternation."""
  return dict(optimizer=optimizer, variant=variant, base=base, task=task, what=what,
              ratio=float(ratio), source=source, note=note, interleaved=interleaved)


def cost_rows(results: Path = RESULTS) -> list[dict]:
  """Every optimizer's per-step time ratio in the results (rows with ``metric ==
  "time_ratio"`` whose optimizer is one of ``ORDER``: micro-benchmarks of internal pieces
  stay in their own tables), in table order."""
  rows = [_row(r.optimizer, r.base, r.task, r.what, r.value, r.source, r.note, r.variant,
               interleaved=r.interleaved)
          for r in C.read_rows(results)
          if r.metric == "time_ratio" and r.optimizer.split(" ")[0] in ORDER]
  for r in rows:
    if not (math.isfinite(r["ratio"]) and r["ratio"] > 0):
      raise ValueError(f"bad cost ratio in {r}")
  rank = {name: i for i, name in enumerate(ORDER)}
  src = {name: i for i, name in enumerate(SOURCES)}
  return sorted(rows, key=lambda r: (rank.get(r["optimizer"].split(" ")[0], len(ORDER)),
                                     src.get(r["source"], len(SOURCES))))


def _table(head: list[str], rows: list[list[str]], align: str) -> str:
  sep = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
  return "\n".join(["| " + " | ".join(head) + " |", sep]
                   + ["| " + " | ".join(r) + " |" for r in rows])


def cost_markdown(rows: list[dict]) -> str:
  """``cost.md``: one table of every optimizer's per-step cost against its base."""
  def table(rows):
    body = [[r["optimizer"], r["variant"], r["base"], r["task"], r["what"],
             f"{r['ratio']:.2f}", r["note"], f"`{r['source']}`"] for r in rows]
    return _table(["optimizer", "variant", "base", "model / task", "measured", "time / base",
                   "note", "source"], body, "llllrrll")

  return "\n".join([
      "# Per-step cost of every optimizer against its base",
      "",
      "Generated by `python benchmarks/report.py` from the JSON results of the benchmarks named "
      "in the last column (each measured its ratios in one process, interleaved, on a shared "
      "2-core x86_64 CPU with jax 0.10.2; see each benchmark's own table for repetitions and "
      "spread). `train step` = gradient(s) + update + apply; `update (K=10)` = the optimizer "
      "update alone, amortized over a refresh cycle. Expected from gradient counts: SAM, ASAM "
      "and mSAM 2; SALA 1 + (stage-2 fraction)/k; Lookahead and IRE (grad_sq) 1 plus "
      "bookkeeping; IRE with the fisher or hutchinson estimator adds one gradient or HVP every "
      "K steps.",
      "",
      "## Cost benchmarks (optimizer and base timed in alternation, in one process)",
      "",
      table([r for r in rows if r["interleaved"]]),
      "",
      "## Inside the paper-claim training benchmarks",
      "",
      "Whole training runs timed one after another, while other jobs loaded the shared "
      "machine: the ratio of two runs' steady-state time per step, with a spread of tens of "
      "percent (a ratio below 1 is noise). Left out of the README's digest.",
      "",
      table([r for r in rows if not r["interleaved"]]),
      "",
  ])


def cost_digest(rows: list[dict]) -> str:
  """Median and range of each optimizer's ratios over all models (train steps only)."""
  by: dict[tuple[str, str], list[float]] = {}
  for r in rows:
    if r["what"] == "train step" and r["interleaved"]:
      by.setdefault((r["optimizer"], r["variant"]), []).append(r["ratio"])
  body = []
  for (opt, variant), vals in by.items():
    name = f"{opt} ({variant})" if variant else opt
    vals = sorted(vals)
    body.append([name, str(len(vals)), f"{C.median(vals):.2f}", f"{vals[0]:.2f}–{vals[-1]:.2f}"])
  return _table(["optimizer", "models measured", "median time / base", "range"], body, "lrrr")


def readme_block(results: Path = RESULTS) -> str:
  """The README's results section (between the markers), from the committed files."""
  parts = [BEGIN, "<!-- generated by `python benchmarks/report.py`; edit that script, not this "
           "block -->", ""]
  for name, title in (("pretraining_summary.md", "IRE and AdamW pre-training"),
                      ("pretraining_official_summary.md",
                       "IRE and AdamW pre-training with the authors' settings"),
                      ("generalization_summary.md", "Generalization (ResNet, ViT)"),
                      ("label_noise_summary.md", "Robustness to label noise (MNIST, small CNN)")):
    path = results / name
    if path.exists():
      parts += [f"**{title}** ([full table](benchmarks/results/{name.replace('_summary', '')}))",
                "", path.read_text().strip(), ""]
  rows = cost_rows(results)
  if rows:
    parts += ["**Cost per train step against the base optimizer** (all models and benchmarks: "
              "[benchmarks/results/cost.md](benchmarks/results/cost.md))", "",
              cost_digest(rows), ""]
  parts.append(END)
  return "\n".join(parts)


def replace_block(text: str, block: str, begin: str = BEGIN, end: str = END) -> str:
  """``text`` with the part between the markers (inclusive) replaced by ``block``."""
  i, j = text.find(begin), text.find(end)
  if i < 0 or j < i:
    raise ValueError(f"the file has no {begin} ... {end} block")
  return text[:i] + block + text[j + len(end):]


_MODEL = {"resnet": "ResNet-8", "vit": "ViT"}


def claims_block(results: Path = RESULTS) -> str:
  """``docs/choosing.md``'s table of the papers' accuracy claims, paired by seed, from the
  generalization and label-noise results."""
  lines = [CLAIMS_BEGIN, "<!-- generated by `python benchmarks/report.py` from the results' "
           "JSON; edit that script, not this block -->", "",
           "| claim (better than worse) | setting | Δ test accuracy (pp), mean ± std over seeds "
           "| verdict | source |", "|---|---|---:|---|---|"]
  gen = C.read_results(results / "generalization.json")
  for c in (gen["details"].get("orderings", []) if gen else []):
    lines.append(f"| {c['better']} > {c['worse']} | {_MODEL.get(c['model'], c['model'])}, "
                 f"{c['dataset']}, clean labels | {100 * c['mean']:+.2f} ± {100 * c['std']:.2f} "
                 f"| {c['verdict']} | `generalization.md` |")
  ln = C.read_results(results / "label_noise.json")
  for c in (ln["details"].get("claims", []) if ln else []):
    when = "final" if c["metric"] == "eval_acc_final" else "best epoch"
    lines.append(f"| {c['better']} > {c['worse']} | small CNN, MNIST, "
                 f"{round(100 * c['noise'])}% label noise, {when} | {100 * c['mean']:+.2f} ± "
                 f"{100 * c['std']:.2f} | {c['verdict']} | `label_noise.md` |")
  lines.append(CLAIMS_END)
  return "\n".join(lines)


# docs/performance.md: the ResNet train step with and without the branch hints.
_HINT_ROWS = (
    ("ire_fisher_cond", "SGD+IRE (fisher), refresh inside `lax.cond` (`--branch-hints off`)"),
    ("ire_fisher", "SGD+IRE (fisher), two compiled variants chosen on the host "
                   "(`--branch-hints auto`, the default)"),
    ("sala_cond", "SALA (k=2, every cycle in stage 2), SAM step inside `lax.cond`"),
    ("sala", "SALA (k=2, every cycle in stage 2), hints"),
)


def hints_block(results: Path = RESULTS) -> str:
  """``docs/performance.md``'s table of the ResNet train step with and without branch hints,
  from ``train_step.json``."""
  lines = [HINTS_BEGIN, "<!-- generated by `python benchmarks/report.py` from "
           "benchmarks/results/train_step.json; edit that script, not this block -->", ""]
  doc = C.read_results(results / "train_step.json")
  res = doc["details"].get("resnet") if doc else None
  if res is None:
    lines += ["(not measured yet: `python benchmarks/bench_train_step.py --models resnet`)"]
  else:
    lines += ["| step | time / SGD step |", "|---|---:|", "| SGD | 1.00 |"]
    for key, label in _HINT_ROWS:
      r = res["results"].get(key)
      if r is not None:
        lines.append(f"| {label} | {r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] |")
    load = res["loadavg"]
    lines += ["", f"(median over {doc['meta']['reps']} interleaved repetitions, [min-max] of the "
              f"paired ratios; {doc['meta']['machine']['summary']} when the run started, "
              f"{load[0]:.1f} → {load[1]:.1f} over this model's timing.)"]
  lines.append(HINTS_END)
  return "\n".join(lines)


def costs_block(rows: list[dict]) -> str:
  """``docs/choosing.md``'s digest of the cost table (the README's, with its sources)."""
  sources = sorted({r["source"] for r in rows}, key=lambda x: SOURCES.index(x)
                   if x in SOURCES else len(SOURCES))
  return "\n".join([
      COSTS_BEGIN, "<!-- generated by `python benchmarks/report.py` from the results' JSON; "
      "edit that script, not this block -->", "",
      "Time per step over the base optimizer, over every model and benchmark that measured it "
      "(one row per model and source in `benchmarks/results/cost.md`):", "",
      cost_digest(rows), "",
      "Sources: " + ", ".join(f"`{x}.py`" for x in sources) + ".", COSTS_END])


def selection_block(results: Path = RESULTS) -> str:
  """``docs/selection.md``'s digest of ``selection.json``: per N and counting method, the range
  over the key distributions of the median refresh cost and amortized ratio."""
  lines = [SEL_BEGIN, "<!-- generated by `python benchmarks/report.py` from "
           "benchmarks/results/selection.json; edit that script, not this block -->", ""]
  doc = C.read_results(results / "selection.json")
  if doc is None:
    return "\n".join(lines + ["(not measured yet)", SEL_END])
  meta, res = doc["meta"], doc["details"]
  methods = meta["methods"]

  def span(vals: list[float]) -> str:
    if not vals:
      return "not run"
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}"

  sizes = sorted({r["n"] for r in res})
  lines += [f"Machine: {meta['machine']['summary']} when the run started (each size's load is "
            "in the table). Ranges over the key distributions "
            f"({', '.join(sorted({r['kind'] for r in res}))}) of the median over "
            "repetitions:", "",
            "| N | " + " | ".join(f"refresh, {m} (AdamW updates)" for m in methods)
            + " | " + " | ".join(f"amortized K = {meta['K']}, {m}" for m in methods) + " |",
            "|---:|" + "---:|" * (2 * len(methods))]
  for n in sizes:
    rs = [r for r in res if r["n"] == n]
    cells = [span([r["refresh"][m]["median"] for r in rs if m in r["refresh"]])
             for m in methods]
    cells += [span([r["amortized"][m]["median"] for r in rs if m in r.get("amortized", {})])
              for m in methods]
    lines.append(f"| {n:.0e} | " + " | ".join(cells) + " |")
  lines.append(SEL_END)
  return "\n".join(lines)


def selection_train_step_block(results: Path = RESULTS) -> str:
  """``docs/selection.md``'s table of the examples' IRE (grad_sq) train step over its base,
  per counting method of the refresh, from ``train_step_selection.json``."""
  lines = [SEL_STEP_BEGIN, "<!-- generated by `python benchmarks/report.py` from "
           "benchmarks/results/train_step_selection.json; edit that script, not this block -->",
           ""]
  doc = C.read_results(results / "train_step_selection.json")
  if doc is None:
    return "\n".join(lines + ["(not measured yet)", SEL_STEP_END])
  details = doc["details"]
  names = list(details)
  keys = [k for k in ("ire_grad_sq", "ire_grad_sq_native", "ire_grad_sq_threshold")
          if all(k in details[n]["results"] for n in names)]
  label = {"ire_grad_sq": "default (`auto`: `scatter` on the CPU)",
           "ire_grad_sq_native": "`native` (opt-in)", "ire_grad_sq_threshold": "`threshold`"}

  def cell(r: dict) -> str:
    return f"{r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]"

  lines += ["| IRE (grad_sq, K = 10) counting with | "
            + " | ".join(f"{details[n]['label']}, over "
                         f"{ {'sgd': 'SGD', 'adamw': 'AdamW'}.get(details[n]['base'])}"
                         for n in names)
            + " |", "|---|" + "---:|" * len(names)]
  for k in keys:
    lines.append(f"| {label[k]} | " + " | ".join(cell(details[n]["results"][k]) for n in names)
                 + " |")
  if {"ire_grad_sq", "ire_grad_sq_native"} <= set(keys):
    saved = [(details[n]["results"]["ire_grad_sq"]["ratio"]
              - details[n]["results"]["ire_grad_sq_native"]["ratio"]) for n in names]
    lines.append("| what `native` saves per step, in base steps | "
                 + " | ".join(f"{x:+.2f}" for x in saved) + " |")
  load = ", ".join(f"{n} {details[n]['loadavg'][0]:.1f}/{details[n]['loadavg'][1]:.1f}"
                   for n in names)
  lines += ["", f"(Each cell: the time of {doc['meta']['steps_per_block']} consecutive train "
            f"steps, one refresh among them, over the base optimizer's; median over "
            f"{doc['meta']['reps']} interleaved repetitions in one process, [min-max] of the "
            f"paired ratios. {doc['meta']['machine']['summary']} when the run started; load "
            f"average before/after each model's timing: {load}.)", SEL_STEP_END]
  return "\n".join(lines)


def outputs(results: Path = RESULTS, readme: Path = README,
            choosing: Path = CHOOSING, performance: Path = PERFORMANCE,
            selection: Path = SELECTION) -> dict[Path, str]:
  """What the report writes: ``{path: content}``."""
  rows = cost_rows(results)
  return {
      results / "cost.md": cost_markdown(rows),
      results / "cost.json": json.dumps(rows, indent=1) + "\n",
      readme: replace_block(readme.read_text(), readme_block(results)),
      choosing: replace_block(
          replace_block(choosing.read_text(), claims_block(results), CLAIMS_BEGIN, CLAIMS_END),
          costs_block(rows), COSTS_BEGIN, COSTS_END),
      performance: replace_block(performance.read_text(), hints_block(results), HINTS_BEGIN,
                                 HINTS_END),
      selection: replace_block(
          replace_block(selection.read_text(), selection_block(results), SEL_BEGIN, SEL_END),
          selection_train_step_block(results), SEL_STEP_BEGIN, SEL_STEP_END),
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true",
                      help="only check that the generated files are up to date")
  args = parser.parse_args(argv)
  stale = []
  for path, content in outputs().items():
    current = path.read_text() if path.exists() else None
    if current != content:
      stale.append(path)
      if not args.check:
        path.write_text(content)
  if args.check and stale:
    print("stale (run `python benchmarks/report.py`): "
          + ", ".join(str(p.relative_to(ROOT)) for p in stale), file=sys.stderr)
    return 1
  for p in stale:
    print(f"wrote {p.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
