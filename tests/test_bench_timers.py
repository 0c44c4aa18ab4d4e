"""The timed micro-benchmarks run through ``timing.time_interleaved`` (smoke runs)."""

import json
import math
from pathlib import Path

import numpy as np

from benchmarks.__main__ import main
from benchmarks.experiments import ire, sam, sharpness
from benchmarks.schema import RESULTS


def test_ire_smoke_has_every_ratio_on_both_clocks_and_spares_the_committed_results(capsys):
  committed = RESULTS / "ire.json"
  before = committed.read_text()
  assert main(["ire", "--smoke"]) == 0
  out = Path(capsys.readouterr().out.split("results in ")[1].split()[0])
  (row,) = json.loads((out / "ire.json").read_text())["details"]["rows"]
  assert committed.read_text() == before and row["n"] == 4000
  for clock in ("wall", "cpu"):
    c = row[clock]
    for key in ("ire_plain_ratio", "ire_refresh_ratio", "amortized_ratio_K10",
                "radix_select_adamw_updates", "sort_select_adamw_updates",
                "radix_select_xla_scatter_adamw_updates"):
      assert math.isfinite(c[key]) and c[key] > 0, (clock, key, c[key])
  # the uint8 mask (plus a few scalars over 4000 params)
  assert 1.0 <= row["extra_state_bytes_per_param"] < 1.05
  md = ire.render({"ire": {"meta": {"machine": {"summary": "M"}}, "details": {
      "meta": {"reps": 2, "selection": "auto"}, "rows": [row]}}})["benchmarks/results/ire.md"]
  assert "| 4,000 | cpu |" in md


def test_sam_and_optax_opaque_sam_take_the_same_step():
  import jax

  _, loss, params, batches = sam.task(("cnn", 2, 8), None)
  out = {}
  for name in ("sam", "optax_sam"):
    kind, kw = sam.ARMS[name]
    tx = sam.optimizer(kind, kw)
    out[name] = jax.jit(sam.train_step(kind, tx, loss))(params, tx.init(params), batches[0])[0]
  for a, b in zip(jax.tree.leaves(out["sam"]), jax.tree.leaves(out["optax_sam"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sharpness_estimators_run_on_the_models():
  import jax

  params, loss = sharpness.model("mlp", 8)
  batch = {"x": np.ones((4, 28, 28), np.float32), "y": np.arange(4) % 10}
  hvp = jax.jit(sharpness.estimator("hvp", loss))(params, batch, jax.random.key(0))
  assert jax.tree.structure(hvp) == jax.tree.structure(params)
  assert set(sharpness.SPEC.blocks) == set(sharpness.MEASURES)
