"""Optax's generic optimizer checks, run on every optimizer of the library.

Ported from the tests Optax ships for its own optimizers
(``optax/contrib/_common_test.py``, ``optax/_src/alias_test.py``,
``optax/contrib/_sam_test.py``), over every optimizer of ``tests/cases.py``
(alone, nested and inside Optax wrappers) with the calling convention each
needs (``grad_fn`` / ``logits_fn``, or mSAM's ``batch``):

* unexpected extra keyword arguments are accepted, under ``jit``;
* the jitted step does not recompile on its second call;
* ``optax.tree.map_params`` works on the state;
* ``jit`` and eager execution give the same result;
* state shapes, dtypes and shardings are stable across steps (a ``lax.cond``
  between the old and the new state must type-check), for float16, bfloat16,
  float32 and float64 parameters, and on an explicit 8-device mesh inside
  ``jax.set_mesh`` (where the result must also equal the unsharded one);
* updates keep the parameters' dtype (bfloat16, float32);
* ``optax.MultiSteps`` gives zero updates on the accumulation steps;
* ``optax.inject_hyperparams`` gives the same updates and state as the plain
  factory;
* a constant schedule gives the same result as the constant (Optax checks
  this for ``learning_rate``; here for every schedule-able hyperparameter);
* the optimization of the parabola, the matrix parabola, the mixed 1-D/2-D
  target and the Rosenbrock function converges (with small ascent radii, as
  Optax's SAM test, so that the minimizer is the target).

Not ported: complex parameters (rejected with a ``TypeError`` by design,
tested in ``test_validation``) and ``test_explicit_dtype`` (no accumulator
dtype argument here).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ire_optax
from ire_optax._src import sharding
from tests import cases

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding
NAMES = list(cases.CASES)
# Cases that do not go into optax.MultiSteps: mSAM computes its own gradients (MultiSteps
# accumulates `updates`, which mSAM does not take), and a MultiSteps object inside another
# drops the extra arguments (Optax wraps it without extra-argument support).
NO_MULTISTEPS = {name for name, c in cases.CASES.items()
                 if c.convention == "msam" or name.startswith("multisteps")}
# Eager execution compiles every operation on its own (slow): jit == eager is checked on one
# case of each kind of optimizer and wrapper.
EAGER = ("ire_grad_sq", "ire_hutchinson", "sam", "msam", "sala_k3", "gsam", "ire_sam",
         "multisteps_ire", "inject_sala", "chain_clip_apply_if_finite_ire")


def _extra_step(case, tx):
  """A train step that also passes an argument no optimizer expects (Optax's check)."""

  def step(params, state, batch):
    kw = cases.update_kwargs(case, batch)
    kw["unexpected_extra_args_your_optimizer_doesnt_expect"] = 1
    if case.convention == "msam":
      grads = None
    else:
      grads = jax.grad(cases.loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, **kw)
    return optax.apply_updates(params, updates), state

  return step


# -----------------------------------------------------------------------------
# Extra arguments, no recompilation, map_params, jit == eager
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_no_recompile_map_params_and_jit_equals_eager(name):
  case = cases.CASES[name]
  tx = case.make()
  params, data = cases.make_params(), cases.make_data()
  state = tx.init(params)
  # A no-op change, to verify that tree map works.
  mapped = optax.tree.map_params(tx.init, lambda v: v, state)
  chex.assert_trees_all_equal(mapped, state)

  step = _extra_step(case, tx)
  jitted = jax.jit(step)
  p, s = params, state
  for t in range(3):
    p, s = jitted(p, s, cases.batch_at(data, t))
  assert jitted._cache_size() == 1, "the step recompiled on a later call"
  if name not in EAGER:
    return
  q, r = params, state
  for t in range(3):
    q, r = step(q, r, cases.batch_at(data, t))
  chex.assert_trees_all_close((p, s), (q, r), rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# State shape / dtype / sharding stability (lax.cond between the states)
# -----------------------------------------------------------------------------


def _cond_step(case, tx, loss=cases.loss_fn, logits_of=cases.logits):
  """Optax's stability check: the step's outputs go through ``lax.cond`` with its inputs."""
  inner = cases.make_step(case, tx, loss, logits_of)

  def step(params, state, batch, take):
    def update():
      p, s, _ = inner(params, state, batch)
      return p, s
    return jax.lax.cond(take, update, lambda: (params, state))

  return step


def assert_same_types(a: Any, b: Any) -> None:
  """Same tree structure and, leaf by leaf, the same shape, dtype and sharding."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert (jnp.shape(x), jnp.result_type(x)) == (jnp.shape(y), jnp.result_type(y))
    assert jax.typeof(x).sharding.spec == jax.typeof(y).sharding.spec, (x.sharding, y.sharding)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.filterwarnings("ignore:`gamma` is bfloat16")  # inject_ire: as intended here
def test_state_shape_dtype_stability_and_dtype_preservation(name):
  """float16, bfloat16 and float64 here; float32 on the explicit mesh below."""
  case = cases.CASES[name]
  data = cases.make_data()
  dtypes = (jnp.float16, jnp.bfloat16, jnp.float64) if name in EAGER else (jnp.bfloat16,
                                                                           jnp.float64)
  if name.startswith("inject"):
    # inject_hyperparams stores the hyperparameters in the parameters' float dtype, where
    # float16 flushes eps = 1e-12 to 0, which the factory rejects (pass
    # hyperparam_dtype=jnp.float32 for float16 parameters).
    dtypes = tuple(d for d in dtypes if d != jnp.float16)
  for dtype in dtypes:
    with jax.enable_x64(dtype == jnp.float64):
      tx = case.make()
      params = cases.make_params(dtype)
      state = tx.init(params)
      first = (params, state)
      step = jax.jit(_cond_step(case, tx))
      for t in range(2):
        params, new_state = step(params, state, cases.batch_at(data, t), True)
        assert_same_types((params, new_state), first)
        state = new_state
      assert all(x.dtype == dtype for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.filterwarnings("ignore:`gamma` is bfloat16")  # inject_ire: as intended here
def test_multisteps_accumulation_steps_give_zero_updates(name):
  if name in NO_MULTISTEPS:
    pytest.skip("mSAM, or already a MultiSteps (see NO_MULTISTEPS).")
  case = cases.CASES[name]
  for dtype in (jnp.bfloat16,):  # zeros of the parameters' dtype
    tx = optax.MultiSteps(case.make(), every_k_schedule=4)
    params = cases.make_params(dtype)
    batch = cases.batch_at(cases.make_data(), 0)
    grads = jax.grad(cases.loss_fn)(params, batch)
    state = jax.jit(tx.init)(params)
    update = jax.jit(lambda g, s, p, b, tx=tx: tx.update(
        g, s, p, **cases.update_kwargs(case, b)))
    updates, _ = update(grads, state, params, batch)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))


# -----------------------------------------------------------------------------
# On an explicit mesh (jax.set_mesh, AxisType.Explicit): same types, same result
# -----------------------------------------------------------------------------

SHARDED_FEATURES, SHARDED_CLASSES = 8, 4


def _gather(params):
  # The FSDP all-gather of the weights (explicit mode needs it); the identity unsharded.
  return jax.tree.map(lambda w: sharding.reshard(w, P()), params)


def _gathered_loss(params, batch):
  return cases.loss_fn(_gather(params), batch)


def _gathered_logits(params, x):
  return cases.logits(_gather(params), x)


@functools.cache
def _unsharded_reference(name, steps):
  case = cases.CASES[name]
  tx = case.make()
  params = cases.make_params(num_features=SHARDED_FEATURES, num_classes=SHARDED_CLASSES)
  data = cases.make_data(num_features=SHARDED_FEATURES)
  step = jax.jit(cases.make_step(case, tx, _gathered_loss, _gathered_logits))
  state = tx.init(params)
  for t in range(steps):
    params, state, _ = step(params, state, cases.batch_at(data, t))
  return params, state


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")
@pytest.mark.parametrize("name", NAMES)
def test_state_sharding_stability_on_an_explicit_mesh(name):
  """Params sharded over a (2, 4) Explicit mesh: state types stable and the unsharded result."""
  steps = 4
  case = cases.CASES[name]
  explicit = jax.sharding.AxisType.Explicit
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(explicit, explicit),
                       devices=jax.devices()[:8])
  specs = {"w": P("a", "b"), "b": P("b")}
  tx = case.make()
  with jax.set_mesh(mesh):
    params = jax.device_put(
        cases.make_params(num_features=SHARDED_FEATURES, num_classes=SHARDED_CLASSES),
        {k: NamedSharding(mesh, v) for k, v in specs.items()})
    data = jax.device_put(cases.make_data(num_features=SHARDED_FEATURES),
                          NamedSharding(mesh, P()))
    state = tx.init(params)
    first = (params, state)
    step = jax.jit(_cond_step(case, tx, _gathered_loss, _gathered_logits))
    for t in range(steps):
      params, state = step(params, state, cases.batch_at(data, t), True)
      assert_same_types((params, state), first)
  for k, v in specs.items():
    assert params[k].sharding.is_equivalent_to(NamedSharding(mesh, v), params[k].ndim)
  want = _unsharded_reference(name, steps)
  chex.assert_trees_all_close(params, want[0], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state, want[1], rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# inject_hyperparams, schedules
# -----------------------------------------------------------------------------


def _sgd():
  return optax.sgd(0.1, momentum=0.9)


# (factory, base-free keyword arguments, static args, calling convention)
FACTORIES = {
    "ire": (ire_optax.ire, dict(kappa=3.0, gamma=0.6, refresh_every=1), (), "grad"),
    "sam": (ire_optax.sam, dict(rho=0.05), (), "grad"),
    "asam": (ire_optax.sam, dict(rho=0.5, adaptive=True), (), "grad"),
    "gsam": (ire_optax.gsam, dict(rho=0.05, alpha=0.4), (), "grad"),
    "sala": (ire_optax.sala, dict(sync_period=1, slow_step_size=0.5, rho=0.2), (), "grad"),
    "msam": (ire_optax.msam, dict(rho=0.05, num_microbatches=2), ("num_microbatches",), "msam"),
}


def _quadratic_update(tx, convention, params, grads, state):
  """One update on the parameters of Optax's inject test, with the gradient callbacks."""
  grad_of = lambda p: jax.tree.map(lambda x: 2.0 * x, p)
  if convention == "msam":
    return tx.update(None, state, params, grad_fn=lambda p, mb: grad_of(p),
                     batch={"x": jnp.zeros((4, 1))})
  return tx.update(grads, state, params, grad_fn=grad_of)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_inject_hyperparams_equals_the_plain_factory(name):
  factory, kwargs, static, convention = FACTORIES[name]
  opt = factory(_sgd(), **kwargs)
  opt_inject = optax.inject_hyperparams(factory, static_args=static)(_sgd(), **kwargs)
  params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
  upd = jax.jit(functools.partial(_quadratic_update, opt, convention))
  upd_inject = jax.jit(functools.partial(_quadratic_update, opt_inject, convention))
  updates, state = upd(params, grads, jax.jit(opt.init)(params))
  updates_inject, state_inject = upd_inject(params, grads, jax.jit(opt_inject.init)(params))
  chex.assert_trees_all_close(updates_inject, updates, rtol=1e-5)
  chex.assert_trees_all_close(state_inject.inner_state, state, rtol=1e-5, atol=1e-5)


SCHEDULABLE = [(name, h) for name, (_, kw, _, _) in FACTORIES.items()
               for h in ("kappa", "gamma", "rho", "alpha", "slow_step_size") if h in kw]


@pytest.mark.parametrize(("name", "hyper"), SCHEDULABLE)
def test_constant_schedule_equals_the_constant(name, hyper):
  factory, kwargs, _, convention = FACTORIES[name]
  value = kwargs[hyper]
  if hyper == "gamma":
    value = 0.5  # exact in float32, as a schedule's value is
  fixed = factory(_sgd(), **{**kwargs, hyper: value})
  scheduled = factory(_sgd(), **{**kwargs, hyper: optax.constant_schedule(value)})
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
  out = []
  for tx in (fixed, scheduled):
    p, s = params, tx.init(params)
    upd = jax.jit(functools.partial(_quadratic_update, tx, convention))
    for _ in range(5):
      u, s = upd(p, jax.tree.map(lambda x: 2.0 * x, p), s)
      p = optax.apply_updates(p, u)
    out.append(p)
  chex.assert_trees_all_close(out[0], out[1], rtol=1e-6, atol=1e-7)


# -----------------------------------------------------------------------------
# Optimization converges (Optax's targets)
# -----------------------------------------------------------------------------


def _parabola():
  final = jnp.array([1.0, -1.0, 1.0])
  return jnp.array([-1.0, 10.0, 1.0]), final, lambda p: jnp.sum(jnp.square(p - final))


def _rosenbrock():
  obj = lambda p: jnp.square(1.0 - p[0]) + 100.0 * jnp.square(p[1] - p[0] ** 2)
  return jnp.zeros(2), jnp.array([1.0, 1.0]), obj


def _matrix_parabola():
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]])
  return jnp.zeros((2, 2)), final, lambda p: jnp.sum(jnp.square(p - final))


