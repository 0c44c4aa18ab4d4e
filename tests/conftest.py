"""Test configuration: the CPU backend with 8 emulated devices, set before JAX initialises.

``JAX_PLATFORMS=cpu`` unless set: with libtpu or the CUDA plugin installed (CI installs them
for the deviceless compiled-program tests) JAX would otherwise probe for a TPU or a GPU.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
