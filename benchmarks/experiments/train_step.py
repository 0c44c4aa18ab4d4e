"""Train step: every optimizer's step over its base, on the ResNet, ViT and Llama examples' steps.

The step timed is the one ``python -m examples.{resnet,vit,llama}`` runs, on random batches of
the examples' shapes; ``--selection`` times IRE with each counting method of its refresh instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import types
from collections.abc import Mapping
from functools import partial
from typing import Any

from benchmarks import metrics, runner, timing
from benchmarks.render import bounds, fill, table
from benchmarks.schema import time_row, write_micro
from benchmarks.spec import Micro


@dataclasses.dataclass(frozen=True)
class Opt:
  """One optimizer timed: overrides of the example's optimizer config, and its target."""

  label: str  # "{base}" is replaced by the base's name
  variant: str = ""
  optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  target: float | None = None  # max time / the ``over`` optimizer's
  over: str = "base"
  models: tuple[str, ...] = ()  # only on these models (empty: all)
  method: str = "auto"  # the selection method the step is traced with (IRE's refresh)
  train: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. branch hints off


IRE = {"ire": True, "ire_refresh_every": 10, "ire_warmup": 0}
SALA = {"name": "sala", "sala_sync_period": 2, "rho": 5}  # every cycle in stage 2
MSAM = {"name": "msam", "num_microbatches": 8}
OPTS = {
    "base": Opt("{base}"),
    **{f"ire_{c}": Opt("{base}+IRE", c, {**IRE, "ire_curvature": c}, 1.15)
       for c in ("grad_sq", "fisher", "hutchinson")},
    "sam": Opt("SAM", "", {"name": "sam"}, 2.1), "asam": Opt("ASAM", "", {"name": "asam"}, 2.1),
    "msam": Opt("mSAM", "m=8", MSAM, 1.1, "sam"), "sala": Opt("SALA", "k=2", SALA, 1.6),
    "lookahead": Opt("Lookahead", "k=5", {"name": "lookahead", "la_sync_period": 5}),
    "ire_fisher_cond": Opt("{base}+IRE", "fisher, lax.cond", {**IRE, "ire_curvature": "fisher"},
                           models=("resnet",), train={"branch_hints": "off"}),
    "sala_cond": Opt("SALA", "k=2, lax.cond", SALA, models=("resnet",),
                     train={"branch_hints": "off"}),
    "msam_vmap": Opt("mSAM", "m=8, vmap", {**MSAM, "microbatch_mode": "vmap"}, models=("resnet",)),
    "gsam": Opt("GSAM", "", {"name": "gsam"}),
    "sam_every_k": Opt("SAM", "every k=5", {"name": "sam", "sam_every_k": 5})}
SELECTION = {"ire_grad_sq": OPTS["ire_grad_sq"], **{
    f"ire_grad_sq_{m}": dataclasses.replace(OPTS["ire_grad_sq"], variant=f"grad_sq, {m}",
                                            target=None, method=m)
    for m in ("native", "threshold")}}
# model -> (label, overrides of the example's config: its sections and training fields, image
# shape, vocabulary)
MODELS = {
    "resnet": ("ResNet-8 w16 (32x32x3, batch 64)",
               {"model": {"size": "toy", "width": 16}, "batch_size": 64}, (32, 32, 3), 0),
    "vit": ("ViT mini (32x32x3, patch 4, batch 64)",
            {"model": {"size": "mini", "patch_size": 4}, "batch_size": 64}, (32, 32, 3), 0),
    "llama": ("Llama mini (seq 128, batch 16, vocab 96)",
              {"model": {"size": "mini"}, "data": {"seq_len": 128}, "batch_size": 16}, (), 96)}
SMOKE_MODELS = {  # the smoke run's model
    "llama": ("Llama toy (seq 16, batch 8)",
              {"model": {"size": "toy"}, "data": {"seq_len": 16}, "batch_size": 8}, (), 32)}
SPEC = Micro(name="train_step", measures="train-step time over the base optimizer's",
             blocks=tuple(OPTS), baseline="base", sizes=tuple(MODELS), reps=5,
             smoke={"reps": 1, "sizes": ("llama",), "blocks": ("base", "ire_fisher")})
STEPS = 10
BASES = {"sgd": "SGD", "adamw": "AdamW"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--selection", action="store_true", help="IRE (grad_sq) with each "
                      "counting method of the refresh -> results/train_step_selection.json")


def _new_state(step: Any, state: Any, batch: Any, i: Any) -> Any:
  return step(state, batch, i)[0]


def _batch_and_step(batch: Any, i: int) -> tuple[Any, int]:
  return batch, i


