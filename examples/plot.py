"""Plot the curves of finished (or running) example runs into one PNG.

    python examples/plot.py runs/llama-adamw runs/llama-adamw+ire -o llama.png

Each argument is a run directory (holding ``metrics.jsonl``); the legend uses
the directory names. Panels: training loss, held-out loss, held-out accuracy.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import train  # noqa: E402


def main(argv=None) -> Path:
  p = argparse.ArgumentParser(prog="examples/plot.py", description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", help="run directories")
  p.add_argument("-o", "--output", default="curves.png", help="PNG to write (%(default)s)")
  p.add_argument("--title", default="", help="figure title")
  args = p.parse_args(argv)
  runs = {Path(r).name: train.read_metrics(r) for r in args.runs}
  out = train.plot_runs(runs, args.output, title=args.title)
  print(out)
  return out


if __name__ == "__main__":
  main()
