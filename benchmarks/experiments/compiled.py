"""IRE's refresh and steps compiled deviceless for TPU v5e, H100 and CPU, in AdamW updates."""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks import compiled as X  # isort: skip  (before JAX starts a backend)

import jax
import jax.numpy as jnp
import optax

import ire_optax
from benchmarks import data, runner, schema
from benchmarks.render import fill, renders, span, table
from benchmarks.spec import Micro

SPEC = Micro(
    name="compiled",
    measures="bytes, TPU v5e cycles and the H100 time model over one AdamW update + apply",
    blocks=("adamw", "refresh", "refresh step", "plain step", "unhinted"), baseline="adamw",
    # (parameters, leaves, the IRE steps too): the steps compile at 1e7 only (compile time).
    sizes=tuple((n, leaves, n == 10**7) for n in (10**6, 10**7, 10**8) for leaves in (1, 63)),
    smoke={"sizes": ((10**5, 1, True), (10**5, 63, True))})
GAMMA, K = 0.6, 10
# The selection's design targets (docs/selection.md), in AdamW updates, at these sizes only.
TARGETS = {"refresh_bytes": 2.0, "refresh_cycles": 2.0, "refresh_h100_time": 3.0,
           "plain_bytes": 1.05, "kernels": 40, "kernels_per_leaf": 2}
