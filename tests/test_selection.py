"""The radix selection equals a full sort on arbitrary trees."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ire_optax
from ire_optax._src import native, selection
from tests.np_reference import canon_keys, np_ordered_keys
from tests.strategies import POOL, float_trees

tree_strategy = float_trees(POOL, pool_side=6, random_side=20, random_min_dims=0, max_leaves=6)


def _sorted(leaves):
  return np.sort(np.concatenate([canon_keys(np.ravel(x)) for x in leaves]))


_kth = jax.jit(selection.kth_smallest)


@settings(max_examples=30, deadline=None)
@given(tree_strategy, st.floats(0.0, 1.0))
def test_kth_smallest_equals_full_sort(leaves, frac):
  ref = _sorted(leaves)
  if ref.size == 0:
    return
  k = min(ref.size, max(1, math.ceil(frac * ref.size)))
  got = np.asarray(_kth([jnp.asarray(x) for x in leaves], k))
  np.testing.assert_array_equal(got, ref[k - 1])


@settings(max_examples=25, deadline=None)
@given(tree_strategy, st.floats(0.05, 0.95))
def test_flat_mask_is_the_sorted_prefix_with_ties(leaves, gamma):
  ref = _sorted(leaves)
  if ref.size == 0:
    return
  k = max(1, math.floor(gamma * ref.size))
  tau = ref[k - 1]
  mask = ire_optax.flat_mask({str(i): jnp.asarray(x) for i, x in enumerate(leaves)}, gamma)
  for i, x in enumerate(leaves):
    expect = (canon_keys(x) <= tau).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(mask[str(i)]), expect)
  total = sum(int(np.sum(m)) for m in jax.tree.leaves(mask))
  assert total == int(np.sum(ref <= tau)) >= k


def test_nan_is_never_flatter_than_a_number():
  x = jnp.array([np.nan, 1.0, 2.0, -np.nan, 0.5])
  mask = np.asarray(ire_optax.flat_mask({"x": x}, 0.6)["x"])
  np.testing.assert_array_equal(mask, [0, 1, 1, 0, 1])


def test_bfloat16_and_mixed_dtypes_rank_in_float32():
  tree = {"a": jnp.array([3.0, 1.0], jnp.bfloat16), "b": jnp.array([2.0, 0.25], jnp.float32)}
  assert float(ire_optax.kth_smallest(tree, 2)) == 1.0
  mask = ire_optax.flat_mask(tree, 0.5)
  assert mask["a"].tolist() == [0, 1] and mask["b"].tolist() == [0, 1]
  assert mask["a"].dtype == jnp.uint8


def test_all_equal_selects_everything():
  mask = ire_optax.flat_mask({"a": jnp.ones((5, 5)), "b": jnp.ones(())}, 0.3)
  assert sum(int(m.sum()) for m in jax.tree.leaves(mask)) == 26


def test_large_tree_exact():
  rng = np.random.default_rng(0)
  leaves = [rng.standard_normal(n).astype(np.float32) ** 2 for n in (300_000, 1, 0, 77_777)]
  ref = _sorted(leaves)
  for k in (1, 2, 100_000, ref.size - 1, ref.size):
    assert float(_kth([jnp.asarray(x) for x in leaves], k)) == ref[k - 1]


def test_traced_gamma():
  x = {"x": jnp.arange(10.0)}
  mask = jax.jit(lambda g: ire_optax.flat_mask(x, g))(jnp.float32(0.35))
  assert mask["x"].tolist() == [1, 1, 1] + [0] * 7


def test_partitioned_tree_is_ranked_globally_with_one_psum():
  """A tree sharded over 8 devices inside shard_map selects exactly as on one device."""
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs several (emulated) devices")
  rng = np.random.default_rng(1)
  tree = {"w": jnp.asarray(rng.standard_normal((n * 64, 3)) ** 2, jnp.float32),
          "v": jnp.asarray(np.round(rng.standard_normal(n * 5)), jnp.float32)}
  expect = ire_optax.flat_mask(tree, 0.6)
  mesh = jax.make_mesh((n,), ("p",))
  P = jax.sharding.PartitionSpec
  spec = {"w": P("p", None), "v": P("p")}
  shardings = {k: jax.sharding.NamedSharding(mesh, v) for k, v in spec.items()}
  sharded = jax.device_put(tree, shardings)
  f = jax.shard_map(lambda t: ire_optax.flat_mask(t, 0.6, axis_name="p"), mesh=mesh,
                    in_specs=(spec,), out_specs=spec)
  got = jax.jit(f)(sharded)
  for key in tree:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expect[key]))


@pytest.mark.parametrize("method", ["auto", "threshold"])
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("spec", [("p", None), (None, "p")])
def test_jit_over_sharded_arrays_matches_one_device(axis_type, spec, method):
  """Plain jit over FSDP-style sharded arrays (GSPMD or explicit sharding): same selection.

  The histograms are combined by an all-reduce of the bins; the parameter
  values are never all-gathered.
  """
  n = jax.device_count()
  rng = np.random.default_rng(2)
  tree = {"w": jnp.asarray(rng.standard_normal((n * 4, n * 2)), jnp.float32)}
  types = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}
  mesh = jax.make_mesh((n,), ("p",), axis_types=(types[axis_type],))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  f = jax.jit(lambda t: ire_optax.flat_mask(t, 0.7, method=method))
  x = jax.device_put(tree, sh)
  got = f(x)
  np.testing.assert_array_equal(np.asarray(got["w"]),
                                np.asarray(ire_optax.flat_mask(tree, 0.7)["w"]))
  assert got["w"].sharding.is_equivalent_to(sh, 2)
  hlo = f.lower(x).compile().as_text()
  assert "all-gather" not in hlo


# -----------------------------------------------------------------------------
# The native CPU histograms (ire_optax/_src/native) against XLA's scatter
# -----------------------------------------------------------------------------


needs_native = pytest.mark.skipif(not native.enabled(), reason="no C++ compiler here")
SPECIAL = np.array([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1e-45, -1e-45, 1e-39, -1e-39,
                    1.1754944e-38, -1.1754944e-38, 3.4e38, -3.4e38, 1.0, -1.0], np.float32)


def _both_paths(fn, *args, monkeypatch):
  """``fn(*args)`` jitted with the native histograms, then with XLA's scatter."""
  native_out = jax.jit(fn)(*args)
  monkeypatch.setenv("IRE_OPTAX_NATIVE", "0")
  scatter_out = jax.jit(fn)(*args)
  monkeypatch.delenv("IRE_OPTAX_NATIVE")
  return native_out, scatter_out


