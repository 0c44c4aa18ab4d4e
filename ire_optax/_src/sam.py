"""Sharpness-Aware Minimization (SAM), adaptive SAM and micro-batch SAM.

Both transformations wrap a base optimizer and take **one SAM step per
``update`` call**. With ``θ`` the parameters, ``g`` a minibatch gradient at
``θ`` and ``base`` any Optax optimizer:

* :func:`sam` (Foret et al., 2021) and adaptive SAM (Kwon et al., 2021)::

    T       = |θ| + η               (adaptive)    or   1  (plain SAM)
    ε       = ρ · T² g / (‖T g‖₂ + eps)            (‖·‖ global over the tree, float32)
    g_SAM   = ∇L_B(θ + ε)           (the same minibatch B, through ``grad_fn``)
    Δ, s    = base.update(g_SAM, s, θ)

* :func:`msam` (Behdin et al., 2023) splits the minibatch into ``m`` disjoint
  micro-batches ``B_1..B_m`` and perturbs each with its own gradient::

    g_j     = ∇L_{B_j}(θ)
    ε_j     = ρ · T² g_j / (‖T g_j‖₂ + eps)
    g_mSAM  = (1/m) Σ_j ∇L_{B_j}(θ + ε_j)
    Δ, s    = base.update(g_mSAM, s, θ)

Both cost exactly two gradients' worth of compute per step: SAM receives the
clean gradient as ``updates`` and evaluates one more gradient; mSAM evaluates
the ``m`` clean and the ``m`` perturbed micro-batch gradients itself (together
the cost of two full-batch gradients) and ignores ``updates``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ire_optax._src import sharding, utils

Params = Any
Batch = Any
GradFn = Callable[[Params], Any]
MicroGradFn = Callable[[Params, Batch], Any]


class SAMState(NamedTuple):
  """State of :func:`sam` and :func:`msam`.

  Attributes:
    count: number of ``update`` calls so far (int32 scalar); the ``rho``
      schedule is evaluated at it.
    base_state: state of the base optimizer.
    aux: with ``has_aux=True``, the auxiliary output of ``grad_fn`` in the last
      update (:func:`sam`: at the perturbed point, e.g. the perturbed loss
      L(θ + ε); :func:`msam`: of the clean micro-batch
      passes, averaged over the micro-batches), with the structure and dtypes
      of ``aux_init``; ``()`` otherwise. Read it with :func:`sam_aux`.
  """

  count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count, as in Optax)
  base_state: optax.OptState
  aux: Any = ()


# -----------------------------------------------------------------------------
# Shared pieces
# -----------------------------------------------------------------------------


def _validate(rho: Any, adaptive_eta: Any, eps: Any, adaptive: Any,
              axis_name: Any = None) -> None:
  utils.check_range("rho", rho, low=0.0, high=utils.FLOAT32_MAX)
  utils.check_range("adaptive_eta", adaptive_eta, low=0.0, high=utils.FLOAT32_MAX)
  # eps > 0 as a float32 (a zero gradient then gives eps = 0, not 0/0).
  utils.check_range("eps", eps, low=utils.FLOAT32_TINY, high=utils.FLOAT32_MAX)
  utils.check_not_schedule("adaptive_eta", adaptive_eta)
  utils.check_not_schedule("eps", eps)
  utils.check_bool("adaptive", adaptive)
  utils.check_axis_name("axis_name", axis_name)


def _aux_template(aux_init: Any, params: Params) -> Any:
  """The ``aux`` field of a fresh state: ``aux_init`` (or ``aux_init(params)``) as arrays.

  ``None`` means a float32 scalar (a loss value).
  """
  if aux_init is None:
    return jnp.zeros((), jnp.float32)
  tree = aux_init(params) if callable(aux_init) else aux_init
  # Python numbers would give weakly typed arrays, which the first update makes strong: a
  # second compilation of a jitted step.
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), tree)


def _split_aux(out: Any, has_aux: bool, *, who: str) -> tuple[Any, Any]:
  """``grad_fn``'s output as ``(gradient, aux)``; ``aux`` is ``()`` without ``has_aux``."""
  if not has_aux:
    return out, ()
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(f"{who}: with has_aux=True, `grad_fn` must return a pair (gradient, aux); "
                    f"got a {type(out).__name__}.")
  return out


def _check_float_aux(aux: Any, *, who: str, over: str) -> None:
  """Raises unless every leaf of ``aux`` is floating point: it is averaged (over ``over``)."""
  for x in jax.tree.leaves(aux):
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      raise TypeError(f"{who}: the aux leaves of `grad_fn` must be floating point (they are "
                      f"averaged over {over}); got {jnp.result_type(x)}.")


def _match_aux(aux: Any, template: Any, *, who: str, default: bool = False) -> Any:
  """``aux`` cast to the dtypes of ``template`` (the state's ``aux``); raises if it differs.

  ``default``: ``template`` is the default ``aux_init`` (a float32 scalar), not the user's.
  """
  if default:
    like_name, hint = ("the default aux (no `aux_init`: a float32 scalar)",
                       " Pass `aux_init=` an example of the aux `grad_fn` returns.")
  else:
    like_name, hint = "`aux_init`", " (the state's aux keeps one structure)"
  utils.check_like(aux, template, what="the aux output of `grad_fn`", who=who,
                   like_name=like_name, hint=hint)
  return utils.tree_cast_like(aux, template)


