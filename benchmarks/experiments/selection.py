"""Selection: IRE's exact refresh per counting method, and AdamW+IRE's update, over AdamW's.

Refresh keys: ``uniform``; ``model`` (g² of a small MLP's gradient, tiled to N); ``model_tree``
(the same as 63 convnet-shaped leaves); ``one_bin`` (every key in one 65,536-bin bucket). The
update: AdamW+IRE (plain, refresh, a K-step cycle) over ``optax.adamw`` on a model-like tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from benchmarks import data, metrics, timing
from benchmarks.render import bounds, fill, renders, span, table
from benchmarks.schema import time_row, write_micro
from benchmarks.spec import Micro

KINDS = ("uniform", "model", "model_tree", "one_bin")
METHODS = ("native", "threshold", "scatter")
SPEC = Micro(name="selection", measures="one refresh, and IRE(AdamW) at K=10, in AdamW updates",
             blocks=("adamw", *METHODS), baseline="adamw",
             sizes=tuple((kind, n) for n in (1e6, 1e7, 5e7) for kind in KINDS), reps=9,
             smoke={"sizes": (("one_bin", 2e4),), "reps": 1,
                    "blocks": ("adamw", "native", "scatter")})
TREE_BLOCKS, GAMMA, K = 21, 0.6, 10  # model_tree: 21 blocks of a large kernel and two vectors
SORT_MAX = THRESHOLD_MAX = 10_000_000  # larger N skip the jnp.sort and `threshold` blocks
TARGETS = {"refresh": 2.0, "amortized": 1.10}  # in AdamW updates; IRE/AdamW at K
UPDATE_TARGETS = {"amortized": 1.15, "refresh": 2.0}  # over AdamW, on the cpu clock


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
  """One key distribution at one N: each method's refresh, and IRE's K-step cycle."""
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
  methods = [m for m in methods if m != "threshold" or n <= THRESHOLD_MAX]
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


def tree(n: int, seed: int = 0) -> dict[str, Any]:
  """A model-like tree of ``n`` float32 values: 60%, 25%, 10% and the rest."""
  import jax.numpy as jnp
  import numpy as np

  sizes = [int(n * 0.6), int(n * 0.25), int(n * 0.1)]
  sizes.append(n - sum(sizes))
  rng = np.random.default_rng(seed)
  return {f"p{i}": jnp.asarray(rng.standard_normal(s), jnp.float32) for i, s in enumerate(sizes)}


def measure_update(n: int, reps: int) -> dict[str, Any]:
  """AdamW+IRE's update on a tree of ``n`` parameters, derived per clock."""
  import jax
  import jax.numpy as jnp
  import optax

  import ire_optax

  params, grads = tree(n), tree(n, seed=1)
  adamw = lambda: optax.adamw(1e-3, b2=0.95, weight_decay=0.1)
  ire = lambda every: ire_optax.ire(adamw(), kappa=3.0, gamma=GAMMA, refresh_every=every)
  h, k = jax.tree.map(jnp.square, grads), int(GAMMA * n)
  select = lambda **kw: jax.jit(lambda t: ire_optax.kth_smallest(t, k, **kw))
  flat = lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(t)])
  # refresh_every 1: every step refreshes; 2**31 - 1: only the untimed first one does.
  blocks: dict[str, Any] = {
      "adamw": timing.update_stepper(adamw(), params, grads),
      "ire_refresh": timing.update_stepper(ire(1), params, grads),
      "ire_plain": timing.update_stepper(ire(2**31 - 1), params, grads),
      "cycle_adamw": timing.update_stepper(adamw(), params, grads, K),
      "cycle_ire": timing.update_stepper(ire(K), params, grads, K),
      "radix": partial(select(), h), "radix_xla": partial(select(method="scatter"), h)}
  if n <= SORT_MAX:
    blocks["sort"] = partial(jax.jit(lambda t: jnp.sort(flat(t))[k - 1]), h)
  t = timing.time_interleaved(blocks, baseline="adamw", reps=reps)
  row: dict[str, Any] = {"n": n, "reps": reps}
  for clock in ("wall", "cpu"):
    c, a = t.on(clock), t.on(clock).median("adamw")
    row[clock] = {
        "adamw_ms": a * 1e3, "adamw_ns_per_param": a / n * 1e9,
        "ire_plain_ratio": c.ratio("ire_plain"), "ire_refresh_ratio": c.ratio("ire_refresh"),
        "amortized_ratio_K10": c.ratio("cycle_ire", "cycle_adamw"),
        "refresh_cost_adamw_updates": (c.median("ire_refresh") - c.median("ire_plain")) / a,
        "radix_select_adamw_updates": c.ratio("radix"),
        "radix_select_xla_scatter_adamw_updates": c.ratio("radix_xla"),
        "sort_select_adamw_updates": c.ratio("sort") if "sort" in blocks else None}
  size = lambda tx: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      jax.eval_shape(tx.init, params)))
  row["extra_state_bytes_per_param"] = (size(ire(K)) - size(adamw())) / n
  return row