@needs_native
@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("shape", [(0,), (), (7,), (33, 17), (2, 3, 1000), (2_100_003,)])
def test_native_histograms_equal_xla_scatter(shape, square, monkeypatch):
  rng = np.random.default_rng(sum(shape) + len(shape))
  n = math.prod(shape)
  x = rng.standard_normal(n).astype(np.float32) * 10.0 ** rng.integers(-40, 38, n)
  x[: min(n, SPECIAL.size)] = SPECIAL[: min(n, SPECIAL.size)]  # every special value, incl. NaN
  x = jnp.asarray(x.reshape(shape))
  a, b = _both_paths(lambda x: selection._high_histogram(x, square), x, monkeypatch=monkeypatch)
  np.testing.assert_array_equal(a, b)
  assert int(np.asarray(a, np.int64).sum()) == n
  keys = np.asarray(selection.ordered_keys(jnp.square(x) if square else x)).ravel()
  for high in {0, 0x7FFF, 0x8000, 0xFFFF, *(int(k) >> 16 for k in keys[:20])}:
    a, b = _both_paths(lambda x, h: selection._low_histogram(x, h, square), x,
                       jnp.uint32(high), monkeypatch=monkeypatch)
    np.testing.assert_array_equal(a, b)
    assert int(np.asarray(a, np.int64).sum()) == int(np.sum((keys >> 16) == high))


@needs_native
@pytest.mark.parametrize("square", [False, True])
def test_native_low_histogram_of_one_crowded_bucket_equals_xla_scatter(square, monkeypatch):
  """Every key in one top-16-bit bucket (the low pass counts them all, on several threads)."""
  rng = np.random.default_rng(7)
  n = 600_001
  x = (np.float32(1.0) + rng.integers(0, 1 << 16, n).astype(np.float32)
       * np.float32(2.0**-23)).astype(np.float32)
  x = jnp.asarray(np.sqrt(x) if square else x)  # x * x keys like x itself
  keys = np.asarray(selection.ordered_keys(jnp.square(x) if square else x))
  (high,) = set((keys >> 16).tolist()) if not square else {int(np.bincount(keys >> 16).argmax())}
  a, b = _both_paths(lambda x, h: selection._low_histogram(x, h, square), x, jnp.uint32(high),
                     monkeypatch=monkeypatch)
  np.testing.assert_array_equal(a, b)
  assert int(np.asarray(a, np.int64).sum()) == int(np.sum((keys >> 16) == high)) > n // 2


