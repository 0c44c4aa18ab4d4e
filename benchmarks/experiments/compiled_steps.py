"""SAM, SALA, mSAM, GSAM and IRE steps compiled deviceless for TPU v5e and H100, over base.

Sections: ``update`` (an MLP's optimizer step, :data:`UPDATES`), ``train`` (the examples' train
steps, each kind of step weighted by its share of :data:`PERIOD` steps), ``pod`` (the Llama
step's collectives, FSDP over a v5e:4x4 slice).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import re
import time
import types
from typing import Any

from benchmarks import compiled as X  # isort: skip  (before JAX starts a backend)

import jax
import jax.numpy as jnp
import optax

import ire_optax
from benchmarks import runner, schema
from benchmarks.render import fill, renders, table
from benchmarks.spec import Arm, Experiment, Task
from examples.common import optim, train

PERIOD = 10  # steps over which the occasional work is amortized (IRE's K, 5 SALA cycles)
SALA_K, EVERY_K, MICRO = 2, 5, 8
_IMG = {"image_shape": (32, 32, 3), "num_classes": 10}
ARMS = (Arm("base", note="the example's AdamW or SGD"),
        Arm("ire_grad_sq", {"ire": True, "ire_curvature": "grad_sq", "ire_refresh_every": 10,
                            "ire_warmup": 0}, note="IRE (grad_sq, K=10)"),
        Arm("sam", {"name": "sam"}, note="SAM"),
        Arm("msam", {"name": "msam", "num_microbatches": MICRO}, note=f"mSAM (m={MICRO})"),
        # rho large enough that every cycle is in stage 2 (the radius does not change the cost)
        Arm("sala", {"name": "sala", "sala_sync_period": SALA_K, "rho": 5.0},
            note=f"SALA (k={SALA_K}, stage 2)"),
        Arm("asam", {"name": "asam"}, note="ASAM"), Arm("gsam", {"name": "gsam"}, note="GSAM"),
        Arm("sam_every_k", {"name": "sam", "sam_every_k": EVERY_K},
            note=f"SAM every k={EVERY_K}"))
SPEC = Experiment(
    name="compiled_steps",
    claim="each train step within its TRAIN_TARGETS bound by TPU v5e cycles",
    # Task.data: the random batches' shapes; overrides: of the example's TrainConfig.
    tasks=(Task("llama", "Llama mini (seq 128, batch 16, vocab 96)",
                {"model": {"size": "mini"}, "data": {"seq_len": 128}, "batch_size": 16,
                 "shape": {"vocab_size": 96}}),
           Task("resnet", "ResNet-8 w16 (32x32x3, batch 64)",
                {"model": {"size": "toy", "width": 16}, "batch_size": 64, "shape": _IMG}),
           Task("vit", "ViT mini (32x32x3, patch 4, batch 64)",
                {"model": {"size": "mini", "patch_size": 4}, "batch_size": 64, "shape": _IMG})),
    arms=ARMS, seeds=(0,), steps=PERIOD, metrics=("cycles", "h100_time", "bytes"), baseline="base",
    smoke={"tasks": (Task("llama", "Llama toy (seq 16, batch 8)", {
        "model": {"size": "toy"}, "data": {"seq_len": 16}, "batch_size": 8,
        "shape": {"vocab_size": 32}}),), "arms": (ARMS[0], ARMS[1], ARMS[4])})
# By TPU v5e cycles: key -> (the arm it is over, at most).
TRAIN_TARGETS = {"ire_grad_sq": ("base", 1.03), "sam": ("base", 2.05), "msam": ("sam", 1.05),
                 "sala": ("base", 1.55)}
# XLA:GPU's compiler options for a train step its defaults fail to compile: GEMMs as cuBLAS
# calls (deviceless, the Triton GEMM emitter finds no tile sizes for some of the ViT's dots).
GPU_FALLBACK = {"xla_gpu_enable_triton_gemm": False}
POD, POD_BATCH, POD_ARMS = "v5e:4x4", 128, ("base", "ire_grad_sq", "sam", "sala")
UPDATE_WIDTHS, SMOKE_WIDTHS = (512, 2048, 2048, 2048, 10), (16, 32, 32, 10)
_ON, _OFF = {"sam_hint": True}, {"sam_hint": False}
# One optimizer step of the MLP: (program, transformation, hints, branches taken); programs
# with the same transformation and hints are read from one compiled step.
UPDATES: tuple[tuple[str, str, dict[str, bool], X.Picks | None], ...] = (
    ("adamw", "adamw", {}, None), ("sam", "sam", {}, None),
    ("sam k=5 ascent, hinted", "samk", _ON, None), ("sam k=5 plain, hinted", "samk", _OFF, None),
    ("sam k=5 ascent, unhinted", "samk", {}, X.first_taken),
    ("sam k=5 plain, unhinted", "samk", {}, None),
    ("sala start, hinted", "sala", {**_ON, "cycle_end_hint": False}, None),
    ("sala end, hinted", "sala", {**_OFF, "cycle_end_hint": True}, X.last_taken),
    ("sala stage-2 start, unhinted", "sala", {}, X.first_taken),
    ("sala stage-1 start, unhinted", "sala", {}, None),
    ("sala end, unhinted", "sala", {}, X.last_taken),
    (f"msam m={MICRO}", "msam", {}, None), ("gsam", "gsam", {}, None))
AMORTIZED = {  # name: ((share of the steps, program), ...)
    f"sala k={SALA_K}, stage 2, hinted": ((.5, "sala start, hinted"), (.5, "sala end, hinted")),
    f"sala k={SALA_K}, stage 2, unhinted": ((.5, "sala stage-2 start, unhinted"),
                                            (.5, "sala end, unhinted")),
    f"sam k={EVERY_K}, hinted": ((.2, "sam k=5 ascent, hinted"), (.8, "sam k=5 plain, hinted")),
    f"sam k={EVERY_K}, unhinted": ((.2, "sam k=5 ascent, unhinted"),
                                   (.8, "sam k=5 plain, unhinted"))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--sections", nargs="+", default=["update", "train", "pod"],
                      choices=("update", "train", "pod"))
  parser.add_argument("--targets", nargs="+", default=list(X.TARGETS), choices=X.TARGETS,
                      help="update: %(default)s; train: tpu-v5e and h100 of them")
  parser.add_argument("--models", nargs="+", default=None,
                      choices=sorted({t.example for t in SPEC.tasks}),
                      help="train: these tasks only")
  parser.add_argument("--resume", action="store_true",
                      help="keep what the results file has; compile only what is missing")


def _transformation(key: str) -> optax.GradientTransformation:
  adamw = optax.adamw(1e-3)
  return {"adamw": adamw, "sam": ire_optax.sam(adamw, rho=0.05),
          "samk": ire_optax.sam(adamw, rho=0.05, every_k=EVERY_K),
          "sala": ire_optax.sala(adamw, sync_period=SALA_K, rho=0.2),
          "msam": ire_optax.msam(adamw, rho=0.05, num_microbatches=MICRO),
          "gsam": ire_optax.gsam(adamw, rho=0.05)}[key]


def _mlp_loss(params: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
  x, n = batch["x"], len(params) // 2
  for i in range(n):
    x = x @ params[f"w{i}"] + params[f"b{i}"]
    x = jax.nn.relu(x) if i < n - 1 else x
  return optax.softmax_cross_entropy_with_integer_labels(x, batch["y"]).mean()


def _update_step(tx: optax.GradientTransformation, key: str, hints: dict[str, Any]):
  grad = jax.grad(_mlp_loss)

  def step(params, state, batch):
    if key == "msam":
      updates, state = tx.update(None, state, params, grad_fn=grad, batch=batch, **hints)
    else:
      extra = {} if key == "adamw" else {"grad_fn": lambda q: grad(q, batch)}
      updates, state = tx.update(grad(params, batch), state, params, **extra, **hints)
    return optax.apply_updates(params, updates), state
  return step


def measure_update(target: str, widths: tuple[int, ...], batch: int,
                   done: dict[str, Any] | None) -> dict[str, Any]:
  params = {f"{k}{i}": jax.ShapeDtypeStruct((a, b) if k == "w" else (b,), jnp.float32)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)) for k in "wb"}
  n = sum(x.size for x in params.values())
  data = {"x": jax.ShapeDtypeStruct((batch, widths[0]), jnp.float32),
          "y": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  res = done or {"target": target, "params": n, "batch": batch, "programs": {},
                 "compile_seconds": {}}
  cache: dict[str, Any] = {}
  for name, key, hints, picks in UPDATES:
    if name in res["programs"]:
      continue
    ckey = f"{key} {hints.get('sam_hint', '')}".strip()
    if ckey not in cache:
      t0, tx = time.perf_counter(), _transformation(key)
      cache[ckey] = X.compile_fn(_update_step(tx, key, hints), params,
                                 jax.eval_shape(tx.init, params), data, target=target,
                                 donate_argnums=(0, 1))
      res["compile_seconds"][ckey] = time.perf_counter() - t0
    res["programs"][name] = X.taken(cache[ckey], picks).summary(n)
  progs = res["programs"]
  res["amortized"] = {k: X.mix([(w, progs[p]) for w, p in v]) for k, v in AMORTIZED.items()}
  res["ratios"] = {k: X.ratios(p, progs["adamw"]) for k, p in {**progs, **res["amortized"]}.items()}
  res["ratios"][f"msam m={MICRO} / sam"] = X.ratios(progs[f"msam m={MICRO}"], progs["sam"])
  return res


def example_step(task: Task, arm: Arm, mesh: Any = None, batch_size: int | None = None):
  """``(step_fn, state, batch, spec)`` of the example's train step for ``arm`` as shapes
  (FSDP-sharded over ``mesh`` if given: each leaf along its first axis that divides)."""
  over = dict(task.overrides)
  shape = types.SimpleNamespace(**over.pop("shape"))
  cfg = runner.override(importlib.import_module(f"examples.{task.example}").get_config(), over)
  opt = {"warmup_steps": 0, **arm.optimizer}
  if "name" in opt:  # a wrapper drives the example's optimizer
    opt.setdefault("base", cfg.optimizer.name)
  cfg = runner.override(cfg, {"optimizer": opt})
  graphdef, params, stats = train.split_model(train.build_model(cfg, shape).model)
  spec = optim.build_optimizer(cfg.optimizer, 10_000, model_stats=stats)
  state = jax.eval_shape(lambda p, s: train.TrainState(
      p, s, spec.tx.init(p), train.initial_loss_scale(cfg.precision)), params, stats)
  b = batch_size or cfg.batch_size
  x = ((b, cfg.data.seq_len), jnp.int32) if task.example == "llama" else (
      (b, *shape.image_shape), jnp.float32)
  y = x[0] if task.example == "llama" else (b,)
  batch = {"x": jax.ShapeDtypeStruct(*x), "y": jax.ShapeDtypeStruct(y, jnp.int32)}
  if mesh is not None:
    devs, ns, P = mesh.devices.size, jax.sharding.NamedSharding, jax.sharding.PartitionSpec
    fsdp = lambda s: next((P(*[None] * i, "data") for i, d in enumerate(s) if d % devs == 0), P())
    put = lambda tree, f: jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=ns(mesh, f(v.shape))), tree)
    state, batch = put(state, fsdp), put(batch, lambda s: P("data"))
  fn = train.step_function(graphdef, spec, num_classes=getattr(shape, "vocab_size", None)
                           or shape.num_classes)
  return fn, state, batch, spec


def step_kinds(spec: optim.OptSpec) -> list[tuple[float, tuple, Any]]:
  """``(share of the steps, hints, branches taken)`` per kind of step over :data:`PERIOD`: SALA's
  cycle end runs its end-of-cycle branch; any other hinted step takes no branch."""
  kinds: dict[tuple, list] = {}
  steps = PERIOD if spec.hints else 1
  for t in range(steps):
    hints = spec.hints(t) if spec.hints else ()
    picks = X.last_taken if spec.sala and t % SALA_K == SALA_K - 1 else None
    kinds.setdefault((hints, picks), [0, hints, picks])[0] += 1
  return [(n / steps, hints, picks) for n, hints, picks in kinds.values()]


def compile_kinds(task: Task, arm: Arm, target: str, mesh: Any = None, batch: int | None = None,
                  options: dict[str, Any] | None = None
                  ) -> tuple[int, list[tuple[float, tuple, Any, Any]]]:
  """Parameters, and ``(share, hints, picks, compiled)`` of each kind of step of ``arm``
  (``options``: XLA compiler options)."""
  fn, state, data, spec = example_step(task, arm, mesh, batch)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=None if mesh is None else
                              jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return sum(x.size for x in jax.tree.leaves(state.params)), [
      (share, hints, picks, X.compile_fn(functools.partial(fn, hints=hints), state, data, step,
                                         target=target, place_args=mesh is None,
                                         options=options, donate_argnums=0))
      for share, hints, picks in step_kinds(spec)]


def measure_train(task: Task, arm: Arm, target: str,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
  t0, kinds = time.perf_counter(), []
  n, compiled = compile_kinds(task, arm, target, options=options)
  for share, hints, picks, c in compiled:
    kinds.append({"share": share, "hints": dict(hints), **X.taken(c, picks).summary(n)})
    if target == "tpu-v5e":
      kinds[-1]["cycle_breakdown"] = X.cycle_breakdown(c)
  return {"params": n, **X.mix([(k["share"], k) for k in kinds]), "kinds": kinds,
          "compile_seconds": time.perf_counter() - t0}


def _measure_or_record(m: dict[str, Any], task: Task, arm: Arm, target: str) -> Any:
  """:func:`measure_train`, or None; a compiler's failure is a result too, recorded in ``m``.
  On H100 a step that fails is compiled again with :data:`GPU_FALLBACK`, and the failure
  recorded under ``m["fallbacks"]``."""
  for key in ("errors", "fallbacks"):  # this arm's, renewed
    m.get(key, {}).get(target, {}).pop(arm.label, None)
    if not m.get(key, {}).get(target, True):
      del m[key][target]
    if key in m and not m[key]:
      del m[key]
  failure = None
  for options in [None] + [GPU_FALLBACK] * (target == "h100"):
    try:
      result = measure_train(task, arm, target, options)
    except jax.errors.JaxRuntimeError as e:
      failure = failure or str(e).split("\n")[0]
      continue
    if failure:
      m.setdefault("fallbacks", {}).setdefault(target, {})[arm.label] = failure
    return result
  m.setdefault("errors", {}).setdefault(target, {})[arm.label] = failure
  return None


def measure_pod(task: Task, arms: list[Arm], batch: int) -> dict[str, Any]:
  programs = {}
  for arm in arms:
    t0 = time.perf_counter()
    _, compiled = compile_kinds(task, arm, POD, X.mesh(POD), batch)
    for share, hints, picks, c in compiled:
      name = " ".join([arm.label, ",".join(f"{k}={v}" for k, v in hints)]).strip()
      programs[name] = {"share": share, "hints": dict(hints), "collectives":
                        X.collectives(c, picks),
                        "compile_seconds": (time.perf_counter() - t0) / len(compiled)}
  return {"target": POD, "model": task.data, "batch": batch, "programs": programs}


def extra_collectives(prog: list[dict[str, Any]], base: list[dict[str, Any]]
                      ) -> list[dict[str, Any]]:
  """What ``prog`` executes beyond ``base``: per (opcode, shape), the surplus executions."""
  have = {(c["opcode"], c["shape"]): c["count"] for c in base}
  return [{**c, "count": c["count"] - have.get((c["opcode"], c["shape"]), 0.0)} for c in prog
          if c["count"] > have.get((c["opcode"], c["shape"]), 0.0)]


def train_ratios(trains: dict[str, Any]) -> None:
  """Adds each arm's ratios over its base step (and mSAM's over SAM's) to ``trains``."""
  for model in trains.values():
    for target, progs in model["targets"].items():
      if "base" in progs:
        out = model.setdefault("ratios", {}).setdefault(target, {})
        out.update({k: X.ratios(p, progs["base"]) for k, p in progs.items()})
        if "msam" in progs and "sam" in progs:
          out["msam / sam"] = X.ratios(progs["msam"], progs["sam"])


