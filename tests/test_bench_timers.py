"""The timed micro-benchmarks run through ``timing.time_interleaved`` (smoke runs)."""


import numpy as np

from benchmarks.experiments import sam, sharpness


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
