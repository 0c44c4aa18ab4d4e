"""Every optimizer of the library (alone, nested and inside Optax wrappers) on one tiny problem.

Shared by the reliability tests (``test_checkpoint``, ``test_long_run``,
``test_nonfinite``): a softmax classifier with 5 features and 3 classes
(18 parameters in two leaves), four fixed batches of 8 examples, and one
train step that feeds each optimizer what its calling convention needs:

* ``"grad"`` (IRE, SAM, ASAM, SALA and their compositions): ``updates`` is the
  clean gradient; ``grad_fn`` (``params -> gradient on the batch``) and
  ``logits_fn`` (``params -> logits on the batch``) are passed as extra
  keyword arguments (wrappers forward them, plain Optax bases ignore them).
* ``"msam"``: ``updates=None``, ``grad_fn(params, microbatch)`` and ``batch``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ire_optax

NUM_FEATURES, NUM_CLASSES, BATCH, NUM_BATCHES = 5, 3, 8, 4


def make_params(dtype: Any = jnp.float32, seed: int = 0, *, num_features: int = NUM_FEATURES,
                num_classes: int = NUM_CLASSES) -> dict[str, jax.Array]:
  """``w (num_features, num_classes)`` and ``b (num_classes,)`` (other sizes: to shard them)."""
  rng = np.random.default_rng(seed)
  return {
      "w": jnp.asarray(0.5 * rng.standard_normal((num_features, num_classes)), dtype),
      "b": jnp.asarray(0.1 * rng.standard_normal(num_classes), dtype),
  }


def make_data(seed: int = 1, *, num_features: int = NUM_FEATURES) -> dict[str, jax.Array]:
  """``NUM_BATCHES`` stacked batches: ``x (4, 8, 5)`` float32, ``y (4, 8)`` int32 (in [0, 3))."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((NUM_BATCHES, BATCH, num_features))
  y = (x[..., 0] + 0.5 * x[..., 1] > 0).astype(np.int32) + (x[..., 2] > 1.0)
  return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.int32)}


def batch_at(data: dict[str, jax.Array], t: Any) -> dict[str, jax.Array]:
  """The batch of step ``t`` (a Python int or a traced int)."""
  return jax.tree.map(lambda a: a[t % NUM_BATCHES], data)


def logits(params: Any, x: jax.Array) -> jax.Array:
  return x @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)


def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits(params, batch["x"]), batch["y"]).mean()


@dataclasses.dataclass(frozen=True)
class Case:
  """An optimizer and its calling convention (``"grad"`` or ``"msam"``)."""

  make: Callable[[], Any]
  convention: str = "grad"


def _sgdm() -> optax.GradientTransformation:
  return optax.sgd(0.1, momentum=0.9)


def _adamw() -> optax.GradientTransformation:
  return optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1)


