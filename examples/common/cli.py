"""Command lines of the three examples and the glue from arguments to a training run."""

from __future__ import annotations

import argparse
import functools
import textwrap

from . import data as data_lib
from . import models, optim, train

# Per-example defaults (each can be overridden on the command line).
EXAMPLES = {
    "resnet": dict(
        doc="CIFAR-style ResNet (BatchNorm) on images; default: ResNet-20 on scikit-learn's "
            "bundled digits (offline).",
        kind="image", base="sgd",
        defaults=dict(data="digits", size="resnet20", opt="sgd", lr=0.1, weight_decay=5e-4,
                      batch_size=128, steps=400, eval_every=100),
        usage=["python -m examples.resnet --opt sam --rho 0.05",
               "python -m examples.resnet --opt asam --rho 1.0 --perturb weights "
               "--sam-every-k 2",
               "python -m examples.resnet --opt sgd+ire --ire-kappa 2 --ire-gamma 0.8 "
               "--ire-warmup 0.35",
               "python -m examples.resnet --data cifar10:~/data/cifar-10-batches-py "
               "--size resnet56 --steps 64000 --nesterov"]),
    "vit": dict(
        doc="Vision Transformer on images; default: a small ViT on scikit-learn's bundled "
            "digits (offline).",
        kind="image", base="adamw",
        defaults=dict(data="digits", size="mini", opt="adamw", lr=1e-3, weight_decay=0.05,
                      warmup_steps=0.05, batch_size=128, steps=400, eval_every=100),
        usage=["python -m examples.vit --opt adamw+ire --ire-kappa 2 --ire-gamma 0.8",
               "python -m examples.vit --opt gsam --rho 0.6 --rho-min 0.1 --rho-schedule lr "
               "--gsam-alpha 0.6 --final-lr-ratio 0.01",
               "python -m examples.vit --data cifar100:~/data/cifar-100-python --size vit-s "
               "--label-smoothing 0.1"]),
    "llama": dict(
        doc="Llama-style decoder (RMSNorm, rotary embeddings, SwiGLU, causal attention) "
            "language model; default: a small model on the documentation text that ships "
            "with CPython, character level (offline).",
        kind="text", base="adamw",
        defaults=dict(data="cpython-docs", size="mini", opt="adamw", lr=2e-3, b2=0.95,
                      weight_decay=0.1, clip_norm=1.0, warmup_steps=0.05, batch_size=16,
                      steps=500, eval_every=100, eval_batches=16),
        usage=["python -m examples.llama --opt adamw+ire --ire-kappa 3 --ire-gamma 0.6",
               "python -m examples.llama --data wikitext:~/data/wikitext-103 --tokenizer "
               "t5-base --size 60m --seq-len 256 --lr 6e-4"]),
}


