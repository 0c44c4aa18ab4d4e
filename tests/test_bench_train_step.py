"""benchmarks.experiments.train_step: a smoke run on the examples' step, the arms, the tables."""

import argparse

from benchmarks import render
from benchmarks.experiments import train_step as B
from benchmarks.spec import smoke


def test_smoke_times_the_examples_step(tmp_path):
  B.run(smoke(B.SPEC), argparse.Namespace(out=str(tmp_path), selection=False, smoke=True))
  doc = render.Results(tmp_path)["train_step"]
  assert set(doc["details"]) == {"llama"}
  res = doc["details"]["llama"]
  assert res["label"].startswith("Llama toy") and set(res["results"]) == {"ire_fisher"}
  r = res["results"]["ire_fisher"]
  assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and r["target"] == 1.15
  assert res["hvp"]["ratio"] > 1 and res["hvp"]["grad_ms"] > 0  # a gradient's work and more
  llama = [r for r in doc["rows"] if r["task"] == res["label"]]
  assert [(r["optimizer"], r["variant"], r["source"]) for r in llama] == [
      ("AdamW+IRE", "fisher", "train_step")]
  md = B.report(doc)
  assert "| AdamW+IRE | fisher | ≤ 1.15x |" in md and "llama " in md
  # Without the ResNet (whose steps the docs' branch-hints block reads): the report alone.
  assert set(B.render(render.Results(tmp_path))) == {"benchmarks/results/train_step.md"}


def test_selection_run_writes_its_own_file_without_cost_rows(tmp_path, monkeypatch):
  seen = {}

  def fake(model, opts, reps, smoke):
    seen[model] = list(opts)
    r = {"ratio": 1.0, "vs": "base"}
    return {"label": model, "base": "adamw", "results": {k: r for k in opts if k != "base"}}

  monkeypatch.setattr(B, "measure", fake)
  B.run(smoke(B.SPEC), argparse.Namespace(out=str(tmp_path), selection=True, smoke=True))
  doc = render.Results(tmp_path)["train_step_selection"]
  assert seen == {"llama": ["base", *B.SELECTION]} and doc["rows"] == []
  assert set(doc["details"]["llama"]["results"]) == set(B.SELECTION)


def test_every_optimizer_of_the_issue_is_measured_with_its_target():
  assert {"base", "ire_grad_sq", "ire_fisher", "ire_hutchinson", "sam", "asam", "msam", "sala",
          "lookahead", "gsam", "sam_every_k"} <= set(B.OPTS)
  assert (B.OPTS["msam"].target, B.OPTS["msam"].over) == (1.1, "sam")
  assert (B.OPTS["sala"].target, B.OPTS["sala"].over) == (1.6, "base")
  assert B.OPTS["ire_fisher_cond"].train == {"branch_hints": "off"}
  # --selection: the same IRE step traced with each counting method.
  assert {k: o.method for k, o in B.SELECTION.items()} == {
      "ire_grad_sq": "auto", "ire_grad_sq_native": "native", "ire_grad_sq_threshold": "threshold"}
  assert len({repr(o.optimizer) for o in B.SELECTION.values()}) == 1


def test_note_names_the_stage2_fraction_and_other_references():
  assert B.note({"vs": "base", "stage2_fraction": 1.0}) == "stage-2 fraction 1.00"
  assert B.note({"vs": "sam", "ratio_vs": 0.614}) == "0.61x SAM"
