"""Timing in one process: blocks interleaved, each a ratio to a baseline of the same repetition.

On a shared, noisy machine slow drifts of the load cancel in the paired ratio.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class Stepper:
  """A timing block: ``steps`` calls of ``carry = step(carry, *args_at(i))``.

  ``i`` counts the calls over the stepper's life (e.g. to pick a batch); the carry persists.
  """

  def __init__(self, step: Callable[..., Any], carry: Any, steps: int = 1,
               args_at: Callable[[int], Sequence[Any]] | None = None):
    self.step, self.carry, self.steps, self.args_at, self.calls = step, carry, steps, args_at, 0

  def __call__(self) -> Any:
    for _ in range(self.steps):
      args = self.args_at(self.calls) if self.args_at is not None else ()
      self.carry = self.step(self.carry, *args)
      self.calls += 1
    return self.carry


@dataclasses.dataclass
class Timings:
  """``seconds[name][r]``: block ``name``'s time per unit of work in repetition ``r``."""

  seconds: dict[str, list[float]]
  baseline: str
  clock: str = "wall"
  by_clock: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)

  def on(self, clock: str) -> Timings:
    """The same repetitions read on another clock (``"wall"`` or ``"cpu"``)."""
    if clock == self.clock:
      return self
    if clock not in self.by_clock:
      raise ValueError(f"clock {clock!r} was not recorded; have {sorted(self.by_clock)}.")
    return Timings(self.by_clock[clock], self.baseline, clock, self.by_clock)

  def median(self, name: str) -> float:
    return statistics.median(self.seconds[name])

  def paired(self, name: str, baseline: str | None = None) -> list[float]:
    base = self.seconds[baseline or self.baseline]
    return [a / b for a, b in zip(self.seconds[name], base, strict=True)]

  def ratio(self, name: str, baseline: str | None = None) -> float:
    """Median over repetitions of ``time(name) / time(baseline)`` in the same repetition."""
    return statistics.median(self.paired(name, baseline))

  def min_ratio(self, name: str, baseline: str | None = None) -> float:
    """Fastest repetition over fastest repetition (robust to additive load noise)."""
    return min(self.seconds[name]) / min(self.seconds[baseline or self.baseline])

  def summary(self) -> dict[str, Any]:
    """JSON-ready: medians, paired ratios (median, min, max) and the raw seconds."""
    return {
        "clock": self.clock, "baseline": self.baseline, "reps": len(self.seconds[self.baseline]),
        "median_s": {n: self.median(n) for n in self.seconds},
        "ratio": {n: self.ratio(n) for n in self.seconds},
        "ratio_min": {n: min(self.paired(n)) for n in self.seconds},
        "ratio_max": {n: max(self.paired(n)) for n in self.seconds},
        "seconds": self.seconds,
    }


def time_interleaved(blocks: Mapping[str, Callable[[], Any]], *, baseline: str, reps: int,
                     units: int = 1, warmup: int = 1) -> Timings:
  """Times each block ``reps`` times, interleaved, after ``warmup`` untimed rounds.

  Repetition ``r`` runs every block once in an order rotated by ``r`` and waits for each
  result inside its timed region; times are divided by ``units`` (work per call, e.g. steps).
  Wall and process CPU time are both recorded (:meth:`Timings.on`); the result reads wall.
  """
  import jax

  if baseline not in blocks:
    raise ValueError(f"baseline {baseline!r} is not one of {list(blocks)}.")
  names = list(blocks)
  for _ in range(warmup):
    for n in names:
      jax.block_until_ready(blocks[n]())
  by_clock: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names}
                                                 for c in ("wall", "cpu")}
  for r in range(reps):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(blocks[n]())
      by_clock["wall"][n].append((time.perf_counter() - w0) / units)
      by_clock["cpu"][n].append((time.process_time() - c0) / units)
  return Timings(by_clock["wall"], baseline, "wall", by_clock)


def update_stepper(tx: Any, params: Any, grads: Any, steps: int = 1) -> Stepper:
  """A block of ``steps`` jitted ``tx`` updates and applies on fixed ``grads``, on (donated)
  copies of ``params`` and of ``tx.init``'s state."""
  import jax
  import jax.numpy as jnp
  import optax

  def step(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = jax.tree.map(jnp.copy, params)
  return Stepper(jax.jit(step, donate_argnums=0), (p, tx.init(p)), steps, lambda i: (grads,))


def loadavg() -> float | None:
  """The 1-minute load average, or None where the OS has none."""
  try:
    return os.getloadavg()[0]
  except (AttributeError, OSError):
    return None


def _cpu_name() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """The CPU, core count, library versions, commit and current load average."""
  import jax
  import optax

  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True, check=False).stdout.strip() or None
  except OSError:
    commit = None
  cpu, n, load = _cpu_name(), os.cpu_count(), loadavg()
  return {
      "cpu": cpu, "cores": n, "system": platform.system(), "python": platform.python_version(),
      "jax": jax.__version__, "optax": optax.__version__, "backend": jax.default_backend(),
      "commit": commit, "loadavg": load,
      "summary": f"{n}-core CPU ({cpu}), jax {jax.__version__} ({jax.default_backend()}), "
                 f"optax {optax.__version__}"
                 + (f", load average {load:.1f}" if load is not None else ""),
  }
