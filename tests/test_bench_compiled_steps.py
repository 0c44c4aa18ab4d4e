"""benchmarks/experiments/compiled_steps.py: smoke runs, the tables' arithmetic, and the compiled
targets (a TPU v5e chip and a 2x2 slice, skipped where libtpu is not installed)."""

import math
import re

from benchmarks import compiled as X  # before JAX starts a backend  # isort: skip

import pytest

from benchmarks import __main__ as cli
from benchmarks.experiments import compiled_steps as S
from benchmarks.schema import read_results
from benchmarks.spec import smoke
from tests.compilers import need


def _smoke(tmp_path, *sections):
  assert cli.main(["compiled_steps", "--smoke", "--sections", *sections, "--out",
                   str(tmp_path)]) == 0
  return read_results(tmp_path / "compiled_steps.json")


def test_smoke_update_section(tmp_path):
  up = _smoke(tmp_path, "update")["details"]["update"]["cpu"]["ratios"]
  assert 1.3 < up["sam"]["bytes"] < 3  # a second gradient (and an ascent) on top of AdamW's
  # An unhinted SALA cycle start reads its SAM gradient only in stage 2.
  assert up["sala stage-1 start, unhinted"]["bytes"] < up["sala stage-2 start, unhinted"]["bytes"]
  assert up["sam k=5 plain, hinted"]["bytes"] < up["sam k=5 ascent, hinted"]["bytes"]
  # The hinted SAM-every-k mix is 1/5 ascent + 4/5 plain steps, of bytes too.
  p = {k: up[k]["bytes"] for k in ("sam k=5 ascent, hinted", "sam k=5 plain, hinted")}
  assert up["sam k=5, hinted"]["bytes"] == pytest.approx(
      .2 * p["sam k=5 ascent, hinted"] + .8 * p["sam k=5 plain, hinted"])


@pytest.mark.slow  # about ten CPU compiles of a toy Llama train step
def test_smoke_train_section_and_render(tmp_path):
  doc = _smoke(tmp_path, "train")
  llama = doc["details"]["train"]["llama"]["targets"]["cpu"]
  # IRE: one refresh step and nine plain steps in ten; SALA (k = 2): a start and an end.
  assert sorted(k["share"] for k in llama["ire_grad_sq"]["kinds"]) == pytest.approx([0.1, 0.9])
  assert [k["share"] for k in llama["sala"]["kinds"]] == pytest.approx([0.5, 0.5])
  table = S.train_table(doc["details"]["train"])
  assert "| SALA (k=2, stage 2) | ≤ 1.55× | (CPU bytes " in table


def test_extra_collectives_and_the_train_table():
  base = [{"opcode": "all-gather", "shape": "f32[96,128]", "count": 2, "bytes": 1}]
  prog = [{**base[0], "count": 3}, {"opcode": "all-reduce", "shape": "s32[256]", "count": 8,
                                    "bytes": 1}]
  assert S.extra_collectives(prog, base) == [{**base[0], "count": 1}, prog[1]]
  rec = lambda c: {"bytes": 2.0, "cycles": c, "h100_seconds": 1.0}
  trains = {"llama": {"label": "L", "targets": {"tpu-v5e": {
      "base": rec(10.0), "sam": rec(20.0), "msam": rec(21.5), "sala": rec(15.6)}}}}
  S.train_ratios(trains)
  assert trains["llama"]["ratios"]["tpu-v5e"]["msam / sam"]["cycles"] == pytest.approx(1.075)
  table = S.train_table(trains).splitlines()
  assert "| SAM | ≤ 2.05× | 2.000 ✓ |" in table
  assert "| SALA (k=2, stage 2) | ≤ 1.55× | 1.560 ✗ |" in table
  assert "| mSAM (m=8) / SAM | ≤ 1.05× SAM | 1.075 ✗ |" in table
  assert "| IRE (grad_sq, K=10) | ≤ 1.03× | – |" in table


