"""A schedule's value outside its hyperparameter's range is clipped into it when evaluated.

κ ≥ 0 (IRE), ρ ≥ 0 (SAM, ASAM, mSAM, GSAM, SALA), GSAM's α ≥ 0 and SALA's slow
step size in [0, 1] (γ in [0, 1] was already clipped). Each optimizer runs with
a schedule that returns out-of-range values and is compared with its plain-NumPy
reference given the clipped values; the unclipped reference is checked to be
elsewhere, so that every test can fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import ire_optax
from tests import np_sam_family as ref
from tests.np_reference import NpIRE, NpSGD
from tests.test_gsam import assert_close_to_np, jax_grad, problem, run
from tests.test_ire import _problem as ire_problem
from tests.test_sala import _close, _run_sala, make_np_base, make_optax_base, np_sala
from tests.test_sala import _problem as sala_problem


def _alternating(bad: float, good: float):
  """A schedule with ``bad`` on even steps and ``good`` on odd ones, and its NumPy twin."""
  return (lambda t: jnp.where(t % 2 == 0, bad, good),
          lambda t: bad if t % 2 == 0 else good)


def test_ire_negative_kappa_schedule_is_zero():
  params, x, _, loss, np_grad = ire_problem(4)
  kappa, np_kappa = _alternating(-3.0, 2.0)
  tx = ire_optax.ire(optax.sgd(0.05), kappa=kappa, gamma=0.5, refresh_every=2)
  runs = {clip: NpIRE(NpSGD(0.05), kappa=(lambda t, c=clip: max(0.0, np_kappa(t)) if c
                                          else np_kappa(t)),
                      gamma=0.5, refresh_every=2, warmup_steps=0) for clip in (True, False)}
  xs = dict.fromkeys(runs, x)
  state = tx.init(params)
  for _ in range(6):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    xs = {c: xs[c] + runs[c].step(np_grad(xs[c]), xs[c]) for c in runs}
  got = np.asarray(ravel_pytree(params)[0], np.float64)
  np.testing.assert_allclose(got, xs[True], rtol=2e-4, atol=2e-5)
  assert np.abs(got - xs[False]).max() > 1e-2


SAM_FAMILY = {
    "sam": lambda rho: ire_optax.sam(optax.sgd(0.2), rho=rho),
    "asam": lambda rho: ire_optax.sam(optax.sgd(0.2), rho=rho, adaptive=True),
    "msam": lambda rho: ire_optax.msam(optax.sgd(0.2), rho=rho, num_microbatches=1),
    "gsam": lambda rho: ire_optax.gsam(optax.sgd(0.2), rho=rho, alpha=0.5),
}


@pytest.mark.parametrize("name", list(SAM_FAMILY))
def test_negative_rho_schedule_is_zero(name):
  params, batches = problem(3)
  rho, np_rho = _alternating(-0.5, 0.3)
  tx = SAM_FAMILY[name](rho)
  if name == "msam":
    got = _run_msam(tx, params, batches)
  else:
    got, _ = run(tx, params, batches)
  kw = dict(adaptive=name == "asam", alpha=0.5 if name == "gsam" else None)
  want = ref.np_run(params, batches, ref.NpSGDTree(0.2), len(got),
                    rho=lambda t: max(0.0, np_rho(t)), **kw)
  assert_close_to_np(got, want)
  unclipped = ref.np_run(params, batches, ref.NpSGDTree(0.2), len(got), rho=np_rho, **kw)
  assert np.abs(unclipped[-1]["w"] - want[-1]["w"]).max() > 1e-4


def _run_msam(tx, params, batches):
  """``run`` for mSAM's calling convention (``grad_fn(params, microbatch)``, ``batch``)."""

  def step(p, s, x, y):
    u, s = tx.update(None, s, p, grad_fn=lambda q, mb: jax_grad(q, mb["x"], mb["y"]),
                     batch={"x": x, "y": y})
    return optax.apply_updates(p, u), s

  step = jax.jit(step)
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  s = tx.init(p)
  out = []
  for t in range(5):
    x, y = batches[t % len(batches)]
    p, s = step(p, s, jnp.asarray(x, jnp.float32), jnp.asarray(y))
    out.append(p)
  return out


def test_gsam_negative_alpha_schedule_is_zero():
  params, batches = problem(4)
  alpha, np_alpha = _alternating(-1.0, 0.5)
  got, _ = run(ire_optax.gsam(optax.sgd(0.2), rho=0.3, alpha=alpha), params, batches)
  want = ref.np_run(params, batches, ref.NpSGDTree(0.2), len(got), rho=0.3,
                    alpha=lambda t: max(0.0, np_alpha(t)))
  assert_close_to_np(got, want)
  unclipped = ref.np_run(params, batches, ref.NpSGDTree(0.2), len(got), rho=0.3, alpha=np_alpha)
  assert np.abs(unclipped[-1]["w"] - want[-1]["w"]).max() > 1e-4


@pytest.mark.parametrize(("slow_step_size", "rho", "want_alpha", "want_rho"),
                         [(1.5, 0.3, 1.0, 0.3), (0.5, -0.5, 0.5, 0.0)])
def test_sala_schedules_are_clipped(slow_step_size, rho, want_alpha, want_rho):
  a, p0, targets = sala_problem(5, 8)
  tx = ire_optax.sala(make_optax_base("sgd"), sync_period=2,
                      slow_step_size=lambda t: jnp.full((), slow_step_size),
                      rho=lambda t: jnp.full((), rho))
  got = _run_sala(tx, a, p0, targets)
  want = np_sala(a, p0, targets, make_np_base("sgd"), k=2, alpha=want_alpha, rho=want_rho)
  _close(got["theta"], want["theta"])
  _close(got["phi"], want["phi"])
  if slow_step_size != want_alpha:
    # (A negative ρ already acted as 0: no distance is below it, so no SAM step is taken.)
    unclipped = np_sala(a, p0, targets, make_np_base("sgd"), k=2, alpha=slow_step_size, rho=rho)
    assert np.abs(unclipped["phi"][-1]["w"] - want["phi"][-1]["w"]).max() > 1e-4
