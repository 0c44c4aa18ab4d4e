"""Summary: every optimizer's per-step cost over its base, the README and choosing.md digests."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from benchmarks import experiments, metrics
from benchmarks.render import ROOT, fill, table
from benchmarks.schema import SCHEMA, Row

# Optimizers in the order the cost table lists them, and the benchmarks within each.
ORDER = ("AdamW+IRE", "SGD+IRE", "SAM", "SAM+IRE", "ASAM", "GSAM", "mSAM", "SALA", "Lookahead")
SOURCES = ("selection", "sam", "sala", "multidevice", "train_step", "generalization",
           "label_noise", "pretraining")
SUMMARIES = ("pretraining", "pretraining_official", "generalization", "label_noise")
MODEL = {"resnet": "ResNet-8", "vit": "ViT"}


def cost_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Every optimizer's time ratio in ``results`` (rows with ``metric == "time_ratio"`` of an
  optimizer in :data:`ORDER`; internal pieces stay in their own tables), in table order."""
  rows = []
  for name in results:
    doc = results[name]
    if not (isinstance(doc, dict) and doc.get("schema") == SCHEMA):
      continue
    for r in (Row(**x) for x in doc["rows"]):
      if r.metric != "time_ratio" or r.optimizer.split(" ")[0] not in ORDER:
        continue
      if not (math.isfinite(r.value) and r.value > 0):
        raise ValueError(f"bad cost ratio in {name}.json: {r}")
      rows.append(dict(optimizer=r.optimizer, variant=r.variant, base=r.base, task=r.task,
                       what=r.what, ratio=r.value, source=r.source,
                       note=r.note, interleaved=r.interleaved))
  rank = lambda x, order: order.index(x) if x in order else len(order)
  return sorted(rows, key=lambda r: (rank(r["optimizer"].split(" ")[0], ORDER),
                                     rank(r["source"], SOURCES)))


def cost_table(rows: list[dict[str, Any]]) -> str:
  return table(["optimizer", "variant", "base", "model / task", "measured", "time / base",
                "note", "source"],
               [[r["optimizer"], r["variant"], r["base"], r["task"], r["what"],
                 f"{r['ratio']:.2f}", r["note"], f"`{r['source']}`"] for r in rows], "llllrrll")


def cost_digest(rows: list[dict[str, Any]]) -> str:
  """Median and range of each optimizer's interleaved train-step ratios over all models."""
  by: dict[str, list[float]] = {}
  for r in rows:
    if r["what"] == "train step" and r["interleaved"]:
      name = f"{r['optimizer']} ({r['variant']})" if r["variant"] else r["optimizer"]
      by.setdefault(name, []).append(r["ratio"])
  return table(["optimizer", "models measured", "median time / base", "range"],
               [[k, len(v), f"{metrics.median(v):.2f}", f"{min(v):.2f}–{max(v):.2f}"]
                for k, v in by.items()], "lrrr")


def claim_rows(results: Mapping[str, Any]) -> list[list[str]]:
  """The papers' accuracy claims, paired by seed, of the generalization and label-noise runs."""
  out = []
  gen, noise = results.get("generalization"), results.get("label_noise")
  for c in (gen["details"].get("orderings", []) if gen else []):
    setting = f"{MODEL.get(c['model'], c['model'])}, {c['dataset']}, clean labels"
    out.append([c, setting, "generalization.md"])
  for c in (noise["details"].get("claims", []) if noise else []):
    when = "final" if c["metric"] == "eval_acc_final" else "best epoch"
    out.append([c, f"small CNN, MNIST, {round(100 * c['noise'])}% label noise, {when}",
                "label_noise.md"])
  return [[f"{c['better']} > {c['worse']}", s, f"{100 * c['mean']:+.2f} ± {100 * c['std']:.2f}",
           c["verdict"], f"`{src}`"] for c, s, src in out]


def summary_text(name: str, results: Mapping[str, Any]) -> str | None:
  """``results/{name}_summary.md`` as its benchmark renders it now (else as committed)."""
  target = f"benchmarks/results/{name}_summary.md"
  for other in experiments.NAMES:
    module = experiments.load(other)
    if other != "summary" and hasattr(module, "render"):
      text = module.render(results).get(target)
      if text is not None:
        return text.strip()
  path = ROOT / target
  return path.read_text().strip() if path.exists() else None


def render(results: Mapping[str, Any]) -> dict[str, str]:
  rows = cost_rows(results)
  digest = cost_digest(rows)
  sources = ", ".join(f"`{s}`" for s in SOURCES if any(r["source"] == s for r in rows))
  claims = table(["claim (better than worse)", "setting",
                  "Δ test accuracy (pp), mean ± std over seeds", "verdict", "source"],
                 claim_rows(results), "llrll")
  readme = {n: summary_text(n, results) or "(not run yet)" for n in SUMMARIES}
  return {
      "benchmarks/results/cost.md": fill("summary_cost.md", {
          "interleaved": cost_table([r for r in rows if r["interleaved"]]),
          "whole_runs": cost_table([r for r in rows if not r["interleaved"]])}),
      "benchmarks/results/cost.json": json.dumps(rows, indent=1) + "\n",
      "README.md#results": fill("summary_readme.md", {**readme, "digest": digest}),
      "docs/choosing.md#costs": fill("summary_costs.md", {"digest": digest, "sources": sources}),
      "docs/choosing.md#claims": claims,
  }
