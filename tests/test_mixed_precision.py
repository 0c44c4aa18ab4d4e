"""float16 compute with dynamic loss scaling (docs/mixed_precision.md) for SAM, GSAM and mSAM.

The two passes share one loss scale, and a non-finite perturbed gradient skips
the step (parameters and optimizer state unchanged, loss scale halved). The
float16 results are compared with the float64 NumPy references of
tests/np_sam_family.py.
"""

from __future__ import annotations

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ire_optax
from tests import np_sam_family as ref
from tests.test_gsam import jax_loss, problem, to_jax

jmp = pytest.importorskip("jmp")

POLICY = jmp.get_policy("params=float32,compute=float16,output=float32")
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def scaled_grad_fn(loss, loss_scale, *batch):
  """``params -> unscaled float32 gradient`` of ``loss`` computed in float16."""
  def grad_fn(p):
    def scaled_loss(q):
      q, b = POLICY.cast_to_compute((q, batch))
      return loss_scale.scale(POLICY.cast_to_output(loss(q, *b)))
    return loss_scale.unscale(jax.grad(scaled_loss)(p))
  return grad_fn


def make_step(tx, loss, *, msam=False):
  @jax.jit
  def step(params, opt_state, loss_scale, *batch):
    if msam:
      def mb_grad(p, mb):
        return scaled_grad_fn(loss, loss_scale, mb["x"], mb["y"])(p)
      updates, new_state = tx.update(None, opt_state, params, grad_fn=mb_grad,
                                     batch={"x": batch[0], "y": batch[1]})
      finite = optax.tree_utils.tree_get(new_state, "last_finite")
    else:
      grad_fn = scaled_grad_fn(loss, loss_scale, *batch)
      grads = grad_fn(params)
      updates, new_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
      finite = jmp.all_finite(grads) & optax.tree_utils.tree_get(new_state, "last_finite")
    loss_scale = loss_scale.adjust(finite)
    params, opt_state = jmp.select_tree(
        finite, (optax.apply_updates(params, updates), new_state), (params, opt_state))
    return params, opt_state, loss_scale, finite
  return step


def quadratic(p, x, y):
  del x, y
  return 0.5 * jnp.sum(p["w"] ** 2)


def test_perturbed_overflow_alone_skips_the_step_and_halves_the_scale():
  """Clean gradient S·w fits in float16 (S = 2**15, w = 1), the perturbed one S·(w + ρ) does not."""
  tx = ire_optax.sam(optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 10), rho=2.0)
  params = {"w": jnp.ones(1)}
  state = tx.init(params)
  scale = jmp.DynamicLossScale(jnp.float32(2**15), period=1000)
  step = make_step(tx, quadratic)
  dummy = (jnp.zeros(1), jnp.zeros(1, jnp.int32))
  p1, s1, scale1, finite = step(params, state, scale, *dummy)
  assert not bool(finite)
  chex.assert_trees_all_equal(p1, params)
  chex.assert_trees_all_equal(s1, state)          # SAM's count and the momentum untouched
  assert float(scale1.loss_scale) == 2**14
  # Clean-gradient check alone would have accepted this step:
  assert bool(jmp.all_finite(scaled_grad_fn(quadratic, scale, *dummy)(params)))
  # At 2**14 both passes fit: the step is SAM's, w - 0.1 (w + ρ) = 1 - 0.3.
  p2, s2, scale2, finite = step(p1, s1, scale1, *dummy)
  assert bool(finite)
  np.testing.assert_allclose(np.asarray(p2["w"]), [0.7], rtol=1e-3)
  assert int(s2.count) == 1


def test_clean_overflow_skips_the_step():
  params, batches = problem(0)
  tx = ire_optax.sam(optax.apply_if_finite(optax.sgd(0.1), 10), rho=0.1)
  p = to_jax(params)
  state = tx.init(p)
  scale = jmp.DynamicLossScale(jnp.float32(2**60))   # S itself is inf in float16
  x, y = jnp.asarray(batches[0][0], jnp.float32), jnp.asarray(batches[0][1])
  p1, s1, scale1, finite = make_step(tx, jax_loss)(p, state, scale, x, y)
  assert not bool(finite)
  chex.assert_trees_all_equal((p1, s1), (p, state))
  assert float(scale1.loss_scale) == 2.0**59


@pytest.mark.parametrize("variant", ["sam", "gsam"])
def test_float16_steps_match_the_float64_reference(variant):
  """With one shared scale both unscaled gradients are the float32 ones (to float16 accuracy)."""
  params, batches = problem(1)
  base = optax.apply_if_finite(optax.sgd(0.2, momentum=0.9), 10)
  alpha = 0.4 if variant == "gsam" else None
  tx = (ire_optax.gsam(base, rho=0.3, alpha=0.4) if variant == "gsam"
        else ire_optax.sam(base, rho=0.3))
  step = make_step(tx, jax_loss)
  p, state = to_jax(params), tx.init(to_jax(params))
  scale = jmp.DynamicLossScale(jnp.float32(2**10), period=2)
  scales = []
  for t in range(4):
    x, y = batches[t % len(batches)]
    p, state, scale, finite = step(p, state, scale, jnp.asarray(x, jnp.float32), jnp.asarray(y))
    assert bool(finite)
    scales.append(float(scale.loss_scale))
  assert scales == [2**10, 2**11, 2**11, 2**12]     # doubled after every 2 finite steps
  want = ref.np_run(params, batches, ref.NpSGDTree(0.2, momentum=0.9), 4, rho=0.3, alpha=alpha)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, p), want[-1], rtol=1e-2, atol=3e-3)


def test_msam_float16_recipe():
  params, batches = problem(2)
  x, y = batches[0]
  tx = ire_optax.msam(optax.apply_if_finite(optax.sgd(0.2), 10), rho=0.3, num_microbatches=4)
  step = make_step(tx, jax_loss, msam=True)
  p, state = to_jax(params), tx.init(to_jax(params))
  p1, _, _, finite = step(p, state, jmp.DynamicLossScale(jnp.float32(2**10)),
                          jnp.asarray(x, jnp.float32), jnp.asarray(y))
  assert bool(finite)
  gs = [ref.np_grad(ref.np_perturbed(params, ref.np_grad(params, a, b), 0.3), a, b)
        for a, b in zip(np.split(x, 4), np.split(y, 4), strict=True)]
  want = {k: params[k] - 0.2 * np.mean([g[k] for g in gs], axis=0) for k in params}
  chex.assert_trees_all_close(jax.tree.map(np.asarray, p1), want, rtol=1e-2, atol=3e-3)
  # Overflow: the step is skipped.
  p2, s2, _, finite = step(p, state, jmp.DynamicLossScale(jnp.float32(2**60)),
                           jnp.asarray(x, jnp.float32), jnp.asarray(y))
  assert not bool(finite)
  chex.assert_trees_all_equal((p2, s2), (p, state))


def test_docs_recipe_runs():
  blocks = re.findall(r"```python\n(.*?)```", (DOCS / "mixed_precision.md").read_text(), re.S)
  assert blocks
  namespace: dict = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/mixed_precision.md[block {i}]", "exec"), namespace)
  assert bool(namespace["finite"])
