"""Multidevice: data-parallel train steps on 1-8 emulated devices, and IRE's sharded refresh.

Each device count D runs in a process of its own (``--xla_force_host_platform_device_count``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

from benchmarks import data, timing
from benchmarks.render import ROOT, fill, machine, renders, span, table
from benchmarks.schema import time_row, write_micro
from benchmarks.spec import Micro

OPTS = ("adamw", "adamw+ire", "sam", "msam")
TARGETS = {"adamw+ire": 1.15, "sam": 2.05, "msam": 2.05 * 1.15}  # single-device, over AdamW
SPEC = Micro(name="multidevice", measures="train-step time over AdamW's per device count",
             blocks=OPTS, baseline="adamw", sizes=(1, 2, 4, 8), reps=9,
             smoke={"sizes": (1, 2), "reps": 1})
BATCH, HIDDEN, STEPS, MICROBATCHES, REFRESH_SHAPE = 1024, 512, 10, 8, (4096, 1024)
# The refresh table's columns of each parameter placement: (header, key, format).
PLACES = ("replicated", "sharded")
REFRESH = (("refresh ms", "ire_refresh_ms", ".1f"), ("AdamW ms", "adamw_update_ms", ".1f"),
           ("refresh / AdamW", "refresh_over_adamw", ".2f"))


def worker(devices: int, reps: int) -> dict:
  """The measurements on ``devices`` emulated devices (run in a process of its own)."""
  import jax
  import numpy as np

  # Explicit axes, the default from JAX 0.9 on, named so every supported JAX measures the same.
  mesh = jax.make_mesh((devices,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(0)
  digits = data.load_images(None)
  idx = rng.integers(0, len(digits.x_train), BATCH)
  batch = {"x": digits.x_train[idx].reshape(BATCH, -1), "y": digits.y_train[idx]}
  params = jax.tree.map(np.asarray, data.mlp_init(jax.random.key(0), (64, HIDDEN, HIDDEN, 10)))
  placements = {p: train_steps(mesh, axis, params, batch, reps)
                for p, axis in (("shard_map", "d"), ("gspmd", None))}
  P = jax.sharding.PartitionSpec
  return {"devices": devices, "params": sum(v.size for v in jax.tree.leaves(params)),
          "placements": placements,
          "refresh": {p: refresh(mesh, spec, rng, reps)
                      for p, spec in (("replicated", P()), ("sharded", P("d", None)))},
          "refresh_params": int(np.prod(REFRESH_SHAPE))}


def train_steps(mesh: Any, axis: str | None, params: Any, batch: Any, reps: int) -> dict:
  """Every optimizer's train step, under ``shard_map`` over ``axis`` (or GSPMD if None)."""
  import jax
  import optax

  import ire_optax

  P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
  grad = jax.grad(lambda p, b: data.cross_entropy(data.mlp_logits(p, b["x"]), b["y"]))
  adamw = optax.adamw(1e-3, weight_decay=0.1)
  m = MICROBATCHES // mesh.size if axis else MICROBATCHES
  txs = {"adamw": adamw, "adamw+ire": ire_optax.ire(adamw, kappa=3.0, gamma=0.6,
                                                    refresh_every=10, axis_name=axis),
         "sam": ire_optax.sam(adamw, rho=0.05, axis_name=axis),
         # vmap, as measured (the default then; "auto" is "unroll" on the CPU now)
         "msam": ire_optax.msam(adamw, rho=0.05, num_microbatches=m, axis_name=axis,
                                microbatch_mode="vmap")}

  def step(p, s, b, name, tx):
    if name == "msam":
      u, s = tx.update(None, s, p, grad_fn=grad, batch=b)
    else:
      g = grad(jax.lax.pcast(p, axis, to="varying") if axis else p, b)
      g = jax.lax.pmean(g, axis) if axis and name != "sam" else g
      u, s = tx.update(g, s, p, **({"grad_fn": lambda q: grad(q, b)} if name == "sam" else {}))
    return optax.apply_updates(p, u), s

  gbatch, rep = jax.device_put(batch, NS(mesh, P("d"))), NS(mesh, P())
  blocks = {}
  for name, tx in txs.items():
    f = lambda p, s, b, name=name, tx=tx: step(p, s, b, name, tx)
    if axis:
      f = jax.shard_map(f, mesh=mesh, in_specs=(P(), P(), P(axis)), out_specs=(P(), P()))
    jitted = jax.jit(f, donate_argnums=(0, 1))
    blocks[name] = timing.Stepper(lambda c, f=jitted, b=gbatch: f(*c, b),
                                  jax.device_put((params, tx.init(params)), rep), STEPS)
  t = timing.time_interleaved(blocks, baseline="adamw", reps=reps, units=STEPS)
  return {n: {"ms_per_step": 1e3 * t.median(n), "examples_per_s": BATCH / t.median(n),
              "time_ratio_to_adamw": t.ratio(n)} for n in OPTS}


