"""SAM, SAM every k, SALA, mSAM, GSAM and IRE as XLA:TPU and XLA:GPU compile them.

Nothing runs: every program is compiled deviceless (``_compiled``) and read from its
optimized HLO, against its base optimizer compiled the same way. Three sections:

* ``update``: one optimizer step (gradient(s) + update + ``apply_updates``) of an MLP with
  about 1e7 float32 parameters (widths 512-2048-2048-2048-10, batch 64), for ``tpu-v5e``,
  ``h100`` and ``cpu``: AdamW (the base); SAM (two gradients); SAM every k = 5 (its ascent
  step and its plain step, with the ``sam_hint`` the train loop passes and without a hint);
  SALA (k = 2: a stage-2 and a stage-1 cycle start and a cycle end, hinted and unhinted);
  mSAM (m = 8); GSAM.
* ``train``: the examples' ResNet, ViT and Llama train steps
  (``examples.common.train.step_function``, models and optimizers as
  ``benchmarks/bench_train_step.py`` builds them, with its sizes and batches) with every
  optimizer over its base, on ``tpu-v5e`` (the compiler's estimated cycles) and ``h100``
  (bytes and the time model). A step kind that occurs on some steps only is weighted by
  its frequency over 10 steps, with the hints the examples' loop passes: IRE (``grad_sq``,
  K = 10) = (refresh step + 9 plain steps) / 10, SALA (k = 2, every cycle in stage 2) =
  (cycle start + cycle end) / 2, SAM every k = 5 = (ascent + 4 plain steps) / 5.
* ``pod``: the data-parallel example's train step (``examples/data_parallel.py``, GSPMD)
  with FSDP-sharded parameters and optimizer state (every leaf split over the 16 chips
  along its first axis that divides by 16) and the batch split, compiled for a ``v5e:4x4``
  slice: the collectives of each step (opcode, dtype and shape, executions), for AdamW,
  IRE's refresh and plain steps, SAM and SALA.

A conditional's taken branch is added where a step takes it (``_compiled.analyze``
counts the plain path: every conditional executed, no branch's contents). Time model of
the H100 column: bytes / 3.35 TB/s + 4 µs per executed kernel + 10 µs per host round trip.

  python benchmarks/bench_compiled_steps.py                # everything (see the docs' runtime)
  python benchmarks/bench_compiled_steps.py --sections train --models llama --resume
  python benchmarks/bench_compiled_steps.py --smoke        # CPU only, toy sizes (the test)

``--resume`` keeps the programs already in the results file and compiles only the others
(train steps are slow to compile: a ResNet step takes minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import functools
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as C
import _compiled as X  # before any JAX backend starts: it sets JAX_PLATFORMS
import bench_train_step as T
import jax
import jax.numpy as jnp
import optax

import ire_optax
from examples.common import cli, optim, train

NAME = "compiled_steps"
SECTIONS = ("update", "train", "pod")
UPDATE_WIDTHS = (512, 2048, 2048, 2048, 10)  # 9.5e6 parameters
UPDATE_BATCH = 64
SMOKE_WIDTHS = (16, 32, 32, 10)
EVERY_K, SALA_K, MICRO = 5, 2, 8
PERIOD = 10  # steps over which the occasional work is amortized (IRE's K, 2 SALA k, 2 SAM k)
POD = "v5e:4x4"
POD_BATCH = 128
# Targets on the examples' train steps, by TPU v5e estimated cycles over the base step.
TRAIN_TARGETS = {"ire_grad_sq": ("base", 1.03), "sam": ("base", 2.05), "msam": ("sam", 1.05),
                 "sala": ("base", 1.55)}
SMOKE_OPTS = ("base", "ire_grad_sq", "sala")
TRAIN_OPTS = ("base", "ire_grad_sq", "sam", "asam", "msam", "sala", "gsam", "sam_every_k")
TIME_MODEL = ("H100: bytes / 3.35 TB/s + 4 us per executed kernel + 10 us per host round "
              "trip; TPU v5e: the sum of the compiler's estimated_cycles of the executed "
              "instructions")

# -----------------------------------------------------------------------------
# Reading a compiled step
# -----------------------------------------------------------------------------


def taken(compiled: Any, picks: Callable[[int], list[int]] | None = None) -> X.Analysis:
  """The cost of a step that takes, of its ``n`` conditionals in program order, the branches
  ``picks(n)`` (default: none taken, i.e. each conditional's false branch)."""
  a = X.analyze(compiled)
  n = len(a.conditionals)
  p = picks(n) if picks is not None else [0] * n
  assert len(p) == n, (p, n)
  for branches, i in zip(list(a.conditionals), p, strict=True):
    a = a + branches[min(i, len(branches) - 1)]
  return a


def last_taken(n: int) -> list[int]:
  """SALA's cycle end: its end-of-cycle conditional (the last, it consumes the step) is
  taken, every other (the SAM gradient of a cycle start) is not."""
  return [0] * (n - 1) + [1] if n else []


def first_taken(n: int) -> list[int]:
  """An unhinted ascent step: the first conditional (the SAM gradient) is taken."""
  return [1] + [0] * (n - 1) if n else []


def cycle_breakdown(text: str, top: int = 6) -> dict[str, Any]:
  """Where a TPU program's estimated cycles go: per fusion kind (``kOutput``: matmuls and
  convolutions; ``kLoop``/``kInput``: elementwise and reductions) or opcode, and its
  costliest instructions with the JAX operation they come from (loop bodies counted once)."""
  by_kind: collections.Counter = collections.Counter()
  rows = []
  for line in text.splitlines():
    m = re.search(r'"estimated_cycles":"(\d+)"', line)
    ins = X._parse_instruction(line) if m else None
    if ins is None:
      continue
    cycles = int(m.group(1))  # type: ignore[union-attr]
    kind = re.search(r"kind=(k\w+)", ins.attrs)
    by_kind[kind.group(1) if kind and ins.opcode == "fusion" else ins.opcode] += cycles
    op = re.search(r'op_name="([^"]*)"', line)
    rows.append((cycles, ins.name, op.group(1)[-90:] if op else ""))
  rows.sort(reverse=True)
  return {"by_kind": dict(by_kind.most_common()),
          "top": [{"cycles": c, "name": n, "op_name": o} for c, n, o in rows[:top]]}


def record(a: X.Analysis, params: int) -> dict[str, Any]:
  s = a.summary()
  s["h100_seconds"] = X.h100_seconds(a)
  s["bytes_per_param"] = a.bytes / params
  return s


def mix(parts: list[tuple[float, dict[str, Any]]]) -> dict[str, Any]:
  """The weighted sum of records (a step kind's share of the steps times its cost)."""
  keys = ("bytes", "kernels", "conditionals_executed", "host_round_trips", "cycles",
          "h100_seconds", "bytes_per_param")
  return {k: sum(w * p[k] for w, p in parts) for k in keys}


def ratio(p: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
  return {"bytes": p["bytes"] / base["bytes"],
          "cycles": p["cycles"] / base["cycles"] if base["cycles"] else None,
          "h100_time": p["h100_seconds"] / base["h100_seconds"]}


def _compile_seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


# -----------------------------------------------------------------------------
# Section "update": one optimizer step of an MLP
# -----------------------------------------------------------------------------


def mlp_params(widths: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
  p = {}
  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=False)):
    p[f"w{i}"] = jax.ShapeDtypeStruct((a, b), jnp.float32)
    p[f"b{i}"] = jax.ShapeDtypeStruct((b,), jnp.float32)
  return p


def mlp_loss(params: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
  x = batch["x"]
  n = len(params) // 2
  for i in range(n):
    x = x @ params[f"w{i}"] + params[f"b{i}"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return optax.softmax_cross_entropy_with_integer_labels(x, batch["y"]).mean()


def update_step(tx: optax.GradientTransformation, kind: str, hints: dict[str, Any]):
  """``(params, state, batch) -> (params, state)``: the clean gradient, ``tx``'s update with
  what its family needs (``kind``: ``"plain"``, ``"sam"``, ``"msam"``) and ``hints``."""
  grad = jax.grad(mlp_loss)

  def step(params, state, batch):
    if kind == "msam":
      updates, state = tx.update(None, state, params, grad_fn=grad, batch=batch, **hints)
    else:
      extra = {"grad_fn": lambda q: grad(q, batch)} if kind == "sam" else {}
      updates, state = tx.update(grad(params, batch), state, params, **extra, **hints)
    return optax.apply_updates(params, updates), state

  return step


def update_programs() -> list[tuple[str, str, Any, str, dict[str, Any], Any]]:
  """``(program, compile key, transformation factory, kind, hints, picks)``: programs that
  share a compile key are read from the same compiled step."""
  adamw = lambda: optax.adamw(1e-3)
  sam = lambda: ire_optax.sam(adamw(), rho=0.05)
  samk = lambda: ire_optax.sam(adamw(), rho=0.05, every_k=EVERY_K)
  sala = lambda: ire_optax.sala(adamw(), sync_period=SALA_K, rho=0.2)
  msam = lambda: ire_optax.msam(adamw(), rho=0.05, num_microbatches=MICRO)
  gsam = lambda: ire_optax.gsam(adamw(), rho=0.05)
  on, off = {"sam_hint": True}, {"sam_hint": False}
  return [
      ("adamw", "adamw", adamw, "plain", {}, None),
      ("sam", "sam", sam, "sam", {}, None),
      ("sam k=5 ascent, hinted", "samk on", samk, "sam", on, None),
      ("sam k=5 plain, hinted", "samk off", samk, "sam", off, None),
      ("sam k=5 ascent, unhinted", "samk", samk, "sam", {}, first_taken),
      ("sam k=5 plain, unhinted", "samk", samk, "sam", {}, None),
      # The loop's hints: the SAM step on a cycle start, the end of cycle on its end.
      ("sala start, hinted", "sala on", sala, "sam", {**on, "cycle_end_hint": False}, None),
      ("sala end, hinted", "sala off", sala, "sam", {**off, "cycle_end_hint": True},
       last_taken),
      ("sala stage-2 start, unhinted", "sala", sala, "sam", {}, first_taken),
      ("sala stage-1 start, unhinted", "sala", sala, "sam", {}, None),
      ("sala end, unhinted", "sala", sala, "sam", {}, last_taken),
      (f"msam m={MICRO}", "msam", msam, "msam", {}, None),
      ("gsam", "gsam", gsam, "sam", {}, None),
  ]


def measure_update(target: str, widths: tuple[int, ...], batch: int,
                   done: dict[str, Any] | None = None) -> dict[str, Any]:
  params = mlp_params(widths)
  n = sum(x.size for x in params.values())
  data = {"x": jax.ShapeDtypeStruct((batch, widths[0]), jnp.float32),
          "y": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  res = done or {"target": target, "params": n, "batch": batch, "programs": {},
                 "compile_seconds": {}}
  compiled: dict[str, Any] = {}
  for name, key, make, kind, hints, picks in update_programs():
    if name in res["programs"]:
      continue
    if key not in compiled:
      tx = make()
      state = jax.eval_shape(tx.init, params)
      compiled[key], res["compile_seconds"][key] = _compile_seconds(functools.partial(
          X.compile_fn, update_step(tx, kind, hints), params, state, data, target=target,
          donate_argnums=(0, 1)))
    res["programs"][name] = record(taken(compiled[key], picks), n)
  progs = res["programs"]
  res["amortized"] = {
      f"sala k={SALA_K}, stage 2, hinted": mix([(0.5, progs["sala start, hinted"]),
                                                (0.5, progs["sala end, hinted"])]),
      f"sala k={SALA_K}, stage 2, unhinted": mix([(0.5, progs["sala stage-2 start, unhinted"]),
                                                  (0.5, progs["sala end, unhinted"])]),
      f"sam k={EVERY_K}, hinted": mix([(1 / EVERY_K, progs["sam k=5 ascent, hinted"]),
                                       (1 - 1 / EVERY_K, progs["sam k=5 plain, hinted"])]),
      f"sam k={EVERY_K}, unhinted": mix([(1 / EVERY_K, progs["sam k=5 ascent, unhinted"]),
                                         (1 - 1 / EVERY_K, progs["sam k=5 plain, unhinted"])]),
  }
  base = progs["adamw"]
  res["ratios"] = {k: ratio(p, base) for k, p in {**progs, **res["amortized"]}.items()}
  res["ratios"][f"msam m={MICRO} / sam"] = ratio(progs[f"msam m={MICRO}"], progs["sam"])
  return res


# -----------------------------------------------------------------------------
# Section "train": the examples' train steps
# -----------------------------------------------------------------------------


def example_parts(model: T.Model, opt: T.Opt, batch_size: int | None = None):
  """``(graphdef, spec, state, batch, num_classes)`` of the example's train step for ``opt``:
  the command line parsed as ``bench_train_step`` does, state and batch as shapes."""
  base = cli.get_config(model.example).optimizer.base
  argv = ["--opt", base, "--warmup-steps", "0", *model.argv, *opt.argv]
  if opt.argv[:1] == ("--opt",):
    argv += ["--base", base]
  if batch_size is not None:
    argv += ["--batch-size", str(batch_size)]
  args = cli.parse(model.example, argv)
  graphdef, params, stats = train.split_model(T.build_model(model, args))
  spec = optim.build_optimizer(args.optimizer, 10_000, seed=args.seed, model_stats=stats)
  state = train.TrainState(params, stats, jax.eval_shape(spec.tx.init, params))
  b = args.batch_size
  if model.example == "llama":
    tokens = jax.ShapeDtypeStruct((b, model.seq_len), jnp.int32)
    return graphdef, spec, state, {"x": tokens, "y": tokens}, model.vocab
  return graphdef, spec, state, {"x": jax.ShapeDtypeStruct((b, *model.image_shape), jnp.float32),
                                 "y": jax.ShapeDtypeStruct((b,), jnp.int32)}, model.num_classes


def step_kinds(spec: optim.OptSpec, opt: T.Opt) -> list[tuple[float, tuple, Any]]:
  """``(share of the steps, hints, picks)`` of each kind of step over ``PERIOD`` steps, with
  the hints the examples' loop passes (``spec.hints``) and the branches each step takes."""
  if spec.hints is None:
    return [(1.0, (), None)]
  kinds: dict[tuple, list] = {}
  for t in range(PERIOD):
    hints = spec.hints(t)
    # SALA's cycle end runs its end-of-cycle branch; every other hinted-off step takes no
    # branch (IRE's plain step, SAM-every-k's plain step).
    picks = last_taken if spec.sala and t % SALA_K == SALA_K - 1 else None
    key = (hints, picks)
    kinds.setdefault(key, [0, hints, picks])[0] += 1
  assert not spec.sala or "--sala-sync-period" in opt.argv
  return [(c / PERIOD, h, p) for c, h, p in kinds.values()]


def measure_train(model: T.Model, opt: T.Opt, target: str) -> dict[str, Any]:
  graphdef, spec, state, batch, num_classes = example_parts(model, opt)
  fn = train.step_function(graphdef, spec, num_classes=num_classes)
  n = sum(x.size for x in jax.tree.leaves(state.params))
  step = jax.ShapeDtypeStruct((), jnp.int32)
  parts, kinds, seconds = [], [], 0.0
  for share, hints, picks in step_kinds(spec, opt):
    c, s = _compile_seconds(lambda h=hints: X.compile_fn(
        functools.partial(fn, hints=h), state, batch, step, target=target, donate_argnums=0))
    seconds += s
    r = record(taken(c, picks), n)
    if target == "tpu-v5e":
      r["cycle_breakdown"] = cycle_breakdown(c.as_text())
    parts.append((share, r))
    kinds.append({"share": share, "hints": dict(hints), **r})
  return {"params": n, "batch": batch["x"].shape[0], **mix(parts), "kinds": kinds,
          "compile_seconds": seconds}


def train_ratios(res: dict[str, Any]) -> None:
  """Adds each optimizer's ratios over its base (and mSAM's over SAM) to ``res``."""
  for model in res.values():
    for target, progs in model["targets"].items():
      if "base" not in progs:
        continue
      out = model.setdefault("ratios", {}).setdefault(target, {})
      for key, p in progs.items():
        out[key] = ratio(p, progs["base"])
      if "msam" in progs and "sam" in progs:
        out["msam / sam"] = ratio(progs["msam"], progs["sam"])


# -----------------------------------------------------------------------------
# Section "pod": the FSDP-sharded data-parallel train step on a v5e:4x4 slice
# -----------------------------------------------------------------------------


def fsdp_spec(shape: tuple[int, ...], devices: int, axis: str = "data") -> Any:
  """Split the first axis that divides by ``devices``; replicate what has none."""
  P = jax.sharding.PartitionSpec
  for i, d in enumerate(shape):
    if d % devices == 0 and d >= devices:
      return P(*([None] * i + [axis]))
  return P()


def pod_step(model: T.Model, opt: T.Opt, target: str, batch_size: int):
  """The compiled GSPMD train step of each step kind, state FSDP-sharded over ``target``."""
  graphdef, spec, state, batch, num_classes = example_parts(model, opt, batch_size)
  mesh = X.mesh(target, ("data",))
  devs = mesh.devices.size
  NS = jax.sharding.NamedSharding
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NS(mesh, fsdp_spec(x.shape, devs))), state)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NS(mesh, jax.sharding.PartitionSpec("data"))), batch)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NS(mesh, jax.sharding.PartitionSpec()))
  fn = train.step_function(graphdef, spec, num_classes=num_classes)
  out = []
  for share, hints, picks in step_kinds(spec, opt):
    c = X.compile_fn(functools.partial(fn, hints=hints), state, batch, step, target=target,
                     place_args=False, donate_argnums=0)
    out.append((share, dict(hints), picks, c))
  return out