def _np_select(leaves, k, square):
  """Plain NumPy: the key of the k-th smallest value (sorted keys) and the masks."""
  with np.errstate(over="ignore"):  # squares past float32's range are +inf, as in XLA
    keys = [np_ordered_keys(np.square(np.asarray(x)) if square else np.asarray(x)).ravel()
            for x in leaves]
  flat = np.sort(np.concatenate(keys + [np.zeros(0, np.uint32)]))
  key = int(flat[min(max(k, 1), flat.size) - 1]) if flat.size else 0
  t = min(key, 0xFF800000)
  masks = [(kk <= t).astype(np.uint8).reshape(np.shape(x)) for kk, x in zip(keys, leaves,
                                                                        strict=True)]
  return key, masks


def _check_native_select(leaves, k, square, **kw):
  leaves = [jnp.asarray(x, jnp.float32) for x in leaves]
  rank = jnp.asarray([k & 0xFFFFFFFF, k >> 32], jnp.uint32)
  key, masks = jax.jit(lambda xs, r: native.select(xs, r, square=square, masks=True, **kw))(
      leaves, rank)
  key_only, none = native.select(leaves, rank, square=square, **kw)
  want_key, want_masks = _np_select(leaves, k, square)
  assert int(key) == int(key_only) == want_key and none == []
  for got, want in zip(masks, want_masks, strict=True):
    assert got.dtype == jnp.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# The kernel's bracket half-width, in the sample's standard deviations: 0 runs the two
# histogram passes only; 0.01 makes the one-pass bracket miss (and fall back) often;
# 1e9 brackets everything (every key "inside").
MARGINS = (0.0, 0.01, 4.0, 1e9)


@needs_native
@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("case", ["spread", "crowded", "half_crowded", "ties", "nan",
                                  "periodic"])
