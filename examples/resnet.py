"""Train a CIFAR-style ResNet (ResNet-20/56 family, BatchNorm) with any ire_optax optimizer.

Runs offline by default (ResNet-20 on scikit-learn's bundled digits); `--data cifar10:DIR` for
CIFAR. `python -m examples.resnet --help` (from the repository root) lists every option;
`get_config()` is the same run as a typed config (`examples.common.config`).
"""

from examples.common import cli
from examples.common.config import DataConfig, ModelConfig, OptimizerConfig, TrainConfig

USAGE = (
    "python -m examples.resnet --opt sam --rho 0.05",
    "python -m examples.resnet --opt asam --rho 1.0 --perturb weights --sam-every-k 2",
    "python -m examples.resnet --opt sgd+ire --ire-kappa 2 --ire-gamma 0.8 --ire-warmup 0.35",
    "python -m examples.resnet --data cifar10:~/data/cifar-10-batches-py --size resnet56 "
    "--steps 64000 --nesterov",
)


def get_config() -> TrainConfig:
  """The defaults of ``python -m examples.resnet``: SGD on ResNet-20, digits, 400 steps."""
  return TrainConfig(
      example="resnet", data=DataConfig(spec="digits"), model=ModelConfig(size="resnet20"),
      optimizer=OptimizerConfig(name="sgd", base="sgd", lr=0.1, weight_decay=5e-4),
      batch_size=128, steps=400, eval_every=100)


def main(argv=None):
  return cli.main("resnet", argv)


if __name__ == "__main__":
  main()
