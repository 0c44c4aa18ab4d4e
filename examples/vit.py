"""Train a Vision Transformer (toy to ViT-S) with any ire_optax optimizer.

Runs offline by default on scikit-learn's bundled digits; `--data cifar100:DIR` for CIFAR-100.
`python -m examples.vit --help` (from the repository root) lists every option.
"""

from examples.common import cli


def main(argv=None):
  return cli.main("vit", argv)


if __name__ == "__main__":
  main()
