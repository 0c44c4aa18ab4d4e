"""Train a Llama-style decoder (toy to Llama-60M) with any ire_optax optimizer.

Runs offline by default on the documentation text that ships with CPython (character level);
`--data wikitext:DIR` or `--data text:PATH` for other corpora.
`python -m examples.llama --help` (from the repository root) lists every option.
"""

from examples.common import cli


def main(argv=None):
  return cli.main("llama", argv)


if __name__ == "__main__":
  main()