def run(spec: Experiment, args: argparse.Namespace) -> None:
  """Compiles the sections asked for into ``results/compiled_steps.json``, keeping the other
  sections' results (and with ``--resume`` what the asked ones already have)."""
  path, smoke, keep = f"{args.out or schema.RESULTS}/{spec.name}", args.smoke, args.resume
  old = None if smoke else schema.read_results(path + ".json")
  details: dict[str, Any] = old["details"] if old else {}
  if "update" in args.sections:
    up = details.setdefault("update", {})
    for target in X.usable(["cpu"] if smoke else args.targets):
      up[target] = measure_update(target, SMOKE_WIDTHS if smoke else UPDATE_WIDTHS,
                                  8 if smoke else 64, up.get(target) if keep else None)
      _save(path, spec, details, smoke)
  train_targets = ["cpu"] if smoke else [t for t in args.targets if t != "cpu"]
  for target in X.usable(train_targets) if "train" in args.sections else []:
    for task in [t for t in spec.tasks if not args.models or t.example in args.models]:
      m = details.setdefault("train", {}).setdefault(task.example,
                                                     {"label": task.data, "targets": {}})
      progs = m["targets"].setdefault(target, {})
      for arm in [a for a in spec.arms if not (keep and a.label in progs)]:
        progs.pop(arm.label, None)
        if (result := _measure_or_record(m, task, arm, target)) is not None:
          progs[arm.label] = result
        print(f"train {task.example} {target} {arm.label}: done", flush=True)
        _save(path, spec, details, smoke)
  if "pod" in args.sections and not smoke and X.usable([POD]):
    done = (details.get("pod") or {}).get("programs", {}) if keep else {}
    arms = [a for a in spec.arms if a.label in POD_ARMS
            and a.label not in {n.split(" ")[0] for n in done}]
    pod = measure_pod(spec.tasks[0], arms, POD_BATCH)
    details["pod"] = {**pod, "programs": {**done, **pod["programs"]}}
  _save(path, spec, details, smoke)


