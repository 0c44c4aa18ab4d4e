"""benchmarks/experiments/pretraining.py and the runner: the speed-up metric with its bounds,
the per-seed metrics, the run cache and a smoke run of both presets."""

import argparse
import dataclasses
import math

import pytest

from benchmarks import metrics, render, runner
from benchmarks.experiments import pretraining as pt
from benchmarks.spec import Arm, Experiment, Task, config_hash, smoke

# Hand-made held-out curves, evaluated every 10 steps.
BASE_2T = [(10, 3.0), (20, 2.5), (30, 2.2), (40, 2.0), (50, 1.9), (60, 1.8)]
IRE_T = [(10, 2.9), (20, 2.3), (30, 1.95)]


def test_speedup_exact_counts_the_first_step_at_or_below_the_target():
  s = metrics.speedup(BASE_2T, IRE_T, IRE_T[-1][1])  # AdamW-2T at <= 1.95 first at 50
  assert s == {"base_step": 50, "fast_step": 30, "value": pytest.approx(50 / 30),
               "bound": "exact"}
  assert metrics.speedup_text(s) == "1.67x"
  assert metrics.speedup(BASE_2T, IRE_T, 2.2)["base_step"] == 30  # equality reaches it
  bumpy = [(10, 3.0), (20, 1.9), (30, 2.4), (40, 1.8)]
  assert metrics.speedup(bumpy, IRE_T, 1.95)["base_step"] == 20


def test_speedup_bounds_where_a_curve_never_reaches_the_target():
  s = metrics.speedup(BASE_2T, [(10, 2.0), (20, 1.5)], 1.5)  # AdamW-2T never: lower bound
  assert (s["base_step"], s["fast_step"], s["bound"]) == (None, 20, "lower")
  assert s["value"] == pytest.approx(60 / 20) and metrics.speedup_text(s) == "> 3.00x"
  s = metrics.speedup(BASE_2T, IRE_T, 1.9)  # IRE never gets to 1.9: upper bound
  assert s["bound"] == "upper" and s["value"] == pytest.approx(50 / 30)
  assert metrics.speedup_text(s) == "< 1.67x"
  s = metrics.speedup(BASE_2T, IRE_T, 0.5)
  assert s == metrics.NO_SPEEDUP and metrics.speedup_text(s) == "n/a"


def test_a_target_reached_at_the_first_evaluation_bounds_the_speedup():
  """One evaluation each (T shorter than the evaluation interval) read as an exact 2x: the
  report said the 2x claim was reproduced for an IRE run identical to AdamW's."""
  assert metrics.speedup([(12, 2.9)], [(6, 3.4)], 3.4) == metrics.NO_SPEEDUP
  s = metrics.speedup([(12, 2.4), (24, 2.0)], IRE_T, 2.5)  # the base at its first point
  assert (s["base_step"], s["fast_step"], s["bound"]) == (12, 20, "upper")
  s = metrics.speedup(BASE_2T, IRE_T, 2.9)  # IRE at its first evaluation: 10 or earlier
  assert (s["value"], s["bound"]) == (pytest.approx(2.0), "lower")
  assert metrics.speedup_verdict([metrics.speedup([(12, 2.9)], [(6, 3.4)], 3.4)], 2.0) == (
      "not measurable")
  assert metrics.speedup_at_end([(6, 3.4)], [(6, 3.4)])["bound"] == "lower"


def test_speedup_at_end_is_the_base_runs_length_over_the_fast_runs_step():
  a1 = [(10, 3.0), (20, 2.0), (30, 1.5)]
  assert metrics.speedup_at_end(a1, [(10, 2.0), (20, 1.4), (30, 1.0)]) == {
      "base_step": 30, "fast_step": 20, "value": 1.5, "bound": "exact"}
  s = metrics.speedup_at_end(a1, [(10, 2.0), (20, 1.8), (60, 1.6)])
  assert s["bound"] == "upper" and s["value"] == pytest.approx(30 / 60)


