"""Exact, sort-free selection of the k smallest values of a whole pytree.

IRE needs, every ``K`` steps, the set of the ``k = max(1, ⌊γN⌋)`` coordinates
with the smallest curvature among *all* ``N`` coordinates of the parameter
tree. Sorting ``N`` numbers costs 150-300 AdamW updates at 10M parameters on a
CPU, so this module uses a **radix select** over the float bits:

1. Each float32 value is mapped to a ``uint32`` key whose unsigned order is the
   float order (flip all bits of negatives, set the sign bit of positives;
   ``-0.0`` is first mapped to ``+0.0`` so the two zeros tie, and NaN maps to
   the largest key so it is never "flatter" than a number).
2. The key of the k-th smallest value is found a few bits at a time, most
   significant first, by counting keys leaf by leaf (no concatenation of the
   tree). Three exact counting methods do this (see :func:`selection_method`):

   * ``"scatter"``: two passes of 65,536-bin histograms (top 16 bits, then the
     low 16 bits inside the winning bucket) as XLA scatter-adds.
   * ``"threshold"``: no scatter at all. Each pass counts
     ``#{key <= t_j}`` for ``2**b - 1`` thresholds ``t_j`` splitting the remaining
     range into ``2**b`` equal parts -- one fused compare-and-reduce over the
     values -- and resolves ``b`` bits: 8 passes of 4 bits on GPU; on TPU 5
     passes of 3-4 bits over the keys' top 16 bits, then 5 over 16-bit keys of
     the winning top-16-bit bucket (see ``_THRESHOLD_PASSES``).
   * ``"native"`` (CPU, opt-in): the two histograms from a small C++ kernel
     (:mod:`ire_optax._src.native`, compiled on first use of this method): one
     call for the whole tree, which counts in 64 bits and writes the mask, and
     from 2**18 values first tries a single pass bracketed by a sample of the
     keys (the counts verify that the bracket holds τ; else the two passes
     run); under ``axis_name``, per-device histograms with a ``psum`` between
     the passes.

   ``"auto"`` (the default) is pure XLA on every backend, picked per backend
   with ``lax.platform_dependent``: ``"scatter"`` on the CPU (measured faster
   there than ``"threshold"``), ``"threshold"`` elsewhere. It never compiles,
   loads or calls the native kernel, so an exported program carries only
   standard XLA operations.

The result is the exact k-th smallest value ``τ`` -- the same value a full
sort gives, bit for bit, whichever method counts -- and the mask ``h <= τ``.
Ties at ``τ`` are all selected (as in the authors' code), so the mask holds
*at least* ``k`` coordinates: exactly ``k`` when the values are distinct, more
only by the number of values equal to ``τ`` (and fewer only when fewer than
``k`` values are numbers: NaN is never selected, see :func:`flat_mask`).
Values compare as XLA compares them: denormals are flushed to zero on CPU/GPU,
so they tie with ``0``.

**Exact for any N below 2**64.** Each count is a ``uint32`` sum over a group
of fewer than 2**32 values (a leaf with more values is cut into static
slices); groups, leaves and devices are combined in two-word (``hi``, ``lo``)
arithmetic, and a ``psum`` over ``axis_name`` adds 16-bit limbs (exact for up
to 65,535 devices in the axis). When the global N is below 2**32 everything
stays in single ``uint32`` words (the common case costs nothing extra).

Across devices, the per-device counts combine with one ``psum`` per pass
(``axis_name``, inside ``shard_map`` or ``pmap``), so a parameter tree
partitioned over devices is ranked globally without gathering it; under plain
``jit`` over sharded arrays XLA all-reduces the counts.

The selection is a piecewise-constant function of its input: it is computed
under ``lax.stop_gradient`` (``jax.grad`` through IRE sees a constant mask).
"""

from __future__ import annotations

import contextlib
import contextvars
import fractions
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ire_optax._src import native, sharding, utils

_BINS = 1 << 16
_LOW_MASK = np.uint32(0xFFFF)
_INF_KEY = np.uint32(0xFF800000)  # ordered_keys(+inf): the largest key of a number
_U32 = jnp.uint32

# Every count is an exact uint32 sum over fewer than this many values; larger sums are
# two-word. (A module constant so that tests can exercise the two-word path on small trees.)
_WORD_LIMIT = 1 << 32
# psum of 16-bit limbs stays below 2**32 for at most this many devices in the axis.
_MAX_AXIS_SIZE = (1 << 16) - 1

METHODS = ("auto", "native", "threshold", "scatter")
# What "auto" uses per platform: pure XLA everywhere (the native kernel is opt-in). CPU:
# "scatter", measured faster than "threshold" there (docs/selection.md); GPU: an unmeasured
# choice, see docs/selection.md.
_AUTO = {"cpu": "scatter", "tpu": "threshold", "cuda": "threshold", "rocm": "threshold"}
# The CPU's method where "native" was asked for but its kernel could not be built or loaded.
_CPU_FALLBACK = _AUTO["cpu"]

_method_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "ire_optax_selection_method", default="auto")


# -----------------------------------------------------------------------------
# Choosing the counting method
# -----------------------------------------------------------------------------


def _check_method(method: Any) -> str:
  if method not in METHODS:
    raise ValueError(f"selection method must be one of {METHODS}; got {method!r}.")
  return method


@contextlib.contextmanager
def selection_method(method: str) -> Iterator[None]:
  """Context in which every exact selection that is *traced* counts with ``method``.

  ``method`` is one of ``"auto"`` (the default: pure XLA, per backend),
  ``"native"`` (opt-in: the C++ CPU kernel, built on first use; other platforms then
  use ``"auto"``'s methods),
  ``"threshold"`` (scatter-free compare-and-count passes) or ``"scatter"``
  (XLA scatter-add histograms). Every method gives the same τ and mask, bit for
  bit; the choice only changes speed. It is read when a function is traced:
  a function ``jax.jit`` already compiled keeps the method it was traced with.

  Example:
    >>> import jax, jax.numpy as jnp, optax, ire_optax
    >>> with ire_optax.selection_method("threshold"):
    ...   mask = jax.jit(lambda h: ire_optax.flat_mask(h, 0.5))(jnp.array([3., 1., 2., 0.]))
    >>> mask.tolist()
    [0, 1, 0, 1]

  Raises:
    ValueError: for an unknown method. Entering a ``"native"`` context checks nothing;
      tracing a selection in it raises where the kernel cannot run (not the CPU
      backend, sharded arrays, ``IRE_OPTAX_NATIVE=0``) and warns, counting with
      ``"scatter"``, where it cannot be built or its cached library fails verification.
  """
  token = _method_var.set(_check_method(method))
  try:
    yield
  finally:
    _method_var.reset(token)