def collectives(compiled: Any, picks: Any = None) -> list[dict[str, Any]]:
  """The executed collectives of a step (branches per ``picks``): opcode, result shape,
  executions, grouped."""
  a = taken(compiled, picks)
  module = X.parse_hlo(compiled.as_text())
  shapes = {i.name: i.shape for ins in module.computations.values() for i in ins}
  names = [n for n, op, *_ in a.kernel_bytes
           if (op[:-6] if op.endswith("-start") else op) in X.COLLECTIVES]
  assert len(names) == len(a.collectives), (len(names), len(a.collectives))
  groups: dict[tuple[str, str], list[float]] = {}
  for name, c in zip(names, a.collectives, strict=True):
    shape = re.sub(r"\{[^}]*\}", "", shapes[name])  # layouts off
    g = groups.setdefault((c.opcode, shape), [0.0, c.bytes])
    g[0] += c.count
  return [{"opcode": op, "shape": shape, "count": cnt, "bytes": b}
          for (op, shape), (cnt, b) in sorted(groups.items())]


def measure_pod(target: str, model: T.Model, opts: list[T.Opt], batch_size: int,
                ) -> dict[str, Any]:
  res: dict[str, Any] = {"target": target, "model": model.label, "batch": batch_size,
                         "programs": {}}
  for opt in opts:
    t0 = time.perf_counter()
    steps = pod_step(model, opt, target, batch_size)
    seconds = (time.perf_counter() - t0) / len(steps)
    for share, hints, picks, c in steps:
      name = opt.key + ("" if not hints else " " + ",".join(
          f"{k}={v}" for k, v in hints.items()))
      res["programs"][name] = {"share": share, "hints": hints, "compile_seconds": seconds,
                               "collectives": collectives(c, picks)}
    print(f"  pod {opt.key}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  return res


def extra_collectives(prog: list[dict[str, Any]], base: list[dict[str, Any]]
                      ) -> list[dict[str, Any]]:
  """What ``prog`` executes beyond ``base``: per (opcode, shape), the surplus executions."""
  have = {(c["opcode"], c["shape"]): c["count"] for c in base}
  out = []
  for c in prog:
    more = c["count"] - have.get((c["opcode"], c["shape"]), 0.0)
    if more > 0:
      out.append({**c, "count": more})
  return out


# -----------------------------------------------------------------------------
# Tables
# -----------------------------------------------------------------------------


def _fmt(r: dict[str, float | None], target: str) -> str:
  if target == "tpu-v5e" and r["cycles"] is not None:
    return f"{r['cycles']:.2f} ({r['bytes']:.2f} B)"
  if target == "h100":
    return f"{r['h100_time']:.2f} ({r['bytes']:.2f} B)"
  return f"{r['bytes']:.2f} B"


def update_markdown(update: dict[str, Any]) -> list[str]:
  targets = [t for t in X.TARGETS if t in update]
  if not targets:
    return []
  any_r = update[targets[0]]
  lines = [
      f"## One optimizer step of an MLP ({any_r['params'] / 1e6:.1f}M parameters, batch "
      f"{any_r['batch']}), over AdamW's step", "",
      "Each step: the clean gradient, the optimizer's update (its own extra gradients "
      "included) and `apply_updates`. Cells: TPU v5e estimated cycles, H100 time model, and "
      "(B) bytes, each over the AdamW step's; `rt`: host round trips of the step on H100 "
      "(XLA:GPU reads a conditional's predicate on the host), `cond`: conditionals executed.",
      "", "| program | " + " | ".join(targets) + " | H100 kernels | rt | cond |",
      "|---|" + "---:|" * (len(targets) + 3)]
  names = list(any_r["ratios"])
  for name in names:
    cells = [_fmt(update[t]["ratios"][name], t) for t in targets]
    h = update.get("h100")
    p = None
    if h is not None:
      p = h["programs"].get(name) or h["amortized"].get(name)
    extra = (["–"] * 3 if p is None else
             [f"{p['kernels']:.0f}", f"{p['host_round_trips']:.1f}".rstrip("0").rstrip("."),
              f"{p['conditionals_executed']:.1f}".rstrip("0").rstrip(".")])
    lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(extra) + " |")
  return lines + [""]


