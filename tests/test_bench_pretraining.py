"""Tests of benchmarks/bench_pretraining.py: the speed-up metric and a smoke run."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("flax")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _load():
  spec = importlib.util.spec_from_file_location(
      "bench_pretraining", ROOT / "benchmarks" / "bench_pretraining.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["bench_pretraining"] = module
  spec.loader.exec_module(module)
  return module


bench = _load()

# Hand-made held-out curves, evaluated every 10 steps.
BASE_2T = [(10, 3.0), (20, 2.5), (30, 2.2), (40, 2.0), (50, 1.9), (60, 1.8)]
IRE_T = [(10, 2.9), (20, 2.3), (30, 1.95)]


def test_steps_to_reach():
  assert bench.steps_to_reach(BASE_2T, 2.2) == 30  # equality counts as reached
  assert bench.steps_to_reach(BASE_2T, 2.21) == 30
  assert bench.steps_to_reach(BASE_2T, 2.19) == 40
  assert bench.steps_to_reach(BASE_2T, 3.5) == 10
  assert bench.steps_to_reach(BASE_2T, 1.0) is None
  assert bench.steps_to_reach([], 1.0) is None


def test_speedup_exact():
  # L* = IRE's final loss 1.95: AdamW-2T first gets <= 1.95 at step 50, IRE at 30.
  s = bench.speedup(BASE_2T, IRE_T, IRE_T[-1][1])
  assert s == {"base_step": 50, "fast_step": 30, "value": pytest.approx(50 / 30),
               "bound": "exact"}
  assert bench.fmt_speedup(s) == "1.67x"
  # A non-monotone curve: the FIRST evaluation below the target counts.
  bumpy = [(10, 3.0), (20, 1.9), (30, 2.4), (40, 1.8)]
  assert bench.speedup(bumpy, IRE_T, 1.95)["base_step"] == 20


def test_speedup_never_reached_is_a_lower_bound():
  s = bench.speedup(BASE_2T, [(10, 2.0), (20, 1.5)], 1.5)
  assert s["base_step"] is None and s["fast_step"] == 20
  assert s["bound"] == "lower" and s["value"] == pytest.approx(60 / 20)
  assert bench.fmt_speedup(s) == "> 3.00x"


def test_speedup_fast_never_reaches_is_an_upper_bound_and_neither_is_none():
  s = bench.speedup(BASE_2T, IRE_T, 1.9)  # IRE never gets to 1.9; AdamW-2T at 50
  assert s["bound"] == "upper" and s["fast_step"] is None
  assert s["value"] == pytest.approx(50 / 30)
  assert bench.fmt_speedup(s) == "< 1.67x"
  s = bench.speedup(BASE_2T, IRE_T, 0.5)
  assert s == {"base_step": None, "fast_step": None, "value": None, "bound": None}
  assert bench.fmt_speedup(s) == "n/a"


def test_aggregate_formatting_flags_bounds():
  exact = {"value": 2.0, "bound": "exact"}
  lower = {"value": 4.0, "bound": "lower"}
  assert bench.fmt_agg([exact, exact]) == "2.00 ± 0.00x"
  text = bench.fmt_agg([exact, lower])
  assert text.startswith(">= 3.00") and "1/2 bounds" in text
  assert bench.fmt_agg([{"value": None, "bound": None}]) == "n/a"


def test_smoke_run_writes_every_output(tmp_path):
  res = bench.main(["--smoke", "--out", str(tmp_path)])
  for name in ("pretraining.json", "pretraining.csv", "pretraining.md", "pretraining.png",
               "pretraining_summary.md"):
    assert (tmp_path / name).stat().st_size > 0, name
  doc = json.loads((tmp_path / "pretraining.json").read_text())
  assert doc["schema"] == "ire_optax-benchmark/1" and doc["benchmark"] == "bench_pretraining"
  data = doc["details"]
  # One time row per (data set, estimator), as the cost table reads them.
  times = [r for r in doc["rows"] if r["metric"] == "time_ratio"]
  assert sorted(r["variant"] for r in times) == ["fisher", "grad_sq", "hutchinson"]
  assert all(r["base"] == "AdamW" and not r["interleaved"] for r in times)
  assert data["config"]["smoke"] is True
  expected = {"adamw-T", "adamw-2T", "ire-fisher-T", "ire-grad_sq-T", "ire-hutchinson-T"}
  T = data["config"]["steps"]
  assert data["results"]
  for per_seed in data["results"].values():
    for seed_res in per_seed.values():
      runs = seed_res["runs"]
      assert set(runs) == expected
      for kind, r in runs.items():
        assert math.isfinite(r["final_eval_loss"]), kind
        assert all(math.isfinite(v) for _, v in r["curve"]), kind
        assert r["curve"][-1][0] == (2 * T if kind == "adamw-2T" else T), kind
      for e in ("fisher", "grad_sq", "hutchinson"):
        m = seed_res["metrics"][e]
        # IRE's own final loss is reached by IRE at the latest at its last step.
        assert m["vs_2T"]["fast_step"] is not None
        assert m["l_star"] == runs[f"ire-{e}-T"]["final_eval_loss"]
  rows = (tmp_path / "pretraining.csv").read_text().strip().splitlines()
  n_seeds = len(data["config"]["seeds"])
  assert len(rows) == 1 + len(data["results"]) * n_seeds * len(expected)
  summary = (tmp_path / "pretraining_summary.md").read_text()
  assert summary.count("\n| ") <= 11  # header + at most 10 rows
  assert res["results"].keys() == data["results"].keys()
  # The reports can be rewritten from the JSON alone (no training), identically.
  bench.main(["--from-json", str(tmp_path / "pretraining.json"), "--out", str(tmp_path / "re")])
  assert (tmp_path / "re" / "pretraining_summary.md").read_text() == summary.replace(
      str(tmp_path / "pretraining.md"), str(tmp_path / "re" / "pretraining.md"))


def test_smoothed_training_curve_averages_the_trailing_window():
  recs = [{"step": s, "loss": float(s)} for s in (2, 4, 6, 8)] + [{"step": 8, "eval_loss": 1.0}]
  # Window 4: the logged steps in (step - 4, step].
  assert bench.smooth_train_curve(recs, 4) == [(4, 3.0), (6, 5.0), (8, 7.0)]
  assert bench.smooth_train_curve(recs, 100) == []


def test_official_weight_decay_reaches_every_parameter():
  """The authors decay every parameter; the examples' default decays matrices only."""
  import dataclasses

  import jax.numpy as jnp
  import numpy as np
  import optax

  from examples.common import cli, optim

  cfg = cli.parse("llama", ["--weight-decay", "0.5", "--eps", "1e-16", "--clip-norm", "0"])
  params = {"scale": jnp.ones(3), "kernel": jnp.ones((2, 2))}
  zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
  lr = 0.1
  for every, expect_scale in ((False, 0.0), (True, -lr * 0.5)):
    opt = dataclasses.replace(cfg.optimizer, decay_mask="all" if every else "weights")
    tx = optim.build_base(opt, "adamw", optax.constant_schedule(lr))
    updates, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradients: Adam's step is 0, only the decoupled decay -lr * wd * p remains.
    np.testing.assert_allclose(updates["kernel"], -lr * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["scale"], expect_scale * np.ones(3), rtol=1e-6)


