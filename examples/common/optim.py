"""Optimizers for the examples, built from command-line arguments.

``--opt`` names the algorithm and ``--base`` the Optax optimizer that the
wrappers (SAM, ASAM, mSAM, SALA, Lookahead) drive:

=============  ================================================================
``adamw``      ``optax.adamw`` (decoupled weight decay)
``sgd``        ``optax.sgd`` with (Nesterov) momentum and L2 weight decay
``sam``        ``ire_optax.sam(base, rho)``                 (Foret et al. 2021)
``asam``       ``ire_optax.sam(base, rho, adaptive=True)``  (Kwon et al. 2021)
``gsam``       ``ire_optax.gsam(base, rho, alpha)``         (Zhuang et al. 2022)
``msam``       ``ire_optax.msam(base, rho, num_microbatches)`` (Behdin et al. 2023)
``sala``       ``ire_optax.sala(base, sync_period, slow_step_size, rho)`` (Tan et al. 2024)
``lookahead``  ``optax.lookahead(base, sync_period, slow_step_size)`` (Zhang et al. 2019)
=============  ================================================================

Any of them takes IRE on top (Wang et al. 2024) with ``--ire`` or by
appending ``+ire`` to the name (``--opt sam+ire``): ``ire_optax.ire(opt)``,
except for Lookahead, whose *fast* optimizer gets IRE
(``lookahead(ire(base))``), because ``optax.lookahead`` returns
``LookaheadParams`` updates that IRE cannot mask.

Every base is ``chain(clip_by_global_norm, weight decay, base)``: clipping and
weight decay act on the gradient the base optimizer consumes (for SAM, the
perturbed gradient), and the learning rate follows a linear warm-up and then
a cosine (or constant, or linear) decay.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import ire_optax

OPTIMIZERS = ("adamw", "sgd", "sam", "asam", "gsam", "msam", "sala", "lookahead")
CURVATURES = ("fisher", "grad_sq", "hutchinson")
DEFAULT_RHO = {"sam": 0.05, "asam": 1.0, "gsam": 0.05, "msam": 0.05, "sala": 0.2}


def steps_or_fraction(text: str) -> float:
  """argparse type: an integer number of steps, or a fraction of the run if < 1."""
  value = float(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0; got {text}")
  return value


def to_steps(value: float, total_steps: int) -> int:
  """Resolves :func:`steps_or_fraction` against the run length."""
  return int(round(value * total_steps)) if 0 < value < 1 else int(value)


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
  """Adds the optimizer and loss options shared by every example."""
  g = parser.add_argument_group("optimizer")
  g.add_argument("--opt", default="adamw", metavar="NAME", type=opt_name,
                 help=f"one of {', '.join(OPTIMIZERS)}; append '+ire' for IRE on top "
                      "(default: %(default)s)")
  g.add_argument("--base", choices=("adamw", "sgd"), default=None,
                 help="base optimizer that sam/asam/msam/sala/lookahead drive "
                      "(default: the example's)")
  g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (%(default)s)")
  g.add_argument("--schedule", choices=("cosine", "constant", "linear"), default="cosine",
                 help="decay after warm-up (%(default)s)")
  g.add_argument("--warmup-steps", type=steps_or_fraction, default=0.0, metavar="N",
                 help="linear learning-rate warm-up: steps, or a fraction of --steps if < 1 "
                      "(%(default)s)")
  g.add_argument("--final-lr-ratio", type=float, default=0.0,
                 help="learning rate at the end of the decay / peak (%(default)s)")
  g.add_argument("--weight-decay", type=float, default=0.0,
                 help="decoupled for adamw, L2 for sgd; applied to weight matrices and "
                      "kernels, not to biases or norm scales (%(default)s)")
  g.add_argument("--clip-norm", type=float, default=0.0,
                 help="clip the gradient's global norm (0: off) (%(default)s)")
  g.add_argument("--b1", type=float, default=0.9, help="adamw beta1 (%(default)s)")
  g.add_argument("--b2", type=float, default=0.999, help="adamw beta2 (%(default)s)")
  g.add_argument("--eps", type=float, default=1e-8, help="adamw epsilon (%(default)s)")
  g.add_argument("--momentum", type=float, default=0.9, help="sgd momentum (%(default)s)")
  g.add_argument("--nesterov", action="store_true", help="sgd with Nesterov momentum")

  g = parser.add_argument_group("sharpness-aware wrappers")
  g.add_argument("--rho", type=float, default=None,
                 help="SAM/ASAM/mSAM/SALA radius (default: sam 0.05, asam 1.0, msam 0.05, "
                      "sala 0.2)")
  g.add_argument("--rho-schedule", choices=("constant", "lr"), default="constant",
                 help="'lr': rho follows the learning rate from --rho (peak lr) down to "
                      "--rho-min (final lr), GSAM's schedule (%(default)s)")
  g.add_argument("--rho-min", type=float, default=0.0,
                 help="radius at the final learning rate with --rho-schedule lr (%(default)s)")
  g.add_argument("--gsam-alpha", type=float, default=0.6,
                 help="GSAM's surrogate-gap weight alpha (%(default)s)")
  g.add_argument("--sam-every-k", type=int, default=1,
                 help="sam/asam/gsam: the ascent every k-th step only, plain base steps "
                      "between (cost 1 + 1/k gradients) (%(default)s)")
  g.add_argument("--perturb", choices=("all", "weights"), default="all",
                 help="leaves the SAM ascent perturbs (one global norm): all, or weight "
                      "matrices and kernels only, not biases and norm scales (%(default)s)")
  g.add_argument("--num-microbatches", type=int, default=2,
                 help="mSAM micro-batches per batch (%(default)s)")
  g.add_argument("--microbatch-mode", choices=("auto", "vmap", "scan", "unroll"),
                 default="auto",
                 help="mSAM over micro-batches: vmap (vectorised), scan (sequential, least "
                      "memory), unroll (sequential, unrolled: fastest on CPU), auto (unroll "
                      "on CPU, vmap elsewhere) (%(default)s)")
  g.add_argument("--sala-sync-period", type=int, default=2, help="SALA k (%(default)s)")
  g.add_argument("--sala-slow-step", type=float, default=0.5, help="SALA alpha (%(default)s)")
  g.add_argument("--la-sync-period", type=int, default=5, help="Lookahead k (%(default)s)")
  g.add_argument("--la-slow-step", type=float, default=0.8,
                 help="Lookahead alpha (%(default)s)")

  g = parser.add_argument_group("IRE (implicit regularization enhancement)")
  g.add_argument("--ire", action="store_true", help="wrap the optimizer in IRE (same as +ire)")
  g.add_argument("--ire-kappa", type=float, default=3.0,
                 help="flat coordinates take (1+kappa)x the base step (%(default)s)")
  g.add_argument("--ire-gamma", type=float, default=0.6,
                 help="fraction of coordinates treated as flat (%(default)s)")
  g.add_argument("--ire-refresh-every", type=int, default=10,
                 help="re-estimate the curvature every K steps (%(default)s)")
  g.add_argument("--ire-warmup", type=steps_or_fraction, default=None, metavar="N",
                 help="IRE off for the first N steps (or fraction of --steps if < 1); "
                      "default: the learning-rate warm-up")
  g.add_argument("--ire-curvature", choices=CURVATURES, default="fisher",
                 help="Hessian-diagonal estimator: fisher (labels sampled from the model, "
                      "the paper's), grad_sq (free), hutchinson (one HVP) (%(default)s)")
  g.add_argument("--ire-kappa-schedule", choices=("constant", "lr"), default="constant",
                 help="'lr': kappa_t = kappa * lr_t / lr_peak (%(default)s)")
  g.add_argument("--ire-gamma-end", type=float, default=None,
                 help="grow gamma linearly from --ire-gamma to this value over the run "
                      "(default: constant gamma)")

  g = parser.add_argument_group("loss")
  g.add_argument("--label-smoothing", type=float, default=0.0, help="(%(default)s)")
  g.add_argument("--label-noise", type=float, default=0.0,
                 help="replace each training label by a uniformly random class with this "
                      "probability, afresh every step (Damian et al. 2021) (%(default)s)")


@dataclasses.dataclass
class OptSpec:
  """A built optimizer and what the train step must hand it.

  Attributes:
    tx: the transformation; call ``tx.update(grads, state, params, **extras)``.
    name: canonical name, e.g. ``"sam+ire"``.
    family: ``"plain"`` (only gradients), ``"sam"`` (needs ``grad_fn(params)``,
      used by SAM, ASAM and SALA), or ``"msam"`` (needs ``grad_fn(params,
      microbatch)`` and ``batch``; the step passes ``None`` as gradient).
    lookahead: params are ``optax.LookaheadParams``; evaluate ``params.slow``.
    sala: evaluate ``ire_optax.sala_eval_params(opt_state)``.
    curvature: the IRE estimator if IRE is on (``"fisher"`` needs
      ``logits_fn``, ``"hutchinson"`` needs ``grad_fn(params)``), else None.
    schedule: the learning-rate schedule (for logging).
    hints: ``step -> ((keyword, bool), ...)``, the static branch hints of
      this step (IRE's ``refresh_hint``, SALA's and SAM-every-k's
      ``sam_hint``, SALA's ``cycle_end_hint``): which steps do the occasional
      extra work, exactly (a hint False is trusted). The train loop compiles
      one step per distinct value and passes them to ``tx.update`` (see
      ``docs/performance.md``); None: no such steps.
    sam_aux: SAM/ASAM built with ``has_aux=True``: ``grad_fn(params)``
      returns ``(gradient, loss)`` and ``ire_optax.sam_aux(opt_state)`` is
      the perturbed loss. (mSAM always has an aux: ``grad_fn(params,
      microbatch)`` returns ``(gradient, {"loss", "acc", "stats"})`` of the
      clean micro-batch pass.)
  """

  tx: optax.GradientTransformationExtraArgs
  name: str
  family: str
  lookahead: bool
  sala: bool
  curvature: str | None
  schedule: Callable[[Any], Any]
  hints: Callable[[int], tuple] | None = None
  sam_aux: bool = False


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
  """argparse type of ``--opt``: a bad name is a one-line usage error, not a traceback."""
  try:
    parse_name(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text


def lr_schedule(peak: float, total_steps: int, warmup_steps: int, kind: str = "cosine",
                final_ratio: float = 0.0) -> optax.Schedule:
  """Linear warm-up from ``peak/warmup`` to ``peak``, then cosine/linear/constant decay."""
  final = peak * final_ratio
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    warm = peak * jnp.minimum((t + 1.0) / max(warmup_steps, 1), 1.0)
    frac = jnp.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)
    if kind == "cosine":
      decayed = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    elif kind == "linear":
      decayed = peak + (final - peak) * frac
    else:
      decayed = jnp.asarray(peak, jnp.float32)
    return jnp.where(t < warmup_steps, warm, decayed)

  return schedule


def _decay_mask(params):
  return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def build_base(args: argparse.Namespace, base: str,
               schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
  """``chain(clip, [L2 decay,] adamw|sgd)`` from the command-line arguments."""
  parts = []
  if args.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(args.clip_norm))
  if base == "adamw":
    parts.append(optax.adamw(schedule, b1=args.b1, b2=args.b2, eps=args.eps,
                             weight_decay=args.weight_decay, mask=_decay_mask))
  elif base == "sgd":
    if args.weight_decay > 0:
      parts.append(optax.add_decayed_weights(args.weight_decay, mask=_decay_mask))
    parts.append(optax.sgd(schedule, momentum=args.momentum or None, nesterov=args.nesterov))
  else:
    raise ValueError(f"unknown base optimizer {base!r}; use adamw or sgd.")
  return optax.chain(*parts)


def lookahead_with_extra_args(fast: optax.GradientTransformation, *, sync_period: int,
                              slow_step_size: float) -> optax.GradientTransformationExtraArgs:
  """``optax.lookahead`` whose ``update`` forwards extra keyword arguments to ``fast``.

  ``optax.lookahead`` calls ``fast.update(updates, state, params.fast)`` with
  no extra arguments, so a fast optimizer that needs one (IRE's ``"fisher"``
  estimator needs ``logits_fn``) would not get it. This wrapper hands them
  over through a closure that is filled for the duration of each call (the
  call is synchronous, so this is safe under ``jit`` tracing).
  """
  pending: dict[str, Any] = {}
  fast = optax.with_extra_args_support(fast)

  def fast_update(updates, state, params=None):
    return fast.update(updates, state, params, **pending)

  inner = optax.lookahead(optax.GradientTransformation(fast.init, fast_update),
                          sync_period=sync_period, slow_step_size=slow_step_size)

  def update(updates, state, params=None, **extra_args):
    pending.clear()
    pending.update(extra_args)
    try:
      return inner.update(updates, state, params)
    finally:
      pending.clear()

  return optax.GradientTransformationExtraArgs(inner.init, update)


def build_optimizer(args: argparse.Namespace, total_steps: int,
                    default_base: str = "adamw", *, axis_name: str | None = None,
                    model_stats: Any = None) -> OptSpec:
  """The optimizer named by ``args.opt`` (and ``args.ire``) with its hyperparameters.

  ``model_stats`` (the model's non-parameter state, e.g. BatchNorm statistics;
  None: none) fixes the structure of mSAM's auxiliary output, through which
  the clean micro-batch passes return the loss and the new statistics.

  ``axis_name`` builds it for a data-parallel ``shard_map`` step in which every
  device passes its own gradient: SAM, ASAM, mSAM, SALA and IRE then average
  across the axis themselves (mSAM perturbs each device with its own
  micro-batches). The train step of :func:`examples.common.train.step_function`
  with the same ``axis_name`` averages the gradient of the plain optimizers.
  Lookahead is not available with an ``axis_name``.
  """
  algo, use_ire = parse_name(args.opt, getattr(args, "ire", False))
  if axis_name is not None and algo == "lookahead":
    raise ValueError("lookahead is not available with an axis_name (a shard_map step); "
                     "use adamw, sgd, sam, asam, msam or sala (+ire), or train lookahead "
                     "under plain jit.")
  warmup = to_steps(args.warmup_steps, total_steps)
  schedule = lr_schedule(args.lr, total_steps, warmup, args.schedule, args.final_lr_ratio)

  if algo in ("adamw", "sgd"):
    base_name = algo
  else:
    base_name = args.base or default_base
  base = build_base(args, base_name, schedule)
  rho: Any = args.rho if args.rho is not None else DEFAULT_RHO.get(algo, 0.05)
  if getattr(args, "rho_schedule", "constant") == "lr":
    rho = ire_optax.lr_proportional(schedule, max_value=rho, min_value=args.rho_min,
                                    lr_max=args.lr, lr_min=args.lr * args.final_lr_ratio)
  perturb_mask = (None if getattr(args, "perturb", "all") == "all"
                  else lambda params: jax.tree.map(lambda p: jnp.ndim(p) > 1, params))
  every_k = getattr(args, "sam_every_k", 1)

  curvature = args.ire_curvature if use_ire else None
  if use_ire and algo == "msam" and curvature != "fisher":
    raise ValueError("IRE over mSAM needs --ire-curvature fisher: mSAM never forms the "
                     "full-batch clean gradient (grad_sq) and its grad_fn takes a "
                     "micro-batch (hutchinson needs grad_fn(params)).")

  def with_ire(tx):
    kappa: Any = args.ire_kappa
    if args.ire_kappa_schedule == "lr":
      kappa = ire_optax.lr_proportional(schedule, max_value=args.ire_kappa, lr_max=args.lr)
    gamma: Any = args.ire_gamma
    if getattr(args, "ire_gamma_end", None) is not None:
      gamma = optax.linear_schedule(args.ire_gamma, args.ire_gamma_end, total_steps)
    ire_warm = warmup if args.ire_warmup is None else to_steps(args.ire_warmup, total_steps)
    return ire_optax.ire(tx, kappa=kappa, gamma=gamma,
                         refresh_every=args.ire_refresh_every, warmup_steps=ire_warm,
                         curvature=curvature, seed=args.seed, axis_name=axis_name)

  family, lookahead, sala, sam_aux = "plain", False, False, False
  if algo in ("adamw", "sgd"):
    tx = base
  elif algo in ("sam", "asam", "gsam"):
    # The perturbed loss for logging (free), unless IRE's hutchinson shares grad_fn.
    sam_aux = curvature != "hutchinson"
    if algo == "gsam":
      tx = ire_optax.gsam(base, rho=rho, alpha=args.gsam_alpha, axis_name=axis_name,
                          perturb_mask=perturb_mask, every_k=every_k, has_aux=sam_aux)
    else:
      tx = ire_optax.sam(base, rho=rho, adaptive=(algo == "asam"), axis_name=axis_name,
                         perturb_mask=perturb_mask, every_k=every_k, has_aux=sam_aux)
    family = "sam"
  elif algo == "msam":
    tx = ire_optax.msam(base, rho=rho, num_microbatches=args.num_microbatches,
                        microbatch_mode=args.microbatch_mode, axis_name=axis_name,
                        perturb_mask=perturb_mask, has_aux=True,
                        aux_init={"loss": jnp.zeros((), jnp.float32),
                                  "acc": jnp.zeros((), jnp.float32),
                                  "stats": {} if model_stats is None else model_stats})
    family = "msam"
  elif algo == "sala":
    tx = ire_optax.sala(base, sync_period=args.sala_sync_period,
                        slow_step_size=args.sala_slow_step, rho=rho, axis_name=axis_name,
                        perturb_mask=perturb_mask)
    family, sala = "sam", True
  else:  # lookahead: IRE goes on the fast optimizer
    fast = with_ire(base) if use_ire else base
    tx = lookahead_with_extra_args(fast, sync_period=args.la_sync_period,
                                   slow_step_size=args.la_slow_step)
    lookahead = True
  if use_ire and algo != "lookahead":
    tx = with_ire(tx)
  tx = optax.with_extra_args_support(tx)
  name = algo + ("+ire" if use_ire else "")
  return OptSpec(tx, name, family, lookahead, sala, curvature, schedule,
                 hints=_branch_hints(args, algo, use_ire, warmup, total_steps, every_k),
                 sam_aux=sam_aux)


def _branch_hints(args: argparse.Namespace, algo: str, use_ire: bool, warmup: int,
                  total_steps: int, every_k: Any) -> Callable[[int], tuple] | None:
  """``step -> static hints``: the steps of IRE's refreshes and of SALA's/SAM-every-k's ascents."""
  parts: list[Callable[[int], tuple[str, bool]]] = []
  if use_ire:
    k = args.ire_refresh_every
    t_w = warmup if args.ire_warmup is None else to_steps(args.ire_warmup, total_steps)
    parts.append(lambda t: ("refresh_hint", t >= t_w and (t - t_w) % k == 0))
  if algo == "sala":
    k_sala = args.sala_sync_period
    parts.append(lambda t: ("sam_hint", t % k_sala == 0))
    parts.append(lambda t: ("cycle_end_hint", t % k_sala == k_sala - 1))
  elif algo in ("sam", "asam", "gsam") and every_k not in (None, 1):
    parts.append(lambda t: ("sam_hint", t % every_k == 0))
  if not parts:
    return None
  return lambda t: tuple(f(int(t)) for f in parts)


# -----------------------------------------------------------------------------
# Losses
# -----------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                  weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean (optionally weighted, optionally label-smoothed) cross-entropy and accuracy.

  With smoothing ``s`` the target is ``(1-s) onehot(y) + s/C``, i.e. the loss is
  ``(1-s) (-log p_y) + s mean_c(-log p_c)``. The class axis is last; any
  leading shape is averaged over. Computed in float32.
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  correct = (jnp.argmax(logp, axis=-1) == labels).astype(jnp.float32)
  if weights is None:
    return jnp.mean(nll), jnp.mean(correct)
  total = jnp.maximum(jnp.sum(weights), 1.0)
  return jnp.sum(nll * weights) / total, jnp.sum(correct * weights) / total


def label_noise(key: jax.Array, labels: jax.Array, num_classes: int, p: float) -> jax.Array:
  """With probability ``p`` replace each label by a uniformly random class."""
  k_flip, k_new = jax.random.split(key)
  flip = jax.random.bernoulli(k_flip, p, labels.shape)
  random_labels = jax.random.randint(k_new, labels.shape, 0, num_classes, labels.dtype)
  return jnp.where(flip, random_labels, labels)
