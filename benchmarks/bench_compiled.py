"""IRE's refresh and plain step as XLA:TPU and XLA:GPU compile them, in AdamW updates.

Nothing runs: each program is compiled deviceless (``_compiled``) for a TPU v5e chip, an
NVIDIA H100 and the host CPU, and read from its optimized HLO. Every program is compared
with one ``optax.adamw`` update plus ``optax.apply_updates`` of the same parameters, compiled
the same way (parameters and optimizer state donated, as a train step donates them):

* ``refresh``: the selection alone, ``flat_mask(g, 0.6, square=True)`` (IRE's default
  ``"grad_sq"`` curvature ranks ``g²``);
* ``refresh step``: ``ire(adamw)``'s update on a refresh step, hinted
  (``refresh_hint=True``);
* ``plain step``: its update on any other step, hinted (``refresh_hint=False``);
* ``unhinted``: the update without a hint (``lax.cond``), on its plain path (the
  conditional's false branch included).

N = 1e6, 1e7, 1e8 float32 parameters (the steps at 1e7 only, to keep compiling to minutes),
as one leaf and as a 63-leaf tree shaped like a convnet's (``selection.tree_sizes``).
Columns: device-memory bytes (operands + results of every executed kernel, loop trip counts
applied; XLA:TPU's VMEM-resident arrays count nothing), the TPU compiler's estimated cycles, the
H100 time model (bytes / 3.35 TB/s + 4 µs per executed kernel + 10 µs per host round trip),
executed kernels and host round trips.

  python benchmarks/bench_compiled.py            # every size and target (a few minutes)
  python benchmarks/bench_compiled.py --smoke    # one small size (the test's run)
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import _common as C
import _compiled as X  # before any JAX backend starts: it sets JAX_PLATFORMS
import jax
import jax.numpy as jnp
import optax

import ire_optax
from benchmarks.experiments.selection import tree_sizes

GAMMA, K = 0.6, 10
SIZES = (10**6, 10**7, 10**8)
STEP_SIZES = (10**7,)  # the IRE steps are compiled at these sizes only (compile time)
LEAVES = (1, 63)
# Targets of the selection's design (see docs/selection.md), in AdamW updates.
TARGETS = {"refresh_bytes": 2.0, "refresh_cycles": 2.0, "refresh_h100_time": 3.0,
           "plain_bytes": 1.05}
PROGRAMS = ("adamw", "refresh", "refresh step", "plain step", "unhinted")


def params_of(n: int, leaves: int) -> dict[str, jax.ShapeDtypeStruct]:
  sizes = [n] if leaves == 1 else tree_sizes(n)
  assert len(sizes) == leaves, (leaves, len(sizes))
  return {f"l{i:02d}": jax.ShapeDtypeStruct((s,), jnp.float32) for i, s in enumerate(sizes)}


def _step(tx: optax.GradientTransformation, **kwargs: Any):
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state
  return step


def compile_program(name: str, target: str, params: Any) -> Any:
  """The compiled executable of program ``name`` (one of :data:`PROGRAMS`) for ``target``."""
  donate = {"donate_argnums": (0, 2)}
  if name == "adamw":
    adamw = optax.adamw(1e-3)
    return X.compile_fn(_step(adamw), params, params, jax.eval_shape(adamw.init, params),
                        target=target, **donate)
  if name == "refresh":
    return X.compile_fn(lambda g: ire_optax.flat_mask(g, GAMMA, square=True), params,
                        target=target)
  hint = {"refresh step": True, "plain step": False, "unhinted": None}[name]
  tx = ire_optax.ire(optax.adamw(1e-3), gamma=GAMMA, refresh_every=K)
  return X.compile_fn(_step(tx, refresh_hint=hint), params, params,
                      jax.eval_shape(tx.init, params), target=target, **donate)


def compile_programs(target: str, params: Any, steps: bool = True) -> dict[str, Any]:
  """Each program's compiled executable for ``target`` (``steps=False``: the AdamW update
  and the refresh only)."""
  return {name: compile_program(name, target, params)
          for name in (PROGRAMS if steps else PROGRAMS[:2])}


def measure(target: str, n: int, leaves: int, steps: bool = True) -> dict[str, Any]:
  t0 = time.perf_counter()
  compiled = compile_programs(target, params_of(n, leaves), steps)
  res: dict[str, Any] = {"target": target, "n": n, "leaves": leaves, "programs": {}}
  for name, c in compiled.items():
    # The unhinted step's plain path takes its conditional's false branch (XLA may move
    # some of the step's work into the branches).
    a = X.analyze(c, branch=0 if name == "unhinted" else None)
    s = a.summary()
    s["h100_seconds"] = X.h100_seconds(a)
    s["bytes_per_param"] = a.bytes / n
    res["programs"][name] = s
  res["compile_seconds"] = time.perf_counter() - t0
  base = res["programs"]["adamw"]
  res["ratios"] = {
      name: {"bytes": p["bytes"] / base["bytes"],
             "cycles": p["cycles"] / base["cycles"] if base["cycles"] else None,
             "h100_time": p["h100_seconds"] / base["h100_seconds"]}
      for name, p in res["programs"].items()}
  return res


def rows_of(results: list[dict[str, Any]]) -> list[C.Row]:
  rows = []
  for r in results:
    task = f"N={r['n']:.0e}, {r['leaves']} leaves, {r['target']}"
    for name in PROGRAMS[1:]:
      if name not in r["ratios"]:
        continue
      ratio = r["ratios"][name]
      for metric in ("bytes", "cycles", "h100_time"):
        if ratio[metric] is None or (metric == "h100_time" and r["target"] != "h100"):
          continue
        rows.append(C.Row(optimizer="AdamW+IRE", task=task, metric=f"compiled_{metric}_ratio",
                          value=ratio[metric], base="AdamW", what=name,
                          source="bench_compiled", interleaved=False))
  return rows


def _cell(r: dict[str, Any], name: str) -> str:
  if name not in r["ratios"]:
    return "–"
  ratio, p = r["ratios"][name], r["programs"][name]
  parts = [f"{ratio['bytes']:.2f}"]
  if r["target"] == "tpu-v5e":
    parts.append(f"{ratio['cycles']:.2f} cyc")
  if r["target"] == "h100":
    parts.append(f"{ratio['h100_time']:.2f} t, {p['kernels']:.0f} k, "
                 f"{p['host_round_trips']:.0f} rt")
  return " / ".join(parts)


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
  lines = [
      "# IRE compiled for TPU v5e, H100 and CPU: costs in AdamW updates",
      "",
      f"Written by `benchmarks/bench_compiled.py` (`{meta['command']}`); {meta['versions']}. "
      "Nothing runs: each program is compiled deviceless and read from its optimized HLO "
      "(`benchmarks/_compiled.py`).",
      "",
      "Each cell is a ratio to one `optax.adamw` update + `apply_updates` of the same "
      "parameters compiled the same way: device-memory **bytes** (operands + results of every "
      "executed kernel, loop trip counts applied; arrays XLA:TPU keeps in VMEM count "
      "nothing); on TPU v5e also the compiler's "
      "**estimated cycles** (`cyc`); on H100 the **time model** `t` = bytes / 3.35 TB/s + 4 µs "
      "per executed kernel + 10 µs per host round trip, with the executed kernels (`k`) and "
      "host round trips (`rt`) of the program itself.",
      "",
      "Programs: `refresh` = `flat_mask(g, 0.6, square=True)` (the selection alone); `refresh "
      "step` / `plain step` = `ire(adamw)` update + apply with `refresh_hint=True` / `False`; "
      "`unhinted` = the update without a hint (`lax.cond`), its plain path (the false branch "
      "included). Targets: refresh "
      f"≤ {TARGETS['refresh_bytes']:g} by bytes and by TPU cycles, ≤ "
      f"{TARGETS['refresh_h100_time']:g} in the H100 time model, ≤ 40 + 2 per leaf kernels on "
      f"H100; plain step ≤ {TARGETS['plain_bytes']:g} by bytes.",
      "",
      "| target | N | leaves | AdamW B/param | AdamW kernels | " + " | ".join(PROGRAMS[1:])
      + " |",
      "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---" for _ in PROGRAMS[1:]) + " |",
  ]
  for r in sorted(results, key=lambda r: (r["target"], r["n"], r["leaves"])):
    base = r["programs"]["adamw"]
    lines.append(f"| {r['target']} | {r['n']:.0e} | {r['leaves']} | "
                 f"{base['bytes_per_param']:.1f} | {base['kernels']:.0f} | "
                 + " | ".join(_cell(r, name) for name in PROGRAMS[1:]) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--targets", nargs="+", default=list(X.TARGETS))
  parser.add_argument("--sizes", nargs="+", type=float, default=list(SIZES))
  parser.add_argument("--leaves", nargs="+", type=int, default=list(LEAVES))
  parser.add_argument("--smoke", action="store_true", help="N = 1e5 only (seconds)")
  parser.add_argument("--out", default=str(C.RESULTS / "compiled"))
  args = parser.parse_args(argv)
  sizes = [10**5] if args.smoke else [int(s) for s in args.sizes]
  targets = [t for t in args.targets if X.available(t) is None]
  for t in set(args.targets) - set(targets):
    print(f"skipping {t}: {X.available(t)}", file=sys.stderr)
  results = []
  for target in targets:
    for n in sizes:
      for leaves in args.leaves:
        r = measure(target, n, leaves, steps=n in STEP_SIZES or args.smoke)
        print(f"{target} N={n:.0e} leaves={leaves}: "
              + ", ".join(f"{k} {v['bytes']:.2f}" for k, v in r["ratios"].items())
              + f" ({r['compile_seconds']:.0f} s)", flush=True)
        results.append(r)
  command = "python benchmarks/bench_compiled.py" + "".join(
      f" {a}" if not a.startswith("/") else " DIR" for a in (argv or sys.argv[1:]))
  versions = (f"jax {jax.__version__}, jaxlib {jax.lib.__version__}" if hasattr(jax, "lib")
              else f"jax {jax.__version__}")
  meta = {"command": command, "versions": versions, "targets": targets,
          "time_model": "H100: bytes / 3.35 TB/s + 4 us per executed kernel + 10 us per host "
                        "round trip"}
  C.write_results(args.out, benchmark="bench_compiled", meta=meta, rows=rows_of(results),
                  details=results, markdown=markdown(meta, results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