def current_method() -> str:
  """The method set by the innermost :func:`selection_method` context (``"auto"`` outside)."""
  return _method_var.get()


# -----------------------------------------------------------------------------
# Keys
# -----------------------------------------------------------------------------


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
  # reshard; counts and comparisons work on any shape. The selection is piecewise
  # constant: no tangent ever reaches the counting (nor the native kernel).
  return [jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)) for x in jax.tree.leaves(tree)]


def _check_real_leaves(name: str, tree: Any) -> None:
  for x in jax.tree.leaves(tree):
    dtype = jnp.result_type(x)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"`{name}` must hold real numbers (ranked as float32); got a leaf of "
                      f"dtype {dtype}.")


def num_elements(tree: Any) -> int:
  """Total number of scalars in a pytree (a static Python int)."""
  return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))


def _square_if(x: jax.Array, square: bool) -> jax.Array:
  return x * x if square else x


# -----------------------------------------------------------------------------
# Exact counts: one uint32 word, or two (hi, lo) when N >= 2**32
# -----------------------------------------------------------------------------


class Count(NamedTuple):
  """A non-negative integer below 2**64 as uint32 words ``hi * 2**32 + lo``.

  ``hi`` is ``None`` when every count of the selection is statically below
  2**32 (the global N is); the operations below then reduce to uint32 ones.
  """
  lo: jax.Array
  hi: jax.Array | None


def _hi(a: Count) -> jax.Array:
  return jnp.zeros_like(a.lo) if a.hi is None else a.hi


def _narrow(*counts: Count) -> bool:
  return all(c.hi is None for c in counts)


def count_add(a: Count, b: Count) -> Count:
  """``a + b`` (with carry)."""
  lo = a.lo + b.lo
  if _narrow(a, b):
    return Count(lo, None)
  return Count(lo, _hi(a) + _hi(b) + (lo < a.lo).astype(_U32))


def count_sub(a: Count, b: Count) -> Count:
  """``a - b`` for ``a >= b`` (with borrow)."""
  lo = a.lo - b.lo
  if _narrow(a, b):
    return Count(lo, None)
  return Count(lo, _hi(a) - _hi(b) - (a.lo < b.lo).astype(_U32))


def count_ge(a: Count, b: Count) -> jax.Array:
  """``a >= b`` (elementwise, broadcasting)."""
  if _narrow(a, b):
    return a.lo >= b.lo
  ah, bh = _hi(a), _hi(b)
  return (ah > bh) | ((ah == bh) & (a.lo >= b.lo))


def _limbs(a: Count) -> jax.Array:
  """The four 16-bit limbs of ``a`` along a new last axis (least significant first)."""
  hi = _hi(a)
  return jnp.stack([a.lo & _LOW_MASK, a.lo >> 16, hi & _LOW_MASK, hi >> 16], axis=-1)


def _from_limbs(limbs: jax.Array) -> Count:
  """Inverse of :func:`_limbs` for limbs that are sums of at most 65,535 limbs (carries)."""
  carry = jnp.zeros(limbs.shape[:-1], _U32)
  out = []
  for i in range(4):
    v = limbs[..., i] + carry
    out.append(v & _LOW_MASK)
    carry = v >> 16
  return Count(out[0] | (out[1] << 16), out[2] | (out[3] << 16))


def count_sum(a: Count, axis: int) -> Count:
  """Sum over ``axis`` (at most 65,535 terms when two-word)."""
  if a.hi is None:
    return Count(jnp.sum(a.lo, axis=axis, dtype=_U32), None)
  return _from_limbs(jnp.sum(_limbs(a), axis=axis, dtype=_U32))


def count_cumsum(a: Count) -> Count:
  """Cumulative sum of a 1-D count (at most 65,535 terms when two-word)."""
  if a.hi is None:
    return Count(jnp.cumsum(a.lo, dtype=_U32), None)
  return _from_limbs(jnp.cumsum(_limbs(a), axis=0, dtype=_U32))


def count_psum(a: Count, axis_name: Any) -> Count:
  """``psum`` over ``axis_name`` (``None``: identity); two-word counts add as 16-bit limbs."""
  if axis_name is None:
    return a
  if a.hi is None:
    return Count(jax.lax.psum(a.lo, axis_name), None)
  return _from_limbs(jax.lax.psum(_limbs(a), axis_name))


def _take(a: Count, i: Any) -> Count:
  return Count(a.lo[i], None if a.hi is None else a.hi[i])


def _static_count(n: int, wide: bool) -> Count:
  lo = jnp.asarray(n & 0xFFFFFFFF, _U32)
  return Count(lo, jnp.asarray(n >> 32, _U32) if wide else None)


def count_to_int(a: Count) -> Any:
  """A concrete count as a Python int (or an int NumPy array)."""
  lo = np.asarray(a.lo).astype(object)
  return lo if a.hi is None else lo + (np.asarray(a.hi).astype(object) << 32)


# -----------------------------------------------------------------------------
# k = max(1, ⌊γ N⌋), exact for the value γ has however it is given
# -----------------------------------------------------------------------------


