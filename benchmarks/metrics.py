"""Statistics of measured numbers: means, medians, quantiles, paired differences, ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def finite(values: Iterable[Any]) -> list[float]:
  """The values that are finite numbers (None and NaN dropped)."""
  return [float(x) for x in values if x is not None and math.isfinite(float(x))]


def mean_std(values: Iterable[Any]) -> tuple[float, float]:
  """Mean and sample std (ddof=1; 0 for one value) of the finite values; NaNs if none."""
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
  """``better - worse`` paired by key (seed): mean, std, standard error (NaN for one pair)."""
  keys = sorted(set(worse) & set(better))
  if not keys:
    return None
  diffs = [float(better[k]) - float(worse[k]) for k in keys]
  m, sd = mean_std(diffs)
  se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
  return {"mean": m, "std": sd, "se": se, "n": len(diffs), "diffs": diffs}


def aggregate(rows: Sequence[Mapping[str, Any]], group: Sequence[str], keys: Sequence[str],
              base: Callable[[Mapping[str, Any]], tuple]) -> list[dict[str, Any]]:
  """Per group (first-seen order): ``n``, mean and ``KEY_std`` of ``keys``, and ``time_ratio``:
  the median over seeds of ``time_per_step_s`` over the same seed's in group ``base(run)``."""
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault(tuple(r[g] for g in group), []).append(r)
  seeds = {(k, r["seed"]): r["time_per_step_s"] for k, rs in groups.items() for r in rs}
  out = []
  for k, rs in groups.items():
    a: dict[str, Any] = dict(zip(group, k, strict=True), n=len(rs))
    for key in keys:
      a[key], a[key + "_std"] = mean_std(r.get(key) for r in rs)
    a["time_ratio"] = median(r["time_per_step_s"] / seeds[base(r), r["seed"]] for r in rs
                             if seeds.get((base(r), r["seed"])) and r["time_per_step_s"])
    out.append(a)
  return out


def paired(rows: Sequence[Mapping[str, Any]], where: Mapping[str, Any], worse: str,
           better: str, key: str) -> dict[str, Any] | None:
  """:func:`paired_difference` of ``key`` between the runs of optimizers ``worse`` and
  ``better`` matching ``where``, by seed, with its :func:`verdict`; None if no pair."""
  def by(opt: str) -> dict[Any, float]:
    return {r["seed"]: r[key] for r in rows if r["optimizer"] == opt
            and all(r[k] == v for k, v in where.items())}

  d = paired_difference(by(worse), by(better))
  return None if d is None else {**where, "worse": worse, "better": better, **d,
                                 "verdict": verdict(d)}


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


NO_SPEEDUP = {"base_step": None, "fast_step": None, "value": None, "bound": None}


def speedup(base: Sequence[Sequence[float]], fast: Sequence[Sequence[float]],
            target: float) -> dict[str, Any]:
  """Steps of ``base`` over steps of ``fast`` to reach ``target`` (curves of ``(step, loss)``).

  ``bound``: ``"exact"`` if both reach it; ``"lower"``/``"upper"`` if only ``fast``/``base``
  does (its last step stands in for the other's); None, with value None, if neither does.
  A curve at the target at its first evaluation reached it there *or earlier*: the speed-up
  is then a bound too (``"upper"`` for ``base``'s, ``"lower"`` for ``fast``'s), and not
  measurable (None) where both are.
  """
  b, f = _reach(base, target), _reach(fast, target)
  b_first, f_first = (s is not None and s == int(c[0][0]) for s, c in ((b, base), (f, fast)))
  if (b is None and f is None) or (b_first and f_first):
    return dict(NO_SPEEDUP)
  value = (base[-1][0] if b is None else b) / (fast[-1][0] if f is None else f)
  bound = ("lower" if b is None or f_first else "upper" if f is None or b_first else "exact")
  return {"base_step": b, "fast_step": f, "value": value, "bound": bound}


