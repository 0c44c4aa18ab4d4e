"""GSAM and SAM every k steps against plain-NumPy references (tests/np_sam_family.py)."""

from __future__ import annotations

import doctest
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ire_optax
from ire_optax._src import gsam as gsam_lib
from ire_optax._src import utils
from tests import np_sam_family as ref

P = jax.sharding.PartitionSpec
STEPS = 5
TOL = dict(rtol=2e-5, atol=2e-6)


def jax_loss(p, x, y):
  z = (x @ p["w"] + p["b"]) * p["s"]
  return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


jax_grad = jax.grad(jax_loss)


def problem(seed=0, batch=16, num_batches=3):
  params, x, y = ref.make_problem(seed, batch=batch * num_batches)
  batches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch])
             for i in range(num_batches)]
  return params, batches


def to_jax(tree, dtype=jnp.float32):
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def run(tx, params, batches, steps=STEPS, *, jit=True, calls=None, has_aux=False):
  """Runs ``steps`` steps of a SAM-convention optimizer; returns params after each step.

  ``has_aux``: ``grad_fn`` returns ``(gradient, 0.0)`` (an optimizer built with has_aux).
  """
  def step(p, s, x, y):
    def grad_fn(q):
      if calls is not None:
        calls.append(1)
      g = jax_grad(q, x, y)
      return (g, jnp.zeros((), jnp.float32)) if has_aux else g
    u, s = tx.update(jax_grad(p, x, y), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  step = jax.jit(step) if jit else step
  p, s = to_jax(params), tx.init(to_jax(params))
  out = []
  for t in range(steps):
    x, y = batches[t % len(batches)]
    p, s = step(p, s, jnp.asarray(x, jnp.float32), jnp.asarray(y))
    out.append(p)
  return out, s


def assert_close_to_np(got, want, **tol):
  for g, w in zip(got, want, strict=True):
    chex.assert_trees_all_close(jax.tree.map(np.asarray, g), w, **(tol or TOL))


# -----------------------------------------------------------------------------
# GSAM
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_gsam_matches_numpy(base, jit):
  params, batches = problem()
  if base == "sgd":
    tx_base, np_base = optax.sgd(0.2, momentum=0.9), ref.NpSGDTree(0.2, momentum=0.9)
  else:
    tx_base, np_base = optax.adamw(0.01, weight_decay=1e-2), ref.NpAdamWTree(0.01, wd=1e-2)
  got, _ = run(ire_optax.gsam(tx_base, rho=0.3, alpha=0.4), params, batches, jit=jit)
  want = ref.np_run(params, batches, np_base, STEPS, rho=0.3, alpha=0.4)
  assert_close_to_np(got, want)
  # The gap term matters: SAM is measurably elsewhere.
  sam_ref = ref.np_run(params, batches, ref.NpSGDTree(0.2, momentum=0.9) if base == "sgd"
                       else ref.NpAdamWTree(0.01, wd=1e-2), STEPS, rho=0.3)
  assert np.abs(want[-1]["w"] - sam_ref[-1]["w"]).max() > 1e-4


def test_gsam_adaptive_and_schedules_match_numpy():
  params, batches = problem(1)
  lr = optax.linear_schedule(0.3, 0.03, STEPS)
  rho = ire_optax.lr_proportional(lr, max_value=0.5, min_value=0.1, lr_max=0.3, lr_min=0.03)
  alpha = optax.linear_schedule(0.1, 0.5, STEPS)
  tx = ire_optax.gsam(optax.sgd(lr), rho=rho, alpha=alpha, adaptive=True, adaptive_eta=0.01)
  got, _ = run(tx, params, batches)
  np_rho = lambda t: 0.1 + 0.4 * (float(lr(t)) - 0.03) / 0.27
  np_alpha = lambda t: float(alpha(t))
  want = ref.np_run(params, batches, ref.NpSGDTree(lr), STEPS, rho=np_rho, alpha=np_alpha,
                    adaptive=True, eta=0.01)
  assert_close_to_np(got, want)


def test_gsam_alpha_zero_is_sam_and_rho_zero_is_base_bit_for_bit():
  params, batches = problem(2)
  base = optax.adamw(0.01)
  g0, _ = run(ire_optax.gsam(base, rho=0.2, alpha=0.0), params, batches)
  s0, _ = run(ire_optax.sam(base, rho=0.2), params, batches)
  chex.assert_trees_all_equal(g0, s0)
  g1, _ = run(ire_optax.gsam(base, rho=0.0, alpha=0.5), params, batches)
  b1, _ = run(ire_optax.sam(base, rho=0.0), params, batches)
  chex.assert_trees_all_equal(g1, b1)


def test_surrogate_gap_gradient_formula_and_zero_gradients():
  rng = np.random.default_rng(3)
  g = {"a": rng.standard_normal(4), "b": rng.standard_normal((2, 3))}
  gp = {"a": rng.standard_normal(4), "b": rng.standard_normal((2, 3))}
  got = gsam_lib.surrogate_gap_gradient(to_jax(g), to_jax(gp), 0.7)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, got), ref.np_gsam_direction(g, gp, 0.7),
                              **TOL)
  # g_perp is orthogonal to g_p: <g_GSAM - g_p, g_p> = 0.
  diff = jax.tree.map(lambda a, b: a - b, got, to_jax(gp))
  dot = sum(float(jnp.vdot(diff[k], gp[k])) for k in gp)
  assert abs(dot) < 1e-5
  zero = jax.tree.map(jnp.zeros_like, to_jax(g))
  for a, b in ((zero, zero), (to_jax(g), zero), (zero, to_jax(gp))):
    for eps in (1e-12, 0.0):  # eps = 0: a float16 eps under inject_hyperparams, traced
      out = jax.jit(lambda a, b, e: gsam_lib.surrogate_gap_gradient(a, b, 0.7, eps=e))(a, b,
                                                                                     eps)
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("scale", [1e-31, 1e-29, 1.0, 1e30])
def test_surrogate_gap_gradient_at_tiny_and_huge_scales(scale):
  # <g, ĝ_p> is summed scaled down by a power of two (no overflow near float32's max): the
  # scaling must not flush the products of tiny gradients with a tiny eps (1e-30 here).
  rng = np.random.default_rng(4)
  g = {"a": rng.standard_normal(4) * scale, "b": rng.standard_normal((2, 3)) * scale}
  gp = {"a": rng.standard_normal(4) * scale, "b": rng.standard_normal((2, 3)) * scale}
  g32, gp32 = (jax.tree.map(lambda x: np.asarray(x, np.float32), t) for t in (g, gp))
  got = gsam_lib.surrogate_gap_gradient(to_jax(g32), to_jax(gp32), 0.7, eps=1e-30)
  want = ref.np_gsam_direction(*(jax.tree.map(lambda x: x.astype(np.float64), t)
                                 for t in (g32, gp32)), 0.7, eps=1e-30)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, got), want, rtol=1e-5, atol=0)


