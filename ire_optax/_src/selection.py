"""Exact, sort-free selection of the k smallest values of a whole pytree.

IRE needs, every ``K`` steps, the set of the ``k = max(1, ⌊γN⌋)`` coordinates
with the smallest curvature among *all* ``N`` coordinates of the parameter
tree. Sorting ``N`` numbers is ~50 optimizer updates at 10M parameters on a
CPU, so this module uses a two-pass **radix select** over the float bits:

1. Each float32 value is mapped to a ``uint32`` key whose unsigned order is the
   float order (flip all bits of negatives, set the sign bit of positives;
   ``-0.0`` is first mapped to ``+0.0`` so the two zeros tie, and NaN maps to
   the largest key so it is never "flatter" than a number).
2. Pass 1: a 65,536-bin histogram of the top 16 bits of every key, computed
   leaf by leaf (no concatenation of the tree) and summed; its cumulative sum
   gives the bucket ``b`` holding the k-th smallest key and the count below it.
3. Pass 2: a 65,536-bin histogram of the low 16 bits of the keys in bucket
   ``b`` gives the exact low half.

The result is the exact k-th smallest value ``τ`` -- the same value a full
sort gives, bit for bit -- and the mask ``h <= τ``. Ties at ``τ`` are all
selected (as in the authors' code), so the mask holds *at least* ``k``
coordinates: exactly ``k`` when the values are distinct, more only by the
number of values equal to ``τ`` (and fewer only when fewer than ``k`` values
are numbers: NaN is never selected, see :func:`flat_mask`). Values compare as
XLA compares them: denormals are flushed to zero on CPU/GPU, so they tie with
``0``. Cost: two histogram passes and one comparison pass over ``N`` float32
values; the histograms are 256 KiB each.

On the CPU the two histograms come from a small native kernel
(:mod:`ire_optax._src.native`, compiled on first use) when the array is on one
device: XLA:CPU runs a scatter-add as a sequential loop several times slower
than the rest of an optimizer step. Elsewhere, and whenever the kernel cannot be
built, XLA's scatter computes the same counts.

Across devices, the per-device histograms combine with one ``psum`` each
(``axis_name``), so a parameter tree partitioned over devices is ranked
globally without gathering it. Counts are ``uint32``: the selection is exact
for up to 2**32 - 1 coordinates per call.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ire_optax._src import native, sharding, utils

_BINS = 1 << 16
_LOW_MASK = np.uint32(0xFFFF)
_INF_KEY = np.uint32(0xFF800000)  # ordered_keys(+inf): the largest key of a number


def ordered_keys(x: jax.Array) -> jax.Array:
  """Maps float32 values to uint32 keys with the same (total) order.

  ``-0.0`` and ``+0.0`` get the same key; NaN gets the largest key.
  """
  x = jnp.asarray(x, jnp.float32)
  x = jnp.where(x == 0, jnp.float32(0), x)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  negative = (bits >> 31) == 1
  keys = jnp.where(negative, ~bits, bits | np.uint32(0x80000000))
  return jnp.where(jnp.isnan(x), np.uint32(0xFFFFFFFF), keys)


def key_to_float(key: jax.Array) -> jax.Array:
  """Inverse of :func:`ordered_keys` (for non-NaN keys)."""
  key = jnp.asarray(key, jnp.uint32)
  positive = (key >> 31) == 1
  bits = jnp.where(positive, key & np.uint32(0x7FFFFFFF), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _leaves_f32(tree: Any) -> list[jax.Array]:
  # No ravel: reshaping an array sharded along a non-leading axis would force a
  # reshard; histograms and comparisons work on any shape.
  return [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(tree)]


def _check_real_leaves(name: str, tree: Any) -> None:
  for x in jax.tree.leaves(tree):
    dtype = jnp.result_type(x)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"`{name}` must hold real numbers (ranked as float32); got a leaf of "
                      f"dtype {dtype}.")


def num_elements(tree: Any) -> int:
  """Total number of scalars in a pytree (a static Python int)."""
  return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))


def _histogram(indices: jax.Array, length: int) -> jax.Array:
  """Counts of each value of ``indices`` (any shape) in ``[0, length)``, as uint32.

  With explicitly sharded inputs (``jax.sharding.AxisType.Explicit``, the
  default mesh type of recent JAX) the histogram is requested replicated: XLA
  then scatters locally on each shard and all-reduces the ``length`` bins --
  the parameter values are never gathered.
  """
  if indices.size == 0:
    return jnp.zeros((length,), jnp.uint32)
  kwargs: dict[str, Any] = {}
  mesh = sharding.explicit_mesh(indices)
  if mesh is not None:
    kwargs["out_sharding"] = sharding.replicated(mesh)
  counts = jnp.zeros((length,), jnp.int32).at[indices].add(1, mode="drop", **kwargs)
  return counts.astype(jnp.uint32)


def _native_ok(x: jax.Array) -> bool:
  """Whether to use the native CPU histograms (:mod:`ire_optax._src.native`) for ``x``.

  Only for arrays on one device: a custom call on an array sharded over a mesh
  (any axis type, or inside ``shard_map``) would be gathered or mistyped, so
  those keep XLA's scatter, whose per-shard histograms XLA all-reduces.
  """
  return (x.size > 0 and sharding.is_on_one_device(x) and jax.default_backend() == "cpu"
          and native.enabled())


def _native_or_scatter(native_fn, scatter, x: jax.Array, *args: jax.Array) -> jax.Array:
  """``native_fn(x, *args)`` where :func:`_native_ok`, lowered for the CPU only; else
  ``scatter(x, *args)``."""
  if not _native_ok(x):
    return scatter(x, *args)
  return jax.lax.platform_dependent(x, *args, cpu=native_fn, default=scatter)


def _square_if(x: jax.Array, square: bool) -> jax.Array:
  return x * x if square else x


def _high_histogram(x: jax.Array, square: bool = False) -> jax.Array:
  """Pass 1: counts of the top 16 bits of the keys of ``x`` (or of ``x * x``)."""
  def scatter(x):
    return _histogram((ordered_keys(_square_if(x, square)) >> 16).astype(jnp.int32), _BINS)

  return _native_or_scatter(functools.partial(native.histogram_high, square=square), scatter, x)


def _low_histogram(x: jax.Array, high: jax.Array, square: bool = False) -> jax.Array:
  """Pass 2: counts of the low 16 bits of the keys of ``x`` (or ``x * x``) in bucket ``high``."""
  def scatter(x, high):
    kk = ordered_keys(_square_if(x, square))
    idx = jnp.where((kk >> 16) == high, (kk & _LOW_MASK).astype(jnp.int32), _BINS)
    return _histogram(idx, _BINS)  # out-of-bucket keys (index _BINS) are dropped

  return _native_or_scatter(functools.partial(native.histogram_low, square=square), scatter,
                            x, high)


def _psum_if(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _find_bucket(hist: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First bucket whose cumulative count reaches ``rank`` (1-based), and the count below it.

  Two levels of 256 (a cumulative sum over 65,536 bins is slow on XLA:CPU): the
  row of 256 bins that holds the bucket, then the bucket within that row.
  """
  rows = hist.reshape(256, 256)
  row_totals = jnp.sum(rows, axis=1, dtype=jnp.uint32)
  row_cum = jnp.cumsum(row_totals, dtype=jnp.uint32)
  r = jnp.argmax(row_cum >= rank)
  row = rows[r]
  cum = jnp.cumsum(row, dtype=jnp.uint32) + (row_cum[r] - row_totals[r])
  c = jnp.argmax(cum >= rank)
  return (r * 256 + c).astype(jnp.uint32), cum[c] - row[c]


