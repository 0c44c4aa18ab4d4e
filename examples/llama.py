"""Train a Llama-style decoder (toy to Llama-60M) with any ire_optax optimizer.

Runs offline by default on the documentation text that ships with CPython (character level);
`--data wikitext:DIR` or `--data text:PATH` for other corpora.
`python examples/llama.py --help` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import cli  # noqa: E402


def main(argv=None):
  return cli.main("llama", argv)


if __name__ == "__main__":
  main()
