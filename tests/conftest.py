"""Test configuration: the CPU backend with 8 emulated devices, set before JAX initialises;
and the test tiers.

``JAX_PLATFORMS=cpu`` unless set: with libtpu or the CUDA plugin installed (CI installs them
for the deviceless compiled-program tests) JAX would otherwise probe for a TPU or a GPU.

Every test gets exactly one tier marker (registered in ``pyproject.toml``), selected with
``-m unit``, ``-m integration`` or ``-m docs``:

* ``unit``: the library, fast (the quick loop; CI also runs it at the lowest versions that
  ``pyproject.toml`` allows);
* ``integration``: the examples and the benchmark scripts (smoke runs), and whole-system runs
  (two processes, thousands of steps);
* ``docs``: the docs' and the README's code runs, and the generated tables are up to date.

A tier marker written on a test (or its class or module) wins; otherwise ``TIERS`` below
decides, by the first pattern that matches the test's module (``test_sam``) or its id without
the parameters (``test_cost::test_cli_offers_every_microbatch_mode``,
``test_cost::SAMAuxTest::test_no_aux_raises_in_sam_aux``); a test that no pattern matches is
``unit``.
"""

import fnmatch
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TIER_NAMES = ("unit", "integration", "docs")

TIERS = (
    # The examples and the benchmarks: their code, smoke runs and committed tables.
    ("test_examples", "integration"),
    ("test_data", "integration"),  # the examples' data loaders
    ("test_bench_*", "integration"),
    # Through benchmarks/_compiled.py (the HLO reader), with the deviceless TPU and GPU
    # compilers: the reader itself, and the library's compiled-cost targets.
    ("test_compiled", "integration"),
    ("test_compiled_targets", "integration"),
    # Library tests that run the examples' code.
    ("test_cost::test_examples_*", "integration"),
    ("test_cost::test_cli_*", "integration"),
    ("test_gsam::test_examples_*", "integration"),
    ("test_multidevice::test_data_parallel_example_*", "integration"),
    # Whole-system runs: two processes; 2,048 steps of every optimizer.
    ("test_multihost", "integration"),
    ("test_long_run", "integration"),
    # The docs and the README run, and what they show is generated from the code and results.
    ("test_docs", "docs"),
    ("test_readme", "docs"),
    ("test_results", "docs"),
    ("test_gsam::test_docstring_examples", "docs"),
    ("test_mixed_precision::test_docs_recipe_runs", "docs"),
    ("test_nnx::test_page_python_blocks_run", "docs"),
    ("test_nnx::test_glue_*", "docs"),  # docs/nnx.md's table of glue lines and its counter
)


def tier(item: pytest.Item) -> str:
  """The tier of a collected test: its own marker, else the first matching ``TIERS`` row."""
  own = next((m.name for m in item.iter_markers() if m.name in TIER_NAMES), None)
  if own is not None:
    return own
  module = item.path.stem
  test = "::".join([module, *item.nodeid.split("::")[1:]]).split("[")[0]
  return next((which for pattern, which in TIERS
               if fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(test, pattern)),
              "unit")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  del config
  for item in items:
    which = tier(item)
    if item.get_closest_marker(which) is None:
      item.add_marker(which)
