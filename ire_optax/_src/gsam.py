"""GSAM: surrogate-gap guided sharpness-aware minimization (Zhuang et al., ICLR 2022).

GSAM takes SAM's ascent step, then also descends the *surrogate gap*
``h(θ) = L(θ + ε) − L(θ)`` in the directions that do not change the perturbed
loss. With ``g`` the clean gradient and ``g_p`` the perturbed one::

  ε       = ρ_t · T² g / (‖T g‖ + eps)          (SAM's ascent, shared with ire_optax.sam)
  g_p     = ∇L_B(θ + ε)
  g_⊥     = g − ⟨g, ĝ_p⟩ ĝ_p,   ĝ_p = g_p / (‖g_p‖ + eps)
  g_GSAM  = g_p − α g_⊥
  Δ       = base(g_GSAM)

``α = 0`` is SAM. The radius usually follows the learning rate
(``ρ_t = ρ_min + (ρ_max − ρ_min)(η_t − η_min)/(η_max − η_min)``):
build it with :func:`ire_optax.lr_proportional`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ire_optax._src import sam as sam_lib
from ire_optax._src import utils


def _wide(x: Any) -> jax.Array:
  """``x`` in the wider of float32 and its own floating dtype."""
  x = jnp.asarray(x)
  dtype = jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(
      x.dtype, jnp.floating) else jnp.float32
  return x.astype(dtype)


def surrogate_gap_gradient(
    clean: Any, perturbed: Any, alpha: Any, *, eps: Any = 1e-12
) -> Any:
  r"""GSAM's descent direction :math:`g_p - \alpha\, g_\perp`.

  .. math::
    \hat g_p = \frac{g_p}{\lVert g_p \rVert_2 + \mathrm{eps}}, \qquad
    g_\perp = g - \langle g, \hat g_p \rangle \hat g_p, \qquad
    g_{\mathrm{GSAM}} = g_p - \alpha\, g_\perp .

  The norm and the inner product are global over the tree and computed in the
  wider of float32 and the gradients' dtype; the result has the dtypes of
  ``perturbed``. A zero perturbed gradient gives :math:`\hat g_p = 0` (no
  NaN). ``alpha = 0`` returns ``perturbed`` exactly.

  Args:
    clean: the clean gradient :math:`g = \nabla L(\theta)`.
    perturbed: the perturbed gradient :math:`g_p = \nabla L(\theta + \epsilon)`.
    alpha: :math:`\alpha`, the weight of the surrogate-gap descent.
    eps: added to :math:`\lVert g_p \rVert`.

  Returns:
    :math:`g_{\mathrm{GSAM}}`, a pytree like ``perturbed``.
  """
  den = utils.tree_norm(perturbed) + jnp.asarray(eps, jnp.float32)
  inv = 1.0 / jnp.where(den == 0, jnp.ones_like(den), den)  # g_p = 0 and eps = 0: ĝ_p = 0
  leaves_p = jax.tree.leaves(perturbed)
  leaves_g = jax.tree.leaves(clean)
  # <g, ĝ_p> with ĝ_p normalised first: each product |g_i ĝ_p,i| <= |g_i| is finite, but their
  # sum may pass float32's max (|<g, ĝ_p>| <= ‖g‖ <= sqrt(N) · max), and partial sums of either
  # sign could meet as inf - inf. So the products are summed scaled down by 2^-k with
  # 2^k >= 2 sqrt(N) (exact: a power of two; the scaled sum cannot overflow; products below
  # 2^(k-126) flush to 0, k = 11 for a million parameters, 16 for a billion) and scaled back:
  # <g, ĝ_p> is then at most ±inf, and a coordinate where ĝ_p is 0 keeps g_perp = g rather
  # than 0 · inf (a NaN).
  n = max(1, sum(int(np.size(g)) for g in leaves_g))
  down = 2.0 ** -(math.ceil(0.5 * math.log2(n)) + 1)
  dot = sum((jnp.sum(_wide(p) * inv * _wide(g) * down)
             for p, g in zip(leaves_p, leaves_g, strict=True)), jnp.zeros((), jnp.float32)) / down
  a = jnp.asarray(alpha)  # a Python number keeps its precision (float64 parameters)

  def combine(p, g):
    unit, g = _wide(p) * inv, _wide(g)
    perp = jnp.where(unit == 0, g, g - dot * unit)
    return (_wide(p) - a * perp).astype(jnp.asarray(p).dtype)

  out = jax.tree.map(combine, perturbed, clean)
  # alpha = 0 is SAM bit for bit (a * g_perp would still add a signed zero or a NaN from g).
  return jax.tree.map(lambda o, p: jnp.where(a == 0, p, o), out, perturbed)


def gsam(
    base_optimizer: optax.GradientTransformation,
    *,
    rho: utils.ScalarOrSchedule = 0.05,
    alpha: utils.ScalarOrSchedule = 0.6,
    adaptive: bool = False,
    adaptive_eta: float = 0.0,
    eps: float = 1e-12,
    axis_name: str | None = None,
    perturb_mask: Any = None,
    every_k: int | None = None,
    has_aux: bool = False,
    aux_init: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate-gap guided SAM (GSAM, Zhuang et al., ICLR 2022).

  One GSAM step per ``update`` call, with the calling convention of
  :func:`ire_optax.sam`: ``updates`` is the clean gradient
  :math:`g = \nabla L_B(\theta)` and the keyword argument ``grad_fn`` maps
  params to the gradient of the training loss on the same minibatch.

  .. math::
    \epsilon = \rho_t \frac{T^2 g}{\lVert T g \rVert + \mathrm{eps}}, \quad
    g_p = \nabla L_B(\theta + \epsilon), \quad
    g_\perp = g - \langle g, \hat g_p \rangle \hat g_p, \quad
    \Delta = \mathrm{base}(g_p - \alpha_t\, g_\perp),

  with :math:`\hat g_p = g_p / (\lVert g_p \rVert + \mathrm{eps})` and
  :math:`T` as in :func:`ire_optax.sam` (the ascent is the same function).
  :math:`g_p` alone descends the perturbed loss :math:`L(\theta+\epsilon)`
  (SAM); :math:`-g_\perp` descends the surrogate gap
  :math:`h = L(\theta+\epsilon) - L(\theta)` orthogonally to :math:`g_p`, so
  it does not undo SAM's step. ``alpha = 0`` is :func:`ire_optax.sam` bit for
  bit; ``rho = 0`` is the base optimizer bit for bit (``grad_fn`` is still
  called once). A step costs two gradients, like SAM; with ``every_k = k``
  the ascent (and the gap term) runs on every k-th step only and the other
  steps are plain base steps on the clean gradient: ``1 + 1/k`` gradients a
  step.

  The paper moves the radius with the learning rate,
  :math:`\rho_t = \rho_{\min} + (\rho_{\max} - \rho_{\min})
  \frac{\eta_t - \eta_{\min}}{\eta_{\max} - \eta_{\min}}`: pass
  ``rho=ire_optax.lr_proportional(lr, max_value=rho_max, min_value=rho_min,
  lr_max=..., lr_min=...)``.

  Differences from big_vision's ``gsam_gradient`` (the JAX reference): there
  the norm of :math:`g_p` has no eps (a zero gradient gives NaN); its
  ``adaptive_perturbation`` is :math:`\epsilon = \rho |\theta| g/\lVert g
  \rVert`, while ``adaptive=True`` here is ASAM's
  :math:`\rho T^2 g / \lVert T g \rVert`; its trainer takes ρ from the
  learning rate of the *next* step (``rho=lambda t: schedule(t + 1)``
  reproduces it); and every worker computes the whole GSAM direction, ascent
  and decomposition, from its own share of the batch, while with
  ``axis_name`` the gradients are averaged first here and decomposed once, so
  8 devices compute what one device computes on the global batch (no
  per-worker GSAM is offered; see docs/gsam.md).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, ire_optax
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 4.0]) * p ** 2)
    >>> tx = ire_optax.gsam(optax.sgd(0.1), rho=0.05, alpha=0.5)
    >>> params = jnp.array([1.0, 1.0])
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                              grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> [round(float(v), 4) for v in params]
    [0.4999, -0.0003]

  Args:
    base_optimizer: the optimizer that receives :math:`g_{\mathrm{GSAM}}`.
    rho: the radius :math:`\rho \ge 0`, or a schedule of the step count (its
      values clipped to ``[0, float32 max]``).
    alpha: :math:`\alpha \ge 0`, the weight of the surrogate-gap descent, or a
      schedule (its values clipped to ``[0, float32 max]``). big_vision's ViT
      configs use 0.6 (with ρ from 0.6 down to 0.1 following the learning rate).
    adaptive: ASAM's scale-invariant ascent, see :func:`ire_optax.sam`.
    adaptive_eta: :math:`\eta` of the adaptive scaling, see :func:`ire_optax.sam`.
    eps: added to the two gradient norms.
    axis_name: the ``pmap``/``shard_map`` data-parallel axis: the clean and the
      perturbed gradients are ``pmean``-ed before they are used.
    perturb_mask: which leaves the ascent perturbs (see :func:`ire_optax.sam`);
      the gap decomposition is over the whole tree.
    every_k: ``None`` (every step) or ``k >= 1``: the ascent and the gap term
      run on the steps with ``count % k == 0``, plain base steps on the clean
      gradient otherwise (see :func:`ire_optax.sam`).
    has_aux: ``grad_fn`` returns ``(gradient, aux)``; ``aux`` at the perturbed
      point (e.g. the perturbed loss, so the surrogate gap
      :math:`h = L_B(\theta+\epsilon) - L_B(\theta)` is free to log) is kept in
      the state: :func:`ire_optax.sam_aux` (see :func:`ire_optax.sam`).
    aux_init: the aux of the state made by ``init`` (see :func:`ire_optax.sam`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state
    :class:`ire_optax.SAMState`; its ``update`` takes ``(updates, state,
    params, *, grad_fn, **extra_args)``, the rest of ``extra_args`` is
    forwarded to the base optimizer (so ``ire(gsam(...))`` works).

  References:
    J. Zhuang, B. Gong, L. Yuan, Y. Cui, H. Adam, N. Dvornek, S. Tatikonda,
    J. Duncan, T. Liu, `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  utils.check_transformation("base_optimizer", base_optimizer)
  # The ascent's hyperparameters get exactly sam's checks (one definition of their ranges).
  sam_lib.sam(base_optimizer, rho=rho, adaptive=adaptive, adaptive_eta=adaptive_eta, eps=eps,
              axis_name=axis_name)
  utils.check_range("alpha", alpha, low=0.0, high=float(np.finfo(np.float32).max))
  utils.check_bool("has_aux", has_aux)
  mask_fn = sam_lib.resolve_perturb_mask(perturb_mask)

  def surrogate(updates, params, rho_t, extra_args, count):
    clean, g_p, aux = sam_lib.ascent_gradient(
        updates, params, rho_t, extra_args, who="gsam.update()", adaptive=adaptive,
        adaptive_eta=adaptive_eta, eps=eps, mask=mask_fn(params), axis_name=axis_name,
        has_aux=has_aux)
    alpha_t = (utils.resolve(alpha, count, low=0.0, high=utils.FLOAT32_MAX,
                             dtype=utils.compute_dtype(params)) if callable(alpha) else alpha)
    g = surrogate_gap_gradient(clean, g_p, alpha_t, eps=eps)
    # rho = 0: g_p is the clean gradient and g_perp vanishes; return g_p exactly.
    g = jax.tree.map(lambda a, b: jnp.where(rho_t == 0, b, a), g, g_p)
    return (g, aux) if has_aux else g

  return sam_lib._make(base_optimizer, rho, surrogate, who="gsam", every_k=every_k,
                       consumes=("grad_fn",), axis_name=axis_name, has_aux=has_aux,
                       aux_init=aux_init)
