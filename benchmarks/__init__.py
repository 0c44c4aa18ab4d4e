"""The benchmarks of ire_optax: experiments declared as data, one runner, one renderer.

Run from the repository root::

  python -m benchmarks list              # every benchmark, what it measures
  python -m benchmarks run NAME [...]     # measure; writes results/NAME.json (+ its report)
  python -m benchmarks render             # rewrite every report and docs block from the JSON
  python -m benchmarks render --check     # exit 1 if any of them is stale

See ``CONTRIBUTING.md`` for where an experiment is declared and how to add one.
"""
