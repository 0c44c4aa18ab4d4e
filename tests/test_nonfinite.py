"""Non-finite values and degenerate inputs: each statement of docs/nonfinite.md, tested.

Covers NaN/Inf in the gradient, in the perturbed (SAM) gradient and in the
curvature estimates; ``optax.apply_if_finite`` around (and inside) every
optimizer; zero gradients, zero parameters (ASAM), all-equal curvature (ties
everywhere), a single scalar parameter and empty leaves.
"""

from __future__ import annotations

import chex
import hypothesis as hyp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import ire_optax
from tests import cases

NAN, INF = np.nan, np.inf


def _params():
  return {"w": jnp.array([1.0, -2.0, 3.0, 0.5]), "b": jnp.array([0.1, 0.2])}


def _tree(w, b):
  return {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}


def _const_curvature(h):
  """A user curvature estimator returning the fixed tree ``h``."""
  return lambda grads, params, key, **_: h


def _nonfinite(tree):
  return {k: ~np.isfinite(np.asarray(v)) for k, v in tree.items()}


# -----------------------------------------------------------------------------
# IRE
# -----------------------------------------------------------------------------


def test_ire_nan_and_inf_gradients_stay_where_the_base_puts_them():
  """g² = NaN is ranked sharpest, +inf after every finite value; IRE adds no NaN."""
  params = _params()
  tx = ire_optax.ire(optax.sgd(0.1), kappa=2.0, gamma=0.5, refresh_every=1)
  g = _tree([NAN, INF, 0.3, -0.2], [0.05, 1.0])
  updates, state = tx.update(g, tx.init(params), params)
  mask = ire_optax.ire_flat_mask(state)
  # h = g² = [nan, inf, .09, .04 | .0025, 1]; k = ⌊0.5·6⌋ = 3: the three smallest numbers.
  np.testing.assert_array_equal(mask["w"], [0, 0, 1, 1])
  np.testing.assert_array_equal(mask["b"], [1, 0])
  assert np.isnan(updates["w"][0]) and updates["w"][1] == -INF
  np.testing.assert_allclose(updates["w"][2:], -0.1 * 3.0 * np.array([0.3, -0.2]), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -0.1 * np.array([3.0 * 0.05, 1.0]), rtol=1e-6)
  # Non-finite exactly where the base update is.
  base_updates, _ = optax.sgd(0.1).update(g, optax.sgd(0.1).init(params), params)
  chex.assert_trees_all_equal(_nonfinite(updates), _nonfinite(base_updates))


@pytest.mark.parametrize("kappa", [0.0, 2.0])
def test_ire_infinite_update_on_a_flat_coordinate_stays_infinite(kappa):
  """(1 + κ)·inf = inf: no inf - inf or 0·inf NaN, also at κ = 0 (= the base exactly)."""
  params = _params()
  h = _tree([0.0, 0.0, 5.0, 5.0], [5.0, 5.0])  # w[0], w[1] are the flat pair
  tx = ire_optax.ire(optax.sgd(0.1), kappa=kappa, gamma=1 / 3, refresh_every=1,
                     curvature=_const_curvature(h))
  g = _tree([INF, -INF, 0.3, -0.2], [0.05, 1.0])
  updates, state = tx.update(g, tx.init(params), params)
  np.testing.assert_array_equal(ire_optax.ire_flat_mask(state)["w"], [1, 1, 0, 0])
  assert updates["w"][0] == -INF and updates["w"][1] == INF
  if kappa == 0.0:
    base_updates, _ = optax.sgd(0.1).update(g, optax.sgd(0.1).init(params), params)
    chex.assert_trees_all_equal(updates, base_updates)


def test_ire_nan_in_adam_moments_persists_without_apply_if_finite():
  params = _params()
  tx = ire_optax.ire(optax.adam(1e-2), kappa=2.0, gamma=0.5, refresh_every=1)
  state = tx.init(params)
  _, state = tx.update(_tree([NAN, 1, 1, 1], [1, 1]), state, params)
  updates, _ = tx.update(_tree([1, 1, 1, 1], [1, 1]), state, params)
  assert np.isnan(updates["w"][0])  # Adam's moments of that coordinate stay NaN
  chex.assert_tree_all_finite({"w": updates["w"][1:], "b": updates["b"]})


def test_ire_after_global_norm_clipping_one_nan_reaches_every_coordinate():
  params = _params()
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   ire_optax.ire(optax.sgd(0.1), kappa=2.0, gamma=0.5, refresh_every=1))
  updates, _ = tx.update(_tree([NAN, 1, 1, 1], [1, 1]), tx.init(params), params)
  assert all(bool(np.isnan(u).all()) for u in jax.tree.leaves(updates))


def test_ire_nan_curvature_is_never_flat_and_the_update_stays_finite():
  params, g = _params(), _tree([1, 1, 1, 1], [1, 1])
  h = _tree([NAN, 1.0, 2.0, 3.0], [NAN, 0.5])
  tx = ire_optax.ire(optax.sgd(0.1), kappa=2.0, gamma=0.5, refresh_every=1,
                     curvature=_const_curvature(h))
  updates, state = tx.update(g, tx.init(params), params)
  mask = ire_optax.ire_flat_mask(state)
  np.testing.assert_array_equal(mask["w"], [0, 1, 1, 0])  # k = 3: 0.5, 1, 2
  np.testing.assert_array_equal(mask["b"], [0, 1])
  chex.assert_tree_all_finite(updates)
  # γ = 0.99 asks for k = 5 > 4 numbers: all numbers are flat, NaN still is not.
  tx = ire_optax.ire(optax.sgd(0.1), kappa=2.0, gamma=0.99, refresh_every=1,
                     curvature=_const_curvature(h))
  _, state = tx.update(g, tx.init(params), params)
  np.testing.assert_array_equal(ire_optax.ire_flat_mask(state)["w"], [0, 1, 1, 1])
  np.testing.assert_array_equal(ire_optax.ire_flat_mask(state)["b"], [0, 1])