def test_official_preset_smoke(tmp_path):
  res = bench.main(["--preset", "official", "--smoke", "--out", str(tmp_path)])
  for name in ("pretraining_official.json", "pretraining_official.md",
               "pretraining_official.png", "pretraining_official_summary.md"):
    assert (tmp_path / name).stat().st_size > 0, name
  doc = json.loads((tmp_path / "pretraining_official.json").read_text())
  data = doc["details"]
  # Speed-up rows per setting; no time rows (the run's timings are not a cost measurement).
  assert not [r for r in doc["rows"] if r["metric"] == "time_ratio"]
  assert {(r["variant"], r["metric"]) for r in doc["rows"]} >= {
      (v, "speedup_train_vs_T") for v in ("g0.6-k3", "g0.99-k5lr")}
  c = data["config"]
  assert c["preset"] == "official" and data["complete"] is True
  assert (c["eps"], c["decay_all"], c["b1"], c["b2"], c["final_lr_ratio"]) == (
      1e-16, True, 0.9, 0.95, 0.05)
  settings = c["ire_settings"]
  assert {k: (v["gamma"], v["kappa"], v["kappa_schedule"], v["curvature"],
              v["refresh_every"]) for k, v in settings.items()} == {
      "g0.6-k3": (0.6, 3.0, "constant", "fisher", 10),
      "g0.99-k5lr": (0.99, 5.0, "lr", "fisher", 10)}
  T = c["steps"]
  assert data["warmup_steps"] == max(1, round(0.1 * T))  # the smoke's warm-up fraction
  runs = data["results"]["wikitext2" if "wikitext2" in data["results"] else "cpython-docs"]
  runs = runs[str(c["seeds"][0])]
  assert set(runs["runs"]) == {"adamw-T", "adamw-2T", "ire-g0.6-k3-T", "ire-g0.99-k5lr-T"}
  for kind, r in runs["runs"].items():
    assert r["train_curve"] and r["train_curve"][-1][0] == r["steps"], kind
    assert all(math.isfinite(v) for _, v in r["train_curve"]), kind
  for v in settings:
    m = runs["metrics"][v]
    assert m["train_vs_T"]["fast_step"] is not None or m["train_vs_T"]["bound"] == "upper"
    assert m["train_l_star"] == runs["runs"][f"ire-{v}-T"]["train_curve"][-1][1]
    # The flat fraction IRE reports is the setting's gamma.
    assert runs["runs"][f"ire-{v}-T"]["ire_flat_fraction_end"] == pytest.approx(
        settings[v]["gamma"], abs=0.01)
  md = (tmp_path / "pretraining_official.md").read_text()
  assert "eps 1e-16" in md and "every parameter" in md and "5.4x" in md
  assert res["stem"] == "pretraining_official"
  # Rewritten from the JSON alone, identically.
  bench.main(["--from-json", str(tmp_path / "pretraining_official.json"), "--out",
              str(tmp_path / "re")])
  assert (tmp_path / "re" / "pretraining_official.md").read_text() == md
  # A learning-rate check (single runs at another lr) joins the report from their JSONs.
  seed_runs = data["results"][next(iter(data["results"]))][str(c["seeds"][0])]["runs"]
  other = dict(seed_runs["adamw-T"], lr=2 * c["lr"], variant=None)
  (tmp_path / "lr.json").write_text(json.dumps(other))
  bench.main(["--from-json", str(tmp_path / "pretraining_official.json"), "--out",
              str(tmp_path / "lr"), "--lr-check", str(tmp_path / "lr.json")])
  md_lr = (tmp_path / "lr" / "pretraining_official.md").read_text()
  assert "## Learning-rate check" in md_lr and f"| {2 * c['lr']:g} | adamw-T |" in md_lr
  assert f"| {c['lr']:g} (authors) | ire-g0.6-k3-T |" in md_lr


