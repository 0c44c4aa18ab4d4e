"""Deviceless compiles for a TPU v5e (chip or slice), an H100 or the CPU, read from the HLO.

Nothing runs: XLA compiles for a described target (libtpu's topology, ``h100_sxm.txtpb``, the
host CPU) and :func:`analyze` counts what the optimized program executes (loop trips applied):
device-memory bytes, kernels, TPU estimated cycles, GPU host round trips and collectives.
Import this module before JAX starts a backend: it sets ``JAX_PLATFORMS=cpu`` unless set.

Example::

  p = {"w": jax.ShapeDtypeStruct((10**7,), jnp.float32)}
  a = analyze(compile_fn(step, p, p, target="h100", donate_argnums=0))
  a.bytes, a.num_kernels, a.host_round_trips, a.cycles, h100_seconds(a)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import metrics

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "jax" in sys.modules:  # JAX read the variable when imported: tell its config too
  import jax as _jax
  if not _jax.config.jax_platforms:  # type: ignore[attr-defined]
    _jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
# libtpu must not look for a TPU or a metadata server; several processes may load it at once.
_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
            "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
H100_CONFIG = Path(__file__).resolve().with_name("h100_sxm.txtpb")
H100_BANDWIDTH, H100_LAUNCH, H100_ROUND_TRIP = 3.35e12, 4e-6, 10e-6  # B/s, s/kernel, s/trip
TIME_MODEL = ("H100: bytes / 3.35 TB/s + 4 us per executed kernel + 10 us per host round "
              "trip; TPU v5e: the sum of the compiler's estimated_cycles of the executed "
              "instructions")
TARGETS = ("tpu-v5e", "h100", "cpu")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")


def _is_tpu(target: str) -> bool:
  return target == "tpu-v5e" or target.startswith("v5e:")


def _installed(module: str) -> bool:
  """Whether ``module`` can be imported: ``find_spec`` raises, not returns None, where a
  parent package of a dotted name is missing."""
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def available(target: str) -> str | None:
  """None if ``target`` can be compiled for here, else why not (a test's skip message)."""
  if _is_tpu(target) and not _installed("libtpu"):
    return "libtpu is not installed (pip install --no-deps 'libtpu==<matching jaxlib>')"
  if target == "h100" and not any(_installed(f"jax_plugins.xla_cuda{v}") for v in (12, 13)):
    return ("no jax CUDA plugin is installed (jax-cuda12-plugin and jax-cuda12-pjrt, or "
            "jax-cuda13-...)")
  return None if target in ("cpu", "h100") or _is_tpu(target) else f"unknown target {target!r}"


def usable(targets: Sequence[str]) -> list[str]:
  """The ``targets`` that can be compiled for here."""
  return [t for t in targets if available(t) is None]


@functools.cache
def devices(target: str) -> tuple[Any, ...]:
  """The devices of ``target``: ``"tpu-v5e"``, a slice ``"v5e:AxB"``, ``"h100"`` or ``"cpu"``."""
  import jax
  from jax.experimental import topologies
  if _is_tpu(target):
    for k, v in _TPU_ENV.items():
      os.environ.setdefault(k, v)
    devs = topologies.get_topology_desc("v5e:2x2" if target == "tpu-v5e" else target,
                                        "tpu").devices
    return tuple(devs[:1] if target == "tpu-v5e" else devs)
  if target == "h100":
    return tuple(topologies.get_topology_desc(
        platform="cuda", target_config=H100_CONFIG.read_text(), topology="1x1x1").devices)
  if target == "cpu":
    return tuple(jax.devices("cpu")[:1])
  raise ValueError(f"unknown target {target!r}; one of {TARGETS} or a TPU slice 'v5e:AxB'")


def mesh(target: str) -> Any:
  """A one-dimensional ``jax.sharding.Mesh`` (axis ``"data"``) over ``target``'s devices."""
  import jax
  import numpy as np
  return jax.sharding.Mesh(np.array(devices(target), dtype=object), ("data",))


def compile_fn(fn: Callable[..., Any], *args: Any, target: str, place_args: bool = True,
               options: dict[str, Any] | None = None, **jit_kwargs: Any) -> Any:
  """``jax.jit(fn, **jit_kwargs).lower(*args).compile(options)`` for ``target``, the args
  placed on its first device (``place_args=False``: they already carry the shardings wanted);
  ``options``: XLA compiler options."""
  import jax
  if place_args:
    single = getattr(jax.sharding, "make_single_device_sharding", None)  # JAX >= 0.10
    device = devices(target)[0]
    on = single(device) if single else jax.sharding.SingleDeviceSharding(device)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on), args)
  return jax.jit(fn, **jit_kwargs).lower(*args).compile(options)


