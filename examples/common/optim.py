"""Optimizers for the examples, built from an :class:`~examples.common.config.OptimizerConfig`.

``name`` (``--opt``) names the algorithm and ``base`` (``--base``) the Optax
optimizer that the wrappers (SAM, ASAM, GSAM, mSAM, SALA, Lookahead) drive:

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

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import ire_optax

from .config import CURVATURES, OPTIMIZERS, OptimizerConfig, parse_name, to_steps

__all__ = ["CURVATURES", "DEFAULT_RHO", "OPTIMIZERS", "OptSpec", "build_base",
           "build_optimizer", "cross_entropy", "decay_mask", "label_noise",
           "lookahead_with_extra_args", "lr_schedule", "parse_name", "to_steps",
           "weights_only"]

DEFAULT_RHO = {"sam": 0.05, "asam": 1.0, "gsam": 0.05, "msam": 0.05, "sala": 0.2}


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


def weights_only(params: Any) -> Any:
  """The mask of the weight matrices and kernels (``ndim > 1``): not biases or norm scales."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def decay_mask(kind: str) -> Callable[[Any], Any]:
  """The weight-decay mask of ``OptimizerConfig.decay_mask``: "weights" or "all"."""
  if kind == "weights":
    return weights_only
  if kind == "all":
    return lambda params: jax.tree.map(lambda _: True, params)
  raise ValueError(f"decay_mask must be 'weights' or 'all'; got {kind!r}.")