def refresh(mesh: Any, spec: Any, rng: Any, reps: int) -> dict:
  """IRE's refresh (every call of ``ire`` with K = 1 on one state) over an AdamW update."""
  import jax
  import numpy as np
  import optax

  import ire_optax

  tp, tg = (jax.device_put({"w": rng.standard_normal(REFRESH_SHAPE).astype(np.float32)},
                           {"w": jax.sharding.NamedSharding(mesh, spec)}) for _ in range(2))
  fns = {}
  for name, tx in (("adamw", optax.adamw(1e-3)), ("ire_refresh", ire_optax.ire(
      optax.adamw(1e-3), kappa=3.0, gamma=0.6, refresh_every=1))):
    fns[name] = partial(jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)[0]), tg,
                        tx.init(tp), tp)
  t = timing.time_interleaved(fns, baseline="adamw", reps=reps)
  return {"ire_refresh_ms": 1e3 * t.median("ire_refresh"),
          "adamw_update_ms": 1e3 * t.median("adamw"), "refresh_over_adamw": t.ratio("ire_refresh")}


def run(spec: Micro, args: Any) -> None:
  t0, results = time.perf_counter(), []
  for d in spec.sizes:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={d}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-m", __name__, str(d), str(spec.reps)], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode:
      raise RuntimeError(f"worker D={d} failed:\n{proc.stderr[-4000:]}")
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  one = next(r for r in results if r["devices"] == 1)
  names = {"adamw+ire": ("AdamW+IRE", "grad_sq"), "sam": ("SAM", ""),
           "msam": ("mSAM", "m=8, vmap")}
  rows = [time_row(label, "AdamW", f"MLP {one['params']:,} params, digits, 1 device",
                   "train step", opts[key]["time_ratio_to_adamw"], spec.name,
                   f"jit over {placement}", variant, n=spec.reps)
          for placement, opts in one["placements"].items()
          for key, (label, variant) in names.items()]
  write_micro(spec.name, args.out, rows=rows,
              details={"reps": spec.reps, "global_batch": BATCH, "targets": TARGETS,
                       "results": results, "wall_s": time.perf_counter() - t0})


@renders("multidevice")
def render(doc: Mapping[str, Any]) -> dict[str, str]:
  d, res = doc["details"], doc["details"]["results"]
  ratio = lambda r, p, o: r["placements"][p][o]["time_ratio_to_adamw"]
  cell = lambda v, o: f"{v:.2f}" + ("" if v <= TARGETS[o] else " ✗")
  cells = lambda o: [ratio(r, p, o) for r in res for p in ("shard_map", "gspmd")]
  msam_sam = lambda devices: span([ratio(r, p, "msam") / ratio(r, p, "sam") for r in res
                                   for p in ("shard_map", "gspmd") if r["devices"] == devices])
  fresh = lambda r, p: r["refresh"][p]
  speedup = lambda r: fresh(r, "replicated")["ire_refresh_ms"] / fresh(r, "sharded")[
      "ire_refresh_ms"]
  return {"benchmarks/results/multidevice.md": fill("multidevice.md", {
      "machine": machine(doc), "reps": d["reps"], "batch": d["global_batch"], "hidden": HIDDEN,
      "steps": STEPS, "params": res[0]["params"], "wall_s": d["wall_s"],
      "refresh_params": res[0]["refresh_params"], "msam_target": TARGETS["msam"],
      "train": table(["placement", "D", *(f"{o} ex/s" for o in OPTS),
                      *(f"{o} / adamw" for o in OPTS[1:]), "msam / sam"],
                     [[p, r["devices"], *(f"{r['placements'][p][o]['examples_per_s']:,.0f}"
                                          for o in OPTS),
                       *(cell(ratio(r, p, o), o) for o in OPTS[1:]),
                       f"{ratio(r, p, 'msam') / ratio(r, p, 'sam'):.2f}"]
                      for p in ("shard_map", "gspmd") for r in res], "lr" + "r" * 8),
      "refresh": table(["D", *(f"{p} {head}" for p in PLACES for head, _, _ in REFRESH),
                        "replicated / sharded refresh time"],
                       [[r["devices"], *(f"{fresh(r, p)[k]:{fmt}}" for p in PLACES
                                         for _, k, fmt in REFRESH), f"{speedup(r):.2f}"]
                        for r in res], "r" * 8),
      "ire": span(cells("adamw+ire")), "sam": span(cells("sam")),
      "msam_1": msam_sam(1), "msam_max": msam_sam(max(r["devices"] for r in res)),
      "max_devices": max(r["devices"] for r in res),
      "sharded": span([fresh(r, "sharded")["refresh_over_adamw"] for r in res]),
      "speedup": span([speedup(r) for r in res if r["devices"] > 1])})}


if __name__ == "__main__":  # the worker of one device count: D REPS
  print(json.dumps(worker(int(sys.argv[1]), int(sys.argv[2]))))
