"""Tests of ire_optax.sam (SAM / ASAM) and ire_optax.msam against a NumPy reference.

The reference below is written from the formulas in docs/design.md §1 with plain
NumPy (float64): the model's gradient is derived by hand, and the base
optimizers (SGD with momentum / Nesterov, AdamW with decoupled weight decay)
are written out. Nothing in it calls JAX, Optax or the code under test.
"""

from __future__ import annotations

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ire_optax
from ire_optax._src import utils
from ire_optax._src.sam import perturbed_params
from ire_optax._src.utils import tree_norm, tree_scaled_sum_sq
from tests.np_reference import NpAdamWTree as NpAdamW

# -----------------------------------------------------------------------------
# The model: a 2-layer tanh network with squared loss (mean over the batch)
# -----------------------------------------------------------------------------

D_IN, D_HID, D_OUT, BATCH = 5, 4, 3, 16


def make_problem(seed=0, batch=BATCH):
  rng = np.random.default_rng(seed)
  params = {
      "w1": rng.normal(size=(D_IN, D_HID)) * 0.7,
      "b1": rng.normal(size=(D_HID,)) * 0.1,
      "w2": rng.normal(size=(D_HID, D_OUT)) * 0.7,
  }
  x = rng.normal(size=(batch, D_IN))
  y = rng.normal(size=(batch, D_OUT))
  return params, x, y


def jax_loss(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  out = h @ p["w2"]
  return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


jax_grad = jax.grad(jax_loss)


def mb_grad(p, mb):
  """msam's grad_fn: (params, microbatch) -> gradient."""
  return jax_grad(p, mb["x"], mb["y"])


def to_jax(tree, dtype=jnp.float32):
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def to_np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ------------------------------- NumPy reference -----------------------------


def np_grad(p, x, y):
  h = np.tanh(x @ p["w1"] + p["b1"])
  out = h @ p["w2"]
  r = (out - y) / len(x)
  dz = (r @ p["w2"].T) * (1.0 - h**2)
  return {"w1": x.T @ dz, "b1": dz.sum(0), "w2": h.T @ r}


def np_perturbed(p, g, rho, *, adaptive=False, eta=0.0, eps=1e-12):
  if adaptive:
    t = {k: np.abs(p[k]) + eta for k in p}
  else:
    t = {k: np.ones_like(p[k]) for k in p}
  norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in p))
  return {k: p[k] + rho * t[k] ** 2 * g[k] / (norm + eps) for k in p}


class NpSGD:
  """optax.sgd(lr, momentum, nesterov): trace = g + μ trace; u = -lr (g + μ trace | trace)."""

  def __init__(self, lr, momentum=0.0, nesterov=False):
    self.lr, self.mu, self.nesterov, self.trace = lr, momentum, nesterov, None

  def step(self, g, p):
    del p
    if self.trace is None:
      self.trace = {k: np.zeros_like(v) for k, v in g.items()}
    self.trace = {k: g[k] + self.mu * self.trace[k] for k in g}
    d = {k: g[k] + self.mu * self.trace[k] for k in g} if self.nesterov else self.trace
    return {k: -self.lr * d[k] for k in g}


def np_sam_run(p, x, y, base, steps, rho, **kw):
  """Returns the list of parameters after each SAM step (same batch every step)."""
  out = []
  for t in range(steps):
    r = rho(t) if callable(rho) else rho
    g = np_grad(p, x, y)
    g_sam = np_grad(np_perturbed(p, g, r, **kw), x, y)
    u = base.step(g_sam, p)
    p = {k: p[k] + u[k] for k in p}
    out.append(p)
  return out


def np_msam_grad(p, x, y, m, rho, **kw):
  xs, ys = np.split(x, m), np.split(y, m)
  gs = [np_grad(np_perturbed(p, np_grad(p, a, b), rho, **kw), a, b)
        for a, b in zip(xs, ys, strict=True)]
  return {k: np.mean([g[k] for g in gs], axis=0) for k in p}


def np_msam_run(p, x, y, base, steps, rho, m, **kw):
  out = []
  for _ in range(steps):
    u = base.step(np_msam_grad(p, x, y, m, rho, **kw), p)
    p = {k: p[k] + u[k] for k in p}
    out.append(p)
  return out


# ------------------------------- JAX drivers ---------------------------------


def sam_step(tx):
  def step(params, state, x, y):
    g = jax_grad(params, x, y)
    u, state = tx.update(g, state, params, grad_fn=lambda q: jax_grad(q, x, y))
    return optax.apply_updates(params, u), state

  return step


def msam_step(tx):
  def step(params, state, x, y):
    u, state = tx.update(None, state, params, grad_fn=mb_grad, batch={"x": x, "y": y})
    return optax.apply_updates(params, u), state

  return step


def base_step(tx):
  def step(params, state, x, y):
    u, state = tx.update(jax_grad(params, x, y), state, params)
    return optax.apply_updates(params, u), state

  return step


def run(step, tx, params, x, y, steps):
  state = tx.init(params)
  out = []
  for _ in range(steps):
    params, state = step(params, state, x, y)
    out.append(params)
  return out, state


TOL = dict(rtol=2e-5, atol=2e-6)


