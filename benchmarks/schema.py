"""One results schema: every benchmark writes ``results/NAME.json`` as
``{"schema", "benchmark", "meta", "rows", "details"}``, where ``rows`` are :class:`Row` records
(one measured number each) and ``details`` is whatever the benchmark's report needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "ire_optax-benchmark/1"


@dataclasses.dataclass
class Row:
  """One measured number."""

  optimizer: str  # its label (``"SAM"``, ``"AdamW+IRE"``, ...)
  task: str  # model and data (``"ResNet-8, mnist"``)
  metric: str  # ``"time_ratio"`` (time per ``what`` over ``base``'s), ``"test_acc"``, ...
  value: float  # aggregates: the mean or median over ``n``
  base: str = ""  # the optimizer a ratio is relative to
  what: str = ""  # the unit timed (``"train step"``, ``"update (K=10)"``)
  variant: str = ""  # a setting that tells rows of one optimizer apart (``"m=8, vmap"``)
  n: int = 1  # how many measurements (seeds, repetitions) ``value`` summarises
  spread: float | None = None  # their standard deviation
  interleaved: bool = True  # False: whole runs timed one after another, not in alternation
  source: str = ""  # the benchmark that measured it
  note: str = ""  # anything a reader of the table needs


def time_row(optimizer: str, base: str, task: str, what: str, ratio: float, source: str,
             note: str = "", variant: str = "", *, interleaved: bool = True,
             n: int = 1) -> Row:
  """A ``time_ratio`` row: time per ``what`` of ``optimizer`` over ``base``'s."""
  return Row(optimizer=optimizer, task=task, metric="time_ratio", value=float(ratio), base=base,
             what=what, variant=variant, n=n, interleaved=interleaved, source=source, note=note)


def _jsonable(x: Any) -> Any:
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return dataclasses.asdict(x)
  if isinstance(x, Path):
    return str(x)
  if hasattr(x, "tolist"):  # NumPy / JAX scalars and arrays
    return x.tolist()
  return float(x)


def write_results(stem: str | os.PathLike, *, benchmark: str, meta: Mapping[str, Any],
                  rows: Iterable[Row] = (), details: Any = None,
                  markdown: str | None = None) -> Path:
  """Writes ``stem.json`` (and ``stem.md`` if ``markdown``) atomically; returns the JSON path.

  A temporary file and a rename: a benchmark may write after every run and resume from it.
  """
  stem = Path(stem)
  stem.parent.mkdir(parents=True, exist_ok=True)
  doc = {"schema": SCHEMA, "benchmark": benchmark, "meta": dict(meta),
         "rows": [dataclasses.asdict(r) for r in rows], "details": details}
  path = stem.with_name(stem.name + ".json")
  atomic_write(path, json.dumps(doc, indent=1, default=_jsonable) + "\n")
  if markdown is not None:
    atomic_write(stem.with_name(stem.name + ".md"), markdown.rstrip("\n") + "\n")
  return path


def write_micro(name: str, out: str | None, *, rows: Iterable[Row], details: Any,
                **meta: Any) -> Path:
  """A micro-benchmark's ``{out}/{name}.json`` (default: the committed results), the machine
  and the command first in its meta."""
  from benchmarks.runner import command
  from benchmarks.timing import machine

  return write_results(Path(out or RESULTS) / name, benchmark=name, rows=rows, details=details,
                       meta={"machine": machine(), "command": command(name), **meta})


def atomic_write(path: Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def read_results(path: str | os.PathLike) -> dict[str, Any] | None:
  """The results document at ``path`` (rows as :class:`Row`), or None if it is absent."""
  path = Path(path)
  if not path.exists():
    return None
  doc = json.loads(path.read_text())
  if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
    raise ValueError(f"{path} is not a {SCHEMA} results file.")
  doc["rows"] = [Row(**r) for r in doc["rows"]]
  return doc
