"""Train-step time of every optimizer over its base, on the examples' own train steps.

The step timed is the one ``python -m examples.{resnet,vit,llama}`` runs: the
command line is parsed by ``examples.common.cli.make_parser``, the optimizer
built by ``examples.common.optim.build_optimizer`` and the step by
``examples.common.train.make_train_step`` (logging metrics, BatchNorm
statistics and the per-step host decisions of the training loop included).
Batches are random inputs of the examples' shapes (timing does not depend on
the data).

Per model, every optimizer runs blocks of 10 consecutive steps (one IRE
refresh cycle, five SALA cycles), interleaved in a rotating order, for
``--reps`` repetitions in one process; the table gives the median over
repetitions of the block time divided by the base optimizer's block time of
the same repetition (``_common.time_interleaved``).

``--selection-methods`` also times IRE (grad_sq) with each counting method of
its refresh besides the default (``"auto"``, pure XLA): the opt-in native CPU
kernel and ``"threshold"`` (``results/train_step_selection.md``).

Targets (on each model): IRE (every estimator) <= 1.15x its base, SAM/ASAM
<= 2.1x, mSAM (m=8) <= 1.1x SAM, SALA (k=2, every cycle in stage 2) <= 1.6x.

Usage::

  python benchmarks/bench_train_step.py --lock LOCKFILE   # compiles ~15 steps per model
  python benchmarks/bench_train_step.py --smoke            # toy sizes (the tests)
  python benchmarks/bench_train_step.py --lock LOCKFILE --selection-methods \
      --only ire_grad_sq,ire_grad_sq_native,ire_grad_sq_threshold  # the refresh's methods

``--lock`` holds an exclusive ``flock`` on a file while timing only (not while
compiling), so that timings of several benchmarks never overlap; ``--part``
writes one model's measurements and ``--merge`` the table from several parts
(one process per model, run side by side).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import sys
import time
from pathlib import Path

import _common as C
import jax
import numpy as np
import optax

import ire_optax
from examples.common import cli, models, optim, train
from examples.common.config import TrainConfig

NAME = "train_step"
STEPS_PER_BLOCK = 10


@dataclasses.dataclass(frozen=True)
class Model:
  example: str  # "resnet" | "vit" | "llama"
  label: str
  argv: tuple[str, ...]
  image_shape: tuple[int, int, int] = (32, 32, 3)
  num_classes: int = 10
  seq_len: int = 0
  vocab: int = 0


MODELS = {
    "resnet": Model("resnet", "ResNet-8 w16 (32x32x3, batch 64)",
                    ("--size", "toy", "--width", "16", "--batch-size", "64")),
    "vit": Model("vit", "ViT mini (32x32x3, patch 4, batch 64)",
                 ("--size", "mini", "--patch-size", "4", "--batch-size", "64")),
    "llama": Model("llama", "Llama mini (seq 128, batch 16, vocab 96)",
                   ("--size", "mini", "--seq-len", "128", "--batch-size", "16"),
                   seq_len=128, vocab=96),
}
SMOKE_MODELS = {
    "resnet": Model("resnet", "ResNet-8 w4 (8x8x1, batch 16)",
                    ("--size", "toy", "--batch-size", "16"), image_shape=(8, 8, 1)),
    "vit": Model("vit", "ViT toy (8x8x1, batch 16)", ("--size", "toy", "--batch-size", "16"),
                 image_shape=(8, 8, 1)),
    "llama": Model("llama", "Llama toy (seq 16, batch 8)",
                   ("--size", "toy", "--seq-len", "16", "--batch-size", "8"), seq_len=16,
                   vocab=32),
}


@dataclasses.dataclass(frozen=True)
class Opt:
  key: str
  label: str  # optimizer label in the table ("{base}" is replaced by the base's name)
  variant: str
  argv: tuple[str, ...]
  target: float | None = None  # max time / base (None: no target)
  target_over: str = "base"  # the key the target ratio is relative to
  models: tuple[str, ...] = ()  # only on these models (empty: all)
  method: str = "auto"  # the selection method the step is traced with (IRE's refresh)


def optimizers(gsam: bool, selection: bool = False) -> list[Opt]:
  """The optimizers timed; ``gsam``: also GSAM and SAM every k; ``selection``: also IRE
  (grad_sq) with each non-default counting method of the refresh."""
  ire = ("--ire-refresh-every", "10", "--ire-warmup", "0")
  grad_sq = ("--ire", "--ire-curvature", "grad_sq") + ire
  opts = [
      Opt("base", "{base}", "", ()),
      Opt("ire_grad_sq", "{base}+IRE", "grad_sq", grad_sq, 1.15),
      Opt("ire_fisher", "{base}+IRE", "fisher", ("--ire", "--ire-curvature", "fisher") + ire,
          1.15),
      Opt("ire_hutchinson", "{base}+IRE", "hutchinson",
          ("--ire", "--ire-curvature", "hutchinson") + ire, 1.15),
      Opt("sam", "SAM", "", ("--opt", "sam"), 2.1),
      Opt("asam", "ASAM", "", ("--opt", "asam"), 2.1),
      Opt("msam", "mSAM", "m=8", ("--opt", "msam", "--num-microbatches", "8"), 1.1, "sam"),
      # rho large enough that every cycle is in stage 2 (the radius does not change the cost)
      Opt("sala", "SALA", "k=2", ("--opt", "sala", "--sala-sync-period", "2", "--rho", "5"),
          1.6),
      Opt("lookahead", "Lookahead", "k=5", ("--opt", "lookahead", "--la-sync-period", "5")),
      # The same steps without the host's branch hints (occasional work in lax.cond):
      Opt("ire_fisher_cond", "{base}+IRE", "fisher, lax.cond",
          ("--ire", "--ire-curvature", "fisher", "--branch-hints", "off") + ire,
          models=("resnet",)),
      Opt("sala_cond", "SALA", "k=2, lax.cond",
          ("--opt", "sala", "--sala-sync-period", "2", "--rho", "5", "--branch-hints", "off"),
          models=("resnet",)),
      Opt("msam_vmap", "mSAM", "m=8, vmap",
          ("--opt", "msam", "--num-microbatches", "8", "--microbatch-mode", "vmap"),
          models=("resnet",)),
  ]
  if gsam:
    opts += [
        Opt("gsam", "GSAM", "", ("--opt", "gsam")),
        Opt("sam_every_k", "SAM", "every k=5", ("--opt", "sam", "--sam-every-k", "5")),
    ]
  if selection:
    opts += [Opt(f"ire_grad_sq_{m}", "{base}+IRE", f"grad_sq, {m}", grad_sq, method=m)
             for m in SELECTION_METHODS]
  return opts


# The counting methods timed besides "auto" with --selection-methods (the CPU's opt-in kernel
# first): what the native kernel saves over the pure-XLA default, in train-step terms.
SELECTION_METHODS = ("native", "threshold")


def build_step(model: Model, opt: Opt, base: str, seed: int = 0, fast_compile: bool = False):
  """``(step_fn, state, batch, spec)``: the example's train step for ``opt``."""
  argv = ["--opt", base, "--warmup-steps", "0", "--seed", str(seed), *model.argv, *opt.argv]
  if fast_compile:
    argv.append("--fast-compile")
  if opt.argv[:1] == ("--opt",):
    argv += ["--base", base]
  args = cli.parse(model.example, argv)
  rng = np.random.default_rng(seed)
  b = args.batch_size
  m = build_model(model, args, seed)
  if model.example == "llama":
    num_classes = model.vocab
    tokens = rng.integers(0, model.vocab, (b, model.seq_len + 1)).astype(np.int32)
    batch = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
  else:
    h, w, c = model.image_shape
    num_classes = model.num_classes
    batch = {"x": rng.standard_normal((b, h, w, c)).astype(np.float32),
             "y": rng.integers(0, num_classes, b).astype(np.int32)}
  graphdef, params, stats = train.split_model(m)
  spec = optim.build_optimizer(args.optimizer, 10_000, seed=args.seed, model_stats=stats)
  if spec.lookahead:
    params = optax.LookaheadParams.init_synced(params)
  state = train.TrainState(params, stats, jax.jit(spec.tx.init)(params))
  # The step donates its input: give every leaf its own buffer (as train.run does).
  state = jax.device_put(state, jax.devices()[0], may_alias=False)
  step_fn = train.make_train_step(graphdef, spec, num_classes=num_classes,
                                  fast_compile=args.fast_compile,
                                  branch_hints=args.branch_hints)
  batch = jax.device_put(batch)
  return step_fn, state, batch, spec