def build_step(name: str, opt: Opt, size: tuple[Any, ...], smoke: bool = False) -> tuple:
  """``(step_fn, state, batch, loss)``: the example's train step for ``opt`` and its loss."""
  import jax
  import numpy as np

  from benchmarks.runner import override
  from examples.common import cli, optim, train

  _, overrides, shape, vocab = size
  base = base_of(name)
  optimizer = {"name": base, "warmup_steps": 0, **opt.optimizer,
               **({"base": base} if "name" in opt.optimizer else {})}
  cfg = override(cli.get_config(name), {**overrides, **opt.train, "fast_compile": smoke,
                                        "optimizer": optimizer})
  data = types.SimpleNamespace(image_shape=shape, num_classes=10, vocab_size=vocab)
  graphdef, params, stats = train.split_model(train.build_model(cfg, data).model)
  spec = optim.build_optimizer(cfg.optimizer, 10_000, model_stats=stats)
  rng, b = np.random.default_rng(0), cfg.batch_size
  if vocab:
    tokens = rng.integers(0, vocab, (b, cfg.data.seq_len + 1)).astype(np.int32)
    batch = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
  else:
    batch = {"x": rng.standard_normal((b, *shape)).astype(np.float32),
             "y": rng.integers(0, 10, b).astype(np.int32)}
  loss = lambda p, x: optim.cross_entropy(
      train.apply_model(graphdef, p, stats, x["x"], train=True)[0], x["y"])[0]
  return (train.make_train_step(graphdef, spec, num_classes=vocab or 10, fast_compile=smoke,
                                branch_hints=cfg.branch_hints),
          train.init_state(spec, params, stats), jax.device_put(batch), loss)


def measure(name: str, opts: Mapping[str, Opt], reps: int, smoke: bool) -> dict[str, Any]:
  """One model: every optimizer's block ratio to the base's, and an HVP over a gradient."""
  import jax

  import ire_optax

  size = (SMOKE_MODELS if smoke else MODELS)[name]
  steppers, compile_s = {}, {}
  for key, o in opts.items():
    step, state, batch, loss = build_step(name, o, size, smoke)
    steppers[key] = timing.Stepper(partial(_new_state, step), state, STEPS,
                                   partial(_batch_and_step, batch))
    t0 = time.perf_counter()
    with ire_optax.selection_method(o.method):  # read when the step variants are traced
      jax.block_until_ready(steppers[key]())  # compiles every step variant of a block
    compile_s[key] = time.perf_counter() - t0
  load = [timing.loadavg()]
  t = timing.time_interleaved(steppers, baseline="base", reps=reps, units=STEPS, warmup=0)
  load.append(timing.loadavg())
  params = steppers["base"].carry.params
  v = jax.tree.map(jax.numpy.ones_like, params)
  hvp = timing.time_interleaved({
      "grad": partial(jax.jit(jax.grad(loss)), params, batch),
      "hvp": partial(jax.jit(partial(ire_optax.sharpness.hvp, loss)), params, batch, v)},
      baseline="grad", reps=max(reps, 3)).on("cpu")  # a shared machine: CPU time
  results = {}
  for key, o in opts.items():
    if key == "base":
      continue
    over = o.over if o.over in opts else "base"
    bound = metrics.ratio_bounds(t.paired(key))
    results[key] = {"ratio": bound["median"], "ratio_min": bound["min"],
                    "ratio_max": bound["max"], "vs": over, "ratio_vs": t.ratio(key, over),
                    "target": o.target, "met": (None if o.target is None or over != o.over
                                                else t.ratio(key, over) <= o.target)}
    if o.optimizer.get("name") == "sala":
      results[key]["stage2_fraction"] = float(
          ire_optax.sala_stats(steppers[key].carry.opt_state)["stage2_fraction"])
  h = metrics.ratio_bounds(hvp.paired("hvp"))
  return {"label": size[0], "base": base_of(name), "summary": t.summary(),
          "compile_s": compile_s, "loadavg": load, "results": results,
          "hvp": {"ratio": h["median"], "min": h["min"], "max": h["max"], "clock": "cpu",
                  "grad_ms": 1e3 * hvp.median("grad")}}


def base_of(name: str) -> str:
  """The example's default base optimizer (``"sgd"`` or ``"adamw"``)."""
  from examples.common import cli

  return cli.get_config(name).optimizer.base


def run(spec: Micro, args: Any) -> None:
  opts = ({"base": OPTS["base"], **SELECTION} if args.selection
          else {k: OPTS[k] for k in spec.blocks})
  details = {model: measure(model, {k: o for k, o in opts.items()
                                    if not o.models or model in o.models}, spec.reps, args.smoke)
             for model in spec.sizes}
  rows = [time_row(opts[k].label.format(base=BASES[d["base"]]), BASES[d["base"]], d["label"],
                   "train step", r["ratio"], spec.name, note(r), opts[k].variant, n=spec.reps)
          for d in details.values() for k, r in d["results"].items()]
  write_micro(spec.name + ("_selection" if args.selection else ""), args.out,
              rows=() if args.selection else rows, details=details, reps=spec.reps,
              steps_per_block=STEPS, command=runner.command(spec.name))


