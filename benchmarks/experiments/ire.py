"""IRE: AdamW+IRE's update (plain, refresh, amortized K = 10) over one optax.adamw update."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from benchmarks import metrics, timing
from benchmarks.render import fill, renders, span, table
from benchmarks.schema import time_row, write_micro
from benchmarks.spec import Micro

SPEC = Micro(
    name="ire", measures="AdamW+IRE update time over optax.adamw's (kappa 3, gamma 0.6, grad_sq)",
    blocks=("adamw", "ire_refresh", "ire_plain", "cycle_adamw", "cycle_ire", "radix",
            "radix_xla", "sort"),
    baseline="adamw", sizes=(1_000_000, 10_000_000, 50_000_000), reps=9,
    smoke={"sizes": (4000,), "reps": 2})
SORT_MAX = 10_000_000  # larger trees skip the jnp.sort reference
K = 10
TARGETS = {"amortized": 1.15, "refresh": 2.0}  # over AdamW, on the cpu clock


def tree(n: int, seed: int = 0) -> dict[str, Any]:
  """A model-like tree of ``n`` float32 values: 60%, 25%, 10% and the rest."""
  import jax.numpy as jnp
  import numpy as np

  sizes = [int(n * 0.6), int(n * 0.25), int(n * 0.1)]
  sizes.append(n - sum(sizes))
  rng = np.random.default_rng(seed)
  return {f"p{i}": jnp.asarray(rng.standard_normal(s), jnp.float32) for i, s in enumerate(sizes)}


def measure(n: int, reps: int) -> dict[str, Any]:
  """One size: the timings, derived per clock (the ``details.rows`` entry)."""
  import jax
  import jax.numpy as jnp
  import optax

  import ire_optax

  params, grads = tree(n), tree(n, seed=1)
  adamw = lambda: optax.adamw(1e-3, b2=0.95, weight_decay=0.1)
  ire = lambda every: ire_optax.ire(adamw(), kappa=3.0, gamma=0.6, refresh_every=every)
  h, k = jax.tree.map(jnp.square, grads), int(0.6 * n)
  select = lambda **kw: jax.jit(lambda t: ire_optax.kth_smallest(t, k, **kw))
  flat = lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(t)])
  # refresh_every 1: every step refreshes; 2**31 - 1: only the untimed first one does.
  blocks: dict[str, Any] = {
      "adamw": timing.update_stepper(adamw(), params, grads),
      "ire_refresh": timing.update_stepper(ire(1), params, grads),
      "ire_plain": timing.update_stepper(ire(2**31 - 1), params, grads),
      "cycle_adamw": timing.update_stepper(adamw(), params, grads, K),
      "cycle_ire": timing.update_stepper(ire(K), params, grads, K),
      "radix": partial(select(), h), "radix_xla": partial(select(method="scatter"), h),
      "sort": partial(jax.jit(lambda t: jnp.sort(flat(t))[k - 1]), h)}
  if n > SORT_MAX:
    del blocks["sort"]
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

  sizes = [measure(n, spec.reps) for n in spec.sizes]
  rows = [time_row("AdamW+IRE", "AdamW", f"synthetic tree, {r['n']:,} params", f"update (K={K})",
                   r["cpu"]["amortized_ratio_K10"], spec.name,
                   f"refresh = {r['cpu']['refresh_cost_adamw_updates']:.1f} AdamW updates "
                   "(CPU time)", variant="grad_sq", n=spec.reps) for r in sizes]
  meta = {"reps": spec.reps, "selection": f"auto on {jax.default_backend()}"}
  write_micro(spec.name, args.out, rows=rows, details={"rows": sizes, "meta": meta})


# The report's columns of each clock: (header, key, format).
COLUMNS = (("AdamW update (ms)", "adamw_ms", ".1f"),
           ("IRE plain step / AdamW", "ire_plain_ratio", ".3f"),
           ("IRE refresh step / AdamW", "ire_refresh_ratio", ".2f"),
           (f"amortized (K={K}) / AdamW", "amortized_ratio_K10", ".3f"),
           ("refresh cost (AdamW updates)", "refresh_cost_adamw_updates", ".2f"),
           ("select, default method (AdamW updates)", "radix_select_adamw_updates", ".2f"),
           ("select, XLA scatter (AdamW updates)", "radix_select_xla_scatter_adamw_updates",
            ".2f"),
           ("jnp.sort select (AdamW updates)", "sort_select_adamw_updates", ".1f"))


@renders("ire")
def render(doc: Mapping[str, Any]) -> dict[str, str]:
  rows, meta = doc["details"]["rows"], doc["details"]["meta"]
  f = lambda v, fmt: "—" if v is None or v != v else f"{v:{fmt}}"
  main = [[f"{r['n']:,}", clock, *(f(r[clock].get(key), fmt) for _, key, fmt in COLUMNS),
           f(r["extra_state_bytes_per_param"], ".3f")] for r in rows for clock in ("wall", "cpu")]
  cpu = lambda key: [r["cpu"][key] for r in rows]
  return {"benchmarks/results/ire.md": fill("ire.md", {
      "machine": doc["meta"]["machine"]["summary"], "reps": meta.get("reps", rows[0]["reps"]),
      "selection": meta["selection"], "K": K, "targets": TARGETS, "sort_max": SORT_MAX,
      "table": table(["params", "clock", *(c[0] for c in COLUMNS), "extra state bytes/param"],
                     main, "rl" + "r" * (len(COLUMNS) + 1)),
      "v_amortized": metrics.target_verdict(cpu("amortized_ratio_K10"), TARGETS["amortized"]),
      "v_refresh": metrics.target_verdict(cpu("refresh_cost_adamw_updates"), TARGETS["refresh"]),
      "amortized": span(cpu("amortized_ratio_K10"), ".3f"),
      "refresh": span(cpu("refresh_cost_adamw_updates")),
      "bytes": span([r["extra_state_bytes_per_param"] for r in rows], ".3f"),
      "adamw_ns": span(cpu("adamw_ns_per_param")),
      "scatter": span(cpu("radix_select_xla_scatter_adamw_updates")),
      "default": span(cpu("radix_select_adamw_updates")),
      "sort": span([v for v in cpu("sort_select_adamw_updates") if v == v], ".0f")})}  # not NaN