def sam_aux(state: optax.OptState) -> Any:
  """The auxiliary output of ``grad_fn`` kept by the first :func:`sam`/:func:`msam` state found.

  With ``sam(..., has_aux=True)`` and ``grad_fn`` returning ``(gradient,
  loss)``, this is the perturbed loss L_B(θ + ε) of the last step, computed
  anyway, so the sharpness estimate L_B(θ + ε) − L_B(θ) costs nothing. With
  ``msam(..., has_aux=True)`` it is the aux of the clean micro-batch passes,
  averaged over the micro-batches (e.g. the loss and the BatchNorm statistics).
  Works on nested states (``optax.chain``, :func:`ire_optax.ire`, ...).

  Raises:
    ValueError: if ``state`` holds no :class:`SAMState` with an aux output.

  Example:
    >>> import jax, jax.numpy as jnp, optax, ire_optax
    >>> loss = lambda p: jnp.sum(p ** 2)
    >>> tx = ire_optax.sam(optax.sgd(0.1), rho=0.1, has_aux=True)
    >>> params = jnp.array([1.0, 0.0])
    >>> state = tx.init(params)
    >>> vg = lambda p: jax.value_and_grad(loss)(p)[::-1]  # (gradient, loss)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=vg)
    >>> round(float(ire_optax.sam_aux(state)), 4)  # L(theta + eps) = (1 + 0.1)^2
    1.21
  """
  found = [s for s in utils.find_states(state, SAMState)
           if jax.tree.leaves(s.aux) or not isinstance(s.aux, tuple)]
  if not found:
    raise ValueError("sam_aux: no SAMState with an aux output (build sam/msam with "
                     "has_aux=True).")
  return found[0].aux


def perturbed_params(
    params: Params,
    grads: Any,
    rho: Any,
    *,
    adaptive: bool = False,
    adaptive_eta: Any = 0.0,
    eps: Any = 1e-12,
    mask: Any = None,
) -> Params:
  r"""SAM's ascent point :math:`\theta + \epsilon`, the one copy every optimizer uses.

  .. math::
    \epsilon = \rho \, \frac{T^2 g}{\lVert T g \rVert_2 + \mathrm{eps}}

  with :math:`T = |\theta| + \eta` (``adaptive``, :math:`\eta` =
  ``adaptive_eta``) or :math:`T = 1`. The norm is global over the tree,
  computed without overflow or underflow (SAM: in one pass over ``grads``, three
  sums of squares scaled by fixed powers of two; ASAM: scaled by the largest
  entries), in the wider of float32 and the parameters' dtype; the result has the
  dtypes of ``params``.
  :math:`\epsilon` is formed as :math:`\rho\, T u` with the unit vector
  :math:`u = T g / (\lVert T g\rVert + \mathrm{eps})`, so no intermediate
  overflows, and ``rho = 0`` returns ``params`` exactly. The elementwise
  expressions are fused by XLA into the norm and into the final addition, so
  the only parameter-sized buffer is the result.
  Used by :func:`sam`, :func:`msam`, SALA's stage-2 step and
  :func:`ire_optax.sharpness.sam_sharpness`.

  Args:
    params: the point :math:`\theta` where the ascent starts.
    grads: the gradient :math:`g` at ``params`` (same structure).
    rho: the radius :math:`\rho` (a scalar, possibly traced).
    adaptive: scale by :math:`T = |\theta| + \eta` (ASAM, Kwon et al., 2021).
    adaptive_eta: :math:`\eta \ge 0`.
    eps: added to the norm, so a zero gradient gives :math:`\epsilon = 0`.
    mask: ``None`` (perturb every leaf) or a pytree of Python bools with the
      structure of ``params`` (see :func:`resolve_perturb_mask`): only the
      leaves marked ``True`` are perturbed, and the norm is taken over them
      only (one global norm); the other leaves are returned unchanged.

  Returns:
    :math:`\theta + \epsilon` with the structure and dtypes of ``params``.
  """
  if mask is not None:
    # Unperturbed leaves: a zero gradient (constant-folded out of the norm) and
    # their parameters returned as they are.
    grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
    out = perturbed_params(params, grads, rho, adaptive=adaptive, adaptive_eta=adaptive_eta,
                           eps=eps)
    return jax.tree.map(lambda o, p, m: o if m else p, out, params, mask)
  # Computed in the wider of float32 and the parameters' dtype (float64 stays
  # float64), without overflow for any finite θ, g, ρ, η: with scales s (powers
  # of two, or of the largest entries: utils.safe_scale), x = T g / s has a norm
  # without overflow or underflow and
  #   u = T g / (‖T g‖ + eps) = x / (‖x‖ + eps / s),   ε = ρ T u,
  # formed last. A zero gradient gives ε = 0 for any ρ, and ρ = 0 gives θ.
  # NaN/inf in g give NaN/inf in ‖x‖, as documented.
  dtype = utils.compute_dtype(params, grads)
  rho = jnp.asarray(rho, dtype)
  eps = jnp.asarray(eps, dtype)
  grads = jax.tree.map(lambda g: jnp.asarray(g, dtype), grads)
  if adaptive:
    b = utils.safe_scale(utils.tree_max_abs(grads))
    x = jax.tree.map(lambda g: g / b, grads)
    # T / 2 = |θ| / 2 + η / 2: |θ| + η itself overflows when both are near float32's max (then
    # T g / ‖T g‖ = inf / inf). Halving is exact (normal range), and u does not depend on
    # T's scale, so ε = 2 ρ (T / 2) u is the same number.
    half_eta = jnp.asarray(adaptive_eta, dtype) * 0.5
    t = lambda p: jnp.abs(jnp.asarray(p, dtype)) * 0.5 + half_eta
    a = utils.safe_scale(utils.tree_max_abs(jax.tree.map(t, params)))
    y = jax.tree.map(lambda p, g: (t(p) / a) * g, params, x)
    c = utils.safe_scale(utils.tree_max_abs(y))  # T g / (a b c) has a largest entry of 1
    x = jax.tree.map(lambda v: v / c, y)
    # x = (T / 2) g / (a b c), so ‖T g‖ + eps = 2 a b c (‖x‖ + eps / (2 a b c)).
    eps_x = (((eps * 0.5) / b) / a) / c
    den = jnp.sqrt(utils.tree_sum_sq(x)) + eps_x
  else:
    # ‖g‖ = s √q (utils.tree_scaled_sum_sq: one pass over g on TPU and GPU, where s is a
    # power of two and x = g / s exact; two on the CPU), x = g / s and ‖x‖ = √q.
    s, q = utils.tree_scaled_sum_sq(grads)
    x = jax.tree.map(lambda g: g / s, grads)
    den = jnp.sqrt(q) + eps / s
  den = jnp.where(den == 0, jnp.ones_like(den), den)  # x = 0 and eps / s underflowing

  def shift(p, xi):
    u = xi / den
    e = rho * (t(p) * u) * 2 if adaptive else rho * u
    e = jnp.where(rho == 0, jnp.zeros_like(e), e)  # ρ = 0: θ exactly, even where u is NaN
    return (jnp.asarray(p, dtype) + e).astype(jnp.asarray(p).dtype)

  return jax.tree.map(shift, params, x)