def test_float16_eps_under_inject_hyperparams_names_static_args():
  tx = optax.inject_hyperparams(ire_optax.gsam)(optax.sgd(0.1), rho=0.1)
  with pytest.raises(ValueError, match=r"static_args=\('eps',\)"):
    tx.init({"w": jnp.ones(2, jnp.float16)})


def test_gsam_zero_gradient_gives_no_nan():
  tx = ire_optax.gsam(optax.sgd(0.1), rho=0.1, alpha=0.5)
  p = {"w": jnp.ones(3)}
  s = tx.init(p)
  # A zero gradient computed from its argument (a grad_fn that ignores it is refused).
  u, s = tx.update({"w": jnp.zeros(3)}, s, p, grad_fn=lambda q: {"w": 0.0 * q["w"]})
  chex.assert_trees_all_equal(u, {"w": jnp.zeros(3)})


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gsam_low_precision_params_keep_their_dtype(dtype):
  params, batches = problem(4)
  tx = ire_optax.gsam(optax.sgd(0.1), rho=0.2, alpha=0.4)
  p = to_jax(params, dtype)
  s = tx.init(p)
  x, y = jnp.asarray(batches[0][0], jnp.float32), jnp.asarray(batches[0][1])
  grad_fn = lambda q: jax_grad(to_jax(q), x, y)
  u, s = jax.jit(lambda p, s: tx.update(
      jax.tree.map(lambda a: a.astype(dtype), grad_fn(p)), s, p,
      grad_fn=lambda q: jax.tree.map(lambda a: a.astype(dtype), grad_fn(q))))(p, s)
  chex.assert_trees_all_equal_dtypes(u, p)
  want = ref.np_run(params, batches, ref.NpSGDTree(0.1), 1, rho=0.2, alpha=0.4)[0]
  got = optax.apply_updates(p, u)
  chex.assert_trees_all_close(jax.tree.map(lambda a: np.asarray(a, np.float64), got), want,
                              rtol=2e-2, atol=2e-2)