def kth_smallest_key(
    tree: Any, k: jax.Array | int, *, axis_name: str | None = None, square: bool = False
) -> jax.Array:
  """The exact ordered key (see :func:`ordered_keys`) of the k-th smallest value.

  Args:
    tree: pytree of arrays (any float dtype; ranked in float32).
    k: 1-based rank, ``1 <= k <= N`` (clipped into that range).
    axis_name: if the tree is partitioned over a mapped axis (``shard_map``),
      the name of that axis; histograms are ``psum``-ed over it.
    square: rank ``x * x`` (in float32) instead of ``x``, without materialising it.

  Returns:
    uint32 scalar key.
  """
  leaves = _leaves_f32(tree)
  hist = sum((_high_histogram(x, square) for x in leaves),
             start=jnp.zeros((_BINS,), jnp.uint32))
  hist = _psum_if(hist, axis_name)
  total = jnp.sum(hist, dtype=jnp.uint32)
  rank = jnp.clip(jnp.asarray(k).astype(jnp.uint32), np.uint32(1), jnp.maximum(total, 1))
  high, below = _find_bucket(hist, rank)
  hist2 = sum((_low_histogram(x, high, square) for x in leaves),
              start=jnp.zeros((_BINS,), jnp.uint32))
  hist2 = _psum_if(hist2, axis_name)
  low, _ = _find_bucket(hist2, rank - below)
  return (high << 16) | low