def measure(model: Model, opts: list[Opt], base: str, reps: int, *, fast_compile: bool,
            lock: str | None) -> dict:
  steppers, compile_s, specs = {}, {}, {}
  for o in opts:
    t0 = time.perf_counter()
    step_fn, state, batch, spec = build_step(model, o, base, fast_compile=fast_compile)
    fn = lambda s, b, i, f=step_fn: f(s, b, i)[0]
    st = C.Stepper(fn, state, steps=STEPS_PER_BLOCK, args_at=lambda i, b=batch: (b, i))
    with ire_optax.selection_method(o.method):  # read when the step variants are traced
      jax.block_until_ready(st())  # compiles every step variant the block uses
    compile_s[o.key] = time.perf_counter() - t0
    steppers[o.key], specs[o.key] = st, spec
    print(f"  {model.example} {o.key}: compiled + first block {compile_s[o.key]:.1f}s",
          file=sys.stderr, flush=True)
  # Compilation above runs concurrently with other jobs; the timing holds the lock.
  with open(lock, "w") if lock else contextlib.nullcontext() as f:
    if f is not None:
      fcntl.flock(f, fcntl.LOCK_EX)
    load0 = C.loadavg()
    t = C.time_interleaved(steppers, baseline="base", reps=reps, units=STEPS_PER_BLOCK,
                           warmup=0)
    load1 = C.loadavg()
  stage2 = {k: float(ire_optax.sala_stats(st.carry.opt_state)["stage2_fraction"])
            for k, st in steppers.items() if k.startswith("sala")}
  return {"timings": t, "compile_s": compile_s, "loadavg": [load0, load1],
          "stage2_fraction": stage2}


