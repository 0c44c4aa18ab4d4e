"""IRE against an independent NumPy implementation of Algorithm 1, and its edge cases."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.experimental import io_callback
from jax.flatten_util import ravel_pytree

import ire_optax
from tests.np_reference import NpAdamW, NpIRE, NpSGD, np_flat_mask

DIM = 26


def _problem(seed=0):
  """A quadratic 0.5 θᵀAθ − cᵀθ with a wide spectrum, on a two-leaf tree."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
  lam = np.logspace(-3, 1, DIM)
  a = (q * lam) @ q.T + np.diag(rng.uniform(0, 0.5, DIM))
  c = rng.standard_normal(DIM)
  params = {"w": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(6), jnp.float32)}
  flat0, unravel = ravel_pytree(params)
  a32, c32 = jnp.asarray(a, jnp.float32), jnp.asarray(c, jnp.float32)

  def loss(p):
    x = ravel_pytree(p)[0].astype(jnp.float32)
    return 0.5 * x @ a32 @ x - c32 @ x

  def np_grad(x):
    return a @ x - c

  return params, np.asarray(flat0, np.float64), unravel, loss, np_grad


BASES = {
    "sgd": (lambda: optax.sgd(0.05), lambda: NpSGD(0.05)),
    "momentum": (lambda: optax.sgd(0.02, momentum=0.9), lambda: NpSGD(0.02, momentum=0.9)),
    "nesterov_wd": (
        lambda: optax.chain(optax.add_decayed_weights(5e-4),
                            optax.sgd(0.02, momentum=0.9, nesterov=True)),
        lambda: NpSGD(0.02, momentum=0.9, nesterov=True, weight_decay=5e-4),
    ),
    "adamw": (lambda: optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1),
              lambda: NpAdamW(1e-2, b1=0.9, b2=0.95, weight_decay=0.1)),
}