def test_ire_infinite_curvature_ranks_as_a_number():
  params, g = _params(), _tree([1, 1, 1, 1], [1, 1])
  h = _tree([INF, -INF, 1.0, 2.0], [NAN, 3.0])
  for gamma, w, b in [(0.5, [0, 1, 1, 1], [0, 0]), (0.99, [1, 1, 1, 1], [0, 1])]:
    tx = ire_optax.ire(optax.sgd(0.1), kappa=2.0, gamma=gamma, refresh_every=1,
                       curvature=_const_curvature(h))
    updates, state = tx.update(g, tx.init(params), params)
    np.testing.assert_array_equal(ire_optax.ire_flat_mask(state)["w"], w)  # -inf is flattest
    np.testing.assert_array_equal(ire_optax.ire_flat_mask(state)["b"], b)
    chex.assert_tree_all_finite(updates)


def test_ire_all_nan_fisher_estimate_switches_ire_off_until_the_next_refresh():
  """NaN logits (e.g. an overflow) make every h NaN: no coordinate is flat, update = base."""
  params = _params()
  g = _tree([0.5, -1.0, 2.0, 0.1], [0.3, -0.3])
  tx = ire_optax.ire(optax.sgd(0.1), kappa=3.0, gamma=0.6, refresh_every=2, curvature="fisher")
  nan_logits = lambda p: jnp.full((4, 3), NAN) * (p["w"].sum() + p["b"].sum())
  updates, state = tx.update(g, tx.init(params), params, logits_fn=nan_logits)
  assert all(int(m.sum()) == 0 for m in jax.tree.leaves(ire_optax.ire_flat_mask(state)))
  chex.assert_trees_all_close(updates, jax.tree.map(lambda x: -0.1 * x, g))
  # The next step is not a refresh: the (empty) mask is kept.
  updates, state = tx.update(g, state, params, logits_fn=nan_logits)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda x: -0.1 * x, g))
  # A finite estimate at the next refresh switches IRE back on.
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)), jnp.float32)
  good_logits = lambda p: (x @ p["w"])[:, None] * jnp.arange(3.0) + p["b"].sum()
  _, state = tx.update(g, state, params, logits_fn=good_logits)
  assert sum(int(m.sum()) for m in jax.tree.leaves(ire_optax.ire_flat_mask(state))) >= 3


def test_ire_all_equal_curvature_makes_every_coordinate_flat():
  """Ties at τ are all flat (authors' code): equal curvature everywhere → (1 + κ)·base."""
  params, g = _params(), _tree([0.5, -1.0, 2.0, 0.1], [0.3, -0.3])
  tx = ire_optax.ire(optax.sgd(0.1), kappa=2.0, gamma=0.6, refresh_every=1,
                     curvature=_const_curvature(jax.tree.map(jnp.ones_like, params)))
  updates, state = tx.update(g, tx.init(params), params)
  assert all(bool(m.all()) for m in jax.tree.leaves(ire_optax.ire_flat_mask(state)))
  chex.assert_trees_all_close(updates, jax.tree.map(lambda x: -0.1 * 3.0 * x, g))


def test_ire_zero_gradients_are_all_ties_and_give_a_zero_finite_update():
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  for base in (optax.sgd(0.1, momentum=0.9), optax.adamw(1e-2, weight_decay=0.0)):
    tx = ire_optax.ire(base, kappa=3.0, gamma=0.6, refresh_every=1)
    updates, state = tx.update(zeros, tx.init(params), params)
    assert all(bool(m.all()) for m in jax.tree.leaves(ire_optax.ire_flat_mask(state)))
    chex.assert_trees_all_equal(updates, zeros)


# -----------------------------------------------------------------------------
# SAM / ASAM / mSAM
# -----------------------------------------------------------------------------


def _returns_argument(p):
  """A "gradient" equal to the point it is taken at: exposes θ + ε exactly."""
  return p


def test_sam_inf_in_the_clean_gradient_is_nan_there_and_zero_perturbation_elsewhere():
  params = _params()
  tx = ire_optax.sam(optax.sgd(1.0), rho=0.1)
  g = _tree([INF, 1, 1, 1], [1, 1])
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=_returns_argument)
  # ε = ρ g / ‖g‖ = ρ g / inf: inf/inf = NaN at that coordinate, 0 elsewhere.
  assert np.isnan(updates["w"][0])
  np.testing.assert_array_equal(updates["w"][1:], -params["w"][1:])
  np.testing.assert_array_equal(updates["b"], -params["b"])