TARGET_SIZES = (10**7, 10**8)
ACCELERATORS = ("tpu-v5e", "h100")
# Verdicts: (what, program, metric, key of TARGETS, the targets it is measured on).
VERDICTS = (("refresh, bytes", "refresh", "bytes", "refresh_bytes", ACCELERATORS),
            ("refresh, TPU v5e cycles", "refresh", "cycles", "refresh_cycles", ("tpu-v5e",)),
            ("refresh, H100 time model", "refresh", "h100_time", "refresh_h100_time", ("h100",)),
            ("refresh, H100 kernels", "refresh", "kernels", "kernels", ("h100",)),
            ("plain step, bytes", "plain step", "bytes", "plain_bytes", ACCELERATORS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--targets", nargs="+", default=list(X.TARGETS), choices=X.TARGETS)


def _step(tx: optax.GradientTransformation, **hints: Any):
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params, **hints)
    return optax.apply_updates(params, updates), state
  return step


def compile_block(name: str, target: str, params: Any) -> Any:
  """The compiled program of block ``name`` (one of ``SPEC.blocks``) for ``target``."""
  if name == "refresh":  # IRE's default curvature "grad_sq" ranks g²
    return X.compile_fn(lambda g: ire_optax.flat_mask(g, GAMMA, square=True), params,
                        target=target)
  tx, hints = optax.adamw(1e-3), {}
  if name != "adamw":
    tx = ire_optax.ire(tx, gamma=GAMMA, refresh_every=K)
    hints = {"refresh_hint": {"refresh step": True, "plain step": False}.get(name)}
  return X.compile_fn(_step(tx, **hints), params, params, jax.eval_shape(tx.init, params),
                      target=target, donate_argnums=(0, 2))


def params_of(n: int, leaves: int) -> dict[str, jax.ShapeDtypeStruct]:
  """``n`` float32 parameters on one leaf or split as :func:`benchmarks.data.tree_sizes`."""
  sizes = [n] if leaves == 1 else data.tree_sizes(n)
  return {f"l{i:02d}": jax.ShapeDtypeStruct((s,), jnp.float32) for i, s in enumerate(sizes)}


def measure(target: str, n: int, leaves: int, steps: bool) -> dict[str, Any]:
  t0, params = time.perf_counter(), params_of(n, leaves)
  programs = {}
  for name in SPEC.blocks if steps else SPEC.blocks[:2]:
    # Only the unhinted step has a conditional: its plain path, the false branch.
    programs[name] = X.taken(compile_block(name, target, params)).summary(n)
  return {"target": target, "n": n, "leaves": leaves, "programs": programs,
          "compile_seconds": time.perf_counter() - t0,
          "ratios": {k: X.ratios(p, programs["adamw"]) for k, p in programs.items()}}


def run(spec: Micro, args: argparse.Namespace) -> None:
  targets = X.usable(args.targets)
  details = []
  for target in targets:
    for n, leaves, steps in spec.sizes:
      details.append(measure(target, n, leaves, steps or args.smoke))
      print(f"{target} N={n:.0e} leaves={leaves}: {details[-1]['compile_seconds']:.0f} s")
  # The other targets' programs stay as the results file has them (a run of some targets).
  path = f"{args.out or schema.RESULTS}/{spec.name}"
  old = schema.read_results(f"{path}.json")
  kept = [d for d in (old["details"] if old else []) if d["target"] not in targets]
  versions = f"jax {jax.__version__}"
  if kept and old and old["meta"]["versions"] != versions:
    versions = (f"{old['meta']['versions']} for {', '.join(sorted({d['target'] for d in kept}))}"
                f", {versions} for {', '.join(targets)}")
  meta = {"command": runner.command(spec.name), "versions": versions,
          "targets": sorted({d["target"] for d in kept} | set(targets)),
          "time_model": X.TIME_MODEL}
  schema.write_results(path, benchmark=spec.name, meta=meta, details=kept + details)


def _bound(r: dict[str, Any], key: str) -> float:
  """The target ``TARGETS[key]`` for result ``r`` (the kernels': a base plus a term per leaf)."""
  return TARGETS[key] + (TARGETS["kernels_per_leaf"] * r["leaves"] if key == "kernels" else 0)


def grid(details: list[dict[str, Any]], programs: tuple[str, ...] = SPEC.blocks,
         targets: tuple[str, ...] = X.TARGETS) -> str:
  """A row per (target, size, program) of ``programs``: its :data:`X.METRICS` over AdamW's."""
  rs = sorted((r for r in details if r["target"] in targets),
              key=lambda r: (r["target"], r["n"], r["leaves"]))
  return table(["target", "N", "leaves", "program", *X.METRICS], [
      [r["target"], f"{r['n']:.0e}", r["leaves"], name,
       *X.metric_cells(r["target"], r["programs"][name], r["ratios"][name])]
      for r in rs for name in programs if name in r["programs"]], "lrrl" + "r" * 7)


def _value(r: dict[str, Any], name: str, metric: str) -> float | None:
  return r["programs"][name]["kernels"] if metric == "kernels" else r["ratios"][name][metric]


def verdicts(details: list[dict[str, Any]]) -> str:
  """One line per design target over the cases at :data:`TARGET_SIZES` (how many meet it, their
  range, the worst), and a line of the ranges at the other sizes, which no target covers."""
  lines, other = [], []
  for what, name, metric, key, targets in VERDICTS:
    cases = [(_value(r, name, metric), r) for r in details
             if r["target"] in targets and name in r["programs"]]
    at = [(v, r) for v, r in cases if v is not None and r["n"] in TARGET_SIZES]
    rest = [v for v, r in cases if v is not None and r["n"] not in TARGET_SIZES]
    fmt = ".0f" if key == "kernels" else ".2f"
    if at:
      v, r = max(at, key=lambda c: c[0] / _bound(c[1], key))
      limit = (f"{TARGETS['kernels']} + {TARGETS['kernels_per_leaf']} per leaf"
               if key == "kernels" else f"{TARGETS[key]:g}")
      met = sum(x <= _bound(q, key) for x, q in at)
      lines.append(f"- {what} ≤ {limit}: {met} of {len(at)} met, {span([x for x, _ in at], fmt)}; "
                   f"worst {v:.3g} ({r['target']}, N={r['n']:.0e}, {r['leaves']} leaves)")
    if rest:
      other.append(f"{what} {span(rest, fmt)}")
  if other:
    sizes = sorted({r["n"] for r in details} - set(TARGET_SIZES))
    lines.append(f"- at N={', '.join(f'{n:.0e}' for n in sizes)}, not a target size: "
                 + "; ".join(other))
  return "\n".join(lines)


@renders("compiled")
def render(doc: Any) -> dict[str, str]:
  d = doc["details"]
  context = {**doc["meta"], "table": grid(d), "verdicts": verdicts(d)}
  return {"benchmarks/results/compiled.md": fill("compiled.md", context),
          "docs/selection.md#compiled-refresh": grid(d, ("refresh", "refresh step"), ACCELERATORS),
          "docs/performance.md#compiled-conditional": grid(d, ("plain step", "unhinted"),
                                                           ACCELERATORS)}