def test_gsam_under_inject_hyperparams():
  params, batches = problem(5)
  tx = optax.inject_hyperparams(ire_optax.gsam)(optax.sgd(0.1), rho=0.2, alpha=0.3)
  got, state = run(tx, params, batches)
  want = ref.np_run(params, batches, ref.NpSGDTree(0.1), STEPS, rho=0.2, alpha=0.3)
  assert_close_to_np(got, want)
  assert float(state.hyperparams["alpha"]) == np.float32(0.3)


def test_ire_of_gsam_matches_numpy():
  """SAM-IRE with GSAM inside: the mask ranks the clean g², κ amplifies base(g_GSAM)."""
  params, batches = problem(6)
  tx = ire_optax.ire(ire_optax.gsam(optax.sgd(0.1), rho=0.2, alpha=0.5), kappa=2.0, gamma=0.5,
                     refresh_every=1)
  got, _ = run(tx, params, batches, steps=3)
  p, base, want = params, ref.NpSGDTree(0.1), []
  keys = list(p)
  for t in range(3):
    x, y = batches[t]
    g = ref.np_grad(p, x, y)
    gp = ref.np_grad(ref.np_perturbed(p, g, 0.2), x, y)
    u = base.step(ref.np_gsam_direction(g, gp, 0.5), p)
    h = np.concatenate([g[k].ravel() ** 2 for k in keys])
    k = max(1, int(np.floor(0.5 * h.size)))
    tau = np.sort(h)[k - 1]
    p = {key: p[key] + u[key] * np.where(g[key] ** 2 <= tau, 3.0, 1.0) for key in keys}
    want.append(p)
  assert_close_to_np(got, want)


@pytest.mark.parametrize("kwargs, err", [
    (dict(alpha=-0.1), ValueError), (dict(alpha=float("inf")), ValueError),
    (dict(rho=-1.0), ValueError), (dict(every_k=0), ValueError), (dict(every_k=1.5), ValueError),
    (dict(every_k=lambda t: 2), TypeError), (dict(adaptive="yes"), TypeError),
])
def test_gsam_bad_hyperparameters_raise(kwargs, err):
  with pytest.raises(err):
    ire_optax.gsam(optax.sgd(0.1), **kwargs)


def test_gsam_update_needs_grad_fn_and_updates():
  tx = ire_optax.gsam(optax.sgd(0.1))
  p = {"w": jnp.ones(2)}
  s = tx.init(p)
  with pytest.raises(TypeError, match="grad_fn"):
    tx.update(p, s, p)
  with pytest.raises(TypeError, match="updates"):
    tx.update(None, s, p, grad_fn=lambda q: q)
  with pytest.raises(ValueError, match="the gradient returned by `grad_fn`"):
    tx.update(p, s, p, grad_fn=lambda q: (q, {}))
  with pytest.raises(TypeError, match="params"):
    c = {"w": jnp.ones(2, jnp.complex64)}
    tx.update(c, tx.init(c), c, grad_fn=lambda q: q)