def make_parser(example: str) -> argparse.ArgumentParser:
  """The full command line of ``example`` ("resnet", "vit" or "llama")."""
  ex = EXAMPLES[example]
  epilog = "examples:\n" + "\n".join(f"  {u}" for u in ex["usage"])
  p = argparse.ArgumentParser(
      prog=f"python -m examples.{example}", description=textwrap.fill(ex["doc"], 79),
      epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group("data and model")
  if ex["kind"] == "image":
    g.add_argument("--data", help="digits | mnist:DIR | cifar10:PATH | cifar100:PATH | "
                                  "hf:NAME | tfds:NAME (default: %(default)s)")
    g.add_argument("--augment", choices=("auto", "on", "off"), default="auto",
                   help="random shifts and flips; auto: on for CIFAR only (%(default)s)")
  else:
    g.add_argument("--data", help="cpython-docs | text:PATH | wikitext:DIR | hf:NAME[:CONFIG] "
                                  "(default: %(default)s)")
    g.add_argument("--tokenizer", default="char",
                   help="char | byte | a Hugging Face tokenizer name or tokenizer.json "
                        "(%(default)s)")
    g.add_argument("--max-chars", type=int, default=None,
                   help="use only this many characters of the training text")
    g.add_argument("--seq-len", type=int, default=128, help="(%(default)s)")
  if example == "resnet":
    g.add_argument("--size", choices=sorted(models.RESNET_PRESETS), help="(%(default)s)")
    g.add_argument("--depth", type=int, help="6n+2 layers (overrides the preset)")
    g.add_argument("--width", type=int, help="first-stage channels (overrides the preset)")
  elif example == "vit":
    g.add_argument("--size", choices=sorted(models.VIT_PRESETS), help="(%(default)s)")
    g.add_argument("--dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--mlp-dim", type=int)
    g.add_argument("--patch-size", type=int, help="default: 2 for images <= 16 px, else 4")
  else:
    g.add_argument("--size", choices=sorted(models.LLAMA_PRESETS), help="(%(default)s)")
    g.add_argument("--dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--ffn-dim", type=int, help="SwiGLU width (default: 8/3 dim, rounded)")
    g.add_argument("--tie-embeddings", action="store_true",
                   help="share the input embedding and the output projection")
  optim.add_optimizer_args(p)
  train.add_train_args(p)
  p.set_defaults(**ex["defaults"])
  return p


@functools.lru_cache(maxsize=4)
def _images(spec: str) -> data_lib.ImageData:
  return data_lib.load_images(spec)


@functools.lru_cache(maxsize=4)
def _text(spec: str, tokenizer: str, max_chars: int | None) -> data_lib.TextData:
  return data_lib.load_text(spec, tokenizer=tokenizer, max_chars=max_chars)


def run_example(example: str, args: argparse.Namespace, *, quiet: bool = False
                ) -> train.RunResult:
  """Loads the data, builds the model and the optimizer, and trains."""
  ex = EXAMPLES[example]
  if ex["kind"] == "image":
    d = _images(args.data)
    h, w, c = d.image_shape
    if example == "resnet":
      m = models.build_resnet(args.size, num_classes=d.num_classes, in_channels=c,
                              seed=args.seed, depth=args.depth, width=args.width)
    else:
      if h != w:
        raise ValueError(f"the ViT example needs square images; got {h}x{w}.")
      m = models.build_vit(args.size, num_classes=d.num_classes, image_size=h, in_channels=c,
                           seed=args.seed, dim=args.dim, depth=args.depth, heads=args.heads,
                           mlp_dim=args.mlp_dim, patch_size=args.patch_size)
    augment = args.augment == "on" or (args.augment == "auto" and d.name.startswith("cifar"))
    batcher = data_lib.ImageBatcher(d.x_train, d.y_train, args.batch_size, seed=args.seed,
                                    augment=augment)
    cap = None if args.eval_batches is None else args.eval_batches * args.batch_size
    eval_batches = lambda: data_lib.image_eval_batches(d.x_test, d.y_test, args.batch_size,
                                                       cap)
    num_classes, unit, per_example = d.num_classes, "img", 1
    desc = f"{d.name}: {len(d.x_train)} train / {len(d.x_test)} held-out images {h}x{w}x{c}"
  else:
    d = _text(args.data, args.tokenizer, args.max_chars)
    m = models.build_llama(args.size, vocab_size=d.vocab_size, seed=args.seed, dim=args.dim,
                           depth=args.depth, heads=args.heads, ffn_dim=args.ffn_dim,
                           tie_embeddings=args.tie_embeddings or None)
    batcher = data_lib.TextBatcher(d.train, args.batch_size, args.seq_len, seed=args.seed)
    eval_batches = lambda: data_lib.text_eval_batches(d.valid, args.batch_size, args.seq_len,
                                                      args.eval_batches)
    num_classes, unit, per_example = d.vocab_size, "tok", args.seq_len
    desc = (f"{d.name}: {len(d.train)} train / {len(d.valid)} held-out tokens, "
            f"vocabulary {d.vocab_size} ({args.tokenizer})")
  # After the model: mSAM's auxiliary output carries its BatchNorm statistics.
  spec = optim.build_optimizer(args, args.steps, default_base=ex["base"],
                               model_stats=train.split_model(m.model)[2])
  if not quiet:
    print(f"{example} {args.size} ({m.num_params:,} parameters) | {desc} | "
          f"optimizer {spec.name}" + (f" over {args.base or ex['base']}"
                                      if spec.name.split('+')[0] not in ('adamw', 'sgd')
                                      else ""))
  return train.run(args, example=example, model=m.model, spec=spec, batch_at=batcher.batch_at,
                   eval_batches=eval_batches, num_classes=num_classes, unit=unit,
                   unit_per_example=per_example, quiet=quiet)


def main(example: str, argv: list[str] | None = None) -> train.RunResult:
  """Entry point of ``python -m examples.<example>``."""
  args = make_parser(example).parse_args(argv)
  return run_example(example, args)
