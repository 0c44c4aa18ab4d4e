"""Train a multi-layer perceptron on flattened images with any ire_optax optimizer.

The small model of the label-noise and sharpness experiments. Runs offline by default (two
hidden layers of 128 units on scikit-learn's bundled digits); `--data mnist:DIR` for MNIST.
`python -m examples.mlp --help` (from the repository root) lists every option; `get_config()`
is the same run as a typed config (`examples.common.config`).
"""

from examples.common import cli
from examples.common.config import DataConfig, ModelConfig, OptimizerConfig, TrainConfig

USAGE = (
    "python -m examples.mlp --opt sgd+ire --ire-kappa 2",
    "python -m examples.mlp --data mnist:~/data/mnist --size base --label-noise 0.2",
)


def get_config() -> TrainConfig:
  """The defaults of ``python -m examples.mlp``: SGD on a 2x128 MLP, digits, 400 steps."""
  return TrainConfig(
      example="mlp", data=DataConfig(spec="digits"), model=ModelConfig(size="small"),
      optimizer=OptimizerConfig(name="sgd", base="sgd", lr=0.1),
      batch_size=128, steps=400, eval_every=100)


def main(argv=None):
  return cli.main("mlp", argv)


if __name__ == "__main__":
  main()