def test_sam_nan_in_the_perturbed_gradient_reaches_only_those_coordinates():
  params = _params()
  tx = ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.1)
  bad = lambda p: {"w": p["w"].at[1].set(NAN), "b": p["b"]}
  updates, state = tx.update(_tree([1, 1, 1, 1], [1, 1]), tx.init(params), params, grad_fn=bad)
  assert _nonfinite(updates)["w"].tolist() == [False, True, False, False]
  assert not _nonfinite(updates)["b"].any()
  assert np.isnan(state.base_state[0].trace["w"][1])  # the momentum keeps it


def test_asam_inf_at_a_zero_parameter_is_nan_everywhere():
  """With η = 0, T = |θ| = 0 at the infinite coordinate: 0·inf in ‖Tg‖ makes ε NaN in every
  coordinate (with η > 0, only there)."""
  params = {"w": jnp.array([0.0, 1.0, 1.0, 1.0]), "b": jnp.array([0.1, 0.2])}
  g = _tree([INF, 1, 1, 1], [1, 1])
  for eta, everywhere in ((0.0, True), (0.01, False)):
    tx = ire_optax.sam(optax.sgd(1.0), rho=0.1, adaptive=True, adaptive_eta=eta)
    updates, _ = tx.update(g, tx.init(params), params, grad_fn=_returns_argument)
    assert np.isnan(updates["w"][0])
    assert bool(np.isnan(updates["w"][1:]).all()) == everywhere
    assert bool(np.isnan(updates["b"]).all()) == everywhere


@pytest.mark.parametrize("adaptive_eta", [0.0, 0.01])
def test_asam_zero_parameters(adaptive_eta):
  """T = |θ| + η: at θ = 0 (η = 0) the perturbation is exactly zero, not NaN."""
  params = jax.tree.map(jnp.zeros_like, _params())
  g = _tree([0.5, -1.0, 2.0, 0.1], [0.3, -0.3])
  tx = ire_optax.sam(optax.sgd(1.0), rho=1.0, adaptive=True, adaptive_eta=adaptive_eta)
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=_returns_argument)
  chex.assert_tree_all_finite(updates)
  if adaptive_eta == 0.0:
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))  # θ + 0
  else:  # ε = ρ η² g / ‖η g‖ = ρ η g / ‖g‖
    norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(g)))
    chex.assert_trees_all_close(updates, jax.tree.map(lambda x: -0.01 * x / norm, g),
                                rtol=1e-5)


def test_asam_all_zero_leaf_is_not_perturbed_while_the_others_are():
  params = {"w": jnp.zeros(4), "b": jnp.array([0.1, 0.2])}
  g = _tree([0.5, -1.0, 2.0, 0.1], [0.3, -0.3])
  tx = ire_optax.sam(optax.sgd(1.0), rho=1.0, adaptive=True)
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=_returns_argument)
  chex.assert_trees_all_equal(updates["w"], jnp.zeros(4))  # -(θ + ε) with ε = 0
  assert not np.allclose(updates["b"], -params["b"])  # ε ≠ 0 on b


def test_asam_scale_beyond_float32_max_gives_the_float64_point():
  # T = |θ| + η passes float32's max for |θ| = 8.5e34 and η = 3.4e38 (it was inf, and
  # T g / ‖T g‖ = inf / inf = NaN); ε = ρ T² g / ‖T g‖ itself is a float32 number here.
  params = {"w": jnp.array([-8.5e34, 1.0, 3.0]), "b": jnp.array(-8.5e34)}
  g = _tree([1e20, 0.0, -1e30], -F32_MAX)  # every u_i = T_i g_i / ‖T g‖ a normal float32
  tx = ire_optax.sam(optax.sgd(1.0), rho=0.5, adaptive=True, adaptive_eta=F32_MAX)
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=_returns_argument)
  theta = np.array([-8.5e34, 1.0, 3.0, -8.5e34], np.float64)
  g64 = np.array([1e20, 0.0, np.float32(-1e30), -F32_MAX], np.float64)
  t = np.abs(np.float32(theta).astype(np.float64)) + F32_MAX
  want = theta + 0.5 * t * t * g64 / np.linalg.norm(t * g64)
  got = np.concatenate([-np.asarray(updates["w"]), [-float(updates["b"])]])
  np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)


def test_sam_asam_msam_zero_gradients_give_zero_perturbation():
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  for adaptive in (False, True):
    tx = ire_optax.sam(optax.sgd(1.0), rho=0.5, adaptive=adaptive)
    updates, _ = tx.update(zeros, tx.init(params), params, grad_fn=_returns_argument)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.negative, params))  # ε = 0
  mtx = ire_optax.msam(optax.sgd(1.0), rho=0.5, num_microbatches=2)
  # Zero gradients that depend on the parameters (the gradient of a loss linear in them is
  # a constant, which the callback check refuses).
  flat_loss = lambda p, mb: 0.0 * jnp.sum(mb) * jnp.sum(p["w"] ** 2)
  updates, _ = mtx.update(None, mtx.init(params), params, grad_fn=jax.grad(flat_loss),
                          batch=jnp.ones((4, 2)))
  chex.assert_trees_all_equal(updates, zeros)


def _mse(p, mb):
  return jnp.mean((mb["x"] @ p["w"] + jnp.sum(p["b"]) - mb["y"]) ** 2)