# -----------------------------------------------------------------------------
# Agreement with the NumPy reference
# -----------------------------------------------------------------------------


class ReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("sam", False, 0.0, 0.1),
      ("asam", True, 0.0, 1.0),
      ("asam_eta", True, 0.01, 0.5),
  )
  def test_sam_sgd_momentum(self, adaptive, eta, rho):
    p0, x, y = make_problem()
    tx = ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=rho, adaptive=adaptive,
                       adaptive_eta=eta)
    got, _ = run(self.variant(sam_step(tx)), tx, to_jax(p0), to_jax(x), to_jax(y), 4)
    want = np_sam_run(p0, x, y, NpSGD(0.1, 0.9), 4, rho, adaptive=adaptive, eta=eta)
    for g, w in zip(got, want, strict=True):
      chex.assert_trees_all_close(to_np(g), w, **TOL)
    # The perturbation matters: plain SGD-momentum ends elsewhere.
    plain = np_sam_run(p0, x, y, NpSGD(0.1, 0.9), 4, 0.0)
    assert np.abs(plain[-1]["w1"] - want[-1]["w1"]).max() > 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  def test_sam_adamw_nesterov_and_schedule(self):
    p0, x, y = make_problem(1)
    rho = optax.linear_schedule(0.02, 0.2, transition_steps=3)
    rho_np = lambda t: 0.02 + (0.2 - 0.02) * min(t, 3) / 3
    for tx_base, np_base in [
        (optax.adamw(0.01, weight_decay=0.1), NpAdamW(0.01, wd=0.1)),
        (optax.sgd(0.05, momentum=0.8, nesterov=True), NpSGD(0.05, 0.8, nesterov=True)),
    ]:
      tx = ire_optax.sam(tx_base, rho=rho)
      got, _ = run(self.variant(sam_step(tx)), tx, to_jax(p0), to_jax(x), to_jax(y), 5)
      want = np_sam_run(p0, x, y, np_base, 5, rho_np)
      for g, w in zip(got, want, strict=True):
        chex.assert_trees_all_close(to_np(g), w, **TOL)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("vmap", "vmap", False, 0.05),
      ("scan", "scan", False, 0.05),
      ("unroll", "unroll", False, 0.05),
      ("adaptive_vmap", "vmap", True, 0.7),
  )
  def test_msam(self, mode, adaptive, rho):
    p0, x, y = make_problem(2)
    tx = ire_optax.msam(optax.sgd(0.1, momentum=0.9), rho=rho, num_microbatches=4,
                        adaptive=adaptive, microbatch_mode=mode)
    got, _ = run(self.variant(msam_step(tx)), tx, to_jax(p0), to_jax(x), to_jax(y), 4)
    want = np_msam_run(p0, x, y, NpSGD(0.1, 0.9), 4, rho, 4, adaptive=adaptive)
    for g, w in zip(got, want, strict=True):
      chex.assert_trees_all_close(to_np(g), w, **TOL)
    # mSAM differs from SAM on the same batch (the test can fail).
    sam_ref = np_sam_run(p0, x, y, NpSGD(0.1, 0.9), 4, rho, adaptive=adaptive)
    assert np.abs(sam_ref[-1]["w1"] - want[-1]["w1"]).max() > 1e-4

  def test_msam_modes_agree_with_schedule(self):
    p0, x, y = make_problem(3)
    rho = lambda t: 0.05 * (t + 1)
    res = []
    for mode in ("vmap", "scan", "unroll"):
      tx = ire_optax.msam(optax.sgd(0.1), rho=rho, num_microbatches=8, microbatch_mode=mode)
      res.append(run(jax.jit(msam_step(tx)), tx, to_jax(p0), to_jax(x), to_jax(y), 3)[0][-1])
    chex.assert_trees_all_close(res[0], res[1], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(res[0], res[2], rtol=1e-5, atol=1e-6)
    base, p = NpSGD(0.1), p0
    for t in range(3):
      u = base.step(np_msam_grad(p, x, y, 8, 0.05 * (t + 1)), p)
      p = {k: p[k] + u[k] for k in p}
    chex.assert_trees_all_close(to_np(res[0]), p, **TOL)


# -----------------------------------------------------------------------------
# Exactness and special cases
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: ire_optax.sam(optax.sgd(0.1), rho=0.0),
    lambda: ire_optax.sam(optax.sgd(0.1), rho=0.0, adaptive=True),
    lambda: ire_optax.gsam(optax.sgd(0.1), rho=0.0)], ids=["sam", "asam", "gsam"])
def test_rho_zero_evaluates_grad_fn_at_params_despite_a_nonfinite_gradient(make):
  """ρ = 0 gives θ exactly (docs/nonfinite.md) even where the clean gradient overflowed, where
  the unit direction is inf / inf = NaN and 0 · NaN would put NaN into the ascent point."""
  params = jnp.array([1.0, 2.0, 3.0])
  g = jnp.array([1.0, 2.0, jnp.inf])
  chex.assert_trees_all_equal(perturbed_params(params, g, 0.0), params)
  seen = []

  def grad_fn(p):
    jax.debug.callback(lambda q: seen.append(np.asarray(q)), p)
    return 2.0 * p

  tx = make()
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  chex.assert_trees_all_equal(seen[0], params)
  assert np.isfinite(np.asarray(updates)).all()


class ExactnessTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("sgd_f32", "sgd", jnp.float32, False),
      ("adamw_f32", "adamw", jnp.float32, False),
      ("sgd_bf16", "sgd", jnp.bfloat16, False),
      ("adamw_asam", "adamw", jnp.float32, True),
  )
  def test_rho_zero_is_base_bit_for_bit(self, base_name, dtype, adaptive):
    p0, x, y = make_problem(4)
    make = {
        "sgd": lambda: optax.sgd(0.1, momentum=0.9),
        "adamw": lambda: optax.adamw(0.01, weight_decay=0.1),
    }[base_name]
    params, x, y = to_jax(p0, dtype), to_jax(x, dtype), to_jax(y, dtype)
    tx = ire_optax.sam(make(), rho=0.0, adaptive=adaptive)
    got, _ = run(self.variant(sam_step(tx)), tx, params, x, y, 3)
    want, _ = run(self.variant(base_step(make())), make(), params, x, y, 3)
    for g, w in zip(got, want, strict=True):
      chex.assert_trees_all_equal(g, w)

  def test_msam_one_microbatch_equals_sam(self):
    p0, x, y = make_problem(5)
    params, x, y = to_jax(p0), to_jax(x), to_jax(y)
    for adaptive in (False, True):
      sam_tx = ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.3, adaptive=adaptive)
      for mode in ("vmap", "scan"):
        msam_tx = ire_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.3, adaptive=adaptive,
                                 num_microbatches=1, microbatch_mode=mode)
        a, _ = run(jax.jit(sam_step(sam_tx)), sam_tx, params, x, y, 3)
        b, _ = run(jax.jit(msam_step(msam_tx)), msam_tx, params, x, y, 3)
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16(self):
    p0, x, y = make_problem(6)
    params, xb, yb = to_jax(p0, jnp.bfloat16), to_jax(x, jnp.bfloat16), to_jax(y, jnp.bfloat16)
    for tx, step, want in [
        (ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.2), sam_step,
         np_sam_run(to_np(params), to_np(xb), to_np(yb), NpSGD(0.1, 0.9), 3, 0.2)),
        (ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=1.0, adaptive=True), sam_step,
         np_sam_run(to_np(params), to_np(xb), to_np(yb), NpSGD(0.1, 0.9), 3, 1.0,
                    adaptive=True)),
        (ire_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.2, num_microbatches=4), msam_step,
         np_msam_run(to_np(params), to_np(xb), to_np(yb), NpSGD(0.1, 0.9), 3, 0.2, 4)),
    ]:
      state0 = tx.init(params)
      got, state = run(self.variant(step(tx)), tx, params, xb, yb, 3)
      for g in got:
        chex.assert_trees_all_equal_dtypes(g, params)
        chex.assert_tree_all_finite(g)
      chex.assert_trees_all_equal_structs(state, state0)
      chex.assert_trees_all_equal_dtypes(state, state0)
      chex.assert_trees_all_close(to_np(got[-1]), want[-1], rtol=5e-2, atol=5e-2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_gradient_no_nan(self):
    params = {"a": jnp.zeros((3,)), "b": jnp.ones((2, 2))}
    # A zero gradient computed from its argument (a grad_fn that ignores it is refused).
    zero = lambda q, *_: jax.tree.map(lambda x: 0.0 * x, q)
    for adaptive in (False, True):
      tx = ire_optax.sam(optax.sgd(0.1), rho=0.5, adaptive=adaptive)
      u, _ = self.variant(
          lambda p, s, tx=tx: tx.update(zero(p), s, p, grad_fn=zero)
      )(params, tx.init(params))
      chex.assert_tree_all_finite(u)
      chex.assert_trees_all_equal(u, zero(params))
      mtx = ire_optax.msam(optax.sgd(0.1), rho=0.5, adaptive=adaptive, num_microbatches=2)
      u, _ = self.variant(
          lambda p, s, mtx=mtx: mtx.update(None, s, p, grad_fn=zero, batch=jnp.ones((4, 1)))
      )(params, mtx.init(params))
      chex.assert_tree_all_finite(u)
      chex.assert_trees_all_equal(u, zero(params))

  def test_grad_fn_is_evaluated_once_per_pass(self):
    p0, x, y = make_problem(7)
    params, x, y = to_jax(p0), to_jax(x), to_jax(y)
    calls = []

    def counting(q, *args):
      calls.append(1)
      return mb_grad(q, *args) if args else jax_grad(q, x, y)

    tx = ire_optax.sam(optax.sgd(0.1), rho=0.1)
    jax.jit(lambda p, s: tx.update(jax_grad(p, x, y), s, p, grad_fn=counting))(
        params, tx.init(params))
    assert len(calls) == 1
    for mode in ("vmap", "scan", "unroll"):
      calls.clear()
      tx = ire_optax.msam(optax.sgd(0.1), rho=0.1, num_microbatches=4, microbatch_mode=mode)
      jaxpr = jax.make_jaxpr(
          lambda p, s, tx=tx: tx.update(None, s, p, grad_fn=counting, batch={"x": x, "y": y})
      )(params, tx.init(params))
      assert len(calls) == 2, (mode, len(calls))  # clean + perturbed, over all micro-batches
      prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
      assert ("scan" in prims) == (mode != "vmap")

  def test_peak_memory_at_most_one_extra_param_buffer(self):
    # A model whose memory is dominated by its parameters.
    d = 512
    params = {"w1": jnp.full((d, d), 0.01), "w2": jnp.full((d, 4), 0.01)}
    x = jnp.ones((2, d))
    loss = lambda p: jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"]) ** 2)
    param_bytes = sum(v.nbytes for v in jax.tree.leaves(params))

    def peak(tx, sam):
      def step(p, s):
        kw = {"grad_fn": jax.grad(loss)} if sam else {}
        u, s = tx.update(jax.grad(loss)(p), s, p, **kw)
        return optax.apply_updates(p, u), s

      m = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params)).compile()
      m = m.memory_analysis()
      return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
              - m.alias_size_in_bytes)

    base = peak(optax.sgd(0.1, momentum=0.9), False)
    for adaptive in (False, True):
      extra = peak(ire_optax.sam(optax.sgd(0.1, momentum=0.9), adaptive=adaptive), True) - base
      assert extra <= 1.02 * param_bytes, (adaptive, extra / param_bytes)