def _run_reference(variant, base, *, warmup, gamma, steps):
  """Runs IRE and NpIRE side by side and compares every step."""
  params, x, unravel, loss, np_grad = _problem()
  make_tx, make_np = BASES[base]
  tx = ire_optax.ire(make_tx(), kappa=2.5, gamma=gamma, refresh_every=3, warmup_steps=warmup)
  ref = NpIRE(make_np(), kappa=2.5, gamma=gamma, refresh_every=3, warmup_steps=warmup)
  state = tx.init(params)
  update = variant(tx.update)
  for _ in range(steps):
    grads = jax.grad(loss)(params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    x = x + ref.step(np_grad(x), x)
    np.testing.assert_allclose(ravel_pytree(params)[0], x, rtol=2e-4, atol=2e-5)
  # the selection itself is exactly the full-sort one on the last refresh step
  mask = ravel_pytree(ire_optax.ire_flat_mask(state))[0]
  np.testing.assert_array_equal(np.asarray(mask, np.float64), ref.mask)


class IREReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True)
  @parameterized.product(base=tuple(BASES), warmup_gamma=((0, 0.6), (4, 0.85)))
  def test_matches_numpy_algorithm1(self, base, warmup_gamma, steps=11):
    warmup, gamma = warmup_gamma
    _run_reference(self.variant, base, warmup=warmup, gamma=gamma, steps=steps)

  @chex.variants(without_jit=True)
  def test_matches_numpy_without_jit(self):
    _run_reference(self.variant, "adamw", warmup=1, gamma=0.6, steps=4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_kappa_zero_is_base_exactly(self):
    params, _, _, loss, _ = _problem(1)
    base = optax.adamw(3e-3, weight_decay=0.1)
    tx = ire_optax.ire(optax.adamw(3e-3, weight_decay=0.1), kappa=0.0, gamma=0.6, refresh_every=2)
    s_ire, s_base = tx.init(params), base.init(params)
    p_ire = p_base = params
    up_ire, up_base = self.variant(tx.update), self.variant(base.update)
    for _ in range(4):
      u1, s_ire = up_ire(jax.grad(loss)(p_ire), s_ire, p_ire)
      u2, s_base = up_base(jax.grad(loss)(p_base), s_base, p_base)
      chex.assert_trees_all_equal(u1, u2)
      p_ire, p_base = optax.apply_updates(p_ire, u1), optax.apply_updates(p_base, u2)

  def test_kappa_schedule_lr_proportional(self):
    """The paper's κ_t = κ·η_t/η_max as a schedule."""
    params, x, _, loss, np_grad = _problem(2)
    lr = optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, 20)
    np_lr = lambda t: float(lr(t))
    kappa = lambda t: 3.0 * lr(t) / 0.05
    tx = ire_optax.ire(optax.sgd(lr, momentum=0.9), kappa=kappa, gamma=0.7, refresh_every=2)
    ref = NpIRE(NpSGD(np_lr, momentum=0.9), kappa=lambda t: 3.0 * np_lr(t) / 0.05, gamma=0.7,
                refresh_every=2, warmup_steps=0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(12):
      updates, state = update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
      x = x + ref.step(np_grad(x), x)
    np.testing.assert_allclose(ravel_pytree(params)[0], x, rtol=2e-4, atol=2e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_gradients_finite(self):
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    for curvature in ("grad_sq", "hutchinson", "fisher"):
      tx = ire_optax.ire(optax.adamw(1e-3), kappa=3.0, gamma=0.6, curvature=curvature)
      state = tx.init(params)
      zeros = jax.tree.map(jnp.zeros_like, params)
      # Zero gradients computed from their argument (a grad_fn that ignores it is refused).
      step = lambda g, s, p, tx=tx: tx.update(
          g, s, p, grad_fn=lambda q: jax.tree.map(lambda x: 0.0 * x, q),
          logits_fn=lambda q: jnp.zeros((5, 3)) + q["b"][:3].sum())
      updates, state = self.variant(step)(zeros, state, params)
      chex.assert_tree_all_finite((updates, state))

  def test_bfloat16_params(self):
    params, x, _, loss, np_grad = _problem(3)
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    tx = ire_optax.ire(optax.adamw(1e-2, weight_decay=0.1), kappa=2.0, gamma=0.6, refresh_every=3)
    state = tx.init(params16)
    update = jax.jit(tx.update)
    dtypes0 = jax.tree.map(lambda s: s.dtype, state)
    for _ in range(6):
      grads = jax.grad(lambda p: loss(jax.tree.map(lambda q: q.astype(jnp.float32), p)))(params16)
      updates, state = update(grads, state, params16)
      chex.assert_trees_all_equal_dtypes(updates, params16)
      params16 = optax.apply_updates(params16, updates)
    chex.assert_trees_all_equal(jax.tree.map(lambda s: s.dtype, state), dtypes0)
    chex.assert_tree_all_finite(params16)
    assert ire_optax.ire_flat_mask(state)["w"].dtype == jnp.uint8


class CurvatureEstimatorTest(chex.TestCase):

  def _diag_problem(self):
    diag = np.linspace(0.1, 5.0, 12).astype(np.float32)[np.random.default_rng(0).permutation(12)]
    d = jnp.asarray(diag)
    params = {"x": jnp.ones(12)}
    loss = lambda p: 0.5 * jnp.sum(d * p["x"] ** 2)
    return diag, params, loss

  def test_hutchinson_exact_on_diagonal_hessian_and_runs_on_refresh_only(self):
    diag, params, loss = self._diag_problem()
    calls = []

    def grad_fn(p):
      io_callback(lambda: calls.append(1) or np.int32(0), jax.ShapeDtypeStruct((), jnp.int32),
                  ordered=True)
      return jax.grad(loss)(p)

    tx = ire_optax.ire(optax.sgd(0.1), kappa=1.0, gamma=0.5, refresh_every=4,
                       warmup_steps=2, curvature="hutchinson")
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    for _ in range(11):
      _, state = update(jax.grad(loss)(params), state, params)
    jax.effects_barrier()
    # refreshes at t = 2, 6, 10: one HVP each, nothing on the other 8 steps
    assert len(calls) == 3, len(calls)
    # z ⊙ Hz = diag(H) exactly for a diagonal Hessian: the mask is the 6 smallest entries
    np.testing.assert_array_equal(ire_optax.ire_flat_mask(state)["x"], np_flat_mask(diag, 0.5))

  def test_fisher_runs_on_refresh_only_and_ranks_model_curvature(self):
    rng = np.random.default_rng(0)
    xb = jnp.asarray(rng.standard_normal((64, 5)), jnp.float32)
    scale = jnp.asarray([0.01, 0.01, 1.0, 1.0, 10.0], jnp.float32)
    params = {"w": jnp.asarray(rng.standard_normal((5, 3)) * 0.3, jnp.float32)}
    calls = []

    def logits_fn(p):
      io_callback(lambda: calls.append(1) or np.int32(0), jax.ShapeDtypeStruct((), jnp.int32),
                  ordered=True)
      return (xb * scale) @ p["w"]

    tx = ire_optax.ire(optax.sgd(0.1), kappa=1.0, gamma=0.4, refresh_every=5,
                       curvature="fisher")
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(7):
      _, state = update(grads, state, params)
    jax.effects_barrier()
    assert len(calls) == 2  # t = 0 and t = 5
    mask = np.asarray(ire_optax.ire_flat_mask(state)["w"])
    # inputs scaled by 0.01 give the flattest rows (Fisher ∝ x²): 6 = ⌊0.4·15⌋ coordinates
    np.testing.assert_array_equal(mask[:2], 1)
    np.testing.assert_array_equal(mask[2:], 0)

  def test_user_function_estimator(self):
    params, x, _, loss, np_grad = _problem(4)
    fn = lambda g, p, key, **_: jax.tree.map(lambda q: -jnp.abs(q), p)
    tx = ire_optax.ire(optax.sgd(0.05), kappa=1.5, gamma=0.6, refresh_every=2, curvature=fn)
    ref = NpIRE(NpSGD(0.05), kappa=1.5, gamma=0.6, refresh_every=2, warmup_steps=0,
                curvature=lambda g, p: -np.abs(p))
    state = tx.init(params)
    for _ in range(6):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
      x = x + ref.step(np_grad(x), x)
    np.testing.assert_allclose(ravel_pytree(params)[0], x, rtol=2e-4, atol=2e-5)

  def test_grad_sq_ema(self):
    params, x, _, loss, np_grad = _problem(5)
    ema = {"v": np.zeros(DIM)}

    def np_curv(g, p):
      return ema["v"]

    class EmaIRE(NpIRE):
      def step(self, g, p):
        ema["v"] = 0.9 * ema["v"] + 0.1 * g * g
        return super().step(g, p)

    tx = ire_optax.ire(optax.sgd(0.05), kappa=2.0, gamma=0.6, refresh_every=3, ema_decay=0.9)
    ref = EmaIRE(NpSGD(0.05), kappa=2.0, gamma=0.6, refresh_every=3, warmup_steps=0,
                 curvature=np_curv)
    state = tx.init(params)
    for _ in range(8):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
      x = x + ref.step(np_grad(x), x)
    np.testing.assert_allclose(ravel_pytree(params)[0], x, rtol=2e-4, atol=2e-5)

  @parameterized.parameters(float("nan"), float("inf"))
  def test_grad_sq_ema_skips_a_non_finite_entry(self, bad):
    """One NaN or Inf gradient entry (an overflowed float16 step) used to stay in the EMA for
    good, so that coordinate was never flat again; it keeps its average instead."""
    tx = ire_optax.ire(optax.sgd(0.1), gamma=0.5, refresh_every=1, ema_decay=0.9)
    params = {"w": jnp.zeros(4)}
    good = {"w": jnp.array([1e-3, 1.0, 2.0, 3.0])}
    state = tx.init(params)
    _, state = tx.update(good, state, params)
    before = np.asarray(state.curvature_ema["w"])
    _, state = tx.update({"w": good["w"].at[0].set(bad)}, state, params)
    ema = np.asarray(state.curvature_ema["w"])
    np.testing.assert_array_equal(ema[0], before[0])
    np.testing.assert_allclose(ema[1:], 0.9 * before[1:] + 0.1 * np.asarray(good["w"][1:]) ** 2,
                               rtol=1e-6)
    for _ in range(2):
      _, state = tx.update(good, state, params)
    np.testing.assert_array_equal(ire_optax.ire_flat_mask(state)["w"], [1, 1, 0, 0])


class CompositionTest(chex.TestCase):

  def _run(self, tx, steps=6, seed=0, grads_fn=None):
    params, _, _, loss, _ = _problem(seed)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(steps):
      g = jax.grad(loss)(params) if grads_fn is None else grads_fn(params, i)
      updates, state = update(g, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  def test_chain_clip_then_ire(self):
    params, x, _, loss, np_grad = _problem()
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     ire_optax.ire(optax.adamw(1e-2, weight_decay=0.1), kappa=3.0, gamma=0.6,
                                   refresh_every=2))
    ref = NpIRE(NpAdamW(1e-2, weight_decay=0.1), kappa=3.0, gamma=0.6, refresh_every=2,
                warmup_steps=0)
    state = tx.init(params)
    for _ in range(6):
      updates, state = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
      g = np_grad(x)
      g = g * min(1.0, 1.0 / np.linalg.norm(g))
      x = x + ref.step(g, x)
    np.testing.assert_allclose(ravel_pytree(params)[0], x, rtol=2e-4, atol=2e-5)

  def test_inject_hyperparams_equals_plain(self):
    base = lambda: optax.adamw(1e-2)
    p1, _ = self._run(ire_optax.ire(base(), kappa=2.0, gamma=0.6, refresh_every=3))
    tx = optax.inject_hyperparams(ire_optax.ire)(base(), kappa=2.0, gamma=0.6, refresh_every=3)
    p2, state = self._run(tx)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
    assert float(state.hyperparams["kappa"]) == 2.0

  def test_multisteps_accumulates_then_applies_ire(self):
    params, x, _, loss, np_grad = _problem(6)
    tx = optax.MultiSteps(ire_optax.ire(optax.sgd(0.05, momentum=0.9), kappa=2.0, gamma=0.6,
                                        refresh_every=2), every_k_schedule=2)
    ref = NpIRE(NpSGD(0.05, momentum=0.9), kappa=2.0, gamma=0.6, refresh_every=2,
                warmup_steps=0)
    state = tx.init(params)
    acc = np.zeros(DIM)
    for i in range(8):
      updates, state = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
      acc += np_grad(x)
      if i % 2 == 1:
        x = x + ref.step(acc / 2, x)
        acc[:] = 0
    np.testing.assert_allclose(ravel_pytree(params)[0], x, rtol=2e-4, atol=2e-5)

  def test_masked_keeps_biases_out(self):
    params, _, _, loss, _ = _problem(7)
    labels = {"w": "ire", "b": "plain"}
    tx = optax.multi_transform(
        {"ire": ire_optax.ire(optax.sgd(0.05), kappa=3.0, gamma=0.9, refresh_every=1),
         "plain": optax.sgd(0.05)}, labels)
    state = tx.init(params)
    g = jax.grad(loss)(params)
    updates, state = tx.update(g, state, params)
    # biases get exactly the SGD step; weights are amplified on k = int(0.9 · 20) = 18
    # coordinates (the official code's k for a Python float)
    np.testing.assert_array_equal(updates["b"], -0.05 * g["b"])
    amplified = np.isclose(np.asarray(updates["w"]), -0.05 * 4.0 * np.asarray(g["w"]))
    assert amplified.sum() == int(0.9 * 20) == 18

    tx2 = optax.chain(optax.masked(ire_optax.ire(optax.identity(), kappa=3.0, gamma=0.5),
                                   {"w": True, "b": False}), optax.scale(-0.05))
    state2 = tx2.init(params)
    u2, _ = tx2.update(g, state2, params)
    np.testing.assert_allclose(u2["b"], -0.05 * g["b"])

  @parameterized.named_parameters(
      ("tree", {"w": True, "b": False}),
      ("function", lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  def test_mask_argument_ranks_and_amplifies_only_selected_leaves(self, mask):
    # Against NumPy: IRE (Algorithm 1) on the weights alone, N = their 20 coordinates; the
    # biases take the plain base step. ravel_pytree orders "b" (6) before "w" (20).
    params, x, _, loss, np_grad = _problem(10)
    tx = ire_optax.ire(optax.sgd(0.02, momentum=0.9), kappa=3.0, gamma=0.6, refresh_every=2,
                       mask=mask)
    ref_w = NpIRE(NpSGD(0.02, momentum=0.9), kappa=3.0, gamma=0.6, refresh_every=2,
                  warmup_steps=0)
    ref_b = NpSGD(0.02, momentum=0.9)
    state = tx.init(params)
    for t in range(6):
      updates, state = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
      g = np_grad(x)
      x = np.concatenate([x[:6] + ref_b.step(g[:6], x[:6], t), x[6:] + ref_w.step(g[6:], x[6:])])
      np.testing.assert_allclose(ravel_pytree(params)[0], x, rtol=2e-4, atol=2e-5)
    np.testing.assert_array_equal(state.mask["b"], 0)
    assert int(state.mask["w"].sum()) == int(0.6 * 20)

  def test_mask_argument_with_fisher_where_multi_transform_cannot(self):
    rng = np.random.default_rng(1)
    xb = jnp.asarray(rng.standard_normal((32, 5)), jnp.float32)
    params = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    logits_fn = lambda p: xb @ p["w"] + p["b"]
    grads = {"w": jnp.ones((5, 3)), "b": jnp.ones(3)}
    make = lambda mask: ire_optax.ire(optax.sgd(1.0), kappa=1.0, gamma=0.4, refresh_every=1,
                                      curvature="fisher", mask=mask)
    tx = make({"w": True, "b": False})
    u, state = tx.update(grads, tx.init(params), params, logits_fn=logits_fn)
    np.testing.assert_array_equal(u["b"], -1.0)  # the base step
    assert int((np.asarray(u["w"]) == -2.0).sum()) == int(0.4 * 15) == int(state.mask["w"].sum())
    # Selecting every leaf is IRE without a mask, bit for bit (a single True warns: it is what
    # a mask function gives under inject_hyperparams without static_args).
    with pytest.warns(UserWarning, match="static_args=\\('mask',\\)"):
      u_all, s_all = make(True).update(grads, make(True).init(params), params,
                                       logits_fn=logits_fn)
    u_none, s_none = make(None).update(grads, make(None).init(params), params,
                                       logits_fn=logits_fn)
    chex.assert_trees_all_equal((u_all, s_all.mask), (u_none, s_none.mask))
    # Inside optax.multi_transform the model cannot be evaluated: a TypeError that says so.
    tx = optax.multi_transform({"ire": make(None), "sgd": optax.sgd(1.0)}, {"w": "ire", "b": "sgd"})
    with pytest.raises(TypeError, match=r"MaskedNode.*mask=mask"):
      tx.update(grads, tx.init(params), params, logits_fn=logits_fn)

  def test_mask_argument_validation(self):
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    # A mask function under inject_hyperparams without static_args is called with the step
    # count, whose one bool selects every leaf: a warning names static_args.
    keep_biases_out = lambda p: jax.tree.map(lambda x: x.ndim > 1 or x.ndim == 0, p)
    tx = optax.inject_hyperparams(ire_optax.ire)(optax.sgd(0.1), mask=keep_biases_out)
    with pytest.warns(UserWarning, match="static_args=\\('mask',\\)"):
      tx.update(params, tx.init(params), params)
    tx = optax.inject_hyperparams(ire_optax.ire, static_args=("mask",))(
        optax.sgd(0.1), mask=keep_biases_out, gamma=0.5, refresh_every=1)
    grads = {"w": jnp.arange(1.0, 7.0).reshape(3, 2), "b": jnp.ones(2)}
    _, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(state.inner_state.mask["b"], 0)
    assert int(state.inner_state.mask["w"].sum()) == 3
    # Without params a mask function sees the gradient (real dtypes), not the uint8 mask.
    floats_2d = lambda p: jax.tree.map(lambda x: x.dtype == jnp.float32 and x.ndim > 1, p)
    tx = ire_optax.ire(optax.sgd(0.1), gamma=0.5, refresh_every=1, mask=floats_2d)
    _, state = tx.update(grads, tx.init(params), None)
    np.testing.assert_array_equal(state.mask["b"], 0)
    assert int(state.mask["w"].sum()) == 3
    with pytest.raises(TypeError, match="`mask` leaves must be Python bools"):
      ire_optax.ire(optax.sgd(0.1), mask={"w": jnp.array(True), "b": False})
    tx = ire_optax.ire(optax.sgd(0.1), mask={"w": False, "b": False})
    with pytest.warns(UserWarning, match="`mask` selects no parameter"):
      tx.update(params, tx.init(params), params)
    tx = ire_optax.ire(optax.sgd(0.1), mask={"w": True})
    with pytest.raises(ValueError, match="`mask` must have the structure of the params"):
      tx.update(params, tx.init(params), params)

  def test_apply_if_finite_skips_nan_step(self):
    params, _, _, loss, _ = _problem(8)
    tx = optax.apply_if_finite(ire_optax.ire(optax.adamw(1e-2), kappa=2.0, gamma=0.6), 3)
    state = tx.init(params)
    g = jax.grad(loss)(params)
    _, state = tx.update(g, state, params)
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), g)
    updates, state2 = jax.jit(tx.update)(bad, state, params)
    chex.assert_trees_all_equal(state2.inner_state, state.inner_state)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    assert int(state2.notfinite_count) == 1

  def test_state_is_fixed_under_scan(self):
    params, _, _, loss, _ = _problem(9)
    tx = ire_optax.ire(optax.adamw(1e-3), kappa=3.0, gamma=0.6, refresh_every=10,
                       warmup_steps=5, curvature="hutchinson")
    state = tx.init(params)

    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss))
      return (optax.apply_updates(p, u), s), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=60))((params, state))
    chex.assert_tree_all_finite(params)
    assert int(state.count) == 60

  def test_mask_is_one_byte_per_parameter(self):
    params = {"a": jnp.zeros((100, 10)), "b": jnp.zeros(7, jnp.bfloat16)}
    base = optax.adamw(1e-3)
    s_ire = ire_optax.ire(base, kappa=1.0, gamma=0.6).init(params)
    extra = sum(x.nbytes for x in jax.tree.leaves(s_ire)) - sum(
        x.nbytes for x in jax.tree.leaves(base.init(params)))
    n = 1007
    assert extra <= n * 1 + 16, extra  # mask (1 B/param) + count + key

  @parameterized.parameters("pmap", "shard_map")
  def test_data_parallel_fisher_same_mask_on_every_device(self, mapper):
    n = jax.local_device_count()
    rng = np.random.default_rng(0)
    xb = jnp.asarray(rng.standard_normal((n, 16, 4)), jnp.float32)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    tx = ire_optax.ire(optax.sgd(0.1), kappa=1.0, gamma=0.5, curvature="fisher", axis_name="d")

    def step(p, s, x):
      g = jax.lax.pmean(jax.grad(lambda q: jnp.sum((x @ q["w"]) ** 2))(p), "d")
      u, s = tx.update(g, s, p, logits_fn=lambda q: x @ q["w"])
      return optax.apply_updates(p, u), s

    state = tx.init(params)
    if mapper == "pmap":
      rep = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), (params, state))
      p, s = jax.pmap(step, axis_name="d")(*rep, xb)
      masks, ws = np.asarray(s.mask["w"]), np.asarray(p["w"])
    else:
      mesh = jax.make_mesh((n,), ("d",))
      P = jax.sharding.PartitionSpec
      # out_specs P("d") stacks each device's copy so that we can compare them
      f = jax.shard_map(lambda p, s, x: jax.tree.map(lambda a: a[None], step(p, s, x[0])),
                        mesh=mesh, in_specs=(P(), P(), P("d")), out_specs=P("d"),
                        check_vma=False)
      shard = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
      p, s = jax.jit(f)(*shard((params, state), P()), shard(xb, P("d")))
      masks, ws = np.asarray(s.mask["w"]), np.asarray(p["w"])
    for i in range(1, n):
      np.testing.assert_array_equal(masks[i], masks[0])
      np.testing.assert_array_equal(ws[i], ws[0])
    assert masks[0].sum() == 6


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(kw=dict(kappa=-1.0), match="kappa"),
      dict(kw=dict(gamma=0.0), match="gamma"),
      dict(kw=dict(gamma=1.0), match="gamma"),
      dict(kw=dict(gamma=1.5), match="gamma"),
      dict(kw=dict(refresh_every=0), match="refresh_every"),
      dict(kw=dict(refresh_every=2.5), match="refresh_every"),
      dict(kw=dict(warmup_steps=-1), match="warmup_steps"),
      dict(kw=dict(curvature="hessian"), match="curvature"),
      dict(kw=dict(ema_decay=1.0), match="ema_decay"),
      dict(kw=dict(curvature="fisher", ema_decay=0.9), match="ema_decay"),
      dict(kw=dict(num_samples=0), match="num_samples"),
  )
  def test_bad_hyperparameters(self, kw, match):
    with pytest.raises(ValueError, match=match):
      ire_optax.ire(optax.sgd(0.1), **kw)

  def test_not_a_transformation(self):
    with pytest.raises(TypeError, match="base_optimizer"):
      ire_optax.ire(0.1)

  def test_bad_curvature_type(self):
    with pytest.raises(TypeError, match="curvature"):
      ire_optax.ire(optax.sgd(0.1), curvature=3)

  @parameterized.parameters(("fisher", "logits_fn"), ("hutchinson", "grad_fn"))
  def test_model_based_estimator_without_its_argument(self, name, arg):
    params = {"w": jnp.ones(3)}
    tx = ire_optax.ire(optax.sgd(0.1), curvature=name)
    with pytest.raises(TypeError, match=arg):
      tx.update(params, tx.init(params), params)


