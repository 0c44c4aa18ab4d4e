"""IRE's exact selection per counting method, in units of one ``optax.adamw`` update.

For each counting method of :mod:`ire_optax._src.selection` available on this
backend (``native``: the C++ CPU kernel; ``threshold``: scatter-free
compare-and-count passes; ``scatter``: XLA scatter-add histograms) and each
size N, it times in one process, interleaved, repetition after repetition:

* one refresh -- ``flat_mask(h, 0.6, method=m)`` over N float32 values -- as
  a ratio to one jitted ``optax.adamw`` update of N parameters;
* the amortized cost of ``ire(adamw)`` at K = 10 (ten IRE steps, one refresh)
  over ten AdamW steps, the method chosen with ``ire_optax.selection_method``.

Key distributions: ``uniform`` (U(0, 1)), ``model`` (g² of a small MLP's
gradient on a batch of MNIST from ``--data-dir``, else scikit-learn's digits,
tiled to N: heavy ties, the few hundred histogram bins real g² keys crowd
into), ``model_tree`` (the same keys as a convnet-shaped tree of 63 leaves: 21
large kernels, each with two small BatchNorm vectors) and ``one_bin`` (every key
in one 65,536-bin bucket: the scatter's worst contention, and the low pass sees
all N values).

Targets: refresh <= 2 AdamW updates, amortized <= 1.10. Run it on any
backend; the committed table is the CPU's (``benchmarks/results/selection.md``).

  python benchmarks/bench_selection.py                   # 1e6, 1e7, 5e7 (minutes)
  python benchmarks/bench_selection.py --smoke           # seconds (the test's run)
  flock /tmp/ire_bench.lock python benchmarks/bench_selection.py --data-dir DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ire_optax
from ire_optax._src import native

KINDS = ("uniform", "model", "model_tree", "one_bin")
# model_tree: the model keys as a tree shaped like a convnet's parameters: 21 blocks of a
# large kernel and two small vectors (BatchNorm's scale and bias), 63 leaves.
TREE_BLOCKS = 21
GAMMA, K = 0.6, 10
TARGET_REFRESH, TARGET_AMORTIZED = 2.0, 1.10


def methods_here() -> list[str]:
  out = ["threshold", "scatter"]
  if jax.default_backend() == "cpu" and native.enabled():
    out.insert(0, "native")
  return out


def model_g2(data_dir: str | None, seed: int = 0) -> tuple[np.ndarray, str]:
  """g² of a small ReLU MLP's cross-entropy gradient on 256 training images."""
  img = C.load_images(data_dir)
  x = jnp.asarray(img.x_train[:256])
  y = jnp.asarray(img.y_train[:256])
  d = int(np.prod(img.x_train.shape[1:]))
  params = C.mlp_init(jax.random.key(seed), [d, 256, 128, 10])
  g = jax.grad(lambda p: C.cross_entropy(C.mlp_logits(p, x), y))(params)
  flat = np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(g)])
  return (flat * flat).astype(np.float32), f"MLP {d}-256-128-10 on {img.name}"