# -----------------------------------------------------------------------------
# SAM every k steps
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("variant", ["sam", "gsam"])
def test_every_k_matches_numpy_and_calls_grad_fn_once_per_ascent(variant, k):
  params, batches = problem(7)
  steps = 7
  if variant == "sam":
    tx = ire_optax.sam(optax.sgd(0.2, momentum=0.9), rho=0.3, every_k=k)
    alpha = None
  else:
    tx = ire_optax.gsam(optax.sgd(0.2, momentum=0.9), rho=0.3, alpha=0.4, every_k=k)
    alpha = 0.4
  calls: list = []
  got, state = run(tx, params, batches, steps=steps, jit=False, calls=calls)
  want = ref.np_run(params, batches, ref.NpSGDTree(0.2, momentum=0.9), steps, rho=0.3,
                    alpha=alpha, every_k=k)
  assert_close_to_np(got, want)
  assert len(calls) == -(-steps // k)  # one perturbed gradient every k steps: 1 + 1/k a step
  assert int(state.count) == steps
  jitted, _ = run(tx, params, batches, steps=steps, jit=True)
  assert_close_to_np(jitted, want)


def test_every_k_plain_steps_are_the_base_bit_for_bit():
  params, batches = problem(8)
  base = optax.adam(0.01)
  got, _ = run(ire_optax.sam(base, rho=0.2, every_k=10**6), params, batches, steps=1)
  # Step 0 is an ascent step; with a rho of 0 it equals the base ...
  got0, _ = run(ire_optax.sam(base, rho=0.0, every_k=2), params, batches)
  plain, _ = run(ire_optax.sam(base, rho=0.0), params, batches)
  chex.assert_trees_all_equal(got0, plain)
  # ... and steps 1..k-1 are plain base steps on the clean gradient.
  p, s = to_jax(params), base.init(to_jax(params))
  sam_tx = ire_optax.sam(base, rho=0.2, every_k=3)
  q, ss = to_jax(params), sam_tx.init(to_jax(params))
  for t in range(3):
    x, y = jnp.asarray(batches[t][0], jnp.float32), jnp.asarray(batches[t][1])
    u, ss = sam_tx.update(jax_grad(q, x, y), ss, q, grad_fn=lambda r, x=x, y=y: jax_grad(r, x, y))
    q = optax.apply_updates(q, u)
    if t == 0:
      p = q
      s = ss.base_state
    else:
      v, s = base.update(jax_grad(p, x, y), s, p)
      p = optax.apply_updates(p, v)
      chex.assert_trees_all_equal(p, q)
  del got


@pytest.mark.parametrize("k", [1, 3])
def test_every_k_under_inject_hyperparams(k):
  """inject_hyperparams passes every_k as a traced int: the ascent steps are the same."""
  params, batches = problem(11)
  tx = optax.inject_hyperparams(ire_optax.sam)(optax.sgd(0.2), rho=0.3, every_k=k)
  got, state = run(tx, params, batches, steps=6)
  want = ref.np_run(params, batches, ref.NpSGDTree(0.2), 6, rho=0.3, every_k=k)
  assert_close_to_np(got, want)
  assert int(state.hyperparams["every_k"]) == k


def test_ire_of_sam_every_k():
  params, batches = problem(9)
  tx = ire_optax.ire(ire_optax.sam(optax.sgd(0.1), rho=0.2, every_k=2), kappa=0.0, gamma=0.5)
  got, _ = run(tx, params, batches)
  want = ref.np_run(params, batches, ref.NpSGDTree(0.1), STEPS, rho=0.2, every_k=2)
  assert_close_to_np(got, want)


# -----------------------------------------------------------------------------
# 8 emulated devices equal one
# -----------------------------------------------------------------------------


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
@pytest.mark.parametrize("make", [
    lambda ax: ire_optax.gsam(optax.sgd(0.2, momentum=0.9), rho=0.3, alpha=0.4, axis_name=ax),
    lambda ax: ire_optax.sam(optax.adam(0.01), rho=0.3, every_k=2, axis_name=ax),
    lambda ax: ire_optax.gsam(optax.adam(0.01), rho=0.3, alpha=0.4, every_k=2, axis_name=ax,
                              perturb_mask={"w": True, "b": False, "s": True}),
], ids=["gsam", "sam_every_2", "gsam_every_2_masked"])
@pytest.mark.parametrize("check_vma", [False, True])
def test_eight_devices_equal_one(make, check_vma):
  params, batches = problem(10, batch=64, num_batches=2)
  mesh = jax.make_mesh((8,), ("d",), devices=jax.devices()[:8])

  def step(tx, vma=False):
    def fn(p, s, x, y):
      # Under check_vma the clean gradient is taken at per-device params (else JAX sums it).
      local = jax.tree.map(lambda a: jax.lax.pcast(a, "d", to="varying"), p) if vma else p
      u, s = tx.update(jax_grad(local, x, y), s, p, grad_fn=lambda q: jax_grad(q, x, y))
      return optax.apply_updates(p, u), s
    return fn

  single_tx, multi_tx = make(None), make("d")
  rep, dp = jax.NamedSharding(mesh, P()), jax.NamedSharding(mesh, P("d"))
  p1 = to_jax(params)
  p8 = jax.device_put(p1, rep)
  s1, s8 = single_tx.init(p1), jax.device_put(multi_tx.init(p8), rep)
  one = jax.jit(step(single_tx))
  eight = jax.jit(jax.shard_map(step(multi_tx, check_vma), mesh=mesh,
                                in_specs=(P(), P(), P("d"), P("d")), out_specs=(P(), P()),
                                check_vma=check_vma))
  for t in range(4):
    x, y = batches[t % 2]
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    p1, s1 = one(p1, s1, x, y)
    p8, s8 = eight(p8, s8, jax.device_put(x, dp), jax.device_put(y, dp))
  chex.assert_trees_all_close(p1, p8, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s1, s8, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# Properties and docs
# -----------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(alpha=st.floats(0.0, 3.0), seed=st.integers(0, 10**6))
def test_hypothesis_gap_direction(alpha, seed):
  rng = np.random.default_rng(seed)
  g = {"a": rng.standard_normal(5)}
  gp = {"a": rng.standard_normal(5)}
  got = gsam_lib.surrogate_gap_gradient(to_jax(g), to_jax(gp), alpha)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, got), ref.np_gsam_direction(g, gp, alpha),
                              rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ire_optax._src.gsam", "ire_optax._src.schedules"])
def test_docstring_examples(name):
  failures, tried = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert tried > 0 and failures == 0


# -----------------------------------------------------------------------------
# The examples' command line builds them
# -----------------------------------------------------------------------------


def test_examples_cli_builds_gsam_every_k_masked_with_schedules():
  from examples.common import cli, optim

  args = cli.parse("resnet", [
      "--opt", "gsam+ire", "--gsam-alpha", "0.3", "--sam-every-k", "2", "--perturb", "weights",
      "--rho", "0.2", "--rho-schedule", "lr", "--rho-min", "0.02", "--final-lr-ratio", "0.1",
      "--ire-gamma-end", "0.9", "--ire-curvature", "grad_sq", "--ire-kappa-schedule", "lr"])
  spec = optim.build_optimizer(args.optimizer, 10)
  assert spec.family == "sam" and spec.sam_aux  # grad_fn also returns the perturbed loss
  params, batches = problem(12)
  got, state = run(spec.tx, params, batches, steps=2, has_aux=True)
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(got))
  assert int(utils.find_states(state, ire_optax.SAMState)[0].count) == 2


