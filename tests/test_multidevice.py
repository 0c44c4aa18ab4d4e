"""Every optimizer on 8 emulated devices equals the same optimizer on one device.

The same 2-layer MLP is trained on the same global batches of scikit-learn's
digits (64 examples a step = 8 devices x 8) in four ways:

* ``single``: one device, no ``axis_name``, the whole batch (the reference);
* ``shard_map`` and ``pmap``: data parallel, 8 examples per device, the
  optimizer built with ``axis_name="d"``;
* ``gspmd``: plain ``jax.jit`` with the batch sharded over a device mesh and no
  ``axis_name`` (XLA's SPMD partitioner inserts the collectives).

Calling conventions (see docs/multi_device.md): for IRE and plain Optax the
train step ``pmean``-s the gradient itself; SAM, ASAM, SALA and SAM-IRE receive
the *local* gradient and a local ``grad_fn`` and average internally; mSAM
receives the local batch. After a few steps the parameters **and the whole
optimizer state** (IRE masks, SALA slow weights, momenta, keys) must agree
with the single-device run within float tolerance.

Exceptions, where the algorithm is defined per device:

* m-sharpness: ``msam(num_microbatches=1, axis_name)`` and
  ``sam(per_device_ascent=True, axis_name)`` on 8 devices equal
  ``msam(num_microbatches=8)`` on one device (and ``msam(2)`` on 8 devices
  equals ``msam(16)`` on one).
* IRE with ``curvature="fisher"``: every device samples labels for its own
  examples and the per-device estimates ``(∇ CE_d)²`` are averaged (a mean of
  squares, not the square of the mean). The single-device reference is
  therefore IRE with a user estimator that computes exactly that documented
  average over the 8 slices of the batch with the same PRNG key. Under GSPMD
  there is no per-device notion and ``"fisher"`` equals one device exactly.
  (``"hutchinson"`` needs no exception: ``z ⊙ (mean_d H_d) z`` is the
  single-device estimate for the global batch when every device draws the same
  ``z``.)

Sharded parameters (FSDP-style ``NamedSharding``) are tested at the end:
equality with one device, optimizer state inheriting the parameters' sharding,
and no all-gather of parameter-sized arrays in the optimizer update (IRE's
ranking, SAM's norm and SALA's distance are global reductions of scalars and
histograms only).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import ire_optax
from ire_optax._src import estimators as curv
from ire_optax._src import utils

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

NDEV = 8
PER_DEVICE = 8
GLOBAL = NDEV * PER_DEVICE
STEPS = 4
# Parameters are O(0.1); Adam divides by sqrt(v), which turns float-rounding
# differences of the reductions into ~1e-6 absolute differences after 4 steps.
TOL = dict(rtol=1e-5, atol=1e-5)

pytestmark = pytest.mark.skipif(
    jax.device_count() < NDEV, reason=f"needs {NDEV} (emulated) devices; see tests/conftest.py"
)


# -----------------------------------------------------------------------------
# Model, data, train steps
# -----------------------------------------------------------------------------


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
  x, y = load_digits(return_X_y=True)
  return (x / 16.0).astype(np.float32), y.astype(np.int32)


def batches(steps: int = STEPS) -> list[dict[str, jax.Array]]:
  """``steps`` disjoint global batches of 64 digits."""
  x, y = _digits()
  return [
      {"x": jnp.asarray(x[t * GLOBAL:(t + 1) * GLOBAL]),
       "y": jnp.asarray(y[t * GLOBAL:(t + 1) * GLOBAL])}
      for t in range(steps)
  ]


def init_params(seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {
      "w1": jnp.asarray(rng.normal(0, 0.3, (64, 16)), jnp.float32),
      "b1": jnp.asarray(rng.normal(0, 0.1, (16,)), jnp.float32),
      "w2": jnp.asarray(rng.normal(0, 0.3, (16, 10)), jnp.float32),
      "b2": jnp.asarray(rng.normal(0, 0.1, (10,)), jnp.float32),
  }


def logits(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def loss(params, batch):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits(params, batch["x"]), batch["y"]))


grad = jax.grad(loss)


def make_step(tx, kind: str, axis_name: str | None, extras: tuple[str, ...] = (),
              vma: bool = False) -> Callable:
  """The train step of each calling convention.

  * ``"plain"`` (Optax, IRE): the step averages the gradient over the data axis.
  * ``"sam"`` (SAM, ASAM, SALA, SAM-IRE): local gradient and local ``grad_fn``;
    the optimizer averages.
  * ``"msam"``: local batch and ``grad_fn(params, microbatch)``.

  ``extras`` names the model callbacks an IRE estimator needs (``grad_fn`` for
  Hutchinson, ``logits_fn`` for Fisher), always on the local batch.

  ``vma``: inside ``shard_map(check_vma=True)`` JAX sums the gradient of a
  replicated input over the axis; the clean gradient is therefore taken at
  ``pcast(params, to="varying")``. (The optimizers do the same for the points
  where they call ``grad_fn``/``logits_fn``, so the callbacks stay plain.)
  """
  per_device = (lambda p: jax.lax.pcast(p, axis_name, to="varying")) if vma else (lambda p: p)

  def step(params, state, batch):
    if kind == "msam":
      updates, state = tx.update(None, state, params, grad_fn=grad, batch=batch)
      return optax.apply_updates(params, updates), state
    local_grad_fn = lambda q: grad(q, batch)
    g = local_grad_fn(per_device(params))
    kw: dict[str, Any] = {}
    if kind == "plain":
      g = utils.pmean_if(g, axis_name)
    else:
      kw["grad_fn"] = local_grad_fn
    if "grad_fn" in extras:
      kw["grad_fn"] = local_grad_fn
    if "logits_fn" in extras:
      kw["logits_fn"] = lambda q: logits(q, batch["x"])
    updates, state = tx.update(g, state, params, **kw)
    return optax.apply_updates(params, updates), state

  return step


# -----------------------------------------------------------------------------
# Runners
# -----------------------------------------------------------------------------


# LLVM optimisation level 0 halves the compile time of these tiny programs; the
# single-device references are compiled the same way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(fn, *args):
  """``fn`` (a ``jax.jit`` or ``jax.pmap``) compiled for ``args`` with :data:`FAST_COMPILE`."""
  return fn.lower(*args).compile(FAST_COMPILE)


def run_single(tx, kind, extras, data, params):
  state = tx.init(params)
  step = compiled(jax.jit(make_step(tx, kind, None, extras)), params, state, data[0])
  for batch in data:
    params, state = step(params, state, batch)
  return params, state


def data_mesh():
  return jax.make_mesh((NDEV,), ("d",), devices=jax.devices()[:NDEV])


def run_shard_map(tx, kind, extras, data, params, *, check_vma=False, axes=("d",)):
  # ``axes``: one data axis, or two (a 2 x 4 mesh, the optimizers given the tuple).
  mesh = jax.make_mesh((2, NDEV // 2), axes, devices=jax.devices()[:NDEV]) if len(axes) == 2 \
      else data_mesh()
  ax = axes if len(axes) == 2 else axes[0]
  # With check_vma=True replicated outputs (out_specs P()) type-check only if
  # everything that leaves the step was made device-invariant by a collective.
  step = jax.jit(jax.shard_map(make_step(tx, kind, ax, extras, vma=check_vma), mesh=mesh,
                               in_specs=(P(), P(), P(ax)), out_specs=(P(), P()),
                               check_vma=check_vma))
  rep, dp = NamedSharding(mesh, P()), NamedSharding(mesh, P(ax))
  params = jax.device_put(params, rep)
  state = jax.device_put(tx.init(params), rep)
  data = [jax.device_put(batch, dp) for batch in data]
  step = compiled(step, params, state, data[0])
  for batch in data:
    params, state = step(params, state, batch)
  return params, state


def run_mapped(tx, kind, extras, data, params, *, vmap=False):
  # pmap, or jax.vmap with an axis name, which emulates the devices on one (its axis has no
  # check_vma types).
  fn = make_step(tx, kind, "d", extras)
  step = jax.jit(jax.vmap(fn, axis_name="d")) if vmap else jax.pmap(
      fn, axis_name="d", devices=jax.devices()[:NDEV])
  rep = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (NDEV, *jnp.shape(a))), tree)
  params, state = rep(params), rep(tx.init(params))
  data = [jax.tree.map(lambda a: a.reshape(NDEV, PER_DEVICE, *a.shape[1:]), b) for b in data]
  step = compiled(step, params, state, data[0])
  for batch in data:
    params, state = step(params, state, batch)
  # Every device must hold the same parameters and state (bitwise).
  for leaf in jax.tree.leaves((params, state)):
    leaf = np.asarray(leaf)
    for d in range(1, NDEV):
      np.testing.assert_array_equal(leaf[d], leaf[0])
  return jax.tree.map(lambda a: a[0], (params, state))


def run_gspmd(tx, kind, extras, data, params):
  mesh = data_mesh()
  rep, dp = NamedSharding(mesh, P()), NamedSharding(mesh, P("d"))
  params = jax.device_put(params, rep)
  state = jax.device_put(tx.init(params), rep)
  data = [jax.device_put(batch, dp) for batch in data]
  step = compiled(jax.jit(make_step(tx, kind, None, extras)), params, state, data[0])
  for batch in data:
    params, state = step(params, state, batch)
  return params, state


RUNNERS = {
    "shard_map": run_shard_map,
    "shard_map_vma": functools.partial(run_shard_map, check_vma=True),
    "pmap": run_mapped,
    "vmap": functools.partial(run_mapped, vmap=True),
    "shard_map_vma_2d": functools.partial(run_shard_map, check_vma=True, axes=("a", "b")),
    "gspmd": run_gspmd,
}


# -----------------------------------------------------------------------------
# The optimizers
# -----------------------------------------------------------------------------


def sgd():
  return optax.sgd(0.05, momentum=0.9)


def adamw():
  return optax.adamw(1e-2, weight_decay=0.1)


def fisher_average_over_devices(grads, params, key, *, batch_x, **_):
  """What IRE(fisher) on 8 devices ranks: the mean of the 8 per-device estimates.

  Every device samples labels for its own 8 examples with the *same* key (the
  replicated IRE state) and squares its own gradient; ``axis_name`` averages.
  """
  del grads
  slices = batch_x.reshape(NDEV, PER_DEVICE, -1)
  hs = [curv.fisher_diag(lambda q, x=x: logits(q, x), params, key) for x in slices]
  return jax.tree.map(lambda *h: sum(h) / NDEV, *hs)


@dataclasses.dataclass(frozen=True)
class Case:
  """``make(axis_name)`` builds the optimizer; ``kind`` its train-step convention.

  ``ref`` (optional) is ``(make, kind, extras)`` of the single-device reference
  of the *mapped* runs when the algorithm is defined per device; ``gspmd``
  runs and their reference always use ``make(None)``.
  """

  make: Callable[[str | None], Any]
  kind: str
  extras: tuple[str, ...] = ()
  ref: tuple[Callable[[], Any], str, tuple[str, ...]] | None = None


IRE_KW = dict(kappa=2.0, gamma=0.5, refresh_every=2)

CASES = {
    "adamw": Case(lambda ax: adamw(), "plain"),
    "ire_grad_sq": Case(lambda ax: ire_optax.ire(adamw(), axis_name=ax, **IRE_KW), "plain"),
    "ire_grad_sq_ema": Case(
        lambda ax: ire_optax.ire(adamw(), ema_decay=0.9, axis_name=ax, **IRE_KW), "plain"),
    "ire_hutchinson": Case(
        lambda ax: ire_optax.ire(adamw(), curvature="hutchinson", axis_name=ax, **IRE_KW),
        "plain", ("grad_fn",)),
    "ire_fisher": Case(
        lambda ax: ire_optax.ire(sgd(), curvature="fisher", axis_name=ax, **IRE_KW),
        "plain", ("logits_fn",),
        ref=(lambda: ire_optax.ire(sgd(), curvature=fisher_average_over_devices, **IRE_KW),
             "plain", ("batch_x",))),
    "ire_user_estimator": Case(
        lambda ax: ire_optax.ire(
            sgd(), curvature=lambda g, p, key, **_: jax.tree.map(lambda a, b: jnp.abs(a * b), g, p),
            axis_name=ax, **IRE_KW),
        "plain"),
    "sam": Case(lambda ax: ire_optax.sam(sgd(), rho=0.1, axis_name=ax), "sam"),
    "asam": Case(lambda ax: ire_optax.sam(sgd(), rho=0.5, adaptive=True, axis_name=ax), "sam"),
    "sala": Case(
        lambda ax: ire_optax.sala(optax.sgd(0.05, momentum=0.9, nesterov=True), sync_period=2,
                                  slow_step_size=0.5, rho=0.05, axis_name=ax),
        "sam"),
    "sam_ire": Case(
        lambda ax: ire_optax.ire(ire_optax.sam(sgd(), rho=0.1, axis_name=ax), axis_name=ax,
                                 **IRE_KW),
        "sam"),
    # Per-device gradients reach IRE: its EMA of g² must be that of the mean gradient.
    "sam_ire_ema": Case(
        lambda ax: ire_optax.ire(ire_optax.sam(sgd(), rho=0.1, axis_name=ax), axis_name=ax,
                                 ema_decay=0.9, **IRE_KW),
        "sam"),
    # m-sharpness: one micro-batch per device = mSAM with 8 micro-batches on one device.
    "msam_per_device": Case(
        lambda ax: ire_optax.msam(sgd(), rho=0.1, num_microbatches=1, axis_name=ax)
        if ax else ire_optax.msam(sgd(), rho=0.1, num_microbatches=NDEV),
        "msam",
        ref=(lambda: ire_optax.msam(sgd(), rho=0.1, num_microbatches=NDEV), "msam", ())),
    "sam_per_device_ascent": Case(
        lambda ax: ire_optax.sam(sgd(), rho=0.1, axis_name=ax, per_device_ascent=True),
        "sam",
        ref=(lambda: ire_optax.msam(sgd(), rho=0.1, num_microbatches=NDEV), "msam", ())),
    "msam_scan": Case(
        lambda ax: ire_optax.msam(sgd(), rho=0.1, num_microbatches=2 if ax else 2 * NDEV,
                                  axis_name=ax, microbatch_mode="scan"),
        "msam",
        ref=(lambda: ire_optax.msam(sgd(), rho=0.1, num_microbatches=2 * NDEV), "msam", ())),
    "msam_2_per_device": Case(
        lambda ax: ire_optax.msam(sgd(), rho=0.1, num_microbatches=2, axis_name=ax),
        "msam",
        ref=(lambda: ire_optax.msam(sgd(), rho=0.1, num_microbatches=2 * NDEV), "msam", ())),
}


def _single_reference(case: Case, mode: str, data, params):
  if mode != "gspmd" and case.ref is not None:
    make, kind, extras = case.ref
    tx = make()
    if "batch_x" in extras:  # the user estimator of the Fisher reference reads the batch
      def step_fn(p, s, batch):
        g = grad(p, batch)
        u, s = tx.update(g, s, p, batch_x=batch["x"])
        return optax.apply_updates(p, u), s
      state = tx.init(params)
      step = compiled(jax.jit(step_fn), params, state, data[0])
      for batch in data:
        params, state = step(params, state, batch)
      return params, state
    return run_single(tx, kind, extras, data, params)
  return run_single(case.make(None), case.kind, case.extras, data, params)


@functools.cache
def _reference(name: str, mode_class: str):
  case = CASES[name]
  if case.ref is None:
    mode_class = "gspmd"  # the same reference for every mode
  return _single_reference(case, mode_class, batches(), init_params())


# Every optimizer runs under shard_map (check_vma=True, JAX's default) and under
# GSPMD; pmap and shard_map(check_vma=False) (the same semantics as pmap) run
# for a subset that covers every calling convention, to keep CI time modest.
PMAP_CASES = ("ire_grad_sq", "ire_fisher", "sam", "sala", "sam_ire", "sam_ire_ema",
              "msam_per_device")
NO_VMA_CASES = ("ire_hutchinson", "asam", "sam_per_device_ascent", "msam_2_per_device")
# jax.vmap(axis_name=...) and a tuple of two mesh axes: the optimizers that make points
# per-device before they call the model's callbacks.
VMAP_CASES = ("ire_hutchinson", "ire_fisher", "sam", "sala", "msam_per_device",
              "sam_per_device_ascent", "msam_scan")
PAIRS = (
    [(name, "shard_map_vma") for name in CASES]
    + [(name, "gspmd") for name in CASES if name != "sam_per_device_ascent"]
    + [(name, "pmap") for name in PMAP_CASES]
    + [(name, "shard_map") for name in NO_VMA_CASES]
    + [(name, mode) for name in VMAP_CASES for mode in ("vmap", "shard_map_vma_2d")]
)


@pytest.mark.parametrize(("name", "mode"), PAIRS)
def test_data_parallel_equals_one_device(name, mode):
  case = CASES[name]
  want = _reference(name, "gspmd" if mode == "gspmd" else "mapped")
  ax = None if mode == "gspmd" else ("a", "b") if mode.endswith("_2d") else "d"
  got = RUNNERS[mode](case.make(ax), case.kind, case.extras, batches(), init_params())
  chex.assert_trees_all_close(got[0], want[0], **TOL)
  if jax.tree.structure(got[1]) == jax.tree.structure(want[1]):
    chex.assert_trees_all_close(got[1], want[1], **TOL)
  # The test would be vacuous if nothing moved.
  assert not np.allclose(np.asarray(got[0]["w2"]), np.asarray(init_params()["w2"]))


# -----------------------------------------------------------------------------
# Sharded parameters (FSDP-style NamedSharding, plain jax.jit)
# -----------------------------------------------------------------------------


AXIS_TYPES = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}


def fsdp_mesh(axis_type: str):
  t = AXIS_TYPES[axis_type]
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(t, t),
                       devices=jax.devices()[:NDEV])


def fsdp_param_specs():
  # Leading axes split over "fsdp" where they divide by 4; b2 (10 entries) replicated.
  return {"w1": P("fsdp", None), "b1": P("fsdp"), "w2": P("fsdp", None), "b2": P()}


def fsdp_loss(params, batch, mesh, axis_type):
  if axis_type == "explicit":
    # The FSDP all-gather of the weights for the forward pass (its transpose
    # reduce-scatters the gradient). Under Auto axes GSPMD decides by itself.
    params = jax.tree.map(lambda w: jax.sharding.reshard(w, NamedSharding(mesh, P())), params)
  return loss(params, batch)


def assert_state_inherits_param_sharding(state, params):
  """Every state leaf shaped like a parameter carries that parameter's sharding."""
  by_shape = {p.shape: p.sharding for p in jax.tree.leaves(params)}
  checked = 0
  for leaf in jax.tree.leaves(state):
    if leaf.ndim and leaf.shape in by_shape:
      want = by_shape[leaf.shape]
      assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.shape, leaf.sharding, want)
      checked += 1
  assert checked >= len(by_shape)