def test_resume_reuses_only_runs_of_the_same_settings(tmp_path, monkeypatch):
  """``--resume`` keys every run on its whole configuration: kappa, gamma, schedule too."""
  trained = []

  def fake_run(cfg, spec, seed, variant, mult, run_root, name):
    trained.append(name.split(f"-s{seed}-", 1)[1])
    steps = cfg["steps"] * mult
    loss = 2.0 - 0.1 * len(trained)
    return {"steps": steps, "warmup_steps": 1, "params": 10, "diverged": False,
            "final_eval_loss": loss, "final_eval_acc": 0.5, "final_train_loss": loss,
            "s_per_step": 0.01, "s_per_step_median_window": 0.01, "first_step_s": 0.1,
            "wall_s": 1.0, "ire_flat_fraction_end": None,
            "curve": [(steps // 2, loss + 1.0), (steps, loss)]}

  monkeypatch.setattr(bench, "one_run", fake_run)
  monkeypatch.delenv("IRE_OPTAX_DATA", raising=False)  # the offline corpus, wherever it runs
  argv = ["--smoke", "--out", str(tmp_path), "--estimators", "fisher"]
  everything = ["adamw-T", "adamw-2T", "ire-fisher-T"]
  for extra, want in (
      ([], everything),  # first run: nothing to resume from
      (["--resume"], []),  # the same settings: everything reused
      (["--resume", "--kappa", "1"], ["ire-fisher-T"]),  # kappa: only the IRE run
      (["--resume", "--kappa", "1", "--gamma", "0.5"], ["ire-fisher-T"]),
      (["--resume", "--kappa", "1", "--gamma", "0.5", "--kappa-schedule", "lr"],
       ["ire-fisher-T"]),
      (["--resume", "--kappa", "1", "--gamma", "0.5", "--kappa-schedule", "lr"], []),
      (["--resume", "--lr", "0.02"], everything),
  ):
    trained.clear()
    res = bench.main(argv + extra)
    assert trained == want, extra
    ire = res["results"]["cpython-docs"]["0"]["runs"]["ire-fisher-T"]
    assert ("reused_from" in ire) == ("ire-fisher-T" not in want)
