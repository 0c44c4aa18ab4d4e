"""bench_ire's timings run through ``_common.time_interleaved`` (a smoke run)."""

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_ire  # noqa: E402


def test_bench_ire_row_has_every_ratio_on_both_clocks():
  row = bench_ire.bench(4000, reps=2, with_sort=True)
  for clock in ("wall", "cpu"):
    c = row[clock]
    for key in ("ire_plain_ratio", "ire_refresh_ratio", "amortized_ratio_K10",
                "radix_select_adamw_updates", "sort_select_adamw_updates",
                "radix_select_xla_scatter_adamw_updates"):
      assert math.isfinite(c[key]) and c[key] > 0, (clock, key, c[key])
  # the uint8 mask (plus a few scalars over 4000 params)
  assert 1.0 <= row["extra_state_bytes_per_param"] < 1.05