def test_gsam_float64_matches_numpy_in_float64():
  # Hyperparameters exact in float32 (schedules are evaluated in float32): what is left is
  # the arithmetic, which must be float64 (float32 would be off by ~1e-7).
  with jax.enable_x64(True):
    params, batches = problem(13)
    tx = ire_optax.gsam(optax.sgd(0.25, momentum=0.5), rho=0.25, alpha=0.5, every_k=2,
                        perturb_mask={"w": True, "b": True, "s": False})
    p, s = to_jax(params, jnp.float64), None
    s = tx.init(p)
    for t in range(4):
      x, y = batches[t % len(batches)]
      g = jax_grad(p, jnp.asarray(x), jnp.asarray(y))
      u, s = tx.update(g, s, p, grad_fn=lambda q, x=x, y=y: jax_grad(q, jnp.asarray(x),
                                                                     jnp.asarray(y)))
      p = optax.apply_updates(p, u)
    chex.assert_trees_all_equal_dtypes(p, to_jax(params, jnp.float64))
    want = ref.np_run(params, batches, ref.NpSGDTree(0.25, momentum=0.5), 4, rho=0.25, alpha=0.5,
                      every_k=2, mask={"w": True, "b": True, "s": False})[-1]
    chex.assert_trees_all_close(jax.tree.map(np.asarray, p), want, rtol=1e-12, atol=1e-13)