def keys_of(kind: str, n: int, g2: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  if kind == "uniform":
    return rng.random(n, dtype=np.float32)
  if kind in ("model", "model_tree"):
    return np.resize(g2, n)
  # one_bin: 1 + j * 2**-23 for j < 2**16: the top 16 key bits are all the same.
  return (np.float32(1.0) + rng.integers(0, 1 << 16, n).astype(np.float32)
          * np.float32(2.0**-23)).astype(np.float32)


def tree_sizes(n: int) -> list[int]:
  """Leaf sizes of ``model_tree`` for N = ``n``: 21 blocks of a large kernel and two small
  vectors (63 leaves summing to ``n``)."""
  small = max(1, n // TREE_BLOCKS // 512)
  sizes: list[int] = []
  for b in range(TREE_BLOCKS):
    big = (n - sum(sizes)) // (TREE_BLOCKS - b) - 2 * small
    sizes += [big, small, small]
  sizes[-1] += n - sum(sizes)
  return sizes


def tree_of(kind: str, flat: jax.Array) -> dict[str, jax.Array]:
  """The keys as the benchmark's pytree: one leaf, or ``model_tree``'s 63 leaves."""
  if kind != "model_tree":
    return {"w": flat}
  parts = jnp.split(flat, np.cumsum(tree_sizes(flat.shape[0]))[:-1].tolist())
  return {f"l{i:02d}": x for i, x in enumerate(parts)}


def _adamw_step(opt):
  def step(carry, g):
    p, s = carry
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s
  return jax.jit(step, donate_argnums=0)


def measure(kind: str, n: int, methods: list[str], reps: int, g2: np.ndarray,
            amortized: bool) -> dict[str, Any]:
  rng = np.random.default_rng(n)
  grads = tree_of(kind, jnp.asarray(keys_of(kind, n, g2, rng)))
  zeros = lambda: jax.tree.map(jnp.zeros_like, grads)
  adamw = optax.adamw(1e-3)

  def fresh():  # each stepper donates its own carry
    params = zeros()
    return params, adamw.init(params)

  blocks: dict[str, Any] = {
      "adamw": C.Stepper(_adamw_step(adamw), fresh(), 1, lambda i: (grads,))}
  for m in methods:
    f = jax.jit(lambda t, m=m: ire_optax.flat_mask(t, GAMMA, method=m))
    jax.block_until_ready(f(grads))
    blocks[f"refresh:{m}"] = lambda f=f: f(grads)
  if amortized:
    blocks["adamw_x10"] = C.Stepper(_adamw_step(adamw), fresh(), K, lambda i: (grads,))
    for m in methods:
      with ire_optax.selection_method(m):  # read when the step is traced: trace it here
        tx = ire_optax.ire(optax.adamw(1e-3), gamma=GAMMA, refresh_every=K)
        step = _adamw_step(tx)
        carry = step((zeros(), tx.init(zeros())), grads)
        jax.block_until_ready(carry)
      blocks[f"ire_x10:{m}"] = C.Stepper(step, carry, K, lambda i: (grads,))
  load0 = C.loadavg()
  t = C.time_interleaved(blocks, baseline="adamw", reps=reps, warmup=1)
  out: dict[str, Any] = {"kind": kind, "n": n, "reps": reps, "load_before": load0,
                         "load_after": C.loadavg(), "adamw_ms": 1e3 * t.median("adamw"),
                         "refresh": {}, "amortized": {}, "summary": t.summary()}
  for m in methods:
    p = t.paired(f"refresh:{m}")
    out["refresh"][m] = {"median": t.ratio(f"refresh:{m}"), "min": min(p), "max": max(p)}
    if amortized:
      p = t.paired(f"ire_x10:{m}", "adamw_x10")
      out["amortized"][m] = {"median": t.ratio(f"ire_x10:{m}", "adamw_x10"), "min": min(p),
                             "max": max(p)}
  return out


def _fmt(r: dict[str, float] | None) -> str:
  if not r:
    return "–"
  return f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"


def markdown(meta: dict[str, Any], results: list[dict[str, Any]], methods: list[str]) -> str:
  order = {k: i for i, k in enumerate(KINDS)}
  results = sorted(results, key=lambda r: (r["n"], order.get(r["kind"], len(KINDS))))
  lines = [
      "# Exact selection: cost per counting method",
      "",
      "Written by `benchmarks/bench_selection.py` "
      f"(`{meta['command']}`). Machine: {meta['machine']['summary']}.",
      f"Real-gradient keys: {meta['model']}, tiled to N (`model`: one leaf; `model_tree`: "
      f"{3 * TREE_BLOCKS} leaves shaped like a convnet's, {TREE_BLOCKS} large kernels each "
      "with two small BatchNorm vectors). Each cell: median of the paired "
      "ratios over the repetitions (min–max); the load average is recorded before and after "
      "each size (a shared machine: other jobs inflate every time, the paired ratios less).",
      "",
      f"Targets: refresh ≤ {TARGET_REFRESH:g} AdamW updates, amortized IRE/AdamW at K = {K} "
      f"≤ {TARGET_AMORTIZED:.2f}.",
      "",
      "## One refresh, in AdamW updates",
      "",
      "| keys | N | AdamW update (ms) | " + " | ".join(methods) + " | load |",
      "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " | --- |",
  ]
  for r in results:
    load = f"{r['load_before']:.1f}→{r['load_after']:.1f}" if r["load_before"] is not None else ""
    lines.append(f"| {r['kind']} | {r['n']:.0e} | {r['adamw_ms']:.1f} | "
                 + " | ".join(_fmt(r["refresh"].get(m)) for m in methods) + f" | {load} |")
  if any(r["amortized"] for r in results):
    lines += ["", f"## Amortized: ten IRE(AdamW) steps (K = {K}) over ten AdamW steps", "",
              "| keys | N | " + " | ".join(methods) + " |",
              "| --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    for r in results:
      if r["amortized"]:
        lines.append(f"| {r['kind']} | {r['n']:.0e} | "
                     + " | ".join(_fmt(r["amortized"].get(m)) for m in methods) + " |")
  lines += ["", "–: not measured at that size (see the command). `auto` uses `native` on the "
            "CPU, `threshold` on TPU and GPU; TPU and GPU numbers need such a device: none was "
            "available for this table."]
  return "\n".join(lines)


def _public_args(argv: list[str]) -> list[str]:
  """The command line without machine paths (``--out``/``--data-dir`` values)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in ("--out", "--data-dir"):
      out.append(a + " DIR")
      skip = True
    elif not a.startswith(("--out=", "--data-dir=")):
      out.append(a)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="1e6,1e7,5e7", help="comma-separated N values")
  parser.add_argument("--kinds", default=",".join(KINDS))
  parser.add_argument("--methods", default=None, help="default: every method this backend has")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--no-amortized", action="store_true")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repetitions")
  parser.add_argument("--out", default=str(C.RESULTS / "selection"))
  parser.add_argument("--resume", action="store_true",
                      help="keep the (keys, N) results already in --out, measure the rest")
  C.add_data_dir_argument(parser)
  args = parser.parse_args(argv)
  sizes = [int(float(s)) for s in args.sizes.split(",")]
  reps = args.reps
  if args.smoke:
    sizes, reps = [20_000], 1
  methods = args.methods.split(",") if args.methods else methods_here()
  kinds = args.kinds.split(",")
  g2, model = model_g2(args.data_dir)
  meta = {"machine": C.machine(), "model": model, "sizes": sizes, "reps": reps, "gamma": GAMMA,
          "K": K, "methods": methods,
          "command": " ".join(["python benchmarks/bench_selection.py", *_public_args(
              sys.argv[1:] if argv is None else argv)])}
  results: list[dict[str, Any]] = []
  old = C.read_results(args.out + ".json") if args.resume else None
  if old:
    results = list(old["details"])
    meta["command"] = old["meta"]["command"] + " ; then " + meta["command"]
    meta["methods"] = sorted(set(meta["methods"]) | set(old["meta"]["methods"]),
                             key=["native", "threshold", "scatter"].index)
  done = {(r["kind"], r["n"]) for r in results}
  for n in sizes:
    for kind in kinds:
      if (kind, n) in done:
        continue
      t0 = time.perf_counter()
      r = measure(kind, n, methods, reps, g2, amortized=not args.no_amortized)
      results.append(r)
      print(f"{kind:8s} N={n:.0e} adamw {r['adamw_ms']:.1f} ms  refresh "
            + "  ".join(f"{m} {_fmt(v)}" for m, v in r["refresh"].items())
            + ("  amortized " + "  ".join(f"{m} {_fmt(v)}" for m, v in r["amortized"].items())
               if r["amortized"] else "")
            + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
      rows = [C.time_row(f"flat_mask ({m})", "AdamW", f"{x['kind']} keys, N={x['n']:.0e}",
                         "refresh / AdamW update", v["median"], "bench_selection", n=reps)
              for x in results for m, v in x["refresh"].items()]
      rows += [C.time_row(f"AdamW+IRE ({m})", "AdamW", f"{x['kind']} keys, N={x['n']:.0e}",
                          f"update (K={K})", v["median"], "bench_selection", n=reps)
               for x in results for m, v in x["amortized"].items()]
      C.write_results(args.out, benchmark="bench_selection", meta=meta, rows=rows,
                      details=results, markdown=markdown(meta, results, meta["methods"]))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