# -----------------------------------------------------------------------------
# Multiple devices
# -----------------------------------------------------------------------------


NDEV = 8


@pytest.fixture(scope="module")
def devices():
  if jax.device_count() < NDEV:
    pytest.skip(f"needs {NDEV} (emulated) devices")
  return jax.devices()[:NDEV]


def _shard(a):
  return a.reshape((NDEV, -1) + a.shape[1:])


def _replicate(tree):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (NDEV,) + a.shape), tree)


def test_msam_m_microbatches_equals_m_devices(devices):
  p0, x, y = make_problem(8)
  params, x, y = to_jax(p0), to_jax(x), to_jax(y)
  rho, steps = 0.3, 3
  one = ire_optax.msam(optax.sgd(0.1, momentum=0.9), rho=rho, num_microbatches=NDEV)
  want, _ = run(jax.jit(msam_step(one)), one, params, x, y, steps)

  np_want = np_msam_run(p0, to_np(x), to_np(y), NpSGD(0.1, 0.9), steps, rho, NDEV)
  chex.assert_trees_all_close(to_np(want[-1]), np_want[-1], **TOL)

  for tx, step in [
      (ire_optax.msam(optax.sgd(0.1, momentum=0.9), rho=rho, num_microbatches=1,
                      axis_name="d"), msam_step),
      (ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=rho, axis_name="d",
                     per_device_ascent=True), sam_step),
  ]:
    pstep = jax.pmap(step(tx), axis_name="d", devices=devices)
    p, s = _replicate(params), jax.pmap(tx.init, devices=devices)(_replicate(params))
    for t in range(steps):
      p, s = pstep(p, s, _shard(x), _shard(y))
      for dev in range(NDEV):
        chex.assert_trees_all_close(jax.tree.map(lambda a, dev=dev: a[dev], p), want[t],
                                    rtol=1e-5, atol=1e-6)


def test_global_sam_under_pmap_and_shard_map_equals_one_device(devices):
  p0, x, y = make_problem(9)
  params, x, y = to_jax(p0), to_jax(x), to_jax(y)
  tx = ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.3, axis_name="d")
  want = np_sam_run(p0, to_np(x), to_np(y), NpSGD(0.1, 0.9), 3, 0.3)

  pstep = jax.pmap(sam_step(tx), axis_name="d", devices=devices)
  p, s = _replicate(params), jax.pmap(tx.init, devices=devices)(_replicate(params))
  for _ in range(3):
    p, s = pstep(p, s, _shard(x), _shard(y))
  chex.assert_trees_all_close(to_np(jax.tree.map(lambda a: a[3], p)), want[-1], **TOL)

  # The same with shard_map over a mesh; per-device ascent gives mSAM(m = 8).
  mesh = Mesh(np.array(devices), ("d",))
  for per_device, ref in [
      (False, want[-1]),
      (True, np_msam_run(p0, to_np(x), to_np(y), NpSGD(0.1, 0.9), 3, 0.3, NDEV)[-1]),
  ]:
    tx = ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.3, axis_name="d",
                       per_device_ascent=per_device)
    sstep = jax.jit(jax.shard_map(sam_step(tx), mesh=mesh, in_specs=(P(), P(), P("d"), P("d")),
                                  out_specs=(P(), P()), check_vma=False))
    q, s = params, tx.init(params)
    for _ in range(3):
      q, s = sstep(q, s, x, y)
    chex.assert_trees_all_close(to_np(q), ref, **TOL)