class _HalfState(NamedTuple):
  count: jax.Array


def _amplify_inside_wrapper():
  """A wrapper that applies IRE's amplification to half of its step, the other half exact."""
  from ire_optax._src import utils

  utils.applies_ire_amplification(_HalfState)

  def update(updates, state, params=None, **extra):
    amplify = extra.pop(utils.IRE_AMPLIFY_KWARG, lambda t: t)
    half = jax.tree.map(lambda g: -0.05 * g, updates)
    out = jax.tree.map(lambda a, b: a + b, amplify(half), half)
    return out, _HalfState(state.count + 1)

  return optax.GradientTransformationExtraArgs(
      lambda p: _HalfState(jnp.zeros([], jnp.int32)), update)


class AmplificationInsideTest(chex.TestCase):
  """ire() knows no wrapper by name: a registered state class gets the amplification."""

  def test_ire_source_does_not_import_sala(self):
    import inspect

    from ire_optax._src import ire as ire_module

    src = inspect.getsource(ire_module)
    assert "SALAState" not in src and "_src.sala" not in src and "import sala" not in src

  def test_registered_wrapper_applies_the_amplification_itself(self):
    g = {"w": jnp.array([1.0, 1e-3, 2.0, 1e-4])}
    params = {"w": jnp.zeros(4)}
    kappa = 3.0
    tx = ire_optax.ire(_amplify_inside_wrapper(), kappa=kappa, gamma=0.5,
                       curvature="grad_sq", refresh_every=1)
    out, state = tx.update(g, tx.init(params), params)
    mask = np.asarray(ire_optax.ire_flat_mask(state)["w"])
    np.testing.assert_array_equal(mask, [0, 1, 0, 1])  # the two smallest g² are flat
    half = -0.05 * np.asarray(g["w"])
    expected = np.where(mask > 0, (1 + kappa) * half, half) + half  # only half amplified
    np.testing.assert_allclose(np.asarray(out["w"]), expected, rtol=1e-6)


