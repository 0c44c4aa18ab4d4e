"""Hyperparameter schedules tied to the learning-rate schedule.

GSAM (Zhuang et al., ICLR 2022) moves its radius ρ with the learning rate
(``ProportionScheduler`` in the authors' PyTorch code, the ``rho_max``/``rho_min``
of big_vision's JAX code), and IRE's small runs use ``κ_t = κ·η_t/η_max``
(Wang et al., NeurIPS 2024). :func:`lr_proportional` builds such a schedule
from any Optax learning-rate schedule, without hand-written lambdas.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ire_optax._src import utils


def lr_proportional(
    learning_rate: utils.ScalarOrSchedule,
    *,
    max_value: float,
    lr_max: float,
    min_value: float = 0.0,
    lr_min: float = 0.0,
) -> Any:
  r"""A schedule that follows the learning rate linearly (GSAM's ``ProportionScheduler``).

  .. math::
    v_t = \mathrm{clip}\Bigl(v_{\min} + (v_{\max} - v_{\min})
          \frac{\eta_t - \eta_{\min}}{\eta_{\max} - \eta_{\min}},\;
          v_{\min},\; v_{\max}\Bigr)

  with :math:`\eta_t` = ``learning_rate(t)``. When the learning rate is at its
  peak ``lr_max`` the value is ``max_value``; at ``lr_min`` it is
  ``min_value``. With the defaults ``min_value = lr_min = 0`` this is
  :math:`v_t = v_{\max} \eta_t / \eta_{\max}`, the IRE paper's
  :math:`\kappa_t = \kappa \eta_t / \eta_{\max}`.

  The clip keeps the value in ``[min_value, max_value]`` where the learning rate
  leaves ``[lr_min, lr_max]`` (for instance during a warm-up that starts below
  ``lr_min``, where GSAM's formula would give a radius below ``rho_min`` or
  even a negative one).

  The result is an ordinary function of the step count: pass it as ``rho`` of
  :func:`ire_optax.sam`, :func:`ire_optax.msam`, :func:`ire_optax.gsam` or
  :func:`ire_optax.sala`, as ``kappa`` or ``gamma`` of :func:`ire_optax.ire`,
  also under :func:`optax.inject_hyperparams`. Give the optimizer the same
  learning-rate schedule, so both read the same step count.

  Example:
    >>> import optax, ire_optax
    >>> lr = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 1000, end_value=1e-5)
    >>> rho = ire_optax.lr_proportional(lr, max_value=0.6, min_value=0.1,
    ...                                 lr_max=1e-3, lr_min=1e-5)  # GSAM on ViT
    >>> tx = ire_optax.gsam(optax.adamw(lr), rho=rho, alpha=0.6)
    >>> kappa = ire_optax.lr_proportional(lr, max_value=3.0, lr_max=1e-3)  # κ·η_t/η_max
    >>> round(float(kappa(100)), 4), round(float(rho(1000)), 4)
    (3.0, 0.1)

  Args:
    learning_rate: the learning-rate schedule (a function of the step count)
      or a constant.
    max_value: the value at ``lr_max``, ``>= min_value``.
    lr_max: the peak learning rate, ``> lr_min`` (or ``= lr_min`` with
      ``min_value = max_value``: the constant ``max_value``, as GSAM's code allows).
    min_value: the value at ``lr_min``, ``>= 0``.
    lr_min: the final (smallest) learning rate, ``>= 0``.

  Returns:
    A schedule ``step -> float32 scalar``.

  References:
    J. Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.

    M. Wang et al., *Improving Generalization and Convergence by Enhancing
    Implicit Regularization*, NeurIPS 2024 (arXiv:2405.20763).
  """
  if not callable(learning_rate):
    utils.check_range("learning_rate", learning_rate, low=0.0)
  utils.check_range("min_value", min_value, low=0.0)
  utils.check_range("max_value", max_value, low=0.0)
  utils.check_range("lr_min", lr_min, low=0.0)
  utils.check_range("lr_max", lr_max, low=0.0)
  for name, value in (("min_value", min_value), ("max_value", max_value),
                      ("lr_min", lr_min), ("lr_max", lr_max)):
    utils.check_not_schedule(name, value, "a bound of the interpolation")
  lo_v, hi_v = utils.concrete_value(min_value), utils.concrete_value(max_value)
  if lo_v is not None and hi_v is not None and lo_v > hi_v:
    raise ValueError(f"`min_value` ({min_value!r}) must be <= `max_value` ({max_value!r}).")
  lo_lr, hi_lr = utils.concrete_value(lr_min), utils.concrete_value(lr_max)
  if lo_lr is not None and hi_lr is not None and lo_lr == hi_lr and lo_v is not None \
      and lo_v == hi_v:
    # As GSAM's ProportionScheduler allows: one learning rate, one value, a constant.
    return lambda count: jnp.asarray(max_value, jnp.float32)
  if lo_lr is not None and hi_lr is not None and not lo_lr < hi_lr:
    raise ValueError(f"`lr_min` ({lr_min!r}) must be < `lr_max` ({lr_max!r}), or equal to it "
                     "with `min_value` equal to `max_value` (a constant).")

  def schedule(count: jax.Array) -> jax.Array:
    lr = utils.resolve(learning_rate, count)
    v0 = jnp.asarray(min_value, jnp.float32)
    v1 = jnp.asarray(max_value, jnp.float32)
    l0 = jnp.asarray(lr_min, jnp.float32)
    l1 = jnp.asarray(lr_max, jnp.float32)
    frac = jnp.clip((lr - l0) / (l1 - l0), 0.0, 1.0)
    # A lerp written so that frac = 1 gives max_value and frac = 0 min_value exactly; its
    # rounding can leave [min_value, max_value] by an ulp in between (min_value = max_value).
    return jnp.clip((1.0 - frac) * v0 + frac * v1, v0, v1)

  return schedule
