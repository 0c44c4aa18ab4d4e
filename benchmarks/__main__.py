"""``python -m benchmarks {list,run,render}``: see :mod:`benchmarks`."""

from __future__ import annotations

import argparse
import sys
import tempfile

from benchmarks import data, experiments, render, runner
from benchmarks.spec import smoke


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  sub.add_parser("list", help="every benchmark and what it measures")
  r = sub.add_parser("render", help="rewrite every report and docs block from the results")
  r.add_argument("--check", action="store_true", help="exit 1 if any output is stale")
  for name in experiments.NAMES:
    module = experiments.load(name)
    if not hasattr(module, "run"):
      continue
    q = sub.add_parser(name, help=(module.__doc__ or "").split("\n")[0])
    q.add_argument("--smoke", action="store_true", help="a seconds-long run (never committed)")
    q.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    data.add_data_dir_argument(q)
    if hasattr(module, "add_arguments"):
      module.add_arguments(q)
  return p


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["run"]:  # `run NAME ...` and `NAME ...` are the same command
    argv = argv[1:]
  runner.ARGV = argv  # what the results record as their command
  args = _parser().parse_args(argv)
  if args.command == "list":
    for name in experiments.NAMES:
      module = experiments.load(name)
      print(f"{name:16s} {(module.__doc__ or '').strip().splitlines()[0]}")
    return 0
  if args.command == "render":
    return render.main(check=args.check)
  module = experiments.load(args.command)
  spec = module.SPEC
  if args.smoke:
    spec = smoke(spec)
    if args.out is None:  # a smoke run never overwrites the committed results
      args.out = tempfile.mkdtemp(prefix=f"{args.command}-smoke-")
      print(f"--smoke: results in {args.out}")
  module.run(spec, args)
  return render.main() if args.out is None else 0  # the committed results: their reports too


if __name__ == "__main__":
  sys.exit(main())