def _noisy_abs_curvature(grads, params, key, **_):
  """A user estimator that uses the PRNG key (so the key in the state matters)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      jnp.abs(p.astype(jnp.float32)) + 0.1 * jax.random.uniform(k, p.shape)
      for p, k in zip(leaves, keys, strict=True)])


CASES: dict[str, Case] = {
    # IRE with every estimator (K = 3: refreshes at 0, 3, 6, 9, ...).
    "ire_grad_sq": Case(lambda: ire_optax.ire(_adamw(), kappa=3.0, gamma=0.6, refresh_every=3)),
    "ire_grad_sq_ema": Case(lambda: ire_optax.ire(_adamw(), kappa=3.0, gamma=0.6, refresh_every=3,
                                                  warmup_steps=2, ema_decay=0.9)),
    "ire_fisher": Case(lambda: ire_optax.ire(_adamw(), kappa=3.0, gamma=0.6, refresh_every=3,
                                             curvature="fisher")),
    "ire_hutchinson": Case(lambda: ire_optax.ire(_sgdm(), kappa=2.0, gamma=0.6, refresh_every=3,
                                                 curvature="hutchinson", num_samples=2)),
    "ire_custom": Case(lambda: ire_optax.ire(_sgdm(), kappa=2.0, gamma=0.5, refresh_every=3,
                                             curvature=_noisy_abs_curvature)),
    "ire_kappa_schedule": Case(lambda: ire_optax.ire(
        _adamw(), kappa=optax.linear_schedule(3.0, 0.0, 50), gamma=0.6, refresh_every=3,
        warmup_steps=2)),
    "sam": Case(lambda: ire_optax.sam(_sgdm(), rho=0.05)),
    "asam": Case(lambda: ire_optax.sam(_sgdm(), rho=0.5, adaptive=True)),
    "msam": Case(lambda: ire_optax.msam(_sgdm(), rho=0.05, num_microbatches=2), "msam"),
    "sala": Case(lambda: ire_optax.sala(optax.sgd(0.05, momentum=0.9, nesterov=True),
                                        sync_period=2, slow_step_size=0.5, rho=0.2)),
    # k = 3 and a small rho: both stages occur.
    "sala_k3": Case(lambda: ire_optax.sala(_adamw(), sync_period=3, slow_step_size=0.5,
                                           rho=0.02)),
    "ire_sam": Case(lambda: ire_optax.ire(ire_optax.sam(_sgdm(), rho=0.05), kappa=2.0, gamma=0.8,
                                          refresh_every=3)),
    "gsam": Case(lambda: ire_optax.gsam(_adamw(), rho=0.05, alpha=0.5)),
    # SAM every 3 steps (the ascent under lax.cond), perturbing the weights only.
    "sam_every_3_masked": Case(lambda: ire_optax.sam(_sgdm(), rho=0.05, every_k=3,
                                                     perturb_mask={"w": True, "b": False})),
    "ire_gsam_every_2_gamma_schedule": Case(lambda: ire_optax.ire(
        ire_optax.gsam(_sgdm(), rho=0.05, alpha=0.3, every_k=2), kappa=2.0,
        gamma=optax.linear_schedule(0.5, 0.8, 12), refresh_every=3)),
    "ire_sala": Case(lambda: ire_optax.ire(
        ire_optax.sala(optax.sgd(0.05, momentum=0.9, nesterov=True), sync_period=2, rho=0.2),
        kappa=2.0, gamma=0.6, refresh_every=3)),
    "ire_msam_fisher": Case(lambda: ire_optax.ire(
        ire_optax.msam(_sgdm(), rho=0.05, num_microbatches=2), kappa=2.0, gamma=0.6,
        refresh_every=3, curvature="fisher"), "msam"),
    "multisteps_ire": Case(lambda: optax.MultiSteps(
        ire_optax.ire(_adamw(), kappa=3.0, gamma=0.6, refresh_every=2), every_k_schedule=2)),
    "multisteps_ire_sam": Case(lambda: optax.MultiSteps(
        ire_optax.ire(ire_optax.sam(_sgdm(), rho=0.05), kappa=2.0, gamma=0.6, refresh_every=2),
        every_k_schedule=3)),
    "inject_ire": Case(lambda: optax.inject_hyperparams(ire_optax.ire)(
        _adamw(), kappa=3.0, gamma=0.6, refresh_every=3)),
    "inject_sam": Case(lambda: optax.inject_hyperparams(ire_optax.sam)(_sgdm(), rho=0.05)),
    "inject_msam": Case(lambda: optax.inject_hyperparams(
        ire_optax.msam, static_args=("num_microbatches",))(_sgdm(), rho=0.05,
                                                           num_microbatches=2), "msam"),
    "inject_sala": Case(lambda: optax.inject_hyperparams(ire_optax.sala)(
        optax.sgd(0.05, momentum=0.9, nesterov=True), sync_period=2, slow_step_size=0.5,
        rho=0.2)),
    "chain_clip_apply_if_finite_ire": Case(lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.apply_if_finite(ire_optax.ire(_adamw(), kappa=3.0, gamma=0.6, refresh_every=3), 3))),
}


def update_kwargs(case: Case, batch: Any, loss: Callable = loss_fn,
                  logits_of: Callable = logits) -> dict[str, Any]:
  """The extra keyword arguments of ``update`` for ``case`` on ``batch``."""
  if case.convention == "msam":
    return {"grad_fn": jax.grad(loss), "batch": batch,
            "logits_fn": lambda p: logits_of(p, batch["x"])}
  return {"grad_fn": lambda p: jax.grad(loss)(p, batch),
          "logits_fn": lambda p: logits_of(p, batch["x"])}


def make_step(case: Case, tx: Any, loss: Callable = loss_fn,
              logits_of: Callable = logits) -> Callable:
  """``(params, state, batch) -> (params, state, loss)``: one train step (not jitted)."""

  def step(params, state, batch):
    if case.convention == "msam":
      value, grads = loss(params, batch), None
    else:
      value, grads = jax.value_and_grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params,
                               **update_kwargs(case, batch, loss, logits_of))
    return optax.apply_updates(params, updates), state, value

  return step
