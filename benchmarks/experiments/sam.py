"""SAM: the train-step time, peak memory and flops of SAM, ASAM and mSAM over their base.

``optax_sam`` is ``optax.contrib.sam`` in opaque mode, the same algorithm as ``sam``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks import data, metrics, timing
from benchmarks.render import fill, machine, renders, span, table
from benchmarks.schema import time_row, write_micro
from benchmarks.spec import Micro

# block -> (factory kind, keyword arguments); the base is SGD with momentum 0.9.
ARMS: dict[str, tuple[str, dict[str, Any]]] = {"base": ("base", {}), "sam": ("sam", {"rho": 0.05}),
        "asam": ("sam", {"rho": 0.5, "adaptive": True}), "optax_sam": ("optax", {}),
        **{f"msam8_{m}": ("msam", {"rho": 0.05, "num_microbatches": 8, "microbatch_mode": m})
           for m in ("vmap", "scan", "unroll")}}
# (column, block, over block): the paired time ratios and the flop ratios reported.
PAIRS = (("SAM/base", "sam", "base"), ("ASAM/base", "asam", "base"),
         ("SAM/optax opaque", "sam", "optax_sam"), ("mSAM8 vmap/SAM", "msam8_vmap", "sam"),
         ("mSAM8 scan/SAM", "msam8_scan", "sam"), ("mSAM8 unroll/SAM", "msam8_unroll", "sam"))
SPEC = Micro(name="sam", measures="train-step time, peak memory and flops over the base's",
             blocks=tuple(ARMS), baseline="base", reps=9,
             sizes=(("cnn", 8, 128), ("cnn", 16, 128), ("tfm", 64, 32), ("tfm", 128, 32)),
             smoke={"sizes": (("cnn", 4, 16), ("tfm", 16, 8)), "reps": 1})
STEPS, LR, STRIDES, SEQ, LAYERS = 3, 0.05, (1, 2), 64, 2
# Upper targets: paired time ratios, and SAM's extra peak memory in parameter buffers.
TARGETS = {"sam/base": 2.05, "msam8_vmap/sam": 1.15, "msam8_scan/sam": 1.15,
           "msam8_unroll/sam": 1.15, "sam/optax_sam": 1.0, "memory": 1.0}


def optimizer(kind: str, kw: Mapping[str, Any]) -> Any:
  import optax

  import ire_optax

  base = optax.sgd(LR, momentum=0.9)
  if kind == "optax":
    rho = ARMS["sam"][1]["rho"]  # the same algorithm as "sam"
    return optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                             opaque_mode=True)
  return base if kind == "base" else getattr(ire_optax, kind)(base, **kw)


def train_step(kind: str, tx: Any, loss: Any) -> Any:
  """``step(params, state, batch) -> (params, state)`` calling ``tx`` as its kind needs."""
  import jax
  import optax

  def step(p, s, b):
    g = None if kind == "msam" else jax.grad(loss)(p, b)
    grad_fn = lambda q, *_: jax.grad(loss)(q, b)  # optax's opaque mode passes an index too
    extra = {"base": {}, "msam": {"grad_fn": jax.grad(loss), "batch": b}}.get(
        kind, {"grad_fn": grad_fn})
    u, s = tx.update(g, s, p, **extra)
    return optax.apply_updates(p, u), s

  return step


def task(size: tuple[Any, ...], data_dir: str | None) -> tuple[str, Any, Any, list[Any]]:
  """``(label, loss, params, batches)`` of ``("cnn", width, batch)`` or ``("tfm", d, batch)``."""
  import jax
  import numpy as np

  kind, width, b = size
  rng = np.random.default_rng(0)
  if kind == "cnn":
    img = data.load_images(data_dir, scale="unit")
    name = "MNIST" if img.name == "mnist" else "sklearn digits (MNIST not found)"
    hw = img.x_train.shape[1]
    batches = [{"x": img.x_train[i:i + b], "y": img.y_train[i:i + b]} for i in range(0, 4 * b, b)]
    return (f"CNN w={width} ({name}, batch {b}, {hw}x{hw})",
            lambda p, x: data.cross_entropy(data.cnn_logits(p, x["x"], strides=STRIDES), x["y"]),
            data.cnn_init(jax.random.key(0), channels=(width, 2 * width)), batches)
  text, name = data.read_text(data_dir, "tinyshakespeare", "input.txt")
  name = "Tiny Shakespeare" if "tinyshakespeare" in name else name
  vocab = {c: i for i, c in enumerate(sorted(set(text[:800_000])))}
  ids = np.array([vocab[c] for c in text[:200_000]], np.int32)
  batches = [{"tokens": np.stack([ids[s:s + SEQ + 1] for s in rng.integers(
      0, len(ids) - SEQ - 1, b)])} for _ in range(4)]
  return (f"char transformer d={width} L={LAYERS} (seq {SEQ}, batch {b}, {name})", tfm_loss,
          tfm_init(jax.random.key(0), len(vocab), width), batches)


def tfm_init(key: Any, vocab: int, d: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  keys = iter(jax.random.split(key, 2 + 4 * LAYERS))
  n = lambda *shape: jax.random.normal(next(keys), shape) * 0.02
  return {"emb": n(vocab, d), "pos": n(SEQ, d), "lnf": jnp.ones(d), "blocks": [
      {"ln1": jnp.ones(d), "qkv": n(d, 3 * d), "o": n(d, d), "ln2": jnp.ones(d),
       "up": n(d, 4 * d), "down": n(4 * d, d)} for _ in range(LAYERS)]}


def tfm_loss(p: dict[str, Any], batch: dict[str, Any], heads: int = 4) -> Any:
  """A pre-norm causal transformer's next-character cross-entropy."""
  import jax
  import jax.numpy as jnp
  import optax

  rms = lambda x, g: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g
  inp, tgt = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
  t = inp.shape[1]
  x, mask = p["emb"][inp] + p["pos"][:t], jnp.tril(jnp.ones((t, t), bool))
  for b in p["blocks"]:
    q, k, v = (a.reshape(a.shape[0], t, heads, -1)
               for a in jnp.split(rms(x, b["ln1"]) @ b["qkv"], 3, -1))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), -1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(x.shape) @ b["o"]
    x = x + jax.nn.gelu(rms(x, b["ln2"]) @ b["up"]) @ b["down"]
  logits = rms(x, p["lnf"]) @ p["emb"].T
  return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()


