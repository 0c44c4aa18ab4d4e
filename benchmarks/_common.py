"""Pieces every benchmark script shares: data, timing, the machine, one result schema.

* **Data**: ``--data-dir`` (:func:`add_data_dir_argument`, default from the
  ``IRE_OPTAX_DATA`` environment variable) names a directory holding
  ``mnist/`` (IDX files), ``wikitext-2/``, ``tinyshakespeare/input.txt``.
  :func:`load_images` reads MNIST from it with ``examples.common.data`` and
  falls back to scikit-learn's bundled digits (offline) when it is absent.
* **Timing**: :func:`time_interleaved` runs several zero-argument blocks
  (one per optimizer) in a rotating order, repetition after repetition, in
  one process, and :class:`Timings` reports each one *as a ratio to a
  baseline measured in the same repetition* (the machines these run on are
  shared and noisy: slow drifts of the load cancel in the paired ratio).
  :class:`Stepper` turns a jitted ``step(carry, *args) -> carry`` into such
  a block.
* **Models**: small pure-JAX networks (:func:`mlp_init`, :func:`cnn_init`)
  and :func:`cross_entropy`.
* **Machine**: :func:`machine` describes the CPU, the library versions, the
  commit and the load average (``os.getloadavg``) at the time of the call.
* **Results**: every script writes ``benchmarks/results/NAME.json`` with
  :func:`write_results`: ``{"schema", "benchmark", "meta", "rows",
  "details"}``, where ``rows`` are :class:`Row` records (one measured number
  each: an optimizer's time ratio to its base, a test accuracy, ...) and
  ``details`` is whatever else the script's own report needs.
  ``benchmarks/report.py`` reads only the rows (:func:`read_rows`).
* **Statistics**: :func:`mean_std` (NaNs dropped, sample std),
  :func:`median`, :func:`steps_to_reach`, :func:`paired_difference` (by
  seed) and its :func:`verdict`.

Benchmark scripts run as ``python benchmarks/NAME.py`` and start with
``import _common`` (the script's directory is on ``sys.path``); importing it
puts the repository root on ``sys.path`` so that ``examples.common`` imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from examples.common import data as _data  # noqa: E402
from examples.common.train import steps_to_reach  # noqa: E402,F401  (re-exported)

DATA_ENV = "IRE_OPTAX_DATA"
SCHEMA = "ire_optax-benchmark/1"

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
  """Adds ``--data-dir`` (default: ``$IRE_OPTAX_DATA``; absent: the offline data)."""
  parser.add_argument(
      "--data-dir", default=os.environ.get(DATA_ENV) or None, metavar="DIR",
      help=f"directory holding mnist/, wikitext-2/, tinyshakespeare/ (default: ${DATA_ENV}; "
           "without it the offline fallbacks are used: scikit-learn digits, CPython text)")


def data_path(data_dir: str | os.PathLike | None, *parts: str) -> Path | None:
  """``data_dir/parts...`` if ``data_dir`` is given and that path exists, else None."""
  if not data_dir:
    return None
  p = Path(data_dir).joinpath(*parts)
  return p if p.exists() else None


def mnist_dir(data_dir: str | os.PathLike | None) -> Path | None:
  """The ``mnist`` directory under ``data_dir`` if it holds the training images."""
  d = data_path(data_dir, "mnist")
  if d is None or not any(d.glob("train-images*")):
    return None
  return d


def load_images(data_dir: str | os.PathLike | None, *, scale: str = "standard",
                require_mnist: bool = False) -> _data.ImageData:
  """MNIST from ``data_dir/mnist`` (``examples.common.data.load_mnist``), else digits.

  Args:
    data_dir: the ``--data-dir`` value (None: no data directory).
    scale: ``"standard"`` (per-channel standardised with the training set's
      statistics) or ``"unit"`` (MNIST pixels divided by 255; the digits
      fallback is always standardised).
    require_mnist: raise ``FileNotFoundError`` instead of falling back.

  Returns:
    An ``ImageData``; its ``name`` is ``"mnist"`` or ``"digits"``.
  """
  if scale not in ("standard", "unit"):
    raise ValueError(f"`scale` must be 'standard' or 'unit'; got {scale!r}.")
  d = mnist_dir(data_dir)
  if d is None:
    if require_mnist:
      raise FileNotFoundError(
          f"MNIST not found: pass --data-dir DIR (or set ${DATA_ENV}) with DIR/mnist/ holding "
          "the IDX files.")
    return _data.load_digits()
  if scale == "unit":
    img = _data.load_mnist(d, standardise=False)
    img.x_train /= 255.0
    img.x_test /= 255.0
    return img
  return _data.load_mnist(d)


def describe_images(img: _data.ImageData) -> str:
  """One line naming the data set and its split sizes."""
  name = "MNIST" if img.name == "mnist" else (
      "scikit-learn digits (MNIST not found)" if img.name == "digits" else img.name)
  return f"{name} ({len(img.x_train):,} train / {len(img.x_test):,} test)"


def read_text(data_dir: str | os.PathLike | None, *parts: str) -> tuple[str, str]:
  """``(text, name)`` of ``data_dir/parts...``; CPython's documentation text if absent."""
  p = data_path(data_dir, *parts)
  if p is not None:
    return _data.read_text_path(p), "/".join(parts)
  return _data.cpython_docs_text(), "CPython documentation text (data not found)"


