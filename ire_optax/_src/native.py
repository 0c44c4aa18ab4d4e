"""Native CPU selection for the exact radix select: an opt-in method, compiled on first use.

XLA:CPU runs the scatter-add behind a 65,536-bin histogram as a sequential loop
of several ns per value. ``native/histogram.cc`` holds XLA FFI handlers that
count the same keys at about 1 ns per value: ``IreSelect`` runs the whole
selection of a tree in one call (one pass over every leaf when a sample
brackets the rank -- exact, verified by the counts -- else the two histogram
passes; the bucket searches, 64-bit counts, and the mask), and two per-array
histograms serve selections whose counts are summed across devices between the
passes (``axis_name``).

This is the ``"native"`` counting method of the selection, used only when asked
for (``selection_method("native")`` or ``method="native"``); the default,
``"auto"``, is pure XLA on every backend and never reaches this module's
compiler or cache. The first time a ``"native"`` selection is traced, this
module compiles ``histogram.cc`` with the system's C++ compiler against the
headers that ship with jaxlib (``jax.ffi.include_dir()``; ``-march=native``
when the compiler takes it, so the cache is keyed by the CPU too), caches the
shared library and registers the handlers with ``jax.ffi``.

The cache is verified before anything in it is loaded: each library is stored
under a name that holds its SHA-256, beside a manifest that records that digest
and its size, and a library is loaded only when its bytes match the manifest.
A truncated, corrupted or unrecorded file is never loaded: the library is
rebuilt, with a warning; where it cannot be (no compiler, a failed build), the
selection warns and counts with XLA's scatter instead (the same τ and mask, bit
for bit: tested).

Environment:
  ``IRE_OPTAX_NATIVE``: ``0`` switches the native method off (asking for it raises).
  ``IRE_OPTAX_CACHE``: where the compiled library is kept (default
  ``$XDG_CACHE_HOME/ire_optax`` or ``~/.cache/ire_optax``).
  ``CXX``: the C++ compiler (when unset: ``c++``, then ``g++``, then ``clang++``).
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


def disabled_by_env() -> bool:
  """Whether ``IRE_OPTAX_NATIVE`` switches the native method off."""
  return os.environ.get("IRE_OPTAX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def enabled() -> bool:
  """Whether the native histograms can count CPU arrays: builds, or loads from the cache
  after verifying it, and registers them the first time (warning where it cannot)."""
  if disabled_by_env():
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
  """``CXX`` when it is set (and found), else the first of ``c++``, ``g++``, ``clang++``."""
  names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
  return next((name for name in names if shutil.which(name)), None)


def _cpu_tag() -> bytes:
  """What identifies this CPU for ``-march=native`` (a shared cache may serve several)."""
  try:
    info = Path("/proc/cpuinfo").read_text()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(lines).encode()
  except OSError:
    return (platform.processor() or platform.machine()).encode()


def _build_tag(cxx: str) -> str:
  """What the library is built from: source, flags, compiler, jax, platform and CPU."""
  return hashlib.sha256(b"\0".join([
      _SOURCE.read_bytes(), " ".join(_FLAGS + _NATIVE_ARCH).encode(), cxx.encode(),
      jax.__version__.encode(), platform.machine().encode(), sys.platform.encode(),
      _cpu_tag()])).hexdigest()[:16]


def _manifest(tag: str) -> Path:
  """The file recording the digest and size of the library built for ``tag``."""
  return _cache_dir() / f"histogram-{tag}.sha256"


def _library(tag: str, digest: str) -> Path:
  # Named by its content: a concurrent build never replaces it with other bytes.
  return _cache_dir() / f"histogram-{tag}-{digest[:16]}.so"


def _write_atomically(path: Path, data: bytes) -> None:
  """Writes ``path`` beside itself and renames: readers never see half a file."""
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _verified(tag: str) -> Path | None:
  """The cached library for ``tag`` if its bytes match its manifest (else ``None``, with a
  warning when a manifest or library is there but does not verify)."""
  manifest = _manifest(tag)
  if not manifest.exists():
    return None
  try:
    digest, size = manifest.read_text().split()
    data = _library(tag, digest).read_bytes()
    ok = len(data) == int(size) and hashlib.sha256(data).hexdigest() == digest
    problem = "" if ok else f"{len(data)} bytes that do not match their recorded digest"
  except (OSError, ValueError) as e:
    problem = f"unreadable ({e})"
  if not problem:
    return _library(tag, digest)
  warnings.warn(f"ire_optax: the cached native CPU kernel for {manifest.name} failed "
                f"verification ({problem}); rebuilding it.", RuntimeWarning, stacklevel=5)
  return None


def _build(cxx: str, tag: str) -> None:
  """Compiles the library into the cache with the manifest that verifies it."""
  cache = _cache_dir()
  cache.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
  os.close(fd)
  try:
    command = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    try:
      subprocess.run(command[:1] + list(_NATIVE_ARCH) + command[1:], check=True,
                     capture_output=True, timeout=300)
    except subprocess.CalledProcessError:
      subprocess.run(command, check=True, capture_output=True, timeout=300)
    data = Path(tmp).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    os.replace(tmp, _library(tag, digest))
    _write_atomically(_manifest(tag), f"{digest} {len(data)}\n".encode())
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _build_and_register() -> bool:
  try:
    cxx = _compiler()
    if cxx is None:
      raise OSError("no C++ compiler found (set CXX)")
    tag = _build_tag(cxx)
    lib_path = _verified(tag)
    if lib_path is None:
      _build(cxx, tag)
      lib_path = _verified(tag)
      if lib_path is None:
        raise OSError("the library just built does not verify")
    lib = ctypes.cdll.LoadLibrary(str(lib_path))
    jax.ffi.register_ffi_target(_HIGH, jax.ffi.pycapsule(lib.IreHistHigh), platform="cpu")
    jax.ffi.register_ffi_target(_LOW, jax.ffi.pycapsule(lib.IreHistLow), platform="cpu")
    jax.ffi.register_ffi_target(_SELECT, jax.ffi.pycapsule(lib.IreSelect), platform="cpu")
    return True
  except (OSError, subprocess.SubprocessError, AttributeError, ValueError) as e:
    detail = getattr(e, "stderr", b"") or b""
    warnings.warn(
        "ire_optax: could not build the native CPU histogram, using XLA's scatter instead "
        f"(slower IRE refresh on CPU): {e} {detail.decode(errors='replace')[:500]}",
        RuntimeWarning, stacklevel=3)
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
