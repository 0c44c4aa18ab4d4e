"""Selection: one exact refresh per counting method, and IRE amortized, in AdamW updates.

Keys: ``uniform``; ``model`` (g² of a small MLP's gradient, tiled to N); ``model_tree`` (the
same as 63 convnet-shaped leaves); ``one_bin`` (every key in one 65,536-bin bucket).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from functools import partial
from typing import Any

from benchmarks import data, metrics, timing
from benchmarks.render import bounds, fill, renders, span, table
from benchmarks.schema import RESULTS, read_results, time_row, write_micro
from benchmarks.spec import Micro

KINDS = ("uniform", "model", "model_tree", "one_bin")
METHODS = ("native", "threshold", "scatter")
SPEC = Micro(name="selection", measures="one refresh, and IRE(AdamW) at K=10, in AdamW updates",
             blocks=("adamw", *METHODS), baseline="adamw", sizes=(1e6, 1e7, 5e7), reps=5,
             smoke={"sizes": (2e4,), "reps": 1})
TREE_BLOCKS, GAMMA, K = 21, 0.6, 10  # model_tree: 21 blocks of a large kernel and two vectors
TARGETS = {"refresh": 2.0, "amortized": 1.10}  # in AdamW updates; IRE/AdamW at K


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--sizes", type=float, nargs="+", help="N values (default: the spec's)")
  parser.add_argument("--reps", type=int, help="repetitions (default: the spec's)")
  parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
  parser.add_argument("--methods", nargs="+", choices=METHODS,
                      help="default: every method of this backend")
  parser.add_argument("--resume", action="store_true",
                      help="keep the (keys, N) results already written, measure the rest")


def model_g2(data_dir: str | None) -> tuple[Any, str]:
  """g² of a small ReLU MLP's cross-entropy gradient on 256 training images."""
  import jax
  import numpy as np

  img = data.load_images(data_dir)
  x, y = img.x_train[:256], img.y_train[:256]
  d = int(np.prod(x.shape[1:]))
  params = data.mlp_init(jax.random.key(0), [d, 256, 128, 10])
  g = jax.grad(lambda p: data.cross_entropy(data.mlp_logits(p, x), y))(params)
  flat = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)])
  return (flat * flat).astype(np.float32), f"MLP {d}-256-128-10 on {img.name}"


def keys_of(kind: str, n: int, g2: Any, seed: int = 0) -> Any:
  import numpy as np

  rng = np.random.default_rng(seed)
  if kind == "uniform":
    return rng.random(n, dtype=np.float32)
  if kind in ("model", "model_tree"):
    return np.resize(g2, n)
  # one_bin: 1 + j * 2**-23 for j < 2**16: the top 16 key bits are all the same.
  return np.float32(1.0) + rng.integers(0, 1 << 16, n).astype(np.float32) * np.float32(2**-23)


def measure(kind: str, n: int, methods: list[str], reps: int, g2: Any) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import ire_optax

  flat = jnp.asarray(keys_of(kind, n, g2, seed=n))
  parts = (jnp.split(flat, np.cumsum(data.tree_sizes(n))[:-1].tolist()) if kind == "model_tree"
           else [flat])
  grads = {f"l{i:02d}": x for i, x in enumerate(parts)}
  zeros = jax.tree.map(jnp.zeros_like, grads)
  blocks: dict[str, Any] = {"adamw": timing.update_stepper(optax.adamw(1e-3), zeros, grads),
                            "adamw_x10": timing.update_stepper(optax.adamw(1e-3), zeros, grads, K)}
  for m in methods:
    blocks[f"refresh:{m}"] = partial(jax.jit(partial(ire_optax.flat_mask, gamma=GAMMA, method=m)),
                                     grads)
    with ire_optax.selection_method(m):  # read when the step is traced: trace it here
      blocks[f"ire_x10:{m}"] = s = timing.update_stepper(
          ire_optax.ire(optax.adamw(1e-3), gamma=GAMMA, refresh_every=K), zeros, grads, K)
      jax.block_until_ready(s())
  load = timing.loadavg()
  t = timing.time_interleaved(blocks, baseline="adamw", reps=reps)
  return {"kind": kind, "n": n, "reps": reps, "load_before": load,
          "load_after": timing.loadavg(), "adamw_ms": 1e3 * t.median("adamw"),
          "refresh": {m: metrics.ratio_bounds(t.paired(f"refresh:{m}")) for m in methods},
          "amortized": {m: metrics.ratio_bounds(t.paired(f"ire_x10:{m}", "adamw_x10"))
                        for m in methods}, "summary": t.summary()}


