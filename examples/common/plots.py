"""Curves of example runs as PNG figures (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_runs(runs: dict[str, list[dict]], out: str | Path, *, title: str = "") -> Path:
  """Training loss, held-out loss and held-out accuracy against the step, as a PNG.

  A fourth panel shows the SAM runs' per-step sharpness ``L(θ+ε) − L(θ)``
  (logged for free as ``"sharpness"``) when a run has it. Non-finite values (the NaN
  sharpness of a skipped float16 step) are left out.
  """
  import matplotlib

  matplotlib.use("Agg")  # files only; imported on first use (runs with --no-plot never load it)
  import matplotlib.pyplot as plt

  panels = [("loss", "training loss"), ("eval_loss", "held-out loss"),
            ("eval_acc", "held-out accuracy")]
  if any("sharpness" in r for recs in runs.values() for r in recs):
    panels.append(("sharpness", "SAM sharpness L(θ+ε) − L(θ)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
  for (key, label), ax in zip(panels, axes, strict=True):
    for name, recs in runs.items():
      # Finite values only: a skipped float16 step logs its sharpness as NaN, which would
      # spread over the smoothing window (and break the line).
      pts = [(r["step"], r[key]) for r in recs
             if r.get(key) is not None and np.isfinite(r[key])]
      if pts:
        s, v = (np.asarray(c) for c in zip(*pts, strict=True))
        if key in ("loss", "sharpness") and len(v) > 20:  # light smoothing of noisy curves
          k = max(1, len(v) // 50)
          v = np.convolve(v, np.ones(k) / k, mode="valid")
          s = s[k - 1:]
        # Markers on sparse curves (held-out evaluations): a single point has no line.
        ax.plot(s, v, label=name, marker="o" if len(v) <= 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_title(label)
    ax.grid(alpha=0.3)
  axes[0].legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