def kth_smallest(tree: Any, k: jax.Array | int, *, axis_name: str | None = None) -> jax.Array:
  """The exact k-th smallest value (1-based) over all leaves of ``tree``, as float32.

  Equals ``jnp.sort(jnp.concatenate([x.ravel() for x in leaves]))[k - 1]``
  (with ``-0.0`` reported as ``+0.0``), computed without sorting: see the
  module docstring.

  Example:
    >>> import jax.numpy as jnp
    >>> from ire_optax import kth_smallest
    >>> float(kth_smallest({"a": jnp.array([3., 1.]), "b": jnp.array([2.])}, 2))
    2.0

  Raises:
    ValueError: if a concrete ``k`` is not an integer in ``[1, N]`` (only
      ``k >= 1`` is checked with ``axis_name``, where ``N`` is global).
    TypeError: if a leaf is not real (complex, bool, ...).
  """
  _check_real_leaves("tree", tree)
  utils.check_int("k", k, low=1)
  n = num_elements(tree)
  kv = utils.concrete_value(k)
  if axis_name is None and kv is not None and kv > n:
    raise ValueError(f"`k` must be an integer in [1, {n}] (the number of elements of `tree`); "
                     f"got {k!r}.")
  return key_to_float(kth_smallest_key(tree, k, axis_name=axis_name))


def num_selected(num: int, gamma: Any) -> jax.Array | int:
  """``k = max(1, ⌊γ N⌋)``; exact in Python when ``gamma`` is a Python number."""
  if isinstance(gamma, (int, float, np.floating)):
    return max(1, int(math.floor(float(gamma) * num)))
  return jnp.maximum(1, jnp.floor(jnp.asarray(gamma, jnp.float32) * num)).astype(jnp.int32)


def flat_mask(
    tree: Any,
    gamma: Any,
    *,
    axis_name: str | None = None,
    dtype: Any = jnp.uint8,
    square: bool = False,
) -> Any:
  """Mask of the ``max(1, ⌊γN⌋)`` smallest values of ``tree`` (ties at τ included).

  Args:
    tree: the curvature estimate ``h`` (pytree of arrays).
    gamma: the fraction of coordinates to select, in (0, 1).
    axis_name: axis over which ``tree`` is partitioned (``shard_map``), if any.
      ``N`` is then the global number of coordinates.
    dtype: dtype of the returned mask leaves (``uint8``: one byte a parameter).
    square: select on ``tree ** 2`` (float32) instead of ``tree`` -- the same mask
      as ``flat_mask(jax.tree.map(jnp.square, tree), gamma)`` without
      materialising the squares (IRE's ``"grad_sq"`` curvature).

  Returns:
    A pytree like ``tree`` of 0/1 values: ``1[h_i <= τ]`` with τ the k-th
    smallest value of ``h``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ire_optax import flat_mask
    >>> flat_mask({"w": jnp.array([4., 1., 3., 2.])}, 0.5)["w"].tolist()
    [0, 1, 0, 1]

  NaN is never selected: it ranks above every number, and when fewer than
  ``k`` values are numbers the mask holds just the numbers (``-inf`` and
  ``+inf`` are numbers here; ``-inf`` is the flattest value).

  Raises:
    ValueError: if a concrete ``gamma`` is not in ``(0, 1]``.
    TypeError: if ``gamma`` is not a number or a leaf is not real.
  """
  utils.check_range("gamma", gamma, low=0.0, high=1.0, low_inclusive=False)
  utils.check_not_schedule("gamma", gamma, "the fraction of coordinates selected")
  _check_real_leaves("tree", tree)
  n = num_elements(tree)
  if axis_name is not None:
    n = n * jax.lax.psum(1, axis_name)
  k = num_selected(n, gamma)
  # NaN has the largest key; capping τ at the key of +inf keeps NaN out of the mask.
  tau = key_to_float(jnp.minimum(
      kth_smallest_key(tree, k, axis_name=axis_name, square=square), _INF_KEY))
  # A float comparison gives the same set as comparing keys (the zeros tie, NaN is never
  # <= anything) without re-keying every value.
  return jax.tree.map(
      lambda x: (_square_if(jnp.asarray(x, jnp.float32), square) <= tau).astype(dtype), tree)
