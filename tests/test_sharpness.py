"""Tests of ire_optax.sharpness against dense Hessians and NumPy references.

The references are independent of the code under test: dense Hessians come
from ``jax.hessian`` of the flattened loss and are analysed in float64 NumPy
(``np.linalg.eigh``, ``np.trace``, ``np.diag``); SAM sharpness of quadratics
is compared with the exact trust-region maximiser solved in NumPy.
"""

from __future__ import annotations

import functools

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

import ire_optax
import ire_optax.sharpness as sh

# -----------------------------------------------------------------------------
# Small real models on real data (scikit-learn digits)
# -----------------------------------------------------------------------------


@functools.cache
def _digits():
  d = load_digits()
  return d.images.astype(np.float32) / 16.0, d.target.astype(np.int32)


def _batch(start: int = 0, size: int = 64):
  x, y = _digits()
  return {"x": jnp.asarray(x[start:start + size]), "y": jnp.asarray(y[start:start + size])}


def _mlp_init(key):  # 16 -> 6 (tanh) -> 10: 172 parameters
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (16, 6)) / 4, "b1": jnp.full((6,), 0.1),
          "w2": jax.random.normal(k2, (6, 10)) / np.sqrt(6), "b2": jnp.zeros((10,))}


def _mlp_logits(p, b):
  x = b["x"].reshape(-1, 4, 2, 4, 2).mean((2, 4)).reshape(-1, 16)  # 8x8 -> 4x4
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _cnn_init(key):  # conv3x3(1->4), conv3x3/2(4->4), global mean pool, dense: 238 parameters
  k = jax.random.split(key, 3)
  return {"c1": jax.random.normal(k[0], (3, 3, 1, 4)) / 3, "cb1": jnp.zeros((4,)),
          "c2": jax.random.normal(k[1], (3, 3, 4, 4)) / 6, "cb2": jnp.zeros((4,)),
          "w": jax.random.normal(k[2], (4, 10)) / 2, "b": jnp.zeros((10,))}


def _cnn_logits(p, b):
  dn = ("NHWC", "HWIO", "NHWC")
  x = b["x"][..., None]
  x = jnp.tanh(jax.lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=dn)
               + p["cb1"])
  x = jnp.tanh(jax.lax.conv_general_dilated(x, p["c2"], (2, 2), "SAME", dimension_numbers=dn)
               + p["cb2"])
  return x.mean((1, 2)) @ p["w"] + p["b"]


def _ce_loss(logits_fn):
  def loss(p, b):
    logits = logits_fn(p, b)
    picked = jnp.take_along_axis(logits, b["y"][:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)
  return loss


MODELS = {
    "mlp": (_mlp_init, _mlp_logits),
    "cnn": (_cnn_init, _cnn_logits),
}


@functools.cache
def _problem(name: str):
  """(params, batch, loss_fn, dense float64 Hessian) of a model at its init."""
  init, logits_fn = MODELS[name]
  params = init(jax.random.key(0))
  batch = _batch()
  loss = _ce_loss(logits_fn)
  flat, unravel = ravel_pytree(params)
  h = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f), batch)))(flat), np.float64)
  return params, batch, loss, (h + h.T) / 2


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


# -----------------------------------------------------------------------------
# HVP
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_hvp_matches_dense_hessian(name):
  params, batch, loss, h = _problem(name)
  v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), x.shape), params)
  hv = jax.jit(sh.hvp, static_argnums=0)(loss, params, batch, v)
  expected = h @ _flat(v)
  np.testing.assert_allclose(_flat(hv), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(hv))


class HvpVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_quadratic_hvp_is_exact(self):
    a = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, -1.0], [0.0, -1.0, 4.0]], np.float32)
    loss = lambda p, b: 0.5 * p["t"] @ b @ p["t"] + jnp.sum(jnp.sin(p["s"]))
    params = {"t": jnp.array([0.3, -0.2, 0.1]), "s": jnp.array(0.5)}
    v = {"t": jnp.array([1.0, 2.0, -1.0]), "s": jnp.array(2.0)}
    hv = self.variant(functools.partial(sh.hvp, loss))(params, jnp.asarray(a), v)
    np.testing.assert_allclose(hv["t"], a @ np.array([1.0, 2.0, -1.0]), rtol=1e-6)
    np.testing.assert_allclose(hv["s"], -np.sin(0.5) * 2.0, rtol=1e-6)


# -----------------------------------------------------------------------------
# Top eigenpairs
# -----------------------------------------------------------------------------


