"""Orbax checkpoints: every optimizer's state round-trips, and resuming is bit-identical.

For every optimizer of ``tests/cases.py`` (IRE with each estimator, SAM, ASAM,
mSAM, SALA, SAM-IRE, IRE over SALA and mSAM, inside ``MultiSteps``,
``inject_hyperparams``, ``apply_if_finite`` and ``chain``):

1. train 5 steps with one jitted step function and save ``{params, opt_state}``
   with Orbax (5 is mid-cycle for SALA, mid-accumulation for ``MultiSteps``
   and between two IRE mask refreshes);
2. restore into an abstract target built from ``jax.eval_shape(tx.init, params)``
   only (no live state), check that the restored tree equals the saved one bit
   for bit, with the same structure (the state NamedTuples), dtypes and
   shapes, and that the jitted step is not retraced for it;
3. continue 7 more steps and compare params, state and losses bit for bit with
   an uninterrupted 12-step run.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import ire_optax
from tests import cases

SAVE_AT, TOTAL = 5, 12


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _counting_jit(fn):
  """``jax.jit(fn)`` and a list that grows by one each time ``fn`` is traced."""
  traces = []

  def traced(*args):
    traces.append(None)
    return fn(*args)

  return jax.jit(traced), traces


def _run(step, params, state, data, start, stop):
  losses = []
  for t in range(start, stop):
    params, state, loss = step(params, state, cases.batch_at(data, t))
    losses.append(np.asarray(loss))
  return params, state, losses


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_orbax_round_trip_and_bit_identical_resume(name, tmp_path):
  case = cases.CASES[name]
  tx = case.make()
  params0, data = cases.make_params(), cases.make_data()
  step, traces = _counting_jit(cases.make_step(case, tx))

  # Uninterrupted reference run. One trace: the state's types (dtypes, shapes and
  # weak types) are the same after every step.
  ref_params, ref_state, ref_losses = _run(step, params0, tx.init(params0), data, 0, TOTAL)
  assert len(traces) == 1

  # Interrupted run: save at SAVE_AT, forget everything, restore, continue.
  params, state, losses = _run(step, params0, tx.init(params0), data, 0, SAVE_AT)
  saved = {"params": params, "opt_state": state}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", saved)
    ckptr.wait_until_finished()
  del params, state

  target = {"params": _abstract(params0),
            "opt_state": jax.eval_shape(tx.init, _abstract(params0))}
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(tmp_path / "ckpt", target)

  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  chex.assert_trees_all_equal_shapes_and_dtypes(restored, saved)
  chex.assert_trees_all_equal(restored, saved)  # bitwise

  # Orbax restores arrays strongly typed. The only weakly typed state leaves are the
  # integer hyperparameters that optax.inject_hyperparams stores as given (Python
  # ints); for those, and only those, the step is traced once more (same values).
  weak = [jax.tree_util.keystr(path) for path, x in jax.tree.leaves_with_path(saved)
          if x.aval.weak_type]
  assert all(".hyperparams[" in path for path in weak), weak
  params, state, more = _run(step, restored["params"], restored["opt_state"], data, SAVE_AT,
                             TOTAL)
  assert len(traces) == (2 if weak else 1), "the restored state retraced the jitted step"

  chex.assert_trees_all_equal(params, ref_params)
  chex.assert_trees_all_equal(state, ref_state)
  np.testing.assert_array_equal(np.stack(losses + more), np.stack(ref_losses))
  # The run did something (a test that cannot fail is a defect).
  assert not np.array_equal(np.asarray(ref_params["w"]), np.asarray(params0["w"]))


def test_checkpoint_manager_resume_from_latest_of_several(tmp_path):
  """The pod-run pattern: CheckpointManager, periodic saves, resume from the latest."""
  case = cases.CASES["ire_sala"]
  tx = case.make()
  params0, data = cases.make_params(), cases.make_data()
  step = jax.jit(cases.make_step(case, tx))
  ref_params, ref_state, _ = _run(step, params0, tx.init(params0), data, 0, 9)

  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  params, state = params0, tx.init(params0)
  with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
    for t in range(7):  # "crashes" after step 7 (saves after steps 2, 4, 6)
      params, state, _ = step(params, state, cases.batch_at(data, t))
      if (t + 1) % 2 == 0:
        mngr.save(t + 1, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [4, 6]

  with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
    latest = mngr.latest_step()
    target = {"params": _abstract(params0),
              "opt_state": jax.eval_shape(tx.init, _abstract(params0))}
    restored = mngr.restore(latest, args=ocp.args.StandardRestore(target))
  assert latest == 6
  params, state, _ = _run(step, restored["params"], restored["opt_state"], data, latest, 9)
  chex.assert_trees_all_equal(params, ref_params)
  chex.assert_trees_all_equal(state, ref_state)
  # The helpers read the restored nested state.
  chex.assert_trees_all_equal(ire_optax.sala_eval_params(state),
                              ire_optax.sala_eval_params(ref_state))
  chex.assert_trees_all_equal(ire_optax.ire_flat_mask(state), ire_optax.ire_flat_mask(ref_state))


def test_bfloat16_state_round_trips(tmp_path):
  """Mixed precision: bfloat16 params and state leaves keep their dtype through Orbax."""
  params = cases.make_params(jax.numpy.bfloat16)
  tx = ire_optax.ire(ire_optax.sala(optax.adamw(1e-2), sync_period=2), kappa=2.0, gamma=0.6)
  case = cases.Case(lambda: tx)
  step = jax.jit(cases.make_step(case, tx))
  data = cases.make_data()
  params, state, _ = _run(step, params, tx.init(params), data, 0, 3)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "ckpt", jax.eval_shape(tx.init, _abstract(params)))
  assert ire_optax.sala_eval_params(restored)["w"].dtype == jax.numpy.bfloat16
  chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
  chex.assert_trees_all_equal(restored, state)
