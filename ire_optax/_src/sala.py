"""SALA: Sharpness-Aware Lookahead (Tan, Zhang, Liu, Gong, TPAMI 2024).

SALA is Lookahead (Zhang et al., 2019) with one change at the boundary of each
cycle. Fast weights ``θ`` take ``k`` steps of a base optimizer starting from
the slow weights ``φ``; at the end of a cycle ``φ ← φ + α (θ_end − φ)`` and the
distance ``d = ‖θ_end − φ_new‖₂`` (global over the tree) decides what the next
cycle start does:

* ``d < ρ`` (stage 2): ``θ ← φ_new`` as Lookahead does, and the first step of
  the next cycle is a SAM step from ``φ``: the base optimizer is fed
  ``∇L(φ + ρ g/(‖g‖ + eps))``. This costs one extra gradient.
* ``d ≥ ρ`` (stage 1): ``θ`` stays at ``θ_end`` for one more gradient; at the
  next cycle start that (free) gradient, taken at ``θ_end``, is applied from
  ``φ``: ``θ ← φ + base(g(θ_end))`` -- a quadratic approximation of the
  trajectory at no extra cost.

The slow weights live in the optimizer state: users keep plain parameters and
read the evaluation weights with :func:`sala_eval_params`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ire_optax._src import sam, utils

__all__ = ["SALAState", "sala", "sala_eval_params", "sala_stats"]


@utils.applies_ire_amplification
class SALAState(NamedTuple):
  """State of the transformation returned by :func:`sala`.

  Attributes:
    count: number of ``update`` calls so far (``t``), int32.
    slow: the slow weights ``φ`` (same structure and dtypes as the params).
    distance: ``d = ‖θ_end − φ‖₂`` measured at the end of the last finished
      cycle (0 before the first one), float32.
    stage: the stage of the *next* cycle start, 1 or 2 (int32). Stage 2 means
      the fast weights were reset to ``φ`` and the next cycle starts with a SAM
      step (one extra gradient); stage 1 means the reset was deferred.
    extra_grads: number of SAM gradients taken so far (= stage-2 cycles), int32.
    cycles: number of cycles started so far, int32.
    base_state: the state of the base optimizer (never reset).
  """

  count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count, as in Optax)
  slow: optax.Params
  distance: jax.Array
  stage: jax.Array
  extra_grads: jax.Array
  cycles: jax.Array
  base_state: optax.OptState


def sala(
    base_optimizer: optax.GradientTransformation,
    *,
    sync_period: int = 2,
    slow_step_size: utils.ScalarOrSchedule = 0.5,
    rho: utils.ScalarOrSchedule = 0.2,
    eps: float = 1e-12,
    axis_name: str | None = None,
    perturb_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Lookahead (SALA).

  Update calls are counted ``t = 0, 1, 2, …``; with ``k = sync_period`` a cycle
  starts when ``t mod k = 0`` and ends when ``t mod k = k − 1`` (with ``k = 1``
  every step is both). ``g_t`` is the gradient passed as ``updates`` (taken at
  the current fast weights ``θ_t``) and ``base(·, x)`` the base optimizer's
  update computed with ``params = x`` (so decoupled weight decay sees ``x``).

  * Cycle start, stage 2 (``d < ρ``; includes the very first step, where
    ``φ = θ₀`` and ``d = 0``): ``θ_t = φ``; with
    ``g̃ = ∇L(φ + ρ g_t / (‖g_t‖₂ + eps))`` (one call of ``grad_fn``),
    ``θ' = φ + base(g̃, φ)``.
  * Cycle start, stage 1 (``d ≥ ρ``): ``θ' = φ + base(g_t, φ)``, i.e. the fast
    weights jump back to ``φ`` and take the step with the gradient taken at
    ``θ_end``.
  * Any other step: ``θ' = θ_t + base(g_t, θ_t)``.
  * Cycle end (after the step above): ``φ ← φ + α (θ' − φ)``,
    ``d = ‖θ' − φ‖₂``; if ``d < ρ`` then ``θ_{t+1} = φ`` (reset, next cycle is
    stage 2), else ``θ_{t+1} = θ'`` (deferred reset, next cycle is stage 1).

  The base optimizer's state is never reset. The returned update is
  ``θ_{t+1} − θ_t`` (computed in the wider of float32 and the params' dtype,
  cast to the params' dtypes), so
  ``optax.apply_updates(params, updates)`` yields the new fast weights (after a
  reset ``θ + (φ − θ)``: ``φ`` up to the rounding of that addition); do not
  modify the updates before applying them. Evaluate with the slow weights
  :func:`sala_eval_params` and follow the run with :func:`sala_stats`. The
  extra SAM gradient is evaluated under ``jax.lax.cond`` only on stage-2 cycle
  starts, so SALA costs ``1 + (fraction of stage-2 cycles) / k`` gradients per
  step on average, at most ``1 + 1/k``. A train loop passes the static keyword
  ``sam_hint=True`` on cycle starts (``t % k == 0``) and ``False`` on the other
  steps, and compiles the two step variants: on cycle starts the SAM gradient
  is computed outside ``lax.cond`` and selected with ``jnp.where`` (also in
  stage 1, where it is discarded; XLA:CPU runs it much faster there), with the
  same result; ``False`` promises a step that is not a cycle start: no
  conditional, so no host round trip on GPU (a wrong ``False`` on a stage-2
  cycle start uses the clean gradient). The end of a cycle (``t % k == k - 1``:
  the slow weights' update and the stage test) runs under ``lax.cond`` too, and
  takes the static keyword ``cycle_end_hint`` in the same way (a wrong
  ``False`` there skips that cycle's slow-weight update). With both hints no
  step has a conditional. See ``docs/performance.md``.

  Note:
    The authors' code takes ``k - 1`` plain base steps before its first cycle
    (one for their ``k = 2``); this implementation starts the first cycle at
    ``t = 0`` with a SAM step from ``θ₀`` (a fixed convention of this library,
    so results are comparable).

  Args:
    base_optimizer: the optimizer of the fast weights (e.g. SGD with Nesterov
      momentum). Extra keyword arguments of ``update`` other than ``grad_fn``
      are forwarded to it.
    sync_period: ``k``, the number of fast steps per cycle, an integer ``≥ 1``
      (default 2, the authors' SALA run; their ``SALA`` class defaults to 5).
    slow_step_size: ``α ∈ [0, 1]``, the slow weights' step size (default 0.5),
      a number or a schedule of the step count (its values clipped to [0, 1]).
    rho: ``ρ ≥ 0``, both the SAM radius and the distance threshold (default
      0.2), a number or a schedule of the step count (its values clipped to
      ``[0, float32 max]``). ``ρ = 0`` never takes a SAM step.
    eps: added to the gradient norm in the SAM perturbation.
    axis_name: under ``pmap``/``shard_map`` data parallelism, the name of the
      data axis: the clean and the SAM gradients are ``pmean``-ed over it
      (idempotent if already averaged). Params must be replicated across it,
      which makes the distance ``d`` global and identical on every device.
    perturb_mask: which leaves the SAM step of stage-2 cycles perturbs (one
      global norm over them), as in :func:`ire_optax.sam`. Lookahead's slow
      weights and the distance ``d`` still cover every leaf.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update(updates,
    state, params, *, grad_fn, **extra_args)`` needs ``params`` (the fast
    weights) and ``grad_fn``, a function ``params -> ∇L(params)`` of the
    training loss on the *current* batch.

  Raises:
    ValueError: if ``sync_period`` is not in ``[1, 2**31 - 1]``, ``slow_step_size ∉
      [0, 1]``, ``rho < 0`` or ``eps`` is not a normal float32 ``> 0`` (``eps = 0``
      included).

  Example:
    >>> import jax, jax.numpy as jnp, optax, ire_optax
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> tx = ire_optax.sala(optax.sgd(0.1, momentum=0.9, nesterov=True),
    ...                     sync_period=2, slow_step_size=0.5, rho=0.2)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   g = jax.grad(loss)(params)
    ...   updates, state = tx.update(g, state, params, grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(100):
    ...   params, state = step(params, state)
    >>> bool(loss(ire_optax.sala_eval_params(state)) < 1e-2)  # evaluate at φ
    True
    >>> int(ire_optax.sala_stats(state)["cycles"])
    50

  References:
    J. Tan, J. Zhang, L. Liu, M. Gong, *Sharpness-Aware Lookahead for
    Accelerating Convergence and Improving Generalization*, IEEE TPAMI 2024,
    doi:10.1109/TPAMI.2024.3444002.
    M. Zhang, J. Lucas, G. Hinton, J. Ba, *Lookahead Optimizer: k steps
    forward, 1 step back*, NeurIPS 2019.
  """
  utils.check_transformation("base_optimizer", base_optimizer)
  utils.check_range("slow_step_size", slow_step_size, low=0.0, high=1.0)
  utils.check_int("sync_period", sync_period, low=1, high=utils.INT32_MAX)
  utils.check_range("rho", rho, low=0.0, high=utils.FLOAT32_MAX)
  utils.check_range("eps", eps, low=utils.FLOAT32_TINY, high=utils.FLOAT32_MAX)
  utils.check_not_schedule("eps", eps)
  utils.check_axis_name("axis_name", axis_name)
  base = optax.with_extra_args_support(base_optimizer)

  mask_fn = sam.resolve_perturb_mask(perturb_mask)

  def init_fn(params: optax.Params) -> SALAState:
    sam.check_not_masked(params, who="sala")
    rho0 = utils.resolve(rho, jnp.zeros((), jnp.int32), low=0.0, high=utils.FLOAT32_MAX)
    return SALAState(
        count=jnp.zeros((), jnp.int32),
        # A copy, so that params and state can both be donated to a jitted step.
        slow=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
        distance=jnp.zeros((), jnp.float32),
        # d = 0 at the start, so the first cycle is stage 2 unless rho = 0.
        stage=jnp.where(rho0 > 0.0, 2, 1).astype(jnp.int32),
        extra_grads=jnp.zeros((), jnp.int32),
        cycles=jnp.zeros((), jnp.int32),
        base_state=base_optimizer.init(params),
    )

  def update_fn(
      updates: optax.Updates,
      state: SALAState,
      params: optax.Params | None = None,
      *,
      grad_fn: Any = None,
      sam_hint: bool | None = None,
      cycle_end_hint: bool | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, SALAState]:
    if params is None:
      raise ValueError("sala.update() needs `params` (the current fast weights).")
    sam.check_not_masked(params, who="sala")
    grad_fn = utils.require_callable(
        "grad_fn", grad_fn, who="sala.update()",
        why="params -> gradient of the training loss on the current batch, used for the "
        "SAM step of stage-2 cycles",
    )
    if updates is None:
      raise TypeError("sala.update() needs the gradient at `params` (the fast weights) as "
                      "`updates`; got None.")
    utils.check_float_tree(params, what="params", who="sala.update()")
    utils.check_like(updates, params, what="`updates`", who="sala.update()")
    utils.check_axes_named(
        updates, axis_name, who="sala.update()", what="the gradient",
        hint="pass axis_name=<axis> where the devices hold shares of the batch (data "
        "parallelism), so that the distance d and the stage are global (docs/multi_device.md).")
    # Inside ire(): IRE's amplification of the base step (never of SALA's jumps).
    amplify = extra_args.pop(utils.IRE_AMPLIFY_KWARG, None)
    k = jnp.asarray(sync_period, jnp.int32)
    pos = state.count % k
    is_start = pos == 0
    is_end = pos == k - 1
    dtype = utils.compute_dtype(params)
    rho_t = utils.resolve(rho, state.count, low=0.0, high=utils.FLOAT32_MAX, dtype=dtype)
    alpha_t = utils.resolve(slow_step_size, state.count, low=0.0, high=1.0, dtype=dtype)
    phi = state.slow
    take_sam = jnp.logical_and(is_start, state.stage == 2)

    g = utils.pmean_if(updates, axis_name)

    def sam_grad():
      perturbed = sam.perturbed_params(phi, g, rho_t, eps=eps, mask=mask_fn(phi))
      # Per-device gradient also under shard_map(check_vma=True): utils.per_device_if.
      g_sam = utils.call_callback(
          grad_fn, utils.per_device_if(perturbed, axis_name), name="grad_fn",
          who="sala.update()", check=lambda g: utils.check_gradient(g, phi, who="sala.update()"))
      return utils.tree_cast_like(utils.pmean_if(g_sam, axis_name), g)

    g_used = utils.cond(take_sam, sam_grad, lambda: g, hint=sam_hint)

    # At a cycle start the step is taken from the slow weights.
    base_params = jax.tree.map(lambda s, p: jnp.where(is_start, s, p), phi, params)
    delta, base_state = base.update(g_used, state.base_state, base_params, **extra_args)
    if amplify is not None:
      delta = amplify(delta)

    # In the wider of float32 and the params' dtype (float64 stays float64).
    dtype = utils.compute_dtype(params)
    wide = lambda x: jnp.asarray(x, dtype)
    # theta' - theta: (phi - theta) + delta at a cycle start, delta otherwise.
    step = jax.tree.map(
        lambda s, p, u: jnp.where(is_start, (wide(s) - wide(p)) + wide(u), wide(u)),
        phi, params, delta,
    )

    def end_of_cycle():
      theta_end = jax.tree.map(lambda p, u: wide(p) + u, params, step)
      # φ + α(θ' − φ), exactly θ' for α = 1 and φ for α = 0 (also when the
      # step overflowed to ±inf: no inf − inf or 0·inf).
      def slow(s, te):
        s = wide(s)
        return jnp.where(alpha_t == 1, te, jnp.where(alpha_t == 0, s, s + alpha_t * (te - s)))

      phi_new = jax.tree.map(slow, phi, theta_end)
      # d = ‖θ' − φ_new‖ = (1 − α)‖θ' − φ‖ (inf, not NaN, for an infinite θ').
      dist = utils.tree_norm(jax.tree.map(lambda s, te: te - wide(s), phi, theta_end))
      d = jnp.where(alpha_t == 1, jnp.zeros_like(dist), (1.0 - alpha_t) * dist)
      reset = d < rho_t
      # On a reset θ_{t+1} − θ = φ_new − θ = (1 − α)(φ − θ) + α Δ, formed from φ, θ and the
      # step Δ rather than read back from φ_new: on TPU the slow weights' output then goes
      # to memory once, not through a copy per leaf. Exactly θ' − θ for α = 1 and φ − θ
      # for α = 0; ±inf (not NaN) when φ − θ overflows.
      def reset_step(s, p, te, st):
        d0 = wide(s) - wide(p)
        mix = jnp.where((alpha_t == 0) | jnp.isinf(d0), d0, (1.0 - alpha_t) * d0 + alpha_t * st)
        return jnp.where(alpha_t == 1, te - wide(p), mix)

      new_step = jax.tree.map(
          lambda s, p, te, st: jnp.where(reset, reset_step(s, p, te, st), st),
          phi, params, theta_end, step)
      stage = jnp.where(reset, 2, 1).astype(jnp.int32)
      return new_step, utils.tree_cast_like(phi_new, phi), d.astype(jnp.float32), stage

    def mid_cycle():
      return step, phi, state.distance, state.stage

    step, new_phi, distance, stage = utils.cond(is_end, end_of_cycle, mid_cycle,
                                                hint=cycle_end_hint)
    new_updates = utils.tree_cast_like(step, params)

    new_state = SALAState(
        count=optax.safe_int32_increment(state.count),
        slow=new_phi,
        distance=distance,
        stage=stage,
        extra_grads=jnp.where(take_sam, optax.safe_int32_increment(state.extra_grads),
                              state.extra_grads),
        cycles=jnp.where(is_start, optax.safe_int32_increment(state.cycles), state.cycles),
        base_state=base_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_sala_state(state: Any) -> SALAState:
  found = utils.find_states(state, SALAState)
  if not found:
    raise ValueError(
        "No SALAState found in the given optimizer state; pass the state of an "
        "optimizer built with ire_optax.sala (possibly nested in chain, ire, "
        "inject_hyperparams, MultiSteps, ...)."
    )
  return found[0]


def sala_eval_params(state: Any) -> optax.Params:
  """Returns the slow weights ``φ`` of SALA, the weights to evaluate with.

  Args:
    state: the state of :func:`sala`, or of any optimizer containing it (the
      first SALA state found in the pytree is used).

  Returns:
    The slow weights, with the structure and dtypes of the params.

  Raises:
    ValueError: if ``state`` contains no :class:`SALAState`.

  Example:
    >>> import jax.numpy as jnp, optax, ire_optax
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), ire_optax.sala(optax.sgd(0.1)))
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> ire_optax.sala_eval_params(state)
    {'w': Array([1., 1.], dtype=float32)}
  """
  return _find_sala_state(state).slow


def sala_stats(state: Any) -> dict[str, jax.Array]:
  """Scalars to follow a SALA run, e.g. to log the fraction of stage-2 cycles.

  Args:
    state: the state of :func:`sala`, or of any optimizer containing it (the
      first SALA state found in the pytree is used).

  Returns:
    A dict of scalar arrays:

    * ``"distance"`` -- ``d`` at the end of the last finished cycle (float32).
    * ``"stage"`` -- the stage of the next cycle start, 1 or 2 (int32).
    * ``"extra_grads"`` -- SAM gradients taken so far (= stage-2 cycles).
    * ``"cycles"`` -- cycles started so far.
    * ``"stage2_fraction"`` -- ``extra_grads / max(cycles, 1)`` (float32); the
      average cost is ``1 + stage2_fraction / k`` gradients per step.

  Raises:
    ValueError: if ``state`` contains no :class:`SALAState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, ire_optax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
    >>> tx = ire_optax.sala(optax.sgd(0.1), sync_period=2, rho=0.2)
    >>> state = tx.init(params)
    >>> for _ in range(4):  # two cycles
    ...   updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> stats = ire_optax.sala_stats(state)
    >>> int(stats["cycles"]), int(stats["extra_grads"]), int(stats["stage"])
    (2, 1, 1)
  """
  s = _find_sala_state(state)
  # Plain arrays also where the state's leaves are wrapped (an nnx.Optimizer's opt_state).
  stats = {"distance": s.distance, "stage": s.stage, "extra_grads": s.extra_grads,
           "cycles": s.cycles}
  stats = {k: jnp.asarray(v) for k, v in stats.items()}
  stats["stage2_fraction"] = (jnp.asarray(stats["extra_grads"], jnp.float32)
                              / jnp.maximum(jnp.asarray(stats["cycles"], jnp.float32), 1.0))
  return stats