def run(spec: Micro, args: Any) -> None:
  import jax

  methods = [m for m in spec.blocks[1:] if m != "native" or jax.default_backend() == "cpu"]
  g2, model = model_g2(args.data_dir)
  results = [measure(kind, int(n), methods, spec.reps, g2) for kind, n in spec.sizes]
  update = [measure_update(n, spec.reps) for n in sorted({int(n) for _, n in spec.sizes})]
  rows = [time_row("AdamW+IRE", "AdamW", f"synthetic tree, {r['n']:,} params", f"update (K={K})",
                   r["cpu"]["amortized_ratio_K10"], spec.name,
                   f"refresh = {r['cpu']['refresh_cost_adamw_updates']:.1f} AdamW updates "
                   "(CPU time)", variant="grad_sq", n=spec.reps) for r in update]
  rows += [time_row(f"{name} ({m})", "AdamW", f"{x['kind']} keys, N={x['n']:.0e}", what,
                    v["median"], spec.name, n=x["reps"])
           for key, name, what in (("refresh", "flat_mask", "refresh / AdamW update"),
                                   ("amortized", "AdamW+IRE", f"update (K={K})"))
           for x in results for m, v in x[key].items()]
  write_micro(spec.name, args.out, rows=rows, model=model, gamma=GAMMA, K=K, methods=methods,
              details={"refresh": results, "update": {
                  "machine": timing.machine()["summary"], "reps": spec.reps,
                  "selection": f"auto on {jax.default_backend()}", "rows": update}})


# The update table's columns of each clock: (header, key, format).
COLUMNS = (("AdamW update (ms)", "adamw_ms", ".1f"),
           ("IRE plain step / AdamW", "ire_plain_ratio", ".3f"),
           ("IRE refresh step / AdamW", "ire_refresh_ratio", ".2f"),
           (f"amortized (K={K}) / AdamW", "amortized_ratio_K10", ".3f"),
           ("refresh cost (AdamW updates)", "refresh_cost_adamw_updates", ".2f"),
           ("select, default method (AdamW updates)", "radix_select_adamw_updates", ".2f"),
           ("select, XLA scatter (AdamW updates)", "radix_select_xla_scatter_adamw_updates",
            ".2f"),
           ("jnp.sort select (AdamW updates)", "sort_select_adamw_updates", ".1f"))


def update_context(u: Mapping[str, Any]) -> dict[str, Any]:
  """The template fields of the update section (``details.update``)."""
  rows = u["rows"]
  f = lambda v, fmt: "—" if v is None else f"{v:{fmt}}"
  cpu = lambda key: [r["cpu"][key] for r in rows]
  return {
      "u_machine": u["machine"], "u_reps": u["reps"], "u_selection": u["selection"],
      "u_targets": UPDATE_TARGETS, "sort_max": SORT_MAX,
      "u_table": table(["params", "clock", *(c[0] for c in COLUMNS), "extra state bytes/param"],
                       [[f"{r['n']:,}", clock,
                         *(f(r[clock][key], fmt) for _, key, fmt in COLUMNS),
                         f(r["extra_state_bytes_per_param"], ".3f")]
                        for r in rows for clock in ("wall", "cpu")],
                       "rl" + "r" * (len(COLUMNS) + 1)),
      "v_amortized": metrics.target_verdict(cpu("amortized_ratio_K10"),
                                            UPDATE_TARGETS["amortized"]),
      "v_refresh": metrics.target_verdict(cpu("refresh_cost_adamw_updates"),
                                          UPDATE_TARGETS["refresh"])}


@renders("selection")
def render(doc: Mapping[str, Any]) -> dict[str, str]:
  meta, res = doc["meta"], doc["details"]["refresh"]
  methods, kinds = meta["methods"], [k for k in KINDS if any(r["kind"] == k for r in res)]
  res = sorted(res, key=lambda r: (r["n"], KINDS.index(r["kind"])))
  cell = lambda d: bounds(d["median"], d["min"], d["max"]) if d else "—"
  load = lambda r: ("—" if r["load_before"] is None
                    else f"{r['load_before']:.1f}→{r['load_after']:.1f}")
  sizes = sorted({r["n"] for r in res})
  over = lambda key, m, n: span([r[key][m]["median"] for r in res
                                 if r["n"] == n and m in r.get(key, {})])
  return {"benchmarks/results/selection.md": fill("selection.md", {
      "machine": meta["machine"]["summary"], "command": meta["command"],
      "model": meta["model"], "K": meta["K"],
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
                         "ll" + "r" * len(methods)),
      **update_context(doc["details"]["update"])}),
      "docs/selection.md#selection-cost": fill("selection_digest.md", {
          "machine": meta["machine"]["summary"], "kinds": ", ".join(kinds),
          "table": table(["N", *(f"refresh, {m} (AdamW updates)" for m in methods),
                          *(f"amortized K = {meta['K']}, {m}" for m in methods)],
                         [[f"{n:.0e}", *(over("refresh", m, n) for m in methods),
                           *(over("amortized", m, n) for m in methods)] for n in sizes],
                         "r" * (1 + 2 * len(methods)))})}
