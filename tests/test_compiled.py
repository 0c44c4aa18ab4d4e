"""benchmarks/compiled.py: the compiled-program reader counts what the HLO executes."""

from pathlib import Path

from benchmarks import compiled as X  # before JAX starts a backend  # isort: skip

import jax
import jax.numpy as jnp
import pytest

from tests.compilers import need

# A hand-written GPU-style module: a loop of 3 trips around a fusion that slices its input, a
# conditional whose branches differ, an all-reduce, and an in-place dynamic-update-slice.
HLO = """
HloModule m

%fused_slice (param_0: f32[100]) -> f32[10] {
  %param_0 = f32[100]{0} parameter(0)
  ROOT %s = f32[10]{0} slice(%param_0), slice={[0:10]}
}

%fused_dus (param_0.1: f32[100], param_1.1: f32[10], param_2: s32[]) -> f32[100] {
  %param_0.1 = f32[100]{0} parameter(0)
  %param_1.1 = f32[10]{0} parameter(1)
  %param_2 = s32[] parameter(2)
  ROOT %d = f32[100]{0} dynamic-update-slice(%param_0.1, %param_1.1, %param_2)
}

%body (t: (s32[], f32[100])) -> (s32[], f32[100]) {
  %t = (s32[], f32[100]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[100]{0} get-tuple-element(%t), index=1
  %f = f32[10]{0} fusion(%x), kind=kLoop, calls=%fused_slice
  %u = f32[100]{0} fusion(%x, %f, %i), kind=kLoop, calls=%fused_dus
  ROOT %r = (s32[], f32[100]{0}) tuple(%i, %u)
}

%cond (t.1: (s32[], f32[100])) -> pred[] {
  %t.1 = (s32[], f32[100]{0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

%yes (a: f32[100]) -> f32[100] {
  %a = f32[100]{0} parameter(0)
  ROOT %c = f32[100]{0} copy(%a)
}

%no (b: f32[100]) -> f32[100] {
  ROOT %b = f32[100]{0} parameter(0)
}

%sum (x.1: f32[], y.1: f32[]) -> f32[] {
  %x.1 = f32[] parameter(0)
  %y.1 = f32[] parameter(1)
  ROOT %z = f32[] add(%x.1, %y.1)
}

ENTRY %main (x.2: f32[100], p.2: pred[]) -> f32[100] {
  %x.2 = f32[100]{0} parameter(0)
  %p.2 = pred[] parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[100]{0}) tuple(%zero, %x.2)
  %w = (s32[], f32[100]{0}) while(%init), condition=%cond, body=%body, TRIPS
  %y = f32[100]{0} get-tuple-element(%w), index=1
  %k = f32[100]{0} conditional(%p.2, %y, %y), true_computation=%yes, false_computation=%no
  ROOT %ar = f32[100]{0} all-reduce(%k), replica_groups={{0,1}}, to_apply=%sum
}
""".replace("TRIPS", 'backend_config={"operation_queue_id":"0","known_trip_count":{"n":"3"}}')


def test_reads_loops_conditionals_fusions_and_collectives():
  a = X.analyze(HLO, gpu=True)
  # Per trip: the slice fusion reads 10 of the 100 values and writes 10 (80 B); the update
  # fusion reads-modifies-writes a 10-value window (80 B) and reads the 10-value update and
  # the index (44 B), not the 400-byte buffer.
  assert a.loop_iterations == 3
  assert a.bytes == pytest.approx(3 * (80 + 80 + 44) + 800)  # + the all-reduce's 400 in, 400 out
  assert a.kernels == {"fusion": 6, "all-reduce": 1}
  assert a.conditionals_executed == 1 and a.host_round_trips == 1
  assert [b.bytes for b in a.conditionals[0]] == [0, 800]  # false (nothing), true (a copy)
  assert X.taken(HLO, lambda n: [1] * n).bytes == a.bytes + 800  # as lax.cond numbers: 1 true
  assert X.taken(HLO).bytes == a.bytes and X.taken(HLO, X.first_taken).kernels["copy"] == 1
  assert a.collectives == {("all-reduce", "f32[100]", 400): 1}
  assert X.analyze(HLO, gpu=False).host_round_trips == 0
  assert X.h100_seconds(a) == pytest.approx(a.bytes / 3.35e12 + 7 * 4e-6 + 10e-6)