def _check_eigenpairs(vals, vecs, h, k, *, rtol, cos_tol):
  evals, evecs = np.linalg.eigh(h)
  top = evals[::-1][:k]
  vals = np.asarray(vals, np.float64)
  assert vals.shape == (k,)
  assert np.all(np.diff(vals) <= 0), vals  # descending
  np.testing.assert_allclose(vals, top, rtol=rtol)
  flat_vecs = np.stack([_flat(jax.tree.map(lambda x, i=i: x[i], vecs)) for i in range(k)])
  for i in range(k):
    u = flat_vecs[i]
    np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-4)
    assert abs(u @ evecs[:, -1 - i]) > 1 - cos_tol, (i, abs(u @ evecs[:, -1 - i]))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("num_iters", [40, "n"])
def test_lanczos_top_eigs_match_dense_eigh(name, num_iters):
  params, batch, loss, h = _problem(name)
  n = h.shape[0]
  num_iters = n if num_iters == "n" else num_iters  # "n": full Krylov space, with breakdowns
  fn = jax.jit(functools.partial(sh.top_hessian_eigs, loss, k=3, num_iters=num_iters))
  vals, vecs = fn(params, batch, key=jax.random.key(1))
  # Precondition (so the test is meaningful): separated top eigenvalues.
  ev = np.linalg.eigvalsh(h)[::-1]
  assert ev[2] / ev[1] < 0.9 and ev[1] / ev[0] < 0.9
  _check_eigenpairs(vals, vecs, h, 3, rtol=1e-4, cos_tol=1e-4)
  # The vector pytree has the params' structure with a leading axis of k.
  chex.assert_trees_all_equal_structs(jax.tree.map(lambda x: x[0], vecs), params)


@pytest.mark.parametrize("name", list(MODELS))
def test_power_iteration_top_eigs(name):
  params, batch, loss, h = _problem(name)
  ev = np.linalg.eigvalsh(h)
  # Power iteration finds the largest |lambda|: here they are the largest ones.
  by_magnitude = ev[np.argsort(-np.abs(ev))][:2]
  np.testing.assert_array_equal(np.sort(by_magnitude)[::-1], ev[::-1][:2])
  fn = jax.jit(functools.partial(sh.top_hessian_eigs, loss, k=2, num_iters=60, method="power"))
  vals, vecs = fn(params, batch, key=jax.random.key(3))
  _check_eigenpairs(vals, vecs, h, 2, rtol=1e-3, cos_tol=1e-3)


def test_lanczos_without_reorthogonalization_top1():
  params, batch, loss, h = _problem("mlp")
  fn = jax.jit(functools.partial(sh.top_hessian_eigs, loss, k=1, num_iters=30,
                                 reorthogonalize=False))
  vals, vecs = fn(params, batch, key=jax.random.key(4))
  _check_eigenpairs(vals, vecs, h, 1, rtol=1e-4, cos_tol=1e-3)


def test_eigs_of_indefinite_quadratic_are_largest_by_value():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  lam = np.array([3.0, 2.0, 1.0, 0.5, 0.0, -1.0, -4.0, -6.0])
  a = (q * lam) @ q.T
  loss = lambda p, b: 0.5 * p @ b @ p
  vals, _ = sh.top_hessian_eigs(loss, jnp.zeros(8), jnp.asarray(a, jnp.float32),
                                key=jax.random.key(0), k=3, num_iters=8)
  np.testing.assert_allclose(vals, [3.0, 2.0, 1.0], rtol=1e-5, atol=1e-5)


_QUAD = lambda p, b: 0.5 * p @ b @ p
_FULL_LANCZOS = jax.jit(functools.partial(sh.top_hessian_eigs, _QUAD, k=3, num_iters=12))


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    lam=hnp.arrays(np.float64, 12, elements=st.sampled_from([-3.0, -1.0, 0.0, 0.0, 0.5, 2.0, 4.0])),
    seed=st.integers(0, 2**16),
)
def test_full_lanczos_is_exact_with_repeated_and_zero_eigenvalues(lam, seed):
  # Repeated eigenvalues and low rank make the Krylov space invariant early
  # (breakdowns); the restarts must still recover every copy when num_iters = n.
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(12, 12)))
  a = np.asarray((q * lam) @ q.T, np.float32)
  vals, _ = _FULL_LANCZOS(jnp.zeros(12), jnp.asarray(a), key=jax.random.key(seed))
  ref = np.linalg.eigvalsh(np.asarray(a, np.float64))[::-1][:3]
  np.testing.assert_allclose(vals, ref, atol=2e-5 * max(1.0, np.abs(lam).max()))


