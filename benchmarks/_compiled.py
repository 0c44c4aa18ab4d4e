"""Compile for a TPU v5e or an NVIDIA H100 without one, and read what the program does.

XLA compiles for a target it is described: libtpu's topology description (a TPU v5e chip, or
a slice such as ``"v5e:4x4"``), a GpuTargetConfig for an H100 SXM (``h100_sxm.txtpb`` beside
this file), or the host CPU. Nothing runs; the optimized HLO is the real program, with the
target's fusions, loops, conditionals and (on TPU) the compiler's own cycle estimates.

Import this module **before** JAX initialises a backend: it sets ``JAX_PLATFORMS=cpu`` (the
host runs nothing but the compiler) unless already set, and the ``TPU_*`` variables that keep
libtpu from looking for a TPU or a metadata server when a TPU target is first described.

Compile::

  import _compiled as X
  params = X.place({"w": jax.ShapeDtypeStruct((10**7,), jnp.float32)}, "h100")
  compiled = X.compile_fn(step, params, params, target="h100", donate_argnums=(0,))
  a = X.analyze(compiled)          # the path that runs no conditional branch
  a.bytes, a.kernels, a.host_round_trips, a.cycles, a.collectives, X.h100_seconds(a)

Read (:func:`analyze`, from a ``Compiled`` or HLO text): every instruction that executes,
with each ``while`` body counted ``known_trip_count`` times, and each ``conditional`` counted
as executed once (× trips) but its branches' contents only as the ``branch`` policy says
(``None``: none of them, the plain path; an int: that branch index of every conditional;
``"max"``: the branch moving the most bytes). Each conditional's branches are also analysed
on their own (:attr:`Analysis.conditionals`), so a caller can add the branch a step takes.

* **bytes**: per executed kernel, the bytes of its operands plus its result, as XLA's cost
  analysis counts a fusion: an operand that the fused computation only slices counts the
  slices, an in-place ``dynamic-update-slice`` root counts the update, not the buffer.
* **kernels**: instructions that launch work on the device (fusions, custom calls, copies,
  unfused reductions, sorts, scatters, collectives, ...; not parameters, constants, tuples,
  bitcasts or control flow), by opcode; on GPU each is one launch.
* **host round trips** (GPU): XLA:GPU copies a conditional's predicate to the host before it
  runs a branch, and a ``while`` without a known trip count its condition each iteration.
* **cycles** (TPU): the sum of the TPU compiler's ``estimated_cycles`` over the executed
  instructions.
* **collectives**: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
  (sync or async ``-start``), each with its result bytes and the times it executes.

:func:`h100_seconds` is the H100 time model: bytes / 3.35 TB/s + 4 µs per executed kernel +
10 µs per host round trip.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
            "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}
H100_CONFIG = Path(__file__).resolve().with_name("h100_sxm.txtpb")

# The H100 time model.
H100_BANDWIDTH = 3.35e12  # bytes/s (H100 SXM HBM3)
H100_LAUNCH = 4e-6  # s per executed kernel
H100_ROUND_TRIP = 10e-6  # s per host round trip

TARGETS = ("tpu-v5e", "h100", "cpu")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")

# -----------------------------------------------------------------------------
# Targets and compiling
# -----------------------------------------------------------------------------


def available(target: str) -> str | None:
  """None if ``target`` can be compiled for here, else why not (for a test's skip message)."""
  import importlib.util
  if target == "cpu":
    return None
  if _is_tpu(target):
    if importlib.util.find_spec("libtpu") is None:
      return "libtpu is not installed (pip install --no-deps 'libtpu==<matching jaxlib>')"
    return None
  if target == "h100":
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
      return "the jax-cuda12 plugin is not installed (jax-cuda12-plugin, jax-cuda12-pjrt)"
    return None
  return f"unknown target {target!r}"


def _is_tpu(target: str) -> bool:
  return target == "tpu-v5e" or target.startswith("v5e:")


@functools.cache
def devices(target: str) -> tuple[Any, ...]:
  """The devices of ``target``: ``"tpu-v5e"`` (one chip of a v5e:2x2), a TPU slice such as
  ``"v5e:4x4"`` (all its chips), ``"h100"`` or ``"cpu"``."""
  import jax
  from jax.experimental import topologies
  if _is_tpu(target):
    for k, v in _TPU_ENV.items():
      os.environ.setdefault(k, v)
    topo = "v5e:2x2" if target == "tpu-v5e" else target
    devs = topologies.get_topology_desc(topo, "tpu").devices
    return tuple(devs[:1] if target == "tpu-v5e" else devs)
  if target == "h100":
    return tuple(topologies.get_topology_desc(
        platform="cuda", target_config=H100_CONFIG.read_text(), topology="1x1x1").devices)
  if target == "cpu":
    return tuple(jax.devices("cpu")[:1])
  raise ValueError(f"unknown target {target!r}; one of {TARGETS} or a TPU slice 'v5e:AxB'")


def mesh(target: str, axis_names: Sequence[str] = ("data",),
         shape: Sequence[int] | None = None) -> Any:
  """A ``jax.sharding.Mesh`` over all devices of ``target`` (e.g. ``"v5e:4x4"``)."""
  import jax
  import numpy as np
  devs = np.array(devices(target), dtype=object)
  return jax.sharding.Mesh(devs.reshape(tuple(shape) if shape else (devs.size,)),
                           tuple(axis_names))


def place(tree: Any, target: str, sharding: Any = None) -> Any:
  """``tree`` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs on ``target``'s first device
  (or with ``sharding``, e.g. a ``NamedSharding`` over :func:`mesh`)."""
  import jax
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(devices(target)[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compile_fn(fn: Callable[..., Any], *args: Any, target: str, place_args: bool = True,
               **jit_kwargs: Any) -> Any:
  """``jax.jit(fn, **jit_kwargs).lower(*args).compile()`` for ``target``, args placed there
  (unless ``place_args=False``: already ShapeDtypeStructs with the shardings wanted)."""
  import jax
  if place_args:
    args = tuple(place(a, target) for a in args)
  return jax.jit(fn, **jit_kwargs).lower(*args).compile()


# -----------------------------------------------------------------------------
# Parsing the optimized HLO
# -----------------------------------------------------------------------------

_ELEMENT_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*\) -> .*\{\s*$")
_NAME = re.compile(r"%([\w.\-]+)")

# Instructions that launch nothing: values, views, control flow (their bodies are counted).
_NO_KERNEL = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
    "call", "after-all", "opt-barrier", "partition-id", "replica-id", "add-dependency",
    "domain", "all-reduce-done", "all-gather-done", "collective-permute-done", "copy-done",
    "async-done", "async-update", "send-done", "recv-done", "get-dimension-size"})
_CONTROL = frozenset({"while", "conditional", "call"})


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape (an array or a tuple of arrays), layouts ignored."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _ELEMENT_BYTES:
      continue
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += n * _ELEMENT_BYTES[dtype]
  return total


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  index: int | None = None  # a parameter's number
  args: str = ""  # the text inside the opcode's parentheses


  def attr(self, key: str) -> str | None:
    m = re.search(rf"\b{key}=%([\w.\-]+)", self.attrs)
    return m.group(1) if m else None

  @property
  def branches(self) -> list[str]:
    m = re.search(r"branch_computations=\{([^}]*)\}", self.attrs)
    if m:
      return _NAME.findall(m.group(1))
    t, f = self.attr("true_computation"), self.attr("false_computation")
    return [c for c in (f, t) if c]  # predicate form: index int(pred), as lax.cond's branches

  @property
  def trip_count(self) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', self.attrs)
    return int(m.group(1)) if m else None

  @property
  def cycles(self) -> int:
    m = re.search(r'"estimated_cycles":"(\d+)"', self.attrs)
    return int(m.group(1)) if m else 0


def _split_shape(rest: str) -> tuple[str, str]:
  """``rest`` (after ``= ``) as (result shape, the remainder starting at the opcode)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


def _parse_instruction(line: str) -> Instruction | None:
  line = line.strip()
  if line.startswith("ROOT "):
    line = line[5:]
  if not line.startswith("%") or " = " not in line:
    return None
  name, _, rest = line.partition(" = ")
  shape, tail = _split_shape(rest)
  m = re.match(r"([\w\-]+)\(", tail)
  if not m:
    return None
  depth, i = 0, m.end() - 1
  for j in range(i, len(tail)):
    depth += tail[j] == "("
    depth -= tail[j] == ")"
    if depth == 0:
      break
  args = tail[i:j + 1]
  index = int(args[1:-1]) if m.group(1) == "parameter" and args[1:-1].isdigit() else None
  return Instruction(name[1:], shape, m.group(1), _NAME.findall(args), tail[j + 1:], index,
                     args[1:-1])


@dataclasses.dataclass
class Module:
  computations: dict[str, list[Instruction]]
  entry: str

  def root(self, computation: str) -> Instruction:
    return self.computations[computation][-1]


def parse_hlo(text: str) -> Module:
  """The computations of an HLO module's text (``compiled.as_text()``)."""
  comps: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.startswith("}"):
      current = None
      continue
    ins = _parse_instruction(line)
    if ins is not None:
      comps[current].append(ins)
  # ROOT is the last instruction printed in a computation in XLA's text format.
  return Module(comps, entry)


# -----------------------------------------------------------------------------
# Costs
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class Collective:
  opcode: str
  bytes: float
  count: float
  replica_groups: str


@dataclasses.dataclass
class Analysis:
  """What one execution of a program (or of a conditional's branch) does."""
  bytes: float = 0.0
  kernels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  conditionals_executed: float = 0.0
  host_round_trips: float = 0.0
  cycles: float = 0.0
  loop_iterations: float = 0.0
  collectives: list[Collective] = dataclasses.field(default_factory=list)
  # Per executed conditional (in program order): the Analysis of each branch, × its trips.
  conditionals: list[list[Analysis]] = dataclasses.field(default_factory=list)
  # Kernel names with the bytes each moves (× trips), for a closer look.
  kernel_bytes: list[tuple[str, str, float]] = dataclasses.field(default_factory=list)

  @property
  def num_kernels(self) -> float:
    return float(sum(self.kernels.values()))

  def __add__(self, other: Analysis) -> Analysis:
    return Analysis(
        self.bytes + other.bytes, self.kernels + other.kernels,
        self.conditionals_executed + other.conditionals_executed,
        self.host_round_trips + other.host_round_trips, self.cycles + other.cycles,
        self.loop_iterations + other.loop_iterations, self.collectives + other.collectives,
        self.conditionals + other.conditionals, self.kernel_bytes + other.kernel_bytes)

  def scaled(self, times: float) -> Analysis:
    return Analysis(
        self.bytes * times, collections.Counter({k: v * times for k, v in self.kernels.items()}),
        self.conditionals_executed * times, self.host_round_trips * times, self.cycles * times,
        self.loop_iterations * times,
        [dataclasses.replace(c, count=c.count * times) for c in self.collectives],
        [[b.scaled(times) for b in bs] for bs in self.conditionals],
        [(n, o, b * times) for n, o, b in self.kernel_bytes])

  def collective_summary(self) -> dict[str, dict[str, float]]:
    """Per collective opcode: executions and bytes (result bytes × executions)."""
    out: dict[str, dict[str, float]] = {}
    for c in self.collectives:
      d = out.setdefault(c.opcode, {"count": 0.0, "bytes": 0.0})
      d["count"] += c.count
      d["bytes"] += c.bytes * c.count
    return out

  def summary(self) -> dict[str, Any]:
    """The headline numbers as a JSON-able dict."""
    return {"bytes": self.bytes, "kernels": self.num_kernels,
            "kernels_by_opcode": dict(sorted(self.kernels.items())),
            "conditionals_executed": self.conditionals_executed,
            "host_round_trips": self.host_round_trips, "cycles": self.cycles,
            "loop_iterations": self.loop_iterations,
            "collectives": self.collective_summary()}


def h100_seconds(a: Analysis) -> float:
  """The H100 time model: bytes / 3.35 TB/s + 4 µs per kernel + 10 µs per host round trip."""
  return a.bytes / H100_BANDWIDTH + a.num_kernels * H100_LAUNCH + a.host_round_trips * \
      H100_ROUND_TRIP


def _fusion_bytes(module: Module, ins: Instruction, shapes: dict[str, str]) -> float:
  """Operands + result of a fusion, counting sliced-only operands as their slices and an
  in-place dynamic-update-slice root as its update."""
  fused = module.computations.get(ins.attr("calls") or "", [])
  params = {f.index: f.name for f in fused if f.opcode == "parameter"}
  users: dict[str, list[Instruction]] = collections.defaultdict(list)
  for f in fused:
    for op in f.operands:
      users[op].append(f)
  local = {f.name: f for f in fused}
  out = shape_bytes(ins.shape)
  dus_buffer = None
  root = fused[-1] if fused else None
  if root is not None and root.opcode == "dynamic-update-slice":
    dus_buffer = root.operands[0]
    update = local.get(root.operands[1])
    if update is not None:
      out = 2 * shape_bytes(update.shape)  # read-modify-write of the updated window
  total = out
  for idx, op in enumerate(ins.operands):
    full = shape_bytes(shapes.get(op, ""))
    pname = params.get(idx)
    if pname is not None and pname == dus_buffer:
      continue
    us = users.get(pname or "", [])
    if us and all(u.opcode in ("slice", "dynamic-slice") and u.operands[0] == pname
                  for u in us):
      total += min(full, sum(shape_bytes(u.shape) for u in us))
    else:
      total += full
  return total


def _instruction_bytes(module: Module, ins: Instruction, shapes: dict[str, str]) -> float:
  if ins.opcode == "fusion":
    return _fusion_bytes(module, ins, shapes)
  if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
    return 2 * shape_bytes(shapes.get(ins.operands[1], ""))
  if ins.opcode == "copy-start" and ins.operands:  # the result tuple aliases its operand
    return 2 * shape_bytes(shapes.get(ins.operands[0], ""))
  if ins.opcode in ("slice", "dynamic-slice"):
    return 2 * shape_bytes(ins.shape)
  return shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)


