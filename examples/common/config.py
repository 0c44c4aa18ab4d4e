"""Typed configurations of the examples: what a run is, as frozen dataclasses.

A run of ``python -m examples.<name>`` is one :class:`TrainConfig`, which holds a
:class:`DataConfig`, a :class:`ModelConfig` and an :class:`OptimizerConfig`.
Each example's ``get_config()`` returns its defaults; the command line
(:mod:`examples.common.cli`) is generated from the fields below (one flag per
field, spelled as the field with dashes: ``ire_kappa`` is ``--ire-kappa``, unless
the field's metadata names another flag) and only turns ``argv`` into a config.
From Python, change a config with :func:`dataclasses.replace` and train it with
:func:`examples.common.train.run`::

    import dataclasses
    from examples import resnet
    from examples.common import train

    cfg = resnet.get_config()
    cfg = dataclasses.replace(
        cfg, steps=100, optimizer=dataclasses.replace(cfg.optimizer, name="sam+ire"))
    result = train.run(cfg)

Every field's metadata holds its ``help`` (the ``--help`` text), its argument
``group`` and, where they apply, ``flag`` (the option's name), ``choices``,
``parse`` (the argparse type), ``metavar`` and ``examples`` (the examples that
offer the option; default: all).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

# The examples and the kind of data each trains on.
KINDS = {"resnet": "image", "vit": "image", "llama": "text", "mlp": "image"}
# What an unset DataConfig.spec / ModelConfig.size becomes: offline data of the example's kind
# and its model's default size.
DEFAULT_DATA = {"image": "digits", "text": "cpython-docs"}
DEFAULT_SIZE = {"resnet": "resnet20", "vit": "mini", "llama": "mini", "mlp": "small"}
OPTIMIZERS = ("adamw", "sgd", "sam", "asam", "gsam", "msam", "sala", "lookahead")
CURVATURES = ("fisher", "grad_sq", "hutchinson")
PRECISIONS = ("float32", "bfloat16", "float16")
# Which parameters weight decay applies to: "weights" the weight matrices and kernels
# (ndim > 1), not biases and norm scales; "all" every parameter.
DECAY_MASKS = ("weights", "all")


def option(default: Any, help: str | Callable[[str], str], *, group: str,
           flag: str | None = None,
           choices: Iterable[Any] | Callable[[str], Iterable[Any]] | None = None,
           parse: Callable[[str], Any] | None = None, metavar: str | None = None,
           examples: tuple[str, ...] | None = None, low: float | None = None,
           high: float | None = None) -> Any:
  """A dataclass field with the metadata its command-line flag is generated from (``help``
  and ``choices`` may depend on the example: a function of its name; ``low``, ``high``: the
  inclusive bounds of a number; None is always allowed)."""
  meta = dict(help=help, group=group, flag=flag, choices=choices, parse=parse,
              metavar=metavar, examples=examples, low=low, high=high)
  return dataclasses.field(default=default,
                           metadata={k: v for k, v in meta.items() if v is not None})


def steps_or_fraction(text: str) -> float:
  """A number of steps, or a fraction of the run if below 1 (``--warmup-steps 0.05``)."""
  value = float(text)
  if value < 0:
    raise ValueError(f"must be >= 0; got {text}")
  return value


def to_steps(value: float, total_steps: int) -> int:
  """Resolves :func:`steps_or_fraction` against the run length."""
  return int(round(value * total_steps)) if 0 < value < 1 else int(value)


def parse_name(name: str, ire_flag: bool = False) -> tuple[str, bool]:
  """``"sam+ire"`` -> ``("sam", True)``; validates the algorithm name."""
  parts = name.lower().split("+")
  algo, mods = parts[0], parts[1:]
  if algo not in OPTIMIZERS or any(m != "ire" for m in mods):
    hint = " (IRE wraps one of them: e.g. adamw+ire or sgd+ire)" if algo == "ire" else ""
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}, "
                     f"optionally with '+ire'{hint}.")
  return algo, ire_flag or bool(mods)


def opt_name(text: str) -> str:
  """The parser of ``--opt``: a valid name, else ``ValueError``."""
  parse_name(text)
  return text


def check_fields(cfg: Any) -> None:
  """Raises ``ValueError`` for a field whose value is not one of its fixed ``choices`` or lies
  outside its bounds (``low``, ``high``)."""
  for f in dataclasses.fields(cfg):
    value, meta = getattr(cfg, f.name), f.metadata
    where = f"{type(cfg).__name__}.{f.name} ({meta.get('flag') or '--' + f.name.replace('_', '-')})"
    choices = meta.get("choices")
    if choices is not None and not callable(choices) and value not in choices:
      raise ValueError(f"{where} must be one of {tuple(choices)}; got {value!r}.")
    low, high = meta.get("low"), meta.get("high")
    if value is not None and ((low is not None and value < low)
                              or (high is not None and value > high)):
      bounds = f"in [{low}, {high}]" if low is not None and high is not None else \
          f">= {low}" if low is not None else f"<= {high}"
      raise ValueError(f"{where} must be {bounds}; got {value!r}.")


def _size_choices(example: str) -> list[str]:
  from . import models

  return sorted(models.PRESETS[example])


# The base optimizers (--base) that the other algorithms drive.
BASES = ("adamw", "sgd")


def opt_help(optimizers: Iterable[str] = OPTIMIZERS) -> str:
  """The help of ``--opt``, naming ``optimizers`` (a script that refuses some offers fewer)."""
  return (f"one of {', '.join(optimizers)}; append '+ire' for IRE on top "
          "(default: %(default)s)")


def base_help(optimizers: Iterable[str] = OPTIMIZERS) -> str:
  """The help of ``--base``, naming those of ``optimizers`` that drive a base optimizer."""
  return (f"base optimizer that {'/'.join(o for o in optimizers if o not in BASES)} drive "
          "(%(default)s)")


def run_name_help(default: str = "<example>-<opt>") -> str:
  """The help of ``--name``, ``default`` the run name used without it."""
  return f"run name (default: {default}); the run writes to OUT/NAME/"


# The argument groups of the command lines (a field's metadata "group"), in --help's order.
GROUPS = ("data and model", "optimizer", "sharpness-aware wrappers",
          "IRE (implicit regularization enhancement)", "loss", "training", "output")
_DM, _O, _S, _I, _L, _T, _OUT = GROUPS
_IMG, _TXT = ("resnet", "vit", "mlp"), ("llama",)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The data set (``spec``; None: the example's offline default) and how batches are cut."""

  spec: str | None = option(None, "images: digits | mnist:DIR | cifar10:PATH | cifar100:PATH | "
                     "hf:NAME | tfds:NAME; text: cpython-docs | text:PATH | wikitext:DIR | "
                     "hf:NAME[:CONFIG] (default: %(default)s)", group=_DM, flag="--data")
  augment: str = option("auto", "random shifts and flips; auto: on for CIFAR only (%(default)s)",
                        group=_DM, choices=("auto", "on", "off"), examples=_IMG)
  tokenizer: str = option("char", "char | byte | a Hugging Face tokenizer name or "
                          "tokenizer.json (%(default)s)", group=_DM, examples=_TXT)
  max_chars: int | None = option(None, "use only this many characters of the training text "
                                 "(and a tenth as many of the held-out text)", group=_DM,
                                 examples=_TXT, low=1)
  seq_len: int = option(128, "(%(default)s)", group=_DM, examples=_TXT, low=1)

  def __post_init__(self):
    check_fields(self)


