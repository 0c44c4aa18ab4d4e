"""Every counting method of the exact selection gives a full sort's τ and mask.

Methods: ``native`` (CPU kernel), ``threshold`` (scatter-free), ``scatter``;
on 1 and 8 emulated devices (GSPMD, ``shard_map``, ``pmap``), past 2**32
(two-word counts, checked with synthetic counts and with the word limit
lowered so that small trees take the two-word path), the exact
``k = max(1, ⌊γN⌋)`` on every path γ can take (the official ``int(gamma * N)``
for a Python float, exact for a float32 γ's value), the backend choice seen in
``jax.export`` for TPU and CUDA, an IRE train step exported for CPU, TPU and CUDA and run
from its serialization, and ``jax.grad`` through ``ire(...).update``.
"""

from __future__ import annotations

import contextlib
import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ire_optax
from ire_optax._src import native, selection
from tests import strategies
from tests.np_reference import canon_keys

METHODS = ["native", "threshold", "scatter"] if native.enabled() else ["threshold", "scatter"]
# And "threshold" with the passes and counts it lowers to on TPU, forced on this backend.
COUNTINGS = [*METHODS, "threshold-tpu"]
# The shared pool plus NaN and more denormals (every method must order them alike).
POOL = [*strategies.POOL, -1e-45, 1e-39, np.nan]
trees = strategies.float_trees(POOL, pool_side=5, random_side=12, random_min_dims=1,
                               max_leaves=5)


def _reference(leaves, gamma=None, k=None):
  """(k, τ, masks) from NumPy's sort: NaN sorts last and is never selected."""
  flat = np.sort(np.concatenate([canon_keys(np.ravel(x)) for x in leaves]))
  n = flat.size
  if k is None:
    k = max(1, math.floor(fractions.Fraction(float(np.float32(gamma))) * n))
  tau = flat[k - 1]
  tau_m = np.float32(np.inf) if np.isnan(tau) else tau
  return k, tau, [(canon_keys(x) <= tau_m).astype(np.uint8) for x in leaves]


@contextlib.contextmanager
def _counting(method):
  """The method's name for the selection functions, in a context that forces TPU's
  threshold passes on this backend for ``"threshold-tpu"``."""
  if method != "threshold-tpu":
    yield method
    return
  passes = selection._THRESHOLD_PASSES
  saved = passes["default"]
  passes["default"] = passes["tpu"]
  try:
    yield "threshold"
  finally:
    passes["default"] = saved


