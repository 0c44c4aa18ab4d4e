"""Train one example with several optimizers on the same data and compare them.

Every run uses the same model initialisation, the same batches in the same
order and the same learning-rate schedule; only the optimizer differs. The
script prints a table (final training loss, held-out loss and accuracy, and
how many steps each optimizer needed to reach the held-out loss that the
first optimizer reaches at the end: the speed-up measure of Wang et al. 2024)
and writes the curves of all runs to one PNG.

By default it trains the 0.8M-parameter Llama for 300 steps on the
documentation text that ships with CPython (offline), with AdamW at learning
rate 1e-3, AdamW at 3e-3 and AdamW+IRE at 1e-3, in a few minutes on two CPU
cores:

    python examples/compare.py
    python examples/compare.py --opts adamw adamw+ire sam
    python examples/compare.py --example resnet --opts sgd sgd+ire sam sam+ire
    python examples/compare.py --opts adamw "adamw+ire,ire-kappa=4,ire-gamma=0.7"

Each optimizer may carry its own options after commas (``name,key=value,...``,
keys spelled as the example's ``--options`` without the dashes). Every other
option is passed to the example (``python examples/llama.py --help`` lists
them), e.g. ``--steps 1000 --size small --lr 1e-3``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import cli, train  # noqa: E402

DEMO_DEFAULTS = {
    # Small enough for a few minutes on two CPU cores, big enough to learn something.
    "llama": ["--steps", "300", "--eval-every", "25", "--eval-batches", "12", "--size",
              "mini", "--batch-size", "16", "--seq-len", "64", "--lr", "1e-3"],
    "resnet": ["--steps", "300", "--eval-every", "25", "--batch-size", "64"],
    "vit": ["--steps", "300", "--eval-every", "25", "--batch-size", "64"],
}
DEFAULT_OPTS = {"llama": ["adamw", "adamw,lr=3e-3", "adamw+ire"], "resnet": ["sgd", "sgd+ire"],
                "vit": ["adamw", "adamw+ire"]}


def parse_opt(text: str) -> tuple[str, list[str]]:
  """``"sam+ire,rho=0.1,nesterov"`` -> ``("sam+ire", ["--rho", "0.1", "--nesterov"])``."""
  name, *pairs = [t.strip() for t in text.split(",") if t.strip()]
  argv = ["--opt", name]
  for pair in pairs:
    key, eq, value = pair.partition("=")
    argv += [f"--{key.replace('_', '-')}"] + ([value] if eq else [])
  return name, argv


def steps_to_reach(records: list[dict], target: float) -> int | None:
  """The first evaluated step whose held-out loss is <= ``target``."""
  for r in records:
    if r.get("eval_loss") is not None and r["eval_loss"] <= target + 1e-12:
      return r["step"]
  return None


def format_table(rows: list[dict], *, text: bool) -> str:
  acc_name = "next-token acc" if text else "held-out acc"
  head = ["optimizer", "train loss", "held-out loss", acc_name, "steps to baseline",
          "speed-up", "s/step", "wall s"]
  lines = [head]
  for r in rows:
    lines.append([
        r["label"], f"{r['train_loss']:.4f}", f"{r['eval_loss']:.4f}", f"{r['eval_acc']:.4f}",
        "-" if r["reach"] is None else str(r["reach"]),
        "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
        f"{1 / r['steps_per_s']:.3f}" if r["steps_per_s"] else "-", f"{r['wall_s']:.0f}"])
  widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
  fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([fmt(lines[0]), sep] + [fmt(r) for r in lines[1:]])


def main(argv: list[str] | None = None) -> list[dict]:
  presets = "\n".join(f"    {k}: {' '.join(v)}" for k, v in DEMO_DEFAULTS.items())
  parser = argparse.ArgumentParser(
      prog="examples/compare.py", description=__doc__.split("\n\n")[0],
      epilog="\n\n".join(__doc__.split("\n\n")[1:])
      + f"\n\nOptions preset for each example (later options override them):\n{presets}",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--example", choices=sorted(cli.EXAMPLES), default="llama",
                      help="which example to train (default: %(default)s)")
  parser.add_argument("--opts", nargs="+", metavar="OPT", default=None,
                      help="optimizers, the first is the baseline (default: llama: adamw "
                           "adamw,lr=3e-3 adamw+ire; vit: adamw adamw+ire; resnet: sgd "
                           "sgd+ire)")
  parser.add_argument("--out", default="runs/compare",
                      help="runs go to OUT/<example>/<optimizer>/ (default: %(default)s)")
  parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bars (default: when the terminal shows them)")
  args, rest = parser.parse_known_args(argv)
  opts = args.opts or DEFAULT_OPTS[args.example]
  out = Path(args.out) / args.example

  ex_parser = cli.make_parser(args.example)
  base_argv = DEMO_DEFAULTS[args.example] + rest
  print(f"compare.py: {args.example} | " + " vs ".join(opts) + f" | extra options: "
        f"{' '.join(base_argv)}", flush=True)
  rows = []
  for i, text in enumerate(opts):
    label, opt_argv = parse_opt(text)
    run_argv = base_argv + opt_argv + ["--out", str(out), "--name", label.replace("+", "_")
                                       + (f"_{i}" if opts.count(text) > 1 else "")]
    show = sys.stderr.isatty() if args.progress is None else args.progress
    if not show:
      run_argv.append("--no-progress")
    run_args = ex_parser.parse_args(run_argv)
    result = cli.run_example(args.example, run_args, quiet=(i > 0))
    s = dict(result.summary, label=text)
    s["records"] = train.read_metrics(s["run_dir"])
    rows.append(s)
    print(f"  {text:<24} held-out loss {s['eval_loss']:.4f}  acc {s['eval_acc']:.4f}  "
          f"({s['wall_s']:.0f}s)", flush=True)

  target = rows[0]["eval_loss"]
  base_reach = steps_to_reach(rows[0]["records"], target)
  for r in rows:
    r["reach"] = steps_to_reach(r["records"], target)
    r["speedup"] = base_reach / r["reach"] if r["reach"] else None
  text = cli.EXAMPLES[args.example]["kind"] == "text"
  table = format_table(rows, text=text)
  png = train.plot_runs({r["label"]: r["records"] for r in rows}, out / "comparison.png",
                        title=f"{args.example}: " + " vs ".join(opts))
  print()
  print(f"Held-out loss of the baseline ({opts[0]}) after {rows[0]['steps']} steps: "
        f"{target:.4f}. 'steps to baseline' is the first evaluation at which each optimizer "
        f"reaches it; speed-up = {base_reach} / that.")
  print(table)
  print(f"\ncurves: {png}")
  (out / "comparison.md").write_text(table + "\n")
  (out / "comparison.json").write_text(json.dumps(
      [{k: v for k, v in r.items() if k != "records"} for r in rows], indent=2))
  return rows


if __name__ == "__main__":
  main()