def build_base(cfg: OptimizerConfig, base: str,
               schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
  """``chain(clip, [L2 decay,] adamw|sgd)`` of ``cfg``."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  mask = decay_mask(cfg.decay_mask)
  if base == "adamw":
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=mask))
  elif base == "sgd":
    if cfg.weight_decay > 0:
      parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
    parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
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


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What :func:`build_optimizer` resolved from the config before building."""

  cfg: OptimizerConfig
  algo: str
  use_ire: bool
  total_steps: int
  warmup: int  # learning-rate warm-up steps
  ire_warmup: int
  schedule: Callable[[Any], Any]
  curvature: str | None
  seed: int
  axis_name: str | None


def _plan(cfg: OptimizerConfig, total_steps: int, seed: int,
          axis_name: str | None) -> _Plan:
  algo, use_ire = cfg.algorithm
  if axis_name is not None and algo == "lookahead":
    raise ValueError("lookahead is not available with an axis_name (a shard_map step); "
                     "use adamw, sgd, sam, asam, msam or sala (+ire), or train lookahead "
                     "under plain jit.")
  curvature = cfg.ire_curvature if use_ire else None
  if use_ire and algo == "msam" and curvature != "fisher":
    raise ValueError("IRE over mSAM needs --ire-curvature fisher: mSAM never forms the "
                     "full-batch clean gradient (grad_sq) and its grad_fn takes a "
                     "micro-batch (hutchinson needs grad_fn(params)).")
  warmup = to_steps(cfg.warmup_steps, total_steps)
  ire_warmup = warmup if cfg.ire_warmup is None else to_steps(cfg.ire_warmup, total_steps)
  schedule = lr_schedule(cfg.lr, total_steps, warmup, cfg.schedule, cfg.final_lr_ratio)
  return _Plan(cfg, algo, use_ire, total_steps, warmup, ire_warmup, schedule, curvature, seed,
               axis_name)


def _with_ire(plan: _Plan, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``ire(tx)`` with the config's (scheduled) kappa and gamma."""
  cfg = plan.cfg
  kappa: Any = cfg.ire_kappa
  if cfg.ire_kappa_schedule == "lr":
    kappa = ire_optax.lr_proportional(plan.schedule, max_value=cfg.ire_kappa, lr_max=cfg.lr)
  gamma: Any = cfg.ire_gamma
  if cfg.ire_gamma_end is not None:
    gamma = optax.linear_schedule(cfg.ire_gamma, cfg.ire_gamma_end, plan.total_steps)
  return ire_optax.ire(tx, kappa=kappa, gamma=gamma, refresh_every=cfg.ire_refresh_every,
                       warmup_steps=plan.ire_warmup, curvature=cfg.ire_curvature, seed=plan.seed,
                       axis_name=plan.axis_name)


def _rho(plan: _Plan) -> Any:
  """SAM's radius: the config's (or the algorithm's default), optionally following the lr."""
  cfg = plan.cfg
  rho: Any = cfg.rho if cfg.rho is not None else DEFAULT_RHO.get(plan.algo, 0.05)
  if cfg.rho_schedule == "lr":
    rho = ire_optax.lr_proportional(plan.schedule, max_value=rho, min_value=cfg.rho_min,
                                    lr_max=cfg.lr, lr_min=cfg.lr * cfg.final_lr_ratio)
  return rho


def _wrap(plan: _Plan, base: optax.GradientTransformation, model_stats: Any
          ) -> tuple[optax.GradientTransformation, dict[str, Any]]:
  """The algorithm around ``base`` and the :class:`OptSpec` fields it implies."""
  cfg, algo, axis = plan.cfg, plan.algo, plan.axis_name
  perturb_mask = None if cfg.perturb == "all" else weights_only
  if algo in ("adamw", "sgd"):
    return base, {}
  if algo in ("sam", "asam", "gsam"):
    # The perturbed loss for logging (free), unless IRE's hutchinson shares grad_fn.
    aux = plan.curvature != "hutchinson"
    kw = dict(rho=_rho(plan), axis_name=axis, perturb_mask=perturb_mask,
              every_k=cfg.sam_every_k, has_aux=aux)
    tx = (ire_optax.gsam(base, alpha=cfg.gsam_alpha, **kw) if algo == "gsam"
          else ire_optax.sam(base, adaptive=(algo == "asam"), **kw))
    return tx, {"family": "sam", "sam_aux": aux}
  if algo == "msam":
    aux_init = {"loss": jnp.zeros((), jnp.float32), "acc": jnp.zeros((), jnp.float32),
                "stats": {} if model_stats is None else model_stats}
    tx = ire_optax.msam(base, rho=_rho(plan), num_microbatches=cfg.num_microbatches,
                        microbatch_mode=cfg.microbatch_mode,  # type: ignore[arg-type]  # config's choices
                        axis_name=axis,
                        perturb_mask=perturb_mask, has_aux=True, aux_init=aux_init)
    return tx, {"family": "msam"}
  if algo == "sala":
    tx = ire_optax.sala(base, sync_period=cfg.sala_sync_period,
                        slow_step_size=cfg.sala_slow_step, rho=_rho(plan), axis_name=axis,
                        perturb_mask=perturb_mask)
    return tx, {"family": "sam", "sala": True}
  # lookahead: IRE goes on the fast optimizer
  fast = _with_ire(plan, base) if plan.use_ire else base
  tx = lookahead_with_extra_args(fast, sync_period=cfg.la_sync_period,
                                 slow_step_size=cfg.la_slow_step)
  return tx, {"lookahead": True}


def build_optimizer(cfg: OptimizerConfig, total_steps: int, *, seed: int = 0,
                    axis_name: str | None = None, model_stats: Any = None) -> OptSpec:
  """The optimizer named by ``cfg.name`` (and ``cfg.ire``) with its hyperparameters.

  ``total_steps`` is the run's length (the schedules span it; fractional
  warm-ups are fractions of it); ``seed`` seeds IRE's curvature estimator.

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
  plan = _plan(cfg, total_steps, seed, axis_name)
  base_name = plan.algo if plan.algo in ("adamw", "sgd") else cfg.base
  tx, fields = _wrap(plan, build_base(cfg, base_name, plan.schedule), model_stats)
  if plan.use_ire and plan.algo != "lookahead":
    tx = _with_ire(plan, tx)
  fields = {"family": "plain", "lookahead": False, "sala": False, **fields}
  name = plan.algo + ("+ire" if plan.use_ire else "")
  return OptSpec(optax.with_extra_args_support(tx), name, curvature=plan.curvature,
                 schedule=plan.schedule, hints=_branch_hints(plan), **fields)


def _branch_hints(plan: _Plan) -> Callable[[int], tuple] | None:
  """``step -> static hints``: the steps of IRE's refreshes and of SALA's/SAM-every-k's ascents."""
  parts: list[Callable[[int], tuple[str, bool]]] = []
  if plan.use_ire:
    k, t_w = plan.cfg.ire_refresh_every, plan.ire_warmup
    parts.append(lambda t: ("refresh_hint", t >= t_w and (t - t_w) % k == 0))
  every_k = plan.cfg.sam_every_k
  if plan.algo == "sala":
    k_sala = plan.cfg.sala_sync_period
    parts.append(lambda t: ("sam_hint", t % k_sala == 0))
    parts.append(lambda t: ("cycle_end_hint", t % k_sala == k_sala - 1))
  elif plan.algo in ("sam", "asam", "gsam") and every_k not in (None, 1):
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
