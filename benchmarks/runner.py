"""Trains every run of an :class:`~benchmarks.spec.Experiment` through the examples' API.

Each run's record is cached as ``{out}/runs/{experiment}/{config_hash}.json`` and read, not
retrained, while it exists (the code is not hashed: delete it after changing what a run
computes).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks import data, schema
from benchmarks.spec import Arm, Experiment, Task, config_hash

Measure = Callable[[Any, Any], Mapping[str, Any]]  # (TrainConfig, RunResult) -> extra fields


def now() -> str:
  """The current UTC time as the results record it."""
  return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# The arguments of ``python -m benchmarks`` (``benchmarks.__main__.main`` sets them; None:
# this process's command line).
ARGV: list[str] | None = None


def command(name: str) -> str:
  """The command line that runs benchmark ``name`` with this process's options."""
  argv = sys.argv[1:] if ARGV is None else ARGV
  options = argv[2:] if argv[:1] == ["run"] else argv[1:]  # `run NAME ...` is `NAME ...`
  return " ".join(["python -m benchmarks", name, *options])


def override(cfg: Any, changes: Mapping[str, Any]) -> Any:
  """``cfg`` (a frozen dataclass) with ``changes``; a mapping changes a nested config."""
  fields = {}
  for k, v in changes.items():
    sub = getattr(cfg, k)
    fields[k] = override(sub, v) if isinstance(v, Mapping) and dataclasses.is_dataclass(sub) \
        else v
  return dataclasses.replace(cfg, **fields)


def configure(spec: Experiment, task: Task, arm: Arm, seed: int) -> Any:
  """One run's ``TrainConfig``: the example's defaults, the experiment's, the task's, the arm's."""
  cfg = importlib.import_module(f"examples.{task.example}").get_config()
  later = {**task.overrides, **arm.train}
  steps = {} if "steps" in later else {"steps": spec.steps}  # (a spec may leave it to its tasks)
  cfg = override(cfg, {**steps, "seed": seed, "data": {"spec": task.data},
                       "no_checkpoint": True, "no_plot": True, "no_progress": True})
  return override(cfg, {**later,
                        "optimizer": {**task.overrides.get("optimizer", {}), **arm.optimizer}})


def curve(records: list[dict], key: str) -> list[tuple[int, float]]:
  """``(step, value)`` of every logged record that has ``key``."""
  return [(int(r["step"]), float(r[key])) for r in records if key in r]


def record(cfg: Any, result: Any, wall_s: float) -> dict[str, Any]:
  """What one run leaves: final metrics, the held-out and training-loss curves, timings."""
  from examples.common import train

  s = result.summary
  recs = train.read_metrics(s["run_dir"])
  rate = "tok_per_s" if cfg.kind == "text" else "img_per_s"
  per_example = cfg.data.seq_len if cfg.kind == "text" else 1
  windows = [cfg.batch_size * per_example / r[rate] for r in recs[1:]
             if r.get(rate) and math.isfinite(r[rate])]
  flat = curve(recs, "ire_flat_fraction")
  return {
      "steps": cfg.steps, "params": s["params"], "diverged": False,
      "final_eval_loss": s["eval_loss"], "final_eval_acc": s["eval_acc"],
      "final_train_loss": s["train_loss"],
      "s_per_step": 1.0 / s["steps_per_s"] if s["steps_per_s"] else None,
      "s_per_step_median_window": statistics.median(windows) if windows else None,
      "first_step_s": s["first_step_s"], "wall_s": wall_s,
      "ire_flat_fraction_end": flat[-1][1] if flat else None,
      "curve": curve(recs, "eval_loss"), "acc_curve": curve(recs, "eval_acc"),
      "loss_curve": curve(recs, "loss"),
  }


def train_one(cfg: Any, *, data_dir: str | None, measure: Measure | None = None,
              **run_kwargs: Any) -> dict[str, Any]:
  """Trains ``cfg`` (in a temporary run directory) and returns its :func:`record`."""
  from examples.common import train

  with tempfile.TemporaryDirectory(prefix="ire_bench_run_") as tmp:
    found = {} if "data" in run_kwargs else {"spec": data.data_spec(cfg.data.spec, data_dir)}
    cfg = override(cfg, {"out": tmp, "data": found})
    t0 = time.perf_counter()
    result = train.run(cfg, quiet=True, **run_kwargs)
    rec = record(cfg, result, time.perf_counter() - t0)
    if measure is not None:
      rec.update(measure(cfg, result))
  return rec