# -----------------------------------------------------------------------------
# Models (pure JAX, float32): the small networks the cost benchmarks time
# -----------------------------------------------------------------------------


def mlp_init(key: Any, sizes: Sequence[int]) -> list[dict[str, Any]]:
  """An MLP ``sizes[0] -> ... -> sizes[-1]``: He-normal weights (layer ``i`` from
  ``fold_in(key, i)``), zero biases."""
  import jax
  import jax.numpy as jnp

  return [{"w": jax.random.normal(jax.random.fold_in(key, i), (m, n)) * jnp.sqrt(2.0 / m),
           "b": jnp.zeros(n)}
          for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]


def mlp_logits(params: list[dict[str, Any]], x: Any) -> Any:
  """ReLU MLP on the flattened input."""
  import jax

  h = x.reshape(x.shape[0], -1)
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return h @ params[-1]["w"] + params[-1]["b"]


def cnn_init(key: Any, *, channels: Sequence[int], strides: Sequence[int], image_size: int,
             in_channels: int = 1, dense: Sequence[int] = (), num_classes: int = 10,
             flatten: bool = False) -> dict[str, Any]:
  """A CNN: 3x3 ``SAME`` convolutions with ``channels``/``strides`` and ReLU, then
  a global mean pool (or, with ``flatten``, the flattened feature map), ReLU
  dense layers of widths ``dense`` and a linear classifier. He-normal weights,
  zero biases. ``image_size``: the (square) input's side."""
  import jax
  import jax.numpy as jnp

  if len(channels) != len(strides):
    raise ValueError("`channels` and `strides` need the same length.")
  keys = iter(jax.random.split(key, len(channels) + len(dense) + 1))
  conv, c_in, side = [], in_channels, image_size
  for c, s in zip(channels, strides, strict=True):
    conv.append({"w": jax.random.normal(next(keys), (3, 3, c_in, c)) * jnp.sqrt(2.0 / (9 * c_in)),
                 "b": jnp.zeros(c)})
    c_in, side = c, -(-side // s)
  fan_in = c_in * side * side if flatten else c_in
  head = []
  for n in (*dense, num_classes):
    head.append({"w": jax.random.normal(next(keys), (fan_in, n)) * jnp.sqrt(2.0 / fan_in),
                 "b": jnp.zeros(n)})
    fan_in = n
  return {"conv": conv, "dense": head}


def cnn_logits(params: dict[str, Any], x: Any, *, strides: Sequence[int],
               flatten: bool = False) -> Any:
  """Logits of :func:`cnn_init`'s network on NHWC images ``x``."""
  import jax

  h = x
  for layer, s in zip(params["conv"], strides, strict=True):
    h = jax.lax.conv_general_dilated(h, layer["w"], (s, s), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + layer["b"])
  h = h.reshape(h.shape[0], -1) if flatten else h.mean(axis=(1, 2))
  for layer in params["dense"][:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return h @ params["dense"][-1]["w"] + params["dense"][-1]["b"]


def cross_entropy(logits: Any, labels: Any) -> Any:
  """Mean softmax cross-entropy with integer labels."""
  import optax

  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# -----------------------------------------------------------------------------
# Timing
# -----------------------------------------------------------------------------


def _block(x: Any) -> Any:
  import jax

  return jax.block_until_ready(x)


class Stepper:
  """A timing block: ``steps`` calls of ``carry = step(carry, *args_at(i))``.

  ``args_at(i)`` gives the extra arguments of the ``i``-th call over the
  stepper's life (e.g. a batch); the carry persists between blocks.
  """

  def __init__(self, step: Callable[..., Any], carry: Any, steps: int = 1,
               args_at: Callable[[int], Sequence[Any]] | None = None):
    self.step, self.carry, self.steps, self.args_at, self.calls = step, carry, steps, args_at, 0

  def __call__(self) -> Any:
    c = self.carry
    for _ in range(self.steps):
      args = self.args_at(self.calls) if self.args_at is not None else ()
      c = self.step(c, *args)
      self.calls += 1
    self.carry = c
    return c


@dataclasses.dataclass
class Timings:
  """Seconds per unit of work of every block, one entry per repetition.

  ``seconds[name][r]`` is the time of block ``name`` in repetition ``r``
  divided by its ``units`` (steps per block). Ratios pair the two blocks of
  the same repetition.
  """

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

  def quantile_ratio(self, name: str, q: float, baseline: str | None = None) -> float:
    v = sorted(self.paired(name, baseline))
    return _quantile(v, q)

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
                     units: int = 1, warmup: int = 1, clock: str = "wall") -> Timings:
  """Times each block ``reps`` times, interleaved, in a rotating order.

  In repetition ``r`` every block runs once, the order rotated by ``r`` so
  that no block always follows the same one; each block's result is waited
  for (``jax.block_until_ready``) inside its timed region. ``warmup``
  untimed rounds run first (compilation, first-call effects).

  Args:
    blocks: name -> zero-argument callable (e.g. a :class:`Stepper`).
    baseline: the name the ratios are relative to.
    reps: timed repetitions.
    units: units of work per block call (time is divided by it: s/step).
    warmup: untimed rounds before timing.
    clock: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (this process's
      CPU time, all threads: robust to other processes on the machine). Both
      are recorded; :meth:`Timings.on` reads the other one.
  """
  if baseline not in blocks:
    raise ValueError(f"baseline {baseline!r} is not one of {list(blocks)}.")
  if clock not in ("wall", "cpu"):
    raise ValueError(f"`clock` must be 'wall' or 'cpu'; got {clock!r}.")
  names = list(blocks)
  for _ in range(warmup):
    for n in names:
      _block(blocks[n]())
  by_clock: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names}
                                                 for c in ("wall", "cpu")}
  for r in range(reps):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      w0, c0 = time.perf_counter(), time.process_time()
      _block(blocks[n]())
      by_clock["wall"][n].append((time.perf_counter() - w0) / units)
      by_clock["cpu"][n].append((time.process_time() - c0) / units)
  return Timings(by_clock[clock], baseline, clock, by_clock)