def train_markdown(trains: dict[str, Any]) -> list[str]:
  if not trains:
    return []
  models = list(trains)
  lines = ["## The examples' train steps over their base step", "",
           "Cells: TPU v5e estimated cycles over the base step's (and the H100 time model's "
           "ratio, where compiled), amortized over 10 steps with the examples' branch hints; "
           "✓/✗: the target by TPU v5e cycles; –: not compiled yet.", "",
           "| optimizer | target | " + " | ".join(
               f"{trains[m]['label']}" for m in models) + " |",
           "|---|---|" + "---:|" * len(models)]
  keys = [k for k in TRAIN_OPTS if k != "base"] + ["msam / sam"]
  for key in keys:
    tgt = TRAIN_TARGETS.get(key if key != "msam / sam" else "msam")
    if key == "msam":
      tgt = None
    cells = []
    for m in models:
      rs = trains[m].get("ratios", {})
      tpu, gpu, cpu = (rs.get(t, {}).get(key) for t in ("tpu-v5e", "h100", "cpu"))
      parts = []
      if tpu:
        ok = "" if tgt is None else (" ✓" if tpu["cycles"] <= tgt[1] else " ✗")
        parts.append(f"{tpu['cycles']:.3f}{ok}")
      if gpu:
        parts.append(f"(H100 {gpu['h100_time']:.2f})")
      if cpu:
        parts.append(f"(CPU bytes {cpu['bytes']:.2f})")
      cells.append(" ".join(parts) or "–")
    label = {"ire_grad_sq": "IRE (grad_sq, K=10)", "sam_every_k": f"SAM every k={EVERY_K}",
             "msam": f"mSAM (m={MICRO})", "msam / sam": f"mSAM (m={MICRO}) / SAM",
             "sala": f"SALA (k={SALA_K}, stage 2)"}.get(key, key.upper())
    t = "" if tgt is None else f"≤ {tgt[1]}×" + (" SAM" if tgt[0] == "sam" else "")
    lines.append(f"| {label} | {t} | " + " | ".join(cells) + " |")
  base_cycles = ", ".join(
      f"{trains[m]['label']}: {trains[m]['targets']['tpu-v5e']['base']['cycles']:.3g} cycles, "
      f"{trains[m]['targets']['tpu-v5e']['base']['params']:,} params"
      for m in models if "base" in trains[m]["targets"].get("tpu-v5e", {}))
  lines += ["", f"Base steps (TPU v5e): {base_cycles}.", ""]
  for m in models:
    for target, errs in trains[m].get("errors", {}).items():
      for key, msg in errs.items():
        lines += [f"{trains[m]['label']}, {key}, {target}: does not compile (`{msg}`).", ""]
  # Where the cycles go, for the steps without conditionals (a breakdown counts every
  # instruction of the program once, branches included).
  split = []
  for m in models:
    progs = trains[m]["targets"].get("tpu-v5e", {})
    base = progs.get("base")
    for key in ("sam", "msam"):
      p = progs.get(key)
      if base is None or p is None or p["conditionals_executed"]:
        continue
      b, q = (x["kinds"][0]["cycle_breakdown"]["by_kind"] for x in (base, p))
      split.append(f"{trains[m]['label']}, {key.upper()}: matmul and convolution fusions "
                   f"(`kOutput`) {q.get('kOutput', 0) / b['kOutput']:.2f}×, other fusions "
                   f"(`kLoop`) {q.get('kLoop', 0) / b['kLoop']:.2f}×")
  if split:
    lines += ["TPU v5e cycles by kind of fusion, over the base step's: " + "; ".join(split)
              + ".", ""]
  return lines