def test_zero_hessian_gives_zeros_not_nan():
  loss = lambda p, b: jnp.sum(b * p["w"])  # linear: H = 0, every beta breaks down
  for method in ("lanczos", "power"):
    vals, vecs = sh.top_hessian_eigs(loss, {"w": jnp.ones(5)}, jnp.arange(5.0),
                                     key=jax.random.key(0), k=2, num_iters=4, method=method)
    np.testing.assert_array_equal(vals, np.zeros(2))
    chex.assert_tree_all_finite(vecs)


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
def test_eigs_of_tiny_and_huge_hessians(scale):
  # Squares of entries below ~1e-19 underflow float32 and above ~1e19 overflow: the
  # normalising norms are scaled, so both methods stay exact at either end.
  lam = np.array([4.0, 3.0, 2.0, 1.0]) * scale
  loss = lambda p, b: 0.5 * jnp.sum(b * p**2)  # H = diag(b)
  vals, _ = sh.top_hessian_eigs(loss, jnp.ones(4), jnp.asarray(lam, jnp.float32),
                                key=jax.random.key(0), k=4, num_iters=4)
  np.testing.assert_allclose(vals, lam, rtol=1e-5)
  vals, vecs = sh.top_hessian_eigs(loss, jnp.ones(4), jnp.asarray(lam, jnp.float32),
                                   key=jax.random.key(0), k=1, num_iters=200, method="power")
  np.testing.assert_allclose(vals, lam[:1], rtol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(vecs[0]), 1.0, rtol=1e-5)


# -----------------------------------------------------------------------------
# Trace and diagonal
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_hutchinson_trace_within_3_standard_errors(name):
  params, batch, loss, h = _problem(name)
  s = 200
  fn = jax.jit(functools.partial(sh.hessian_trace, loss, num_samples=s))
  est, se = fn(params, batch, key=jax.random.key(5))
  assert abs(float(est) - np.trace(h)) < 3 * float(se), (float(est), np.trace(h), float(se))
  # The standard error estimates the true one: Var(z^T H z) = 2 sum_{i != j} H_ij^2.
  true_se = np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / s)
  assert 0.7 < float(se) / true_se < 1.3, (float(se), true_se)


def test_trace_of_diagonal_hessian_is_exact_with_zero_error():
  loss = lambda p, b: 0.5 * jnp.sum(b * p**2)  # H = diag(b): z^T H z = tr H for every z
  est, se = sh.hessian_trace(loss, jnp.ones(4), jnp.array([1.0, 2.0, 3.0, -1.0]),
                             key=jax.random.key(0), num_samples=3)
  assert float(est) == pytest.approx(5.0, rel=1e-6)
  assert float(se) == pytest.approx(0.0, abs=1e-6)
  _, se1 = sh.hessian_trace(loss, jnp.ones(4), jnp.ones(4), key=jax.random.key(0), num_samples=1)
  assert np.isnan(se1)  # one sample: no standard error


def test_hutchinson_diagonal_matches_dense_diagonal():
  params, batch, loss, h = _problem("mlp")
  s = 1000
  fn = jax.jit(functools.partial(sh.hessian_diagonal, loss, method="hutchinson", num_samples=s))
  est = _flat(fn(params, batch, key=jax.random.key(6)))
  # Var(z_i (H z)_i) = sum_{j != i} H_ij^2.
  sd = np.sqrt((np.sum(h**2, axis=1) - np.diag(h) ** 2) / s)
  z = (est - np.diag(h)) / (sd + 1e-12)
  assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))
  assert np.sqrt(np.mean(z**2)) < 1.3  # the errors have the predicted size


def test_fisher_diagonal_matches_gauss_newton_diagonal():
  params, batch, _, _ = _problem("mlp")
  loss = _ce_loss(_mlp_logits)
  flat, unravel = ravel_pytree(params)
  # Dense Gauss-Newton matrix of the mean cross-entropy, in NumPy:
  # G = (1/B) sum_i J_i^T (diag p_i - p_i p_i^T) J_i.
  jac = np.asarray(jax.jacobian(lambda f: _mlp_logits(unravel(f), batch))(flat), np.float64)
  logits = np.asarray(_mlp_logits(params, batch), np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  bsz = p.shape[0]
  gn_diag = sum(np.diag(jac[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ jac[i])
                for i in range(bsz)) / bsz
  one = jax.jit(functools.partial(sh.hessian_diagonal, loss, method="fisher",
                                  logits_fn=_mlp_logits))
  singles = np.asarray(jax.vmap(lambda k: ravel_pytree(one(params, batch, key=k))[0])(
      jax.random.split(jax.random.key(8), 400)), np.float64)
  sd = singles.std(0) / np.sqrt(2000)
  many = jax.jit(functools.partial(sh.hessian_diagonal, loss, method="fisher",
                                   logits_fn=_mlp_logits, num_samples=2000))
  est = _flat(many(params, batch, key=jax.random.key(9)))
  # E[fisher] = diag(G) / B (IRE only ranks, so the estimator is not rescaled).
  z = (est - gn_diag / bsz) / (sd + 1e-12)
  assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))
  assert np.corrcoef(est, gn_diag)[0, 1] > 0.99


