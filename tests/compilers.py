"""Where a compiled-program test's deviceless compiler (libtpu, the jax CUDA plugin) is missing.

A test skips there, except where ``IRE_OPTAX_REQUIRE_COMPILERS=1`` (``.ci/run`` sets it after
installing them): there a missing compiler fails the test instead of silently skipping every
TPU and H100 check.
"""

from __future__ import annotations

import os

import pytest

from benchmarks import compiled as X


def need(target: str) -> None:
  """Skips (or, where the compilers are required, fails) unless ``target`` compiles here."""
  why = X.available(target)
  if why:
    message = f"cannot compile for {target} here: {why}"
    if os.environ.get("IRE_OPTAX_REQUIRE_COMPILERS") == "1":
      pytest.fail(f"{message} (IRE_OPTAX_REQUIRE_COMPILERS=1)")
    pytest.skip(message)