def pod_markdown(pod: dict[str, Any] | None) -> list[str]:
  if not pod:
    return []
  progs = pod["programs"]
  base = progs.get("base", {}).get("collectives", [])
  lines = [f"## Collectives per step on a {pod['target']} slice (16 chips), FSDP", "",
           f"{pod['model']}, global batch {pod['batch']}: parameters and optimizer state "
           "split over the chips along their first axis that divides by 16, the batch split; "
           "the examples' train step under `jax.jit` (GSPMD). Per step: each collective "
           "(opcode and result shape) × executions; for the other steps, what they execute "
           "beyond the AdamW step.", "",
           "| step | collectives |", "|---|---|"]

  def cell(cs: list[dict[str, Any]]) -> str:
    return "<br>".join(f"{c['opcode']} {c['shape']} × {c['count']:g}" for c in cs) or "none"

  lines.append(f"| base (AdamW) | {cell(base)} |")
  for name, p in progs.items():
    if name != "base":
      extra = extra_collectives(p["collectives"], base)
      lines.append(f"| {name}, beyond the base | {cell(extra)} |")
  return lines + [""]


def markdown(meta: dict[str, Any], details: dict[str, Any]) -> str:
  lines = ["# Sharpness-aware optimizers and IRE compiled for TPU v5e and H100", "",
           f"Written by `benchmarks/bench_compiled_steps.py` (`{meta['command']}`; "
           f"{meta['compile_seconds'] / 60:.0f} min of compiling in all); {meta['versions']}. "
           "Nothing runs: each program is compiled deviceless and read from its optimized HLO "
           "(`benchmarks/_compiled.py`). "
           f"Time model: {meta['time_model']}.", ""]
  lines += update_markdown(details.get("update", {}))
  lines += train_markdown(details.get("train", {}))
  lines += pod_markdown(details.get("pod"))
  return "\n".join(lines)


