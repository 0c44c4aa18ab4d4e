"""benchmarks/bench_compiled_steps.py: a smoke run, its pieces, and the compiled targets.

The target tests compile small programs for a TPU v5e (a chip, and a 2x2 slice) without one;
they are skipped, saying why, where libtpu is not installed.
"""

import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as C  # noqa: E402
import _compiled as X  # noqa: E402
import bench_compiled_steps as B  # noqa: E402


@pytest.mark.slow  # about 15 CPU compiles (tiny MLP and toy Llama steps)
def test_smoke_compiles_every_kind_of_step_and_writes_the_table(tmp_path):
  out = tmp_path / "compiled_steps"
  assert B.main(["--smoke", "--out", str(out)]) == 0
  doc = C.read_results(out.with_suffix(".json"))
  up = doc["details"]["update"]["cpu"]["ratios"]
  assert 1.3 < up["sam"]["bytes"] < 3  # a second gradient (and an ascent) on top of AdamW's
  # An unhinted SALA cycle start reads its SAM gradient only in stage 2.
  assert up["sala stage-1 start, unhinted"]["bytes"] < up["sala stage-2 start, unhinted"]["bytes"]
  assert up["sam k=5 plain, hinted"]["bytes"] < up["sam k=5 ascent, hinted"]["bytes"]
  llama = doc["details"]["train"]["llama"]["targets"]["cpu"]
  # IRE: one refresh step and nine plain steps in ten; SALA (k = 2): a start and an end.
  assert sorted(k["share"] for k in llama["ire_grad_sq"]["kinds"]) == pytest.approx([0.1, 0.9])
  assert [k["share"] for k in llama["sala"]["kinds"]] == pytest.approx([0.5, 0.5])
  assert {r.source for r in doc["rows"]} == {"bench_compiled_steps"}
  assert "time_ratio" not in {r.metric for r in doc["rows"]}  # not a measured time
  md = out.with_suffix(".md").read_text()
  assert "SALA (k=2, stage 2)" in md and "sam k=5 plain, hinted" in md


def test_branches_taken_per_conditional():
  x = jax.ShapeDtypeStruct((4096,), jnp.float32)
  p = jax.ShapeDtypeStruct((), bool)

  def f(p, q, x):  # two conditionals in program order: the second consumes the first
    y = jax.lax.cond(p, lambda: jnp.sin(x) * jnp.cos(x), lambda: x)
    return jax.lax.cond(q, lambda: jnp.exp(y) + jnp.tanh(y), lambda: y)

  c = X.compile_fn(f, p, p, x, target="cpu")
  plain, first, last = B.taken(c), B.taken(c, B.first_taken), B.taken(c, B.last_taken)
  a = X.analyze(c)
  assert len(a.conditionals) == 2
  assert first.bytes == plain.bytes + a.conditionals[0][1].bytes
  assert last.bytes == plain.bytes + a.conditionals[1][1].bytes > plain.bytes
  assert B.last_taken(3) == [0, 0, 1] and B.first_taken(2) == [1, 0] and B.last_taken(0) == []


def test_fsdp_spec_extra_collectives_and_merge():
  P = jax.sharding.PartitionSpec
  assert B.fsdp_spec((96, 128), 16) == P("data")
  assert B.fsdp_spec((10, 32), 16) == P(None, "data")
  assert B.fsdp_spec((10,), 16) == P() and B.fsdp_spec((), 16) == P()
  base = [{"opcode": "all-gather", "shape": "f32[96,128]", "count": 2, "bytes": 1}]
  prog = base[:1] + [{"opcode": "all-reduce", "shape": "s32[256]", "count": 8, "bytes": 1}]
  prog[0] = {**prog[0], "count": 3}
  assert B.extra_collectives(prog, base) == [
      {**prog[0], "count": 1}, prog[1]]
  old = {"train": {"llama": {"targets": {"h100": {"base": {"bytes": 1}}}}}}
  new = {"train": {"llama": {"targets": {"tpu-v5e": {"base": {"bytes": 2}}}}}}
  merged = B.merge(old, new)
  assert merged["train"]["llama"]["targets"] == {"h100": {"base": {"bytes": 1}},
                                                 "tpu-v5e": {"base": {"bytes": 2}}}