def test_a_bfloat16_gamma_warns_and_a_float32_one_counts_as_the_python_number():
  """inject_hyperparams stores γ in bfloat16 for bfloat16 params (0.6 -> 0.6015625: 601 of
  1,000 flat); ire says so, and hyperparam_dtype=jnp.float32 gives the Python number's k."""
  rng = np.random.default_rng(0)
  # 1,000 distinct bfloat16 gradients: 2^e (1 + m/128), 8 mantissa bits.
  values = np.ldexp(1 + np.arange(128) / 128, np.arange(8)[:, None]).ravel()
  grads = {"w": jnp.asarray(rng.permutation(values)[:1000], jnp.bfloat16)}
  params = jax.tree.map(jnp.ones_like, grads)

  def flat(tx):
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    return int(np.asarray(ire_optax.ire_flat_mask(state)["w"]).sum())

  kw = dict(kappa=3.0, gamma=0.6, refresh_every=1)
  assert flat(ire_optax.ire(optax.sgd(0.1), **kw)) == 600
  with pytest.warns(UserWarning, match="hyperparam_dtype=jnp.float32"):
    assert flat(optax.inject_hyperparams(ire_optax.ire)(optax.sgd(0.1), **kw)) == 601
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert flat(optax.inject_hyperparams(ire_optax.ire, hyperparam_dtype=jnp.float32)(
        optax.sgd(0.1), **kw)) == 600
