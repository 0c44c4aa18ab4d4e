"""Train a Llama-style decoder (toy to Llama-60M) with any ire_optax optimizer.

A decoder with RMSNorm, rotary embeddings, SwiGLU and causal attention. Runs offline by default
on the documentation text that ships with CPython (character level); `--data wikitext:DIR` or
`--data text:PATH` for other corpora. `python -m examples.llama --help` (from the repository
root) lists every option; `get_config()` is the same run as a typed config
(`examples.common.config`).
"""

from examples.common import cli
from examples.common.config import DataConfig, ModelConfig, OptimizerConfig, TrainConfig

USAGE = (
    "python -m examples.llama --opt adamw+ire --ire-kappa 3 --ire-gamma 0.6",
    "python -m examples.llama --data wikitext:~/data/wikitext-103 --tokenizer t5-base "
    "--size 60m --seq-len 256 --lr 6e-4",
)


def get_config() -> TrainConfig:
  """The defaults of ``python -m examples.llama``: AdamW on a 0.8M-parameter Llama, 500 steps."""
  return TrainConfig(
      example="llama", data=DataConfig(spec="cpython-docs"), model=ModelConfig(size="mini"),
      optimizer=OptimizerConfig(name="adamw", base="adamw", lr=2e-3, b2=0.95,
                                weight_decay=0.1, clip_norm=1.0, warmup_steps=0.05),
      batch_size=16, steps=500, eval_every=100, eval_batches=16)


def main(argv=None):
  return cli.main("llama", argv)


if __name__ == "__main__":
  main()