def note(r: Mapping[str, Any]) -> str:
  """A cost-table note: SALA's stage-2 fraction, a ratio to another optimizer than the base."""
  parts = [f"stage-2 fraction {r['stage2_fraction']:.2f}"] if "stage2_fraction" in r else []
  if r["vs"] != "base":
    parts.append(f"{r['ratio_vs']:.2f}x {r['vs'].upper()}")
  return "; ".join(parts)


def cell(r: Mapping[str, Any]) -> str:
  """A ratio's cell: median [min–max] over the repetitions."""
  return bounds(r["ratio"], r["ratio_min"], r["ratio_max"])


def load_text(details: Mapping[str, Any]) -> str:
  """The load average before/after each model's timing."""
  return ", ".join(f"{n} {r['loadavg'][0]:.1f}/{r['loadavg'][1]:.1f}" for n, r in details.items())


SELECTION_LABELS = (("ire_grad_sq", "default (`auto`: `scatter` on the CPU)"),
                    ("ire_grad_sq_native", "`native` (opt-in)"),
                    ("ire_grad_sq_threshold", "`threshold`"))


def report(doc: Mapping[str, Any]) -> str:
  """``train_step.md``: every optimizer on every model."""
  d, names = doc["details"], list(doc["details"])

  def marked(r: Mapping[str, Any] | None) -> str:
    if r is None:
      return "—"
    vs = "" if r["vs"] == "base" else f" ({r['ratio_vs']:.2f}x {r['vs'].upper()})"
    mark = "" if r["met"] is None else (" ✓" if r["met"] else " ✗")
    return cell(r) + vs + mark

  bases = {BASES[d[n]["base"]] for n in names}
  rows = [[o.label.format(base=bases.pop() if len(bases) == 1 else "base"), o.variant,
           "" if o.target is None else f"≤ {o.target}x" + (
               "" if o.over == "base" else f" {o.over.upper()}"),
           *(marked(d[n]["results"].get(k)) for n in names)]
          for k, o in OPTS.items() if any(k in d[n]["results"] for n in names)]
  return fill("train_step.md", {
      "reps": doc["meta"]["reps"], "steps": doc["meta"]["steps_per_block"],
      "machine": doc["meta"]["machine"]["summary"],
      "table": table(["optimizer", "variant", "target", *(d[n]["label"] for n in names)], rows,
                     "lll" + "r" * len(names)),
      "bases": ", ".join(f"{d[n]['label']}: {BASES[d[n]['base']]}" for n in names),
      "load": load_text(d),
      "hvp": ", ".join(f"{n} {bounds(h['ratio'], h['min'], h['max'])} ({h['clock']} clock)"
                       for n, h in ((n, d[n]["hvp"]) for n in names))})


def render(results: Mapping[str, Any]) -> dict[str, str]:
  out, doc, sel = {}, results.get("train_step"), results.get("train_step_selection")
  if doc is not None:
    out["benchmarks/results/train_step.md"] = report(doc)
  if doc is not None and "resnet" in doc["details"]:  # the hints' block: the ResNet's steps
    res = doc["details"]["resnet"]
    out["docs/performance.md#branch-hints"] = fill("train_step_hints.md", {
        "reps": doc["meta"]["reps"], "machine": doc["meta"]["machine"]["summary"],
        "load0": res["loadavg"][0], "load1": res["loadavg"][1],
        **{k: cell(r) for k, r in res["results"].items()}})
  if sel is not None:
    d = sel["details"]
    saved = [d[n]["results"]["ire_grad_sq"]["ratio"]
             - d[n]["results"]["ire_grad_sq_native"]["ratio"] for n in d]
    out["docs/selection.md#selection-train-step"] = fill("train_step_selection.md", {
        "table": table(["IRE (grad_sq, K = 10) counting with",
                        *(f"{d[n]['label']}, over {BASES[d[n]['base']]}" for n in d)],
                       [*([label, *(cell(d[n]["results"][k]) for n in d)]
                          for k, label in SELECTION_LABELS),
                        ["what `native` saves per step, in base steps",
                         *(f"{x:+.2f}" for x in saved)]], "l" + "r" * len(d)),
        "steps": sel["meta"]["steps_per_block"], "reps": sel["meta"]["reps"],
        "machine": sel["meta"]["machine"]["summary"], "load": load_text(d)})
  return out