def test_gsam_nan_in_the_perturbed_gradient_is_nan_everywhere_inf_only_there():
  """A NaN in g_p makes ‖g_p‖, ĝ_p and g_⊥ NaN (SAM: only that coordinate); an Inf stays in its
  coordinate (the decomposition guards 0·inf)."""
  params = _params()
  tx = ire_optax.gsam(optax.sgd(0.1), rho=0.1, alpha=0.5)
  g = _tree([1, 1, 1, 1], [1, 1])
  for bad, only_there in ((NAN, False), (INF, True)):
    grad_fn = lambda p, bad=bad: {"w": p["w"].at[1].set(bad), "b": p["b"]}
    updates, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
    expected = {"w": [False, True, False, False], "b": [False, False]} if only_there else {
        "w": [True] * 4, "b": [True] * 2}
    assert {k: v.tolist() for k, v in _nonfinite(updates).items()} == expected, bad


def test_msam_nan_in_one_microbatch_makes_the_update_nan():
  params = _params()
  batch = {"x": jnp.ones((4, 4)).at[0, 0].set(NAN), "y": jnp.zeros(4)}
  tx = ire_optax.msam(optax.sgd(0.1), rho=0.05, num_microbatches=2)
  updates, _ = tx.update(None, tx.init(params), params, grad_fn=jax.grad(_mse), batch=batch)
  assert all(bool(np.isnan(u).all()) for u in jax.tree.leaves(updates))


def test_apply_if_finite_goes_inside_msam():
  params = _params()
  batch = {"x": jnp.ones((4, 4)).at[0, 0].set(NAN), "y": jnp.zeros(4)}
  kw = {"grad_fn": jax.grad(_mse), "batch": batch}
  # Outside, apply_if_finite has nothing to check (mSAM's `updates` is None) and
  # its skip branch (zeros like None) does not match the update: it cannot be used.
  outer = optax.apply_if_finite(ire_optax.msam(optax.sgd(0.1), num_microbatches=2), 3)
  with pytest.raises(TypeError, match="same pytree structure"):
    outer.update(None, outer.init(params), params, **kw)
  inner = ire_optax.msam(optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 3),
                         num_microbatches=2)
  state0 = inner.init(params)
  updates, state = inner.update(None, state0, params, **kw)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(state.base_state.total_notfinite) == 1
  chex.assert_trees_all_equal(state.base_state.inner_state, state0.base_state.inner_state)


def test_apply_if_finite_inside_sam_skips_a_nan_perturbed_gradient():
  params = _params()
  bad = lambda p: jax.tree.map(lambda x: x * NAN, p)
  g = _tree([1, 1, 1, 1], [1, 1])
  outer = optax.apply_if_finite(ire_optax.sam(optax.sgd(0.1), rho=0.1), 3)
  updates, state = outer.update(g, outer.init(params), params, grad_fn=bad)
  assert int(state.total_notfinite) == 0 and np.isnan(updates["w"]).all()  # not seen
  inner = ire_optax.sam(optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 3), rho=0.1)
  state0 = inner.init(params)
  updates, state = inner.update(g, state0, params, grad_fn=bad)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(state.base_state.inner_state, state0.base_state.inner_state)
  assert int(state.count) == 1  # SAM's own step counter (its ρ schedule) still advances


# -----------------------------------------------------------------------------
# SALA
# -----------------------------------------------------------------------------


def _sala_grad_fn(p):
  return jax.tree.map(lambda x: 2.0 * x, p)


def test_sala_nan_gradient_reaches_the_slow_weights_and_forces_stage_1():
  params = _params()
  tx = ire_optax.sala(optax.sgd(0.1), sync_period=2, slow_step_size=0.5, rho=0.2)
  state = tx.init(params)
  updates, state = tx.update(_sala_grad_fn(params), state, params, grad_fn=_sala_grad_fn)
  params = optax.apply_updates(params, updates)
  g = _sala_grad_fn(params)
  g = {"w": g["w"].at[2].set(NAN), "b": g["b"]}
  updates, state = tx.update(g, state, params, grad_fn=_sala_grad_fn)  # t = 1: cycle end
  stats = ire_optax.sala_stats(state)
  assert np.isnan(stats["distance"]) and int(stats["stage"]) == 1  # NaN < ρ is False
  slow = ire_optax.sala_eval_params(state)
  assert _nonfinite(slow)["w"].tolist() == [False, False, True, False]
  assert not _nonfinite(slow)["b"].any()
  # The NaN stays in φ: the next cycle starts from it.
  params = optax.apply_updates(params, updates)
  updates, state = tx.update(_sala_grad_fn(params), state, params, grad_fn=_sala_grad_fn)
  assert np.isnan(ire_optax.sala_eval_params(state)["w"][2])


def test_sala_nan_sam_gradient_and_the_inner_guard():
  params = _params()
  bad = lambda p: jax.tree.map(lambda x: x * NAN, p)
  g = _sala_grad_fn(params)
  tx = ire_optax.sala(optax.sgd(0.1), sync_period=2, rho=0.2)
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=bad)  # t = 0: stage-2 SAM step
  assert np.isnan(updates["w"]).all()
  inner = ire_optax.sala(optax.apply_if_finite(optax.sgd(0.1), 3), sync_period=2, rho=0.2)
  updates, state = inner.update(g, inner.init(params), params, grad_fn=bad)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))  # θ' = φ = θ
  assert int(state.base_state.total_notfinite) == 1


@pytest.mark.parametrize("name, bad", [("sam", NAN), ("gsam", NAN), ("gsam", INF),
                                       ("sala", NAN)])