def _save(path: str, spec: Experiment, details: dict[str, Any], smoke: bool) -> None:
  train_ratios(details.get("train", {}))
  seconds = [v for r in details.get("update", {}).values() for v in r["compile_seconds"].values()]
  seconds += [p["compile_seconds"] for m in details.get("train", {}).values()
              for progs in m["targets"].values() for p in progs.values()]
  seconds += [p["compile_seconds"] for p in (details.get("pod") or {}).get("programs", {}).values()]
  meta = {"command": f"python -m benchmarks {spec.name}" + " --smoke" * smoke,
          "versions": f"jax {jax.__version__}", "time_model": X.TIME_MODEL, "period": PERIOD,
          "train_targets": TRAIN_TARGETS, "compile_seconds": sum(seconds)}
  schema.write_results(path, benchmark=spec.name, meta=meta, details=details)


def update_table(update: dict[str, Any]) -> str:
  """A row per (program, target): its :data:`X.METRICS` over the AdamW step's."""
  targets = [t for t in X.TARGETS if t in update]
  rows = [[name, t, *X.metric_cells(t, {**update[t]["programs"], **update[t]["amortized"]}.get(
      name), update[t]["ratios"][name])] for name in update[targets[0]]["ratios"] for t in targets]
  return table(["program", "target", *X.METRICS], rows, "ll" + "r" * len(X.METRICS))


