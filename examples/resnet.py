"""Train a CIFAR-style ResNet (ResNet-20/56 family, BatchNorm) with any ire_optax optimizer.

Runs offline by default on scikit-learn's bundled digits; `--data cifar10:DIR` for CIFAR.
`python examples/resnet.py --help` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import cli  # noqa: E402


def main(argv=None):
  return cli.main("resnet", argv)


if __name__ == "__main__":
  main()