# Parsing the optimized HLO text.
_BITS = re.compile(r"(?:pred|[a-z]+?(\d+)[a-z0-9]*)")  # pred, s4, bf16, f8e4m3fn, c128, ...
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*\) -> .*\{\s*$")
_NAME = re.compile(r"%([\w.\-]+)")
_SCALAR = re.compile(r"[a-z][a-z0-9]*\[\]")  # a rank-0 array shape
# `%name = shape opcode(operands), attributes`: a tuple shape ends where the opcode begins.
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)"
                          r"\(((?:[^()]|\([^()]*\))*)\)(.*)")
_NO_KERNEL = frozenset({  # values, views, control flow (whose bodies are counted)
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
    "call", "after-all", "opt-barrier", "partition-id", "replica-id", "add-dependency", "domain",
    "async-update", "get-dimension-size"})


def shape_bytes(shape: str) -> float:
  """Device-memory bytes of an HLO shape (an array or a tuple); on-chip arrays count 0."""
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    bits = _BITS.fullmatch(dtype)
    if bits and not _ON_CHIP.search(layout):
      total += int(bits.group(1) or 8) / 8 * math.prod(int(d) for d in dims.split(",") if d)
  return total


class Instruction(NamedTuple):
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str  # the text after the operands
  args: str  # the text inside the operands' parentheses

  def attr(self, key: str) -> str:
    m = re.search(rf"\b{key}=%([\w.\-]+)", self.attrs)
    return m.group(1) if m else ""

  def number(self, pattern: str) -> int:
    m = re.search(pattern, self.attrs)
    return int(m.group(1)) if m else -1


def _parse_instruction(line: str) -> Instruction | None:
  m = _INSTRUCTION.match(line)
  if m is None:
    return None
  name, shape, opcode, args, attrs = m.groups()
  return Instruction(name, shape, opcode, _NAME.findall(args), attrs, args)


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """The computations of an HLO module's text (each ending with its ROOT) and the entry's name."""
  comps: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current, comps[m.group(2)] = m.group(2), []
      entry = m.group(2) if m.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and (ins := _parse_instruction(line)) is not None:
      comps[current].append(ins)
  return comps, entry


@dataclasses.dataclass
class Analysis:
  """What one execution of a program (or of a conditional's branch) does."""

  bytes: float = 0.0
  kernels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  conditionals_executed: float = 0.0
  host_round_trips: float = 0.0
  cycles: float = 0.0
  loop_iterations: float = 0.0
  # (opcode, result shape without layouts, bytes): executions
  collectives: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  conditionals: list[list[Analysis]] = dataclasses.field(default_factory=list)  # per branch

  @property
  def num_kernels(self) -> float:
    return float(sum(self.kernels.values()))

  def __add__(self, o: Analysis) -> Analysis:
    return Analysis(**{f.name: getattr(self, f.name) + getattr(o, f.name)
                       for f in dataclasses.fields(self)})

  def scaled(self, k: float) -> Analysis:
    times = lambda c: collections.Counter({key: v * k for key, v in c.items()})
    return Analysis(self.bytes * k, times(self.kernels), self.conditionals_executed * k,
                    self.host_round_trips * k, self.cycles * k, self.loop_iterations * k,
                    times(self.collectives),
                    [[b.scaled(k) for b in bs] for bs in self.conditionals])

  def summary(self, params: int) -> dict[str, Any]:
    """The headline numbers as a JSON-able record, for a program of ``params`` parameters."""
    return {"bytes": self.bytes, "kernels": self.num_kernels,
            "kernels_by_opcode": dict(sorted(self.kernels.items())),
            "conditionals_executed": self.conditionals_executed,
            "host_round_trips": self.host_round_trips, "cycles": self.cycles,
            "loop_iterations": self.loop_iterations,
            "h100_seconds": h100_seconds(self), "bytes_per_param": self.bytes / params}