def hvp_cost(model: Model, reps: int, *, fast_compile: bool, lock: str | None) -> dict:
  """One Hessian-vector product (what a Hutchinson probe costs) over one gradient.

  Both of the example's training loss on one batch, jitted, timed interleaved: the HVP is
  ``estimators.hvp`` (forward-over-reverse, the one IRE's ``"hutchinson"`` uses).
  """
  from ire_optax._src import estimators

  _, state, batch, _ = build_step(model, Opt("base", "", "", ()), "sgd",
                                  fast_compile=fast_compile)
  args = cli.parse(model.example, ["--opt", "sgd", *model.argv])
  graphdef = train.split_model(build_model(model, args))[0]  # equal to the step's
  params, stats = state.params, state.stats

  def loss(p):
    logits, _ = train.apply_model(graphdef, p, stats, batch["x"], train=True)
    return optim.cross_entropy(logits, batch["y"])[0]

  opts = train.compiler_options(fast_compile)
  grad = jax.jit(jax.grad(loss), compiler_options=opts)
  v = jax.tree.map(jax.numpy.ones_like, params)
  hvp = jax.jit(lambda p, v: estimators.hvp(jax.grad(loss), p, v), compiler_options=opts)
  jax.block_until_ready((grad(params), hvp(params, v)))
  blocks = {"grad": lambda: grad(params), "hvp": lambda: hvp(params, v)}
  with open(lock, "w") if lock else contextlib.nullcontext() as f:
    if f is not None:
      fcntl.flock(f, fcntl.LOCK_EX)
    t = C.time_interleaved(blocks, baseline="grad", reps=reps, units=1, warmup=1)
  p = t.paired("hvp")
  return {"ratio": t.ratio("hvp"), "min": min(p), "max": max(p),
          "grad_ms": 1e3 * t.median("grad")}


def build_model(model: Model, args: TrainConfig, seed: int = 0):
  """The example's Flax model for ``args``."""
  a = args.model
  if model.example == "llama":
    return models.build_llama(a.size, vocab_size=model.vocab, seed=seed, dim=a.dim,
                              depth=a.depth, heads=a.heads, ffn_dim=a.ffn_dim).model
  h, _, c = model.image_shape
  if model.example == "resnet":
    return models.build_resnet(a.size, num_classes=model.num_classes, in_channels=c,
                               seed=seed, depth=a.depth, width=a.width).model
  return models.build_vit(a.size, num_classes=model.num_classes, image_size=h,
                          in_channels=c, seed=seed, dim=a.dim, depth=a.depth,
                          heads=a.heads, mlp_dim=a.mlp_dim, patch_size=a.patch_size).model