def test_grad_sq_diagonal_is_squared_gradient():
  params, batch, loss, _ = _problem("cnn")
  g = jax.grad(loss)(params, batch)
  est = sh.hessian_diagonal(loss, params, batch, method="grad_sq")
  np.testing.assert_allclose(_flat(est), _flat(g) ** 2, rtol=1e-6)


# -----------------------------------------------------------------------------
# SAM sharpness on quadratics, against the exact trust-region maximiser
# -----------------------------------------------------------------------------


def _trust_region_max(a, g, rho):
  """max_{||e|| <= rho} g.e + e.A.e/2 in float64 (A with a positive eigenvalue).

  The maximiser satisfies (mu I - A) e = g with mu > lambda_max and ||e|| = rho;
  solve the secular equation for mu by bisection (no "hard case" for generic g).
  """
  lam, q = np.linalg.eigh(a)
  gq = q.T @ g
  norm = lambda mu: np.linalg.norm(gq / (mu - lam))
  lo, hi = lam[-1] + 1e-15, lam[-1] + np.linalg.norm(g) / rho + 1.0
  assert norm(hi) < rho
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
  e = q @ (gq / ((lo + hi) / 2 - lam))
  return g @ e + 0.5 * e @ a @ e


def _quadratic(seed=0, lam=(5.0, 3.0, 1.0, 0.5, -0.5, -1.0)):
  rng = np.random.default_rng(seed)
  n = len(lam)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = (q * np.array(lam)) @ q.T
  b = rng.normal(size=n)
  theta = rng.normal(size=n)
  return a, b, theta


def _quadratic_loss(p, batch):  # 0.5 θᵀAθ + bᵀθ, (A, b) passed as the batch
  t = p["t"]
  return 0.5 * t @ batch["a"] @ t + batch["b"] @ t


def _as_problem(a, b, theta):
  params = {"t": jnp.asarray(theta, jnp.float32)}
  batch = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  # The float32-rounded problem, in float64.
  return params, batch, np.asarray(batch["a"], np.float64), np.asarray(batch["b"], np.float64), \
      np.asarray(params["t"], np.float64)


class SamSharpnessTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_exact_trust_region_maximum(self):
    params, batch, a, b, theta = _as_problem(*_quadratic())
    g = a @ theta + b
    fn = self.variant(functools.partial(sh.sam_sharpness, _quadratic_loss, num_steps=60))
    for rho in (0.05, 0.5, 2.0):
      got = float(fn(params, batch, rho=rho))
      want = _trust_region_max(a, g, rho)
      np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=f"rho={rho}")

  @chex.variants(with_jit=True, without_jit=True)
  def test_first_order_expansion_and_bounds(self):
    params, batch, a, b, theta = _as_problem(*_quadratic(seed=1))
    g = a @ theta + b
    gn = np.linalg.norm(g)
    lmax = np.linalg.eigvalsh(a)[-1]
    curv_g = g @ a @ g / gn**2
    fn = self.variant(functools.partial(sh.sam_sharpness, _quadratic_loss, num_steps=20))
    one_step = self.variant(functools.partial(sh.sam_sharpness, _quadratic_loss, num_steps=1))
    for rho in (1e-3, 1e-2, 1e-1):
      s = float(fn(params, batch, rho=rho))
      # rho ||g|| + rho^2/2 ĝᵀAĝ <= s <= rho ||g|| + rho^2 lambda_max / 2.
      tol = 2e-6  # float32 rounding of L(θ+ε) - L(θ)
      assert rho * gn + 0.5 * rho**2 * curv_g - tol <= s <= rho * gn + 0.5 * rho**2 * lmax + tol
      # First order: the sharpness is rho ||g|| + O(rho^2).
      assert abs(s / rho - gn) <= 0.5 * rho * lmax + 1e-5
      # One step is SAM's own perturbation eps = rho g / ||g||.
      np.testing.assert_allclose(float(one_step(params, batch, rho=rho)),
                                 rho * gn + 0.5 * rho**2 * curv_g, rtol=1e-5, atol=tol)

  def test_near_a_minimum_it_is_rho_squared_lambda_max_over_two(self):
    a, b, _ = _quadratic(seed=2, lam=(4.0, 2.0, 1.0, 0.5))
    rng = np.random.default_rng(3)
    theta = -np.linalg.solve(a, b) + 1e-4 * rng.normal(size=4)  # ||g|| ~ 1e-4
    params, batch, a, b, theta = _as_problem(a, b, theta)
    g = a @ theta + b
    rho = 1.0
    s = float(sh.sam_sharpness(_quadratic_loss, params, batch, rho=rho, num_steps=80))
    np.testing.assert_allclose(s, rho**2 * 4.0 / 2 + rho * np.linalg.norm(g), rtol=2e-3)
    np.testing.assert_allclose(s, _trust_region_max(a, g, rho), rtol=1e-4)

  def test_adaptive_is_trust_region_in_scaled_coordinates(self):
    # ASAM: ||eps / |theta| || <= rho. With eps = T d: max g'.d + d.A'.d/2, A' = TAT, g' = Tg.
    params, batch, a, b, theta = _as_problem(*_quadratic(seed=4))
    t = np.abs(theta)
    g = a @ theta + b
    got = float(sh.sam_sharpness(_quadratic_loss, params, batch, rho=0.5, num_steps=80,
                                 adaptive=True))
    np.testing.assert_allclose(got, _trust_region_max(t[:, None] * a * t, t * g, 0.5), rtol=1e-4)

  def test_zero_gradient_and_zero_rho_give_zero(self):
    loss = lambda p, b: jnp.sum(p**2)
    self.assertEqual(float(sh.sam_sharpness(loss, jnp.zeros(3), None, rho=0.1)), 0.0)
    self.assertEqual(float(sh.sam_sharpness(loss, jnp.ones(3), None, rho=0.0)), 0.0)