def check_fraction(name: str, gamma: Any) -> None:
  """Raises unless a concrete ``gamma`` is in (0, 1) (or, as a float32 array, (0, 1]).

  A float32 array may hold 1 where the number it was made from is below 1: the
  float32 value of every γ above ``1 - 2**-25`` is 1 (``optax.inject_hyperparams``
  stores γ so), and selects every coordinate, while the Python number selects
  ``⌊γN⌋`` (see :func:`num_selected`). A float64 γ of 1 is refused as the Python
  number is. A γ narrower than float32 (``inject_hyperparams`` with bfloat16 or
  float16 parameters stores it in their dtype) warns: 0.6 is then 0.6015625.
  """
  dtype = getattr(gamma, "dtype", None)
  bits = 8 * jnp.dtype(dtype).itemsize if dtype is not None and jnp.issubdtype(
      dtype, jnp.floating) else 64  # a Python float is a float64
  utils.check_range(name, gamma, low=0.0, high=1.0, low_inclusive=False,
                    high_inclusive=bits <= 32)
  utils.check_not_schedule(name, gamma, "the fraction of coordinates selected")
  if bits < 32:
    warnings.warn(
        f"`{name}` is {jnp.dtype(dtype).name}, so k = max(1, ⌊γN⌋) is counted from γ rounded to "
        f"{jnp.dtype(dtype).name} (0.6 is 0.6015625 in bfloat16; 0.999 is 1, every coordinate). "
        "optax.inject_hyperparams stores hyperparameters in the parameters' dtype: pass it "
        "hyperparam_dtype=jnp.float32.", stacklevel=3)


def num_selected(num: int, gamma: Any) -> Any:
  """``k = max(1, ⌊γ N⌋)`` (capped at N) in γ's precision, as the authors' ``kthvalue`` IRE code
  computes it.

  * A Python float (or a float64 NumPy/JAX scalar): ``int(gamma * N)``, the
    floor of the float64 product, as the authors' ``kthvalue`` code and a NumPy reference
    compute it: γ = 0.9, N = 10 gives 9, γ = 0.7, N = 10 gives 7 (the float64
    product rounds 6.9999999999999996 to 7). That floor is exact, and equals
    ⌊γN⌋ of γ's float64 value except where the float64 product itself rounds
    up to an integer. For ``N >= 2**53``, where float64 no longer holds every
    integer, ⌊γN⌋ is computed exactly from γ's float64 value (as a fraction).
  * A float32 γ, concrete (a NumPy float32, an array ``inject_hyperparams``
    made) or traced (``inject_hyperparams`` under ``jit``, a γ schedule):
    ``⌊γ₃₂N⌋`` exactly for its float32 value γ₃₂ (integer arithmetic on the
    device for a traced γ), for N up to 2**64. γ₃₂ is within ``2**-25`` of γ,
    so k differs from the Python number's by at most ``⌈N·2**-24⌉`` (0 or 1
    for N up to 2**24): ``γ = 0.9`` has γ₃₂ = 0.899999976..., and N = 10 gives
    8; ``γ = 0.99999999`` has γ₃₂ = 1 and selects all N. A traced float64 γ
    (``jax_enable_x64``) gives the Python float's k.

  Returns:
    A Python int for a concrete γ; for a traced γ a ``uint32`` array when
    ``N < 2**32``, else a :class:`Count`.
  """
  k = _rank_from_fraction(num, gamma, wide=num >= _WORD_LIMIT)
  if isinstance(k, Count) and k.hi is None:
    return k.lo
  return k


# For N below this, k of a float64 γ is Python's int(gamma * N); from it on, exact.
_FLOAT64_EXACT = 1 << 53


def _is_float64(gamma: Any) -> bool:
  return isinstance(gamma, (int, float)) or np.asarray(gamma).dtype == np.float64


def _rank_from_fraction(num: int, gamma: Any, *, wide: bool) -> int | Count:
  g = utils.concrete_value(gamma)  # as a float64: exact for a float32 or float64 γ
  if g is not None:
    if not g > 0:  # an invalid γ (construction checks it): select one coordinate
      return 1
    if not g < 1:
      return num
    if _is_float64(gamma) and num < _FLOAT64_EXACT:
      return max(1, int(g * num))  # the authors' kthvalue code's int(gamma * N)
    return min(num, max(1, math.floor(fractions.Fraction(g) * num)))
  g_arr = jnp.asarray(gamma)
  if g_arr.dtype != jnp.float64:
    g_arr = g_arr.astype(jnp.float32)
  return _floor_times(g_arr, num, wide=wide)


# (significand bits without the implicit one, exponent mask, exponent bias + significand bits)
_FLOAT_LAYOUT = {4: (23, 0xFF, 150), 8: (52, 0x7FF, 1075)}