# -----------------------------------------------------------------------------
# Machine
# -----------------------------------------------------------------------------


def loadavg() -> float | None:
  """The 1-minute load average, or None where the OS has none."""
  try:
    return os.getloadavg()[0]
  except (AttributeError, OSError):
    return None


def machine() -> dict[str, Any]:
  """The CPU, core count, library versions, commit and current load average."""
  import jax
  import optax

  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True, check=False).stdout.strip() or None
  except OSError:
    commit = None
  n = os.cpu_count()
  load = loadavg()
  return {
      "cpu": cpu, "cores": n, "system": platform.system(), "python": platform.python_version(),
      "jax": jax.__version__, "optax": optax.__version__, "backend": jax.default_backend(),
      "commit": commit, "loadavg": load,
      "summary": f"{n}-core CPU ({cpu}), jax {jax.__version__} ({jax.default_backend()}), "
                 f"optax {optax.__version__}"
                 + (f", load average {load:.1f}" if load is not None else ""),
  }


# -----------------------------------------------------------------------------
# Results: one row record, one writer, one reader
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  """One measured number.

  Attributes:
    optimizer: the optimizer's label (``"SAM"``, ``"AdamW+IRE"``, ...).
    task: model and data (``"ResNet-8, mnist"``).
    metric: what ``value`` is: ``"time_ratio"`` (time per unit of ``what``
      divided by ``base``'s), ``"test_acc"``, ``"top_eig"``, ...
    value: the number (aggregates: the mean or median over ``n``).
    base: the optimizer a ratio is relative to ("" if none).
    what: the unit timed (``"train step"``, ``"update (K=10)"``).
    variant: a setting that distinguishes rows of one optimizer (``"m=8, vmap"``).
    n: how many measurements (seeds, repetitions) ``value`` summarises.
    spread: their standard deviation, or None.
    interleaved: optimizer and base timed in alternation in one process
      (False: whole runs timed one after another).
    source: the benchmark script that measured it.
    note: anything a reader of the table needs.
  """

  optimizer: str
  task: str
  metric: str
  value: float
  base: str = ""
  what: str = ""
  variant: str = ""
  n: int = 1
  spread: float | None = None
  interleaved: bool = True
  source: str = ""
  note: str = ""


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

  The JSON is ``{"schema", "benchmark", "meta", "rows", "details"}``. Writing
  goes through a temporary file and a rename, so a script may call this
  after every run (results are never half-written) and resume from it with
  :func:`read_results`.
  """
  stem = Path(stem)
  stem.parent.mkdir(parents=True, exist_ok=True)
  doc = {"schema": SCHEMA, "benchmark": benchmark, "meta": dict(meta),
         "rows": [dataclasses.asdict(r) for r in rows], "details": details}
  path = stem.with_name(stem.name + ".json")
  _atomic_write(path, json.dumps(doc, indent=1, default=_jsonable) + "\n")
  if markdown is not None:
    _atomic_write(stem.with_name(stem.name + ".md"), markdown.rstrip("\n") + "\n")
  return path


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def read_results(path: str | os.PathLike) -> dict[str, Any] | None:
  """A results document written by :func:`write_results` (rows as :class:`Row`), or None.

  Returns None if the file does not exist; raises ``ValueError`` for a file
  in another schema.
  """
  path = Path(path)
  if not path.exists():
    return None
  doc = json.loads(path.read_text())
  if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
    raise ValueError(f"{path} is not a {SCHEMA} results file.")
  doc["rows"] = [Row(**r) for r in doc["rows"]]
  return doc


def read_rows(results: str | os.PathLike = RESULTS) -> list[Row]:
  """The rows of every ``*.json`` results file under ``results``, by file name."""
  rows: list[Row] = []
  for path in sorted(Path(results).glob("*.json")):
    doc = json.loads(path.read_text())
    if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
      rows += [Row(**r) for r in doc["rows"]]
  return rows


# -----------------------------------------------------------------------------
# Statistics
# -----------------------------------------------------------------------------


def finite(values: Iterable[Any]) -> list[float]:
  """The values that are finite numbers (None and NaN dropped)."""
  out = []
  for x in values:
    if x is None:
      continue
    x = float(x)
    if math.isfinite(x):
      out.append(x)
  return out


def mean_std(values: Iterable[Any]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value) of the finite values.

  None and NaN are dropped; ``(nan, nan)`` if nothing is left.
  """
  v = finite(values)
  if not v:
    return float("nan"), float("nan")
  return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def median(values: Iterable[Any]) -> float:
  """Median of the finite values; NaN if there are none."""
  v = finite(values)
  return statistics.median(v) if v else float("nan")