def _skip_without(target):
  why = X.available(target)
  if why:
    pytest.skip(f"cannot compile for {target} here: {why}")


def _pod_collectives(keys):
  """The collectives of the toy Llama's FSDP train step on a v5e:2x2 slice (4 chips)."""
  opts = {o.key: o for o in B.T.optimizers(True)}
  model = B.T.SMOKE_MODELS["llama"]
  out = {}
  for key in keys:
    for _share, hints, picks, c in B.pod_step(model, opts[key], "v5e:2x2", batch_size=8):
      out[(key, tuple(hints.values()))] = B.collectives(c, picks)
  return out


def test_pod_slice_refresh_all_reduces_counts_and_gathers_no_parameters():
  """On a sharded slice IRE's refresh adds only all-reduces of integer counts to AdamW's
  step (no all-gather: the parameters stay sharded), its plain step a scalar, and SAM at most
  one more pass's traffic and a float32 scalar all-reduce (the norm)."""
  _skip_without("v5e:2x2")
  got = _pod_collectives(["base", "ire_grad_sq", "sam"])
  base = got[("base", ())]
  assert any(c["opcode"] in ("all-gather", "reduce-scatter", "all-reduce") for c in base)
  refresh = B.extra_collectives(got[("ire_grad_sq", (True,))], base)
  assert refresh, "the refresh combines its counts across the chips"
  for c in refresh:  # small integer arrays (counts) and float scalars; nothing parameter-shaped
    # A tuple's elements: a long one prints /*index=N*/ markers and may be elided.
    parts = re.findall(r"\b([a-z]+\d+)\[([\d,]*)\]", c["shape"])
    assert c["opcode"] == "all-reduce" and parts, c
    assert all((t in ("u32", "s32", "u64", "s64") and math.prod(map(int, filter(None,
                                                                            d.split(",")))) <= 64)
               or (t == "f32" and not d) for t, d in parts), c
  # The plain step: float32 scalars only (the train step logs the mask's flat fraction).
  for c in B.extra_collectives(got[("ire_grad_sq", (False,))], base):
    assert c["opcode"] == "all-reduce", c
    assert set(re.findall(r"\b[a-z]+\d+\[[\d,]*\]", c["shape"])) == {"f32[]"}, c
  # SAM: the perturbed pass moves the parameter shards and gradients once more (at most the
  # AdamW step's traffic again) and all-reduces the gradient norm, a float32 scalar.
  sam = B.extra_collectives(got[("sam", ())], base)
  total = lambda cs: sum(c["bytes"] * c["count"] for c in cs)
  assert total(sam) <= 1.05 * total(base) + 1024, (total(sam), total(base), sam)
  assert any(c["opcode"] == "all-reduce" and "f32[]" in c["shape"] for c in sam), sam


def test_train_step_targets_on_tpu():
  """The Llama example's train step (toy size) compiled for a TPU v5e: SAM costs at most
  2.05 base steps and mSAM (m = 8, vectorised) at most 1.05 SAM steps, by the compiler's
  estimated cycles, as on the Llama rows at the benchmark's size (compiled_steps.md; the
  ViT and ResNet rows miss the SAM target, and the ResNet's the mSAM one)."""
  _skip_without("tpu-v5e")
  opts = {o.key: o for o in B.T.optimizers(True)}
  model = B.T.SMOKE_MODELS["llama"]
  got = {k: B.measure_train(model, opts[k], "tpu-v5e")["cycles"] for k in ("base", "sam", "msam")}
  assert got["sam"] <= 2.05 * got["base"], got
  assert got["msam"] <= 1.05 * got["sam"], got