def test_a_gpu_step_that_fails_is_compiled_again_with_the_fallback(monkeypatch):
  """A failing compile is a result: on H100 the step is compiled again with
  ``GPU_FALLBACK`` and the first failure kept, to be stated beside the numbers; elsewhere,
  or when the fallback fails too, it is recorded as an error."""
  import jax

  calls = []

  def measure(task, arm, target, options=None):
    calls.append((target, options))
    if options is None or arm.label == "sam":
      raise jax.errors.JaxRuntimeError(f"INTERNAL: no tiles {options}\nmore")
    return {"cycles": 1.0}

  monkeypatch.setattr(S, "measure_train", measure)
  m = {"errors": {"h100": {"base": "stale"}}}
  assert S._measure_or_record(m, None, S.SPEC.arm("base"), "h100") == {"cycles": 1.0}
  assert m["fallbacks"] == {"h100": {"base": "INTERNAL: no tiles None"}}
  assert "errors" not in m  # the stale entry cleared, no empty record left
  assert S._measure_or_record(m, None, S.SPEC.arm("sam"), "h100") is None
  assert S._measure_or_record(m, None, S.SPEC.arm("base"), "tpu-v5e") is None
  assert m["errors"] == {"h100": {"sam": "INTERNAL: no tiles None"},
                         "tpu-v5e": {"base": "INTERNAL: no tiles None"}}
  assert calls[-1] == ("tpu-v5e", None)  # no fallback off the GPU
  sentences = S.train_context({"vit": {"label": "ViT", "targets": {}, **m}})["errors"]
  assert "ViT, base, h100: compiled with `xla_gpu_enable_triton_gemm=False`" in sentences
  assert "ViT, sam, h100: does not compile (`INTERNAL: no tiles None`)." in sentences


def _pod_collectives(labels):
  """The collectives of the toy Llama's FSDP train step on a v5e:2x2 slice (4 chips)."""
  task, out = smoke(S.SPEC).tasks[0], {}
  for label in labels:
    _, compiled = S.compile_kinds(task, S.SPEC.arm(label), "v5e:2x2", X.mesh("v5e:2x2"), 8)
    for _share, hints, picks, c in compiled:
      out[(label, tuple(v for _, v in hints))] = X.collectives(c, picks)
  return out


def test_pod_slice_refresh_all_reduces_counts_and_gathers_no_parameters():
  """On a sharded slice IRE's refresh adds only all-reduces of integer counts to AdamW's
  step (no all-gather: the parameters stay sharded), its plain step nothing, and SAM at most
  one more pass's traffic and a small float32 all-reduce (the norm's sums)."""
  need("v5e:2x2")
  got = _pod_collectives(["base", "ire_grad_sq", "sam"])
  base = got[("base", ())]
  assert any(c["opcode"] in ("all-gather", "reduce-scatter", "all-reduce") for c in base)
  refresh = S.extra_collectives(got[("ire_grad_sq", (True,))], base)
  assert refresh, "the refresh combines its counts across the chips"
  for c in refresh:  # small integer arrays (counts) and float scalars; nothing parameter-shaped
    # A tuple's elements: a long one prints /*index=N*/ markers and may be elided.
    parts = re.findall(r"\b([a-z]+\d+)\[([\d,]*)\]", c["shape"])
    assert c["opcode"] == "all-reduce" and parts, c
    assert all((t in ("u32", "s32", "u64", "s64")
                and math.prod(int(x) for x in d.split(",") if x) <= 64)
               or (t == "f32" and not d) for t, d in parts), c
  # The plain step: no collective beyond AdamW's (the mask's flat fraction is read at log time).
  assert not S.extra_collectives(got[("ire_grad_sq", (False,))], base)
  # SAM: the perturbed pass moves the parameter shards and gradients once more (at most the
  # AdamW step's traffic again) and all-reduces the gradient norm's three float32 sums.
  sam = S.extra_collectives(got[("sam", ())], base)
  total = lambda cs: sum(c["bytes"] * c["count"] for c in cs)
  assert total(sam) <= 1.05 * total(base) + 1024, (total(sam), total(base), sam)
  assert any(c["opcode"] == "all-reduce" and "f32[3]" in c["shape"] for c in sam), sam


def test_train_step_targets_on_tpu():
  """The Llama example's train step (toy size) compiled for a TPU v5e: SAM costs at most
  2.05 base steps and mSAM (m = 8, vectorised) at most 1.05 SAM steps, by the compiler's
  estimated cycles, as on the Llama rows at the benchmark's size (compiled_steps.md; the
  ResNet's mSAM row misses its target)."""
  need("tpu-v5e")
  task = smoke(S.SPEC).tasks[0]
  got = {k: S.measure_train(task, S.SPEC.arm(k), "tpu-v5e")["cycles"]
         for k in ("base", "sam", "msam")}
  assert got["sam"] <= 2.05 * got["base"], got
  assert got["msam"] <= 1.05 * got["sam"], got