def test_nonfinite_clean_gradient_at_an_ascent_is_nan_everywhere(name, bad):
  """‖g‖ is NaN (or inf: NaN at that coordinate of ε), so the perturbed gradient is taken at a
  NaN point (SALA: at a stage-2 cycle start, its first step)."""
  params = _params()
  tx = {"sam": lambda: ire_optax.sam(optax.sgd(1.0), rho=0.1),
        "gsam": lambda: ire_optax.gsam(optax.sgd(1.0), rho=0.1, alpha=0.5),
        "sala": lambda: ire_optax.sala(optax.sgd(1.0), sync_period=2, rho=0.2)}[name]()
  g = _tree([bad, 1, 1, 1], [1, 1])
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=_returns_argument)
  assert all(bool(np.isnan(u).all()) for u in jax.tree.leaves(updates))


def test_both_guards_combined():
  """apply_if_finite outside (the clean gradient) and inside (SAM's gradient) together."""
  params = _params()
  g = _tree([1, 1, 1, 1], [1, 1])
  bad = lambda p: jax.tree.map(lambda x: x * NAN, p)
  tx = optax.apply_if_finite(ire_optax.ire(ire_optax.sam(
      optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 3), rho=0.1), kappa=2.0), 3)
  state0 = tx.init(params)
  updates, state = tx.update(g, state0, params, grad_fn=bad)  # bad perturbed gradient
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(state.total_notfinite) == 0
  assert int(state.inner_state.base_state.base_state.total_notfinite) == 1
  updates, state = tx.update(_tree([NAN, 1, 1, 1], [1, 1]), state0, params,
                             grad_fn=_returns_argument)  # bad clean gradient
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(state.inner_state, state0.inner_state)


def test_sala_zero_gradient_is_finite():
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = ire_optax.sala(optax.sgd(0.1), sync_period=1, rho=0.2)
  # A zero gradient computed from its argument (a grad_fn that ignores it is refused).
  updates, state = tx.update(zeros, tx.init(params), params,
                             grad_fn=lambda p: jax.tree.map(lambda x: 0.0 * x, p))
  chex.assert_trees_all_equal(updates, zeros)
  assert float(ire_optax.sala_stats(state)["distance"]) == 0.0


# -----------------------------------------------------------------------------
# apply_if_finite around every optimizer: the step is skipped, the state untouched
# -----------------------------------------------------------------------------

GUARDED = ["ire_grad_sq", "ire_fisher", "ire_hutchinson", "ire_custom", "sam", "asam",
           "sam_every_3_masked", "gsam", "sala", "ire_sam", "ire_sala", "multisteps_ire",
           "inject_ire", "inject_sam", "inject_sala"]


@pytest.mark.parametrize("name", GUARDED)
def test_apply_if_finite_skips_a_nonfinite_gradient_and_keeps_the_state(name):
  case = cases.CASES[name]
  tx = optax.apply_if_finite(case.make(), max_consecutive_errors=1)
  params, data = cases.make_params(), cases.make_data()
  batch = cases.batch_at(data, 0)

  @jax.jit
  def update(grads, state, params):
    return tx.update(grads, state, params, **cases.update_kwargs(case, batch))

  state = tx.init(params)
  grads = jax.grad(cases.loss_fn)(params, batch)
  updates, state = update(grads, state, params)  # one good step first
  params = optax.apply_updates(params, updates)
  grads = jax.grad(cases.loss_fn)(params, batch)
  ref_updates, ref = update(grads, state, params)
  for bad_value in (NAN, INF, -INF):
    bad = {"w": grads["w"].at[1, 2].set(bad_value), "b": grads["b"]}
    updates, new_state = update(bad, state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)  # bitwise untouched
    assert int(new_state.notfinite_count) == 1 and not bool(new_state.last_finite)
    # max_consecutive_errors = 1: a second bad gradient in a row is applied.
    updates, _ = update(bad, new_state, params)
    assert not np.isfinite(np.asarray(updates["w"])).all()
    # A good gradient after the skip continues from the untouched state.
    updates, newer = update(grads, new_state, params)
    chex.assert_trees_all_equal(updates, ref_updates)
    chex.assert_trees_all_equal(newer.inner_state, ref.inner_state)


# -----------------------------------------------------------------------------
# A single scalar parameter and empty leaves
# -----------------------------------------------------------------------------


def test_single_scalar_parameter():
  theta = jnp.float32(2.0)
  grad_fn = lambda p: 3.0 * p  # L = 1.5 θ², g = 3θ
  g = grad_fn(theta)
  # IRE: N = 1, k = 1: the only coordinate is flat, the update is (1 + κ)·base.
  tx = ire_optax.ire(optax.sgd(0.1), kappa=2.0, gamma=0.6, refresh_every=1)
  u, s = tx.update(g, tx.init(theta), theta)
  assert int(ire_optax.ire_flat_mask(s)) == 1 and np.isclose(float(u), -0.1 * 3.0 * 6.0)
  # SAM: ε = ρ sign(g); ASAM: ε = ρ |θ| sign(g).
  tx = ire_optax.sam(optax.sgd(0.1), rho=0.5)
  u, _ = tx.update(g, tx.init(theta), theta, grad_fn=grad_fn)
  assert np.isclose(float(u), -0.1 * 3.0 * 2.5)
  tx = ire_optax.sam(optax.sgd(0.1), rho=0.5, adaptive=True)
  u, _ = tx.update(g, tx.init(theta), theta, grad_fn=grad_fn)
  assert np.isclose(float(u), -0.1 * 3.0 * 3.0)
  # mSAM on a scalar parameter.
  tx = ire_optax.msam(optax.sgd(0.1), rho=0.5, num_microbatches=2)
  mb_grad = jax.grad(lambda p, mb: jnp.mean(mb) * 1.5 * p**2)
  u, _ = tx.update(None, tx.init(theta), theta, grad_fn=mb_grad, batch=jnp.ones(4))
  assert np.isclose(float(u), -0.1 * 3.0 * 2.5)
  # SALA (k = 1): stage-2 SAM step from φ = θ, then φ ← φ + α(θ' − φ).
  tx = ire_optax.sala(optax.sgd(0.1), sync_period=1, slow_step_size=0.5, rho=0.5)
  u, s = tx.update(g, tx.init(theta), theta, grad_fn=grad_fn)
  chex.assert_tree_all_finite((u, s))
  assert np.isclose(float(ire_optax.sala_eval_params(s)), 2.0 - 0.5 * 0.1 * 3.0 * 2.5)


