"""2,048 training steps of every optimizer inside one ``lax.scan``.

``lax.scan`` requires the carry (params and optimizer state) to have the same
tree structure, shapes and dtypes after every step, so these runs fail if any
state leaf changes type from step to step. They also check that a long run
stays finite, that counters reach the right values, that IRE's mask keeps its
``uint8`` dtype and selected fraction, that SALA's cycle accounting adds up,
and that the loss went down. bfloat16 params are run as well (mixed
precision: the state must not drift to float32 either).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ire_optax
from ire_optax._src.ire import IREState
from ire_optax._src.sala import SALAState
from ire_optax._src.sam import SAMState
from tests import cases

NUM_STEPS = 2048


def _states(state, cls):
  return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
          if isinstance(s, cls)]


def _long_run(case, params):
  tx = case.make()
  step = cases.make_step(case, tx)
  data = cases.make_data()

  def body(carry, t):
    params, state = carry
    params, state, loss = step(params, state, cases.batch_at(data, t))
    return (params, state), loss

  @jax.jit
  def run(params):
    state = tx.init(params)
    return jax.lax.scan(body, (params, state), jnp.arange(NUM_STEPS))

  (params_out, state), losses = run(params)
  return tx, params_out, state, np.asarray(losses, np.float64)


LONG_CASES = sorted(cases.CASES) + ["bf16:ire_grad_sq", "bf16:sam", "bf16:sala", "bf16:ire_sam"]


@pytest.mark.parametrize("name", LONG_CASES)
def test_2k_steps_in_scan(name):
  dtype = jnp.bfloat16 if name.startswith("bf16:") else jnp.float32
  case = cases.CASES[name.removeprefix("bf16:")]
  params0 = cases.make_params(dtype)
  tx, params, state, losses = _long_run(case, params0)

  # Same structure, shapes and dtypes as a fresh state (scan enforced it every step).
  chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params0))
  chex.assert_trees_all_equal_shapes_and_dtypes(params, params0)
  chex.assert_tree_all_finite(params)
  chex.assert_tree_all_finite(state)
  assert losses.shape == (NUM_STEPS,)
  assert losses[-64:].mean() < 0.9 * losses[:4].mean(), (losses[:4], losses[-64:])

  inner_steps = NUM_STEPS // 3 if name.endswith("multisteps_ire_sam") else (
      NUM_STEPS // 2 if "multisteps" in name else NUM_STEPS)
  for s in _states(state, IREState):
    assert int(s.count) == inner_steps and s.count.dtype == jnp.int32
    n = sum(m.size for m in jax.tree.leaves(s.mask))
    flat = sum(int(m.sum()) for m in jax.tree.leaves(s.mask))
    assert all(m.dtype == jnp.uint8 for m in jax.tree.leaves(s.mask))
    assert 1 <= flat <= n and set(np.unique(np.concatenate(
        [np.asarray(m).ravel() for m in jax.tree.leaves(s.mask)]))) <= {0, 1}
  for s in _states(state, SAMState):
    assert int(s.count) == inner_steps
  for s in _states(state, SALAState):
    stats = ire_optax.sala_stats(state)
    k = 3 if "k3" in name else 2
    assert int(s.count) == inner_steps and int(stats["cycles"]) == -(-inner_steps // k)
    assert 0 <= int(stats["extra_grads"]) <= int(stats["cycles"])
    chex.assert_tree_all_finite(ire_optax.sala_eval_params(state))


def test_the_harness_catches_a_state_whose_dtype_changes():
  """A transformation whose state turns from int32 into float32 fails this test's scan."""
  def init(params):
    del params
    return {"count": jnp.zeros([], jnp.int32)}

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    return updates, {"count": state["count"] + 0.5}  # int32 + float -> float32

  broken = cases.Case(lambda: optax.GradientTransformationExtraArgs(init, update))
  with pytest.raises(TypeError, match="carry"):
    _long_run(broken, cases.make_params())
