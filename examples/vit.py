"""Train a Vision Transformer (toy to ViT-S) with any ire_optax optimizer.

Runs offline by default on scikit-learn's bundled digits; `--data cifar100:DIR` for CIFAR-100.
`python examples/vit.py --help` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import cli  # noqa: E402


def main(argv=None):
  return cli.main("vit", argv)


if __name__ == "__main__":
  main()