def test_m_sharpness_is_mean_of_micro_batch_trust_region_maxima():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(32, 5)).astype(np.float32)
  y = rng.normal(size=(32,)).astype(np.float32)
  theta = rng.normal(size=5).astype(np.float32)
  loss = lambda p, b: 0.5 * jnp.mean((b["x"] @ p - b["y"]) ** 2)  # least squares
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  x64, y64, t64 = (np.asarray(v, np.float64) for v in (x, y, theta))

  def reference(m, rho):
    vals = []
    for xb, yb in zip(np.split(x64, m), np.split(y64, m), strict=True):
      a = xb.T @ xb / len(xb)
      vals.append(_trust_region_max(a, xb.T @ (xb @ t64 - yb) / len(xb), rho))
    return np.mean(vals)

  fn = jax.jit(functools.partial(sh.m_sharpness, loss, num_microbatches=4, num_steps=60))
  np.testing.assert_allclose(float(fn(jnp.asarray(theta), batch, rho=0.3)), reference(4, 0.3),
                             rtol=1e-4)
  # m = 1 is sam_sharpness, and m-sharpness differs from the full-batch sharpness.
  m1 = sh.m_sharpness(loss, jnp.asarray(theta), batch, rho=0.3, num_microbatches=1, num_steps=60)
  full = sh.sam_sharpness(loss, jnp.asarray(theta), batch, rho=0.3, num_steps=60)
  np.testing.assert_allclose(float(m1), float(full), rtol=1e-6)
  np.testing.assert_allclose(float(full), reference(1, 0.3), rtol=1e-4)
  assert abs(reference(4, 0.3) - reference(1, 0.3)) > 1e-2


# -----------------------------------------------------------------------------
# bfloat16, jit with the batch as argument, sharded params
# -----------------------------------------------------------------------------


def _all_measures(loss, params, batch, key, with_msam=True):
  """Every measurement, as a dict (jitted as one function in the tests below)."""
  k1, k2, k3 = jax.random.split(key, 3)
  vals, vecs = sh.top_hessian_eigs(loss, params, batch, key=k1, k=2, num_iters=20)
  trace, se = sh.hessian_trace(loss, params, batch, key=k2, num_samples=4)
  ones = jax.tree.map(jnp.ones_like, params)
  msam = (sh.m_sharpness(loss, params, batch, rho=0.05, num_microbatches=8, num_steps=2)
          if with_msam else None)
  return {
      "eigs": vals, "vec0": jax.tree.map(lambda x: jnp.abs(x[0]), vecs),
      "trace": trace, "se": se, "hvp": sh.hvp(loss, params, batch, ones),
      "diag": sh.hessian_diagonal(loss, params, batch, key=k3, num_samples=2),
      "sam": sh.sam_sharpness(loss, params, batch, rho=0.05, num_steps=2),
      "msam": msam,
  }


@functools.cache
def _mlp_measures():
  """One jitted function for the tests below (compiled once per input type)."""
  return jax.jit(functools.partial(_all_measures, _problem("mlp")[2]))


def test_bfloat16_params_are_computed_in_float32():
  params, batch, _, _ = _problem("mlp")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)  # the same values
  out16 = _mlp_measures()(p16, batch, jax.random.key(0))
  out32 = _mlp_measures()(p32, batch, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out16))
  chex.assert_trees_all_close(out16, out32, rtol=1e-6, atol=1e-7)
  chex.assert_tree_all_finite(out16)


