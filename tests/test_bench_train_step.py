"""benchmarks/bench_train_step.py: a smoke run, the part/merge path, and the committed table."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as C  # noqa: E402
import bench_train_step as B  # noqa: E402


def test_smoke_times_the_examples_step_with_branch_hints(tmp_path, capsys):
  part = tmp_path / "llama.json"
  assert B.main(["--smoke", "--models", "llama", "--only", "ire_fisher", "--part",
                 str(part)]) == 0
  doc = json.loads(part.read_text())
  res = doc["details"]["llama"]["results"]["ire_fisher"]
  assert res["ratio"] > 0 and res["target"] == 1.15
  # Two compiled variants of the IRE step (hinted refresh step, hinted plain step) ran.
  assert set(doc["details"]["llama"]["summary"]["seconds"]) == {"base", "ire_fisher"}
  (row,) = doc["rows"]
  assert row["optimizer"] == "AdamW+IRE" and row["variant"] == "fisher"
  assert row["metric"] == "time_ratio" and row["source"] == "bench_train_step"

  # The HVP/gradient measurement is a part of its own, merged into the model's details.
  hvp = tmp_path / "hvp.json"
  assert B.main(["--smoke", "--models", "llama", "--hvp-only", "--part", str(hvp)]) == 0
  h = json.loads(hvp.read_text())["details"]["llama"]["hvp"]
  assert h["ratio"] > 1 and h["grad_ms"] > 0  # an HVP does a gradient's work and more

  out = tmp_path / "train_step"
  assert B.main(["--merge", str(part), str(hvp), "--out", str(out)]) == 0
  merged = C.read_results(out.with_suffix(".json"))
  assert [r.optimizer for r in merged["rows"]] == ["AdamW+IRE"]
  assert merged["details"]["llama"]["hvp"] == h and "results" in merged["details"]["llama"]
  md = out.with_suffix(".md").read_text()
  assert "| AdamW+IRE | fisher | ≤ 1.15x |" in md
  assert "One Hessian-vector product" in md and f"llama {h['ratio']:.2f}" in md


def test_every_optimizer_of_the_issue_is_measured():
  keys = {o.key for o in B.optimizers(gsam=True)}
  assert {"base", "ire_grad_sq", "ire_fisher", "ire_hutchinson", "sam", "asam", "msam", "sala",
          "lookahead", "gsam", "sam_every_k"} <= keys
  targets = {o.key: (o.target, o.target_over) for o in B.optimizers(gsam=False)}
  assert targets["msam"] == (1.1, "sam") and targets["sala"] == (1.6, "base")
  # --selection-methods: the same IRE step traced with each other counting method.
  methods = {o.key: o.method for o in B.optimizers(gsam=False, selection=True)}
  assert methods["ire_grad_sq"] == "auto"
  assert methods["ire_grad_sq_native"] == "native"
  assert methods["ire_grad_sq_threshold"] == "threshold"
  argv = {o.key: o.argv for o in B.optimizers(gsam=False, selection=True)}
  assert argv["ire_grad_sq_native"] == argv["ire_grad_sq"]


def test_committed_table_has_every_model():
  doc = C.read_results(C.RESULTS / "train_step.json")
  if doc is None:
    pytest.skip("benchmarks/results/train_step.json not written yet")
  assert set(doc["details"]) == {"resnet", "vit", "llama"}
  assert all(r.metric == "time_ratio" and r.value > 0 for r in doc["rows"])