def _floor_times(g: jax.Array, num: int, *, wide: bool) -> Count:
  """``clip(⌊g·num⌋, 1, num)`` exactly for a traced float32/float64 ``g``, static ``num < 2**64``.

  (A float64 ``g`` with ``num < 2**53`` takes the floor of the float64 product
  instead, as Python's ``int(g * num)``; see :func:`num_selected`.)

  ``g = m · 2**-s`` (m the 24- or 53-bit significand): the product ``m · num``
  is formed in 16-bit limbs (each partial product < 2**32), then shifted right
  by ``s`` bits.
  """
  size = g.dtype.itemsize
  if size == 8 and num < _FLOAT64_EXACT:
    # As for a Python float: the floor of the float64 product (an integer below 2**53).
    return _floor_times_f64(g, num, wide=wide)
  frac_bits, exp_mask, offset = _FLOAT_LAYOUT[size]
  uint = jnp.uint64 if size == 8 else _U32
  bits = jax.lax.bitcast_convert_type(g, uint)
  exp = ((bits >> frac_bits) & exp_mask).astype(jnp.int32)
  frac = bits & ((1 << frac_bits) - 1)
  m = jnp.where(exp > 0, frac | (1 << frac_bits), frac)
  shift = offset - jnp.maximum(exp, 1)  # g = m * 2**-shift
  m_limbs = [((m >> (16 * i)) & 0xFFFF).astype(_U32) for i in range(-(-(frac_bits + 1) // 16))]
  n_limbs = [(num >> (16 * j)) & 0xFFFF for j in range(4)]
  acc = [jnp.zeros((), _U32) for _ in range(len(m_limbs) + 4)]
  for i, mi in enumerate(m_limbs):
    for j, nj in enumerate(n_limbs):
      if nj:
        p = mi * np.uint32(nj)  # < 2**32
        acc[i + j] = acc[i + j] + (p & _LOW_MASK)
        acc[i + j + 1] = acc[i + j + 1] + (p >> 16)
  carry = jnp.zeros((), _U32)
  limbs = []
  for a in acc:  # each limb is a sum of at most 8 terms below 2**16: no overflow
    v = a + carry
    limbs.append(v & _LOW_MASK)
    carry = v >> 16
  product = jnp.stack(limbs)  # m * num in base 2**16
  top_shift = 16 * len(limbs)
  q = jnp.clip(shift, 0, top_shift) // 16
  r = (jnp.clip(shift, 0, top_shift) % 16).astype(_U32)
  idx = q + jnp.arange(5)
  window = jnp.take(product, idx, mode="fill", fill_value=0)
  out = [(window[t] >> r) | ((window[t + 1] << (16 - r)) & _LOW_MASK) for t in range(4)]
  k = Count(out[0] | (out[1] << 16), out[2] | (out[3] << 16))
  one, top = _static_count(1, True), _static_count(num, True)
  k = _count_where(g >= 1, top, k)  # γ >= 1 (or inf) selects all, without overflow
  neg_or_nan = ~(g > 0)  # invalid traced γ: select one coordinate
  k = Count(jnp.where(neg_or_nan, one.lo, k.lo), jnp.where(neg_or_nan, _hi(one), _hi(k)))
  k = _count_where(count_ge(k, one), k, one)
  k = _count_where(count_ge(top, k), k, top)
  return k if wide else Count(k.lo, None)


def _floor_times_f64(g: jax.Array, num: int, *, wide: bool) -> Count:
  """``clip(int(g * num), 1, num)`` for a traced float64 ``g`` and ``num < 2**53``."""
  prod = jnp.clip(g * np.float64(num), 1.0, np.float64(num))  # NaN stays NaN
  k = jnp.where(jnp.isnan(prod), 1.0, jnp.floor(prod)).astype(jnp.uint64)
  return Count(k.astype(_U32), (k >> 32).astype(_U32) if wide else None)


def _count_where(c: jax.Array, a: Count, b: Count) -> Count:
  hi = None if _narrow(a, b) else jnp.where(c, _hi(a), _hi(b))
  return Count(jnp.where(c, a.lo, b.lo), hi)


def _rank_from_int(k: Any, num: int, *, wide: bool) -> Count:
  """``clip(k, 1, num)`` as a :class:`Count` (``k`` a Python int or an integer array)."""
  kv = utils.concrete_value(k)
  if kv is not None and not isinstance(k, jax.core.Tracer):
    return _static_count(min(num, max(1, int(kv))), wide)
  k = jnp.asarray(k)
  if not jnp.issubdtype(k.dtype, jnp.integer):
    k = k.astype(jnp.int32)
  k = jnp.maximum(k, 1)
  if k.dtype.itemsize == 8:
    rank = Count((k & 0xFFFFFFFF).astype(_U32), (k >> 32).astype(_U32))
  else:
    rank = Count(k.astype(_U32), jnp.zeros((), _U32))
  top = _static_count(num, True)
  rank = _count_where(count_ge(top, rank), rank, top)
  return rank if wide else Count(rank.lo, None)


# -----------------------------------------------------------------------------
# Counting passes
# -----------------------------------------------------------------------------


def _pieces(x: jax.Array, limit: int) -> list[jax.Array]:
  """Static slices covering ``x``, each with fewer than ``limit`` elements (none if empty)."""
  if x.size == 0:
    return []
  if x.size < limit:
    return [x]
  shape = x.shape
  a = next(i for i in range(len(shape)) if math.prod(shape[i + 1:]) < limit)
  rows = max(1, (limit - 1) // math.prod(shape[a + 1:]))
  out = []
  for lead in itertools.product(*(range(s) for s in shape[:a])):
    for start in range(0, shape[a], rows):
      out.append(x[tuple(lead) + (slice(start, min(start + rows, shape[a])),)])
  return out


def _total(leaves: list[jax.Array], count: Callable[[jax.Array], jax.Array],
           shape: tuple[int, ...], wide: bool) -> Count:
  """Sum over the tree of ``count(piece)`` (exact uint32 counts of one piece) as a Count.

  Pieces are summed in uint32 while their group holds fewer than 2**32 values
  (no count can wrap), and groups in two words.
  """
  limit = _WORD_LIMIT
  groups: list[jax.Array] = []
  acc: jax.Array | None = None
  size = 0
  for x in leaves:
    for p in _pieces(x, limit):
      if acc is not None and size + p.size >= limit:
        groups.append(acc)
        acc, size = None, 0
      c = count(p)
      acc = c if acc is None else acc + c
      size += p.size
  if acc is not None:
    groups.append(acc)
  if not groups:
    groups = [jnp.zeros(shape, _U32)]
  if not wide:
    assert len(groups) == 1
    return Count(groups[0], None)
  total = Count(groups[0], jnp.zeros(shape, _U32))
  for g in groups[1:]:
    total = count_add(total, Count(g, jnp.zeros(shape, _U32)))
  return total


def _count_axes(leaves: list[jax.Array], axis_name: Any) -> list[Any]:
  """For each leaf, the axes of ``axis_name`` its counts are summed over (``None``: none).

  The axes it is partitioned over: those ``shard_map`` (with ``check_vma``) types it as
  varying over. A leaf kept whole on every device (a bias beside partitioned weights, or
  every leaf of a tree kept whole) is counted once, and a leaf split over some axes of a
  tuple only (a 2-D mesh) once per device of those. Without such types (``pmap``,
  ``check_vma=False``) every leaf counts as partitioned over all of ``axis_name``.
  """
  if axis_name is None or not utils.vma_typed(axis_name):
    return [axis_name] * len(leaves)
  axes = utils.axes_of(axis_name)

  def of(x):
    varying = tuple(a for a in axes if a in utils.varying_axes(x))
    return axis_name if len(varying) == len(axes) else varying or None

  return [of(x) for x in leaves]


def _device_total(leaves: list[jax.Array], count: Callable[[jax.Array], jax.Array],
                  shape: tuple[int, ...], wide: bool, axis_name: Any) -> Count:
  """:func:`_total` over the devices of ``axis_name``: each leaf's counts summed over the
  axes it is partitioned over (:func:`_count_axes`), a replicated leaf's counted once."""
  groups: dict[Any, list[jax.Array]] = {}
  for x, axes in zip(leaves, _count_axes(leaves, axis_name), strict=True):
    groups.setdefault(axes, []).append(x)
  if not groups:
    groups[axis_name] = []
  totals = [count_psum(_total(xs, count, shape, wide), axes) for axes, xs in groups.items()]
  total = totals[0]
  for t in totals[1:]:
    total = count_add(total, t)
  return total


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
  return counts.astype(jnp.uint32)  # int32 wraps as uint32 would: exact below 2**32


def _scatter_high(x: jax.Array, square: bool) -> jax.Array:
  return _histogram((ordered_keys(_square_if(x, square)) >> 16).astype(jnp.int32), _BINS)


def _scatter_low(x: jax.Array, high: jax.Array, square: bool) -> jax.Array:
  kk = ordered_keys(_square_if(x, square))
  idx = jnp.where((kk >> 16) == high, (kk & _LOW_MASK).astype(jnp.int32), _BINS)
  return _histogram(idx, _BINS)  # out-of-bucket keys (index _BINS) are dropped


def _native_refusal(leaves: list[jax.Array]) -> str | None:
  """Why the native CPU kernel cannot count ``leaves`` here (``None``: it can, if it builds).

  Only for arrays on one device: a custom call on an array sharded over a mesh
  (any axis type, or inside ``shard_map``) would be gathered or mistyped, so
  those keep XLA's histograms, whose per-shard counts XLA all-reduces.
  """
  if jax.default_backend() != "cpu":
    return f"it runs on the CPU backend only (the default backend is {jax.default_backend()!r})"
  if native.disabled_by_env():
    return "IRE_OPTAX_NATIVE is set to switch it off"
  if not all(sharding.is_on_one_device(x) for x in leaves):
    return "it counts arrays on one device only (these are sharded)"
  return None


def _native_available(leaves: list[jax.Array]) -> bool:
  """Whether the native CPU histograms (:mod:`ire_optax._src.native`) count ``leaves``.

  Builds (or loads, verified) the kernel the first time: call it only where the native
  method was asked for.
  """
  return _native_refusal(leaves) is None and native.enabled()


def _high_histogram(x: jax.Array, square: bool = False) -> jax.Array:
  """Counts of the top 16 bits of the keys of ``x`` (or ``x * x``): native where available."""
  if x.size and _native_available([x]):
    return jax.lax.platform_dependent(
        x, cpu=functools.partial(native.histogram_high, square=square),
        default=functools.partial(_scatter_high, square=square))
  return _scatter_high(x, square)


def _low_histogram(x: jax.Array, high: jax.Array, square: bool = False) -> jax.Array:
  """Counts of the low 16 bits of the keys of ``x`` (or ``x * x``) in bucket ``high``."""
  if x.size and _native_available([x]):
    return jax.lax.platform_dependent(
        x, high, cpu=functools.partial(native.histogram_low, square=square),
        default=functools.partial(_scatter_low, square=square))
  return _scatter_low(x, high, square)


def _find_bucket(hist: Count, rank: Count) -> tuple[jax.Array, Count]:
  """First bucket whose cumulative count reaches ``rank`` (1-based), and the count below it.

  Two levels of 256 (a cumulative sum over 65,536 bins is slow on XLA:CPU): the
  row of 256 bins that holds the bucket, then the bucket within that row.
  """
  rows = Count(hist.lo.reshape(256, 256), None if hist.hi is None else hist.hi.reshape(256, 256))
  row_totals = count_sum(rows, 1)
  row_cum = count_cumsum(row_totals)
  r = jnp.argmax(count_ge(row_cum, rank))
  row = _take(rows, r)
  cum = count_add(count_cumsum(row), count_sub(_take(row_cum, r), _take(row_totals, r)))
  c = jnp.argmax(count_ge(cum, rank))
  return (r * 256 + c).astype(_U32), count_sub(_take(cum, c), _take(row, c))


def _select_histograms(leaves, rank, *, high_fn, low_fn, axis_name, wide):
  hist = _device_total(leaves, high_fn, (_BINS,), wide, axis_name)
  high, below = _find_bucket(hist, rank)
  hist2 = _device_total(leaves, lambda x: low_fn(x, high), (_BINS,), wide, axis_name)
  low, _ = _find_bucket(hist2, count_sub(rank, below))
  return (high << 16) | low


def _threshold_keys(leaves: list[jax.Array], square: bool) -> list[jax.Array]:
  """The keys of the tree, computed once before the counting passes.

  Leaves on one device are written into **one** flat buffer by one fusion, so each pass
  launches the same few kernels for one leaf or a thousand; a sharded tree keeps one buffer
  per leaf (a flat view would reshard it). The passes put them behind an optimization
  barrier, which keeps XLA from recomputing the keys inside every pass (it would:
  recomputing them is elementwise); see :func:`_threshold_select_keys`.
  """
  full = [x for x in leaves if x.size]
  one_buffer = len({utils.varying_axes(x) for x in full}) == 1  # replicated leaves apart
  if len(full) > 1 and one_buffer and all(sharding.is_on_one_device(x) for x in full):
    keys = [jnp.concatenate([ordered_keys(_square_if(x, square)).ravel() for x in full])]
  else:
    keys = [ordered_keys(_square_if(x, square)) for x in full]
  return keys


def _counts_each(keys: jax.Array, t: jax.Array) -> jax.Array:
  """``#{keys <= t_j}`` as one scalar sum per threshold (TPU: a ``[N, T]`` reduction is
  layout-bound there, while T scalar sums fuse into one pass over the keys)."""
  return jnp.stack([jnp.sum(keys <= t[j], dtype=_U32) for j in range(len(t))])


def _counts_matrix(keys: jax.Array, t: jax.Array) -> jax.Array:
  """``#{keys <= t_j}`` as one fused compare-and-reduce over ``[N, T]`` (GPU: one kernel,
  where T separate sums would be T kernels)."""
  return jnp.sum(keys[..., None] <= t, axis=tuple(range(keys.ndim)), dtype=_U32)


class _Passes(NamedTuple):
  """How the ``"threshold"`` method counts on a platform.

  ``high``: bits resolved by each pass over the uint32 keys, most significant first;
  ``low``: when ``high`` covers the top 16 bits only (then counted over the top 16 bits
  of the keys alone, stored apart), bits resolved by each pass over 16-bit keys of the
  winning top-16-bit bucket (:func:`_bucket_keys16`); both read half the bytes;
  ``counts``: ``(keys, thresholds) -> #{keys <= t_j}`` per threshold;
  ``fused_first``: the first pass counts the keys as they are computed (one fusion writes
  them and counts), before the optimization barrier, instead of reading them back;
  ``scalar``: each threshold, and the comparison of its count with the rank, is scalar
  arithmetic (XLA:TPU runs it on the scalar unit, where building, slicing and summing small
  vectors of thresholds and counts are three kernels of about 1.8k cycles a pass).
  """
  high: tuple[int, ...]
  low: tuple[int, ...]
  counts: Callable[..., jax.Array]
  fused_first: bool
  scalar: bool


# Per lowering platform ("default": any other). TPU: the compiler prices a pass over the keys
# at a floor that 7 thresholds (3 bits) do not exceed while 15 do (docs/selection.md), and a
# pass over 16-bit keys below that floor; GPU: 8 passes of 15 thresholds, one kernel each.
_THRESHOLD_PASSES = {
    "tpu": _Passes((4, 3, 3, 3, 3), (3, 3, 3, 3, 4), _counts_each, fused_first=True, scalar=True),
    "default": _Passes((4,) * 8, (), _counts_matrix, fused_first=False, scalar=False)}


def _bucket_keys16(top: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
  """16-bit keys that compare with every low-pass threshold as the full keys do.

  ``top``, ``low``: the top and low 16 bits of the keys. Inside the bucket whose top 16
  bits are ``high``: the low 16 bits; below it 0, above it 0xFFFF. Every threshold of a low
  pass lies in ``[0, 0xFFFE]``: a key below the bucket counts under each of them and a key
  above it under none, as their full keys do.
  """
  high = high.astype(jnp.uint16)
  low = jnp.where(top > high, np.uint16(0xFFFF), low)
  return jnp.where(top < high, np.uint16(0), low)


def _threshold_passes(keys: list[jax.Array], rank: Count, base: jax.Array, bits: tuple[int, ...],
                      width: int, *, done: int = 0, passes: _Passes, axis_name: Any,
                      wide: bool) -> jax.Array:
  """Passes resolving ``bits`` of ``width``-bit keys after the top ``done`` bits, whose
  prefix is ``base``: each splits the remaining range into ``2**b`` parts with
  ``2**b - 1`` thresholds and keeps the part holding the ``rank``-th key (unrolled: one
  compiled body a pass)."""
  dtype = jnp.uint32 if width == 32 else jnp.uint16
  used = done
  for b in bits:
    used += b
    s = width - used
    t: Any  # the largest keys below base + j·2**s, j = 1 .. 2**b - 1
    if passes.scalar:
      t = [(base + np.uint32((j << s) - 1)).astype(dtype) for j in range(1, 1 << b)]
    else:
      j = jnp.arange(1, 1 << b, dtype=_U32)
      t = (base + (j << np.uint32(s)) - np.uint32(1)).astype(dtype)
    c = _device_total(keys, functools.partial(passes.counts, t=t), (len(t),), wide, axis_name)
    if passes.scalar:  # parts entirely below the rank
      digit = sum((~count_ge(_take(c, i), rank)).astype(_U32) for i in range(len(t)))
    else:
      digit = jnp.sum(~count_ge(c, rank), dtype=_U32)
    base = base + (digit << np.uint32(s))
  return base


def _barrier(arrays: list[jax.Array]) -> list[jax.Array]:
  """``optimization_barrier`` over each group of ``arrays`` varying over the same axes (one
  barrier over all would type every output as varying over their union: a replicated leaf
  would then be counted once per device; see :func:`_count_axes`)."""
  groups: dict[frozenset, list[int]] = {}
  for i, x in enumerate(arrays):
    groups.setdefault(utils.varying_axes(x), []).append(i)
  out = list(arrays)
  for idx in groups.values():
    for i, y in zip(idx, jax.lax.optimization_barrier([arrays[i] for i in idx]), strict=True):
      out[i] = y
  return out


def _threshold_select_keys(keys, rank, *, passes, axis_name, wide):
  run = functools.partial(_threshold_passes, passes=passes, axis_name=axis_name, wide=wide)
  zero = jnp.zeros((), _U32)
  first = passes.high[:1] if passes.fused_first else ()
  if not passes.low:
    assert sum(passes.high) == 32
    base = run(keys, rank, zero, first, 32)
    keys = _barrier(keys)
    return run(keys, rank, base, passes.high[len(first):], 32, done=sum(first))
  # The top 16 bits are resolved over the keys' top halves, which read half the bytes.
  assert sum(passes.high) == sum(passes.low) == 16
  tops = [(k >> 16).astype(jnp.uint16) for k in keys]
  lows = [(k & _LOW_MASK).astype(jnp.uint16) for k in keys]
  high = run(tops, rank, zero, first, 16)
  both = _barrier(tops + lows)
  tops, lows = both[:len(tops)], both[len(tops):]
  high = run(tops, rank, high, passes.high[len(first):], 16, done=sum(first))
  low = run([_bucket_keys16(t, lo, high) for t, lo in zip(tops, lows, strict=True)], rank,
            zero, passes.low, 16)
  return (high << 16) | low


def _select_threshold(leaves, rank, *, square, axis_name, wide):
  """Radix select by counting, with each platform's passes (:data:`_THRESHOLD_PASSES`).

  The keys are computed once (:func:`_threshold_keys`).
  """
  keys = _threshold_keys(leaves, square)
  branches = {p: functools.partial(_threshold_select_keys, passes=v, axis_name=axis_name,
                                   wide=wide)
              for p, v in _THRESHOLD_PASSES.items()}
  default = branches.pop("default")
  return jax.lax.platform_dependent(keys, rank, default=default, **branches)


# The two histograms of each histogram method: (top 16 bits, low 16 bits in a bucket).
_HISTOGRAMS: dict[str, tuple[Callable[..., jax.Array], Callable[..., jax.Array]]] = {
    "native": (native.histogram_high, native.histogram_low),
    "scatter": (_scatter_high, _scatter_low)}


def _masks_at_most(leaves: list[jax.Array], key: jax.Array, square: bool) -> list[jax.Array]:
  """``1[x <= τ]`` (uint8) per leaf for the selected key, τ capped at ``+inf``.

  NaN has the largest key; capping τ at the key of +inf keeps NaN out of the
  mask. A float comparison gives the same set as comparing keys (the zeros tie,
  NaN is never <= anything) without re-keying every value.
  """
  tau = key_to_float(jnp.minimum(key, _INF_KEY))
  return [(_square_if(x, square) <= tau).astype(jnp.uint8) for x in leaves]


def _select_native(leaves, rank, *, square, masks):
  """The whole selection in one native call: a sample-bracketed pass or the two histogram
  passes over the tree, and the mask (``native/histogram.cc``)."""
  full = [x for x in leaves if x.size]
  key, out = native.select(full, jnp.stack([rank.lo, _hi(rank)]), square=square, masks=masks)
  if not masks:
    return key, []
  it = iter(out)
  return key, [next(it) if x.size else jnp.zeros(x.shape, jnp.uint8) for x in leaves]


def _with_masks(select, square, masks):
  """A key-only selection ``(leaves, rank) -> key`` as ``-> (key, masks or [])``."""
  def run(leaves, rank):
    key = select(leaves, rank)
    return key, _masks_at_most(leaves, key, square) if masks else []
  return run


def _run(method: str, square: bool, axis_name: Any, wide: bool, masks: bool):
  """The selection ``(leaves, rank) -> (key, masks)`` counting with ``method`` (one
  callable per setting, so that ``lax.platform_dependent`` merges equal branches);
  ``masks``: also the uint8 mask of each leaf (else ``[]``)."""
  if method == "native" and axis_name is None:
    return functools.partial(_select_native, square=square, masks=masks)
  if method == "threshold":
    select = functools.partial(_select_threshold, square=square, axis_name=axis_name,
                               wide=wide)
  else:
    high, low = _HISTOGRAMS[method]
    select = functools.partial(_select_histograms, axis_name=axis_name, wide=wide,
                               high_fn=functools.partial(high, square=square),
                               low_fn=functools.partial(low, square=square))
  return _with_masks(select, square, masks)


def _platform_methods(method: str, leaves: list[jax.Array]) -> dict[str, str]:
  """The counting method per lowering platform (``"default"``: any other) for ``method``.

  ``"auto"`` is pure XLA everywhere (``_AUTO``) and never touches the native kernel.
  ``"native"`` uses the kernel for the CPU and ``"auto"``'s methods for the other
  platforms; where the kernel cannot be built or loaded (``native.enabled`` has warned)
  the CPU falls back to ``_CPU_FALLBACK``, the same τ and mask.
  """
  if method == "auto":
    return {**_AUTO, "default": "threshold"}
  if method == "native":
    refusal = _native_refusal(leaves)
    if refusal is not None:
      raise ValueError(f"selection method 'native' is unavailable here: {refusal} (use "
                       "'auto').")
    cpu = "native" if native.enabled() else _CPU_FALLBACK
    return {**_AUTO, "cpu": cpu, "default": "threshold"}
  return {"default": method}


def _select(leaves: list[jax.Array], rank: Count, *, square: bool, axis_name: Any,
            wide: bool, method: str | None, masks: bool) -> tuple[jax.Array, list[jax.Array]]:
  chosen = _platform_methods(_check_method(current_method() if method is None else method),
                             leaves)
  fns: dict[str, Any] = {}
  branches = {p: fns.setdefault(m, _run(m, square, axis_name, wide, masks))
              for p, m in chosen.items()}
  if len(fns) == 1:
    return branches["default"](leaves, rank)
  default = branches.pop("default")
  return jax.lax.platform_dependent(leaves, rank, default=default, **branches)


# -----------------------------------------------------------------------------
# Public selection
# -----------------------------------------------------------------------------


def _global_size(tree: Any, axis_name: Any) -> int:
  """N over the devices of ``axis_name``: each leaf once per device of the axes it is
  partitioned over (:func:`_count_axes`)."""
  n = num_elements(tree)
  if axis_name is not None:
    devices = int(jax.lax.psum(1, axis_name))
    if n * devices >= _WORD_LIMIT and devices > _MAX_AXIS_SIZE:
      raise ValueError(f"exact selection over {devices} devices in `axis_name` (at most "
                       f"{_MAX_AXIS_SIZE} with 2**32 or more coordinates).")
    leaves = jax.tree.leaves(tree)
    n = sum(x.size * (1 if axes is None else int(jax.lax.psum(1, axes)))
            for x, axes in zip(leaves, _count_axes(leaves, axis_name), strict=True))
  return n


def kth_smallest_key(
    tree: Any, k: Any, *, axis_name: Any = None, square: bool = False,
    method: str | None = None,
) -> jax.Array:
  """The exact ordered key (see :func:`ordered_keys`) of the k-th smallest value.

  Args:
    tree: pytree of arrays (any float dtype; ranked in float32).
    k: 1-based rank, ``1 <= k <= N`` (clipped into that range): a Python int,
      an integer array, or a :class:`Count`.
    axis_name: if the tree is partitioned over a mapped axis (``shard_map``,
      ``pmap``), the name of that axis; counts are ``psum``-ed over it.
    square: rank ``x * x`` (in float32) instead of ``x``, without materialising it.
    method: counting method (see :func:`selection_method`); ``None``: the context's.

  Returns:
    uint32 scalar key.
  """
  return _select_tree(tree, k, axis_name=axis_name, square=square, method=method,
                      masks=False)[0]


def _select_tree(tree: Any, k: Any, *, axis_name: Any, square: bool, method: str | None,
                 masks: bool) -> tuple[jax.Array, list[jax.Array]]:
  """:func:`kth_smallest_key` and, with ``masks``, the uint8 mask of each leaf."""
  leaves = _leaves_f32(tree)
  n = _global_size(tree, axis_name)
  wide = n >= _WORD_LIMIT
  rank = k if isinstance(k, Count) else _rank_from_int(k, n, wide=wide)
  if wide and rank.hi is None:
    rank = Count(rank.lo, jnp.zeros((), _U32))
  return _select(leaves, rank, square=square, axis_name=axis_name, wide=wide, method=method,
                 masks=masks)


def kth_smallest(tree: Any, k: Any, *, axis_name: Any = None,
                 method: str | None = None) -> jax.Array:
  """The exact k-th smallest value (1-based) over all leaves of ``tree``, as float32.

  Equals ``jnp.sort(jnp.concatenate([x.ravel() for x in leaves]))[k - 1]``
  (with ``-0.0`` reported as ``+0.0``), computed without sorting: see the
  module docstring. The result is treated as a constant by ``jax.grad``.

  Args:
    tree: pytree of real arrays.
    k: 1-based rank (Python int or integer array).
    axis_name: mapped axis the tree is partitioned over (``shard_map``, ``pmap``).
    method: ``"auto"``, ``"native"``, ``"threshold"`` or ``"scatter"`` (see
      :func:`selection_method`); ``None`` uses the context's (``"auto"``).

  Example:
    >>> import jax.numpy as jnp
    >>> from ire_optax import kth_smallest
    >>> float(kth_smallest({"a": jnp.array([3., 1.]), "b": jnp.array([2.])}, 2))
    2.0

  Raises:
    ValueError: if a concrete ``k`` is not an integer in ``[1, N]`` (only
      ``k >= 1`` is checked with ``axis_name``, where ``N`` is global), or for
      an unknown or unavailable ``method``.
    TypeError: if a leaf is not real (complex, bool, ...).
  """
  _check_real_leaves("tree", tree)
  utils.check_int("k", k, low=1)
  n = num_elements(tree)
  kv = utils.concrete_value(k)
  if axis_name is None and kv is not None and kv > n:
    raise ValueError(f"`k` must be an integer in [1, {n}] (the number of elements of `tree`); "
                     f"got {k!r}.")
  return key_to_float(kth_smallest_key(tree, k, axis_name=axis_name, method=method))


def flat_mask(
    tree: Any,
    gamma: Any,
    *,
    axis_name: Any = None,
    dtype: Any = jnp.uint8,
    square: bool = False,
    method: str | None = None,
) -> Any:
  """Mask of the ``k = max(1, ⌊γN⌋)`` smallest values of ``tree`` (ties at τ included).

  For a Python float γ, k is ``int(gamma * N)`` as the authors' ``kthvalue`` IRE code and a
  NumPy reference compute it (exactly for ``N >= 2**53``); for a float32 γ
  (injected by ``optax.inject_hyperparams``, traced) it is ``⌊γ₃₂N⌋`` exactly
  for γ's float32 value γ₃₂, at most ``⌈N·2**-24⌉`` below or above: see
  :func:`num_selected`.

  Args:
    tree: the curvature estimate ``h`` (pytree of arrays).
    gamma: the fraction of coordinates to select, in (0, 1].
    axis_name: axis over which ``tree`` is partitioned (``shard_map``, ``pmap``),
      if any. ``N`` is then the global number of coordinates: a leaf that
      ``shard_map``'s ``check_vma`` types as replicated over the axis counts once
      (without those types, every leaf must be partitioned over it).
    dtype: dtype of the returned mask leaves (``uint8``: one byte a parameter).
    square: select on ``tree ** 2`` (float32) instead of ``tree`` -- the same mask
      as ``flat_mask(jax.tree.map(jnp.square, tree), gamma)`` without
      materialising the squares (IRE's ``"grad_sq"`` curvature).
    method: counting method, ``"auto"``, ``"native"``, ``"threshold"`` or
      ``"scatter"`` (see :func:`selection_method`; every method gives the same
      mask); ``None`` uses the context's (``"auto"``).

  Returns:
    A pytree like ``tree`` of 0/1 values: ``1[h_i <= τ]`` with τ the k-th
    smallest value of ``h``. The mask is a constant for ``jax.grad``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ire_optax import flat_mask
    >>> flat_mask({"w": jnp.array([4., 1., 3., 2.])}, 0.5)["w"].tolist()
    [0, 1, 0, 1]

  NaN is never selected: it ranks above every number, and when fewer than
  ``k`` values are numbers the mask holds just the numbers (``-inf`` and
  ``+inf`` are numbers here; ``-inf`` is the flattest value).

  Raises:
    ValueError: if a concrete ``gamma`` is not in ``(0, 1]``, or for an unknown
      or unavailable ``method``.
    TypeError: if ``gamma`` is not a number or a leaf is not real.
  """
  utils.check_range("gamma", gamma, low=0.0, high=1.0, low_inclusive=False)
  utils.check_not_schedule("gamma", gamma, "the fraction of coordinates selected")
  _check_real_leaves("tree", tree)
  n = _global_size(tree, axis_name)
  wide = n >= _WORD_LIMIT
  k = _rank_from_fraction(n, gamma, wide=wide)
  rank = k if isinstance(k, Count) else _static_count(k, wide)
  _, masks = _select_tree(tree, rank, axis_name=axis_name, square=square, method=method,
                          masks=True)
  return jax.tree.unflatten(jax.tree.structure(tree), [m.astype(dtype) for m in masks])
