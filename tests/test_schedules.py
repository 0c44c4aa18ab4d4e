"""ire_optax.lr_proportional against its NumPy formula; ρ and γ schedules (inject_hyperparams)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ire_optax


def np_lr_proportional(lr, v_max, lr_max, v_min=0.0, lr_min=0.0):
  frac = min(max((lr - lr_min) / (lr_max - lr_min), 0.0), 1.0)
  return v_min + (v_max - v_min) * frac


LR = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100, end_value=1e-5)


def test_matches_numpy_over_a_warmup_cosine_schedule():
  sched = ire_optax.lr_proportional(LR, max_value=0.6, min_value=0.1, lr_max=1e-3, lr_min=1e-5)
  for t in range(0, 120, 3):
    want = np_lr_proportional(float(LR(t)), 0.6, 1e-3, 0.1, 1e-5)
    np.testing.assert_allclose(float(sched(t)), want, rtol=1e-5, atol=1e-7)
  # The endpoints are exact: peak -> max_value, end -> min_value; warm-up start is clipped.
  assert float(sched(10)) == np.float32(0.6)
  assert float(sched(100)) == np.float32(0.1)
  assert float(sched(0)) == np.float32(0.1)


def test_kappa_t_is_kappa_times_lr_over_peak():
  kappa = ire_optax.lr_proportional(LR, max_value=3.0, lr_max=1e-3)
  for t in (0, 5, 10, 50, 100):
    np.testing.assert_allclose(float(kappa(t)), 3.0 * float(LR(t)) / 1e-3, rtol=1e-5, atol=1e-7)


def test_constant_learning_rate():
  sched = ire_optax.lr_proportional(1e-3, max_value=0.05, lr_max=1e-3)
  assert float(sched(0)) == np.float32(0.05)


def test_equal_learning_rate_bounds_with_equal_values_is_a_constant():
  # GSAM's ProportionScheduler accepts max_lr == min_lr when max_value == min_value.
  sched = ire_optax.lr_proportional(optax.cosine_decay_schedule(1e-3, 100), max_value=0.05,
                                    min_value=0.05, lr_max=1e-3, lr_min=1e-3)
  assert [float(sched(t)) for t in (0, 50, 100)] == [np.float32(0.05)] * 3


@settings(max_examples=30, deadline=None)
@given(lr=st.floats(0.0, 2.0), v_min=st.floats(0.0, 1.0), dv=st.floats(0.0, 5.0),
       lr_min=st.floats(0.0, 0.5), dlr=st.floats(1e-3, 1.0))
@example(lr=1.125, v_min=0.8593263955846431, dv=0.0, lr_min=0.5, dlr=1.0)  # the lerp's rounding
def test_hypothesis_formula_and_range(lr, v_min, dv, lr_min, dlr):
  v_max, lr_max = v_min + dv, lr_min + dlr
  sched = ire_optax.lr_proportional(lambda t: jnp.float32(lr), max_value=v_max,
                                    min_value=v_min, lr_max=lr_max, lr_min=lr_min)
  got = float(sched(0))
  f32 = lambda v: float(np.float32(v))  # the function computes in float32
  want = np_lr_proportional(f32(lr), f32(v_max), f32(lr_max), f32(v_min), f32(lr_min))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.float32(v_min) <= got <= np.float32(v_max)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_value=0.1, lr_max=1e-3, min_value=0.2), "min_value"),
    (dict(max_value=0.1, lr_max=1e-3, lr_min=1e-3), "lr_min"),
    (dict(max_value=-0.1, lr_max=1e-3), "max_value"),
    (dict(max_value=0.1, lr_max=float("nan")), "lr_max"),
    (dict(max_value=0.1, lr_max=-1.0), "lr_max"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ire_optax.lr_proportional(LR, **kwargs)


def test_schedule_bound_raises_type_error():
  with pytest.raises(TypeError, match="max_value"):
    ire_optax.lr_proportional(LR, max_value=LR, lr_max=1e-3)


def test_rho_schedule_under_inject_hyperparams_equals_plain_sam():
  """inject_hyperparams evaluates the schedule at its own count; the steps agree."""
  rho = ire_optax.lr_proportional(LR, max_value=0.5, min_value=0.1, lr_max=1e-3, lr_min=1e-5)
  loss = lambda p: jnp.sum(jnp.array([1.0, 3.0]) * jnp.sin(p) ** 2)
  plain = ire_optax.sam(optax.sgd(LR), rho=rho)
  injected = optax.inject_hyperparams(ire_optax.sam)(optax.sgd(LR), rho=rho)
  p1 = p2 = jnp.array([0.7, -0.4])
  s1, s2 = plain.init(p1), injected.init(p2)
  for t in range(12):
    u1, s1 = plain.update(jax.grad(loss)(p1), s1, p1, grad_fn=jax.grad(loss))
    u2, s2 = injected.update(jax.grad(loss)(p2), s2, p2, grad_fn=jax.grad(loss))
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    np.testing.assert_allclose(float(s2.hyperparams["rho"]), float(rho(t)), rtol=1e-6)
  np.testing.assert_allclose(p1, p2, rtol=1e-6, atol=1e-7)
  assert not np.allclose(p1, jnp.array([0.7, -0.4]))


# -----------------------------------------------------------------------------
# γ schedules for IRE
# -----------------------------------------------------------------------------


def _np_ire_step(w, g, mask, t, lr, kappa, gamma, refresh_every):
  """One IRE (grad_sq) step around SGD with gradient g, γ a function of the step."""
  delta = -lr * g
  if t % refresh_every == 0:
    h = g * g
    k = max(1, int(np.floor(float(np.float32(gamma(t))) * h.size)))
    mask = (h <= np.sort(h)[k - 1]).astype(np.float64)
  return w + delta * (1.0 + kappa * mask), mask


@pytest.mark.parametrize("inject", [False, True])
def test_ire_gamma_schedule_matches_numpy(inject):
  """Step by step from the same point and gradient (float32 and float64 would split at ties)."""
  rng = np.random.default_rng(0)
  n, steps = 40, 12
  a, c, w0 = rng.uniform(0.1, 3.0, n), rng.normal(size=n), rng.normal(size=n)
  # A table lookup: the same float32 γ_t in and out of jit (arithmetic in a schedule may
  # round differently once fused, and k = ⌊γ_t N⌋ is exact for the γ_t it gets).
  table = jnp.asarray([0.2, 0.35, 0.5, 0.65], jnp.float32)
  gamma = lambda t: table[jnp.minimum(t // 3, 3)]
  factory = optax.inject_hyperparams(ire_optax.ire) if inject else ire_optax.ire
  tx = factory(optax.sgd(0.05), kappa=2.0, gamma=gamma, refresh_every=3)
  step = jax.jit(lambda w, s, g: tx.update(g, s, w))
  w, s = jnp.asarray(w0, jnp.float32), tx.init(jnp.asarray(w0, jnp.float32))
  mask_np = np.zeros(n)
  sizes = []
  for t in range(steps):
    w64 = np.asarray(w, np.float64)
    g = (a * w64 + c).astype(np.float32)          # the gradient both sides see
    want_w, mask_np = _np_ire_step(w64, g.astype(np.float64), mask_np, t, 0.05, 2.0, gamma, 3)
    u, s = step(w, s, jnp.asarray(g))
    w = optax.apply_updates(w, u)
    mask = np.asarray(ire_optax.ire_flat_mask(s), np.float64)
    np.testing.assert_array_equal(mask, mask_np)
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-5, atol=1e-6)
    sizes.append(int(mask.sum()))
  assert sizes[0] < sizes[-1]                       # the flat set grows with γ_t
  assert sizes[0] == int(np.floor(np.float32(0.2) * n))


def test_ire_gamma_schedule_outside_unit_interval_is_clipped():
  tx = ire_optax.ire(optax.sgd(0.1), kappa=1.0, gamma=lambda t: 1.5, refresh_every=1)
  w = jnp.arange(1.0, 6.0)
  _, s = tx.update(w, tx.init(w), w)
  assert int(np.asarray(ire_optax.ire_flat_mask(s)).sum()) == 5


def test_ire_constant_gamma_is_still_checked():
  with pytest.raises(ValueError, match="gamma"):
    ire_optax.ire(optax.sgd(0.1), gamma=1.5)