def h100_seconds(a: Analysis) -> float:
  """The H100 time model: bytes / 3.35 TB/s + 4 µs per kernel + 10 µs per host round trip."""
  return (a.bytes / H100_BANDWIDTH + a.num_kernels * H100_LAUNCH
          + a.host_round_trips * H100_ROUND_TRIP)


def _fusion_bytes(comps: dict[str, list[Instruction]], ins: Instruction,
                  shapes: dict[str, str]) -> float:
  fused = comps.get(ins.attr("calls"), [])
  params = {int(f.args): f.name for f in fused if f.opcode == "parameter" and f.args.isdigit()}
  users: dict[str, list[Instruction]] = collections.defaultdict(list)
  for f in fused:
    for op in f.operands:
      users[op].append(f)
  total, buffer = shape_bytes(ins.shape), None
  if fused and fused[-1].opcode == "dynamic-update-slice":  # in place: the window only
    buffer = fused[-1].operands[0]
    update = next((f for f in fused if f.name == fused[-1].operands[1]), None)
    total = 2 * shape_bytes(update.shape) if update else total
  for i, op in enumerate(ins.operands):
    full, p = shape_bytes(shapes.get(op, "")), params.get(i, "")
    us = users.get(p, [])
    if p and p == buffer:
      continue
    sliced = us and all(u.opcode in ("slice", "dynamic-slice") and u.operands[0] == p for u in us)
    total += min(full, sum(shape_bytes(u.shape) for u in us)) if sliced else full
  return total


def _bytes(comps: dict[str, list[Instruction]], ins: Instruction, shapes: dict[str, str]) -> float:
  operand = lambda k: shape_bytes(shapes.get(ins.operands[k], "")) if len(ins.operands) > k else 0.
  if ins.opcode == "fusion":
    return _fusion_bytes(comps, ins, shapes)
  if ins.opcode == "dynamic-update-slice":
    return 2 * operand(1)
  if ins.opcode in ("copy-start", "slice-start"):  # result: (destination, source, context)
    arrays = ["{}[{}]{}".format(*a) for a in _ARRAY.findall(ins.shape)]
    if len(arrays) < 2:
      return 0.0
    dest = arrays[1] if ins.opcode == "slice-start" else arrays[0]
    source = operand(0)
    if ins.opcode == "slice-start":
      source = min(source, shape_bytes(_ON_CHIP.sub("", dest)))
    return source + shape_bytes(dest)
  if 'custom_call_target="ConcatBitcast"' in ins.attrs:
    return 0.0  # XLA:TPU's view of adjacent buffers as one
  if ins.opcode in ("slice", "dynamic-slice"):
    return 2 * shape_bytes(ins.shape)
  return shape_bytes(ins.shape) + sum(operand(k) for k in range(len(ins.operands)))


def _through_copies(comp: dict[str, Instruction], name: str) -> Instruction:
  """The instruction ``name`` of ``comp`` is a copy (or a chain of copies) of, else itself."""
  ins = comp[name]
  while ins.opcode == "copy":
    ins = comp[ins.operands[0]]
  return ins


def _constant(comp: dict[str, Instruction], name: str | Instruction) -> int:
  """The integer value of ``name`` in ``comp``, a (copied) scalar constant; else ValueError."""
  ins = name if isinstance(name, Instruction) else _through_copies(comp, name)
  if ins.opcode != "constant":
    raise ValueError(name)
  return int(ins.args)