EMPTY_CASES = ["ire_grad_sq", "ire_fisher", "ire_hutchinson", "sam", "asam", "msam", "sala",
               "ire_sam", "ire_sala"]


def _with_empty(params):
  return {**params, "e": jnp.zeros((0, 3), params["w"].dtype)}


def _loss_e(p, batch):
  return cases.loss_fn(p, batch) + jnp.sum(p["e"] ** 2) if "e" in p else cases.loss_fn(p, batch)


@pytest.mark.parametrize("name", EMPTY_CASES)
def test_empty_leaves_change_nothing(name):
  case = cases.CASES[name]
  data = cases.make_data()
  results = []
  for params in (cases.make_params(), _with_empty(cases.make_params())):
    tx = case.make()
    step = jax.jit(cases.make_step(case, tx, loss=_loss_e))
    state = tx.init(params)
    for t in range(4):
      params, state, _ = step(params, state, cases.batch_at(data, t))
    results.append((params, state))
  (p, _), (pe, se) = results
  assert pe["e"].shape == (0, 3)
  chex.assert_tree_all_finite(se)
  if name != "ire_hutchinson":  # its random probes depend on the number of leaves
    chex.assert_trees_all_close({"w": pe["w"], "b": pe["b"]}, p, rtol=1e-6, atol=1e-7)
  chex.assert_tree_all_finite(pe)


@pytest.mark.parametrize("params", [{"e": jnp.zeros((0,))}, {}], ids=["only_empty", "no_leaves"])
def test_trees_without_any_element(params):
  zero_grad = lambda p: jax.tree.map(jnp.zeros_like, p)
  g = zero_grad(params)
  for tx, kw in [
      (ire_optax.ire(optax.adam(0.1)), {}),
      (ire_optax.sam(optax.sgd(0.1)), {"grad_fn": zero_grad}),
      (ire_optax.sam(optax.sgd(0.1), adaptive=True), {"grad_fn": zero_grad}),
      (ire_optax.sala(optax.sgd(0.1)), {"grad_fn": zero_grad}),
  ]:
    updates, state = tx.update(g, tx.init(params), params, **kw)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    chex.assert_tree_all_finite(state)


# -----------------------------------------------------------------------------
# float64: computed in the wider of float32 and the parameters' dtype
# -----------------------------------------------------------------------------


def test_float64_hyperparameters_are_not_rounded_to_float32():
  # κ = 0.3, ρ = 0.1 and SALA's step 0.1 are not float32 numbers: rounded to float32 they
  # are off by about 1e-8 relative, far beyond float64's rounding.
  with jax.enable_x64(True):
    w = jnp.array([1.0, 2.0, -0.5], jnp.float64)
    g = jnp.array([0.3, -0.4, 1.2], jnp.float64)
    g64, w64 = np.asarray(g), np.asarray(w)
    for kappa in (0.3, lambda t: 0.3 + 0.0 * t):  # a constant and a schedule
      tx = ire_optax.ire(optax.sgd(1.0), kappa=kappa, gamma=0.5, refresh_every=1)
      u, _ = tx.update(g, tx.init(w), w)  # g² ranks w[0] flat
      np.testing.assert_allclose(np.asarray(u)[0], -1.3 * g64[0], rtol=1e-15)
    for make in (lambda r: ire_optax.sam(optax.sgd(1.0), rho=r),
                 lambda r: ire_optax.gsam(optax.sgd(1.0), rho=r, alpha=0.0)):
      tx = make(0.1)
      u, _ = tx.update(g, tx.init(w), w, grad_fn=lambda p: p)  # -u is the perturbed point
      np.testing.assert_allclose(-np.asarray(u) - w64,
                                 0.1 * g64 / (np.linalg.norm(g64) + 1e-12), rtol=1e-13)
    tx = ire_optax.sala(optax.sgd(1.0), sync_period=1, slow_step_size=0.1, rho=0.0)
    _, s = tx.update(g, tx.init(w), w, grad_fn=lambda p: p)
    np.testing.assert_allclose(ire_optax.sala_eval_params(s), w64 - 0.1 * g64, rtol=1e-15)