def test_sharded_jit_without_axis_name_matches_one_device(devices):
  p0, x, y = make_problem(10)
  params, x, y = to_jax(p0), to_jax(x), to_jax(y)
  mesh = Mesh(np.array(devices).reshape(2, 4), ("a", "b"))
  for tx, step in [
      (ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.3, adaptive=True), sam_step),
      (ire_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.3, num_microbatches=4), msam_step),
  ]:
    want, _ = run(jax.jit(step(tx)), tx, params, x, y, 2)
    data = NamedSharding(mesh, P(("a", "b")))
    ps = jax.device_put(params, {"w1": NamedSharding(mesh, P(None, "b")),
                                 "b1": NamedSharding(mesh, P()),
                                 "w2": NamedSharding(mesh, P())})
    got, _ = run(jax.jit(step(tx)), tx, ps, jax.device_put(x, data), jax.device_put(y, data), 2)
    chex.assert_trees_all_close(got[-1], want[-1], rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# Compositions
# -----------------------------------------------------------------------------


class CompositionTest(chex.TestCase):

  def test_inject_hyperparams(self):
    p0, x, y = make_problem(11)
    params, xj, yj = to_jax(p0), to_jax(x), to_jax(y)
    tx = optax.inject_hyperparams(ire_optax.sam)(optax.sgd(0.1, momentum=0.9), rho=0.1,
                                                  adaptive=True)
    step = jax.jit(sam_step(tx))
    state = tx.init(params)
    params, state = step(params, state, xj, yj)
    state.hyperparams["rho"] = jnp.asarray(0.5)
    params, state = step(params, state, xj, yj)
    base, p = NpSGD(0.1, 0.9), p0
    for r in (0.1, 0.5):
      g = np_grad(p, x, y)
      u = base.step(np_grad(np_perturbed(p, g, r, adaptive=True), x, y), p)
      p = {k: p[k] + u[k] for k in p}
    chex.assert_trees_all_close(to_np(params), p, **TOL)

    mtx = optax.inject_hyperparams(ire_optax.msam, static_args=("num_microbatches",))(
        optax.sgd(0.1), rho=0.2, num_microbatches=4)
    got, _ = run(jax.jit(msam_step(mtx)), mtx, to_jax(p0), xj, yj, 2)
    want = np_msam_run(p0, x, y, NpSGD(0.1), 2, 0.2, 4)
    chex.assert_trees_all_close(to_np(got[-1]), want[-1], **TOL)
    with pytest.raises(TypeError, match="static_args"):
      bad = optax.inject_hyperparams(ire_optax.msam)(optax.sgd(0.1), num_microbatches=4)
      jax.jit(msam_step(bad))(to_jax(p0), bad.init(to_jax(p0)), xj, yj)

  def test_chain_and_forwarding(self):
    p0, x, y = make_problem(12)
    params, xj, yj = to_jax(p0), to_jax(x), to_jax(y)
    seen = {}

    def spy_base():
      sgd = optax.sgd(0.1)

      def update(updates, state, params=None, **extra):
        seen.update(extra)
        return sgd.update(updates, state, params)

      return optax.GradientTransformationExtraArgs(sgd.init, update)

    # sam consumes grad_fn and forwards everything else to its base.
    tx = optax.chain(ire_optax.sam(spy_base(), rho=0.1), optax.scale(0.5))
    state = tx.init(params)
    u, _ = tx.update(jax_grad(params, xj, yj), state, params,
                     grad_fn=lambda q: jax_grad(q, xj, yj), tag=3)
    assert seen == {"tag": 3}
    g = np_grad(p0, x, y)
    gs = np_grad(np_perturbed(p0, g, 0.1), x, y)
    chex.assert_trees_all_close(to_np(u), {k: -0.05 * gs[k] for k in gs}, **TOL)

    seen.clear()
    mtx = ire_optax.msam(spy_base(), rho=0.1, num_microbatches=2)
    mtx.update(None, mtx.init(params), params, grad_fn=mb_grad, batch={"x": xj, "y": yj},
               tag=4)
    assert seen == {"tag": 4}

  def test_multisteps(self):
    p0, x, y = make_problem(13)
    params, xj, yj = to_jax(p0), to_jax(x), to_jax(y)
    halves = [(xj[:8], yj[:8]), (xj[8:], yj[8:])]
    np_halves = [(x[:8], y[:8]), (x[8:], y[8:])]

    # sam(MultiSteps(base)): every mini-batch's SAM gradient is accumulated.
    tx = ire_optax.sam(optax.MultiSteps(optax.sgd(0.1, momentum=0.9), every_k_schedule=2),
                       rho=0.2)
    step = jax.jit(sam_step(tx))
    state, p = tx.init(params), params
    for _ in range(2):
      for a, b in halves:
        p, state = step(p, state, a, b)
    base, q = NpSGD(0.1, 0.9), p0
    for _ in range(2):
      gs = [np_grad(np_perturbed(q, np_grad(q, a, b), 0.2), a, b) for a, b in np_halves]
      u = base.step({k: (gs[0][k] + gs[1][k]) / 2 for k in q}, q)
      q = {k: q[k] + u[k] for k in q}
    chex.assert_trees_all_close(to_np(p), q, **TOL)

    # MultiSteps(sam(base)): the ascent uses the accumulated gradient and the
    # last mini-batch's grad_fn (documented; runs and is finite).
    tx = optax.MultiSteps(ire_optax.sam(optax.sgd(0.1), rho=0.2), every_k_schedule=2)
    step = jax.jit(sam_step(tx))
    state, p = tx.init(params), params
    for a, b in halves:
      p, state = step(p, state, a, b)
    g_acc = {k: (np_grad(p0, *np_halves[0])[k] + np_grad(p0, *np_halves[1])[k]) / 2 for k in p0}
    gs = np_grad(np_perturbed(p0, g_acc, 0.2), *np_halves[1])
    chex.assert_trees_all_close(to_np(p), {k: p0[k] - 0.1 * gs[k] for k in p0}, **TOL)

  def test_apply_if_finite(self):
    params = {"w": jnp.ones(3)}
    good = lambda q: jax.tree.map(lambda a: 2.0 * a, q)
    bad = lambda q: jax.tree.map(lambda a: a * jnp.nan, q)
    # Outside: checks the clean gradient.
    tx = optax.apply_if_finite(ire_optax.sam(optax.sgd(0.1), rho=0.1), max_consecutive_errors=3)
    s = tx.init(params)
    u, s = jax.jit(lambda p, s: tx.update(bad(p), s, p, grad_fn=good))(params, s)
    chex.assert_trees_all_equal(u, {"w": jnp.zeros(3)})
    assert int(s.total_notfinite) == 1
    u, s = jax.jit(lambda p, s: tx.update(good(p), s, p, grad_fn=good))(params, s)
    chex.assert_tree_all_finite(u)
    assert float(jnp.abs(u["w"]).max()) > 0
    # Inside: checks the SAM / mSAM gradient.
    for tx, kw, upd in [
        (ire_optax.sam(optax.apply_if_finite(optax.sgd(0.1), 3), rho=0.1),
         {"grad_fn": bad}, good(params)),
        (ire_optax.msam(optax.apply_if_finite(optax.sgd(0.1), 3), rho=0.1, num_microbatches=2),
         {"grad_fn": lambda q, mb: bad(q), "batch": jnp.ones((4, 2))}, None),
    ]:
      u, s = jax.jit(lambda p, s, tx=tx, kw=kw, upd=upd: tx.update(upd, s, p, **kw))(
          params, tx.init(params))
      chex.assert_trees_all_equal(u, {"w": jnp.zeros(3)})
      assert int(s.base_state.total_notfinite) == 1

  def test_state_is_checkpointable_arrays(self):
    params = to_jax(make_problem()[0])
    for tx in [ire_optax.sam(optax.adamw(1e-3)), ire_optax.msam(optax.adam(1e-3),
                                                                 num_microbatches=2)]:
      state = tx.init(params)
      assert isinstance(state, ire_optax.SAMState)
      assert state.count.dtype == jnp.int32 and state.count.shape == ()
      for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array)