def test_shapes_and_instructions():
  assert X.shape_bytes("f32[10,3]{1,0:T(8,128)}") == 120
  assert X.shape_bytes("f32[10,3]{1,0:T(8,128)S(1)}") == 0  # in TPU VMEM: no HBM traffic
  assert X.shape_bytes("(u8[7]{0}, pred[], /*index=2*/bf16[4])") == 16
  ins = X._parse_instruction(
      "  ROOT %t.3 = (s32[], f32[5]{0}) tuple(%a.1, %b-2), metadata={op_name=\"x\"}")
  assert (ins.name, ins.opcode, ins.operands) == ("t.3", "tuple", ["a.1", "b-2"])


# XLA:TPU prints no trip count; here the body increments a copy of its counter (as in a scanned
# train step), 8 trips from 0, and the body's one instruction has estimated cycles.
TPU_LOOP = """
HloModule m

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %one = s32[] constant(1)
  %i = s32[] get-tuple-element(%t), index=0
  %c = s32[] copy(%i)
  %x = f32[8]{0} get-tuple-element(%t), index=1
  %s = f32[8]{0} sine(%x), backend_config={"estimated_cycles":"10"}
  %n = s32[] add(%c, %one)
  ROOT %r = (s32[], f32[8]{0}) tuple(%n, %s)
}

%cond (t.1: (s32[], f32[8])) -> pred[] {
  %t.1 = (s32[], f32[8]{0}) parameter(0)
  %k = s32[] constant(8)
  %j = s32[] get-tuple-element(%t.1), index=0
  ROOT %lt = pred[] compare(%j, %k), direction=LT
}

ENTRY %main (x.2: f32[8]) -> f32[8] {
  %x.2 = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %x.2)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  ROOT %y = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_infers_the_trips_of_a_loop_with_a_copied_counter():
  a = X.analyze(TPU_LOOP, gpu=False)
  assert a.loop_iterations == 8
  assert a.cycles == 8 * 10
  # TPU (the HLO has estimated cycles): the counter's scalar copy, add and compare are the
  # scalar unit's work, not kernels; the same instructions in a GPU module are kernels.
  assert a.kernels == {"sine": 8}
  assert X.analyze(TPU_LOOP.replace("estimated_cycles", "x"), gpu=False).kernels == {
      "sine": 8, "copy": 8, "add": 8, "compare": 9}

def test_compiled_cpu_loop_and_cond():
  x = jax.ShapeDtypeStruct((1000,), jnp.float32)
  loop = X.analyze(X.compile_fn(
      lambda x: jax.lax.fori_loop(0, 5, lambda i, y: jnp.sin(y) * 2, x), x, target="cpu"))
  assert loop.loop_iterations == 5
  assert 5 * 8000 <= loop.bytes <= 7 * 8000  # one read and one write a trip (+ the copies)
  cond = X.analyze(X.compile_fn(lambda p, x: jax.lax.cond(p, lambda: x * 2, lambda: x),
                                jax.ShapeDtypeStruct((), bool), x, target="cpu"))
  assert cond.conditionals_executed == 1 and len(cond.conditionals[0]) == 2


def test_missing_compilers_are_reasons_to_skip(monkeypatch):
  """Without libtpu or a jax CUDA plugin (whose ``jax_plugins`` package is then missing
  too, so ``find_spec`` of the dotted name raises), the targets are unavailable, not errors."""
  import importlib.util

  find_spec = importlib.util.find_spec

  def without_plugins(name, *args):
    if name.split(".")[0] in ("libtpu", "jax_plugins"):
      if "." in name:
        raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
      return None
    return find_spec(name, *args)

  monkeypatch.setattr(importlib.util, "find_spec", without_plugins)
  assert "libtpu is not installed" in X.available("tpu-v5e")
  assert "no jax CUDA plugin is installed" in X.available("h100")
  assert X.usable(["cpu", "tpu-v5e", "h100"]) == ["cpu"]


def test_a_missing_compiler_fails_where_the_compilers_are_required(monkeypatch):
  """CI installs the compilers: there a test that would skip for want of one fails."""
  monkeypatch.setattr(X, "available", lambda target: "not installed")
  monkeypatch.delenv("IRE_OPTAX_REQUIRE_COMPILERS", raising=False)
  with pytest.raises(pytest.skip.Exception, match="cannot compile for h100 here"):
    need("h100")
  monkeypatch.setenv("IRE_OPTAX_REQUIRE_COMPILERS", "1")
  with pytest.raises(pytest.fail.Exception, match="IRE_OPTAX_REQUIRE_COMPILERS=1"):
    need("h100")


@pytest.mark.parametrize("target", ["tpu-v5e", "h100"])
def test_accelerator_targets(target):
  need(target)
  x = jax.ShapeDtypeStruct((1 << 16,), jnp.float32)
  loop = X.analyze(X.compile_fn(
      lambda x: jax.lax.fori_loop(0, 4, lambda i, y: jnp.sin(y) * 2, x), x, target=target))
  assert loop.loop_iterations == 4  # TPU: inferred from the loop's condition and increment
  # H100: each trip reads and writes the array; TPU v5e keeps it in VMEM for the whole loop
  # (one copy in, one out: only those move HBM bytes).
  assert loop.bytes >= (4 * 8 if target == "h100" else 2 * 4) * (1 << 16)
  cond = X.analyze(X.compile_fn(lambda p, x: jax.lax.cond(p, lambda: x * 2, lambda: x),
                                jax.ShapeDtypeStruct((), bool), x, target=target))
  assert cond.host_round_trips == (1 if target == "h100" else 0)
  if target == "tpu-v5e":
    assert loop.cycles > 0


def test_ci_installs_the_compilers_matching_jaxlib():
  import importlib.metadata as metadata
  import importlib.util

  spec = importlib.util.spec_from_file_location(
      "accelerator_wheels", Path(__file__).resolve().parents[1] / ".ci" / "accelerator_wheels.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  reqs = mod.requirements()
  jaxlib = metadata.version("jaxlib")
  assert f"jax-cuda12-plugin=={jaxlib}" in reqs and f"jax-cuda12-pjrt=={jaxlib}" in reqs
  (tpu,) = [r for r in reqs if r.startswith("libtpu")]
  assert tpu.startswith("libtpu==")
  try:
    installed = metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return
  assert installed.startswith(tpu.split("==")[1].rstrip("*").rstrip(".")), (tpu, installed)


def test_branches_taken_per_conditional():
  x = jax.ShapeDtypeStruct((4096,), jnp.float32)
  p = jax.ShapeDtypeStruct((), bool)

  def f(p, q, x):  # two conditionals in program order: the second consumes the first
    y = jax.lax.cond(p, lambda: jnp.sin(x) * jnp.cos(x), lambda: x)
    return jax.lax.cond(q, lambda: jnp.exp(y) + jnp.tanh(y), lambda: y)

  c = X.compile_fn(f, p, p, x, target="cpu")
  plain, first, last = X.taken(c), X.taken(c, X.first_taken), X.taken(c, X.last_taken)
  a = X.analyze(c)
  assert len(a.conditionals) == 2
  assert first.bytes == plain.bytes + a.conditionals[0][1].bytes
  assert last.bytes == plain.bytes + a.conditionals[1][1].bytes > plain.bytes
  assert X.last_taken(3) == [0, 0, 1] and X.first_taken(2) == [1, 0] and X.last_taken(0) == []
  # A record mixes steps by their shares; ratios are None where the base has no TPU cycles.
  r1, r2 = plain.summary(4096), last.summary(4096)
  assert X.mix([(.5, r1), (.5, r2)])["bytes"] == pytest.approx((r1["bytes"] + r2["bytes"]) / 2)
  assert X.ratios(r2, r1)["cycles"] is None and X.ratios(r2, r1)["bytes"] > 1