def test_one_compilation_serves_every_batch():
  params, _, loss, _ = _problem("mlp")
  traces = []

  def eigs(params, batch, key):
    traces.append(1)
    return sh.top_hessian_eigs(loss, params, batch, key=key, k=2, num_iters=20)

  fn = jax.jit(eigs)
  out_a = fn(params, _batch(0), jax.random.key(0))[0]
  out_b = fn(params, _batch(64), jax.random.key(0))[0]
  assert len(traces) == 1
  assert abs(float(out_a[0]) - float(out_b[0])) > 1e-3  # the batch is really used
  flat, unravel = ravel_pytree(params)
  dense = jax.jit(jax.hessian(lambda f, b: loss(unravel(f), b)))
  for batch, out in ((_batch(0), out_a), (_batch(64), out_b)):
    h = np.asarray(dense(flat, batch), np.float64)
    np.testing.assert_allclose(out, np.linalg.eigvalsh(h)[::-1][:2], rtol=1e-4)


def test_sharded_params_match_single_device():
  # GSPMD: jax.jit over arrays placed with NamedSharding on an 8-device mesh.
  params, batch, _, _ = _problem("mlp")
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
  specs = {"w1": P("a", "b"), "b1": P("b"), "w2": P("b", None), "b2": P("b")}
  sharded_params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
  sharded_batch = jax.device_put(batch, NamedSharding(mesh, P(("a", "b"))))
  assert len(sharded_params["w1"].sharding.device_set) == 8
  out = _mlp_measures()(sharded_params, sharded_batch, jax.random.key(0))
  ref = _mlp_measures()(params, batch, jax.random.key(0))
  chex.assert_trees_all_close(out, ref, rtol=1e-4, atol=1e-6)


def test_explicit_sharding_mode_matches_single_device():
  # Sharding in types (AxisType.Explicit): flat vectors are kept replicated.
  rng = np.random.default_rng(0)
  params = {"u": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "v": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  batch = {"a": jnp.asarray(rng.uniform(size=(16, 8)), jnp.float32),
           "c": jnp.asarray(rng.uniform(size=(8,)), jnp.float32)}
  loss = lambda p, b: jnp.sum(b["a"] * jnp.cos(p["u"])) + jnp.sum(b["c"] * p["v"] ** 4)
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  put = lambda t: jax.tree.map(lambda x: jax.device_put(
      x, NamedSharding(mesh, P("x", *([None] * (x.ndim - 1))))), t)
  fn = jax.jit(functools.partial(_all_measures, loss, with_msam=False))
  ref = fn(params, batch, jax.random.key(0))
  # Every leaf sharded alike, then leaves sharded differently (one replicated), which a flat
  # vector can only join once each leaf is replicated, and a leaf split along its second axis
  # (no flattening reshape of it; its batch replicated, as the loss multiplies them).
  replicated = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), t)
  for placed, placed_batch in (
      (put(params), put(batch)),
      ({"u": put(params["u"]), "v": replicated(params["v"])}, put(batch)),
      ({"u": jax.device_put(params["u"], NamedSharding(mesh, P(None, "x"))),
        "v": replicated(params["v"])}, replicated(batch))):
    with jax.set_mesh(mesh):
      out = fn(placed, placed_batch, jax.random.key(0))
    chex.assert_trees_all_close(out, ref, rtol=1e-4, atol=1e-5)
  # m-sharpness of a batch sharded along its leading (example) axis.
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  msam = jax.jit(functools.partial(sh.m_sharpness, lambda p, b: jnp.mean(jnp.cos(b @ p)),
                                   num_microbatches=8))
  with jax.set_mesh(mesh):
    out = msam(params["v"], put(x))
  np.testing.assert_allclose(out, msam(params["v"], x), rtol=1e-5)


def test_public_module_and_attribute():
  assert ire_optax.sharpness is sh
  for name in ("hvp", "top_hessian_eigs", "hessian_trace", "hessian_diagonal", "sam_sharpness",
               "m_sharpness", "summary"):
    assert callable(getattr(sh, name))


def test_summary_reports_top_eig_and_trace():
  params, batch, loss, h = _problem("mlp")
  out = jax.jit(functools.partial(sh.summary, loss, num_iters=40, num_samples=100))(
      params, batch, key=jax.random.key(0))
  np.testing.assert_allclose(out["top_eig"], np.linalg.eigvalsh(h)[-1], rtol=1e-4)
  assert abs(float(out["trace"]) - np.trace(h)) < 3 * float(out["trace_se"])
  np.testing.assert_allclose(out["loss"], loss(params, batch), rtol=1e-6)
  assert float(out["sam_sharpness"]) > 0