def split_batch(
    batch: Batch,
    num_microbatches: int,
    *,
    who: str,
    layout: Literal["vmap", "scan", "replicated"] = "vmap",
) -> Batch:
  """Reshapes every leaf ``(B, ...)`` of ``batch`` to ``(m, B // m, ...)``.

  Micro-batch ``j`` is the contiguous slice ``[j B/m, (j+1) B/m)``, which is
  also how ``B`` rows are sharded over ``m`` devices. The one micro-batch split
  of the library (:func:`msam`, :func:`ire_optax.sharpness.m_sharpness`);
  ``who`` names the caller in the errors. ``layout`` says what the caller does
  with the micro-batch axis of a batch explicitly sharded over a mesh (see
  :func:`_split_leading`): ``"vmap"`` or ``"scan"`` over it, or
  ``"replicated"``, which gathers the batch first.
  """
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(f"{who}: `batch` has no array leaves to split into micro-batches (every "
                     "leaf needs a leading batch axis).")
  if any(jnp.ndim(x) == 0 for x in leaves):
    raise ValueError(
        f"{who}: every leaf of `batch` needs a leading batch dimension; found a scalar."
    )
  sizes = {jnp.shape(x)[0] for x in leaves}  # ints, or symbolic (jax.export) dimensions
  if len(sizes) != 1:
    raise ValueError(f"{who}: all leaves of `batch` must share the leading batch size; got "
                     f"{sorted(sizes, key=str)}.")
  (size,) = sizes
  if not size % num_microbatches == 0:  # (a symbolic "b" compares unequal: export "m*b")
    raise ValueError(
        f"{who}: the leading size of `batch` ({size}) is not divisible by `num_microbatches` "
        f"({num_microbatches}); `num_microbatches`={num_microbatches} must divide the batch "
        "size (with jax.export, give the batch a symbolic size such as "
        f"'{num_microbatches}*b')."
    )
  if layout == "replicated":
    # vmap over a batch axis sharded in the type is not supported: gather first
    # (explicit mode only; under GSPMD the reshape is free).
    return jax.tree.map(
        lambda x: jnp.reshape(sharding.reshard(jnp.asarray(x), jax.sharding.PartitionSpec()),
                              (num_microbatches, size // num_microbatches) + x.shape[1:]),
        batch)
  return jax.tree.map(lambda x: _split_leading(x, num_microbatches, layout == "scan"), batch)


def _split_leading(x: jax.Array, m: int, sequential: bool) -> jax.Array:
  """``(B, ...) -> (m, B // m, ...)``, also for a batch explicitly sharded over a mesh.

  With explicit sharding (the default axis type of ``jax.make_mesh``) JAX
  cannot infer the output sharding when the ``n`` shards of ``B`` do not
  divide ``m``, and ``lax.scan`` (``sequential``) needs an unsharded leading
  axis. The shards then go to the micro-batch axis ``B // m`` when ``n``
  divides it, else that axis is replicated. (Otherwise, for ``vmap``, the
  shards stay on the leading axis: each device keeps its micro-batches.)
  """
  shape = (m, jnp.shape(x)[0] // m) + tuple(jnp.shape(x)[1:])
  mesh, spec = sharding.mesh(x), sharding.spec(x)
  if mesh is None or mesh.empty or not spec or spec[0] is None:
    return jnp.reshape(x, shape)
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  n = math.prod(mesh.shape[a] for a in axes)
  if m % n == 0 and not sequential:
    return jnp.reshape(x, shape)
  inner = spec[0] if shape[1] % n == 0 else None
  out = jax.sharding.PartitionSpec(None, inner, *spec[1:])
  return jnp.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(mesh, out))


def resolve_perturb_mask(perturb_mask: Any) -> Callable[[Params], Any]:
  """Checks ``perturb_mask`` and returns ``params -> mask`` (``None`` when there is no mask).

  ``perturb_mask`` is, as for :func:`optax.masked`, ``None`` (perturb every
  leaf), a pytree of Python bools with the structure of the params or a prefix
  of it (``True``: perturb this leaf or subtree), or a function ``params ->``
  such a pytree. The returned function expands a prefix to one bool per leaf
  of ``params`` (:func:`utils.resolve_leaf_mask`).
  """
  return utils.resolve_leaf_mask(
      perturb_mask, name="perturb_mask", verb="perturb",
      none_selected="the ascent perturbs nothing and the optimizer is its base optimizer (use "
                    "rho=0 for that)")


def check_not_masked(params: Params, *, who: str) -> None:
  """Raises a ``TypeError`` if ``params`` holds ``optax.MaskedNode`` leaves.

  Inside :func:`optax.masked` / :func:`optax.partition` the masked-out
  parameters are replaced by ``MaskedNode`` s, so ``grad_fn`` (which needs every
  parameter to evaluate the loss) cannot be called, and the norm of the ascent
  would be split between the parts.
  """
  if utils.has_masked_nodes(params):
    raise TypeError(
        f"{who} cannot run inside optax.masked or optax.partition: the masked-out parameters "
        "reach it as MaskedNode leaves, so its grad_fn cannot evaluate the loss, and each part "
        f"would get its own norm. Perturb some leaves only with {who}(base, perturb_mask=mask) "
        "(one global norm over the perturbed leaves), and put optax.masked / optax.partition "
        f"inside the base optimizer: {who}(optax.partition(...), ...)."
    )


# -----------------------------------------------------------------------------
# SAM / ASAM
# -----------------------------------------------------------------------------


def ascent_gradient(updates: Any, params: Params, rho_t: Any, extra_args: dict, *, who: str,
                    adaptive: bool, adaptive_eta: Any, eps: Any, mask: Any, axis_name: Any,
                    has_aux: bool, per_device_ascent: bool = False) -> tuple[Any, Any, Any]:
  """SAM's two-gradient core, shared by :func:`sam` and :func:`ire_optax.gsam`.

  Pops ``grad_fn`` from ``extra_args``, ascends from ``params`` along the clean
  gradient ``updates`` (averaged over ``axis_name`` unless ``per_device_ascent``)
  and returns ``(clean, g_perturbed, aux)``: the gradient at the perturbed point,
  averaged over ``axis_name`` and cast like ``updates``, and ``grad_fn``'s aux
  (averaged too; ``()`` without ``has_aux``).
  """
  grad_fn = utils.require_callable(
      "grad_fn", extra_args.pop("grad_fn", None), who=who,
      why="params -> gradient of the training loss on the current batch",
  )
  if updates is None:
    raise TypeError(
        f"{who} needs the clean gradient at `params` as `updates`; got None "
        "(ire_optax.msam is the variant that computes its clean gradients itself)."
    )
  utils.check_float_tree(params, what="params", who=who)
  utils.check_like(updates, params, what="`updates`", who=who)
  clean = updates if per_device_ascent else utils.pmean_if(updates, axis_name)
  perturbed = perturbed_params(params, clean, rho_t, adaptive=adaptive,
                               adaptive_eta=adaptive_eta, eps=eps, mask=mask)
  # per_device_if: under shard_map(check_vma=True) grad_fn must see per-device
  # params, else JAX sums its gradient over the axis implicitly.
  check = lambda out: utils.check_gradient(_split_aux(out, has_aux, who=who)[0], params, who=who)
  out = utils.call_callback(grad_fn, utils.per_device_if(perturbed, axis_name), name="grad_fn",
                            who=who, check=check)
  g, aux = _split_aux(out, has_aux, who=who)
  g = utils.tree_cast_like(utils.pmean_if(g, axis_name), updates)
  if has_aux and axis_name is not None:
    _check_float_aux(aux, who=who, over=f"axis_name={axis_name!r}")
    aux = utils.pmean_if(aux, axis_name)
  return clean, g, aux


def sam(
    base_optimizer: optax.GradientTransformation,
    *,
    rho: utils.ScalarOrSchedule = 0.05,
    adaptive: bool = False,
    adaptive_eta: float = 0.0,
    eps: float = 1e-12,
    axis_name: str | None = None,
    per_device_ascent: bool = False,
    perturb_mask: Any = None,
    every_k: int | None = None,
    has_aux: bool = False,
    aux_init: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization (SAM) and adaptive SAM (ASAM).

  One SAM step per ``update`` call. ``updates`` is the clean minibatch
  gradient :math:`g = \nabla L_B(\theta)`; the perturbed gradient comes from
  the extra keyword argument ``grad_fn`` (``params -> gradient of the training
  loss on the same minibatch``, the name :func:`optax.contrib.sam` uses):

  .. math::
    \epsilon = \rho \, \frac{T^2 g}{\lVert T g \rVert_2 + \mathrm{eps}}, \qquad
    g_{\mathrm{SAM}} = \nabla L_B(\theta + \epsilon), \qquad
    \Delta = \mathrm{base}(g_{\mathrm{SAM}}),

  with :math:`T = 1` (SAM) or :math:`T = |\theta| + \eta` elementwise (ASAM,
  ``adaptive=True``, :math:`\eta` = ``adaptive_eta``). The norm is global over
  the whole tree and computed in float32. ``grad_fn`` is called exactly once per
  step, so a train step costs two gradients. The only extra parameter-sized
  buffer is :math:`\theta + \epsilon`. With ``rho=0`` the result is bit for bit
  that of ``base_optimizer`` (with ``every_k`` and no ``sam_hint`` under ``jit``:
  up to XLA's rounding, as the step then runs under ``lax.cond``).

  Extra keyword arguments other than ``grad_fn`` are forwarded to the base
  optimizer, so ``sam`` nests, e.g. inside :func:`ire_optax.ire` (SAM-IRE, whose
  curvature is then computed from the clean gradient, at the unperturbed point).

  Multiple devices (``pmap``/``shard_map`` with ``axis_name``): pass the
  *local* clean gradient and a ``grad_fn`` on the local batch. The clean
  gradient is ``pmean``-ed before the ascent (global SAM: every device uses the
  same :math:`\epsilon`) unless ``per_device_ascent=True``, in which case every
  device perturbs with its own local gradient (the "m-sharpness" of Foret et
  al.; identical to :func:`msam` with one micro-batch per device). The
  perturbed gradient is always ``pmean``-ed before the base step.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, ire_optax
    >>> loss = lambda p, x: jnp.sum((p * x - 1.0) ** 2)
    >>> x = jnp.array([1.0, 2.0])
    >>> params = jnp.array([0.5, 0.5])
    >>> tx = ire_optax.sam(optax.sgd(0.1), rho=0.05)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params, x)
    >>> updates, state = tx.update(
    ...     grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, x))
    >>> params = optax.apply_updates(params, updates)
    >>> params.round(4)
    Array([0.61, 0.5 ], dtype=float32)

  Args:
    base_optimizer: the optimizer that receives the SAM gradient (with its
      learning rate, weight decay, clipping, ...).
    rho: radius :math:`\rho` of the ascent step, ``>= 0``, or a schedule of the
      step count (its values clipped to ``[0, float32 max]``). Typical: 0.05
      (SGD on CIFAR), 0.1--0.2 for larger models; ASAM uses larger values,
      ρ ≈ 0.5--2.
    adaptive: use adaptive SAM (Kwon et al., 2021).
    adaptive_eta: :math:`\eta \ge 0` in :math:`T = |\theta| + \eta`. The formula
      of docs/design.md §1.2 is :math:`T = |\theta|` (the default 0); Kwon et al.'s code uses
      0.01 and applies :math:`T` to the parameters named ``weight`` (kernels and
      norm scales; biases get :math:`T = 1`). Here :math:`T` applies to every
      perturbed leaf; ``perturb_mask`` chooses which leaves are perturbed (that
      mixed rule, T on some leaves and T = 1 on others, is not offered).
    eps: added to the norm so that a zero gradient gives a zero perturbation.
    axis_name: the ``pmap``/``shard_map`` axis of data parallelism, or ``None``.
    per_device_ascent: with ``axis_name``, perturb every device with its local
      clean gradient instead of the averaged one.
    perturb_mask: which leaves the ascent perturbs, like the ``mask`` of
      :func:`optax.masked`: ``None`` (all), a pytree of bools with the
      structure of the params (or a prefix of it), or a function ``params ->``
      such a pytree. :math:`\epsilon = 0` on the other leaves and the norm is
      global over the perturbed leaves only, e.g. weights but not biases and
      norm scales, or the norm layers only ("SAM-ON"). The base optimizer still
      updates every leaf. (``optax.masked(sam(...))`` cannot do this: it raises.)
    every_k: ``None`` (every step) or ``k >= 1``: the ascent runs on the steps
      with ``count % k == 0``; the other steps are plain base steps on the
      (averaged) clean gradient and do not call ``grad_fn``, so a step costs
      ``1 + 1/k`` gradients on average ("SAM every k steps"). A train loop
      passes the static keyword ``sam_hint=True`` on the ascent steps and
      ``False`` on the others (two compiled step variants): ``False`` promises
      a plain step (no conditional, no host round trip on GPU; a wrong
      ``False`` takes a plain step instead of the ascent), see
      :func:`ire_optax.ire`'s ``refresh_hint``.
    has_aux: ``grad_fn`` returns ``(gradient, aux)``; ``aux`` at the perturbed
      point, e.g. the perturbed loss :math:`L_B(\theta + \epsilon)` (computed
      anyway, so the sharpness :math:`L_B(\theta+\epsilon) - L_B(\theta)` is
      free), is kept in the state: :func:`sam_aux`. (With ``every_k``, steps
      without an ascent keep the previous value.)
    aux_init: the ``aux`` of a fresh state, which fixes its structure, shapes
      and dtypes: a pytree or a function ``params -> pytree``; ``None``: a
      float32 scalar (a loss value).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``update`` takes
    ``(updates, state, params, *, grad_fn, **extra_args)``. ``params`` is
    required.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  utils.check_transformation("base_optimizer", base_optimizer)
  _validate(rho, adaptive_eta, eps, adaptive, axis_name)
  utils.check_bool("per_device_ascent", per_device_ascent)
  utils.check_bool("has_aux", has_aux)
  if per_device_ascent and axis_name is None:
    raise ValueError("`per_device_ascent=True` needs an `axis_name` (the data-parallel axis).")
  mask_fn = resolve_perturb_mask(perturb_mask)

  def surrogate(updates, params, rho_t, extra_args, count):
    del count
    _, g_sam, aux = ascent_gradient(
        updates, params, rho_t, extra_args, who="sam.update()", adaptive=adaptive,
        adaptive_eta=adaptive_eta, eps=eps, mask=mask_fn(params), axis_name=axis_name,
        has_aux=has_aux, per_device_ascent=per_device_ascent)
    return (g_sam, aux) if has_aux else g_sam

  return _make(base_optimizer, rho, surrogate, who="sam", every_k=every_k,
               consumes=("grad_fn",), axis_name=axis_name, has_aux=has_aux,
               aux_init=aux_init)


# -----------------------------------------------------------------------------
# mSAM
# -----------------------------------------------------------------------------


def msam(
    base_optimizer: optax.GradientTransformation,
    *,
    rho: utils.ScalarOrSchedule = 0.05,
    num_microbatches: int,
    adaptive: bool = False,
    adaptive_eta: float = 0.0,
    eps: float = 1e-12,
    axis_name: str | None = None,
    microbatch_mode: Literal["auto", "vmap", "scan", "unroll"] = "auto",
    perturb_mask: Any = None,
    has_aux: bool = False,
    aux_init: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Micro-batch averaged SAM (mSAM) of Behdin et al. (2023).

  The minibatch :math:`B` is split into ``m = num_microbatches`` disjoint,
  contiguous micro-batches :math:`B_1, \dots, B_m`, each perturbed along its own
  gradient:

  .. math::
    g_j = \nabla L_{B_j}(\theta), \quad
    \epsilon_j = \rho \, \frac{T^2 g_j}{\lVert T g_j \rVert_2 + \mathrm{eps}}, \quad
    g_{\mathrm{mSAM}} = \frac{1}{m} \sum_{j=1}^m \nabla L_{B_j}(\theta + \epsilon_j), \quad
    \Delta = \mathrm{base}(g_{\mathrm{mSAM}}),

  (:math:`T` as in :func:`sam`). ``m = 1`` is SAM.

  **Calling convention.** ``update(updates, state, params, *, grad_fn, batch,
  **extra_args)``:

  * ``grad_fn(params, microbatch)`` returns the gradient of the training loss
    (the mean over the micro-batch) on ``microbatch``;
  * ``batch`` is a pytree whose leaves all have the leading batch size ``B``,
    divisible by ``m``; micro-batch ``j`` is rows ``[jB/m, (j+1)B/m)`` of every
    leaf;
  * ``updates`` is **not used** (pass ``None``). mSAM needs the clean gradient
    of every micro-batch, which it computes itself: a train step must not also
    compute a full-batch gradient, that would be a third gradient thrown away.
    For the same reason, transformations chained *before* ``msam`` in
    :func:`optax.chain` have no effect on it; put clipping and the like inside
    ``base_optimizer``, where they act on :math:`g_{\mathrm{mSAM}}`.

  ``grad_fn`` is traced twice (clean and perturbed pass), each time over all
  micro-batches, and every mode costs two full-batch gradients' worth of
  arithmetic:

  * ``microbatch_mode="auto"`` (default): ``"unroll"`` on CPU, ``"vmap"`` on
    the other platforms (chosen when the step is compiled, with
    :func:`jax.lax.platform_dependent`; only the chosen one is compiled).
  * ``"vmap"``: the micro-batches run vectorised.
    Memory of ``m`` gradients and ``m`` perturbed copies of the parameters.
    In the perturbed pass every micro-batch has its own weights, so matrix
    products become batched products and convolutions become grouped
    convolutions (slow on XLA:CPU).
  * ``"scan"``: one micro-batch after the other in a :func:`jax.lax.scan`:
    memory of one micro-batch's activations plus one float32 accumulator.
    (XLA:CPU runs convolution gradients inside loops several times slower; see
    ``benchmarks/results/sam.md``.)
  * ``"unroll"``: the same sequential loop unrolled at compile time (compile
    time grows with ``m``; XLA schedules the micro-batches freely, so memory is
    between the other two).

  The mean clean gradient :math:`\frac1m \sum_j g_j` is not kept. With
  ``has_aux=True``, ``grad_fn(params, microbatch)`` returns ``(gradient,
  aux)`` (e.g. ``aux = (loss, batch_stats)``); the aux of the *clean* passes,
  averaged over the micro-batches, is kept in the state (:func:`sam_aux`), so a
  train step needs no extra forward pass for its logged loss or its BatchNorm
  statistics (which are then those of the micro-batches, averaged). The aux of
  the perturbed passes is dropped. Its leaves must be floating point.

  Multiple devices (``axis_name``): every device splits its local batch into
  ``m`` micro-batches, and only :math:`g_{\mathrm{mSAM}}` is ``pmean``-ed; with
  ``n`` devices this is mSAM with ``n m`` micro-batches. mSAM with ``m``
  micro-batches on one device equals ``msam(num_microbatches=1,
  axis_name=...)`` (or ``sam(per_device_ascent=True, axis_name=...)``) on ``m``
  devices holding one micro-batch each.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, ire_optax
    >>> def loss(p, mb):
    ...   return jnp.mean((mb["x"] @ p - mb["y"]) ** 2)
    >>> batch = {"x": jnp.eye(4, 2), "y": jnp.ones(4)}
    >>> params = jnp.zeros(2)
    >>> tx = ire_optax.msam(optax.sgd(0.1), rho=0.05, num_microbatches=2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(
    ...     None, state, params, grad_fn=jax.grad(loss), batch=batch)
    >>> optax.apply_updates(params, updates).round(4)
    Array([0.0518, 0.0518], dtype=float32)

  Args:
    base_optimizer: the optimizer that receives :math:`g_{\mathrm{mSAM}}`.
    rho: ascent radius :math:`\rho \ge 0`, or a schedule of the step count (its
      values clipped to ``[0, float32 max]``).
    num_microbatches: ``m >= 1``, a static Python int (with
      :func:`optax.inject_hyperparams` pass ``static_args=("num_microbatches",)``).
    adaptive: adaptive (ASAM-style) perturbations, see :func:`sam`.
    adaptive_eta: :math:`\eta` of the adaptive scaling, see :func:`sam`.
    eps: added to each micro-batch gradient norm.
    axis_name: the ``pmap``/``shard_map`` axis of data parallelism, or ``None``.
    microbatch_mode: ``"auto"`` (per platform), ``"vmap"`` (vectorised),
      ``"scan"`` (sequential, bounded memory) or ``"unroll"`` (sequential,
      unrolled at compile time).
    perturb_mask: which leaves every micro-batch's ascent perturbs, see
      :func:`sam` (one norm per micro-batch, over the perturbed leaves).
    has_aux: ``grad_fn`` returns ``(gradient, aux)``; the clean passes' aux,
      averaged over the micro-batches, is kept in the state (:func:`sam_aux`).
    aux_init: the ``aux`` of a fresh state (a pytree or ``params -> pytree``),
      which fixes its structure; ``None``: a float32 scalar (the loss).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``update`` takes
    ``(updates, state, params, *, grad_fn, batch, **extra_args)``.

  References:
    Behdin et al., `mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization
    <https://arxiv.org/abs/2302.09693>`_, 2023.
  """
  utils.check_transformation("base_optimizer", base_optimizer)
  _validate(rho, adaptive_eta, eps, adaptive, axis_name)
  if utils.concrete_value(num_microbatches) is None:
    raise TypeError(
        "`num_microbatches` must be a static Python int, not a traced value or a "
        f"{type(num_microbatches).__name__}; with "
        "optax.inject_hyperparams pass static_args=('num_microbatches',)."
    )
  utils.check_int("num_microbatches", num_microbatches, low=1)
  num_microbatches = int(num_microbatches)
  if microbatch_mode not in ("auto", "vmap", "scan", "unroll"):
    raise ValueError(
        f"`microbatch_mode` must be 'auto', 'vmap', 'scan' or 'unroll'; got {microbatch_mode!r}."
    )
  utils.check_bool("has_aux", has_aux)

  mask_fn = resolve_perturb_mask(perturb_mask)

  def surrogate(updates, params, rho_t, extra_args, count):
    del updates, count  # mSAM computes its clean micro-batch gradients itself.
    grad_fn = utils.require_callable(
        "grad_fn", extra_args.pop("grad_fn", None), who="msam.update()",
        why="(params, microbatch) -> gradient of the training loss on that micro-batch",
    )
    batch = extra_args.pop("batch", None)
    if batch is None:
      raise TypeError(
          "msam.update() needs the keyword argument `batch` (a pytree whose leaves share "
          "the leading batch dimension); it was not given."
      )
    utils.check_float_tree(params, what="params", who="msam.update()")
    # A device's own batch at replicated params: JAX would return the gradients summed over
    # the devices, device-invariant, so nothing would fail later (axes the params vary over
    # are the model's own and sum nothing).
    utils.check_axes_named(
        batch, axis_name, tuple(utils.tree_varying_axes(params)),
        who="msam.update()", what="the batch",
        hint="pass axis_name=<axis> where the devices hold shares of the batch (data "
        "parallelism): the micro-batch gradients are then each device's own and averaged over "
        "the devices (docs/multi_device.md).")
    # Per-device gradients also under shard_map(check_vma=True), see utils.per_device_if.
    params = utils.per_device_if(params, axis_name)
    dtype = utils.compute_dtype(params)  # float32, or float64 for float64 params

    def checked_grad(p, mb):
      check = lambda out: utils.check_gradient(
          _split_aux(out, has_aux, who="msam.update()")[0], params, who="msam.update()")
      out = utils.call_callback(grad_fn, p, mb, name="grad_fn", who="msam.update()",
                                check=check)
      return _split_aux(out, has_aux, who="msam.update()")

    def perturbed_grad(microbatch):
      clean, aux = checked_grad(params, microbatch)
      perturbed = perturbed_params(
          params, clean, rho_t, adaptive=adaptive, adaptive_eta=adaptive_eta, eps=eps,
          mask=mask_fn(params),
      )
      return checked_grad(perturbed, microbatch)[0], aux

    def wide(x):
      _check_float_aux(x, who="msam.update()", over="the micro-batches")
      return jnp.asarray(x, utils.compute_dtype(x))

    # With explicitly sharded params, vmap cannot stack the perturbed params along a micro-batch
    # axis sharded over the params' own mesh axes: split such a batch as for the sequential modes.
    param_axes = frozenset().union(*(sharding.spec_axes(p) for p in jax.tree.leaves(params)))
    batch_axes = frozenset().union(
        *(sharding.spec_axes(x, slice(0, 1)) for x in jax.tree.leaves(batch)))
    vmap_layout: Literal["vmap", "scan"] = "scan" if param_axes & batch_axes else "vmap"

    def run(mode, batch):
      microbatches = split_batch(batch, num_microbatches, who="msam.update()",
                                 layout=vmap_layout if mode == "vmap" else "scan")
      if mode == "vmap":
        stacked = jax.vmap(perturbed_grad)(microbatches)
        mean = lambda x: jnp.mean(wide(x), axis=0).astype(jnp.result_type(x))
        return (jax.tree.map(lambda g: jnp.mean(jnp.asarray(g, dtype), axis=0), stacked[0]),
                jax.tree.map(mean, stacked[1]))

      def body(acc, microbatch):
        g, aux = perturbed_grad(microbatch)
        # The (small) aux of every micro-batch is stacked and averaged after the loop.
        # The sum keeps the accumulator's type (its sharding included) whatever the gradient's.
        return jax.tree.map(
            lambda a, x: a + sharding.reshard_like(jnp.asarray(x, dtype), a), acc, g), aux

      # Created with the params' sharding (explicit mode), as the gradients carry it.
      zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype), params)
      zeros = utils.per_device_if(zeros, axis_name)
      total, auxes = jax.lax.scan(body, zeros, microbatches, unroll=mode == "unroll")
      mean = lambda x: jnp.mean(wide(x), axis=0).astype(jnp.result_type(x))
      return jax.tree.map(lambda a: a / num_microbatches, total), jax.tree.map(mean, auxes)

    if microbatch_mode == "auto":
      # Sequential on CPU (vmap turns the perturbed convolutions into slow
      # grouped ones there), vectorised elsewhere; only one is compiled.
      g_msam, aux = jax.lax.platform_dependent(
          batch, cpu=lambda b: run("unroll", b), default=lambda b: run("vmap", b))
    else:
      g_msam, aux = run(microbatch_mode, batch)
    g_msam = utils.tree_cast_like(utils.pmean_if(g_msam, axis_name), params)
    return (g_msam, utils.pmean_if(aux, axis_name)) if has_aux else g_msam

  return _make(base_optimizer, rho, surrogate, who="msam", has_aux=has_aux, aux_init=aux_init)


# -----------------------------------------------------------------------------
# The wrapper shared by sam and msam
# -----------------------------------------------------------------------------


def _make(
    base_optimizer: optax.GradientTransformation,
    rho: utils.ScalarOrSchedule,
    surrogate: Callable[[Any, Params, jax.Array, dict[str, Any], jax.Array], Any],
    *,
    who: str,
    every_k: Any = None,
    consumes: tuple[str, ...] = (),
    axis_name: str | None = None,
    has_aux: bool = False,
    aux_init: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """``init``/``update`` around ``surrogate`` (the gradient the base receives).

  ``surrogate(updates, params, rho_t, extra_args, count)`` pops the extra
  arguments it consumes from the dict ``extra_args``; the rest is forwarded to
  the base. With ``every_k`` (``None``: every step) it runs under ``lax.cond``
  on the steps with ``count % every_k == 0`` only; the other steps give the base
  the clean gradient, ``pmean``-ed over ``axis_name``, and drop the
  ``consumes`` arguments. ``every_k`` may be traced (``inject_hyperparams``).
  With ``has_aux`` the surrogate returns ``(gradient, aux)`` and ``aux`` goes
  to the state's ``aux`` (its fresh value from ``aux_init``).
  """
  if every_k is not None:
    utils.check_int("every_k", every_k, low=1, high=utils.INT32_MAX)  # vs the int32 count
  every_step = every_k is None or utils.concrete_value(every_k) == 1
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params: Params) -> SAMState:
    check_not_masked(params, who=who)
    aux = _aux_template(aux_init, params) if has_aux else ()
    return SAMState(count=jnp.zeros([], jnp.int32), base_state=base.init(params), aux=aux)

  def update_fn(
      updates: optax.Updates,
      state: SAMState,
      params: Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, SAMState]:
    if params is None:
      raise ValueError(f"{who}.update() needs `params` (the point where the ascent starts).")
    check_not_masked(params, who=who)
    rho_t = utils.resolve(rho, state.count, low=0.0, high=utils.FLOAT32_MAX,
                          dtype=utils.compute_dtype(params))
    extra_args = dict(extra_args)
    hint = extra_args.pop("sam_hint", None)  # static knowledge of an ascent step (utils.cond)

    def ascend(args):
      out = surrogate(updates, params, rho_t, args, state.count)
      if not has_aux:
        return out, ()
      return out[0], _match_aux(out[1], state.aux, who=f"{who}.update()",
                                default=aux_init is None)

    if every_step:
      g, aux = ascend(extra_args)
    else:
      if updates is None:
        raise TypeError(f"{who}.update() needs the clean gradient at `params` as `updates`; "
                        "got None.")
      inner = dict(extra_args)
      for key in consumes:
        utils.require_callable(key, extra_args.pop(key, None), who=f"{who}.update()",
                               why="params -> gradient of the training loss on the current batch")
      ascent = state.count % jnp.asarray(every_k, jnp.int32) == 0
      g, aux = utils.cond(
          ascent, lambda: ascend(dict(inner)),
          lambda: (utils.tree_cast_like(utils.pmean_if(updates, axis_name), updates),
                   state.aux),
          hint=hint)
    new_updates, base_state = base.update(g, state.base_state, params, **extra_args)
    count = optax.safe_int32_increment(state.count)
    return new_updates, SAMState(count=count, base_state=base_state, aux=aux)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