def train_table(trains: dict[str, Any]) -> str:
  notes = {a.label: a.note for a in SPEC.arms} | {"msam / sam": f"mSAM (m={MICRO}) / SAM"}
  rows = []
  for key in [a.label for a in SPEC.arms[1:]] + ["msam / sam"]:
    over, bound = TRAIN_TARGETS.get("msam" if key == "msam / sam" else key, ("", None))
    bound = None if key == "msam" else bound
    cells = []
    for m in trains.values():
      tpu, gpu, cpu = (m.get("ratios", {}).get(t, {}).get(key) for t in X.TARGETS)
      ok = "" if bound is None or not tpu else " ✓" if tpu["cycles"] <= bound else " ✗"
      parts = [tpu and f"{tpu['cycles']:.3f}{ok}", gpu and f"(H100 {gpu['h100_time']:.2f})",
               cpu and f"(CPU bytes {cpu['bytes']:.2f})"]
      cells.append(" ".join(p for p in parts if p) or "–")
    target = "" if bound is None else f"≤ {bound}×" + " SAM" * (over == "sam")
    rows.append([notes[key], target, *cells])
  return table(["optimizer", "target", *(m["label"] for m in trains.values())], rows,
               "ll" + "r" * len(trains))


def train_context(trains: dict[str, Any]) -> dict[str, str]:
  """The train section's sentences that state numbers: base steps, failures, cycle split."""
  base = [f"{m['label']}: {p['cycles']:.3g} cycles, {p['params']:,} params"
          for m in trains.values() if (p := m["targets"].get("tpu-v5e", {}).get("base"))]
  failed: dict[tuple[str, str, str, str], list[str]] = {}  # a sentence per model, target, error
  for m in trains.values():
    for key in ("errors", "fallbacks"):
      for t, errs in m.get(key, {}).items():
        for k, msg in errs.items():
          msg = re.sub(r"\.\d+\b|, metadata=\{[^}]*\}", "", msg)  # names and ids apart
          failed.setdefault((key, m["label"], t, msg), []).append(k)
  options = ", ".join(f"`{k}={v}`" for k, v in GPU_FALLBACK.items())
  errors = [f"{label}, {', '.join(arms)}, {t}: " + (
      f"does not compile (`{msg}`)." if key == "errors" else
      f"compiled with {options} (GEMMs as cuBLAS calls): with XLA's default options it does "
      f"not compile (`{msg}`).") for (key, label, t, msg), arms in failed.items()]
  split = []
  for m in trains.values():  # the steps without conditionals: every instruction runs once
    progs = m["targets"].get("tpu-v5e", {})
    for key in ("sam", "msam"):
      if "base" in progs and key in progs and not progs[key]["conditionals_executed"]:
        b, q = (progs[k]["kinds"][0]["cycle_breakdown"]["by_kind"] for k in ("base", key))
        split.append(f"{m['label']}, {key.upper()}: matmul and convolution fusions (`kOutput`) "
                     f"{q.get('kOutput', 0) / b['kOutput']:.2f}×, other fusions (`kLoop`) "
                     f"{q.get('kLoop', 0) / b['kLoop']:.2f}×")
  return {"base_steps": ", ".join(base) or "—", "errors": "\n\n".join(errors),
          "split": "; ".join(split) or "—"}


