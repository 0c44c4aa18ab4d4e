"""Plot the curves of finished (or running) example runs into one PNG.

    python -m examples.plot runs/llama-adamw runs/llama-adamw+ire -o llama.png

Each argument is a run directory (holding ``metrics.jsonl``); the legend uses
the directory names. Panels: training loss, held-out loss, held-out accuracy.
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
  runs = {Path(r).name: train.read_metrics(r) for r in args.runs}
  out = plots.plot_runs(runs, args.output, title=args.title)
  print(out)
  return out


if __name__ == "__main__":
  main()
