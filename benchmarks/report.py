"""Gathers the committed benchmark results into one cost table and the README's results section.

Every number here is read from the machine-readable results that the benchmark
scripts write under ``benchmarks/results/`` (nothing is measured or typed in
by hand):

* ``cost.md`` / ``cost.json``: the per-step cost of every optimizer relative
  to its base optimizer, gathered from ``bench_ire``, ``bench_sam``,
  ``bench_sala``, ``bench_multidevice``, ``bench_generalization`` and
  ``bench_pretraining``, one row per (optimizer, model, source).
* the block of ``README.md`` between ``<!-- results:begin -->`` and
  ``<!-- results:end -->``: the summary tables of the two paper-claim
  benchmarks and a digest of the cost table.

Usage::

  python benchmarks/report.py           # rewrite cost.md, cost.json and the README block
  python benchmarks/report.py --check   # exit 1 if any of them is stale (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# Optimizers in the order the cost table lists them.
ORDER = ("AdamW+IRE", "SGD+IRE", "SAM", "SAM+IRE", "ASAM", "mSAM", "SALA", "Lookahead")


def _load(results: Path, name: str) -> Any:
  path = results / name
  return json.loads(path.read_text()) if path.exists() else None


def _row(optimizer: str, base: str, task: str, what: str, ratio: float, source: str,
         note: str = "", variant: str = "", *, interleaved: bool = True) -> dict:
  """One cost measurement. ``interleaved``: optimizer and base timed in alternation."""
  return dict(optimizer=optimizer, variant=variant, base=base, task=task, what=what,
              ratio=float(ratio), source=source, note=note, interleaved=interleaved)


def _ire_rows(d: Any) -> Iterable[dict]:
  if not d:
    return
  for r in d["rows"]:
    c = r["cpu"]
    yield _row("AdamW+IRE", "AdamW", f"synthetic tree, {r['n']:,} params", "update (K=10)",
               c["amortized_ratio_K10"], "bench_ire",
               f"refresh = {c['refresh_cost_adamw_updates']:.1f} AdamW updates (CPU time)",
               variant="grad_sq")


def _sam_rows(d: Any) -> Iterable[dict]:
  if not d:
    return
  for r in d["results"]:
    t, s, p = r["task"], r["median_step_s"], r["median_paired_ratio"]
    yield _row("SAM", "SGD", t, "train step", p["sam/base"], "bench_sam")
    yield _row("ASAM", "SGD", t, "train step", p["asam/base"], "bench_sam")
    for mode in ("vmap", "scan", "unroll"):
      key = f"msam8_{mode}"
      if key in s:
        yield _row("mSAM", "SGD", t, "train step", s[key] / s["base"], "bench_sam",
                   "ratio of median step times", variant=f"m=8, {mode}")


def _sala_rows(d: Any) -> Iterable[dict]:
  if not d:
    return
  names = {"lookahead": "Lookahead", "sam": "SAM", "sala": "SALA"}
  for key, name in names.items():
    s = d["summary"].get(key)
    if s:
      note = (f"stage-2 fraction {d['stage2_fraction']:.2f}"
              if key == "sala" and "stage2_fraction" in d else "")
      k = d["config"].get(key, {}).get("k")
      yield _row(name, "SGD", "MLP 784-512-256-10, MNIST training run", "train step",
                 s["time_ratio_median"], "bench_sala", note, variant=f"k={k}" if k else "")
  for task, r in d["step_costs"].items():
    for label, ratio in r["ratios"].items():
      if label == "base":
        continue
      name = label.split()[0]
      name = names.get(name, name)
      variant = label[len(label.split()[0]):].strip(" ()").replace(" (", ", ")
      yield _row(name, "SGD", f"MLP {task}, fixed batch", "train step", ratio, "bench_sala",
                 variant=variant)


def _multidevice_rows(d: Any) -> Iterable[dict]:
  if not d:
    return
  names = {"adamw+ire": "AdamW+IRE", "sam": "SAM", "msam": "mSAM"}
  for r in d["results"]:
    if r["devices"] != 1:
      continue
    for placement, opts in r["placements"].items():
      for key, name in names.items():
        if key in opts:
          yield _row(name, "AdamW", f"MLP {r['params']:,} params, digits, 1 device",
                     "train step", opts[key]["time_ratio_to_adamw"], "bench_multidevice",
                     f"jit over {placement}",
                     variant={"msam": "m=8, vmap", "adamw+ire": "grad_sq"}.get(key, ""))


def _generalization_rows(d: Any) -> Iterable[dict]:
  if not d:
    return
  bases = {"resnet": "SGD", "vit": "AdamW"}
  models = {"resnet": "ResNet-8", "vit": "ViT"}
  for a in d["aggregates"]:
    name, base = a["optimizer"], bases.get(a["model"], "")
    if name == base or a.get("time_ratio") is None:
      continue
    variant = ""
    if name.startswith("mSAM-"):
      name, variant = "mSAM", f"m={name.split('-')[1]}"
    elif name.endswith("+IRE") and name != "SAM+IRE":
      name, variant = f"{base}+IRE", "fisher"
    yield _row(name, base, f"{models.get(a['model'], a['model'])}, {a['dataset']}",
               "train step", a["time_ratio"], "bench_generalization",
               f"median of {a['n']} seeds", variant, interleaved=False)


def _pretraining_rows(d: Any) -> Iterable[dict]:
  if not d:
    return
  for key, seeds in d["results"].items():
    ds = d["datasets"][key]
    for est in d["config"]["estimators"]:
      ratios = sorted(s["metrics"][est]["time_per_step_ratio"] for s in seeds.values()
                      if est in s.get("metrics", {}))
      if ratios:
        yield _row("AdamW+IRE", "AdamW", f"Llama mini ({ds['params']:,} params), {ds['label']}",
                   "train step", _median(ratios), "bench_pretraining",
                   f"median of {len(ratios)} seeds", variant=est, interleaved=False)


def _median(values: list[float]) -> float:
  v = sorted(values)
  return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def cost_rows(results: Path = RESULTS) -> list[dict]:
  """Every per-step cost ratio found in the committed results, in table order."""
  rows = [
      *_ire_rows(_load(results, "ire.json")),
      *_sam_rows(_load(results, "sam.json")),
      *_sala_rows(_load(results, "sala.json")),
      *_multidevice_rows(_load(results, "multidevice.json")),
      *_generalization_rows(_load(results, "generalization.json")),
      *_pretraining_rows(_load(results, "pretraining.json")),
  ]
  for r in rows:
    if not (math.isfinite(r["ratio"]) and r["ratio"] > 0):
      raise ValueError(f"bad cost ratio in {r}")
  rank = {name: i for i, name in enumerate(ORDER)}
  return sorted(rows, key=lambda r: rank.get(r["optimizer"].split(" ")[0], len(ORDER)))


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
    body.append([name, str(len(vals)), f"{_median(vals):.2f}", f"{vals[0]:.2f}–{vals[-1]:.2f}"])
  return _table(["optimizer", "models measured", "median time / base", "range"], body, "lrrr")


def readme_block(results: Path = RESULTS) -> str:
  """The README's results section (between the markers), from the committed files."""
  parts = [BEGIN, "<!-- generated by `python benchmarks/report.py`; edit that script, not this "
           "block -->", ""]
  for name, title in (("pretraining_summary.md", "IRE and AdamW pre-training"),
                      ("generalization_summary.md", "Generalization (ResNet, ViT)")):
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


def replace_block(text: str, block: str) -> str:
  """``text`` with the part between the markers (inclusive) replaced by ``block``."""
  i, j = text.find(BEGIN), text.find(END)
  if i < 0 or j < i:
    raise ValueError(f"README.md has no {BEGIN} ... {END} block")
  return text[:i] + block + text[j + len(END):]


def outputs(results: Path = RESULTS, readme: Path = README) -> dict[Path, str]:
  """What the report writes: ``{path: content}``."""
  rows = cost_rows(results)
  return {
      results / "cost.md": cost_markdown(rows),
      results / "cost.json": json.dumps(rows, indent=1) + "\n",
      readme: replace_block(readme.read_text(), readme_block(results)),
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