def _constant(module: Module, computation: str, name: str) -> int | None:
  """The integer value of ``name`` in ``computation`` if it is a (copied) scalar constant."""
  local = {i.name: i for i in module.computations[computation]}
  ins = local.get(name)
  while ins is not None and ins.opcode == "copy" and ins.operands:
    ins = local.get(ins.operands[0])
  if ins is None or ins.opcode != "constant":
    return None
  try:
    return int(ins.args)
  except ValueError:
    return None


def _infer_trip_count(module: Module, computation: str, ins: Instruction) -> int | None:
  """The trip count of ``while(i = I; i < C; i += S)`` read from its computations (XLA:TPU
  does not print ``known_trip_count``)."""
  cond, body = ins.attr("condition"), ins.attr("body")
  if not cond or not body or not ins.operands:
    return None
  cl = {i.name: i for i in module.computations[cond]}
  root = module.root(cond)
  if root.opcode != "compare" or len(root.operands) != 2:
    return None
  direction = re.search(r"direction=(\w+)", root.attrs)
  gte = cl.get(root.operands[0])
  limit = _constant(module, cond, root.operands[1])
  if gte is None or gte.opcode != "get-tuple-element" or limit is None or not direction:
    return None
  k = int(re.search(r"index=(\d+)", gte.attrs).group(1))  # type: ignore[union-attr]
  init_tuple = {i.name: i for i in module.computations[computation]}.get(ins.operands[0])
  if init_tuple is None or init_tuple.opcode != "tuple" or k >= len(init_tuple.operands):
    return None
  start = _constant(module, computation, init_tuple.operands[k])
  bl = {i.name: i for i in module.computations[body]}
  broot = module.root(body)
  if start is None or broot.opcode != "tuple" or k >= len(broot.operands):
    return None
  inc = bl.get(broot.operands[k])
  if inc is None or inc.opcode != "add":
    return None
  src = [bl.get(o) for o in inc.operands]
  steps = [_constant(module, body, o) for o in inc.operands]
  step = next((s for s in steps if s is not None), None)
  if step is None or step <= 0 or not any(
      x is not None and x.opcode == "get-tuple-element" and f"index={k}" in x.attrs
      for x in src):
    return None
  end = limit + (1 if direction.group(1) == "LE" else 0)
  if direction.group(1) not in ("LT", "LE"):
    return None
  return max(0, -(-(end - start) // step))


def _analyze(module: Module, computation: str, branch: Any, gpu: bool) -> Analysis:
  a = Analysis()
  instructions = module.computations[computation]
  shapes = {i.name: i.shape for i in instructions}
  for ins in instructions:
    op = ins.opcode
    a.cycles += ins.cycles
    if op == "while":
      # A known trip count (XLA:GPU prints it) runs the body that many times and no
      # condition; else the condition runs each iteration (on GPU, deciding on the host).
      trips = ins.trip_count
      known = trips is not None
      if not known:
        trips = _infer_trip_count(module, computation, ins)  # XLA:TPU's counted loops
      n = trips if trips is not None else 1
      a += _analyze(module, ins.attr("body") or "", branch, gpu).scaled(n)
      a.loop_iterations += n
      if not known:
        a += _analyze(module, ins.attr("condition") or "", branch, gpu).scaled(n + 1)
        if gpu:
          a.host_round_trips += n + 1
      continue
    if op == "conditional":
      a.conditionals_executed += 1
      if gpu:
        a.host_round_trips += 1
      per_branch = [_analyze(module, b, branch, gpu) for b in ins.branches]
      a.conditionals.append(per_branch)
      if per_branch:
        if branch == "max":
          a += max(per_branch, key=lambda b: b.bytes)
        elif isinstance(branch, int) and not isinstance(branch, bool):
          a += per_branch[min(branch, len(per_branch) - 1)]
      continue
    if op == "call":
      a += _analyze(module, ins.attr("to_apply") or ins.attr("calls") or "", branch, gpu)
      continue
    if op in _NO_KERNEL or op.endswith("-done"):
      continue
    if op == "async-start" and ins.attr("calls") in module.computations:
      op = module.root(ins.attr("calls") or "").opcode + "-start"  # e.g. all-reduce-start
    b = _instruction_bytes(module, ins, shapes)
    a.bytes += b
    a.kernels[op] += 1
    a.kernel_bytes.append((ins.name, op, b))
    base = op[:-6] if op.endswith("-start") else op
    if base in COLLECTIVES:
      m = re.search(r"replica_groups=(\{[^ ]*\}|\[[^ ]*\]\S*)", ins.attrs)
      a.collectives.append(Collective(base, shape_bytes(ins.shape), 1.0,
                                      m.group(1) if m else ""))
  return a


def hlo_text(compiled_or_text: Any) -> str:
  return compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()


def analyze(compiled_or_text: Any, *, branch: Any = None, gpu: bool | None = None) -> Analysis:
  """The executed cost of a compiled program (see the module docstring).

  Args:
    compiled_or_text: a ``jax.stages.Compiled`` or its ``as_text()``.
    branch: which branch of each conditional to add: ``None`` (none: the plain path), an
      index (as ``lax.cond``/``lax.switch`` number them: 0 is a predicate's false branch), or
      ``"max"`` (the branch moving the most bytes).
    gpu: whether conditionals round-trip to the host (default: guessed from the HLO, whose
      GPU instructions carry GPU backend configs).
  """
  text = hlo_text(compiled_or_text)
  module = parse_hlo(text)
  if gpu is None:
    gpu = is_gpu_hlo(text)
  return _analyze(module, module.entry, branch, gpu)


def is_gpu_hlo(text: str) -> bool:
  return '"operation_queue_id"' in text or "__cublas" in text or "__triton" in text


def write_json(path: str | os.PathLike, data: Any) -> None:
  Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
