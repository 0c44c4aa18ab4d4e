"""Train a CIFAR-style ResNet (ResNet-20/56 family, BatchNorm) with any ire_optax optimizer.

Runs offline by default on scikit-learn's bundled digits; `--data cifar10:DIR` for CIFAR.
`python -m examples.resnet --help` (from the repository root) lists every option.
"""

from examples.common import cli


def main(argv=None):
  return cli.main("resnet", argv)


if __name__ == "__main__":
  main()
