"""Curves of example runs as PNG figures (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_runs(runs: dict[str, list[dict]], out: str | Path, *, title: str = "") -> Path:
  """Training loss, held-out loss and held-out accuracy against the step, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")  # files only; imported on first use (runs with --no-plot never load it)
  import matplotlib.pyplot as plt

  panels = [("loss", "training loss"), ("eval_loss", "held-out loss"),
            ("eval_acc", "held-out accuracy")]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for (key, label), ax in zip(panels, axes, strict=True):
    for name, recs in runs.items():
      pts = [(r["step"], r[key]) for r in recs if key in r and r[key] is not None]
      if pts:
        s, v = zip(*pts, strict=True)
        if key == "loss" and len(v) > 20:  # light smoothing of the noisy training loss
          k = max(1, len(v) // 50)
          v = np.convolve(v, np.ones(k) / k, mode="valid")
          s = s[k - 1:]
        ax.plot(s, v, label=name)
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