def _reach(curve: Sequence[Sequence[float]], target: float) -> int | None:
  """The first step of ``curve`` at or below ``target`` (None if never)."""
  from examples.common.train import steps_to_reach

  return steps_to_reach([(int(s), float(v)) for s, v in curve], target)


def speedup_at_end(base: Sequence[Sequence[float]], fast: Sequence[Sequence[float]]
                   ) -> dict[str, Any]:
  """``base``'s last step over ``fast``'s first at ``base``'s last loss (else an upper bound;
  a lower bound where ``fast`` is there at its first evaluation)."""
  end, target = base[-1]
  f = _reach(fast, target)
  bound = "upper" if f is None else "lower" if f == int(fast[0][0]) else "exact"
  return {"base_step": end, "fast_step": f, "value": end / (fast[-1][0] if f is None else f),
          "bound": bound}


def speedup_text(s: Mapping[str, Any]) -> str:
  """``"1.67x"``, ``"> 3.00x"`` (lower bound), ``"< 1.67x"`` (upper bound) or ``"n/a"``."""
  if s["value"] is None:
    return "n/a"
  return {"exact": "", "lower": "> ", "upper": "< "}[s["bound"]] + f"{s['value']:.2f}x"


def speedups_text(entries: Sequence[Mapping[str, Any]]) -> str:
  """Mean ± std of speed-ups over seeds; all bounds of one kind: the loosest, some: counted."""
  vals = [e["value"] for e in entries if e["value"] is not None]
  if not vals:
    return "n/a"
  m, s = mean_std(vals)
  bounds = [e["bound"] for e in entries]
  if len(vals) == len(entries) and len(set(bounds)) == 1 and bounds[0] != "exact":
    if bounds[0] == "upper":
      return f"< {max(vals):.2f}x (IRE-T never reaches the target: {len(vals)}/{len(vals)})"
    return f"> {min(vals):.2f}x (AdamW never reaches the target: {len(vals)}/{len(vals)})"
  mark = (">= " if "lower" in bounds and "upper" not in bounds else
          "<= " if "upper" in bounds and "lower" not in bounds else "")
  text = f"{mark}{m:.2f} ± {s:.2f}x"
  n_bound = sum(b in ("lower", "upper") for b in bounds)
  if n_bound:
    text += f" ({n_bound}/{len(bounds)} bounds)"
  if len(vals) < len(entries):
    text += f" ({len(entries) - len(vals)} n/a)"
  return text


def speedup_verdict(entries: Sequence[Mapping[str, Any]], claim: float) -> str:
  """Words for speed-ups against a claim: a mean >= 0.8 x it reproduces, >= 1.1 is smaller."""
  vals = [e["value"] for e in entries if e["value"] is not None]
  if not vals:
    return "not measurable"
  m, text = statistics.fmean(vals), speedups_text(entries)
  if {e["bound"] for e in entries} == {"upper"} or m < 1.1:
    return f"not reproduced: no speed-up ({text})"
  if m >= 0.8 * claim:
    return f"reproduced ({text}, claim {claim:g}x)"
  return f"partly: a speed-up, smaller than the claim ({text}, claim {claim:g}x)"


def ratio_bounds(paired: Sequence[float]) -> dict[str, float]:
  """Median and range of ratios paired by repetition (``Timings.paired``)."""
  return {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}


def target_verdict(values: Iterable[Any], limit: float) -> str:
  """Words for measured values against an upper target: met by all, or how many miss it."""
  v = finite(values)
  if not v:
    return "not measured"
  over = [x for x in v if x > limit]
  if not over:
    return f"met ({len(v)} of {len(v)})"
  return f"missed in {len(over)} of {len(v)} (worst {max(over):.2f})"
def ratio(num: float | None, den: float | None) -> float | None:
  """``num / den``, or None where either is missing or ``den`` is 0 (not measured)."""
  return None if num is None or not den else float(num) / float(den)