def test_float64_ire_amplification_sam_point_and_sala_slow_weights_stay_float64():
  with jax.enable_x64(True):
    w = jnp.array([1.0, 2.0], jnp.float64)
    g = jnp.array([1 + 1e-12, 3.0], jnp.float64)
    # IRE with κ = 0 is the base exactly; with κ = 2 the flat coordinate is 3·base in float64.
    base, _ = optax.sgd(1.0).update(g, optax.sgd(1.0).init(w), w)
    tx = ire_optax.ire(optax.sgd(1.0), kappa=0.0, gamma=0.5, refresh_every=1)
    u, _ = tx.update(g, tx.init(w), w)
    assert u.dtype == jnp.float64 and np.array_equal(u, base)
    np.testing.assert_array_equal(u, [-(1 + 1e-12), -3.0])
    tx = ire_optax.ire(optax.sgd(1.0), kappa=2.0, gamma=0.5, refresh_every=1)
    u, _ = tx.update(g, tx.init(w), w)  # g² ranks w[0] flat
    np.testing.assert_array_equal(u, [-3.0 * (1 + 1e-12), -3.0])
    # SAM with ρ = 0 evaluates grad_fn exactly at params; ρ > 0 as NumPy in float64. With
    # grad_fn = identity and SGD(1), the update is minus the point grad_fn was evaluated at.
    grad_fn = lambda p: p
    for adaptive in (False, True):
      tx = ire_optax.sam(optax.sgd(1.0), rho=0.0, adaptive=adaptive)
      u, _ = tx.update(g, tx.init(w), w, grad_fn=grad_fn)
      assert u.dtype == jnp.float64 and np.array_equal(-u, w)
    tx = ire_optax.sam(optax.sgd(1.0), rho=1e-9)
    u, _ = tx.update(g, tx.init(w), w, grad_fn=grad_fn)
    g64 = np.array([1 + 1e-12, 3.0])
    np.testing.assert_allclose(-u, np.array([1.0, 2.0]) + 1e-9 * g64 / np.linalg.norm(g64),
                               rtol=1e-15)
    # SALA keeps a 1e-9 offset of the slow weights (float32 would round it away).
    theta = jnp.array([1.0 + 1e-9, 2.0], jnp.float64)
    tx = ire_optax.sala(optax.sgd(1e-9), sync_period=1, slow_step_size=0.5, rho=0.0)
    u, s = tx.update(jnp.array([1.0, 1.0]), tx.init(theta), theta, grad_fn=lambda p: p)
    phi = ire_optax.sala_eval_params(s)
    assert phi.dtype == jnp.float64
    np.testing.assert_allclose(phi, np.array([1.0 + 1e-9, 2.0]) - 0.5 * 1e-9, rtol=0, atol=1e-16)
    np.testing.assert_allclose(theta + u, np.array([1.0 + 1e-9, 2.0]) - 1e-9, rtol=0, atol=1e-16)


# -----------------------------------------------------------------------------
# IRE over SALA: only the base step is amplified
# -----------------------------------------------------------------------------


def test_ire_over_sala_amplifies_the_base_step_only():
  p0 = {"w": jnp.array([0.3, 1.5])}
  grad_fn = lambda p: jax.tree.map(lambda x: 2.0 * x * jnp.array([1.0, 3.0]), p)
  h = {"w": jnp.array([0.0, 1.0])}  # w[0] is the flat coordinate on every refresh
  make_ire = lambda base: ire_optax.ire(base, kappa=1.0, gamma=0.5, refresh_every=1,
                                        curvature=_const_curvature(h))
  make_sala = lambda base: ire_optax.sala(base, sync_period=2, rho=10.0, slow_step_size=0.5)
  outer, inner = make_ire(make_sala(optax.sgd(0.1))), make_sala(make_ire(optax.sgd(0.1)))
  runs = []
  for tx in (outer, inner):
    p, s = p0, tx.init(p0)
    for t in range(6):
      u, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
      p = optax.apply_updates(p, u)
      if t % 2 == 1:  # d < ρ = 10: a stage-2 reset, the fast weights are the slow ones
        chex.assert_trees_all_close(p, ire_optax.sala_eval_params(s), rtol=1e-6, atol=1e-7)
    runs.append(p)
  # With a fixed mask, ire(sala(base)) is sala(ire(base)): the amplified base inside SALA.
  chex.assert_trees_all_close(runs[0], runs[1], rtol=1e-6)


# -----------------------------------------------------------------------------
# No NaN from finite inputs, for every value validation accepts
# -----------------------------------------------------------------------------

F32_MAX, F32_TINY = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)
_edges = lambda *v: st.sampled_from(v)


def _edge_cases(kappa, rho, eps, eta, alpha):
  """Every optimizer (one per example) with the given hyperparameters, and its update kwargs."""
  grad_fn = lambda p: jax.tree.map(jnp.tanh, p)
  # Plain SGD: a momentum trace of gradients near float32's max overflows in the base itself.
  sgd = optax.sgd(1e-3)
  kw = {"grad_fn": grad_fn}
  return [
      lambda: (ire_optax.ire(sgd, kappa=kappa, gamma=0.5, refresh_every=1), {}),
      lambda: (ire_optax.ire(sgd, kappa=kappa, gamma=0.5, ema_decay=0.9), {}),
      lambda: (ire_optax.ire(sgd, kappa=kappa, curvature="hutchinson"), kw),
      lambda: (ire_optax.sam(sgd, rho=rho, eps=eps), kw),
      lambda: (ire_optax.sam(sgd, rho=rho, eps=eps, adaptive=True, adaptive_eta=eta), kw),
      lambda: (ire_optax.msam(sgd, rho=rho, eps=eps, adaptive=True, adaptive_eta=eta,
                              num_microbatches=2),
               {"grad_fn": lambda p, mb: grad_fn(p), "batch": jnp.ones((2, 1))}),
      lambda: (ire_optax.sala(sgd, sync_period=1, rho=rho, eps=eps, slow_step_size=alpha), kw),
      lambda: (ire_optax.ire(ire_optax.sala(sgd, sync_period=2, rho=rho, eps=eps,
                                            slow_step_size=alpha), kappa=kappa), kw),
      lambda: (ire_optax.gsam(sgd, rho=rho, eps=eps, alpha=alpha), kw),
      lambda: (ire_optax.gsam(sgd, rho=rho, eps=eps, alpha=alpha, adaptive=True,
                              adaptive_eta=eta), kw),
  ]


