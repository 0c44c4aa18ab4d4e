"""Train a Vision Transformer (toy to ViT-S) with any ire_optax optimizer.

Runs offline by default (a small ViT on scikit-learn's bundled digits); `--data cifar100:DIR`
for CIFAR-100. `python -m examples.vit --help` (from the repository root) lists every option;
`get_config()` is the same run as a typed config (`examples.common.config`).
"""

from examples.common import cli
from examples.common.config import DataConfig, ModelConfig, OptimizerConfig, TrainConfig

USAGE = (
    "python -m examples.vit --opt adamw+ire --ire-kappa 2 --ire-gamma 0.8",
    "python -m examples.vit --opt gsam --rho 0.6 --rho-min 0.1 --rho-schedule lr "
    "--gsam-alpha 0.6 --final-lr-ratio 0.01",
    "python -m examples.vit --data cifar100:~/data/cifar-100-python --size vit-s "
    "--label-smoothing 0.1",
)


def get_config() -> TrainConfig:
  """The defaults of ``python -m examples.vit``: AdamW on a small ViT, digits, 400 steps."""
  return TrainConfig(
      example="vit", data=DataConfig(spec="digits"), model=ModelConfig(size="mini"),
      optimizer=OptimizerConfig(name="adamw", base="adamw", lr=1e-3, weight_decay=0.05,
                                warmup_steps=0.05),
      batch_size=128, steps=400, eval_every=100)


def main(argv=None):
  return cli.main("vit", argv)


if __name__ == "__main__":
  main()