def base_label(base: str) -> str:
  return {"sgd": "SGD", "adamw": "AdamW"}[base]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="resnet,vit,llama")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--only", default=None, help="comma-separated optimizer keys")
  p.add_argument("--gsam", action="store_true", help="also GSAM and SAM every k=5 steps")
  p.add_argument("--selection-methods", action="store_true",
                 help="also IRE (grad_sq) with each non-default counting method of the "
                      "refresh; the table goes to --out (default: train_step_selection), "
                      "without cost-table rows")
  p.add_argument("--smoke", action="store_true",
                 help="toy sizes, fast compilation, 1 repetition, no files")
  p.add_argument("--lock", default=None, metavar="FILE",
                 help="hold an exclusive flock on FILE while timing (not while compiling)")
  p.add_argument("--part", default=None, metavar="JSON",
                 help="write these models' measurements to JSON (merge them with --merge)")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="no measurement: write the results from parts written with --part")
  p.add_argument("--hvp-only", action="store_true",
                 help="measure only one HVP over one gradient per model (with --part: "
                      "merged into that model's results)")
  p.add_argument("--out", default=None, help="results stem (default: results/train_step)")
  args = p.parse_args(argv)
  if args.out is None:
    args.out = str(C.RESULTS / (NAME + ("_selection" if args.selection_methods else "")))

  opts = optimizers(args.gsam, args.selection_methods)
  if args.only:
    keep = set(args.only.split(",")) | {"base"}
    opts = [o for o in opts if o.key in keep]
  if args.hvp_only:
    table = SMOKE_MODELS if args.smoke else MODELS
    reps = 3 if args.smoke else args.reps
    hvp = {name: {"hvp": hvp_cost(table[name], reps, fast_compile=args.smoke, lock=args.lock)}
           for name in args.models.split(",")}
    print(json.dumps(hvp))
    if args.part:
      Path(args.part).write_text(json.dumps({"details": hvp, "rows": [], "reps": reps,
                                             "machine": C.machine()}, indent=1))
    return 0
  if args.merge:
    parts = [json.loads(open(f).read()) for f in args.merge]
    details: dict = {}
    for part in parts:  # an --hvp-only part adds its entry to the model's details
      for k, v in part["details"].items():
        details.setdefault(k, {}).update(v)
    parts = [q for q in parts if q["rows"]] or parts
    rows = [C.Row(**r) for part in parts for r in part["rows"]]
    reps, machine0 = parts[0]["reps"], parts[0]["machine"]
    keys = {k for d in details.values() for k in d["results"]}
    opts = [o for o in optimizers(True, True) if o.key in keys or o.key == "base"]
  else:
    table = SMOKE_MODELS if args.smoke else MODELS
    reps = 1 if args.smoke else args.reps
    rows, details = [], {}
    machine0 = C.machine()
    for name in args.models.split(","):
      model = table[name]
      mopts = [o for o in opts if not o.models or name in o.models]
      details[name], new_rows = measure_model(name, model, mopts, reps, smoke=args.smoke,
                                              lock=args.lock)
      rows += new_rows
    if args.part:
      Path(args.part).write_text(json.dumps(
          {"details": details, "rows": [dataclasses.asdict(r) for r in rows], "reps": reps,
           "machine": machine0}, indent=1, default=float))
      return 0
  md = markdown(details, opts, machine0, reps)
  print(md)
  if not args.smoke:
    # The counting-method comparison keeps its rows out of the cost table (whose IRE rows
    # are the default method's, from the full run).
    C.write_results(args.out, benchmark="bench_train_step",
                    meta={"machine": machine0, "reps": reps, "steps_per_block": STEPS_PER_BLOCK},
                    rows=() if args.selection_methods else rows, details=details, markdown=md)
  return 0


