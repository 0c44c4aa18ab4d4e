"""IRE: Implicit Regularization Enhancement (Wang et al., NeurIPS 2024).

Reference: M. Wang, J. He, K. Wang, Z. Chen, Y. Lu, *Improving Generalization
and Convergence by Enhancing Implicit Regularization*, NeurIPS 2024
(arXiv:2405.20763), Algorithm 1 "Practical IRE".

Along *flat* directions (small Hessian diagonal) the implicit regularization
that drives the iterate towards flatter minima is slow; IRE enlarges the step
there only, which keeps training stable along the sharp directions::

  Δ_t   = base(g_t)                                  # lr, weight decay included
  n_t   = 1[h_t <= τ_t]  if t >= T_w and (t - T_w) % K == 0   # refresh
          n_{t-1}        otherwise (all zeros before T_w)
  θ_t+1 = θ_t + Δ_t + κ_t · n_t ⊙ Δ_t

where ``h_t`` is a Hessian-diagonal estimate and ``τ_t`` its k-th smallest
value over *all* ``N`` coordinates of the tree, ``k = max(1, ⌊γN⌋)``.

Why IRE *wraps* its base optimizer instead of preceding it in a chain: κ must
multiply the base optimizer's *update*. Adam-type optimizers are invariant to a
per-coordinate rescaling of the gradient, so amplifying the gradient before
Adam would be cancelled by Adam's normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ire_optax._src import estimators, selection, utils

CurvatureFn = Callable[..., Any]
CURVATURE_ESTIMATORS = estimators.NAMES


class IREState(NamedTuple):
  """State of :func:`ire`.

  Attributes:
    count: number of ``update`` calls so far (int32).
    mask: one ``uint8`` per parameter, 1 on the current flat coordinates.
    curvature_ema: float32 EMA of ``g²`` when ``ema_decay`` is set, else ``()``.
    key: PRNG key (raw ``uint32[2]``) of the random estimators.
    base_state: the wrapped optimizer's state.
  """

  count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count, as in Optax)
  mask: optax.Updates
  curvature_ema: Any
  key: jax.Array
  base_state: optax.OptState


def ire(
    base_optimizer: optax.GradientTransformation,
    *,
    kappa: utils.ScalarOrSchedule = 3.0,
    gamma: utils.ScalarOrSchedule = 0.6,
    refresh_every: int = 10,
    warmup_steps: int = 0,
    curvature: str | CurvatureFn = "grad_sq",
    ema_decay: float | None = None,
    num_samples: int = 1,
    seed: int = 0,
    axis_name: str | None = None,
    shard_axis_name: str | None = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Implicit Regularization Enhancement around any Optax optimizer.

  .. math::

    \theta_{t+1} = \theta_t + \Delta_t + \kappa_t\, n_t \odot \Delta_t,
    \qquad n_t[i] = \mathbb{1}[h_t[i] \le \tau_t]

  with :math:`\Delta_t` the base optimizer's update and :math:`\tau_t` the
  exact :math:`\max(1, \lfloor\gamma N\rfloor)`-th smallest entry of the
  curvature estimate :math:`h_t` over the whole tree, refreshed every
  ``refresh_every`` steps once ``warmup_steps`` updates have been made (the
  mask is all zeros before). Ties at :math:`\tau_t` are all flat, so the flat
  set holds at least, and for distinct values exactly, ``k`` coordinates. The
  selection is an exact two-pass radix select (never a sort): see
  :func:`ire_optax.flat_mask`.

  Curvature estimators (``h`` only ranks coordinates; its scale is irrelevant):

  * ``"grad_sq"`` (default, free): ``h = g ⊙ g`` of the gradient passed to
    ``update`` on the refresh step, or an EMA of it if ``ema_decay`` is set.
  * ``"fisher"`` (the paper's choice): labels sampled from the model's own
    predictive distribution, ``h = (∇ CE(f(θ), ŷ))²``. ``update`` needs the
    keyword argument ``logits_fn: params -> logits`` (class axis last). One
    extra forward/backward pass, on refresh steps only.
  * ``"hutchinson"``: ``h = z ⊙ (H z)``, Rademacher ``z``. ``update`` needs
    ``grad_fn: params -> gradient`` (the same function SAM uses). One
    Hessian-vector product per sample, on refresh steps only.
  * a function ``fn(grads, params, key, **extra_args) -> pytree like params``.

  The refresh runs inside ``lax.cond`` and costs nothing on the other steps. A
  train loop that knows the refresh steps (they follow from the step count)
  passes the static keyword ``refresh_hint=True`` on them and ``False`` on the
  others, and compiles the two step variants: ``True`` runs the refresh outside
  the conditional (selected with ``jnp.where``: the same result even on a step
  that does not refresh), which XLA:CPU runs much faster; ``False`` is a
  promise that the step does not refresh: no conditional at all, so no host
  round trip on GPU and no copy of the mask. A wrong ``False`` skips that
  step's refresh (the mask stays the previous one until the next refresh).
  See ``docs/performance.md``.

  All extra keyword arguments of ``update`` are forwarded to the base
  optimizer, so ``ire(sam(...))`` (SAM-IRE) and ``ire(sala(...))`` work; in
  SAM-IRE the curvature is taken at the unperturbed point. A wrapper whose
  update is not one plain step declares so with its state class
  (``utils.applies_ire_amplification``); IRE then hands it the amplification
  instead of amplifying its output. SALA does: over SALA, IRE amplifies SALA's
  base step only; SALA's jumps back to the slow weights are not steps and are
  never amplified, so after a stage-2 reset the fast weights are the slow ones
  (with a fixed mask, ``ire(sala(base))`` is ``sala(ire(base))``).

  Parameters and updates must be real floating arrays (a complex, integer or
  bool leaf raises ``TypeError`` at the first ``update``); the amplification
  is computed in the wider of float32 and the update's dtype, so float64
  updates (``jax_enable_x64``) stay float64.

  Args:
    base_optimizer: the optimizer whose update IRE amplifies (e.g.
      ``optax.adamw``: "AdmIRE").
    kappa: amplification κ >= 0 of the flat coordinates' update, or a schedule
      of the step count (its values clipped to [0, float32 max]: a negative
      value is 0, never a step against the base update). The paper's ``κ_t = κ·η_t/η_max`` is
      ``ire_optax.lr_proportional(lr_schedule, max_value=kappa, lr_max=peak_lr)``.
      Published: 3-4 (Llama), 2 (ViT).
    gamma: fraction γ ∈ (0, 1) of coordinates treated as flat, or a schedule
      of the step count evaluated at each refresh (its values clipped to
      [0, 1]), e.g. a flat set that grows during training,
      ``optax.linear_schedule(0.5, 0.8, num_steps)``. Published: 0.6 (Llama),
      0.8 (ViT). For a Python float γ, k = max(1, ``int(gamma * N)``) as in
      the authors' ``kthvalue`` code (exact past 2**53); for a float32 γ (an array,
      injected, traced, a schedule's value) k = max(1, ⌊γ₃₂N⌋) exactly for its
      float32 value γ₃₂, within ⌈N·2**-24⌉ of it (see :func:`ire_optax.flat_mask`).
    refresh_every: K >= 1, steps between mask refreshes (10 in every published
      run).
    warmup_steps: T_w >= 0, IRE is off before this many updates (the paper
      switches it on right after the learning-rate warm-up).
    curvature: ``"grad_sq"``, ``"fisher"``, ``"hutchinson"`` or a function
      (under :func:`optax.inject_hyperparams` in ``static_args=("curvature",)``,
      else it is taken for a schedule).
    ema_decay: for ``"grad_sq"`` only: if set, rank an EMA of ``g²`` with this
      decay in [0, 1), updated every step (one float32 buffer per parameter)
      except where ``g`` is not finite: those entries keep their average.
    num_samples: probes per refresh for ``"hutchinson"`` (under
      :func:`optax.inject_hyperparams` in ``static_args=("num_samples",)``, even
      at its default: the number of probes is static).
    seed: seed of the PRNG key used by the random estimators.
    axis_name: data-parallel axis (``pmap``/``shard_map``): the curvature
      estimate is averaged over it before ranking, so every device selects
      the same mask. For ``"grad_sq"`` the gradient is averaged before it is
      squared (and, with ``ema_decay``, before it enters the EMA, one
      all-reduce a step), so the mask is that of the global batch even when
      ``updates`` are per-device gradients (as in SAM-IRE, where SAM averages
      them).
    shard_axis_name: axis over which the *parameters* are partitioned inside
      ``shard_map`` (FSDP): the ranking histograms are summed over it so the
      selection stays global and exact; a leaf replicated over it is counted
      once where ``shard_map``'s ``check_vma`` types it so (the default), and
      must be partitioned otherwise. Not needed under ``jax.jit`` with sharded
      arrays.
    mask: which leaves IRE ranks and amplifies, as for :func:`optax.masked`:
      ``None`` (every leaf), a pytree of Python bools with the structure of the
      params or a prefix of it, or a function ``params ->`` such a pytree. The
      other leaves get the base update and do not count in N. The curvature is
      still estimated on the whole model, so unlike ``optax.multi_transform``
      around ``ire`` this works with ``"fisher"`` and ``"hutchinson"``, whose
      callbacks need every parameter (e.g. keep norms and biases out of IRE).
      Under :func:`optax.inject_hyperparams` a mask function goes in
      ``static_args=("mask",)`` (else it is taken for a schedule).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for a hyperparameter outside its range or an unknown estimator.

  References:
    M. Wang, J. He, K. Wang, Z. Chen, Y. Lu, *Improving Generalization and
    Convergence by Enhancing Implicit Regularization*, NeurIPS 2024,
    `arXiv:2405.20763 <https://arxiv.org/abs/2405.20763>`_, Algorithm 1
    "Practical IRE".

  Example:
    >>> import jax, jax.numpy as jnp, optax, ire_optax
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  ire_optax.ire(optax.adamw(1e-2), kappa=3.0, gamma=0.6))
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
    >>> loss = lambda p: jnp.sum(jnp.array([0.1, 1.0, 10.0]) * p["w"] ** 2)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
  """
  utils.check_transformation("base_optimizer", base_optimizer)
  # (1 + κ) must be a finite float32: κ·0 would otherwise be NaN.
  utils.check_range("kappa", kappa, low=0.0, high=utils.FLOAT32_MAX)
  if not callable(gamma):  # a schedule's values are clipped to [0, 1] when it is evaluated
    selection.check_fraction("gamma", gamma)  # (0, 1); an array (float32) may round to 1
  # Compared with the int32 step count.
  utils.check_int("refresh_every", refresh_every, low=1, high=utils.INT32_MAX)
  utils.check_int("warmup_steps", warmup_steps, low=0, high=utils.INT32_MAX)
  utils.check_int("num_samples", num_samples, low=1, high=utils.INT32_MAX)
  utils.check_int("seed", seed, low=-(2**63), high=2**63 - 1)  # what jax.random.key accepts
  utils.check_axis_name("axis_name", axis_name)
  utils.check_axis_name("shard_axis_name", shard_axis_name)
  if ema_decay is not None:
    utils.check_range("ema_decay", ema_decay, low=0.0, high=1.0, high_inclusive=False)
    utils.check_not_schedule("ema_decay", ema_decay)
  estimator = estimators.resolve(curvature, ema_decay=ema_decay, num_samples=num_samples,
                                 axis_name=axis_name)
  mask_fn = utils.resolve_leaf_mask(
      mask, name="mask", verb="rank and amplify",
      none_selected="IRE amplifies nothing and the optimizer is its base optimizer (use "
                    "kappa=0 for that)")
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params: optax.Params) -> IREState:
    # zeros_like: the mask and EMA inherit the parameters' sharding.
    mask = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.uint8), params)
    ema = (
        jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
        if ema_decay is not None
        else ()
    )
    return IREState(
        count=jnp.zeros([], jnp.int32),
        mask=mask,
        curvature_ema=ema,
        # Raw key data (uint32[2]), not a typed key: Orbax checkpoints plain arrays.
        key=jax.random.key_data(jax.random.key(seed)),
        base_state=base.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    # The caller's static knowledge of whether this step refreshes (see utils.cond).
    refresh_hint = extra_args.pop("refresh_hint", None)
    if updates is not None and not jax.tree.leaves(updates) and jax.tree.leaves(state.mask):
      updates = None  # nnx.Optimizer passes updates=None on (mSAM's) as an empty nnx.State
    estimator.check(updates, params, extra_args)  # fails at trace time, before any work
    if updates is not None:
      utils.check_float_tree(updates, what="updates", who="ire.update()")
      utils.check_like(updates, state.mask, what="`updates`", who="ire.update()")
      utils.check_axes_named(
          updates, axis_name, shard_axis_name, who="ire.update()", what="the gradient",
          hint="pass axis_name=<axis> where the devices hold shares of the batch (data "
          "parallelism), shard_axis_name=<axis> where they hold parts of the parameters: the "
          "mask ranks the whole model's coordinates at once (docs/multi_device.md).")
    if params is not None:
      utils.check_float_tree(params, what="params", who="ire.update()")

    # A mask function sees the params, else the gradient (as under optax.masked), never the
    # uint8 mask (ire(msam) without params: the only tree left).
    selected = mask_fn(params if params is not None else updates if updates is not None
                       else state.mask)
    count = state.count
    since = count - jnp.asarray(warmup_steps, jnp.int32)
    refresh = (since >= 0) & (since % jnp.asarray(refresh_every, jnp.int32) == 0)

    ema = state.curvature_ema
    if ema_decay is not None:
      # The EMA of the data-parallel mean gradient's square, as without the EMA (per-device
      # gradients, as in SAM-IRE, are averaged first): the same on every device.
      d = jnp.asarray(ema_decay, jnp.float32)
      mean = utils.pmean_if(jax.tree.map(lambda g: g.astype(jnp.float32), updates), axis_name)
      # A non-finite entry (an overflowed float16 step, a NaN) carries no curvature and would
      # stay in the EMA for good: that coordinate keeps its average.
      ema = jax.tree.map(
          lambda e, g: jnp.where(jnp.isfinite(g), d * e + (1 - d) * jnp.square(g), e), ema, mean)

    def new_mask():
      # The PRNG key advances on refresh steps only, and only for a random estimator: the
      # other steps skip threefry's loop (a measurable share of a plain step's cost).
      key, sub = state.key, None
      if estimator.random:
        key, sub = jax.random.split(jax.random.wrap_key_data(key))
        key = jax.random.key_data(key)
      # "grad_sq" ranks the square of the data-parallel *mean* gradient: the
      # single-device g² of the global batch, also when the caller passes local
      # gradients (SAM-IRE); other estimates are averaged over `axis_name`.
      if ema_decay is not None:  # averaged over axis_name as it was accumulated
        h = estimator.estimate(ema, params, sub, extra_args)
      else:
        h = utils.pmean_if(estimator.estimate(updates, params, sub, extra_args), axis_name)
      # A schedule is evaluated at the refresh step; a number goes as it is (k exact in Python).
      gamma_t = utils.resolve(gamma, count, low=0.0, high=1.0,
                              dtype=utils.compute_dtype(h)) if callable(gamma) else gamma
      if selected is None:
        return selection.flat_mask(h, gamma_t, axis_name=shard_axis_name,
                                   square=estimator.square), key
      # Only the selected leaves are ranked (an empty leaf in place of each other one).
      h = jax.tree.map(lambda x, s: x if s else jnp.zeros((0,), x.dtype), h, selected)
      new = selection.flat_mask(h, gamma_t, axis_name=shard_axis_name, square=estimator.square)
      return jax.tree.map(lambda m, s, old: m if s else jnp.zeros_like(old), new, selected,
                          state.mask), key

    mask, key = utils.cond(refresh, new_mask, lambda: (state.mask, state.key),
                           hint=refresh_hint)
    # A schedule's κ is clipped into [0, float32 max]: 1 + κ >= 1 stays a finite float32.
    kappa_t = utils.resolve(kappa, count, low=0.0, high=utils.FLOAT32_MAX,
                            dtype=utils.compute_dtype(updates, params))

    def amplify(u, m):
      # In the wider of float32 and the update's dtype (float64 stays float64).
      uw = jnp.asarray(u, utils.compute_dtype(u))
      # (1 + κ)·u, not u + κ·u: an infinite update stays infinite when κ = 0.
      return jnp.where(m > 0, uw * (1 + kappa_t), uw).astype(jnp.asarray(u).dtype)

    amplify_tree = lambda tree: jax.tree.map(amplify, tree, mask)
    if utils.applies_amplification_inside(state.base_state):
      # E.g. IRE over SALA: SALA amplifies its base optimizer's step only; its jumps
      # back to the slow weights are not steps and must stay exact.
      extra_args = {**extra_args, utils.IRE_AMPLIFY_KWARG: amplify_tree}
      new_updates, base_state = base.update(updates, state.base_state, params, **extra_args)
    else:
      base_updates, base_state = base.update(updates, state.base_state, params, **extra_args)
      new_updates = amplify_tree(base_updates)
    return new_updates, IREState(
        count=optax.safe_int32_increment(count),
        mask=mask,
        curvature_ema=ema,
        key=key,
        base_state=base_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ire_flat_mask(state: optax.OptState) -> optax.Updates:
  """The current flat-coordinate mask (uint8 0/1 pytree) of the first IRE state found.

  Works on a nested state (inside ``optax.chain``, ``inject_hyperparams``,
  ``MultiSteps`` ...). The fraction of flat coordinates is
  ``sum(mask) / num_params``.

  Raises:
    ValueError: if ``state`` contains no :class:`IREState`.

  Example:
    >>> import jax.numpy as jnp, optax, ire_optax
    >>> params = {"w": jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  ire_optax.ire(optax.sgd(0.1), gamma=0.6))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([0.5, -0.1, 0.0, 0.3, -0.2])}
    >>> _, state = tx.update(grads, state, params)  # the first step refreshes the mask
    >>> ire_optax.ire_flat_mask(state)  # the 3 coordinates with the smallest g²
    {'w': Array([0, 1, 1, 0, 1], dtype=uint8)}
  """
  found = utils.find_states(state, IREState)
  if not found:
    raise ValueError("ire_flat_mask: no IREState found in `state`.")
  return found[0].mask
