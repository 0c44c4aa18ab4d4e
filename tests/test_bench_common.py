"""The benchmarks' shared modules: data lookup, the interleaved timer, the schema, statistics."""

import argparse
import json
import math
import os

import numpy as np
import optax
import pytest

from benchmarks import data, metrics, render, schema, timing
from examples.common.train import steps_to_reach

DATA = os.environ.get(data.DATA_ENV)


def test_data_dir_argument_defaults_to_the_environment(monkeypatch):
  monkeypatch.setenv(data.DATA_ENV, "/some/where")
  p = argparse.ArgumentParser()
  data.add_data_dir_argument(p)
  assert p.parse_args([]).data_dir == "/some/where"
  assert p.parse_args(["--data-dir", "x"]).data_dir == "x"
  monkeypatch.delenv(data.DATA_ENV)
  p = argparse.ArgumentParser()
  data.add_data_dir_argument(p)
  assert p.parse_args([]).data_dir is None


def test_images_fall_back_to_digits_without_a_data_dir(tmp_path):
  img = data.load_images(None)
  assert img.name == "digits" and img.x_train.shape[1:] == (8, 8, 1)
  assert data.load_images(tmp_path).name == "digits"  # a directory without mnist/
  assert "digits" in data.describe_images(img)
  with pytest.raises(FileNotFoundError, match="--data-dir"):
    data.load_images(tmp_path, require_mnist=True)
  with pytest.raises(ValueError, match="scale"):
    data.load_images(None, scale="minmax")
  assert data.data_path(None, "mnist") is None and data.data_path(tmp_path, "nope") is None
  text, name = data.read_text(None, "tinyshakespeare", "input.txt")
  assert len(text) > 10_000 and "CPython" in name


@pytest.mark.skipif(data.mnist_dir(DATA) is None, reason="$IRE_OPTAX_DATA/mnist not present")
def test_mnist_from_the_data_dir_in_both_scales():
  unit = data.load_images(DATA, scale="unit")
  assert unit.name == "mnist" and unit.x_train.shape[1:] == (28, 28, 1)
  assert unit.x_train.min() == 0.0 and unit.x_train.max() == 1.0
  std = data.load_images(DATA)
  assert abs(float(std.x_train.mean())) < 1e-3 and len(std.x_test) == 10_000


def test_interleaved_timer_rotates_and_pairs_by_repetition():
  order = []

  def block(name):
    def run():
      order.append(name)
      return np.zeros(())
    return run

  t = timing.time_interleaved({"a": block("a"), "b": block("b"), "c": block("c")}, baseline="a",
                         reps=3, units=2, warmup=1)
  assert order == list("abc") + list("abc") + list("bca") + list("cab")
  assert {k: len(v) for k, v in t.seconds.items()} == {"a": 3, "b": 3, "c": 3}
  # Both clocks are recorded for the same repetitions; ``on`` reads the other one.
  cpu = t.on("cpu")
  assert t.clock == "wall" and cpu.clock == "cpu" and cpu.on("wall").seconds == t.seconds
  assert {k: len(v) for k, v in cpu.seconds.items()} == {"a": 3, "b": 3, "c": 3}
  with pytest.raises(ValueError, match="clock"):
    timing.Timings({"a": [1.0]}, "a").on("cpu")
  with pytest.raises(ValueError, match="baseline"):
    timing.time_interleaved({"a": block("a")}, baseline="z", reps=1)
  # Ratios pair the blocks of the same repetition: b is 2x a in every repetition although
  # the machine slowed down 10x between repetitions.
  t = timing.Timings({"a": [1.0, 10.0, 2.0], "b": [2.0, 20.0, 4.0], "c": [1.0, 30.0, 2.0]}, "a")
  assert t.ratio("b") == 2.0 and t.paired("c") == [1.0, 3.0, 1.0] and t.ratio("c") == 1.0
  assert t.min_ratio("c") == 1.0 and t.median("a") == 2.0
  assert t.ratio("c", baseline="b") == 0.5
  s = t.summary()
  assert s["ratio"]["b"] == 2.0 and s["ratio_max"]["c"] == 3.0 and s["reps"] == 3


def test_stepper_threads_the_carry_and_the_call_index():
  seen = []
  s = timing.Stepper(lambda c, i: (seen.append(i), c + 1)[1], 0, steps=3, args_at=lambda i: (i,))
  assert s() == 3 and s() == 6 and seen == list(range(6)) and s.carry == 6