def measure_model(name: str, model: Model, opts: list[Opt], reps: int, *, smoke: bool,
                  lock: str | None) -> tuple[dict, list]:
  base = cli.get_config(model.example).optimizer.base
  print(f"{model.label}: base {base}", file=sys.stderr, flush=True)
  r = measure(model, opts, base, reps, fast_compile=smoke, lock=lock)
  t = r["timings"]
  d = {"label": model.label, "base": base, "summary": t.summary(), "compile_s": r["compile_s"],
       "loadavg": r["loadavg"], "results": {}}
  rows = []
  for o in opts:
    if o.key == "base":
      continue
    ratio = t.ratio(o.key)
    vs = o.target_over if o.target_over in t.seconds else "base"
    over = ratio if vs == "base" else t.ratio(o.key, vs)
    met = None if o.target is None or vs != o.target_over else bool(over <= o.target)
    note = ""
    if o.key.startswith("sala"):
      note = f"stage-2 fraction {r['stage2_fraction'][o.key]:.2f}"
    if vs != "base":
      note = (note + "; " if note else "") + f"{over:.2f}x {vs.upper()}"
    d["results"][o.key] = {"ratio": ratio, "vs": vs, "ratio_vs": over,
                           "target": o.target, "met": met,
                           "ratio_min": min(t.paired(o.key)), "ratio_max": max(t.paired(o.key))}
    if o.key.startswith("sala"):
      d["results"][o.key]["stage2_fraction"] = r["stage2_fraction"][o.key]
    rows.append(C.time_row(o.label.format(base=base_label(base)), base_label(base),
                           model.label, "train step", ratio, "bench_train_step", note,
                           o.variant, n=reps))
  return d, rows


def markdown(details: dict, opts: list[Opt], machine: dict, reps: int) -> str:
  names = list(details)
  head = ["optimizer", "variant", "target"] + [details[n]["label"] for n in names]
  lines = [
      "# Train-step time of every optimizer over its base (the examples' train steps)",
      "",
      "Generated by `python benchmarks/bench_train_step.py`. Each cell: median over "
      f"{reps} repetitions of the time of {STEPS_PER_BLOCK} consecutive steps over the base "
      "optimizer's in the same repetition (interleaved, one process), [min-max] of the paired "
      "ratios; ✓/✗ against the target; `lax.cond` rows: the same step without the train "
      "loop's branch hints (`--branch-hints off`). " + machine["summary"] + ".",
      "",
      "| " + " | ".join(head) + " |",
      "|" + "---|" * 3 + "---:|" * len(names),
  ]
  for o in opts:
    if o.key == "base":
      continue
    cells = []
    for n in names:
      r = details[n]["results"].get(o.key)
      if r is None:
        cells.append("–")
        continue
      mark = "" if r["met"] is None else (" ✓" if r["met"] else " ✗")
      vs = "" if r["vs"] == "base" else f" ({r['ratio_vs']:.2f}x {r['vs'].upper()})"
      cells.append(f"{r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]{vs}{mark}")
    bases = {details[n]["base"] for n in names}
    label = o.label.format(base=base_label(bases.pop()) if len(bases) == 1 else "base")
    tgt = "" if o.target is None else f"≤ {o.target}x" + ("" if o.target_over == "base"
                                                            else f" {o.target_over.upper()}")
    lines.append("| " + " | ".join([label, o.variant, tgt] + cells) + " |")
  lines += ["", "Base optimizers: " + ", ".join(
      f"{details[n]['label']}: {base_label(details[n]['base'])}" for n in names) + ".",
            "Load average (1 min) before/after each model's timing: " + ", ".join(
      f"{n} {details[n]['loadavg'][0]:.1f}/{details[n]['loadavg'][1]:.1f}" for n in names) + "."]
  hvp = {n: details[n]["hvp"] for n in names if "hvp" in details[n]}
  if hvp:
    lines += ["", "One Hessian-vector product (a Hutchinson probe: forward-over-reverse) over "
              "one gradient of the same loss and batch, interleaved: " + ", ".join(
                  f"{n} {h['ratio']:.2f} [{h['min']:.2f}-{h['max']:.2f}]"
                  for n, h in hvp.items()) + ". IRE's `hutchinson` adds one HVP per refresh "
              f"(K = {STEPS_PER_BLOCK}), so its ratio is about 1 + HVP/gradient/K when a base "
              "step costs one gradient."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.exit(main())