def _mixed_tensor_target():
  f1, f2 = jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.0], [-1.0, 1.0]])
  obj = lambda p: jnp.sum(jnp.square(p[0] - f1)) + jnp.sum(jnp.square(p[1] - f2))
  return (jnp.zeros(3), jnp.zeros((2, 2))), (f1, f2), obj


TARGETS = {"parabola": _parabola, "rosenbrock": _rosenbrock,
           "matrix_parabola": _matrix_parabola, "mixed_tensor": _mixed_tensor_target}


def _adam():
  return optax.adam(1e-2)


# Small ascent radii (Optax's SAM test uses an adversarial learning rate of 1e-5): the
# minimizer of the sharpness-aware objective is then within the tolerance of the target.
CONVERGING = {
    "ire": lambda: ire_optax.ire(_adam(), kappa=2.0, gamma=0.5, refresh_every=5),
    "ire_hutchinson": lambda: ire_optax.ire(_adam(), kappa=2.0, gamma=0.5, refresh_every=5,
                                            curvature="hutchinson"),
    "sam": lambda: ire_optax.sam(_adam(), rho=1e-3),
    "asam": lambda: ire_optax.sam(_adam(), rho=1e-3, adaptive=True, adaptive_eta=0.01),
    "sam_every_3": lambda: ire_optax.sam(_adam(), rho=1e-3, every_k=3),
    "msam": lambda: ire_optax.msam(_adam(), rho=1e-3, num_microbatches=2),
    "gsam": lambda: ire_optax.gsam(_adam(), rho=1e-3, alpha=0.3),
    "sala": lambda: ire_optax.sala(_adam(), sync_period=2, slow_step_size=0.5, rho=1e-3),
    "ire_sam": lambda: ire_optax.ire(ire_optax.sam(_adam(), rho=1e-3), kappa=2.0, gamma=0.5,
                                     refresh_every=5),
    "ire_sala": lambda: ire_optax.ire(ire_optax.sala(_adam(), sync_period=2, rho=1e-3),
                                      kappa=2.0, gamma=0.5, refresh_every=5),
}


# Optax's alias tests use the parabola and Rosenbrock; its contrib tests add the 2-D and mixed
# targets, run here on the optimizers whose ranking or norm spans several leaves differently.
CONVERGENCE_PAIRS = ([(n, t) for n in CONVERGING for t in ("parabola", "rosenbrock")]
                     + [(n, t) for n in ("ire", "asam", "gsam")
                        for t in ("matrix_parabola", "mixed_tensor")])


@pytest.mark.parametrize(("name", "target"), CONVERGENCE_PAIRS)
def test_optimization_converges(name, target):
  tx = CONVERGING[name]()
  params, final, obj = TARGETS[target]()
  grad = jax.grad(obj)

  def step(carry, _):
    p, s = carry
    if name == "msam":
      u, s = tx.update(None, s, p, grad_fn=lambda q, mb: grad(q), batch=jnp.zeros((2, 1)))
    else:
      u, s = tx.update(grad(p), s, p, grad_fn=grad)
    return (optax.apply_updates(p, u), s), None

  steps = 10_000
  (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=steps))(
      (params, tx.init(params)))
  chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)