def _infer_trips(comps: dict[str, list[Instruction]], comp: str, ins: Instruction) -> int | None:
  """The trips of ``while (i = I; i < C; i += S)`` (XLA:TPU prints no ``known_trip_count``);
  None for a loop of another form."""
  local = lambda c: {i.name: i for i in comps[c]}
  try:
    cond, body, outer = local(ins.attr("condition")), local(ins.attr("body")), local(comp)
    compare, result = comps[ins.attr("condition")][-1], comps[ins.attr("body")][-1]
    gte, (_, bound) = cond[compare.operands[0]], compare.operands
    k = gte.number(r"index=(\d+)")
    start = _constant(outer, outer[ins.operands[0]].operands[k])
    limit, inc = _constant(cond, bound), body[result.operands[k]]
    counter = [_through_copies(body, o) for o in inc.operands]  # XLA:TPU may copy the counter
    step = max(_constant(body, o) for o in counter if o.opcode != "get-tuple-element")
    counter = [o for o in counter if o.opcode == "get-tuple-element"]
  except (KeyError, IndexError, ValueError):
    return None
  direction = re.search(r"direction=(LT|LE)\b", compare.attrs)
  if (compare.opcode != "compare" or gte.opcode != "get-tuple-element" or not direction
      or result.opcode != "tuple" or inc.opcode != "add" or step <= 0 or len(counter) != 1
      or counter[0].number(r"index=(\d+)") != k):
    return None
  return max(0, -(-(limit + (direction.group(1) == "LE") - start) // step))


def _analyze(comps: dict[str, list[Instruction]], comp: str, gpu: bool, tpu: bool = False
             ) -> Analysis:
  """What computation ``comp`` executes, each conditional's branches apart (no branch taken).

  ``tpu``: an instruction on a scalar (an unfused ``u32[]`` add, say) is no kernel: the TPU's
  scalar unit runs it between the vector kernels, and the compiler prices it at nothing."""
  a = Analysis()
  shapes = {i.name: i.shape for i in comps[comp]}
  for ins in comps[comp]:
    op = ins.opcode
    a.cycles += max(0, ins.number(r'"estimated_cycles":"(\d+)"'))
    if op == "while":  # a known trip count runs no condition; else it runs each trip
      known = ins.number(r'"known_trip_count":\{"n":"(\d+)"')
      inferred = _infer_trips(comps, comp, ins) if known < 0 else None
      trips = known if known >= 0 else (1 if inferred is None else inferred)
      a += _analyze(comps, ins.attr("body"), gpu, tpu).scaled(trips)
      a.loop_iterations += trips
      if known < 0:
        a += _analyze(comps, ins.attr("condition"), gpu, tpu).scaled(trips + 1)
        a.host_round_trips += (trips + 1) * gpu
    elif op == "conditional":
      a.conditionals_executed += 1
      a.host_round_trips += gpu
      listed = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
      branches = _NAME.findall(listed.group(1)) if listed else [
          ins.attr("false_computation"), ins.attr("true_computation")]
      a.conditionals.append([_analyze(comps, b, gpu, tpu) for b in branches])
    elif op == "call":
      a += _analyze(comps, ins.attr("to_apply") or ins.attr("calls"), gpu, tpu)
    elif op not in _NO_KERNEL and not op.endswith("-done"):
      if op == "async-start" and ins.attr("calls") in comps:
        op = comps[ins.attr("calls")][-1].opcode + "-start"  # e.g. all-reduce-start
      a.bytes += _bytes(comps, ins, shapes)
      if not (tpu and op != "fusion" and _SCALAR.match(ins.shape)):
        a.kernels[op] += 1
      if op.removesuffix("-start") in COLLECTIVES:
        a.collectives[(op.removesuffix("-start"), re.sub(r"\{[^}]*\}", "", ins.shape),
                       shape_bytes(ins.shape))] += 1
  return a


def analyze(compiled: Any, *, gpu: bool | None = None) -> Analysis:
  """The cost of a ``jax.stages.Compiled`` (or its text) taking no conditional's branch
  (:func:`taken` adds them); ``gpu``: conditionals round-trip to the host (default: from the HLO).
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  comps, entry = parse_hlo(text)
  if gpu is None:
    gpu = any(s in text for s in ('"operation_queue_id"', "__cublas", "__triton"))
  return _analyze(comps, entry, gpu, tpu='"estimated_cycles"' in text)


# Reading a compiled train step.
Picks = Callable[[int], list[int]]


def first_taken(n: int) -> list[int]:
  """An unhinted ascent step: the first conditional (the SAM gradient) is taken."""
  return [1] + [0] * (n - 1) if n else []


def last_taken(n: int) -> list[int]:
  """SALA's cycle end: its end-of-cycle conditional (the last one) is taken, no other."""
  return [0] * (n - 1) + [1] if n else []


def taken(compiled: Any, picks: Picks | None = None) -> Analysis:
  """The cost of a step that takes, of its ``n`` conditionals in program order, the branches
  ``picks(n)`` (default: each conditional's false branch)."""
  a = analyze(compiled)
  p = picks(len(a.conditionals)) if picks else [0] * len(a.conditionals)
  for branches, i in zip(list(a.conditionals), p, strict=True):
    a = a + branches[min(i, len(branches) - 1)]
  return a


def collectives(compiled: Any, picks: Picks | None = None) -> list[dict[str, Any]]:
  """The executed collectives of a step per (opcode, result shape, bytes): executions."""
  return [{"opcode": op, "shape": shape, "count": float(n), "bytes": b}
          for (op, shape, b), n in sorted(taken(compiled, picks).collectives.items())]


def cycle_breakdown(compiled: Any) -> dict[str, Any]:
  """A TPU program's estimated cycles per fusion kind (``kOutput``: matmuls, convolutions) or
  opcode (each instruction once, loops and branches too)."""
  kinds: collections.Counter = collections.Counter()
  for ins in (i for c in parse_hlo(compiled.as_text())[0].values() for i in c):
    cycles = ins.number(r'"estimated_cycles":"(\d+)"')
    if cycles >= 0:
      kind = re.search(r"kind=(k\w+)", ins.attrs)
      kinds[kind.group(1) if kind and ins.opcode == "fusion" else ins.opcode] += cycles
  return {"by_kind": dict(kinds.most_common())}


RECORD_SUMS = ("bytes", "kernels", "conditionals_executed", "host_round_trips", "cycles",
               "h100_seconds", "bytes_per_param")


def mix(parts: Sequence[tuple[float, dict[str, Any]]]) -> dict[str, Any]:
  """The weighted sum of records (each kind of step's share of the steps × its cost)."""
  return {k: sum(w * p[k] for w, p in parts) for k in RECORD_SUMS}


def ratios(p: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
  """A record over its base record: bytes, TPU cycles (None without) and the H100 time model."""
  return {"bytes": metrics.ratio(p["bytes"], base["bytes"]),
          "cycles": metrics.ratio(p["cycles"], base["cycles"]),
          "h100_time": metrics.ratio(p["h100_seconds"], base["h100_seconds"])}


METRICS = ("B/param", "bytes / base", "TPU v5e cycles / base", "H100 time model / base",
           "kernels", "conditionals", "host round trips")


def metric_cells(target: str, p: dict[str, Any] | None, r: dict[str, float | None]) -> list[str]:
  """The :data:`METRICS` cells of record ``p`` (None: counts not shown) with ratios ``r`` over
  its base, compiled for ``target`` (TPU cycles on a TPU, the time model on an H100)."""
  f = lambda x, fmt: "–" if x is None else format(x, fmt)
  return [f(p and p["bytes_per_param"], ".1f"), f(r["bytes"], ".3f"),
          f(r["cycles"] if _is_tpu(target) else None, ".2f"),
          f(r["h100_time"] if target == "h100" else None, ".2f"), f(p and p["kernels"], ".0f"),
          *(f(p and p[k], ".2g") for k in ("conditionals_executed", "host_round_trips"))]