def rows_of(details: dict[str, Any]) -> list[C.Row]:
  rows = []
  for target, r in details.get("update", {}).items():
    for name, rr in r["ratios"].items():
      for metric in ("cycles", "h100_time", "bytes"):
        if rr[metric] is None or (metric == "h100_time") != (target == "h100"):
          continue
        if metric == "cycles" and target != "tpu-v5e":
          continue
        rows.append(C.Row(optimizer=name, task=f"MLP {r['params']:.1e} params, {target}",
                          metric=f"compiled_{metric}_ratio", value=rr[metric], base="AdamW",
                          what="optimizer step", source="bench_compiled_steps",
                          interleaved=False))
  for model in details.get("train", {}).values():
    for target, rs in model.get("ratios", {}).items():
      for key, rr in rs.items():
        metric = "cycles" if target == "tpu-v5e" else "h100_time"
        if key == "base" or rr[metric] is None:
          continue
        rows.append(C.Row(optimizer=key, task=f"{model['label']}, {target}",
                          metric=f"compiled_{metric}_ratio", value=rr[metric],
                          base="SAM" if key == "msam / sam" else model["base_name"],
                          what="train step", source="bench_compiled_steps",
                          interleaved=False))
  return rows


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
  """``new`` over ``old``, dicts merged key by key down to the programs' records."""
  out = dict(old)
  for k, v in new.items():
    deeper = isinstance(v, dict) and isinstance(out.get(k), dict) and not _is_record(v)
    out[k] = merge(out[k], v) if deeper else v
  return out