def run(spec: Micro, args: Any) -> None:
  import jax

  out = f"{args.out or RESULTS}/{spec.name}"
  methods = args.methods or [m for m in METHODS if m != "native" or jax.default_backend() == "cpu"]
  reps = args.reps or spec.reps
  g2, model = model_g2(args.data_dir)
  old = read_results(out + ".json") if args.resume else None
  results = list(old["details"]) if old else []
  for n in (int(s) for s in args.sizes or spec.sizes):
    for kind in args.kinds:
      if any((r["kind"], r["n"]) == (kind, n) for r in results):
        continue
      results.append(measure(kind, n, methods, reps, g2))
      rows = [time_row(f"{name} ({m})", "AdamW", f"{x['kind']} keys, N={x['n']:.0e}", what,
                       v["median"], spec.name, n=x["reps"])
              for key, name, what in (("refresh", "flat_mask", "refresh / AdamW update"),
                                      ("amortized", "AdamW+IRE", f"update (K={K})"))
              for x in results for m, v in x[key].items()]
      used = {m for x in results for m in x["refresh"]}
      write_micro(spec.name, args.out, rows=rows, details=results, model=model, gamma=GAMMA,
                  K=K, methods=[m for m in METHODS if m in used])


@renders("selection")
def render(doc: Mapping[str, Any]) -> dict[str, str]:
  meta, res = doc["meta"], doc["details"]
  methods, kinds = meta["methods"], [k for k in KINDS if any(r["kind"] == k for r in res)]
  res = sorted(res, key=lambda r: (r["n"], KINDS.index(r["kind"])))
  cell = lambda d: bounds(d["median"], d["min"], d["max"]) if d else "—"
  load = lambda r: ("—" if r["load_before"] is None
                    else f"{r['load_before']:.1f}→{r['load_after']:.1f}")
  sizes = sorted({r["n"] for r in res})
  over = lambda key, m, n: span([r[key][m]["median"] for r in res
                                 if r["n"] == n and m in r.get(key, {})])
  return {"benchmarks/results/selection.md": fill("selection.md", {
      "machine": meta["machine"]["summary"], "model": meta["model"], "K": meta["K"],
      "leaves": 3 * TREE_BLOCKS, "blocks": TREE_BLOCKS,
      "reps": span([r["reps"] for r in res], "d"),
      "targets": "; ".join(f"{key} ≤ {v:.2f}: " + ", ".join(
          f"{m} " + metrics.target_verdict([r[key][m]["median"] for r in res
                                           if m in r.get(key, {})], v) for m in methods)
          for key, v in TARGETS.items()),
      "refresh": table(["keys", "N", "AdamW update (ms)", *methods, "load"],
                       [[r["kind"], f"{r['n']:.0e}", f"{r['adamw_ms']:.1f}",
                         *(cell(r["refresh"].get(m)) for m in methods), load(r)] for r in res],
                       "llr" + "r" * len(methods)),
      "amortized": table(["keys", "N", *methods],
                         [[r["kind"], f"{r['n']:.0e}", *(cell(r["amortized"].get(m))
                                                         for m in methods)] for r in res],
                         "ll" + "r" * len(methods))}),
      "docs/selection.md#selection-cost": fill("selection_digest.md", {
          "machine": meta["machine"]["summary"], "kinds": ", ".join(kinds),
          "table": table(["N", *(f"refresh, {m} (AdamW updates)" for m in methods),
                          *(f"amortized K = {meta['K']}, {m}" for m in methods)],
                         [[f"{n:.0e}", *(over("refresh", m, n) for m in methods),
                           *(over("amortized", m, n) for m in methods)] for n in sizes],
                         "r" * (1 + 2 * len(methods)))})}
