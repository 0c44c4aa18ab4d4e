"""Sharpness: the cost of ire_optax.sharpness's estimators, in units of one gradient."""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from typing import Any

from benchmarks import data, timing
from benchmarks.render import bounds, fill, machine, renders, span, table
from benchmarks.schema import Row, write_micro
from benchmarks.spec import Micro

# name -> (HVPs per call, what one call is, the models it is timed on)
MEASURES = {
    "grad": (0, "1 grad", "mlp cnn"), "hvp": (1, "1 HVP", "mlp cnn"),
    "lanczos": (20, "20 HVPs", "mlp cnn"),
    "lanczos_vectors": (20, "20 HVPs, + eigenvector", "mlp cnn"),
    "lanczos_noreorth": (20, "20 HVPs, reorthogonalize=False", "mlp"),
    "power": (20, "20 HVPs", "mlp"), "trace": (10, "10 HVPs", "mlp cnn"),
    "sam": (0, "5 grads + 1 loss", "mlp cnn"),
    "lanczos_unrolled": (20, "20 HVPs, unroll=True", "cnn"),
    "trace_unrolled": (10, "10 HVPs, unroll=True", "cnn")}
SPEC = Micro(name="sharpness", measures="each estimator's time over one gradient's",
             blocks=tuple(MEASURES), baseline="grad",
             sizes=(("mlp", 128), ("mlp", 512), ("mlp", 1024), ("cnn", 4), ("cnn", 8),
                    ("cnn", 16)), reps=7, smoke={"sizes": (("mlp", 16),), "reps": 1})
BATCH, STRIDES = 128, (1, 2, 2)


def estimator(name: str, loss: Any) -> Any:
  """``f(params, batch, key)`` of measure ``name``."""
  import jax

  from ire_optax import sharpness as sh

  eigs = lambda **kw: lambda p, b, k: sh.top_hessian_eigs(loss, p, b, key=k, k=1, num_iters=20,
                                                          **kw)
  return {
      "grad": lambda p, b, k: jax.grad(loss)(p, b), "hvp": lambda p, b, k: sh.hvp(loss, p, b, p),
      "lanczos": lambda p, b, k: eigs()(p, b, k)[0], "lanczos_vectors": eigs(),
      "lanczos_noreorth": lambda p, b, k: eigs(reorthogonalize=False)(p, b, k)[0],
      "power": eigs(method="power"),
      "trace": lambda p, b, k: sh.hessian_trace(loss, p, b, key=k, num_samples=10),
      "sam": lambda p, b, k: sh.sam_sharpness(loss, p, b, rho=0.05, num_steps=5),
      "lanczos_unrolled": lambda p, b, k: eigs(unroll=True)(p, b, k)[0],
      "trace_unrolled": lambda p, b, k: sh.hessian_trace(loss, p, b, key=k, num_samples=10,
                                                         unroll=True)}[name]


def model(kind: str, width: int) -> tuple[Any, Any]:
  """``(params, loss(params, batch))`` of the MLP or the CNN at ``width``."""
  import jax

  key = jax.random.key(1)
  if kind == "mlp":
    return (data.mlp_init(key, (784, width, width, 10)),
            lambda p, b: data.cross_entropy(data.mlp_logits(p, b["x"]), b["y"]))
  pool = lambda x: x.reshape(x.shape[0], 14, 2, 14, 2).mean((2, 4))[..., None]  # 28 -> 14
  return (data.cnn_init(key, channels=(width, 2 * width, 2 * width)),
          lambda p, b: data.cross_entropy(data.cnn_logits(p, pool(b["x"]), strides=STRIDES),
                                          b["y"]))


def run(spec: Micro, args: Any) -> None:
  import jax
  import numpy as np

  img = data.load_images(args.data_dir, scale="unit")
  x, name = img.x_train[:BATCH, :, :, 0], "MNIST (first 128 training images)"
  if img.name != "mnist":  # 8x8 -> 28x28
    x = np.kron(x, np.ones((4, 4), np.float32))[:, 2:30, 2:30]
    name = "scikit-learn digits upsampled to 28x28 (MNIST absent)"
  batch, key, rows, start = {"x": x, "y": img.y_train[:BATCH]}, jax.random.key(0), [], time.time()
  for kind, width in spec.sizes:
    params, loss = model(kind, width)
    fns = {m: jax.jit(estimator(m, loss)) for m in spec.blocks if kind in MEASURES[m][2]}
    t = timing.time_interleaved({m: partial(f, params, batch, key) for m, f in fns.items()},
                                baseline=spec.baseline, reps=spec.reps).summary()
    rows.append({"model": kind, "width": width, "grad_ms": 1e3 * t["median_s"]["grad"],
                 "num_params": sum(v.size for v in jax.tree.leaves(params)),
                 "ratio_median": t["ratio"], "ratio_min": t["ratio_min"],
                 "ratio_max": t["ratio_max"], "seconds_median": t["median_s"]})
  write_micro(spec.name, args.out,
              details={"data": name, "batch": BATCH, "reps": spec.reps, "rows": rows,
                       "total_s": time.time() - start},
              rows=[Row(m, f"{r['model']} width {r['width']} ({r['num_params']:,} params)",
                        "grad_ratio", v, base="grad", what=MEASURES[m][1], n=spec.reps,
                        source=spec.name)
                    for r in rows for m, v in r["ratio_median"].items() if m != "grad"])


@renders("sharpness")
def render(doc: Mapping[str, Any]) -> dict[str, str]:
  d, names = doc["details"], [m for m in MEASURES if m != "grad"]
  per_hvp = lambda r: min(r["ratio_median"][m] for m in ("lanczos", "lanczos_unrolled")
                          if m in r["ratio_median"]) / 20
  cells = lambda r: [bounds(r["ratio_median"].get(m), r["ratio_min"].get(m),
                            r["ratio_max"].get(m), ".1f") for m in names]
  mlp = [r for r in d["rows"] if r["model"] == "mlp"]
  cost = table(["model", "width", "params", "grad (ms)",
                *(f"{m} ({MEASURES[m][1]})" for m in names), "per HVP inside Lanczos"],
               [[r["model"], r["width"], f"{r['num_params']:,}", f"{r['grad_ms']:.2f}",
                 *cells(r), f"{per_hvp(r):.2f}"] for r in d["rows"]],
               "lrrr" + "r" * (len(names) + 1))
  setting = {"data": d["data"], "batch": d["batch"], "reps": d["reps"], "machine": machine(doc),
             "total_s": d["total_s"], "table": cost}
  return {"docs/sharpness.md#sharpness-cost": fill("sharpness_docs.md", setting),
          "benchmarks/results/sharpness.md": fill("sharpness.md", {**setting,
      "hvp": span([r["ratio_median"]["hvp"] for r in d["rows"]], ".1f"),
      "params": span([r["num_params"] / 1e6 for r in mlp], ".1f"),
      "mlp_per_hvp": span([per_hvp(r) for r in mlp], ".1f"),
      "mlp_power": span([r["ratio_median"]["power"] / 20 for r in mlp], ".1f")})}
