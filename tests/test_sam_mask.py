"""``perturb_mask`` of sam / msam / gsam / sala (one global norm over the perturbed leaves)
against plain NumPy, and the clear error inside optax.masked / optax.partition."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ire_optax
from tests import np_sam_family as ref
from tests.test_gsam import assert_close_to_np, jax_grad, jax_loss, problem, run, to_jax

STEPS = 4
WEIGHTS_ONLY = {"w": True, "b": False, "s": False}


def weights_only(params):
  """A callable mask: the matrices (ndim > 1), not the biases and scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("mask", [WEIGHTS_ONLY, weights_only, {"w": False, "b": True, "s": True}],
                         ids=["dict", "callable", "norm_layers_only"])
def test_sam_mask_matches_numpy(mask, jit):
  params, batches = problem(0)
  tx = ire_optax.sam(optax.sgd(0.3, momentum=0.9), rho=0.5, perturb_mask=mask)
  got, _ = run(tx, params, batches, steps=STEPS, jit=jit)
  np_mask = mask if isinstance(mask, dict) else {k: v.ndim > 1 for k, v in params.items()}
  want = ref.np_run(params, batches, ref.NpSGDTree(0.3, momentum=0.9), STEPS, rho=0.5,
                    mask=np_mask)
  assert_close_to_np(got, want)
  # One global norm over the perturbed leaves differs from a norm per part and from no mask.
  unmasked = ref.np_run(params, batches, ref.NpSGDTree(0.3, momentum=0.9), STEPS, rho=0.5)
  assert np.abs(unmasked[-1]["w"] - want[-1]["w"]).max() > 1e-5


def test_adaptive_sam_with_mask_matches_numpy():
  """Kwon et al.'s setting: ASAM's scaling on the weights only (here: perturb only them)."""
  params, batches = problem(1)
  tx = ire_optax.sam(optax.sgd(0.2), rho=1.0, adaptive=True, adaptive_eta=0.01,
                     perturb_mask=WEIGHTS_ONLY)
  got, _ = run(tx, params, batches, steps=STEPS)
  want = ref.np_run(params, batches, ref.NpSGDTree(0.2), STEPS, rho=1.0, mask=WEIGHTS_ONLY,
                    adaptive=True, eta=0.01)
  assert_close_to_np(got, want)


def test_prefix_mask_and_nested_params():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "norm": {"scale": jnp.ones(2)}}
  g = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  mask_fn = ire_optax._src.sam.resolve_perturb_mask({"dense": True, "norm": False})
  out = ire_optax._src.sam.perturbed_params(params, g, 0.1, mask=mask_fn(params))
  # ‖g‖ over the 6 perturbed entries only: 0.5·√6.
  np.testing.assert_allclose(out["dense"]["kernel"], 1 + 0.1 * 0.5 / (0.5 * np.sqrt(6)), rtol=1e-6)
  np.testing.assert_allclose(out["dense"]["bias"], 1 + 0.1 / np.sqrt(6), rtol=1e-6)
  chex.assert_trees_all_equal(out["norm"], params["norm"])


def test_all_true_is_no_mask_and_all_false_is_the_base_bit_for_bit():
  params, batches = problem(2)
  base = optax.adamw(0.01)
  everything, _ = run(ire_optax.sam(base, rho=0.3, perturb_mask=lambda p: True), params, batches)
  plain, _ = run(ire_optax.sam(base, rho=0.3), params, batches)
  chex.assert_trees_all_equal(everything, plain)
  with pytest.warns(UserWarning, match="selects no parameter"):
    nothing, _ = run(ire_optax.sam(base, rho=0.3, perturb_mask=jax.tree.map(lambda _: False,
                                                                           params)),
                     params, batches)
  base_run, _ = run(ire_optax.sam(base, rho=0.0), params, batches)
  chex.assert_trees_all_equal(nothing, base_run)


@pytest.mark.parametrize("make", [ire_optax.sam, ire_optax.gsam, ire_optax.sala])
def test_inject_hyperparams_mask_function_warns_unless_static(make):
  """inject_hyperparams takes a mask function for a schedule and calls it with the step
  count, which silently gave the base optimizer; it warns, and static_args fixes it."""
  params, batches = problem(2)
  injected = optax.inject_hyperparams(make)(optax.sgd(0.1), rho=0.3, perturb_mask=weights_only)
  with pytest.warns(UserWarning, match="static_args"):
    run(injected, params, batches)
  fixed = optax.inject_hyperparams(make, static_args=("perturb_mask",))(
      optax.sgd(0.1), rho=0.3, perturb_mask=weights_only)
  got, _ = run(fixed, params, batches)
  want, _ = run(make(optax.sgd(0.1), rho=0.3, perturb_mask=weights_only), params, batches)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_msam_mask_matches_numpy():
  params, batches = problem(3)
  x, y = batches[0]
  tx = ire_optax.msam(optax.sgd(0.2), rho=0.4, num_microbatches=4, perturb_mask=WEIGHTS_ONLY)
  p = to_jax(params)
  u, _ = jax.jit(lambda p, s, b: tx.update(None, s, p, grad_fn=lambda q, mb: jax_grad(
      q, mb["x"], mb["y"]), batch=b))(p, tx.init(p), {"x": jnp.asarray(x, jnp.float32),
                                                      "y": jnp.asarray(y)})
  gs = []
  for xb, yb in zip(np.split(x, 4), np.split(y, 4), strict=True):
    g = ref.np_grad(params, xb, yb)
    gs.append(ref.np_grad(ref.np_perturbed(params, g, 0.4, mask=WEIGHTS_ONLY), xb, yb))
  want = {k: -0.2 * np.mean([g[k] for g in gs], axis=0) for k in params}
  chex.assert_trees_all_close(jax.tree.map(np.asarray, u), want, rtol=2e-5, atol=2e-6)