# -----------------------------------------------------------------------------
# SAM-IRE: ire(sam(...)), the IRE mask from the clean gradient
# -----------------------------------------------------------------------------


def test_sam_ire_nesting():
  ire = getattr(ire_optax, "ire", None)
  if ire is None:
    pytest.skip("ire_optax.ire is not available yet")
  p0, x, y = make_problem(14)
  kappa, gamma, k_every, rho, steps = 2.0, 0.7, 2, 0.2, 5
  tx = ire(ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=rho), kappa=kappa, gamma=gamma,
           refresh_every=k_every, curvature="grad_sq")
  got, _ = run(jax.jit(sam_step(tx)), tx, to_jax(p0), to_jax(x), to_jax(y), steps)

  base, p, mask = NpSGD(0.1, 0.9), p0, None
  keys = sorted(p0)
  n = sum(p0[k].size for k in keys)
  for t in range(steps):
    g = np_grad(p, x, y)
    if t % k_every == 0:  # mask from the clean gradient, at the unperturbed point
      h = np.concatenate([(g[k] ** 2).ravel() for k in keys])
      tau = np.sort(h)[max(1, int(np.floor(gamma * n))) - 1]
      mask = {k: (g[k] ** 2 <= tau).astype(np.float64) for k in keys}
    u = base.step(np_grad(np_perturbed(p, g, rho), x, y), p)
    p = {k: p[k] + (1.0 + kappa * mask[k]) * u[k] for k in keys}
    chex.assert_trees_all_close(to_np(got[t]), p, **TOL)
  # IRE changed something.
  plain = np_sam_run(p0, x, y, NpSGD(0.1, 0.9), steps, rho)
  assert np.abs(plain[-1]["w1"] - p["w1"]).max() > 1e-3


# -----------------------------------------------------------------------------
# Bad input
# -----------------------------------------------------------------------------


