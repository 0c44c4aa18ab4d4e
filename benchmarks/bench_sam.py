"""Benchmark: train-step cost of ire_optax.sam / msam against the base optimizer.

Measures, in one process and interleaved (these machines are shared and
noisy), the wall time of a jitted train step (gradient(s) + optimizer update +
apply) for:

* ``base``        -- ``optax.sgd(lr, momentum=0.9)``, one gradient per step;
* ``sam``         -- ``ire_optax.sam(base, rho=0.05)``;
* ``asam``        -- ``ire_optax.sam(base, rho=0.5, adaptive=True)``;
* ``optax_sam``   -- ``optax.contrib.sam(base, normalize + sgd(rho), opaque_mode=True)``
  (the same algorithm as ``sam``; checked to give the same parameters);
* ``msam8_vmap`` / ``msam8_scan`` / ``msam8_unroll`` -- ``ire_optax.msam(base,
  num_microbatches=8)`` in each ``microbatch_mode``.

and the peak memory of each compiled step from XLA's ``memory_analysis()``
(arguments + outputs + temporaries − aliased buffers, params and optimizer
state donated), as a ratio to ``base`` and as extra parameter-sized buffers.

Models (pure JAX, float32): a small CNN on MNIST (from ``--data-dir``, or
scikit-learn's digits without it) and a small causal char-level
transformer on Tiny Shakespeare (or CPython's own source text), two sizes each.

Usage::

  python benchmarks/bench_sam.py --data-dir DIR  # full run, writes benchmarks/results/sam.{md,json}
  python benchmarks/bench_sam.py --quick         # smoke run, prints only

Targets (docs/design.md §2, §4): sam / base ≤ 2.05, msam(m=8) / sam ≤ 1.15,
sam / optax_sam ≤ 1.0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ire_optax

LR, RHO, ASAM_RHO, M = 0.05, 0.05, 0.5, 8
CNN_STRIDES = (1, 2)


# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------


def mnist_images(n: int, data_dir) -> tuple[np.ndarray, np.ndarray, str]:
  img = C.load_images(data_dir, scale="unit")
  name = "MNIST" if img.name == "mnist" else "sklearn digits (MNIST not found)"
  return img.x_train[:n], img.y_train[:n], name


def char_tokens(n: int, data_dir) -> tuple[np.ndarray, int, str]:
  text, name = C.read_text(data_dir, "tinyshakespeare", "input.txt")
  text = text[: 4 * n]
  name = "Tiny Shakespeare" if "tinyshakespeare" in name else name
  vocab = {c: i for i, c in enumerate(sorted(set(text)))}
  ids = np.array([vocab[c] for c in text[:n]], np.int32)
  return ids, len(vocab), name


# -----------------------------------------------------------------------------
# Models (pure JAX)
# -----------------------------------------------------------------------------


def cnn_init(key, width, image_size):
  return C.cnn_init(key, channels=(width, 2 * width), strides=CNN_STRIDES, image_size=image_size)


def cnn_loss(p, batch):
  return C.cross_entropy(C.cnn_logits(p, batch["x"], strides=CNN_STRIDES), batch["y"])


def tfm_init(key, vocab, d, layers, seq):
  keys = iter(jax.random.split(key, 4 + 6 * layers))
  n = lambda shape, s=0.02: jax.random.normal(next(keys), shape) * s
  p = {"emb": n((vocab, d)), "pos": n((seq, d)), "blocks": []}
  for _ in range(layers):
    p["blocks"].append({
        "ln1": jnp.ones(d), "qkv": n((d, 3 * d)), "o": n((d, d)),
        "ln2": jnp.ones(d), "up": n((d, 4 * d)), "down": n((4 * d, d)),
    })
  p["lnf"] = jnp.ones(d)
  return p


def _rms(x, g):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g


def tfm_loss(p, batch, heads=4):
  tok = batch["tokens"]
  inp, tgt = tok[:, :-1], tok[:, 1:]
  t = inp.shape[1]
  x = p["emb"][inp] + p["pos"][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for b in p["blocks"]:
    h = _rms(x, b["ln1"])
    q, k, v = jnp.split(h @ b["qkv"], 3, -1)
    sh = lambda a: a.reshape(a.shape[0], t, heads, -1)
    att = jnp.einsum("bqhd,bkhd->bhqk", sh(q), sh(k)) / np.sqrt(q.shape[-1] // heads)
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), -1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", att, sh(v)).reshape(x.shape) @ b["o"]
    x = x + jax.nn.gelu(_rms(x, b["ln2"]) @ b["up"]) @ b["down"]
  logits = _rms(x, p["lnf"]) @ p["emb"].T
  return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()


# -----------------------------------------------------------------------------
# Train steps
# -----------------------------------------------------------------------------


def base_tx():
  return optax.sgd(LR, momentum=0.9)


def make_steps(loss):
  """name -> (optimizer, step(params, state, batch) -> (params, state, loss))."""
  grad = jax.grad(loss)

  def clean_step(tx, kind):
    def step(params, state, batch):
      value, g = jax.value_and_grad(loss)(params, batch)
      if kind == "base":
        u, state = tx.update(g, state, params)
      elif kind == "ours":
        u, state = tx.update(g, state, params, grad_fn=lambda q: grad(q, batch))
      else:  # optax.contrib.sam, opaque mode: grad_fn(params, i)
        u, state = tx.update(g, state, params, grad_fn=lambda q, _: grad(q, batch))
      return optax.apply_updates(params, u), state, value

    return step

  def msam_step(tx):
    def step(params, state, batch):
      u, state = tx.update(None, state, params, grad_fn=grad, batch=batch)
      return optax.apply_updates(params, u), state, jnp.zeros(())

    return step

  optax_sam = optax.contrib.sam(
      base_tx(), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True)
  txs = {
      "base": (base_tx(), "base"),
      "sam": (ire_optax.sam(base_tx(), rho=RHO), "ours"),
      "asam": (ire_optax.sam(base_tx(), rho=ASAM_RHO, adaptive=True), "ours"),
      "optax_sam": (optax_sam, "optax"),
      "msam8_vmap": (ire_optax.msam(base_tx(), rho=RHO, num_microbatches=M), "msam"),
      "msam8_scan": (ire_optax.msam(base_tx(), rho=RHO, num_microbatches=M,
                                    microbatch_mode="scan"), "msam"),
      "msam8_unroll": (ire_optax.msam(base_tx(), rho=RHO, num_microbatches=M,
                                      microbatch_mode="unroll"), "msam"),
  }
  return {name: (tx, msam_step(tx) if kind == "msam" else clean_step(tx, kind))
          for name, (tx, kind) in txs.items()}


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def bench_task(name, loss, params, batches, *, reps, steps):
  fns = make_steps(loss)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  runners, mem, flops = {}, {}, {}
  for opt, (tx, step) in fns.items():
    state = tx.init(params)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    compiled = jitted.lower(params, state, batches[0]).compile()
    mem[opt] = peak_bytes(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops[opt] = float(cost.get("flops", float("nan")))
    p = jax.tree.map(jnp.copy, params)
    p, state, _ = compiled(p, state, batches[0])  # warm-up
    jax.block_until_ready(p)
    runners[opt] = [compiled, p, state]

  # Sanity: ours and optax's opaque SAM compute the same step.
  tx_a, step_a = fns["sam"]
  tx_b, step_b = fns["optax_sam"]
  pa, _, _ = jax.jit(step_a)(params, tx_a.init(params), batches[0])
  pb, _, _ = jax.jit(step_b)(params, tx_b.init(params), batches[0])
  same = max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True))

  blocks = {
      opt: C.Stepper(lambda c, b, f=compiled: f(*c, b)[:2], (p, state), steps,
                     args_at=lambda i: (batches[(i % steps + 1) % len(batches)],))
      for opt, (compiled, p, state) in runners.items()}
  timings = C.time_interleaved(blocks, baseline="base", reps=reps, units=steps, warmup=0)
  times = timings.seconds
  med = {opt: timings.median(opt) for opt in times}
  # Paired ratios: both optimizers of a pair ran in the same repetition, a few
  # seconds apart, so slow drifts of the machine's load cancel.
  pairs = {"sam/base": ("sam", "base"), "asam/base": ("asam", "base"),
           "sam/optax_sam": ("sam", "optax_sam"), "msam8_vmap/sam": ("msam8_vmap", "sam"),
           "msam8_scan/sam": ("msam8_scan", "sam"), "msam8_unroll/sam": ("msam8_unroll", "sam")}
  ratios = {k: timings.ratio(a, baseline=b) for k, (a, b) in pairs.items()}
  return {
      "task": name,
      "n_params": int(n_params),
      "median_step_s": med,
      "median_paired_ratio": ratios,
      "all_step_s": times,
      "peak_bytes": mem,
      "xla_flops": flops,
      "param_bytes": int(param_bytes),
      "sam_vs_optax_max_abs_param_diff": same,
  }


def tasks(quick, data_dir):
  x, y, img_name = mnist_images(4 * 128, data_dir)
  bs = 64 if quick else 128
  img_batches = [{"x": jnp.asarray(x[i:i + bs]), "y": jnp.asarray(y[i:i + bs])}
                 for i in range(0, 4 * bs, bs)][:4]
  ids, vocab, txt_name = char_tokens(200_000, data_dir)
  out = []
  for width in ((8,) if quick else (8, 16)):
    out.append((f"CNN w={width} ({img_name}, batch {bs}, {x.shape[1]}x{x.shape[2]})", cnn_loss,
                cnn_init(jax.random.key(0), width, x.shape[1]), img_batches))
  for d, layers, seq, b in (((32, 1, 32, 16),) if quick else ((64, 2, 64, 32), (128, 2, 64, 32))):
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
      starts = rng.integers(0, len(ids) - seq - 1, size=b)
      batches.append({"tokens": jnp.asarray(np.stack([ids[s:s + seq + 1] for s in starts]))})
    out.append((f"char transformer d={d} L={layers} (seq {seq}, batch {b}, {txt_name})",
                tfm_loss, tfm_init(jax.random.key(0), vocab, d, layers, seq), batches))
  return out


def ratio_table(results):
  time_head = (
      "| task | params | base ms/step | SAM/base | ASAM/base | SAM/optax opaque | "
      "mSAM8 vmap/SAM | mSAM8 scan/SAM | mSAM8 unroll/SAM |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
  )
  mem_head = (
      "| task | param MB | base peak MB | SAM/base (extra param buffers) | ASAM/base | "
      "optax opaque/base | mSAM8 vmap/base | mSAM8 scan/base | mSAM8 unroll/base |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
  )
  flops_head = (
      "| task | SAM/base | ASAM/base | SAM/optax opaque | mSAM8 vmap/SAM | "
      "mSAM8 unroll/SAM |\n|---|---:|---:|---:|---:|---:|\n"
  )
  trows, mrows, frows = [], [], []
  for r in results:
    t, q = r["median_step_s"], r["median_paired_ratio"]
    m, pb = r["peak_bytes"], r["param_bytes"]
    trows.append(
        f"| {r['task']} | {r['n_params']:,} | {1e3 * t['base']:.1f} | "
        f"{q['sam/base']:.2f} | {q['asam/base']:.2f} | {q['sam/optax_sam']:.2f} | "
        f"{q['msam8_vmap/sam']:.2f} | {q['msam8_scan/sam']:.2f} | {q['msam8_unroll/sam']:.2f} |"
    )
    f = r["xla_flops"]
    frows.append(
        f"| {r['task']} | {f['sam'] / f['base']:.3f} | {f['asam'] / f['base']:.3f} | "
        f"{f['sam'] / f['optax_sam']:.3f} | {f['msam8_vmap'] / f['sam']:.3f} | "
        f"{f['msam8_unroll'] / f['sam']:.3f} |"
    )
    mrows.append(
        f"| {r['task']} | {pb / 1e6:.3f} | {m['base'] / 1e6:.2f} | "
        f"{m['sam'] / m['base']:.3f} ({(m['sam'] - m['base']) / pb:+.2f}) | "
        f"{m['asam'] / m['base']:.3f} | {m['optax_sam'] / m['base']:.3f} | "
        f"{m['msam8_vmap'] / m['base']:.3f} | {m['msam8_scan'] / m['base']:.3f} | "
        f"{m['msam8_unroll'] / m['base']:.3f} |"
    )
  return ("### Train-step time (median over repetitions of the paired ratio)\n\n"
          + time_head + "\n".join(trows)
          + "\n\n### Peak memory of the compiled step (ratios to base)\n\n"
          + mem_head + "\n".join(mrows)
          + "\n\n### XLA's flop count of the compiled step (`cost_analysis()`, deterministic)\n\n"
          + flops_head + "\n".join(frows) + "\n")


NOTES = """
### Reading the tables