def test_results_round_trip_and_the_one_reader(tmp_path):
  rows = [schema.time_row("SAM", "SGD", "CNN", "train step", 2.01, "bench_x", variant="v"),
          schema.Row("SAM", "CNN", "test_acc", 0.97, n=3, spread=0.01, source="bench_x")]
  path = schema.write_results(tmp_path / "x", benchmark="bench_x", meta={"m": 1}, rows=rows,
                         details={"a": np.float32(1.5), "b": [1, 2]}, markdown="# x")
  assert path == tmp_path / "x.json" and (tmp_path / "x.md").read_text() == "# x\n"
  doc = schema.read_results(path)
  assert doc["rows"] == rows and doc["details"] == {"a": 1.5, "b": [1, 2]}
  assert doc["benchmark"] == "bench_x" and doc["meta"] == {"m": 1}
  (tmp_path / "legacy.json").write_text(json.dumps({"rows": [1]}))
  with pytest.raises(ValueError, match="schema|results file"):
    schema.read_results(tmp_path / "legacy.json")
  assert schema.read_results(tmp_path / "absent.json") is None
  assert not list(tmp_path.glob("*.tmp"))


def test_statistics():
  assert metrics.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
  assert metrics.mean_std([4.0]) == (4.0, 0.0)
  m, s = metrics.mean_std([1.0, float("nan"), None, 3.0])
  assert m == 2.0 and s == pytest.approx(math.sqrt(2.0))
  assert all(math.isnan(x) for x in metrics.mean_std([float("nan")]))
  assert metrics.median([3.0, float("nan"), 1.0, 2.0]) == 2.0 and math.isnan(metrics.median([]))
  curve = [(10, 3.0), (20, 2.5), (30, 2.2), (40, 2.0)]
  assert steps_to_reach(curve, 2.2) == 30 and steps_to_reach(curve, 2.19) == 40
  assert steps_to_reach(curve, 1.0) is None


def test_machine_description():
  m = timing.machine()
  assert m["cores"] >= 1 and m["jax"] and m["optax"] and "jax" in m["summary"]
  assert m["loadavg"] is None or m["loadavg"] >= 0.0


def test_ratio_bounds_span_and_bounds_cells():
  assert metrics.ratio_bounds([2.0, 1.0, 4.0]) == {"median": 2.0, "min": 1.0, "max": 4.0}
  assert render.bounds(1.234, 1.0, 2.0) == "1.23 [1.00–2.00]" and render.bounds(None, 0, 0) == "—"
  assert render.span([3.0, None, 1.0]) == "1.00–3.00" and render.span([1.001, 1.004]) == "1.00"
  assert render.span([None]) == "not run"
  assert render.machine({"meta": {"machine": {"summary": "m"}}}) == "m"
  assert render.machine({"meta": {"machine": None}}) == "machine not recorded"


def test_update_stepper_applies_updates_on_its_own_copy():
  params = {"w": np.ones(3, np.float32)}
  step = timing.update_stepper(optax.sgd(0.5), params, {"w": np.full(3, 2.0, np.float32)}, 2)
  p, _ = step()
  np.testing.assert_allclose(p["w"], [-1.0, -1.0, -1.0])  # 1 - 2 * 0.5 * 2
  np.testing.assert_allclose(params["w"], [1.0, 1.0, 1.0])  # the caller's tree is untouched


def test_target_verdict_counts_the_misses():
  assert metrics.target_verdict([1.0, 1.1, None], 1.15) == "met (2 of 2)"
  assert metrics.target_verdict([1.0, 1.2, 1.3], 1.15) == "missed in 2 of 3 (worst 1.30)"
  assert metrics.target_verdict([float("nan")], 1.0) == "not measured"


def test_a_recorded_command_names_what_replaced_its_script(monkeypatch):
  from benchmarks import runner

  now = "python -m benchmarks sam --smoke"
  assert render.command(f" {now} ") == f"`{now}`"
  old = render.command("python benchmarks/bench_selection.py --sizes 1e6 ; then "
                       "python benchmarks/bench_selection.py --sizes 1e7")
  assert old.endswith("(a script since replaced by `python -m benchmarks selection`)")
  assert render._Formatter().format("{c!c}", c="python benchmarks/bench_sala.py") == (
      "`python benchmarks/bench_sala.py` (a script since replaced by `python -m benchmarks sala`)")
  monkeypatch.setattr(runner, "ARGV", None)  # run as a script: this process's command line
  for argv in (["m", "run", "sam", "--smoke"], ["m", "sam", "--smoke"]):
    monkeypatch.setattr("sys.argv", argv)
    assert runner.command("sam") == "python -m benchmarks sam --smoke"
  monkeypatch.setattr("sys.argv", ["m", "sam"])
  assert runner.command("sam") == "python -m benchmarks sam"
  monkeypatch.setattr(runner, "ARGV", ["sam", "--out", "D"])  # through __main__.main(argv)
  assert runner.command("sam") == "python -m benchmarks sam --out D"


def test_sala_rows_name_the_data_the_training_run_used():
  """They said "MLP 784-512-256-10, MNIST" also for a run on the digits (64 inputs)."""
  from benchmarks.experiments import sala

  details = render.Results()["sala"]["details"]
  assert sala.result_rows(details)[0].task == "MLP 784-512-256-10, MNIST training run"
  digits = {**details, "config": {**details["config"], "inputs": 64,
                                  "data": "scikit-learn digits (MNIST not found) (1,438 train)"}}
  assert sala.result_rows(digits)[0].task == (
      "MLP 64-512-256-10, scikit-learn digits training run")