@hyp.settings(max_examples=24, deadline=None, phases=[hyp.Phase.explicit, hyp.Phase.generate],
              suppress_health_check=[hyp.HealthCheck.too_slow])
@hyp.given(
    which=st.integers(0, 9),
    values=st.lists(_edges(0.0, F32_TINY, -F32_TINY, 1e-30, 1.0, -3.0, 1e20, -1e20, 1e30),
                    min_size=3, max_size=3),
    grads=st.lists(_edges(0.0, F32_TINY, 1e-30, -1.0, 1e20, -1e20, F32_MAX, -F32_MAX),
                   min_size=3, max_size=3),
    kappa=_edges(0.0, F32_TINY, 3.0, F32_MAX),
    rho=_edges(0.0, F32_TINY, 0.05, 1e20, F32_MAX),
    eps=_edges(F32_TINY, 1e-12, 1.0, F32_MAX),
    eta=_edges(0.0, 0.01, 1e20, F32_MAX),
    alpha=_edges(0.0, 0.5, 1.0),
)
# GSAM: <g, ĝ_p> overflows (two gradients at float32's max, ĝ_p along them), and a
# coordinate where both are 0 would get 0 · inf.
@hyp.example(which=8, values=[1.0, 1.0, 0.0], grads=[F32_MAX, F32_MAX, 0.0], kappa=0.0,
             rho=0.05, eps=1e-12, eta=0.0, alpha=0.5)
# Adaptive GSAM's first step makes parameters of 8.5e34, and |θ| + η then overflows ASAM's T.
@hyp.example(which=9, values=[-F32_TINY, -F32_TINY, F32_TINY], grads=[F32_TINY, 1e20, -F32_MAX],
             kappa=F32_MAX, rho=F32_MAX, eps=F32_TINY, eta=F32_MAX, alpha=0.5)
def test_no_optimizer_creates_a_nan_from_finite_inputs(which, values, grads, kappa, rho, eps,
                                                       eta, alpha):
  """Parameters up to 1e30, gradients up to float32's max, hyperparameters at their limits.

  The loss's gradient is bounded (tanh), so every NaN would be the optimizer's. Updates
  may overflow to ±inf (e.g. (1 + κ)·u with κ = 3.4e38); they are never NaN.
  """
  params = {"a": jnp.asarray(values[:2], jnp.float32), "b": jnp.asarray(values[2], jnp.float32)}
  g = {"a": jnp.asarray(grads[:2], jnp.float32), "b": jnp.asarray(grads[2], jnp.float32)}
  tx, extra = _edge_cases(kappa, rho, eps, eta, alpha)[which]()
  p, state = params, tx.init(params)
  for _ in range(2):
    updates, state = tx.update(None if "batch" in extra else g, state, p, **extra)
    assert not any(bool(jnp.isnan(x).any()) for x in jax.tree.leaves((updates, state)))
    p = optax.apply_updates(p, updates)


# -----------------------------------------------------------------------------
# apply_if_finite with axis_name: the inner guard sees the averaged gradient
# -----------------------------------------------------------------------------


def test_apply_if_finite_with_axis_name_goes_inside_sam():
  # One NaN example in device 0's slice of the batch. SAM averages the devices' gradients
  # itself, so only a guard on its base sees the same (NaN) gradient on every device.
  P = jax.sharding.PartitionSpec
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 6)).astype(np.float32)
  x[3, 0] = np.nan
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(rng.integers(0, 3, 64))}
  params = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), "b": jnp.zeros(3)}
  grad = jax.grad(lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      b["x"] @ p["w"] + p["b"], b["y"]).mean())
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:8])

  def run(tx):
    def step(p, s, b):
      g = grad(jax.lax.pcast(p, "d", to="varying"), b)  # the device's own gradient
      u, s = tx.update(g, s, p, grad_fn=lambda q: grad(q, b))
      return optax.apply_updates(p, u), s
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("d")),
                                 out_specs=(P(), P())))(params, tx.init(params), batch)

  sgd = optax.sgd(0.1, momentum=0.9)
  p, s = run(ire_optax.sam(optax.apply_if_finite(sgd, 5), rho=0.05, axis_name="d"))
  chex.assert_trees_all_equal(p, params)  # skipped on every device
  assert int(s.base_state.notfinite_count) == 1
  with pytest.raises(TypeError, match="cond branches"):  # the outer guard: per-device values
    run(optax.apply_if_finite(ire_optax.sam(sgd, rho=0.05, axis_name="d"), 5))