def test_bad_input():
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="rho"):
    ire_optax.sam(sgd, rho=-0.1)
  with pytest.raises(ValueError, match="rho"):
    ire_optax.msam(sgd, rho=-1.0, num_microbatches=2)
  with pytest.raises(ValueError, match="adaptive_eta"):
    ire_optax.sam(sgd, adaptive=True, adaptive_eta=-1.0)
  with pytest.raises(ValueError, match="num_microbatches"):
    ire_optax.msam(sgd, num_microbatches=0)
  with pytest.raises(ValueError, match="num_microbatches"):
    ire_optax.msam(sgd, num_microbatches=2.5)
  with pytest.raises(TypeError, match="num_microbatches"):
    ire_optax.msam(sgd)  # required
  with pytest.raises(ValueError, match="microbatch_mode"):
    ire_optax.msam(sgd, num_microbatches=2, microbatch_mode="loop")
  with pytest.raises(ValueError, match="per_device_ascent"):
    ire_optax.sam(sgd, per_device_ascent=True)
  with pytest.raises(TypeError, match="base_optimizer"):
    ire_optax.sam("sgd")
  ire_optax.sam(sgd, rho=lambda t: 0.1 * t)  # schedules are not checked

  params = {"w": jnp.ones(3)}
  tx = ire_optax.sam(sgd)
  with pytest.raises(TypeError, match="grad_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(TypeError, match="grad_fn"):
    tx.update(params, tx.init(params), params, grad_fn=3)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params), grad_fn=lambda q: q)
  with pytest.raises(TypeError, match="updates"):
    tx.update(None, tx.init(params), params, grad_fn=lambda q: q)

  mtx = ire_optax.msam(sgd, num_microbatches=3)
  gf = lambda q, mb: q
  with pytest.raises(TypeError, match="grad_fn"):
    mtx.update(None, mtx.init(params), params, batch=jnp.ones((6, 2)))
  with pytest.raises(TypeError, match="batch"):
    mtx.update(None, mtx.init(params), params, grad_fn=gf)
  with pytest.raises(ValueError, match=r"`batch` \(8\).*`num_microbatches` \(3\)"):
    jax.jit(lambda p, b: mtx.update(None, mtx.init(p), p, grad_fn=gf, batch=b))(
        params, {"x": jnp.ones((8, 2))})
  with pytest.raises(ValueError, match="leading batch size"):
    mtx.update(None, mtx.init(params), params, grad_fn=gf,
               batch={"x": jnp.ones((6, 2)), "y": jnp.ones((9,))})
  with pytest.raises(ValueError, match="scalar"):
    mtx.update(None, mtx.init(params), params, grad_fn=gf, batch={"x": jnp.ones(())})


_SCALES = (0.0, 1e-36, 1e-30, 1e-19, 1e-10, 1.0, 1e10, 1e19, 1e20, 1e30, 1e36)


@contextlib.contextmanager
def _norm_path(path):
  """``tree_scaled_sum_sq`` as the CPU runs it (two passes) or, on this CPU, as TPU and GPU
  do (one pass: ``"accelerator"``)."""
  saved = utils._sum_sq_two_passes
  if path == "accelerator":
    utils._sum_sq_two_passes = utils._sum_sq_one_pass
  try:
    yield
  finally:
    utils._sum_sq_two_passes = saved


@settings(max_examples=40, deadline=None)
@given(scales=st.lists(st.sampled_from(_SCALES), min_size=3, max_size=3),
       seed=st.integers(0, 2**16), path=st.sampled_from(["cpu", "accelerator"]))
def test_ascent_and_norm_match_float64_numpy_at_every_scale(scales, seed, path):
  """θ + ε and ‖g‖ match a float64 NumPy reference for gradients from 1e-37 to 1e36, leaves
  of mixed scales, by either of ``utils.tree_scaled_sum_sq``'s paths (the accelerators' one
  pass over g: ``s`` a power of two)."""
  rng = np.random.default_rng(seed)
  # Entries of magnitude 0.5-2 times the leaf's scale (float32 normals: XLA flushes denormals).
  g = {k: (rng.choice([-1, 1], size=n) * rng.uniform(0.5, 2, size=n) * s).astype(np.float32)
       for k, n, s in zip("abc", (5, 7, 1), scales, strict=True)}
  p = {k: np.zeros_like(v) for k, v in g.items()}  # θ = 0: θ + ε is the unit ascent
  g64 = jax.tree.map(lambda a: np.asarray(a, np.float64), g)
  with _norm_path(path):
    out = perturbed_params(p, g, 1.0)
    got_norm = float(tree_norm(g))
    s, q = tree_scaled_sum_sq(g)
  chex.assert_trees_all_close(out, np_perturbed(jax.tree.map(np.float64, p), g64, 1.0),
                              rtol=1e-5, atol=1e-6)
  norm = np.sqrt(sum(np.sum(v ** 2) for v in g64.values()))
  np.testing.assert_allclose(got_norm, norm, rtol=1e-5)
  tiny, big = np.finfo(np.float32).tiny, np.finfo(np.float32).max
  assert q == 0 or tiny <= q <= big  # neither overflowing nor underflowing
  assert path == "cpu" or float(np.log2(float(s))).is_integer()


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
def test_scaled_sum_sq_nonfinite_and_empty(path):
  """A NaN gives q NaN, an inf q inf, a zero tree and an empty one q = 0, on either path."""
  cases = {"nan": ([1.0, np.nan], np.isnan), "inf": ([1.0, -np.inf], np.isposinf),
           "zero": ([0.0, 0.0], lambda q: q == 0), "empty": ([], lambda q: q == 0)}
  with _norm_path(path):
    for name, (values, ok) in cases.items():
      s, q = jax.jit(tree_scaled_sum_sq)({"a": jnp.asarray(values, jnp.float32)})
      assert ok(float(q)) and np.isfinite(float(s)) and float(s) > 0, (name, s, q)