def test_unrolled_loops_give_the_same_results():
  a_mat, b_vec, theta = _quadratic()
  params, batch = {"t": jnp.asarray(theta, jnp.float32)}, {"a": jnp.asarray(a_mat, jnp.float32),
                                                           "b": jnp.asarray(b_vec, jnp.float32)}
  loss = lambda p, b: _quadratic_loss(p, b) + jnp.sum(jnp.sin(p["t"]))  # not quadratic
  key = jax.random.key(0)
  for unroll in (True,):
    a = sh.top_hessian_eigs(loss, params, batch, key=key, k=2, num_iters=6, unroll=unroll)
    b = sh.top_hessian_eigs(loss, params, batch, key=key, k=2, num_iters=6)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
    a = sh.top_hessian_eigs(loss, params, batch, key=key, k=2, num_iters=6, method="power",
                            unroll=unroll)
    b = sh.top_hessian_eigs(loss, params, batch, key=key, k=2, num_iters=6, method="power")
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
    a = sh.hessian_trace(loss, params, batch, key=key, num_samples=4, unroll=unroll)
    b = sh.hessian_trace(loss, params, batch, key=key, num_samples=4)
    chex.assert_trees_all_close(a, b, rtol=1e-5)
    a = sh.sam_sharpness(loss, params, batch, num_steps=4, unroll=unroll)
    b = sh.sam_sharpness(loss, params, batch, num_steps=4)
    chex.assert_trees_all_close(a, b, rtol=1e-5)


# -----------------------------------------------------------------------------
# Bad input
# -----------------------------------------------------------------------------

_KEY = jax.random.key(0)
_P = {"w": jnp.ones((2, 3))}  # 6 parameters
_LOSS = lambda p, b: jnp.sum(p["w"] ** 2)
_VEC_LOSS = lambda p, b: p["w"] ** 2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sh.top_hessian_eigs(_LOSS, _P, None, key=_KEY, k=0), "`k`"),
        (lambda: sh.top_hessian_eigs(_LOSS, _P, None, key=_KEY, k=7, num_iters=10),
         r"`k` must be in \[1, 6\]"),
        (lambda: sh.top_hessian_eigs(_LOSS, _P, None, key=_KEY, k=1.5), "`k`"),
        (lambda: sh.top_hessian_eigs(_LOSS, _P, None, key=_KEY, num_iters=0), "`num_iters`"),
        (lambda: sh.top_hessian_eigs(_LOSS, _P, None, key=_KEY, k=3, num_iters=2),
         "`num_iters` must be >= k=3"),
        (lambda: sh.top_hessian_eigs(_LOSS, _P, None, key=_KEY, method="arnoldi"), "`method`"),
        (lambda: sh.top_hessian_eigs(_VEC_LOSS, _P, None, key=_KEY),
         r"loss_fn must return a scalar, got shape \(2, 3\)"),
        (lambda: sh.hessian_trace(_LOSS, _P, None, key=_KEY, num_samples=0), "`num_samples`"),
        (lambda: sh.hessian_trace(_LOSS, _P, None, key=_KEY, num_samples=-3), "`num_samples`"),
        (lambda: sh.hessian_trace(_LOSS, _P, None, key=_KEY, unroll=0), "`unroll`"),
        (lambda: sh.top_hessian_eigs(_LOSS, _P, None, key=_KEY, unroll=-1), "`unroll`"),
        (lambda: sh.hessian_trace(_VEC_LOSS, _P, None, key=_KEY), "loss_fn must return a scalar"),
        (lambda: sh.hvp(_VEC_LOSS, _P, None, _P), "loss_fn must return a scalar"),
        (lambda: sh.hvp(lambda p, b: (_LOSS(p, b), 0.0), _P, None, _P),
         "loss_fn must return a scalar"),
        (lambda: sh.hessian_diagonal(_LOSS, _P, None, key=_KEY, num_samples=0), "`num_samples`"),
        (lambda: sh.hessian_diagonal(_LOSS, _P, None, key=_KEY, method="exact"), "`method`"),
        (lambda: sh.hessian_diagonal(_LOSS, _P, None), "needs a PRNG `key`"),
        (lambda: sh.hessian_diagonal(_VEC_LOSS, _P, None, key=_KEY), "must return a scalar"),
        (lambda: sh.sam_sharpness(_LOSS, _P, None, num_steps=0), "`num_steps`"),
        (lambda: sh.sam_sharpness(_LOSS, _P, None, rho=-0.1), "`rho`"),
        (lambda: sh.sam_sharpness(_VEC_LOSS, _P, None), "loss_fn must return a scalar"),
        (lambda: sh.m_sharpness(_LOSS, _P, jnp.ones((6, 2)), num_microbatches=0),
         "`num_microbatches`"),
        (lambda: sh.m_sharpness(_LOSS, _P, jnp.ones((6, 2)), num_microbatches=4),
         "must divide the batch size"),
        (lambda: sh.m_sharpness(_LOSS, _P, None, num_microbatches=2), "leading batch axis"),
        (lambda: sh.m_sharpness(_LOSS, _P, jnp.ones((6, 2)), num_microbatches=2, num_steps=0),
         "`num_steps`"),
        (lambda: sh.hvp(lambda p, b: (_LOSS(p, b),), _P, None, _P),
         "loss_fn must return a scalar"),
        (lambda: sh.sam_sharpness(lambda p, b: [_LOSS(p, b)], _P, None),
         "loss_fn must return a scalar"),
        (lambda: sh.hessian_trace(lambda p, b: {"loss": _LOSS(p, b)}, _P, None, key=_KEY),
         "loss_fn must return a scalar"),
        (lambda: sh.summary(_LOSS, {"w": jnp.zeros(0)}, None, key=_KEY),
         "at least one element"),
    ],
)
def test_bad_input_raises_clear_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("fn", [
    lambda p: sh.top_hessian_eigs(lambda q, b: q["step"] * jnp.sum(q["w"] ** 2), p, None,
                                  key=_KEY),
    lambda p: sh.hessian_trace(lambda q, b: jnp.sum(q["w"] ** 2), p, None, key=_KEY),
    lambda p: sh.sam_sharpness(lambda q, b: jnp.sum(q["w"] ** 2), p, None),
])
def test_an_integer_leaf_is_refused_not_differentiated(fn):
  """An int32 leaf would become a coordinate of the Hessian (top eigenvalue 7.58, not 6)."""
  with pytest.raises(TypeError, match="must be a real floating array.*int32"):
    fn({"w": jnp.ones(3), "step": jnp.int32(3)})