- The flop counts are exact: SAM, ASAM and optax's opaque SAM compile to two gradients' worth
  of arithmetic (ratio 2.00 to base, 1.00 to each other), and mSAM (vmap or unroll) to the same
  as SAM. (XLA counts a `while` loop's body once, so scan mode is left out of the flop table.)
  The wall-time ratios are noisy on this shared 2-core machine. SAM and optax's opaque SAM
  run the same computation, so their ratio is 1 up to that noise.
- mSAM `vmap` on the CNN: in the perturbed pass every micro-batch has its own weights, so
  the convolutions become grouped convolutions, which XLA:CPU runs slowly. Transformers (batched
  matmuls) are not affected.
- mSAM `scan` on the CNN: XLA:CPU runs convolution *gradients* inside a `while` loop several
  times slower than outside one. The forward pass in a loop is not slower. On the transformer,
  scan is faster than SAM because the small micro-batches fit in cache. `unroll` runs the same
  sequence without a loop. On CPU it is the fastest mode for CNNs.
- Memory: scan keeps the activations of one micro-batch (about 1/m of the base step), and vmap
  keeps those of all of them plus m perturbed parameter copies. In an earlier run that included
  a wider CNN (w=32), SAM's peak was 1.11x base: one activation-sized buffer (6.4 MB) rather
  than a parameter buffer. optax's opaque SAM had the identical peak, so this comes from XLA's
  buffer assignment for two sequential passes, not from the wrapper.
"""


def result_rows(details: dict[str, Any]) -> list[C.Row]:
  """The cost rows of ``details`` (``{"results": [...]}``): SAM, ASAM, mSAM vs the base."""
  out = []
  for r in details["results"]:
    t, s, p = r["task"], r["median_step_s"], r["median_paired_ratio"]
    out.append(C.time_row("SAM", "SGD", t, "train step", p["sam/base"], "bench_sam"))
    out.append(C.time_row("ASAM", "SGD", t, "train step", p["asam/base"], "bench_sam"))
    for mode in ("vmap", "scan", "unroll"):
      key = f"msam8_{mode}"
      if key in s:
        out.append(C.time_row("mSAM", "SGD", t, "train step", s[key] / s["base"], "bench_sam",
                              "ratio of median step times", variant=f"m=8, {mode}"))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  C.add_data_dir_argument(ap)
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
  ap.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing")
  ap.add_argument("--out", default=str(C.RESULTS / "sam"))
  args = ap.parse_args(argv)
  reps = 2 if args.quick else args.reps
  steps = 2 if args.quick else args.steps
  t0 = time.time()
  results = []
  for name, loss, params, batches in tasks(args.quick, args.data_dir):
    print(f"[bench_sam] {name} ...", flush=True)
    results.append(bench_task(name, loss, params, batches, reps=reps, steps=steps))
  mach = C.machine()
  machine = mach["summary"]
  md = (
      "# SAM / ASAM / mSAM train-step cost (benchmarks/bench_sam.py)\n\n"
      f"Machine: {machine} at the end; shared with other jobs, so single timings vary by "
      "tens of percent. "
      f"One process. A repetition runs {steps} jitted train steps of every optimizer in "
      "turn (rotating order; compilation and one warm-up step excluded; "
      "`jax.block_until_ready`). Each ratio is the median over "
      f"{reps} repetitions of the ratio of the two optimizers' times in the same repetition; "
      "'base ms/step' is the median time. Base optimizer: SGD momentum 0.9; SAM ρ=0.05, "
      "ASAM ρ=0.5, mSAM m=8 micro-batches. A train step = gradient(s) + optimizer update + apply. "
      "Peak memory = XLA `memory_analysis()` of the compiled step "
      "(arguments + outputs + temporaries − aliased; params and optimizer state donated); "
      "'extra param buffers' = (peak SAM − peak base) / parameter bytes. "
      "`optax opaque` = `optax.contrib.sam(base, chain(normalize(), sgd(ρ)), "
      "opaque_mode=True)`, the same algorithm (parameters agree to "
      f"{max(r['sam_vs_optax_max_abs_param_diff'] for r in results):.1e}).\n\n"
      "Targets: SAM/base ≤ 2.05, mSAM8/SAM ≤ 1.15, SAM/optax opaque ≤ 1.0, "
      "SAM peak ≤ base + one parameter buffer.\n\n"
      + ratio_table(results)
      + NOTES
      + f"\nTotal benchmark wall time: {time.time() - t0:.0f} s.\n"
  )
  print(md)
  if not args.quick:
    details = {"machine": machine, "reps": reps, "steps": steps, "results": results}
    C.write_results(Path(args.out), benchmark="bench_sam", meta={"machine": mach},
                    rows=result_rows(details), details=details, markdown=md)
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
  main()