def test_sala_sam_step_with_mask_matches_numpy():
  """SALA's first step is a SAM step from φ = θ₀ (stage 2): masked like sam's."""
  params, batches = problem(4)
  tx = ire_optax.sala(optax.sgd(0.2), sync_period=2, rho=0.3, perturb_mask=WEIGHTS_ONLY)
  got, _ = run(tx, params, batches, steps=1)
  want = ref.np_run(params, batches, ref.NpSGDTree(0.2), 1, rho=0.3, mask=WEIGHTS_ONLY)
  assert_close_to_np(got, want)
  everything, _ = run(ire_optax.sala(optax.sgd(0.2), rho=0.3, perturb_mask=lambda p: True),
                      params, batches, steps=6)
  plain, _ = run(ire_optax.sala(optax.sgd(0.2), rho=0.3), params, batches, steps=6)
  chex.assert_trees_all_equal(everything, plain)


def test_mask_keeps_low_precision_dtypes():
  params, batches = problem(5)
  p = to_jax(params, jnp.bfloat16)
  tx = ire_optax.sam(optax.sgd(0.1), rho=0.2, perturb_mask=WEIGHTS_ONLY)
  x, y = jnp.asarray(batches[0][0], jnp.float32), jnp.asarray(batches[0][1])
  gf = lambda q: jax.tree.map(lambda a: a.astype(jnp.bfloat16), jax_grad(to_jax(q), x, y))
  u, _ = tx.update(gf(p), tx.init(p), p, grad_fn=gf)
  chex.assert_trees_all_equal_dtypes(u, p)


def test_sam_with_partition_inside_and_mask_outside():
  """The recipe of docs/sam.md: one SAM norm, two base optimizers."""
  params, batches = problem(6)
  labels = {"w": "decay", "b": "plain", "s": "plain"}
  base = optax.partition({"decay": optax.adamw(0.01, weight_decay=0.1), "plain": optax.adam(0.01)},
                         labels)
  got, _ = run(ire_optax.sam(base, rho=0.2, perturb_mask=WEIGHTS_ONLY), params, batches,
               steps=STEPS)
  want = ref.np_run(params, batches, _NpPartition(), STEPS, rho=0.2, mask=WEIGHTS_ONLY)
  assert_close_to_np(got, want, rtol=1e-4, atol=1e-6)


class _NpPartition:
  def __init__(self):
    self.decay = ref.NpAdamWTree(0.01, wd=0.1)
    self.plain = ref.NpAdamWTree(0.01, wd=0.0)

  def step(self, g, p):
    out = self.decay.step({"w": g["w"]}, {"w": p["w"]})
    out.update(self.plain.step({k: g[k] for k in ("b", "s")}, {k: p[k] for k in ("b", "s")}))
    return out


# -----------------------------------------------------------------------------
# Inside optax.masked / optax.partition: a clear error that points to perturb_mask
# -----------------------------------------------------------------------------

MAKERS = {
    "sam": lambda: ire_optax.sam(optax.sgd(0.1)),
    "msam": lambda: ire_optax.msam(optax.sgd(0.1), num_microbatches=2),
    "gsam": lambda: ire_optax.gsam(optax.sgd(0.1)),
    "sala": lambda: ire_optax.sala(optax.sgd(0.1)),
}


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("wrap", ["masked", "partition"])
def test_inside_masked_raises_and_points_to_perturb_mask(name, wrap):
  params = to_jax(problem(7)[0])
  inner = MAKERS[name]()
  if wrap == "masked":
    tx = optax.masked(inner, WEIGHTS_ONLY)
  else:
    tx = optax.partition({"sam": inner, "plain": optax.sgd(0.1)},
                         {"w": "sam", "b": "plain", "s": "plain"})
  with pytest.raises(TypeError, match="perturb_mask"):
    tx.init(params)


def test_update_with_masked_params_raises():
  params = to_jax(problem(7)[0])
  tx = ire_optax.sam(optax.sgd(0.1))
  state = tx.init(params)
  masked = dict(params, b=optax.MaskedNode())
  with pytest.raises(TypeError, match="optax.masked"):
    tx.update(masked, state, masked, grad_fn=lambda q: q)


@pytest.mark.parametrize("mask, err", [
    ({"w": 1, "b": 0, "s": 0}, TypeError),
    ({"w": jnp.array(True), "b": False, "s": False}, TypeError),
    ({"w": True, "b": False}, ValueError),
    (lambda p: {"w": "yes", "b": False, "s": False}, TypeError),
])
def test_bad_masks_raise(mask, err):
  params = to_jax(problem(8)[0])
  with pytest.raises(err, match="perturb_mask"):
    tx = ire_optax.sam(optax.sgd(0.1), perturb_mask=mask)
    tx.update(params, tx.init(params), params, grad_fn=lambda q: jax_grad(q, *_batch()))


def _batch():
  _, batches = problem(8)
  return jnp.asarray(batches[0][0], jnp.float32), jnp.asarray(batches[0][1])


def test_loss_is_finite_after_masked_steps():
  params, batches = problem(9)
  got, _ = run(ire_optax.sam(optax.sgd(0.1), rho=0.1, perturb_mask=WEIGHTS_ONLY), params, batches)
  x, y = batches[0]
  assert np.isfinite(float(jax_loss(got[-1], jnp.asarray(x, jnp.float32), jnp.asarray(y))))