@pytest.mark.parametrize("eps", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_asam_eps_enters_the_denominator_once(eps, eta):
  """ε = ρ T² g / (‖T g‖ + eps) with an eps that is not negligible beside ‖T g‖."""
  rng = np.random.default_rng(7)
  p = {k: rng.standard_normal(n).astype(np.float32) for k, n in (("a", 5), ("b", 3))}
  g = {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in p.items()}
  f64 = lambda t: jax.tree.map(np.float64, t)
  want = np_perturbed(f64(p), f64(g), 0.7, adaptive=True, eta=eta, eps=eps)
  got = perturbed_params(p, g, 0.7, adaptive=True, adaptive_eta=eta, eps=eps)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  # SAM's eps, for comparison (T = 1).
  chex.assert_trees_all_close(perturbed_params(p, g, 0.7, eps=eps),
                              np_perturbed(f64(p), f64(g), 0.7, eps=eps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_float64_norms_hold_beyond_float32s_range(path, scale):
  """A float64 norm of 5e200 (or 5e-200) neither overflows nor underflows, on either path;
  SAM's and ASAM's ascent along a gradient of 1e200 is the unit direction."""
  with jax.enable_x64(True), _norm_path(path):
    g = {"w": np.array([3.0, 4.0]) * scale}
    np.testing.assert_allclose(float(tree_norm(g)), 5 * scale, rtol=1e-12)
    if scale > 1:
      for adaptive in (False, True):  # T = |θ| = 1 for ASAM: ε = g / ‖g‖ either way
        out = perturbed_params({"w": np.ones(2)}, g, 1.0, adaptive=adaptive)
        np.testing.assert_allclose(np.asarray(out["w"]), [1.6, 1.8], rtol=1e-12)
        assert out["w"].dtype == np.float64


def test_python_number_aux_init_gives_a_state_of_fixed_types():
  """aux_init=0.0 (a Python number) makes a strongly typed state: one compilation of the step."""
  tx = ire_optax.sam(optax.sgd(0.1), rho=0.1, has_aux=True, aux_init=(0.0, 0))
  params = {"w": jnp.ones(3)}
  grad_fn = lambda q: (jax.tree.map(lambda w: 2 * w, q), (jnp.sum(q["w"]), jnp.int32(1)))
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    u, state = tx.update(jax.tree.map(lambda w: 2 * w, params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  assert not any(jax.typeof(x).weak_type for x in jax.tree.leaves(state))
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


@pytest.mark.parametrize("make", [lambda: ire_optax.sam(optax.sgd(0.1), rho=0.1, has_aux=True,
                                                        aux_init=jnp.int32(0), axis_name="d"),
                                  lambda: ire_optax.gsam(optax.sgd(0.1), rho=0.1, has_aux=True,
                                                         aux_init=jnp.int32(0), axis_name="d")])
def test_an_integer_aux_averaged_over_devices_is_refused(make):
  """The aux is averaged over ``axis_name``: an integer one would be truncated (1.75 -> 1)."""
  tx = make()
  params = {"w": jnp.ones(3)}
  grad_fn = lambda q: (q, jnp.int32(1))

  def step(params, dev):
    del dev
    return tx.update(params, tx.init(params), params, grad_fn=grad_fn)

  with pytest.raises(TypeError, match="aux leaves of `grad_fn` must be floating point"):
    jax.vmap(step, in_axes=(None, 0), axis_name="d")(params, jnp.arange(4))



@pytest.mark.parametrize("mode", ["vmap", "scan", "unroll"])
def test_msam_exports_with_a_symbolic_batch_size(mode):
  """jax.export with a batch of symbolic size 2*b (2 micro-batches): one exported step serves
  every such batch and equals the jitted step; a size 'b' is refused, naming the fix."""
  loss = lambda p, mb: jnp.mean((mb["x"] @ p - mb["y"]) ** 2)
  tx = ire_optax.msam(optax.sgd(0.1), rho=0.05, num_microbatches=2, microbatch_mode=mode)
  params = jnp.asarray([0.5, -1.0, 2.0])

  def step(p, s, batch):
    u, s = tx.update(None, s, p, grad_fn=jax.grad(loss), batch=batch)
    return optax.apply_updates(p, u), s

  def spec(dim):
    return {"x": jax.ShapeDtypeStruct((dim, 3), jnp.float32),
            "y": jax.ShapeDtypeStruct((dim,), jnp.float32)}

  state = tx.init(params)
  exported = jax.export.export(jax.jit(step))(params, state, spec(
      jax.export.symbolic_shape("2*b")[0]))
  rng = np.random.default_rng(0)
  for n in (4, 10):
    batch = {"x": jnp.asarray(rng.standard_normal((n, 3)), jnp.float32),
             "y": jnp.asarray(rng.standard_normal(n), jnp.float32)}
    chex.assert_trees_all_close(exported.call(params, state, batch),
                                jax.jit(step)(params, state, batch), rtol=1e-6)
  with pytest.raises(ValueError, match="symbolic size such as '2\\*b'"):
    jax.export.export(jax.jit(step))(params, state, spec(jax.export.symbolic_shape("b")[0]))


if __name__ == "__main__":
  absltest.main()