def measure(size: tuple[Any, ...], blocks: tuple[str, ...], reps: int,
            data_dir: str | None) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  label, loss, params, batches = task(size, data_dir)
  batches = jax.device_put(batches)
  steppers, peak, flops, first = {}, {}, {}, {}
  for name in blocks:
    kind, kw = ARMS[name]
    tx = optimizer(kind, kw)
    state = tx.init(params)
    step = jax.jit(train_step(kind, tx, loss), donate_argnums=(0, 1))
    compiled = step.lower(params, state, batches[0]).compile()
    m: Any = compiled.memory_analysis()
    cost: Any = compiled.cost_analysis()
    peak[name] = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                  - m.alias_size_in_bytes)
    flops[name] = float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", 0))
    carry = compiled(jax.tree.map(jnp.copy, params), state, batches[0])  # warm-up step
    first[name] = jax.tree.map(jnp.copy, carry[0])  # the stepper donates its own
    steppers[name] = timing.Stepper(lambda c, b, f=compiled: f(*c, b), carry, STEPS,
                                    lambda i: (batches[i % len(batches)],))
  t = timing.time_interleaved(steppers, baseline="base", reps=reps, units=STEPS)
  same = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(first["sam"]), jax.tree.leaves(first["optax_sam"]), strict=True))
  return {"task": label, "n_params": sum(x.size for x in jax.tree.leaves(params)),
          "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
          "median_step_s": {n: t.median(n) for n in blocks}, "all_step_s": t.seconds,
          "median_paired_ratio": {f"{a}/{b}": t.ratio(a, b) for _, a, b in PAIRS},
          "peak_bytes": peak, "xla_flops": flops, "sam_vs_optax_max_abs_param_diff": same}


