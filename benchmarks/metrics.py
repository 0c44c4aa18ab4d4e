"""Statistics of measured numbers: means, medians, quantiles, paired differences, ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


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


def quantile(sorted_values: Sequence[float], q: float) -> float:
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


def ratio(num: float | None, den: float | None) -> float | None:
  """``num / den``, or None where either is missing or ``den`` is 0 (not measured)."""
  return None if num is None or not den else float(num) / float(den)