def run_all(spec: Experiment, *, out: Path, data_dir: str | None = None,
            measure: Measure | None = None, extra: Any = None,
            inputs: Callable[[Task, int], Mapping[str, Any]] | None = None,
            log: Callable[[str], None] = print) -> dict[str, dict[str, dict[str, dict]]]:
  """Every run of ``spec``, trained or cached: ``{task: {seed: {arm: record}}}``.

  ``inputs(task, seed)``: ``train.run``'s ``data``/``model`` and a ``measure`` for that run;
  ``extra`` (what they depend on, the data they give included) is hashed with every run, and
  so are the data files of each task otherwise (:func:`benchmarks.data.fingerprint`: every
  task's data is found before the first run trains).
  """
  cache = Path(out) / "runs" / spec.name
  cache.mkdir(parents=True, exist_ok=True)
  plan = [(t, s, a) for t in spec.tasks for s in spec.seeds for a in spec.arms
          if not t.arms or a.label in t.arms]
  files = {t.key: None if inputs else data.fingerprint(t.data, data_dir) for t in spec.tasks}
  runs: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
  t_start = time.perf_counter()
  for i, (task, seed, arm) in enumerate(plan):
    cfg = configure(spec, task, arm, seed)
    key = config_hash(cfg, task.key, extra, files[task.key])
    path = cache / f"{key}.json"
    if path.exists():
      rec, how = json.loads(path.read_text()), "cached"
    else:
      kwargs = {"measure": measure, **(inputs(task, seed) if inputs else {})}
      rec = dict(train_one(cfg, data_dir=data_dir, **kwargs), config_hash=key)
      how = "trained"
      schema.atomic_write(path, json.dumps(rec, default=str))
      rec = json.loads(path.read_text())  # as a later read gives it (lists, not tuples)
    runs.setdefault(task.key, {}).setdefault(str(seed), {})[arm.label] = rec
    log(f"[{i + 1}/{len(plan)}] {task.key} seed {seed} {arm.label}: {how}, final held-out "
        f"loss {rec['final_eval_loss']:.4f} ({time.perf_counter() - t_start:.0f} s)")
  return runs


def sharpness(result: Any, batch: Mapping[str, Any], *, lanczos_iters: int,
              hutchinson_samples: int = 0, unroll: bool = False, fast_compile: bool = False
              ) -> dict[str, float]:
  """``{"top_eig"[, "trace"]}`` of the eval-mode loss on ``batch`` at a run's evaluated weights
  (Lanczos; Hutchinson with ``hutchinson_samples``), with a fixed key."""
  import jax

  eig, trace = _sharpness_fn(fast_compile)(
      result.graphdef, result.eval_params(), result.state.stats, dict(batch),
      jax.random.key(1234), lanczos_iters, hutchinson_samples, unroll)
  return {"top_eig": float(eig), **({"trace": float(trace)} if hutchinson_samples else {})}


@functools.cache
def _sharpness_fn(fast_compile: bool) -> Callable[..., Any]:
  import jax

  from examples.common import optim, train
  from ire_optax import sharpness as sh

  def fn(graphdef, params, stats, batch, key, iters, samples, unroll):
    def loss_fn(p, b):
      return optim.cross_entropy(train.apply_model(graphdef, p, stats, b["x"], train=False)[0],
                                 b["y"])[0]

    k_eig, k_trace = jax.random.split(key)
    eig = sh.top_hessian_eigs(loss_fn, params, batch, key=k_eig, k=1, num_iters=iters,
                              unroll=unroll)[0][0]
    return eig, (sh.hessian_trace(loss_fn, params, batch, key=k_trace, num_samples=samples,
                                  unroll=unroll)[0] if samples else eig)

  return jax.jit(fn, static_argnums=(0, 5, 6, 7),
                 compiler_options=train.compiler_options(fast_compile))
