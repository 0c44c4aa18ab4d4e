"""Native CPU selection for the exact radix select, compiled on first use.

XLA:CPU runs the scatter-add behind a 65,536-bin histogram as a sequential loop
of several ns per value, which makes IRE's refresh cost several optimizer
updates on a CPU. ``native/histogram.cc`` holds XLA FFI handlers that count
the same keys at about 1 ns per value: ``IreSelect`` runs the whole selection
of a tree in one call (one pass over every leaf when a sample brackets the
rank -- exact, verified by the counts -- else the two histogram passes; the
bucket searches, 64-bit counts, and the mask), and two
per-array histograms serve selections whose counts are summed across devices
between the passes (``axis_name``). The first time a selection is traced for
the CPU, this module compiles that file with the system's C++ compiler against
the headers that ship with jaxlib (``jax.ffi.include_dir()``; ``-march=native``
when the compiler takes it, so the cache is keyed by the CPU too), caches the
shared library and registers the handlers with ``jax.ffi``.

This is the ``"native"`` counting method of the selection, which ``"auto"``
uses on the CPU for arrays on one device. On the CPU with sharded arrays, and
whenever the library cannot be built (no compiler, a failed build, or
``IRE_OPTAX_NATIVE=0`` in the environment), the selection uses XLA's scatter
instead (the same histograms, bit for bit: tested); TPU and GPU use the
scatter-free ``"threshold"`` method (see ``docs/selection.md``).

Environment:
  ``IRE_OPTAX_NATIVE``: ``0`` disables the native path.
  ``IRE_OPTAX_CACHE``: where the compiled library is kept (default
  ``$XDG_CACHE_HOME/ire_optax`` or ``~/.cache/ire_optax``).
  ``CXX``: the C++ compiler (default ``c++``, then ``g++``, then ``clang++``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("native") / "histogram.cc"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")
# Tuned for the machine that compiles (and caches per CPU); plain flags if the compiler
# does not take it.
_NATIVE_ARCH = ("-march=native",)
_HIGH, _LOW, _SELECT = "ire_optax_hist_high", "ire_optax_hist_low", "ire_optax_select"
_BINS = 1 << 16

_lock = threading.Lock()
_state: dict[str, bool] = {}  # "ok": whether the handlers are registered (once decided)


def enabled() -> bool:
  """Whether the native histograms are used for CPU arrays (building them if needed)."""
  if os.environ.get("IRE_OPTAX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  with _lock:
    if "ok" not in _state:
      _state["ok"] = _build_and_register()
    return _state["ok"]


def _cache_dir() -> Path:
  if os.environ.get("IRE_OPTAX_CACHE"):
    return Path(os.environ["IRE_OPTAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "ire_optax"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return name
  return None


def _cpu_tag() -> bytes:
  """What identifies this CPU for ``-march=native`` (a shared cache may serve several)."""
  try:
    info = Path("/proc/cpuinfo").read_text()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(lines).encode()
  except OSError:
    return (platform.processor() or platform.machine()).encode()


def _build_and_register() -> bool:
  try:
    include = jax.ffi.include_dir()
    source = _SOURCE.read_bytes()
    cxx = _compiler()
    if cxx is None:
      return False
    tag = hashlib.sha256(b"\0".join([
        source, " ".join(_FLAGS + _NATIVE_ARCH).encode(), cxx.encode(),
        jax.__version__.encode(), platform.machine().encode(), sys.platform.encode(),
        _cpu_tag()])).hexdigest()[:16]
    lib_path = _cache_dir() / f"histogram-{tag}.so"
    if not lib_path.exists():
      lib_path.parent.mkdir(parents=True, exist_ok=True)
      # Build beside the target and rename: concurrent processes never see half a file.
      fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
      os.close(fd)
      try:
        command = [cxx, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", tmp]
        try:
          subprocess.run(command[:1] + list(_NATIVE_ARCH) + command[1:], check=True,
                         capture_output=True, timeout=300)
        except subprocess.CalledProcessError:
          subprocess.run(command, check=True, capture_output=True, timeout=300)
        os.replace(tmp, lib_path)
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)
    lib = ctypes.cdll.LoadLibrary(str(lib_path))
    jax.ffi.register_ffi_target(_HIGH, jax.ffi.pycapsule(lib.IreHistHigh), platform="cpu")
    jax.ffi.register_ffi_target(_LOW, jax.ffi.pycapsule(lib.IreHistLow), platform="cpu")
    jax.ffi.register_ffi_target(_SELECT, jax.ffi.pycapsule(lib.IreSelect), platform="cpu")
    return True
  except (OSError, subprocess.SubprocessError, AttributeError, ValueError) as e:
    detail = getattr(e, "stderr", b"") or b""
    warnings.warn(
        "ire_optax: could not build the native CPU histogram, using XLA's scatter instead "
        f"(slower IRE refresh on CPU; set IRE_OPTAX_NATIVE=0 to silence): {e} "
        f"{detail.decode(errors='replace')[:500]}", RuntimeWarning, stacklevel=3)
    return False


def _result() -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((_BINS,), jnp.uint32)


def histogram_high(x: jax.Array, *, square: bool = False) -> jax.Array:
  """``uint32[65536]`` counts of the top 16 bits of ``ordered_keys(x)`` (of ``x * x``
  with ``square``); CPU only."""
  return jax.ffi.ffi_call(_HIGH, _result(), vmap_method="sequential")(
      jnp.asarray(x, jnp.float32), square=bool(square))


def histogram_low(x: jax.Array, high: jax.Array, *, square: bool = False) -> jax.Array:
  """Counts of the low 16 bits of the keys of ``x`` (or ``x * x``) in bucket ``high``."""
  return jax.ffi.ffi_call(_LOW, _result(), vmap_method="sequential")(
      jnp.asarray(x, jnp.float32), jnp.asarray(high, jnp.uint32), square=bool(square))



def select(leaves: list[jax.Array], rank: jax.Array, *, square: bool = False,
           masks: bool = False, chunk: int = 1 << 31,
           margin: float = 4.0) -> tuple[jax.Array, list[jax.Array]]:
  """The whole selection of a tree in one call (CPU only).

  Returns the ``uint32`` key of the ``rank``-th smallest value over all
  ``leaves`` (of their squares with ``square``; ``rank`` is ``uint32[2]``, low
  word then high word, 1-based, clipped into ``[1, N]``; 0 when there are no
  values) and, with ``masks``, one ``uint8`` mask per leaf, ``1[key(x) <= key]``
  with the key capped at that of ``+inf`` (NaN is never selected). ``chunk``:
  values a thread counts in 32 bits between flushes to 64 bits (tests lower it).
  ``margin``: half-width, in standard deviations, of the sample's bracket around
  the rank (one pass when it holds; ``<= 0``: always the two histogram passes).
  """
  xs = [jnp.asarray(x, jnp.float32) for x in leaves]
  out = [jax.ShapeDtypeStruct((), jnp.uint32)]
  if masks:
    out += [jax.ShapeDtypeStruct(x.shape, jnp.uint8) for x in xs]
  res = jax.ffi.ffi_call(_SELECT, out, vmap_method="sequential")(
      jnp.asarray(rank, jnp.uint32), *xs, square=bool(square), chunk=np.int64(chunk),
      margin=np.float64(margin))
  return res[0], list(res[1:])