def _is_record(d: dict[str, Any]) -> bool:
  return "bytes" in d or "collectives" in d


def total_compile_seconds(details: dict[str, Any]) -> float:
  total = sum(sum(r.get("compile_seconds", {}).values())
              for r in details.get("update", {}).values())
  total += sum(p.get("compile_seconds", 0.0) for m in details.get("train", {}).values()
               for progs in m["targets"].values() for p in progs.values())
  total += sum(p.get("compile_seconds", 0.0)
               for p in (details.get("pod") or {}).get("programs", {}).values())
  return total


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
  p.add_argument("--targets", nargs="+", default=["tpu-v5e", "h100", "cpu"],
                 help="update section (%(default)s); the train section: tpu-v5e and h100")
  p.add_argument("--models", default="resnet,vit,llama")
  p.add_argument("--opts", default=",".join(TRAIN_OPTS), help="train-section optimizers")
  p.add_argument("--train-targets", nargs="+", default=["tpu-v5e", "h100"])
  p.add_argument("--resume", action="store_true",
                 help="keep what the results file has; compile only the missing programs")
  p.add_argument("--smoke", action="store_true",
                 help="CPU only, toy sizes, no pod slice, results to --out (seconds)")
  p.add_argument("--out", default=str(C.RESULTS / NAME))
  args = p.parse_args(argv)
  smoke = args.smoke
  prev = C.read_results(args.out + ".json") if args.resume else None
  details: dict[str, Any] = (prev or {}).get("details") or {}

  def usable(targets):
    ok = [t for t in targets if X.available(t) is None]
    for t in set(targets) - set(ok):
      print(f"skipping {t}: {X.available(t)}", file=sys.stderr)
    return ok

  def save():
    # Several runs (e.g. one per section) may share the results file: merge under a lock.
    with open(Path(tempfile.gettempdir()) / f"{Path(args.out).name}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      on_disk = C.read_results(args.out + ".json") if Path(args.out + ".json").exists() else None
      merged = merge((on_disk or {}).get("details") or {}, details) if not smoke else details
      train_ratios(merged.get("train", {}))
      # Runs merge into one file: the command is the whole script's (or the smoke run's).
      command = "python benchmarks/bench_compiled_steps.py" + (" --smoke" if smoke else "")
      meta = {"command": command, "versions": f"jax {jax.__version__}",
              "time_model": TIME_MODEL, "period": PERIOD, "train_targets": TRAIN_TARGETS,
              "compile_seconds": total_compile_seconds(merged)}
      C.write_results(args.out, benchmark="bench_compiled_steps", meta=meta,
                      rows=rows_of(merged), details=merged, markdown=markdown(meta, merged))
    return merged

  if "update" in args.sections:
    widths, batch = (SMOKE_WIDTHS, 8) if smoke else (UPDATE_WIDTHS, UPDATE_BATCH)
    up = details.setdefault("update", {})
    for target in usable(["cpu"] if smoke else args.targets):
      t0 = time.perf_counter()
      up[target] = measure_update(target, widths, batch, up.get(target))
      print(f"update {target}: " + ", ".join(
          f"{k} {v['cycles'] or v['h100_time'] if target != 'cpu' else v['bytes']:.2f}"
          for k, v in up[target]["ratios"].items()) + f" ({time.perf_counter() - t0:.0f} s)",
          flush=True)
      save()

  if "train" in args.sections:
    table = T.SMOKE_MODELS if smoke else T.MODELS
    opts = {o.key: o for o in T.optimizers(True)}
    keys = [k for k in (SMOKE_OPTS if smoke else args.opts.split(",")) if k in opts]
    trains = details.setdefault("train", {})
    for target in usable(["cpu"] if smoke else args.train_targets):
      for name in ["llama"] if smoke else args.models.split(","):
        model = table[name]
        m = trains.setdefault(name, {"label": model.label, "targets": {}, "base_name":
                                     T.base_label(cli.get_config(model.example).optimizer.base)})
        progs = m["targets"].setdefault(target, {})
        for key in keys:
          if key in progs:
            continue
          try:
            progs[key] = measure_train(model, opts[key], target)
          except jax.errors.JaxRuntimeError as e:  # a compiler's failure is a result too
            m.setdefault("errors", {}).setdefault(target, {})[key] = str(e).split("\n")[0][:300]
            print(f"train {name} {target} {key}: {e}", file=sys.stderr, flush=True)
            save()
            continue
          print(f"train {name} {target} {key}: cycles {progs[key]['cycles']:.4g}, bytes "
                f"{progs[key]['bytes']:.4g} ({progs[key]['compile_seconds']:.0f} s)",
                file=sys.stderr, flush=True)
          save()

  if "pod" in args.sections and not smoke and usable([POD]):
    opts = {o.key: o for o in T.optimizers(True)}
    done = details.get("pod") or {}
    want = [opts[k] for k in ("base", "ire_grad_sq", "sam", "sala")
            if not any(n.split(" ")[0] == k for n in done.get("programs", {}))]
    if want:
      new = measure_pod(POD, T.MODELS["llama"], want, POD_BATCH)
      if done:
        done["programs"].update(new["programs"])
      details["pod"] = done or new
      save()
  merged = save()
  print(markdown({"command": "", "versions": "", "time_model": TIME_MODEL,
                  "compile_seconds": total_compile_seconds(merged)}, merged))
  return 0


if __name__ == "__main__":
  sys.exit(main())