_DEPTH_HELP = {"resnet": "layers: 6n+2 (8, 20, 56, ...)", "mlp": "hidden layers",
               "vit": "transformer blocks", "llama": "transformer blocks"}
_WIDTH_HELP = {"resnet": "first-stage channels", "mlp": "hidden units"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A size preset of the example's model (None: its default) and per-field overrides of it
  (None: the preset's)."""

  size: str | None = option(None, "size preset (%(default)s)", group=_DM,
                            choices=_size_choices)
  dim: int | None = option(None, "width (overrides the preset)", group=_DM,
                           examples=("vit", "llama"))
  depth: int | None = option(None, lambda example: _DEPTH_HELP[example] + " (overrides the "
                             "preset)", group=_DM)
  width: int | None = option(None, lambda example: _WIDTH_HELP[example] + " (overrides the "
                             "preset)", group=_DM, examples=("resnet", "mlp"))
  heads: int | None = option(None, "attention heads (overrides the preset)", group=_DM,
                             examples=("vit", "llama"))
  mlp_dim: int | None = option(None, "MLP width (overrides the preset)", group=_DM,
                               examples=("vit",))
  patch_size: int | None = option(None, "default: 2 for images <= 16 px, else 4", group=_DM,
                                  examples=("vit",))
  ffn_dim: int | None = option(None, "SwiGLU width (default: 8/3 dim, rounded)", group=_DM,
                               examples=("llama",))
  tie_embeddings: bool = option(False, "share the input embedding and the output projection",
                                group=_DM, examples=("llama",))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer (``name``, e.g. ``"sam+ire"``) and every hyperparameter of it.

  See :mod:`examples.common.optim` for what each name builds. Every base is
  ``chain(clip_by_global_norm, weight decay, adamw | sgd)`` under a linear
  warm-up and a cosine (constant, linear) decay of the learning rate.
  """

  name: str = option("adamw", opt_help(), group=_O, flag="--opt", parse=opt_name,
                     metavar="NAME")
  base: str = option("adamw", base_help(), group=_O, choices=BASES)
  lr: float = option(1e-3, "peak learning rate (%(default)s)", group=_O, low=0)
  schedule: str = option("cosine", "decay after warm-up (%(default)s)", group=_O,
                         choices=("cosine", "constant", "linear"))
  warmup_steps: float = option(0.0, "linear learning-rate warm-up: steps, or a fraction of "
                               "--steps if < 1 (%(default)s)", group=_O,
                               parse=steps_or_fraction, metavar="N")
  final_lr_ratio: float = option(0.0, "learning rate at the end of the decay / peak "
                                 "(%(default)s)", group=_O, low=0, high=1)
  weight_decay: float = option(0.0, "decoupled for adamw, L2 for sgd; applied to the "
                               "parameters of --decay-mask (%(default)s)", group=_O, low=0)
  decay_mask: str = option("weights", "parameters weight decay applies to: weights (matrices "
                           "and kernels, not biases or norm scales) or all (%(default)s)",
                           group=_O, choices=DECAY_MASKS)
  clip_norm: float = option(0.0, "clip the gradient's global norm (0: off) (%(default)s)",
                            group=_O, low=0)
  b1: float = option(0.9, "adamw beta1 (%(default)s)", group=_O, low=0, high=1)
  b2: float = option(0.999, "adamw beta2 (%(default)s)", group=_O, low=0, high=1)
  eps: float = option(1e-8, "adamw epsilon (%(default)s)", group=_O, low=0)
  momentum: float = option(0.9, "sgd momentum (%(default)s)", group=_O, low=0, high=1)
  nesterov: bool = option(False, "sgd with Nesterov momentum", group=_O)

  rho: float | None = option(None, "SAM/ASAM/GSAM/mSAM/SALA radius (default: sam 0.05, asam "
                             "1.0, gsam 0.05, msam 0.05, sala 0.2)", group=_S)
  rho_schedule: str = option("constant", "'lr': rho follows the learning rate from --rho "
                             "(peak lr) down to --rho-min (final lr), GSAM's schedule "
                             "(%(default)s)", group=_S, choices=("constant", "lr"))
  rho_min: float = option(0.0, "radius at the final learning rate with --rho-schedule lr "
                          "(%(default)s)", group=_S, low=0)
  gsam_alpha: float = option(0.6, "GSAM's surrogate-gap weight alpha (%(default)s)", group=_S)
  sam_every_k: int = option(1, "sam/asam/gsam: the ascent every k-th step only, plain base "
                            "steps between (cost 1 + 1/k gradients) (%(default)s)", group=_S)
  perturb: str = option("all", "leaves the SAM ascent perturbs (one global norm): all, or "
                        "weight matrices and kernels only, not biases and norm scales "
                        "(%(default)s)", group=_S, choices=("all", "weights"))
  num_microbatches: int = option(2, "mSAM micro-batches per batch (%(default)s)", group=_S, low=1)
  microbatch_mode: str = option("auto", "mSAM over micro-batches: vmap (vectorised), scan "
                                "(sequential, least memory), unroll (sequential, unrolled: "
                                "fastest on CPU), auto (unroll on CPU, vmap elsewhere) "
                                "(%(default)s)", group=_S,
                                choices=("auto", "vmap", "scan", "unroll"))
  sala_sync_period: int = option(2, "SALA k (%(default)s)", group=_S)
  sala_slow_step: float = option(0.5, "SALA alpha (%(default)s)", group=_S, low=0, high=1)
  la_sync_period: int = option(5, "Lookahead k (%(default)s)", group=_S, low=1)
  la_slow_step: float = option(0.8, "Lookahead alpha (%(default)s)", group=_S, low=0, high=1)

  ire: bool = option(False, "wrap the optimizer in IRE (same as +ire)", group=_I)
  ire_kappa: float = option(3.0, "flat coordinates take (1+kappa)x the base step "
                            "(%(default)s)", group=_I)
  ire_gamma: float = option(0.6, "fraction of coordinates treated as flat (%(default)s)",
                            group=_I)
  ire_refresh_every: int = option(10, "re-estimate the curvature every K steps (%(default)s)",
                                  group=_I)
  ire_warmup: float | None = option(None, "IRE off for the first N steps (or fraction of "
                                    "--steps if < 1); default: the learning-rate warm-up",
                                    group=_I, parse=steps_or_fraction, metavar="N")
  ire_curvature: str = option("fisher", "Hessian-diagonal estimator: fisher (labels sampled "
                              "from the model, the paper's), grad_sq (free), hutchinson (one "
                              "HVP) (%(default)s)", group=_I, choices=CURVATURES)
  ire_kappa_schedule: str = option("constant", "'lr': kappa_t = kappa * lr_t / lr_peak "
                                   "(%(default)s)", group=_I, choices=("constant", "lr"))
  ire_gamma_end: float | None = option(None, "grow gamma linearly from --ire-gamma to this "
                                       "value over the run (default: constant gamma)",
                                       group=_I, low=0, high=1)

  def __post_init__(self):
    parse_name(self.name)
    check_fields(self)
    for name in ("warmup_steps", "ire_warmup"):
      value = getattr(self, name)
      if value is not None and value < 0:
        raise ValueError(f"OptimizerConfig.{name} must be >= 0; got {value}.")
    if self.sam_every_k != 1 and self.algorithm[0] not in ("sam", "asam", "gsam"):
      raise ValueError(f"OptimizerConfig.sam_every_k (--sam-every-k) applies to sam, asam and "
                       f"gsam only; got {self.sam_every_k} with {self.name!r}.")

  @property
  def algorithm(self) -> tuple[str, bool]:
    """``(algorithm, with IRE)``, e.g. ``("sam", True)`` for ``name="sam+ire"``."""
    return parse_name(self.name, self.ire)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A whole run: the example, its data, model and optimizer, and the loop's settings."""

  example: str = dataclasses.field(default="llama", metadata={"cli": False})
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)

  label_smoothing: float = option(0.0, "(%(default)s)", group=_L, low=0, high=1)
  label_noise: float = option(0.0, "replace each training label by a uniformly random class "
                              "with this probability, afresh every step (Damian et al. 2021) "
                              "(%(default)s)", group=_L, low=0, high=1)

  steps: int = option(500, "optimizer steps (%(default)s)", group=_T, low=1)
  batch_size: int = option(128, "(%(default)s)", group=_T, low=1)
  seed: int = option(0, "model init, data order, noise (%(default)s)", group=_T)
  eval_every: int = option(100, "evaluate on held-out data every N steps and at the end (0: "
                           "end only) (%(default)s)", group=_T, low=0)
  eval_batches: int | None = option(None, "cap on held-out batches per evaluation (default: "
                                    "all)", group=_T, low=1)
  log_every: int = option(10, "log training metrics every N steps (%(default)s)", group=_T,
                          low=1)
  fast_compile: bool = option(False, "compile without XLA backend optimisations: starts "
                              "sooner, runs slower (smoke tests)", group=_T)
  branch_hints: str = option("auto", "compile one step per kind of step (IRE refresh, SALA SAM "
                             "step) and pick it on the host from the step number, instead of "
                             "lax.cond: no host round trip per step on GPU, no slow "
                             "conditional on CPU; auto = on, but off with --precision "
                             "float16, whose skipped steps the step number does not "
                             "count (%(default)s)", group=_T,
                             choices=("auto", "on", "off"))
  precision: str = option("float32", "compute dtype of the training passes (params, optimizer "
                          "and evaluation stay float32); float16 uses dynamic loss scaling "
                          "shared by all of a step's gradients and skips non-finite steps "
                          "(%(default)s)", group=_T, choices=PRECISIONS)

  out: str = option("runs", "output root directory (%(default)s)", group=_OUT)
  name: str | None = option(None, run_name_help(), group=_OUT)
  ckpt_every: int = option(0, "save an Orbax checkpoint every N steps (and at the end); 0: "
                           "end only", group=_OUT, low=0)
  keep_checkpoints: int = option(2, "(%(default)s)", group=_OUT, low=1)
  no_checkpoint: bool = option(False, "save no checkpoints at all", group=_OUT)
  resume: bool = option(False, "continue from the run's latest checkpoint (bit-identical)",
                        group=_OUT)
  stop_after: int | None = option(None, "stop (with a checkpoint) after N steps of this "
                                  "invocation; the schedules still span --steps, so --resume "
                                  "continues the same run", group=_OUT, metavar="N", low=1)
  no_plot: bool = option(False, "skip the PNG of the curves", group=_OUT)
  no_progress: bool = option(False, "no progress bar", group=_OUT)

  def __post_init__(self):
    if self.example not in KINDS:
      raise ValueError(f"TrainConfig.example must be one of {tuple(KINDS)}; "
                       f"got {self.example!r}.")
    check_fields(self)
    check_branch_hints(self.branch_hints, self.precision)
    if self.optimizer.algorithm[0] == "msam" and self.batch_size % self.optimizer.num_microbatches:
      raise ValueError(f"TrainConfig.batch_size (--batch-size {self.batch_size}) must be "
                       "divisible by OptimizerConfig.num_microbatches (--num-microbatches "
                       f"{self.optimizer.num_microbatches}) for mSAM.")
    # Unset data and size: the example's defaults (frozen: set once, here).
    if self.data.spec is None:
      object.__setattr__(self, "data", dataclasses.replace(self.data,
                                                           spec=DEFAULT_DATA[self.kind]))
    if self.model.size is None:
      object.__setattr__(self, "model", dataclasses.replace(
          self.model, size=DEFAULT_SIZE[self.example]))

  @property
  def kind(self) -> str:
    """``"image"`` or ``"text"``: the kind of data of the example."""
    return KINDS[self.example]

  @property
  def run_name(self) -> str:
    """``name``, or ``<example>-<optimizer>`` (``llama-adamw+ire``)."""
    algo, ire = self.optimizer.algorithm
    return self.name or f"{self.example}-{algo}{'+ire' if ire else ''}"


def check_branch_hints(branch_hints: str, precision: str) -> None:
  """Raises for a ``branch_hints`` value the train step cannot honour at ``precision``."""
  if branch_hints not in ("auto", "on", "off"):
    raise ValueError(f"branch_hints must be 'auto', 'on' or 'off'; got {branch_hints!r}.")
  if branch_hints == "on" and precision == "float16":
    raise ValueError("branch_hints='on' (--branch-hints on) cannot be used with "
                     "precision='float16': a skipped step leaves the optimizer's step count "
                     "behind the loop's, which the hints are read from. Use 'auto' (off in "
                     "float16) or 'off'.")


# Fields that do not change what a train step computes (the loop's settings and outputs).
LOOP_ONLY_FIELDS = frozenset({
    "out", "name", "resume", "stop_after", "ckpt_every", "keep_checkpoints", "no_checkpoint",
    "no_plot", "no_progress", "eval_every", "eval_batches", "log_every"})


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
  """The config as nested plain dicts (what ``config.json`` holds)."""
  return dataclasses.asdict(cfg)