def test_speedups_text_and_verdict_flag_bounds_and_the_claims_threshold():
  exact, lower = {"value": 2.0, "bound": "exact"}, {"value": 4.0, "bound": "lower"}
  assert metrics.speedups_text([exact, exact]) == "2.00 ± 0.00x"
  text = metrics.speedups_text([exact, lower])
  assert text.startswith(">= 3.00") and "1/2 bounds" in text
  assert metrics.speedups_text([lower, lower]).startswith("> 4.00x")
  assert metrics.speedups_text([metrics.NO_SPEEDUP]) == "n/a"
  assert metrics.speedup_verdict([exact], 2.0).startswith("reproduced")
  assert metrics.speedup_verdict([{"value": 1.6, "bound": "exact"}], 2.0).startswith(
      "reproduced")  # 80% of the claim
  assert metrics.speedup_verdict([exact], 5.4).startswith("partly")
  assert metrics.speedup_verdict([{"value": 1.05, "bound": "exact"}], 2.0).startswith(
      "not reproduced")
  assert metrics.speedup_verdict([{"value": 3.0, "bound": "upper"}], 2.0).startswith(
      "not reproduced")
  assert metrics.speedup_verdict([metrics.NO_SPEEDUP], 2.0) == "not measurable"


def _run(curve, train=None, sps=0.1):
  r = {"curve": curve, "final_eval_loss": curve[-1][1], "s_per_step": sps,
       "s_per_step_median_window": None}
  return dict(r, train_curve=train) if train else r


def test_seed_metrics_on_hand_made_runs():
  runs = {"adamw-T": _run(BASE_2T[:3], sps=0.10), "adamw-2T": _run(BASE_2T, sps=0.12),
          "ire-x-T": _run(IRE_T, sps=0.15)}
  m = pt.seed_metrics(runs, "x")
  assert m["vs_2T"]["value"] == pytest.approx(50 / 30)
  assert m["vs_T"] == {"base_step": 30, "fast_step": 30, "value": 1.0, "bound": "exact"}
  assert m["ratio"] == pytest.approx(1.5)  # over the faster AdamW run
  assert "train_vs_T" not in m
  runs = {k: dict(r, train_curve=r["curve"]) for k, r in runs.items()}
  m = pt.seed_metrics(runs, "x")
  assert m["train_vs_T"] == metrics.speedup_at_end(BASE_2T[:3], IRE_T)


def test_smooth_averages_the_trailing_window():
  points = [(s, float(s)) for s in (2, 4, 6, 8)]
  assert pt.smooth(points, 4) == [(4, 3.0), (6, 5.0), (8, 7.0)]
  assert pt.smooth(points, 100) == []


def test_reports_are_rendered_from_the_committed_results():
  for name, module in (("pretraining", pt),):
    for target, text in module.render(render.Results()).items():
      assert (render.ROOT / target).read_text() == text, f"stale {target}: {name}"


@dataclasses.dataclass(frozen=True)
class _Opt:
  lr: float = 0.1
  kappa: float = 1.0


@dataclasses.dataclass(frozen=True)
class _Cfg:
  steps: int = 4
  seed: int = 0
  optimizer: _Opt = _Opt()


def test_runner_caches_each_run_under_its_whole_configuration(tmp_path, monkeypatch):
  trained = []

  def fake_train(cfg, *, data_dir, measure=None, **kw):
    trained.append(cfg)
    return {"final_eval_loss": 1.0, "params": 1}

  monkeypatch.setattr(runner, "train_one", fake_train)
  monkeypatch.setattr(runner, "configure", lambda spec, task, arm, seed: runner.override(
      runner.override(_Cfg(steps=spec.steps, seed=seed), task.overrides),
      {"optimizer": arm.optimizer}))
  spec = Experiment("x", "", (Task("ex", "digits", name="ex-d"),),
                    (Arm("a"), Arm("b", {"kappa": 2.0})), (0, 1), 4, (), "a")
  quiet = {"out": tmp_path, "log": lambda s: None}
  runs = runner.run_all(spec, **quiet)
  assert len(trained) == 4 and set(runs["ex-d"]) == {"0", "1"}
  assert runner.run_all(spec, **quiet) == runs and len(trained) == 4  # all cached
  spec2 = dataclasses.replace(spec, arms=(Arm("a"), Arm("b", {"kappa": 3.0})))
  runner.run_all(spec2, **quiet)
  assert [c.optimizer.kappa for c in trained[4:]] == [3.0, 3.0]  # only the changed arm
  runner.run_all(dataclasses.replace(spec2, tasks=(Task("ex", "digits", {"optimizer": {
      "lr": 0.2}}, name="ex-d"),)), **quiet)
  assert len(trained) == 6 + 4  # a setting of every arm: all four runs again
  assert config_hash(_Cfg()) != config_hash(_Cfg(seed=1))