def run(spec: Micro, args: Any) -> None:
  results = [measure(s, spec.blocks, spec.reps, args.data_dir) for s in spec.sizes]
  rows = [time_row(label, "SGD", r["task"], "train step", r["median_paired_ratio"][key],
                   spec.name, n=spec.reps)
          for r in results for label, key in (("SAM", "sam/base"), ("ASAM", "asam/base"))]
  rows += [time_row("mSAM", "SGD", r["task"], "train step",
                    r["median_step_s"][f"msam8_{m}"] / r["median_step_s"]["base"], spec.name,
                    "ratio of median step times", f"m=8, {m}", n=spec.reps)
           for r in results for m in ("vmap", "scan", "unroll")]
  write_micro(spec.name, args.out, rows=rows,
              details={"reps": spec.reps, "steps": STEPS, "results": results})


@renders("sam")
def render(doc: Mapping[str, Any]) -> dict[str, str]:
  res = doc["details"]["results"]
  mem = [n for n in ARMS if n != "base"]
  f = lambda r, a, b: r["xla_flops"][a] / r["xla_flops"][b]
  extra = lambda r: (r["peak_bytes"]["sam"] - r["peak_bytes"]["base"]) / r["param_bytes"]
  flop_pairs = [p for p in PAIRS if p[1] != "msam8_scan"]  # XLA counts a loop's body once
  return {"benchmarks/results/sam.md": fill("sam.md", {
      "machine": machine(doc), "steps": doc["details"]["steps"], "reps": doc["details"]["reps"],
      "same": max(r["sam_vs_optax_max_abs_param_diff"] for r in res),
      "time": table(["task", "params", "base ms/step", *(p[0] for p in PAIRS)],
                    [[r["task"], f"{r['n_params']:,}", f"{1e3 * r['median_step_s']['base']:.1f}",
                      *(f"{r['median_paired_ratio'][f'{a}/{b}']:.2f}" for _, a, b in PAIRS)]
                     for r in res], "lrr" + "r" * len(PAIRS)),
      "memory": table(["task", "param MB", "base peak MB", "SAM extra param buffers",
                       *(f"{n}/base" for n in mem)],
                      [[r["task"], f"{r['param_bytes'] / 1e6:.3f}",
                        f"{r['peak_bytes']['base'] / 1e6:.2f}",
                        f"{extra(r):+.2f}",
                        *(f"{r['peak_bytes'][n] / r['peak_bytes']['base']:.3f}" for n in mem)]
                       for r in res], "lrrr" + "r" * len(mem)),
      "flops": table(["task", *(p[0] for p in flop_pairs)],
                     [[r["task"], *(f"{f(r, a, b):.3f}" for _, a, b in flop_pairs)]
                      for r in res], "l" + "r" * len(flop_pairs)),
      "sam_flops": span([f(r, a, "base") for r in res for a in ("sam", "asam", "optax_sam")]),
      "msam_flops": span([f(r, a, "sam") for r in res for a in ("msam8_vmap", "msam8_unroll")]),
      "scan_memory": span([r["peak_bytes"]["msam8_scan"] / r["peak_bytes"]["base"] for r in res]),
      "sam_optax": span([r["median_paired_ratio"]["sam/optax_sam"] for r in res]),
      "rho": ARMS["sam"][1]["rho"], "asam_rho": ARMS["asam"][1]["rho"],
      "m": ARMS["msam8_vmap"][1]["num_microbatches"],
      "targets": "; ".join(
          f"{k} ≤ {v:g}: " + metrics.target_verdict(
              [extra(r) if k == "memory" else r["median_paired_ratio"][k] for r in res], v)
          for k, v in TARGETS.items())})}