FSDP_CASES = ("ire_grad_sq", "sam", "asam", "sala", "sam_ire", "msam_per_device")


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
@pytest.mark.parametrize("name", FSDP_CASES)
def test_fsdp_sharded_params_match_one_device(name, axis_type):
  """Params sharded over "fsdp", batch over ("data", "fsdp"): same result as one device.

  SAM's global norm, SALA's distance and IRE's global ranking are reductions
  over the sharded tree that XLA completes with all-reduces; the optimizer
  state is created with (and keeps) the parameters' sharding.
  """
  case = CASES[name]
  mesh = fsdp_mesh(axis_type)
  tx = case.make(None)
  specs = fsdp_param_specs()
  params = jax.device_put(init_params(), {k: NamedSharding(mesh, v) for k, v in specs.items()})
  state = tx.init(params)
  assert_state_inherits_param_sharding(state, params)
  dp = NamedSharding(mesh, P(("data", "fsdp")))
  data = [jax.device_put(b, dp) for b in batches()]
  g = jax.grad(functools.partial(fsdp_loss, mesh=mesh, axis_type=axis_type))

  def step(params, state, batch):
    if case.kind == "msam":
      u, state = tx.update(None, state, params, grad_fn=g, batch=batch)
    else:
      u, state = tx.update(g(params, batch), state, params, grad_fn=lambda q: g(q, batch))
    return optax.apply_updates(params, u), state

  out_shardings = None
  if axis_type == "auto":
    # Under Auto axes the output shardings are XLA's choice unless requested.
    out_shardings = jax.tree.map(
        lambda a: a.sharding if isinstance(a.sharding, NamedSharding)
        else NamedSharding(mesh, P()), (params, state))
  fn = compiled(jax.jit(step, out_shardings=out_shardings), params, state, data[0])
  for batch in data:
    params, state = fn(params, state, batch)
  want = _reference(name, "gspmd")
  chex.assert_trees_all_close(params, want[0], **TOL)
  chex.assert_trees_all_close(state, want[1], **TOL)
  for k, v in specs.items():
    assert params[k].sharding.is_equivalent_to(NamedSharding(mesh, v), params[k].ndim)
  assert_state_inherits_param_sharding(state, params)