def test_native_one_call_selection_and_masks_equal_numpy(case, square):
  """The whole-tree kernel, each of its paths: the one pass of a sample's bracket (hit or
  missed), the two histogram passes with the bucket's mask bytes fixed up from its
  recorded keys or (a bucket too full to record) by a pass over all values; several
  leaves, on two threads."""
  rng = np.random.default_rng(11)
  big = case in ("spread", "crowded")
  n = 4_400_003 if big else 300_007  # >= 2 * 2^21: two threads
  if case == "spread":
    x = rng.standard_normal(n).astype(np.float32) * 10.0 ** rng.integers(-20, 20, n)
  elif case == "crowded":  # every key in one bucket: more than can be recorded
    x = (1 + rng.integers(0, 1 << 16, n) * 2.0**-23).astype(np.float32)
  elif case == "half_crowded":  # an eighth of the values in the target's bucket
    x = np.where(rng.random(n) < 0.125, 1 + rng.integers(0, 1 << 16, n) * 2.0**-23,
                 rng.random(n) * 4).astype(np.float32)
  elif case == "ties":
    x = rng.integers(-2, 3, n).astype(np.float32)
  elif case == "nan":  # most values NaN: the mask holds just the numbers
    x = np.where(rng.random(n) < 0.7, np.nan, rng.standard_normal(n)).astype(np.float32)
  else:  # a period that the sample's strata could alias with
    x = np.tile(np.arange(2343, dtype=np.float32), n // 2343 + 1)[:n]
  if square:
    x = np.sqrt(np.abs(x)).astype(np.float32)
  x[:SPECIAL.size] = SPECIAL
  leaves = [x[:7], x[7:n // 3].reshape(-1, 1), np.zeros((0, 2), np.float32), x[n // 3:]]
  for margin in (4.0,) if big else MARGINS:
    for k in (1, n // 8, int(0.3 * n), int(0.6 * n), n):
      _check_native_select(leaves, k, square, margin=margin)


@needs_native
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(["normal", "spread", "few", "zeros", "specials"]),
       gamma=st.floats(0.0001, 0.9999), margin=st.sampled_from(MARGINS),
       square=st.booleans())
def test_native_bracketed_selection_equals_numpy(seed, kind, gamma, margin, square):
  """Trees large enough for the one-pass bracket, drawn by hypothesis."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1 << 18, 1 << 19))
  if kind == "normal":
    x = rng.standard_normal(n)
  elif kind == "spread":
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)
  elif kind == "few":
    x = rng.integers(-3, 4, n).astype(np.float64)
  elif kind == "zeros":
    x = np.where(rng.random(n) < rng.random(), 0.0, rng.random(n))
  else:
    x = rng.choice(SPECIAL, n)
  x = x.astype(np.float32)
  cut = int(rng.integers(0, n))
  _check_native_select([x[:cut], x[cut:]], max(1, int(gamma * n)), square, margin=margin)


@needs_native
def test_native_one_call_selection_edges():
  rng = np.random.default_rng(12)
  x = rng.standard_normal(50_000).astype(np.float32)
  # 64-bit counts: uint32 histograms flushed every few values (as past 2**31 on a thread)
  for k in (1, 1234, 49_999):
    _check_native_select([x[:20_000], x[20_000:]], k, square=True, chunk=1000)
    _check_native_select([x], k, square=False, chunk=1)
  y = rng.standard_normal(300_000).astype(np.float32)  # large enough for the bracket
  for margin in MARGINS:
    _check_native_select([y[:100], y[100:]], 77_777, square=True, chunk=1000, margin=margin)
  # a rank past 2**32 is clipped to N; no values: key 0, empty masks
  _check_native_select([x[:10], x[10:20]], 5 << 32, square=False)
  key, masks = native.select([jnp.zeros((0,)), jnp.zeros((2, 0))], jnp.asarray([3, 0], jnp.uint32),
                             masks=True)
  assert int(key) == 0 and [m.shape for m in masks] == [(0,), (2, 0)]
  with pytest.raises(Exception, match="chunk"):
    native.select([x], jnp.asarray([1, 0], jnp.uint32), chunk=0)


@needs_native
def test_native_kernel_is_opt_in(monkeypatch):
  tree = {"w": jnp.linspace(-1.0, 1.0, 100), "b": jnp.zeros(3, jnp.bfloat16)}
  hlo = jax.jit(lambda t: ire_optax.flat_mask(t, 0.5)).lower(tree).as_text()
  assert "ire_optax_" not in hlo and "scatter" in hlo  # "auto": pure XLA on the CPU
  hlo = jax.jit(lambda t: ire_optax.flat_mask(t, 0.5, method="native")).lower(tree).as_text()
  assert hlo.count("ire_optax_select") == 1  # the whole tree in one call
  with ire_optax.selection_method("native"):
    hlo = jax.jit(lambda t: ire_optax.flat_mask(t, 0.5)).lower(tree).as_text()
  assert hlo.count("ire_optax_select") == 1
  monkeypatch.setenv("IRE_OPTAX_NATIVE", "0")
  with pytest.raises(ValueError, match="IRE_OPTAX_NATIVE"):
    ire_optax.flat_mask(tree, 0.5, method="native")


def test_auto_never_builds_or_loads_the_native_kernel(monkeypatch, tmp_path):
  """An IRE step traced, compiled and run with the default method touches neither the
  compiler nor the cache (as in a fresh process: nothing built or loaded yet)."""
  def forbidden(*args, **kwargs):
    raise AssertionError("the native kernel was built or loaded without being asked for")

  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setattr(native, "_build_and_register", forbidden)
  monkeypatch.setenv("IRE_OPTAX_CACHE", str(tmp_path / "cache"))
  tx = ire_optax.ire(optax.adamw(1e-3))
  params = {"w": jnp.linspace(-1.0, 1.0, 50).reshape(5, 10), "b": jnp.ones(3)}
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
  mask = ire_optax.flat_mask(params, 0.5)  # the 26 smallest of 53: the 26 first of w
  assert mask["b"].tolist() == [0, 0, 0] and mask["w"].ravel().tolist() == [1] * 26 + [0] * 24
  assert not (tmp_path / "cache").exists() and native._state == {}


@needs_native
@settings(max_examples=30, deadline=None)
@given(tree_strategy, st.floats(0.01, 0.99))
def test_native_selection_equals_a_full_sort(leaves, gamma):
  tree = [jnp.asarray(x) for x in leaves]
  flat = np.concatenate([np.ravel(x) for x in leaves]).astype(np.float32)
  if flat.size == 0:
    return
  k = max(1, math.floor(gamma * flat.size))
  got = np.asarray(selection.kth_smallest(tree, k, method="native"))
  want = np.sort(np.where(np.abs(flat) < 1.1754944e-38, 0.0, flat))[k - 1]  # denormals flush
  assert got == want or (np.isnan(got) and np.isnan(want))


def test_a_failed_build_falls_back_to_the_scatter_with_a_warning(monkeypatch, tmp_path):
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++")
  monkeypatch.setattr(native, "_SOURCE", broken)
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setenv("IRE_OPTAX_CACHE", str(tmp_path / "cache"))
  with pytest.warns(RuntimeWarning, match="could not build the native CPU histogram"):
    assert native.enabled() is False
  assert not list((tmp_path / "cache").glob("*.so"))  # no half-built library left behind
  x = jnp.asarray([3.0, 1.0, 2.0])
  for method in ("auto", "native"):  # asked for, the kernel falls back to the scatter
    assert float(selection.kth_smallest(x, 2, method=method)) == 2.0
    f = jax.jit(lambda t, m=method: selection.kth_smallest(t, 2, method=m))
    assert "ire_optax_" not in f.lower(x).as_text()


@pytest.mark.parametrize("method", ["auto", pytest.param("native", marks=needs_native)])
@settings(max_examples=25, deadline=None)
@given(leaves=tree_strategy, gamma=st.floats(0.01, 0.99))
def test_square_selects_what_the_materialised_squares_select(leaves, gamma, method):
  """``flat_mask(g, square=True) == flat_mask(g ** 2)``, ties and underflow included."""
  tree = [jnp.asarray(x) for x in leaves]
  got = ire_optax.flat_mask(tree, gamma, square=True, method=method)
  want = ire_optax.flat_mask([jnp.square(x) for x in tree], gamma, method=method)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g, w)


# -----------------------------------------------------------------------------
# The native kernel's cache: nothing in it can crash the process
# -----------------------------------------------------------------------------

# Run in a fresh process, so that a library that crashes when loaded or called cannot take
# pytest down with it: the native selection of 300,001 values against np.sort.
_NATIVE_RUN = """
import warnings
import jax.numpy as jnp
import numpy as np
from ire_optax._src import native, selection
x = np.random.default_rng(0).standard_normal(300_001).astype(np.float32)
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  got = selection.kth_smallest(jnp.asarray(x), 123_457, method="native")
print("exact:", float(got) == float(np.sort(x)[123_456]), "native:", native._state.get("ok"))
for w in caught:
  print("warning:", w.message)
"""


def _cache_with(tmp_path, cxx: str, damage) -> Path:
  """A cache holding this machine's verified library and manifest, filed under the build tag
  for compiler ``cxx``, with ``damage(bytes) -> bytes`` applied to the library."""
  assert native.enabled()
  tag = native._build_tag(native._compiler())
  digest, size = native._manifest(tag).read_text().split()
  data = native._library(tag, digest).read_bytes()
  assert len(data) == int(size)
  cache = tmp_path / "cache"
  cache.mkdir()
  other = native._build_tag(cxx)
  (cache / native._manifest(other).name).write_text(f"{digest} {size}\n")
  (cache / native._library(other, digest).name).write_bytes(damage(data))
  return cache


def _run_native(cache: Path, **env: str) -> str:
  root = Path(__file__).resolve().parents[1]
  env = {**os.environ, "IRE_OPTAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), **env}
  r = subprocess.run([sys.executable, "-c", _NATIVE_RUN], env=env, cwd=root,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, f"the process died ({r.returncode}): {r.stderr[-2000:]}"
  return r.stdout


@needs_native
def test_a_truncated_cached_library_is_never_loaded(tmp_path):
  """Truncated (as by a full disk or a killed copy) and no compiler to rebuild it: the
  process warns and counts with XLA's scatter, exactly."""
  false = shutil.which("false")
  assert false is not None
  cache = _cache_with(tmp_path, false, lambda data: data[: len(data) // 2])
  out = _run_native(cache, CXX=false)
  assert "exact: True native: False" in out, out
  assert "failed verification" in out and "could not build the native CPU histogram" in out


@pytest.mark.slow  # compiles the kernel (about 20 s)
@needs_native
def test_a_corrupted_cached_library_is_rebuilt(tmp_path):
  """The same size, some bytes changed: rebuilt with a warning, verified, then used."""
  def flip(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 4096]) + data[mid + 4096:]

  cache = _cache_with(tmp_path, native._compiler(), flip)
  out = _run_native(cache)
  assert "exact: True native: True" in out, out
  assert "failed verification" in out and "could not build" not in out
  out = _run_native(cache)  # the rebuilt library verifies: no warning
  assert "exact: True native: True" in out and "warning" not in out, out