def _same(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.tobytes() == b.tobytes() or (np.isnan(a) and np.isnan(b)), (a, b)


@settings(max_examples=8, deadline=None)
@given(trees, st.floats(0.01, 1.0))
def test_every_method_equals_a_full_sort(leaves, gamma):
  if sum(np.size(x) for x in leaves) == 0:
    return
  k, tau, masks = _reference(leaves, gamma)
  tree = [jnp.asarray(x) for x in leaves]
  for name in COUNTINGS:
    with _counting(name) as method:
      _same(jax.jit(lambda t, m=method: selection.kth_smallest(t, k, method=m))(tree), tau)
      got = jax.jit(lambda t, m=method: ire_optax.flat_mask(t, gamma, method=m))(tree)
    for g, m in zip(got, masks, strict=True):
      np.testing.assert_array_equal(g, m, err_msg=name)


@pytest.mark.parametrize("name", COUNTINGS)
def test_two_word_path_and_sliced_leaves(name, monkeypatch):
  """With the word limit lowered to 128, leaves are cut into slices, groups add in two
  words, the rank is two-word: still a full sort's answer."""
  monkeypatch.setattr(selection, "_WORD_LIMIT", 128)
  if name == "threshold-tpu":
    monkeypatch.setitem(selection._THRESHOLD_PASSES, "default",
                        selection._THRESHOLD_PASSES["tpu"])
  method = "threshold" if name == "threshold-tpu" else name
  rng = np.random.default_rng(3)
  leaves = [rng.standard_normal((5, 30)).astype(np.float32) ** 2,
            np.round(rng.standard_normal(70)).astype(np.float32), np.float32(0.25),
            np.zeros((0, 3), np.float32), rng.standard_normal((2, 3, 40)).astype(np.float32)]
  tree = [jnp.asarray(x) for x in leaves]
  for k in (1, 455):
    _, tau, _ = _reference(leaves, k=k)
    _same(jax.jit(lambda t, k=k: selection.kth_smallest(t, k, method=method))(tree), tau)
  _, _, masks = _reference(leaves, 0.37)
  got = jax.jit(lambda t, g: ire_optax.flat_mask(t, g, method=method))(tree, jnp.float32(0.37))
  for g, m in zip(got, masks, strict=True):
    np.testing.assert_array_equal(g, m)


# -----------------------------------------------------------------------------
# Count arithmetic near and past 2**32
# -----------------------------------------------------------------------------


def _count(values):
  v = np.asarray(values, dtype=object)
  words = [np.asarray([(int(x) >> s) & 0xFFFFFFFF for x in v.ravel()], np.uint32).reshape(v.shape)
           for s in (0, 32)]
  return selection.Count(jnp.asarray(words[0]), jnp.asarray(words[1]))


NEAR = [0, 1, 2**16 - 1, 2**31, 2**32 - 3, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 2**32 - 1,
        2**53, 2**53 + 1]


def test_count_add_sub_compare_sum_cumsum_exact_near_2_32():
  a, b = NEAR, NEAR[::-1]
  ca, cb = _count(a), _count(b)
  pairs = list(zip(a, b, strict=True))
  assert list(selection.count_to_int(selection.count_add(ca, cb))) == [x + y for x, y in pairs]
  hi, lo = np.maximum(a, b).tolist(), np.minimum(a, b).tolist()
  got = selection.count_sub(_count(hi), _count(lo))
  assert list(selection.count_to_int(got)) == [x - y for x, y in zip(hi, lo, strict=True)]
  assert np.asarray(selection.count_ge(ca, cb)).tolist() == [x >= y for x, y in pairs]
  assert int(selection.count_to_int(selection.count_sum(ca, 0))) == sum(a)
  assert list(selection.count_to_int(selection.count_cumsum(ca))) == np.cumsum(
      np.asarray(a, dtype=object)).tolist()


def test_per_device_counts_combine_without_overflow():
  """Synthetic per-device counts near and past 2**32, psum-ed over 8 devices (shard_map)."""
  n = jax.device_count()
  rng = np.random.default_rng(4)
  per_device = [[int(rng.choice(NEAR)) + d for _ in range(3)] for d in range(n)]
  c = _count(per_device)
  mesh = jax.make_mesh((n,), ("d",))
  P = jax.sharding.PartitionSpec
  f = jax.shard_map(lambda c: selection.count_psum(jax.tree.map(lambda x: x[0], c), "d"),
                    mesh=mesh, in_specs=(P("d"),), out_specs=P())
  c = jax.device_put(c, jax.sharding.NamedSharding(mesh, P("d")))
  got = selection.count_to_int(jax.jit(f)(c))
  assert list(got) == [sum(col) for col in zip(*per_device, strict=True)]


def test_find_bucket_on_a_histogram_past_2_32():
  rng = np.random.default_rng(5)
  hist = np.zeros(1 << 16, dtype=object)
  idx = rng.choice(1 << 16, 40, replace=False)
  hist[idx] = [int(v) for v in rng.integers(1, 2**34, 40)]
  cum = np.cumsum(hist)
  for rank in (1, int(cum[-1]) // 3, int(cum[-1])):
    bucket, below = selection._find_bucket(_count(hist), _count(rank))
    want = int(np.argmax(cum >= rank))
    assert int(bucket) == want and int(selection.count_to_int(below)) == int(cum[want] - hist[want])


# -----------------------------------------------------------------------------
# k = max(1, ⌊γN⌋): the official int(gamma * N) for a Python float, exact in float32 otherwise
# -----------------------------------------------------------------------------


def _official_k(gamma, n):
  """The official IRE code: ``keep_num = int(N * gamma)``, a float64 product floored."""
  return max(1, int(gamma * n))


def _exact_floor(gamma, n):
  """⌊γN⌋ for the exact value of ``gamma`` (a float64 or float32), in rational arithmetic."""
  return math.floor(fractions.Fraction(float(gamma)) * n)


def _f32_device_k(gamma, n):
  # The device path (integer arithmetic on a float32 array), run eagerly to keep this fast.
  return int(selection.count_to_int(selection._floor_times(jnp.float32(gamma), n, wide=True)))


GAMMAS = st.one_of(st.floats(1e-12, 1.0, exclude_max=True),
                   st.sampled_from([0.29, 0.7, 0.9, 0.99999999, 0.6, 0.5, 0.1, 0.3]))


@settings(max_examples=60, deadline=None)
@given(GAMMAS, st.one_of(st.integers(1, 2**53 - 1), st.integers(1, 10**6),
                         st.sampled_from([10, 20, 100, 2**24 + 1, 2**32 - 1, 2**32])))
def test_k_of_a_python_float_is_the_official_int_gamma_times_n(gamma, n):
  """A Python float's k is int(gamma * N), float64 like the official code, for N < 2**53."""
  want = min(n, _official_k(gamma, n))
  assert selection.num_selected(n, gamma) == want
  assert selection.num_selected(n, np.float64(gamma)) == want
  # ⌊γN⌋ of γ's exact float64 value, except where the float64 product rounds up to an integer.
  if fractions.Fraction(gamma) * n == fractions.Fraction(gamma * n):
    assert want == max(1, _exact_floor(gamma, n))


@settings(max_examples=40, deadline=None)
@given(GAMMAS, st.one_of(st.integers(2**53, 2**64 - 1), st.sampled_from([2**53, 2**53 + 1])))
def test_k_past_2_53_is_exact(gamma, n):
  """For N >= 2**53 float64 cannot hold every integer: k is ⌊γN⌋ of γ's float64 value."""
  want = min(n, max(1, _exact_floor(gamma, n)))
  assert selection.num_selected(n, gamma) == want
  assert abs(want - int(gamma * n)) <= n * 2.0**-52  # the float64 product's rounding only


@settings(max_examples=40, deadline=None)
@given(GAMMAS, st.one_of(st.integers(1, 2**64 - 1), st.integers(1, 10**6),
                         st.sampled_from([10, 100, 2**24, 2**32, 2**53])))
def test_float32_gamma_is_exact_for_its_float32_value_on_every_path(gamma, n):
  """A float32 γ (NumPy, JAX array, traced) gives ⌊γ₃₂N⌋ exactly, within ⌈N·2**-24⌉ of int(γN)."""
  g32 = np.float32(gamma)
  want = min(n, max(1, _exact_floor(g32, n)))
  assert selection.num_selected(n, g32) == want
  assert selection.num_selected(n, jnp.float32(gamma)) == want
  assert _f32_device_k(gamma, n) == want
  assert abs(want - selection.num_selected(n, gamma)) <= math.ceil(n * 2.0**-24)


def test_issue_examples_of_k():
  # The official code's k for Python floats; the float32 value's exact k where traced.
  assert selection.num_selected(10, 0.9) == 9
  assert selection.num_selected(10, 0.7) == 7
  assert selection.num_selected(100, 0.29) == 28
  assert int(jax.jit(lambda g: selection.num_selected(10, g))(0.9)) == 8  # γ₃₂ < 0.9
  assert int(jax.jit(lambda g: selection.num_selected(100, g))(0.29)) == 28
  assert selection.num_selected(10, 0.99999999) == 9
  for n in (10, 2**40 + 1, 2**53):
    traced = jax.jit(lambda g, n=n: selection._floor_times(g, n, wide=True))(0.99999999)
    assert int(selection.count_to_int(traced)) == n  # γ₃₂ = 1
  x = {"x": jnp.arange(10.0)}
  for gamma, k in ((0.9, 9), (0.7, 7)):
    assert int(ire_optax.flat_mask(x, gamma)["x"].sum()) == k
  pairs = [(g, n) for g in (0.9, 0.7, 0.29, 0.6, 0.3) for n in (10, 20, 100, 1000)]
  assert all(selection.num_selected(n, g) == int(g * n) for g, n in pairs)


def test_traced_float64_gamma_is_the_python_floats_k():
  with jax.enable_x64(True):
    for n in (10, 100, 2**40 + 7, 2**60 + 12345):
      for g in (0.7, 0.9, 0.29, 0.3):
        f = jax.jit(lambda g, n=n: selection._floor_times(g, n, wide=True))
        assert int(selection.count_to_int(f(jnp.float64(g)))) == selection.num_selected(n, g)


def test_injected_gamma_that_rounds_to_one():
  tx = optax.inject_hyperparams(ire_optax.ire)(optax.sgd(1.0), gamma=0.99999999)
  params = {"w": jnp.arange(10.0)}
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  assert int(ire_optax.ire_flat_mask(state)["w"].sum()) == 10
  with pytest.raises(ValueError, match="gamma"):
    ire_optax.ire(optax.sgd(1.0), gamma=1.0)  # a Python γ must still be in (0, 1)
  # A NumPy float32 scalar is a float32 γ too (docs/ire.md): 1.0 as float32, all selected.
  for gamma in (np.float32(0.99999999), jnp.float32(0.99999999)):
    tx = ire_optax.ire(optax.sgd(1.0), gamma=gamma)
    _, state = tx.update(params, tx.init(params), params)
    assert int(ire_optax.ire_flat_mask(state)["w"].sum()) == 10


# -----------------------------------------------------------------------------
# Choosing the method; what each backend lowers to
# -----------------------------------------------------------------------------


def _lowered(fn, *args):
  return jax.jit(fn).lower(*args).as_text()


def test_context_and_argument_choose_the_method():
  x = {"w": jnp.linspace(-1.0, 1.0, 50)}
  with ire_optax.selection_method("threshold"):
    assert selection.current_method() == "threshold"
    text = _lowered(lambda t: ire_optax.flat_mask(t, 0.5), x)
    assert "scatter" not in text and "ire_optax_" not in text
    with ire_optax.selection_method("scatter"):
      assert "scatter" in _lowered(lambda t: ire_optax.flat_mask(t, 0.5), x)
    assert "scatter" in _lowered(lambda t: ire_optax.flat_mask(t, 0.5, method="scatter"), x)
  assert selection.current_method() == "auto"
  with pytest.raises(ValueError, match="selection method"):
    with ire_optax.selection_method("sort"):
      pass
  with pytest.raises(ValueError, match="selection method"):
    ire_optax.kth_smallest(x, 3, method="bogus")


def test_native_method_unavailable_raises(monkeypatch):
  monkeypatch.setenv("IRE_OPTAX_NATIVE", "0")
  with pytest.raises(ValueError, match="'native' is unavailable"):
    ire_optax.flat_mask({"w": jnp.ones(4)}, 0.5, method="native")
  assert "ire_optax_" not in _lowered(lambda t: ire_optax.flat_mask(t, 0.5),
                                          {"w": jnp.ones(4)})


def _export_text(platform, fn, *args):
  return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def test_tpu_and_cuda_exports_of_ire_update_have_no_scatter():
  tx = ire_optax.ire(optax.adamw(1e-3))
  params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)}
  state = tx.init(params)
  for platform in ("tpu", "cuda"):
    text = _export_text(platform, tx.update, params, state, params)
    assert "stablehlo.scatter" not in text and "custom_call @ire_optax" not in text, platform
    assert "stablehlo.optimization_barrier" in text  # the threshold method's keys, once
  # The check can fail: the same export with the scatter method has scatters (a new
  # function: jax.jit keeps the method a function was first traced with).
  with ire_optax.selection_method("scatter"):
    tx = ire_optax.ire(optax.adamw(1e-3))
    assert "stablehlo.scatter" in _export_text("tpu", tx.update, params, state, params)


