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

    python -m examples.compare
    python -m examples.compare --opts adamw adamw+ire sam
    python -m examples.compare --example resnet --opts sgd sgd+ire sam sam+ire
    python -m examples.compare --opts adamw "adamw+ire,ire-kappa=4,ire-gamma=0.7"

``--update-docs`` also writes the run's record to
``examples/results/compare_<example>.json`` and regenerates the table of
``docs/examples.md`` from it (the page's numbers are never typed by hand).

Each optimizer may carry its own options after commas (``name,key=value,...``,
keys spelled as the example's ``--options`` without the dashes). Every other
option is passed to the example (``python -m examples.llama --help`` lists
them), e.g. ``--steps 1000 --size small --lr 1e-3``.

Each run writes to its own directory, named after its whole specification
(``adamw,lr=3e-3`` -> ``OUT/llama/adamw_lr=3e-3/``). A comparison never
replaces an earlier one silently: when ``OUT/<example>/`` already holds runs,
the new comparison goes to ``OUT/<example>-2/`` (``-3``, ...), unless
``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

from examples.common import cli, config, plots, train

ROOT = Path(__file__).resolve().parents[1]
# The demo's committed record and the docs page whose table is generated from it.
RECORD = ROOT / "examples" / "results" / "compare_{example}.json"
DOCS_PAGE = ROOT / "docs" / "examples.md"
BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"

DEMO_DEFAULTS = {
    # Small enough for a few minutes on two CPU cores, big enough to learn something.
    "llama": ["--steps", "300", "--eval-every", "25", "--eval-batches", "12", "--size",
              "mini", "--batch-size", "16", "--seq-len", "64", "--lr", "1e-3"],
    "resnet": ["--steps", "300", "--eval-every", "25", "--batch-size", "64"],
    "vit": ["--steps", "300", "--eval-every", "25", "--batch-size", "64"],
    "mlp": ["--steps", "300", "--eval-every", "25", "--batch-size", "64"],
}
DEFAULT_OPTS = {"llama": ["adamw", "adamw,lr=3e-3", "adamw+ire"], "resnet": ["sgd", "sgd+ire"],
                "vit": ["adamw", "adamw+ire"], "mlp": ["sgd", "sgd+ire"]}


def parse_opt(text: str) -> tuple[str, list[str]]:
  """``"sam+ire,rho=0.1,nesterov"`` -> ``("sam+ire", ["--rho", "0.1", "--nesterov"])``."""
  name, *pairs = [t.strip() for t in text.split(",") if t.strip()]
  argv = ["--opt", name]
  for pair in pairs:
    key, eq, value = pair.partition("=")
    argv += [f"--{key.replace('_', '-')}"] + ([value] if eq else [])
  return name, argv


def run_names(opts: list[str]) -> list[str]:
  """One directory name per optimizer specification, distinct, made of the whole spec.

  ``"adamw,lr=3e-3"`` -> ``"adamw_lr=3e-3"``, ``"adamw+ire"`` -> ``"adamw_ire"``;
  specifications that give the same name get ``_<position>`` appended.
  """
  names = [re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_") or "run" for text in opts]
  return [n + (f"_{i}" if names.count(n) > 1 else "") for i, n in enumerate(names)]


def output_dir(root: Path, *, overwrite: bool = False) -> Path:
  """``root``, unless it holds an earlier comparison: then ``root-2`` (``-3``, ...).

  With ``overwrite`` always ``root`` (its runs of the same names are replaced).
  """
  if overwrite or not root.exists() or not any(root.iterdir()):
    return root
  n = 2
  while (root.parent / f"{root.name}-{n}").exists():
    n += 1
  return root.parent / f"{root.name}-{n}"


def eval_curve(records: list[dict]) -> list[tuple[int, float]]:
  """``(step, held-out loss)`` of the evaluated records of a run."""
  return [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]


def steps_to_reach(records: list[dict], target: float) -> int | None:
  """The first evaluated step whose held-out loss is <= ``target``."""
  return train.steps_to_reach(eval_curve(records), target)


def format_table(rows: list[dict], *, text: bool) -> str:
  acc_name = "next-token acc" if text else "held-out acc"
  head = ["optimizer", "train loss", "held-out loss", acc_name, "steps to baseline",
          "speed-up", "s/step", "compile s", "wall s"]
  lines = [head]
  for r in rows:
    lines.append([
        r["label"], f"{r['train_loss']:.4f}", f"{r['eval_loss']:.4f}", f"{r['eval_acc']:.4f}",
        "-" if r["reach"] is None else str(r["reach"]),
        "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
        f"{1 / r['steps_per_s']:.3f}" if r["steps_per_s"] else "-",
        "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}", f"{r['wall_s']:.0f}"])
  widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
  fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([fmt(lines[0]), sep] + [fmt(r) for r in lines[1:]])


def make_record(example: str, opts: list[str], argv: list[str], rows: list[dict]) -> dict:
  """What ``--update-docs`` commits: the command, the machine, and each run's results.

  ``argv`` are the options of the command (without ``--update-docs``); ``opts``
  the optimizers it compared.
  """
  import flax
  import jax
  import optax

  import ire_optax

  keep = ("label", "opt", "steps", "params", "train_loss", "eval_loss", "eval_acc", "reach",
          "speedup", "steps_per_s", "compile_s", "wall_s")
  return {
      "example": example, "opts": opts, "argv": argv,
      "machine": {"platform": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
                  "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                  "versions": {"ire_optax": ire_optax.__version__, "jax": jax.__version__,
                               "optax": optax.__version__, "flax": flax.__version__}},
      "rows": [dict({k: r[k] for k in keep},
                    curve=[list(point) for point in eval_curve(r["records"])]) for r in rows],
  }


def docs_block(record: dict) -> str:
  """The generated part of docs/examples.md: the command, the table and what it says."""
  rows = record["rows"]
  text = config.KINDS[record["example"]] == "text"
  base, steps = rows[0], rows[0]["steps"]
  argv = " ".join(record["argv"])
  command = "python -m examples.compare" + (f" {argv}" if argv else "")
  m = record["machine"]
  lines = [
      BEGIN,
      "<!-- generated by `python -m examples.compare --update-docs` from "
      f"examples/results/compare_{record['example']}.json; do not edit by hand -->",
      "",
      f"Output of `{command}` ({m['cpus']} CPU cores, load average "
      f"{m['load_average']:.1f} at the end; jax {m['versions']['jax']}, "
      f"optax {m['versions']['optax']}, flax {m['versions']['flax']}):",
      "",
      "```",
      format_table(rows, text=text),
      "```",
      "",
      f"The baseline ({base['label']}) reaches a held-out loss of {base['eval_loss']:.4f} "
      f"after {steps} steps.",
  ]
  for r in rows[1:]:
    if r["reach"] is None:
      lines[-1] += f" {r['label']} does not reach it in {steps} steps."
    else:
      lines[-1] += (f" {r['label']} reaches it after {r['reach']} steps "
                    f"({r['speedup']:.2f}x).")
  lines.append(END)
  return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
  """``text`` with the part between the demo markers (markers included) replaced."""
  start, end = text.find(BEGIN), text.find(END)
  if start < 0 or end < start:
    raise ValueError(f"no {BEGIN} ... {END} block")
  return text[:start] + block + text[end + len(END):]


def read_record(example: str = "llama") -> dict:
  """The committed record of ``--update-docs``."""
  return json.loads(Path(str(RECORD).format(example=example)).read_text())


def make_parser() -> argparse.ArgumentParser:
  """The options of the comparison itself; every other option goes to the example."""
  presets = "\n".join(f"    {k}: {' '.join(v)}" for k, v in DEMO_DEFAULTS.items())
  parser = argparse.ArgumentParser(
      prog="python -m examples.compare", description=__doc__.split("\n\n")[0],
      epilog="\n\n".join(__doc__.split("\n\n")[1:])
      + f"\n\nOptions preset for each example (later options override them):\n{presets}",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--example", choices=sorted(cli.EXAMPLES), default="llama",
                      help="which example to train (default: %(default)s)")
  parser.add_argument("--opts", nargs="+", metavar="OPT", default=None,
                      help="optimizers, the first is the baseline (default: llama: adamw "
                           "adamw,lr=3e-3 adamw+ire; vit: adamw adamw+ire; resnet and mlp: "
                           "sgd sgd+ire)")
  parser.add_argument("--out", default="runs/compare",
                      help="runs go to OUT/<example>/<optimizer spec>/; when OUT/<example>/ "
                           "holds an earlier comparison, to OUT/<example>-2/ (-3, ...) "
                           "(default: %(default)s)")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into OUT/<example>/ even if it holds an earlier comparison "
                           "(its runs of the same names are replaced)")
  parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bars (default: when the terminal shows them)")
  parser.add_argument("--update-docs", action="store_true",
                      help="write the record to examples/results/compare_EXAMPLE.json and "
                           "regenerate the table of docs/examples.md from it")
  return parser


def train_each(example: str, opts: list[str], base_argv: list[str], out: Path, *,
               progress: bool) -> list[dict]:
  """Trains ``example`` once per optimizer specification; the summaries and records."""
  rows = []
  for i, (text, name) in enumerate(zip(opts, run_names(opts), strict=True)):
    _, opt_argv = parse_opt(text)
    run_argv = base_argv + opt_argv + ["--out", str(out), "--name", name]
    if not progress:
      run_argv.append("--no-progress")
    result = train.run(cli.parse(example, run_argv), quiet=(i > 0))
    s = dict(result.summary, label=text)
    s["records"] = train.read_metrics(s["run_dir"])
    rows.append(s)
    print(f"  {text:<24} held-out loss {s['eval_loss']:.4f}  acc {s['eval_acc']:.4f}  "
          f"({s['wall_s']:.0f}s)", flush=True)
  # Steps to reach the baseline's final held-out loss, and the speed-up over the baseline.
  base_reach = steps_to_reach(rows[0]["records"], rows[0]["eval_loss"])
  for r in rows:
    r["reach"] = steps_to_reach(r["records"], rows[0]["eval_loss"])
    r["speedup"] = base_reach / r["reach"] if r["reach"] else None
  return rows


def update_docs(example: str, opts: list[str], argv: list[str], rows: list[dict]) -> None:
  """Writes the record of the comparison and regenerates the table of the docs from it."""
  shown = [a for a in argv if a not in ("--update-docs", "--progress", "--no-progress")]
  record = make_record(example, opts, shown, rows)
  path = Path(str(RECORD).format(example=example))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record, indent=2) + "\n")
  DOCS_PAGE.write_text(replace_block(DOCS_PAGE.read_text(), docs_block(record)))
  print(f"wrote {path} and the table of {DOCS_PAGE}")