def assert_same_types(a, b):
  """The leaves of ``a`` and ``b`` have the same types: shapes, dtypes and shardings."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert jax.typeof(x) == jax.typeof(y), (jax.typeof(x), jax.typeof(y))
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


@pytest.mark.parametrize("num_microbatches", [2, NDEV])
@pytest.mark.parametrize("mode", ["auto", "vmap", "scan", "unroll"])
def test_msam_explicit_mesh_every_mode(mode, num_microbatches):
  """mSAM inside ``jax.set_mesh`` with an Explicit FSDP mesh, in every micro-batch mode.

  The accumulators of the sequential modes carry the gradients' sharding, and
  vmap does not stack the perturbed params along a micro-batch axis sharded
  over the params' mesh axis (``num_microbatches=8``: one micro-batch per
  device). The result is the unsharded one, and the state keeps its shapes,
  dtypes and shardings from step to step (checked, as Optax does, by a
  ``lax.cond`` whose branches must have the same types).
  """
  make = lambda: ire_optax.msam(sgd(), rho=0.1, num_microbatches=num_microbatches,
                                microbatch_mode=mode)
  want = run_single(make(), "msam", (), batches(), init_params())
  mesh = fsdp_mesh("explicit")
  tx = make()
  g = jax.grad(functools.partial(fsdp_loss, mesh=mesh, axis_type="explicit"))

  def step(params, state, batch, take):
    def update():
      u, s = tx.update(None, state, params, grad_fn=g, batch=batch)
      return optax.apply_updates(params, u), s
    return jax.lax.cond(take, update, lambda: (params, state))

  with jax.set_mesh(mesh):
    params = jax.device_put(init_params(), {k: NamedSharding(mesh, v)
                                            for k, v in fsdp_param_specs().items()})
    state = tx.init(params)
    assert_state_inherits_param_sharding(state, params)
    first = (params, state)
    dp = NamedSharding(mesh, P(("data", "fsdp")))
    data = [jax.device_put(b, dp) for b in batches()]
    fn = compiled(jax.jit(step), params, state, data[0], True)
    for batch in data:
      params, state = fn(params, state, batch, True)
      assert_same_types((params, state), first)
  chex.assert_trees_all_close(params, want[0], **TOL)
  chex.assert_trees_all_close(state, want[1], **TOL)


def _big_tree(seed=3):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.standard_normal((NDEV * 16, 24)), jnp.float32),
          "v": jnp.asarray(rng.standard_normal(NDEV * 8), jnp.float32)}


def _elementwise_grad_fn(p):
  # The gradient of sum(c * p**2 / 2 + sin(p)): elementwise, so any all-gather in
  # the compiled update would come from the optimizer, not from the "model".
  return jax.tree.map(lambda x: 1.5 * x + jnp.cos(x), p)


UPDATE_CASES = {
    "ire": lambda: ire_optax.ire(adamw(), kappa=2.0, gamma=0.6, refresh_every=1),
    "sam": lambda: ire_optax.sam(sgd(), rho=0.3),
    "asam": lambda: ire_optax.sam(sgd(), rho=0.5, adaptive=True),
    "sala": lambda: ire_optax.sala(sgd(), sync_period=1, slow_step_size=0.5, rho=0.3),
    "sam_ire": lambda: ire_optax.ire(ire_optax.sam(sgd(), rho=0.3), refresh_every=1),
}


@pytest.mark.parametrize("name", list(UPDATE_CASES))
def test_sharded_update_is_global_without_gathering_params(name):
  """The optimizer update alone, over parameters sharded on 8 devices (Explicit mesh).

  Exactly the single-device result (IRE's mask, SAM's ε, SALA's distance are
  global), states keep the parameters' sharding, and the compiled update has
  no all-gather: IRE combines 2 x 65,536-bin histograms, SAM and SALA scalar
  sums of squares, with all-reduces.
  """
  mesh = jax.make_mesh((NDEV,), ("p",), devices=jax.devices()[:NDEV])
  shardings = {"w": NamedSharding(mesh, P("p", None)), "v": NamedSharding(mesh, P("p"))}
  tx = UPDATE_CASES[name]()
  params = _big_tree()
  grads = _elementwise_grad_fn(params)

  def update(g, s, p):
    u, s = tx.update(g, s, p, grad_fn=_elementwise_grad_fn)
    return optax.apply_updates(p, u), s

  want_p, want_s = update(grads, tx.init(params), params)  # one device, eager
  sp = jax.device_put(params, shardings)
  sg = jax.device_put(grads, shardings)
  state = tx.init(sp)
  assert_state_inherits_param_sharding(state, sp)
  lowered = jax.jit(update).lower(sg, state, sp)
  hlo = lowered.compile(FAST_COMPILE).as_text()
  assert "all-gather" not in hlo
  assert "all-reduce" in hlo
  got_p, got_s = lowered.compile(FAST_COMPILE)(sg, state, sp)
  chex.assert_trees_all_close(got_p, want_p, **TOL)
  chex.assert_trees_all_close(got_s, want_s, **TOL)
  assert_state_inherits_param_sharding(got_s, sp)
  if name in ("ire", "sam_ire"):
    mask = ire_optax.ire_flat_mask(got_s)
    assert sum(int(np.sum(np.asarray(m))) for m in jax.tree.leaves(mask)) == int(
        0.6 * (NDEV * 16 * 24 + NDEV * 8))


@pytest.mark.parametrize("method", ["threshold", "scatter"])
@pytest.mark.parametrize("layout", ["partitioned", "one_replicated", "all_replicated"])
def test_ire_shard_map_fsdp_with_shard_axis_name(method, layout):
  """Inside shard_map each device holds a slice of the params: `shard_axis_name` psums
  the ranking histograms, so the mask is the global one (no gather). A leaf kept whole on
  every device (a bias, P()) is counted once, not once per device, also when every leaf is."""
  mesh = jax.make_mesh((NDEV,), ("p",), devices=jax.devices()[:NDEV])
  specs = {"w": P("p", None), "v": P("p")}
  params = _big_tree(4)
  if layout != "partitioned":
    specs["b"] = P()
    params["b"] = jnp.linspace(-1.0, 1.0, 10)
  if layout == "all_replicated":
    specs = {k: P() for k in specs}
  shardings = {k: NamedSharding(mesh, v) for k, v in specs.items()}
  grads = _elementwise_grad_fn(params)
  tx = ire_optax.ire(adamw(), kappa=2.0, gamma=0.6, refresh_every=1)
  want_u, want_s = tx.update(grads, tx.init(params), params)
  local_tx = ire_optax.ire(adamw(), kappa=2.0, gamma=0.6, refresh_every=1, shard_axis_name="p")
  state_specs = jax.tree.map(lambda _: P(), tx.init(params))
  state_specs = state_specs._replace(mask=specs,
                                     base_state=jax.tree.map(lambda _: P(), want_s.base_state))
  # Adam's moments are parameter-shaped: partition them like the params.
  state_specs = state_specs._replace(base_state=(
      state_specs.base_state[0]._replace(mu=specs, nu=specs), *state_specs.base_state[1:]))
  f = jax.jit(jax.shard_map(lambda g, s, p: local_tx.update(g, s, p), mesh=mesh,
                            in_specs=(specs, state_specs, specs),
                            out_specs=(specs, state_specs)))
  sp = jax.device_put(params, shardings)
  state = jax.device_put(local_tx.init(params), jax.tree.map(
      lambda s: NamedSharding(mesh, s), state_specs))
  with ire_optax.selection_method(method):
    got_u, got_s = f(jax.device_put(grads, shardings), state, sp)
  chex.assert_trees_all_close(got_u, want_u, **TOL)
  chex.assert_trees_all_close(got_s.mask, want_s.mask)


@pytest.mark.parametrize("method", ["threshold", "scatter"])
def test_flat_mask_over_a_tuple_of_axes_with_leaves_split_over_some(method):
  """A 2 x 4 mesh, `axis_name=("r", "d")`: a leaf split over both axes, one over "d" only
  (replicated over "r"), one kept whole. Each is counted once per device of the axes it is
  split over, so the mask is the one-device mask."""
  mesh = jax.make_mesh((2, NDEV // 2), ("r", "d"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:NDEV])
  rng = np.random.default_rng(5)
  tree = {"both": jnp.asarray(rng.permutation(64), jnp.float32).reshape(16, 4),
          "d": jnp.asarray(rng.permutation(24) + 0.5, jnp.float32),
          "whole": jnp.asarray(rng.permutation(6) + 0.25, jnp.float32)}
  specs = {"both": P(("r", "d"), None), "d": P("d"), "whole": P()}
  want = ire_optax.flat_mask(tree, 0.3)
  with ire_optax.selection_method(method):
    got = jax.jit(jax.shard_map(lambda t: ire_optax.flat_mask(t, 0.3, axis_name=("r", "d")),
                                mesh=mesh, in_specs=(specs,), out_specs=specs))(tree)
  chex.assert_trees_all_equal(got, want)
  assert sum(int(m.sum()) for m in jax.tree.leaves(got)) == int(0.3 * (64 + 24 + 6))


def test_sampled_labels_key_takes_the_logits_per_device_type():
  """Under shard_map(check_vma) the fisher estimator samples each device's labels with the
  replicated key: the key is cast to the logits' varying axes (JAX 0.12 refuses
  `jax.random.categorical` on a less varying key), and every device draws as one device
  does for its own logits with that key."""
  mesh = jax.make_mesh((2, NDEV // 2), ("r", "d"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:NDEV])
  logits = jax.random.normal(jax.random.key(1), (NDEV * 3, 5))
  key = jax.random.key(7)

  def per_device(x, k):
    assert utils.varying_axes(utils.vary_like(k, x)) == utils.varying_axes(x) == {"r", "d"}
    assert utils.varying_axes(utils.vary_like(x, k)) == utils.varying_axes(x)  # no narrowing
    return curv.sampled_label_loss(x, k)[None]

  got = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(("r", "d")), P()),
                              out_specs=P(("r", "d"))))(logits, key)
  want = [curv.sampled_label_loss(x, key) for x in logits.reshape(NDEV, 3, 5)]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


# -----------------------------------------------------------------------------
# The data-parallel example
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["sam", "adamw+ire"])
def test_data_parallel_example_gspmd_equals_shard_map(opt, tmp_path):
  """examples/data_parallel.py: both placements over 8 devices train the same Llama."""
  from examples import data_parallel

  argv = ["--size", "toy", "--steps", "3", "--log-every", "3", "--batch-size", "16",
          "--seq-len", "16", "--max-chars", "20000", "--opt", opt, "--ire-curvature", "grad_sq",
          "--ire-refresh-every", "2", "--fast-compile", "--out", str(tmp_path)]
  runs = {dp: data_parallel.main([*argv, "--data-parallel", dp]) for dp in ("gspmd", "shard_map")}
  assert runs["gspmd"]["devices"] == NDEV
  assert np.isfinite(runs["gspmd"]["loss"])
  chex.assert_trees_all_close(runs["shard_map"]["params"], runs["gspmd"]["params"], **TOL)
  assert (tmp_path / f"data_parallel-gspmd-{opt}" / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("name", ["ire", "ire(sam)", "sala"])
def test_a_forgotten_axis_name_inside_shard_map_is_named(name):
  """Without ``axis_name``, IRE and SALA failed inside their ``lax.cond`` ("cond branches must
  have equal output types"), or trained each device on its own where no conditional ran."""
  make = {"ire": lambda ax: ire_optax.ire(optax.sgd(0.1), axis_name=ax),
          "ire(sam)": lambda ax: ire_optax.ire(ire_optax.sam(optax.sgd(0.1), axis_name="d"),
                                               axis_name=ax),
          "sala": lambda ax: ire_optax.sala(optax.sgd(0.1), axis_name=ax)}[name]
  params, batch = {"w": jnp.ones(3)}, jnp.arange(2.0 * NDEV).reshape(NDEV, 2)
  loss = lambda p, b: jnp.sum(p["w"] ** 2) * jnp.sum(b)

  mesh = data_mesh()

  def run(ax):
    tx = make(ax)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d")),
                       out_specs=P(), check_vma=True)
    def step(p, b):
      grad_fn = lambda q: jax.grad(loss)(q, b)  # the optimizers pass per-device params
      g = grad_fn(jax.lax.pcast(p, "d", to="varying"))  # the local gradient (not its psum)
      updates, _ = tx.update(g, tx.init(p), p, grad_fn=grad_fn)
      return jax.lax.pmean(optax.apply_updates(p, updates), "d")

    return step(jax.device_put(params, NamedSharding(mesh, P())),
                jax.device_put(batch, NamedSharding(mesh, P("d"))))

  with pytest.raises(ValueError, match=r"the gradient varies over the mapped axis 'd'.*pass "
                     r"axis_name=<axis>"):
    run(None)
  chex.assert_tree_all_finite(run("d"))