def test_ire_train_step_exports_for_cpu_tpu_and_cuda_and_runs():
  """AdamW+IRE with the defaults (grad_sq, K = 10), jitted, a refresh inside: one export for
  cpu, tpu and cuda with every safety check on, serialized, deserialized and run on the CPU,
  step for step equal to the jitted step."""
  tx = ire_optax.ire(optax.adamw(1e-2))
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32), "b": jnp.zeros(8)}
  x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)

  def step(params, state, x):
    grads = jax.grad(lambda p: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  treedef = jax.tree.structure((params, state))
  # Over the flat leaves: serialization knows lists, not optax's NamedTuple states.
  jitted = jax.jit(lambda leaves, x: jax.tree.leaves(step(*treedef.unflatten(leaves), x)))
  carry = jax.tree.leaves((params, state))
  exported = jax.export.export(jitted, platforms=["cpu", "tpu", "cuda"])(carry, x)
  assert exported.platforms == ("cpu", "tpu", "cuda") and not exported.disabled_safety_checks
  assert "custom_call @ire_optax" not in exported.mlir_module()
  restored = jax.export.deserialize(exported.serialize())
  want, got = carry, carry
  for _ in range(11):  # refreshes at steps 0 and 10
    want, got = jitted(want, x), restored.call(got, x)
    for a, b in zip(want, got, strict=True):
      np.testing.assert_array_equal(a, b)
  mask = jax.tree.leaves(ire_optax.ire_flat_mask(treedef.unflatten(got)[1]))
  assert 0 < sum(int(np.sum(m)) for m in mask) < 136  # a refresh ran: a proper subset


@pytest.mark.skipif(not native.enabled(), reason="no C++ compiler here")
def test_native_opt_in_lowers_to_the_kernel_on_cpu_only():
  x = {"w": jnp.ones(10)}
  with ire_optax.selection_method("native"):
    text = _lowered(lambda t: ire_optax.flat_mask(t, 0.5), x)
    assert text.count("ire_optax_select") == 1 and "while" not in text
    tpu = _export_text("tpu", lambda t: ire_optax.flat_mask(t, 0.5), x)
    assert "custom_call @ire_optax" not in tpu and "stablehlo.scatter" not in tpu
    # The export's safety check refuses the kernel (a custom call of this machine's library).
    with pytest.raises(ValueError, match="custom call"):
      jax.export.export(jax.jit(lambda t: ire_optax.flat_mask(t, 0.5)), platforms=["cpu"])(x)


# -----------------------------------------------------------------------------
# Several devices
# -----------------------------------------------------------------------------

needs_devices = pytest.mark.skipif(jax.device_count() < 2, reason="needs several devices")


def _device_tree(n):
  rng = np.random.default_rng(6)
  w = (rng.standard_normal((n * 6, 5)) ** 2).astype(np.float32)
  w[0, :3] = [np.nan, 0.0, -0.0]
  v = np.round(rng.standard_normal(n * 3)).astype(np.float32)
  return {"w": w, "v": v}


@needs_devices
@pytest.mark.parametrize("method", ["threshold", "scatter"])
def test_gspmd_shard_map_and_pmap_equal_a_full_sort(method):
  n = jax.device_count()
  tree = _device_tree(n)
  _, _, masks = _reference([tree["v"], tree["w"]], 0.55)
  want = {"v": masks[0], "w": masks[1]}
  mesh = jax.make_mesh((n,), ("p",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  spec = {"w": P("p", None), "v": P("p")}
  placed = jax.device_put(tree, {k: jax.sharding.NamedSharding(mesh, s) for k, s in spec.items()})
  gspmd = jax.jit(lambda t: ire_optax.flat_mask(t, 0.55, method=method))(placed)
  mapped = jax.jit(jax.shard_map(
      lambda t: ire_optax.flat_mask(t, 0.55, axis_name="p", method=method),
      mesh=mesh, in_specs=(spec,), out_specs=spec))(placed)
  local = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), tree)
  pmapped = jax.pmap(lambda t: ire_optax.flat_mask(t, 0.55, axis_name="i", method=method),
                     axis_name="i")(local)
  for key in tree:
    np.testing.assert_array_equal(gspmd[key], want[key])
    np.testing.assert_array_equal(mapped[key], want[key])
    np.testing.assert_array_equal(np.asarray(pmapped[key]).reshape(want[key].shape), want[key])


@needs_devices
def test_shard_map_two_word_path(monkeypatch):
  monkeypatch.setattr(selection, "_WORD_LIMIT", 32)
  n = jax.device_count()
  tree = _device_tree(n)
  _, _, masks = _reference([tree["v"], tree["w"]], 0.3)
  mesh = jax.make_mesh((n,), ("p",))
  P = jax.sharding.PartitionSpec
  spec = {"w": P("p", None), "v": P("p")}
  placed = jax.device_put(tree, {k: jax.sharding.NamedSharding(mesh, s) for k, s in spec.items()})
  for method in ("threshold", "scatter"):
    got = jax.jit(jax.shard_map(
        lambda t, m=method: ire_optax.flat_mask(t, 0.3, axis_name="p", method=m),
        mesh=mesh, in_specs=(spec,), out_specs=spec))(placed)
    np.testing.assert_array_equal(got["v"], masks[0])
    np.testing.assert_array_equal(got["w"], masks[1])


# -----------------------------------------------------------------------------
# jax.grad through IRE
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_grad_through_ire_update(method):
  tx = ire_optax.ire(optax.sgd(0.1), kappa=2.0, gamma=0.5)
  params = {"w": jnp.asarray([1.0, -2.0, 3.0, 0.5])}
  state = tx.init(params)

  def loss(w):
    updates, _ = tx.update({"w": w * w}, state, {"w": w})
    return jnp.sum(updates["w"])

  with ire_optax.selection_method(method):
    g = jax.grad(loss)(params["w"])
  # updates = -0.1 * w² * (1 + κ·mask): the two smallest w² (0.5, 1.0) are flat.
  mask = np.array([1.0, 0.0, 0.0, 1.0])
  np.testing.assert_allclose(g, -0.2 * np.asarray(params["w"]) * (1 + 2.0 * mask), rtol=1e-6)