def _quantile(sorted_values: Sequence[float], q: float) -> float:
  """Linear-interpolation quantile (NumPy's default) of already sorted values."""
  if not sorted_values:
    return float("nan")
  pos = q * (len(sorted_values) - 1)
  lo = math.floor(pos)
  hi = min(lo + 1, len(sorted_values) - 1)
  return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def paired_difference(worse: Mapping[Any, float], better: Mapping[Any, float]
                      ) -> dict[str, Any] | None:
  """``better - worse`` paired by key (seed): mean, sample std and standard error.

  Only keys present in both count; None if there are none. ``se`` is NaN for
  a single pair.
  """
  keys = sorted(set(worse) & set(better))
  if not keys:
    return None
  diffs = [float(better[k]) - float(worse[k]) for k in keys]
  m, sd = mean_std(diffs)
  se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
  return {"mean": m, "std": sd, "se": se, "n": len(diffs), "diffs": diffs}


def verdict(d: Mapping[str, Any] | None) -> str:
  """Words for a paired difference (better - worse): reproduced needs mean >= 2 SE."""
  if d is None:
    return "not run"
  if d["n"] < 2 or not math.isfinite(d["se"]):
    return "one seed only: no verdict"
  if d["se"] == 0.0:
    return "reproduced" if d["mean"] > 0 else ("tie" if d["mean"] == 0 else "reversed")
  t = d["mean"] / d["se"]
  if t >= 2:
    return "reproduced (>= 2 SE)"
  if t > 0:
    return "same direction, within noise"
  if t > -2:
    return "opposite direction, within noise"
  return "reversed (>= 2 SE)"
