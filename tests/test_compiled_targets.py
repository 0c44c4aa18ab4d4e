"""The selection's and the plain steps' costs as XLA:TPU and XLA:GPU compile them.

Nothing runs: each program is compiled deviceless for a TPU v5e or an H100
(``benchmarks/compiled.py``) and read from its optimized HLO, which is deterministic, so the
design targets (``B.TARGETS``, defined at ``B.TARGET_SIZES``) are asserted here, as the
report's verdicts count them. The tests skip where libtpu or a jax CUDA plugin is not
installed (``.ci/run`` installs both). A large N compiles as fast as a small one.
"""

from benchmarks import compiled as X  # before JAX starts a backend  # isort: skip

import jax
import jax.numpy as jnp
import optax
import pytest

import ire_optax
from benchmarks.experiments import compiled as B
from tests.compilers import need

N = 10**7
T = B.TARGETS


_CACHE: dict = {}


def _analysis(name, target, leaves, n=N):
  """The program's cost, the false branch of its conditional (the unhinted step's) taken."""
  key = (name, target, leaves, n)
  if key not in _CACHE:
    _CACHE[key] = B.compile_block(name, target, B.params_of(n, leaves))
  return X.taken(_CACHE[key])


@pytest.mark.parametrize("n", B.TARGET_SIZES)
@pytest.mark.parametrize("leaves", [1, 63])
def test_h100_refresh(leaves, n):
  need("h100")
  base, refresh = _analysis("adamw", "h100", leaves, n), _analysis("refresh", "h100", leaves, n)
  assert refresh.bytes <= T["refresh_bytes"] * base.bytes, refresh.bytes / base.bytes
  assert X.h100_seconds(refresh) <= T["refresh_h100_time"] * X.h100_seconds(base), (
      X.h100_seconds(refresh) / X.h100_seconds(base))
  assert refresh.num_kernels <= T["kernels"] + T["kernels_per_leaf"] * leaves, refresh.kernels
  assert refresh.host_round_trips == 0


@pytest.mark.parametrize("target", ["h100", "tpu-v5e"])
def test_plain_ire_step_hinted(target):
  need(target)
  base, plain = _analysis("adamw", target, 1), _analysis("plain step", target, 1)
  assert plain.bytes <= T["plain_bytes"] * base.bytes, plain.bytes / base.bytes
  assert plain.conditionals_executed == 0 and plain.host_round_trips == 0


def test_h100_unhinted_step_pays_a_host_round_trip():
  """What the hint saves: ``lax.cond`` on XLA:GPU (docs/performance.md)."""
  need("h100")
  base, unhinted = _analysis("adamw", "h100", 1), _analysis("unhinted", "h100", 1)
  assert unhinted.conditionals_executed == 1 and unhinted.host_round_trips == 1
  # XLA:GPU up to jaxlib 0.10 also copies the mask passed through the false branch; 0.12.1's
  # aliases it (measured: 1.036 AdamW updates of bytes, as the hinted step).
  if _jaxlib_version() < (0, 12):
    assert unhinted.kernels["copy"] >= 1
    assert unhinted.bytes > T["plain_bytes"] * base.bytes


def _jaxlib_version() -> tuple[int, ...]:
  import jaxlib

  return tuple(int(v) for v in jaxlib.__version__.split(".")[:2])


@pytest.mark.parametrize("n", B.TARGET_SIZES)
def test_tpu_refresh_bytes(n):
  need("tpu-v5e")
  base, refresh = _analysis("adamw", "tpu-v5e", 1, n), _analysis("refresh", "tpu-v5e", 1, n)
  assert refresh.bytes <= T["refresh_bytes"] * base.bytes, refresh.bytes / base.bytes


def test_tpu_refresh_cycles_regression_bound():
  """Not the design target (2 AdamW updates, missed: see the next test): a bound (2.96
  today) that catches a regression to thresholds as small vectors (three kernels a pass:
  3.21), to 8 passes of 15 counts over the uint32 keys (4.4 updates), the recomputed keys
  or the [N, 15] reduction (47.9 updates)."""
  need("tpu-v5e")
  base, refresh = _analysis("adamw", "tpu-v5e", 1), _analysis("refresh", "tpu-v5e", 1)
  assert refresh.cycles <= 3.1 * base.cycles, refresh.cycles / base.cycles


@pytest.mark.xfail(strict=True, reason=(
    "missed: every counting pass costs at least about 0.29 AdamW updates of TPU cycles "
    "over the uint32 keys and 0.22 over 16-bit keys, and resolves at most about 3 bits "
    "at that price; see docs/selection.md"))
def test_tpu_refresh_cycles_target():
  need("tpu-v5e")
  base, refresh = _analysis("adamw", "tpu-v5e", 1), _analysis("refresh", "tpu-v5e", 1)
  assert refresh.cycles <= T["refresh_cycles"] * base.cycles, refresh.cycles / base.cycles


def _quadratic_step(tx, hints):
  def loss(p):
    return sum(jnp.sum(x * x) for x in jax.tree.leaves(p))

  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss),
                               **hints)
    return optax.apply_updates(params, updates), state
  return step


@pytest.mark.parametrize("which", ["sam_every_k", "sala"])
def test_h100_hinted_plain_steps_make_no_host_round_trip(which):
  need("h100")
  if which == "sam_every_k":
    tx, plain = ire_optax.sam(optax.sgd(0.1), rho=0.05, every_k=2), {"sam_hint": False}
  else:  # a step inside a cycle: neither its start nor its end
    tx = ire_optax.sala(optax.sgd(0.1), sync_period=3, rho=0.05)
    plain = {"sam_hint": False, "cycle_end_hint": False}
  params = {"w": jax.ShapeDtypeStruct((1 << 16,), jnp.float32)}
  state = jax.eval_shape(tx.init, params)
  got = {name: X.analyze(X.compile_fn(_quadratic_step(tx, hints), params, state,
                                      target="h100"))
         for name, hints in (("hinted", plain), ("unhinted", {}))}
  assert got["hinted"].host_round_trips == 0 and got["hinted"].conditionals_executed == 0
  assert got["unhinted"].host_round_trips >= 1  # lax.cond: the predicate goes to the host
