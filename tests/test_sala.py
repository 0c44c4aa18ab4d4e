"""Tests for ire_optax.sala (Sharpness-Aware Lookahead).

The reference below is written in plain NumPy (float64) from the algorithm's
description: it keeps explicit fast weights θ, slow weights φ, the distance d
and the stage, and implements the base optimizers' math itself (SGD with
Nesterov momentum and coupled weight decay, AdamW with bias correction and
decoupled weight decay). It never calls ire_optax or optax.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import ire_optax
from ire_optax._src import sala as sala_lib
from tests.np_reference import NpAdamWTree as NpAdamW

# -----------------------------------------------------------------------------
# Problem: a separable quadratic + quartic loss with a per-step random target.
#   L_t(θ) = Σ 0.5 A (θ − c_t)² + 0.25 β θ⁴,   ∇L_t(θ) = A (θ − c_t) + β θ³.
# -----------------------------------------------------------------------------

SHAPES = {"b": (5,), "w": (3, 4)}
BETA = 0.1


def _problem(seed: int, num_steps: int):
  rng = np.random.default_rng(seed)
  a = {k: rng.uniform(0.5, 3.0, s) for k, s in SHAPES.items()}
  p0 = {k: rng.normal(0.0, 1.0, s) for k, s in SHAPES.items()}
  targets = [{k: rng.normal(0.0, 1.0, s) for k, s in SHAPES.items()} for _ in range(num_steps)]
  return a, p0, targets


def np_grad(a, theta, c):
  return {k: a[k] * (theta[k] - c[k]) + BETA * theta[k] ** 3 for k in theta}


def jax_loss(a, params, c):
  return sum(
      jnp.sum(0.5 * a[k] * (params[k] - c[k]) ** 2 + 0.25 * BETA * params[k] ** 4)
      for k in params
  )


# --- base optimizers in NumPy ------------------------------------------------


class NpSGDNesterov:
  """SGD with Nesterov momentum, weight decay added to the gradient (PyTorch style)."""

  def __init__(self, lr, momentum, wd):
    self.lr, self.mu, self.wd = lr, momentum, wd
    self.m = None

  def step(self, g, p):
    if self.m is None:
      self.m = {k: np.zeros_like(v) for k, v in g.items()}
    out = {}
    for k in g:
      gk = g[k] + self.wd * p[k]
      self.m[k] = gk + self.mu * self.m[k]
      out[k] = -self.lr * (gk + self.mu * self.m[k])
    return out


SGD_HP = dict(lr=0.05, momentum=0.9, wd=0.05)
ADAMW_HP = dict(lr=0.1, b1=0.9, b2=0.99, eps=1e-8, wd=0.3)


def make_np_base(name):
  if name == "sgd":
    return NpSGDNesterov(**SGD_HP)
  return NpAdamW(**ADAMW_HP)


def make_optax_base(name):
  if name == "sgd":
    return optax.chain(
        optax.add_decayed_weights(SGD_HP["wd"]),
        optax.sgd(SGD_HP["lr"], momentum=SGD_HP["momentum"], nesterov=True),
    )
  return optax.adamw(
      ADAMW_HP["lr"], b1=ADAMW_HP["b1"], b2=ADAMW_HP["b2"], eps=ADAMW_HP["eps"],
      weight_decay=ADAMW_HP["wd"],
  )


# --- SALA in NumPy -----------------------------------------------------------


def _norm(tree):
  return float(np.sqrt(sum(np.sum(v**2) for v in tree.values())))


def np_sala(a, p0, targets, base, *, k, alpha, rho, eps=1e-12, decay_at_slow=True):
  """Explicit-θ/φ simulation. Returns per-step records (after each step)."""
  theta = {kk: v.copy() for kk, v in p0.items()}
  phi = {kk: v.copy() for kk, v in p0.items()}
  d = 0.0
  extra = cycles = 0
  rec = dict(theta=[], phi=[], d=[], stage=[], extra=[], cycles=[], start_stage=[],
             start_gap=[], end_d=[])
  for t, c in enumerate(targets):
    g = np_grad(a, theta, c)
    if t % k == 0:  # cycle start
      cycles += 1
      stage2 = d < rho
      rec["start_stage"].append(2 if stage2 else 1)
      rec["start_gap"].append(_norm({kk: theta[kk] - phi[kk] for kk in theta}))
      if stage2:
        extra += 1
        gn = _norm(g)
        pert = {kk: phi[kk] + rho * g[kk] / (gn + eps) for kk in phi}
        g = np_grad(a, pert, c)
      at = phi if decay_at_slow else theta
      step = base.step(g, at)
      theta = {kk: phi[kk] + step[kk] for kk in phi}
    else:
      step = base.step(g, theta)
      theta = {kk: theta[kk] + step[kk] for kk in theta}
    if t % k == k - 1:  # cycle end
      phi = {kk: phi[kk] + alpha * (theta[kk] - phi[kk]) for kk in phi}
      d = _norm({kk: theta[kk] - phi[kk] for kk in theta})
      rec["end_d"].append(d)
      if d < rho:
        theta = {kk: v.copy() for kk, v in phi.items()}
    rec["theta"].append(theta)
    rec["phi"].append(phi)
    rec["d"].append(d)
    rec["stage"].append(2 if d < rho else 1)
    rec["extra"].append(extra)
    rec["cycles"].append(cycles)
  return rec


def _good_rho(a, p0, targets, base_name, k, alpha):
  """A ρ for which the reference flips stages both ways with a safe margin."""
  free = np_sala(a, p0, targets, make_np_base(base_name), k=k, alpha=alpha, rho=0.0)
  ds = np.asarray(free["end_d"][1:])
  for q in (0.5, 0.4, 0.6, 0.3, 0.7, 0.45, 0.55, 0.35, 0.65):
    rho = float(np.quantile(ds, q)) * 1.013
    r = np_sala(a, p0, targets, make_np_base(base_name), k=k, alpha=alpha, rho=rho)
    st = r["start_stage"]
    ups = sum(1 for x, y in zip(st, st[1:], strict=False) if (x, y) == (1, 2))
    downs = sum(1 for x, y in zip(st, st[1:], strict=False) if (x, y) == (2, 1))
    margin = min(abs(dd - rho) for dd in r["end_d"]) / rho
    if ups >= 1 and downs >= 1 and margin > 2e-3:
      return rho, r
  raise AssertionError("test data give no stage flips; choose another seed")


def _to_jax(tree, dtype=jnp.float32):
  return {k: jnp.asarray(v, dtype) for k, v in tree.items()}


def _run_sala(tx, a, p0, targets, variant=lambda f: f, dtype=jnp.float32, calls=None):
  """Runs tx for len(targets) steps; returns per-step params, eval params and stats."""
  a_j = _to_jax(a, dtype)

  def step(params, state, c):
    def grad_fn(p):
      if calls is not None:
        jax.debug.callback(lambda: calls.append(1))
      return jax.grad(functools.partial(jax_loss, a_j))(p, c)

    g = jax.grad(functools.partial(jax_loss, a_j))(params, c)
    updates, state = tx.update(g, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, updates

  step = variant(step)
  params = _to_jax(p0, dtype)
  state = tx.init(params)
  out = dict(theta=[], phi=[], stats=[], updates=[], state=None)
  for c in targets:
    params, state, updates = step(params, state, _to_jax(c, dtype))
    out["theta"].append(params)
    out["phi"].append(ire_optax.sala_eval_params(state))
    out["stats"].append(jax.tree.map(np.asarray, ire_optax.sala_stats(state)))
    out["updates"].append(updates)
  out["state"] = state
  jax.effects_barrier()
  return out


def _close(x, y, rtol=2e-4, atol=2e-5):
  chex.assert_trees_all_close(
      jax.tree.map(lambda v: np.asarray(v, np.float64), x),
      jax.tree.map(lambda v: np.asarray(v, np.float64), y),
      rtol=rtol, atol=atol,
  )


def _max_diff(x, y):
  return max(float(np.max(np.abs(np.asarray(x[k], np.float64) - np.asarray(y[k])))) for k in x)


# -----------------------------------------------------------------------------
# Agreement with the NumPy state machine
# -----------------------------------------------------------------------------


class SALAReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(base_name=("sgd", "adamw"), k=(1, 2, 3, 5))
  def test_matches_numpy_reference(self, base_name, k):
    alpha = 0.5
    num_steps = max(24, 8 * k)
    a, p0, targets = _problem(seed=10 + k, num_steps=num_steps)
    rho, ref = _good_rho(a, p0, targets, base_name, k, alpha)

    # The data exercise every branch of the state machine.
    self.assertEqual(ref["start_stage"][0], 2)  # first cycle is a SAM step
    gaps = [g for s, g in zip(ref["start_stage"], ref["start_gap"], strict=True) if s == 1]
    self.assertTrue(gaps and max(gaps) > 1e-2, "no deferred reset in the data")

    calls = []
    tx = ire_optax.sala(make_optax_base(base_name), sync_period=k, slow_step_size=alpha, rho=rho)
    out = _run_sala(tx, a, p0, targets, variant=self.variant, calls=calls)

    for t in range(num_steps):
      _close(out["theta"][t], ref["theta"][t])
      _close(out["phi"][t], ref["phi"][t])
      st = out["stats"][t]
      np.testing.assert_allclose(st["distance"], ref["d"][t], rtol=2e-4, atol=1e-6)
      self.assertEqual(int(st["stage"]), ref["stage"][t], f"stage after step {t}")
      self.assertEqual(int(st["extra_grads"]), ref["extra"][t], f"extra grads after step {t}")
      self.assertEqual(int(st["cycles"]), ref["cycles"][t])
    # grad_fn ran exactly once per stage-2 cycle start, never otherwise.
    self.assertEqual(len(calls), ref["extra"][-1])
    self.assertEqual(ref["extra"][-1], sum(s == 2 for s in ref["start_stage"]))
    self.assertLess(ref["extra"][-1], len(ref["start_stage"]))
    np.testing.assert_allclose(
        out["stats"][-1]["stage2_fraction"], ref["extra"][-1] / ref["cycles"][-1], rtol=1e-6
    )

    # The comparison is sensitive to where the base step is taken: a reference
    # that applies the weight decay at θ_end instead of φ is far off.
    wrong = np_sala(a, p0, targets, make_np_base(base_name), k=k, alpha=alpha, rho=rho,
                    decay_at_slow=False)
    self.assertGreater(
        max(_max_diff(w, o) for w, o in zip(wrong["theta"], out["theta"], strict=True)), 2e-3
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("sgd", "adamw")
  def test_first_step_is_sam_from_theta0(self, base_name):
    a, p0, targets = _problem(seed=3, num_steps=2)
    rho = 0.3
    tx = ire_optax.sala(make_optax_base(base_name), sync_period=3, slow_step_size=0.5, rho=rho)
    out = _run_sala(tx, a, p0, targets, variant=self.variant)

    def two_steps(sam_first):
      base = make_np_base(base_name)
      g = np_grad(a, p0, targets[0])
      if sam_first:
        gn = _norm(g)
        g = np_grad(a, {k: p0[k] + rho * g[k] / gn for k in p0}, targets[0])
      th1 = {k: p0[k] + v for k, v in base.step(g, p0).items()}
      th2 = {k: th1[k] + v for k, v in base.step(np_grad(a, th1, targets[1]), th1).items()}
      return th1, th2

    sam1, sam2 = two_steps(True)
    _, plain2 = two_steps(False)
    _close(out["theta"][0], sam1)
    _close(out["theta"][1], sam2)
    self.assertGreater(_max_diff(plain2, out["theta"][1]), 1e-3)
    self.assertEqual(int(out["stats"][0]["extra_grads"]), 1)
    self.assertEqual(int(out["stats"][1]["extra_grads"]), 1)
    _close(out["phi"][1], p0)  # mid-cycle: slow weights unchanged

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("sgd", "adamw")
  def test_alpha_one_rho_zero_is_base_optimizer(self, base_name):
    a, p0, targets = _problem(seed=4, num_steps=12)
    calls = []
    tx = ire_optax.sala(make_optax_base(base_name), sync_period=3, slow_step_size=1.0, rho=0.0)
    out = _run_sala(tx, a, p0, targets, variant=self.variant, calls=calls)
    base = make_np_base(base_name)
    theta = p0
    for t, c in enumerate(targets):
      theta = {k: theta[k] + v for k, v in base.step(np_grad(a, theta, c), theta).items()}
      _close(out["theta"][t], theta)
    self.assertEqual(len(calls), 0)
    self.assertEqual(int(out["stats"][-1]["extra_grads"]), 0)
    # Same as running optax's base directly.
    base_tx = make_optax_base(base_name)
    params = _to_jax(p0)
    bstate = base_tx.init(params)
    for t, c in enumerate(targets):
      g = jax.grad(functools.partial(jax_loss, _to_jax(a)))(params, _to_jax(c))
      u, bstate = base_tx.update(g, bstate, params)
      chex.assert_trees_all_close(out["updates"][t], u, rtol=1e-6, atol=1e-7)
      params = optax.apply_updates(params, u)


# -----------------------------------------------------------------------------
# Precision, devices, compositions
# -----------------------------------------------------------------------------


class SALABehaviourTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16(self):
    a, p0, targets = _problem(seed=5, num_steps=8)
    # rho far from the distances so both precisions take the same branches.
    for rho in (0.0, 3.0):
      tx = ire_optax.sala(make_optax_base("sgd"), sync_period=2, slow_step_size=0.5, rho=rho)
      lo = _run_sala(tx, a, p0, targets, variant=self.variant, dtype=jnp.bfloat16)
      hi = _run_sala(tx, a, p0, targets, variant=self.variant)
      state = lo["state"]
      for leaf in jax.tree.leaves((lo["updates"][-1], state.slow, lo["theta"][-1])):
        self.assertEqual(leaf.dtype, jnp.bfloat16)
      self.assertEqual(state.distance.dtype, jnp.float32)
      self.assertEqual(state.extra_grads.dtype, jnp.int32)
      chex.assert_tree_all_finite(lo["theta"])
      self.assertEqual(int(lo["stats"][-1]["extra_grads"]), int(hi["stats"][-1]["extra_grads"]))
      _close(lo["theta"][-1], hi["theta"][-1], rtol=5e-2, atol=5e-2)
      _close(lo["phi"][-1], hi["phi"][-1], rtol=5e-2, atol=5e-2)

  def test_state_dtypes_constant(self):
    a, p0, targets = _problem(seed=6, num_steps=3)
    tx = ire_optax.sala(make_optax_base("adamw"), sync_period=2, rho=0.2)
    params = _to_jax(p0)
    s0 = tx.init(params)
    out = _run_sala(tx, a, p0, targets, variant=jax.jit)
    chex.assert_trees_all_equal_dtypes(s0, out["state"])
    chex.assert_trees_all_equal_shapes(s0, out["state"])

  def test_params_and_state_can_both_be_donated(self):
    tx = ire_optax.sala(optax.sgd(0.1), sync_period=2)
    loss = lambda p: jnp.sum(p["w"] ** 2)

    def step(p, s):
      u, s = tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss))
      return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    params = {"w": jnp.arange(4.0)}
    state = tx.init(params)
    for _ in range(3):
      params, state = step(params, state)  # fails if the slow weights alias params
    chex.assert_tree_all_finite((params, state))

  def test_zero_gradient_no_nan(self):
    tx = ire_optax.sala(optax.sgd(0.1, momentum=0.9, nesterov=True), sync_period=1, rho=0.2)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    # A zero gradient computed from its argument (a grad_fn that ignores it is refused).
    zeros = lambda p: jax.tree.map(lambda x: 0.0 * x, p)
    step = jax.jit(lambda p, s: tx.update(zeros(p), s, p, grad_fn=zeros))
    for _ in range(3):
      u, state = step(params, state)
      params = optax.apply_updates(params, u)
    chex.assert_tree_all_finite((params, state))
    self.assertEqual(int(ire_optax.sala_stats(state)["extra_grads"]), 3)

  def test_pmap_axis_name_matches_single_device(self):
    n = jax.local_device_count()
    self.assertGreaterEqual(n, 2)
    num_steps, k = 10, 2
    a, p0, _ = _problem(seed=7, num_steps=1)
    rng = np.random.default_rng(0)
    # Per-device targets; the mean gradient is that of the mean target.
    dev_targets = [{kk: rng.normal(0, 1, (n, *s)) for kk, s in SHAPES.items()}
                   for _ in range(num_steps)]
    mean_targets = [{kk: v.mean(0) for kk, v in c.items()} for c in dev_targets]
    rho = 0.25
    base = make_optax_base("sgd")
    tx = ire_optax.sala(base, sync_period=k, slow_step_size=0.5, rho=rho, axis_name="i")
    a_j = _to_jax(a)

    @functools.partial(jax.pmap, axis_name="i")
    def step(params, state, c):
      grad = jax.grad(functools.partial(jax_loss, a_j))
      g = grad(params, c)  # local gradient; sala averages it
      u, state = tx.update(g, state, params, grad_fn=lambda p: grad(p, c))
      return optax.apply_updates(params, u), state

    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), _to_jax(p0))
    state = jax.pmap(tx.init)(params)
    for c in dev_targets:
      params, state = step(params, state, _to_jax(c))
    ref = np_sala(a, p0, mean_targets, make_np_base("sgd"), k=k, alpha=0.5, rho=rho)
    for i in range(n):
      _close(jax.tree.map(lambda x, i=i: x[i], params), ref["theta"][-1])
      _close(jax.tree.map(lambda x, i=i: x[i], ire_optax.sala_eval_params(state)),
             ref["phi"][-1])
    stats = ire_optax.sala_stats(state)
    np.testing.assert_array_equal(stats["extra_grads"], ref["extra"][-1])
    self.assertGreater(ref["extra"][-1], 0)
    self.assertLess(ref["extra"][-1], ref["cycles"][-1])  # both stages occurred

  def test_inject_hyperparams(self):
    a, p0, targets = _problem(seed=8, num_steps=10)
    rho, ref = _good_rho(a, p0, targets, "adamw", 2, 0.5)
    tx = optax.inject_hyperparams(ire_optax.sala)(
        make_optax_base("adamw"), sync_period=2, slow_step_size=0.5, rho=rho
    )
    out = _run_sala(tx, a, p0, targets, variant=jax.jit)
    _close(out["theta"][-1], ref["theta"][-1])
    _close(out["phi"][-1], ref["phi"][-1])
    self.assertEqual(int(out["stats"][-1]["extra_grads"]), ref["extra"][-1])
    # Changing rho in the state takes effect: rho = 0 means no more SAM steps.
    state = out["state"]
    state.hyperparams["rho"] = jnp.zeros_like(state.hyperparams["rho"])
    params = out["theta"][-1]
    g = jax.grad(functools.partial(jax_loss, _to_jax(a)))
    step = jax.jit(lambda p, s, c: tx.update(g(p, c), s, p, grad_fn=lambda q: g(q, c)))
    for c in targets[:6]:
      u, state = step(params, state, _to_jax(c))
      params = optax.apply_updates(params, u)
    # At most the cycle already decided at the last cycle end is stage 2.
    self.assertLessEqual(int(ire_optax.sala_stats(state)["extra_grads"]), ref["extra"][-1] + 1)
    self.assertEqual(int(ire_optax.sala_stats(state)["stage"]), 1)

  def test_rho_schedule_equals_constant(self):
    a, p0, targets = _problem(seed=9, num_steps=8)
    const = _run_sala(ire_optax.sala(make_optax_base("sgd"), rho=0.3), a, p0, targets, jax.jit)
    sched = _run_sala(ire_optax.sala(make_optax_base("sgd"), rho=optax.constant_schedule(0.3)),
                      a, p0, targets, jax.jit)
    chex.assert_trees_all_close(const["theta"], sched["theta"])

  def test_nested_state_helpers(self):
    params = {"w": jnp.arange(3.0)}
    inner = ire_optax.sala(optax.sgd(0.1), sync_period=3)
    wrapped = [
        optax.chain(optax.clip_by_global_norm(1.0), inner),
        optax.inject_hyperparams(ire_optax.sala)(optax.sgd(0.1), rho=0.1),
        optax.MultiSteps(inner, every_k_schedule=2),
        optax.chain(optax.MultiSteps(optax.chain(inner), every_k_schedule=2)),
    ]
    for tx in wrapped:
      state = tx.init(params)
      chex.assert_trees_all_close(ire_optax.sala_eval_params(state), params)
      stats = ire_optax.sala_stats(state)
      self.assertEqual(set(stats), {"distance", "stage", "extra_grads", "cycles",
                                    "stage2_fraction"})
      self.assertEqual(int(stats["stage"]), 2)
    with self.assertRaisesRegex(ValueError, "SALAState"):
      ire_optax.sala_eval_params(optax.sgd(0.1).init(params))
    with self.assertRaisesRegex(ValueError, "SALAState"):
      ire_optax.sala_stats(optax.adam(0.1).init(params))

  def test_multisteps_composition_runs(self):
    a, p0, targets = _problem(seed=11, num_steps=8)
    tx = optax.MultiSteps(ire_optax.sala(make_optax_base("sgd"), rho=0.3), every_k_schedule=2)
    out = _run_sala(tx, a, p0, targets, variant=jax.jit)
    chex.assert_tree_all_finite(out["theta"])
    self.assertEqual(int(out["stats"][-1]["cycles"]), 2)  # 4 inner steps, k = 2

  def test_nested_in_ire(self):
    if not hasattr(ire_optax, "ire"):
      pytest.skip("ire_optax.ire is not available yet")
    a, p0, targets = _problem(seed=12, num_steps=12)
    tx = ire_optax.ire(ire_optax.sala(make_optax_base("sgd"), rho=0.3), kappa=1.0, gamma=0.5)
    out = _run_sala(tx, a, p0, targets, variant=jax.jit)
    chex.assert_tree_all_finite(out["theta"])
    chex.assert_tree_all_finite(out["phi"])
    stats = out["stats"][-1]
    self.assertEqual(int(stats["cycles"]), 6)
    self.assertGreaterEqual(int(stats["extra_grads"]), 1)


class SALAValidationTest(chex.TestCase):

  @parameterized.parameters(
      dict(sync_period=0), dict(sync_period=-2), dict(sync_period=1.5),
      dict(slow_step_size=-0.1), dict(slow_step_size=1.5), dict(rho=-0.01),
      dict(slow_step_size=float("nan")),
  )
  def test_bad_hyperparameters(self, **kw):
    name = next(iter(kw))
    with self.assertRaisesRegex(ValueError, name):
      ire_optax.sala(optax.sgd(0.1), **kw)

  def test_bad_base(self):
    with self.assertRaisesRegex(TypeError, "base_optimizer"):
      ire_optax.sala(0.1)

  def test_missing_grad_fn_and_params(self):
    tx = ire_optax.sala(optax.sgd(0.1))
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    with self.assertRaisesRegex(TypeError, "grad_fn"):
      tx.update(params, state, params)
    with self.assertRaisesRegex(ValueError, "params"):
      tx.update(params, state, None, grad_fn=lambda p: p)

  def test_accepts_boundary_values(self):
    for kw in (dict(sync_period=1), dict(slow_step_size=0.0), dict(slow_step_size=1.0),
               dict(rho=0.0)):
      tx = ire_optax.sala(optax.sgd(0.1), **kw)
      self.assertIsInstance(tx, optax.GradientTransformationExtraArgs)

  def test_extra_args_forwarded_to_base(self):
    seen = {}

    def base_update(updates, state, params=None, **extra):
      seen.update(extra)
      return updates, state

    base = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), base_update)
    tx = ire_optax.sala(base)
    params = {"w": jnp.ones(2)}
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p, foo=3)
    self.assertEqual(seen, {"foo": 3})
    self.assertIs(sala_lib.SALAState, ire_optax.SALAState)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("sync_period", [1, 2, 3])
def test_rho_0_and_slow_step_size_1_is_the_base_optimizer(dtype, sync_period):
  """φ ← θ′ for α = 1 and no SAM step for ρ = 0: six jitted AdamW steps agree.

  Up to the last bit: XLA may fuse θ + Δ differently inside SALA's step and in
  ``optax.apply_updates`` (documented in docs/sala.md).
  """
  rng = np.random.default_rng(0)
  p0 = {"a": jnp.asarray(rng.normal(size=(4, 3)), dtype),
        "b": jnp.asarray(10 * rng.normal(size=3), dtype)}
  loss = lambda p: sum(jnp.sum(jnp.sin(x.astype(jnp.float32)) ** 2) for x in jax.tree.leaves(p))
  grad_fn = lambda p: jax.tree.map(lambda g, x: g.astype(x.dtype), jax.grad(loss)(p), p)
  base = optax.adamw(1e-2, weight_decay=1e-2)
  runs = []
  for tx in (optax.with_extra_args_support(base),
             ire_optax.sala(base, sync_period=sync_period, rho=0.0, slow_step_size=1.0)):

    @jax.jit
    def step(p, s, tx=tx):
      u, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, u), s

    p, s = p0, tx.init(p0)
    for _ in range(6):
      p, s = step(p, s)
    runs.append(jax.tree.map(lambda x: np.asarray(x, np.float64), p))
  chex.assert_trees_all_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)


def test_counters_saturate_at_int32_max():
  # Like `count` (optax.safe_int32_increment): the cycle and extra-gradient counters stop at
  # 2**31 - 1 rather than wrapping to negative values in sala_stats.
  top = np.iinfo(np.int32).max
  grad_fn = jax.grad(lambda p: jnp.sum(jnp.array([0.1, 1.0, 10.0]) * p**2))
  tx = ire_optax.sala(optax.sgd(0.01), sync_period=1, rho=100.0)  # every step a SAM start
  p = jnp.array([1.0, -2.0, 3.0])
  s = tx.init(p)._replace(count=jnp.int32(top - 1), cycles=jnp.int32(top - 1),
                          extra_grads=jnp.int32(top - 1))
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
  for _ in range(3):
    u, s = step(grad_fn(p), s, p)
    p = optax.apply_updates(p, u)
  stats = ire_optax.sala_stats(s)
  assert int(stats["cycles"]) == top and int(stats["extra_grads"]) == top
  assert 0.0 <= float(stats["stage2_fraction"]) <= 1.0
