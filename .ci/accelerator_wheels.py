"""Prints the pip requirements of the deviceless TPU and GPU compilers matching installed JAX.

libtpu's version is the one jax's own ``tpu`` extra pins; the CUDA plugin and its PJRT
library are released with jaxlib, at its version. CI installs them with ``--no-deps`` (no
CUDA runtime: nothing runs on a device) so that the compiled-program tests
(``tests/test_compiled*.py``) run instead of skipping.
"""

import importlib.metadata as metadata
import re


def requirements() -> list[str]:
  tpu = [r.split(";")[0].strip() for r in metadata.requires("jax") or ()
         if r.startswith("libtpu") and re.search(r"extra\s*==\s*['\"]tpu['\"]", r)]
  jaxlib = metadata.version("jaxlib")
  return [*tpu, f"jax-cuda12-plugin=={jaxlib}", f"jax-cuda12-pjrt=={jaxlib}"]


if __name__ == "__main__":
  print(" ".join(requirements()))
