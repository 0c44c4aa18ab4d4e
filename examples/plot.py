"""Plot the curves of finished (or running) example runs into one PNG.

    python -m examples.plot runs/llama-adamw runs/llama-adamw+ire -o llama.png

Each argument is a run directory (holding ``metrics.jsonl``); the legend uses
the directory names, with as many parent directories as it takes to tell them
apart (``llama/adamw``, ``llama-2/adamw``). Panels: training loss, held-out
loss, held-out accuracy.
"""

import argparse
from pathlib import Path

from examples.common import plots, train


def main(argv=None) -> Path:
  p = argparse.ArgumentParser(prog="python -m examples.plot", description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", help="run directories")
  p.add_argument("-o", "--output", default="curves.png", help="PNG to write (%(default)s)")
  p.add_argument("--title", default="", help="figure title")
  args = p.parse_args(argv)
  paths = [Path(r) for r in args.runs]
  for r in paths:
    if not (r / "metrics.jsonl").is_file():
      p.error(f"{r} is not a run directory (no metrics.jsonl in it).")
  runs = {label: train.read_metrics(r) for label, r in zip(labels(paths), paths, strict=True)}
  out = plots.plot_runs(runs, args.output, title=args.title)
  print(out)
  return out


def labels(paths: list[Path]) -> list[str]:
  """The shortest path suffixes (at least the names) that tell ``paths`` apart."""
  parts = [p.resolve().parts for p in paths]
  for n in range(1, max(len(q) for q in parts) + 1):
    names = ["/".join(q[-n:]) for q in parts]
    if len(set(names)) == len(names):
      return names
  return [str(p) for p in paths]  # the same directory given twice


if __name__ == "__main__":
  main()