def test_msam_with_a_forgotten_axis_name_inside_shard_map_is_refused():
  """msam took each micro-batch gradient at the replicated params: JAX returned them summed over
  the devices, device-invariant, so the step trained silently on n times the gradient of other
  micro-batches."""
  params, batch = {"w": jnp.ones(3)}, jnp.arange(4.0 * NDEV).reshape(2 * NDEV, 2)
  grad_fn = lambda p, b: jax.grad(lambda q: jnp.sum(q["w"] ** 2) * jnp.mean(b))(p)
  mesh = data_mesh()

  def run(ax):
    tx = ire_optax.msam(optax.sgd(0.1), num_microbatches=2, axis_name=ax)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d")), out_specs=P(),
                       check_vma=True)
    def step(p, b):
      updates, _ = tx.update(None, tx.init(p), p, grad_fn=grad_fn, batch=b)
      return optax.apply_updates(p, updates)

    return step(jax.device_put(params, NamedSharding(mesh, P())),
                jax.device_put(batch, NamedSharding(mesh, P("d"))))

  with pytest.raises(ValueError, match=r"msam.update\(\): the batch varies over the mapped "
                     r"axis 'd'.*pass axis_name=<axis>"):
    run(None)
  want = ire_optax.msam(optax.sgd(0.1), num_microbatches=2 * NDEV)
  chex.assert_trees_all_close(
      run("d"), optax.apply_updates(params, want.update(None, want.init(params), params,
                                                        grad_fn=grad_fn, batch=batch)[0]),
      rtol=1e-6)