def main(argv: list[str] | None = None) -> list[dict]:
  args, rest = make_parser().parse_known_args(argv)
  opts = args.opts or DEFAULT_OPTS[args.example]
  root = Path(args.out) / args.example
  out = output_dir(root, overwrite=args.overwrite)
  base_argv = DEMO_DEFAULTS[args.example] + rest
  print(f"compare.py: {args.example} | " + " vs ".join(opts) + f" | extra options: "
        f"{' '.join(base_argv)}", flush=True)
  if out != root:
    print(f"{root} holds an earlier comparison (--overwrite replaces it); this one goes to "
          f"{out}", flush=True)
  progress = sys.stderr.isatty() if args.progress is None else args.progress
  rows = train_each(args.example, opts, base_argv, out, progress=progress)
  table = format_table(rows, text=config.KINDS[args.example] == "text")
  png = plots.plot_runs({r["label"]: r["records"] for r in rows}, out / "comparison.png",
                        title=f"{args.example}: " + " vs ".join(opts))
  print()
  print(f"Held-out loss of the baseline ({opts[0]}) after {rows[0]['steps']} steps: "
        f"{rows[0]['eval_loss']:.4f}. 'steps to baseline' is the first evaluation at which "
        f"each optimizer reaches it; speed-up = {rows[0]['reach']} / that.")
  print(table)
  print(f"\ncurves: {png}")
  (out / "comparison.md").write_text(table + "\n")
  (out / "comparison.json").write_text(json.dumps(
      [{k: v for k, v in r.items() if k != "records"} for r in rows], indent=2))
  if args.update_docs:
    update_docs(args.example, opts, sys.argv[1:] if argv is None else list(argv), rows)
  return rows


if __name__ == "__main__":
  main()