def test_runner_hashes_the_data_and_finds_it_before_training(tmp_path, monkeypatch):
  """The cache key held the data set's name only: another --data-dir reused runs trained on
  other data; and a missing data set failed only when its first run came, after others."""
  trained = []
  monkeypatch.setattr(runner, "train_one", lambda cfg, **kw: trained.append(cfg) or {
      "final_eval_loss": 1.0, "params": 1})
  monkeypatch.setattr(runner, "configure", lambda spec, task, arm, seed: _Cfg(seed=seed))
  monkeypatch.delenv("IRE_OPTAX_DATA", raising=False)
  for d, text in (("one", "abc"), ("two", "abcd")):
    (tmp_path / d / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / d / "tinyshakespeare" / "input.txt").write_text(text)
  spec = Experiment("x", "", (Task("ex", "shakespeare"),), (Arm("a"),), (0,), 4, (), "a")
  quiet = {"out": tmp_path / "out", "log": lambda s: None}
  runner.run_all(spec, data_dir=str(tmp_path / "one"), **quiet)
  runner.run_all(spec, data_dir=str(tmp_path / "one"), **quiet)
  assert len(trained) == 1
  runner.run_all(spec, data_dir=str(tmp_path / "two"), **quiet)
  assert len(trained) == 2
  late = dataclasses.replace(spec, tasks=(Task("ex", "digits"), Task("ex", "mnist")))
  with pytest.raises(FileNotFoundError, match="mnist not found"):
    runner.run_all(late, data_dir=str(tmp_path / "one"), **quiet)
  assert len(trained) == 2  # the digits run did not train first


@pytest.mark.parametrize("name", ["pretraining", "pretraining_official"])
def test_rows_of_the_committed_runs_are_the_committed_rows(name):
  """The rows the cost table and the summary read: a re-run writes them as before."""
  doc = render.Results()[name]
  assert [dataclasses.asdict(r) for r in pt.result_rows(doc["details"])] == [
      pytest.approx(r) for r in doc["rows"]]


@pytest.mark.slow  # trains (compiles) several optimizers
def test_smoke_run_writes_what_the_report_reads(tmp_path):
  spec = dataclasses.replace(smoke(pt.SPEC), arms=pt.arms({"fisher": pt.ire()}, 8))
  args = argparse.Namespace(smoke=True, out=str(tmp_path), data_dir=None, preset="default")
  pt.run(spec, args)
  doc = render.Results(tmp_path)["pretraining"]
  assert doc["schema"] == "ire_optax-benchmark/1"
  runs = doc["details"]["results"]["cpython-docs"]["0"]["runs"]
  assert set(runs) == {"adamw-T", "adamw-2T", "ire-fisher-T"}
  for kind, r in runs.items():
    assert math.isfinite(r["final_eval_loss"]), kind
    assert r["curve"][-1][0] == (16 if kind == "adamw-2T" else 8), kind
  assert runs["ire-fisher-T"]["ire_flat_fraction_end"] == pytest.approx(0.6, abs=0.01)
  # IRE's own final loss is reached by IRE at the latest at its last step.
  assert pt.seed_metrics(runs, "fisher")["vs_2T"]["fast_step"] is not None
  assert [r["variant"] for r in doc["rows"] if r["metric"] == "time_ratio"] == ["fisher"]
  md = pt.render(render.Results(tmp_path))["benchmarks/results/pretraining.md"]
  assert "| CPython docs (offline) | `fisher` |" in md
  before = sorted(p.name for p in (tmp_path / "runs" / "pretraining").iterdir())
  pt.run(spec, args)  # every run from the cache
  assert sorted(p.name for p in (tmp_path / "runs" / "pretraining").iterdir()) == before
  assert render.Results(tmp_path)["pretraining"]["details"]["results"] == doc["details"][
      "results"]


def test_official_preset_declares_the_authors_settings():
  cfg = runner.configure(pt.OFFICIAL, pt.OFFICIAL.tasks[0], pt.OFFICIAL.arm("ire-g0.99-k5lr-T"),
                         0)
  o = cfg.optimizer
  assert (o.eps, o.decay_mask, o.b2, o.clip_norm, o.final_lr_ratio, o.lr) == (
      1e-16, "all", 0.95, 0.0, 0.05, 6e-4)
  assert (o.name, o.ire_gamma, o.ire_kappa, o.ire_kappa_schedule) == ("adamw+ire", 0.99, 5.0,
                                                                       "lr")
  assert (cfg.model.dim, cfg.model.depth, cfg.data.seq_len, cfg.steps) == (64, 2, 32, 3000)
  two_t = runner.configure(pt.OFFICIAL, pt.OFFICIAL.tasks[0], pt.OFFICIAL.arm("adamw-2T"), 0)
  assert (two_t.steps, two_t.optimizer.warmup_steps, two_t.optimizer.name) == (6000, 30,
                                                                               "adamw")