def test_missing_callback_is_the_same_type_error_as_in_ire():
  with pytest.raises(TypeError, match="needs the keyword argument `logits_fn`"):
    sh.hessian_diagonal(_LOSS, _P, None, key=_KEY, method="fisher")


def test_static_counts_under_jit_must_not_be_traced():
  fn = jax.jit(lambda k: sh.hessian_trace(_LOSS, _P, None, key=_KEY, num_samples=k))
  with pytest.raises(ValueError, match="static integer"):
    fn(3)


def test_power_iteration_returns_the_rayleigh_quotient_of_its_vector():
  """The eigenvalue was the quotient of the iterate before the returned one (2.25 where the
  returned vector's is 3.86 after one step on diag(4, 3.9, 1, 0.5))."""
  h = np.array([4.0, 3.9, 1.0, 0.5])
  loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)
  for num_iters in (1, 3):
    vals, vecs = sh.top_hessian_eigs(loss, jnp.ones(4), jnp.asarray(h, jnp.float32),
                                     key=_KEY, k=2, num_iters=num_iters, method="power")
    v = np.asarray(vecs, np.float64)
    np.testing.assert_allclose(np.asarray(vals), np.sum(v * h * v, axis=1), rtol=1e-5)


def test_summary_finds_the_sharpness_the_gradient_ascent_misses():
  """H = diag(5, 1), g = (0, 1): the ascent from g never leaves the g axis (1.5 however many
  steps); the maximum over the unit ball is 2.625 (the secular equation, in NumPy), and the
  top eigenvector alone gives 2.5."""
  loss = lambda p, b: 0.5 * jnp.sum(b["h"] * p ** 2) + jnp.sum(b["g"] * p)
  batch = {"h": jnp.array([5.0, 1.0]), "g": jnp.array([0.0, 1.0])}
  a, g, rho = np.diag([5.0, 1.0]), np.array([0.0, 1.0]), 1.0
  mu = 5.0 + 1e-9  # hard case: mu = lambda_max, the rest of the radius along e1
  e2 = g[1] / (mu - 1.0)
  e = np.array([np.sqrt(rho ** 2 - e2 ** 2), e2])
  exact = g @ e + 0.5 * e @ a @ e
  np.testing.assert_allclose(exact, 2.625, rtol=1e-6)
  assert abs(float(sh.sam_sharpness(loss, jnp.zeros(2), batch, rho=rho, num_steps=50))
             - 1.5) < 1e-6
  got = float(sh.summary(loss, jnp.zeros(2), batch, key=_KEY, rho=rho)["sam_sharpness"])
  assert 2.5 - 1e-5 <= got <= exact + 1e-5


@pytest.mark.parametrize("rho", [-0.1, np.inf, np.nan])
def test_a_traced_invalid_radius_gives_nan_not_zero(rho):
  """Checked eagerly, a negative radius raises; traced, it gave 0 (the ascent's max with
  epsilon_0 = 0) and an infinite one NaN."""
  p, b = jnp.array([0.3, -1.2, 2.0]), jnp.array([1.0, 2.0, 3.0])
  loss = lambda q, c: jnp.sum(jnp.sin(q) * c)
  r = jnp.float32(rho)
  assert np.isnan(jax.jit(functools.partial(sh.sam_sharpness, loss))(p, b, rho=r))
  m = functools.partial(sh.m_sharpness, loss, num_microbatches=3)
  assert np.isnan(jax.jit(m)(p, jnp.ones((3, 3)), rho=r))
  out = jax.jit(functools.partial(sh.summary, loss, num_iters=3))(p, b, key=_KEY, rho=r)
  assert np.isnan(out["sam_sharpness"]) and np.isfinite(out["top_eig"])