def pod_table(pod: dict[str, Any]) -> str:
  cell = lambda cs: "<br>".join(f"{c['opcode']} {c['shape']} × {c['count']:g}" for c in cs)
  base = pod["programs"].get("base", {}).get("collectives", [])
  return table(["step", "collectives"], [["base (AdamW)", cell(base) or "none"]] + [
      [f"{k}, beyond the base", cell(extra_collectives(p["collectives"], base)) or "none"]
      for k, p in pod["programs"].items() if k != "base"])


@renders("compiled_steps")
def render(doc: Any) -> dict[str, str]:
  d = doc["details"]
  text = fill("compiled_steps.md", {
      **doc["meta"], "minutes": doc["meta"]["compile_seconds"] / 60, "period": PERIOD,
      "update": next(iter(d["update"].values())), "update_table": update_table(d["update"]),
      "train_table": train_table(d["train"]), **train_context(d["train"]),
      "pod": d["pod"], "pod_table": pod_table(d["pod"]),
      "chips": math.prod(int(k) for k in d["pod"]["target"].split(":")[1].split("x"))})
  _, update, train, pod = re.split(r"\n(?=## )", text)  # the sections, each a docs block
  bold = lambda text: re.sub(r"^## (.*)$", r"**\1**", text, flags=re.M)
  return {"benchmarks/results/compiled_steps.md": text,
          "docs/performance.md#compiled-steps": bold(train + "\n" + update),
          "docs/multi_device.md#compiled-pod": bold(pod)}
