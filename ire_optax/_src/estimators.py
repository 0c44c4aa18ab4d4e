"""Hessian-diagonal estimators used by IRE to rank coordinates.

IRE only *ranks* coordinates by their curvature, so every estimator here may
be off by a positive constant factor. All estimates are returned as float32
pytrees with the structure of ``params``. :func:`resolve` turns IRE's
``curvature=`` argument into one :class:`Estimator` at construction time.

* :func:`grad_sq_diag` -- ``g ⊙ g`` of a gradient you already have (free).
* :func:`fisher_diag` -- Gauss-Newton-Bartlett / sampled Fisher: labels ``ŷ``
  drawn from the model's own predictive distribution, ``h = (∇ CE(f(θ), ŷ))²``.
  One extra forward/backward pass. This is the estimator of Wang et al. (2024).
* :func:`hutchinson_diag` -- ``z ⊙ (H z)`` with Rademacher ``z``: one
  Hessian-vector product (forward-over-reverse through ``grad_fn``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ire_optax._src import utils

Params = Any
NAMES = ("grad_sq", "fisher", "hutchinson")


def rademacher_like(key: jax.Array, tree: Any) -> Any:
  """A Rademacher (±1) pytree with the shapes and dtypes of ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = [
      jax.random.rademacher(k, jnp.shape(x), dtype=jnp.float32).astype(jnp.asarray(x).dtype)
      for k, x in zip(keys, leaves, strict=False)
  ]
  return jax.tree.unflatten(treedef, out)


def hvp(grad_fn: Callable[[Params], Any], params: Params, v: Any) -> Any:
  """Hessian-vector product ``H v`` by forward-over-reverse differentiation.

  Args:
    grad_fn: ``params -> ∇L(params)`` (for example ``jax.grad(loss)``).
    params: the point at which the Hessian is taken.
    v: a pytree like ``params`` (same dtypes).

  Returns:
    ``H v`` with the structure of ``params``.
  """
  return jax.jvp(grad_fn, (params,), (v,))[1]


def grad_sq_diag(grads: Any) -> Any:
  """``g ⊙ g`` in float32: the free curvature proxy of a gradient."""
  return jax.tree.map(lambda g: jnp.square(jnp.asarray(g, jnp.float32)), grads)


def hutchinson_diag(
    grad_fn: Callable[[Params], Any], params: Params, key: jax.Array, *, num_samples: int = 1
) -> Any:
  """Hutchinson's estimate of the Hessian diagonal, ``E_z[z ⊙ H z]``.

  Args:
    grad_fn: ``params -> ∇L(params)``.
    params: where the Hessian is taken.
    key: PRNG key for the Rademacher probes.
    num_samples: number of probes averaged (each costs one HVP).

  Returns:
    float32 pytree like ``params``.
  """
  if num_samples < 1:
    raise ValueError(f"`num_samples` must be an integer >= 1; got {num_samples!r}.")

  def one(k):
    z = rademacher_like(k, params)
    hz = hvp(grad_fn, params, z)
    return jax.tree.map(
        lambda a, b: jnp.asarray(a, jnp.float32) * jnp.asarray(b, jnp.float32), z, hz
    )

  if num_samples == 1:
    return one(key)
  keys = jax.random.split(key, num_samples)
  total = jax.lax.map(one, keys)
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), total)


def sampled_label_loss(logits: jax.Array, key: jax.Array) -> jax.Array:
  """Mean cross-entropy of ``logits`` against labels sampled from ``softmax(logits)``.

  The sampled labels are constants (no gradient flows through the sampling).
  ``logits`` may have any leading shape; the last axis is the class axis.
  """
  logits32 = jnp.asarray(logits, jnp.float32)
  # Under shard_map every device samples its own examples' labels with the same key (the
  # replicated optimizer state): the key takes the logits' per-device type.
  labels = jax.random.categorical(utils.vary_like(key, logits32),
                                  jax.lax.stop_gradient(logits32), axis=-1)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits32, labels))


def check_logits(logits: Any) -> None:
  """Raises ``ValueError`` unless ``logits`` (what ``logits_fn`` returned) is a real array."""
  if not hasattr(logits, "shape") or jnp.ndim(logits) < 1:
    raise ValueError("`logits_fn` must return an array of logits with the class axis last "
                     "(shape (..., num_classes)); got "
                     + (f"shape {jnp.shape(logits)}." if hasattr(logits, "shape") else
                        f"a {type(logits).__name__}."))
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"`logits_fn` must return real floating logits; got dtype {logits.dtype}.")


def fisher_diag(
    logits_fn: Callable[[Params], jax.Array], params: Params, key: jax.Array
) -> Any:
  """Sampled-Fisher (Gauss-Newton-Bartlett) diagonal estimate.

  ``h = (∇_θ mean_i CE(f_i(θ), ŷ_i))²`` with ``ŷ_i ~ softmax(f_i(θ))``. Up to
  the batch-size factor this is the estimator used by Wang et al. (2024) and
  by Sophia (Liu et al., 2023).

  Args:
    logits_fn: ``params -> logits`` on the current batch (class axis last).
    params: where the estimate is taken.
    key: PRNG key for the label sampling.

  Returns:
    float32 pytree like ``params``.
  """
  def loss(p):
    logits = logits_fn(p)
    check_logits(logits)
    return sampled_label_loss(logits, key)

  return grad_sq_diag(jax.grad(loss)(params))


# -----------------------------------------------------------------------------
# IRE's `curvature=` argument, resolved once
# -----------------------------------------------------------------------------


class Estimator(NamedTuple):
  """A curvature estimator as IRE calls it, resolved once by :func:`resolve`.

  Attributes:
    name: ``"grad_sq"``, ``"fisher"``, ``"hutchinson"`` or ``"custom"``.
    estimate: ``(source, params, key, extra_args) -> tree to rank`` (float32
      leaves like ``params``). ``source`` is the gradient passed to ``update``,
      or the EMA of its square when ``ema_decay`` is set.
    square: the tree returned by ``estimate`` is squared inside the selection
      (``"grad_sq"`` ranks ``g²`` without materialising it).
    callbacks: ``(name, why)`` of the keyword arguments of ``update`` it needs.
    needs_params: it evaluates the model, so ``update`` needs ``params``.
    needs_updates: it ranks the gradient passed as ``updates`` (which other
      estimators allow to be ``None``, as :func:`ire_optax.msam` passes).
    random: it draws from the PRNG key (``estimate`` then gets a fresh key on
      each refresh; otherwise ``None``, and IRE's key never advances).
  """

  name: str
  estimate: Callable[[Any, Params, Any, dict[str, Any]], Any]
  square: bool
  callbacks: tuple[tuple[str, str], ...]
  needs_params: bool
  needs_updates: bool
  random: bool = True

  def check(self, updates: Any, params: Params, extra_args: dict[str, Any]) -> None:
    """Raises, at trace time, if ``update`` lacks an input this estimator needs."""
    who = f"ire(curvature={self.name!r}).update()"
    if self.needs_params and params is None:
      raise ValueError(f"{who} needs `params` for a model-based curvature estimator; got None.")
    for name, why in self.callbacks:
      utils.require_callable(name, extra_args.get(name), who=who, why=why)
    if self.callbacks and utils.has_masked_nodes(params):
      raise TypeError(
          f"{who} cannot run inside optax.masked, optax.partition or optax.multi_transform: the "
          "other parameters reach it as MaskedNode leaves, so its callbacks cannot evaluate the "
          "model. Keep leaves out of IRE with ire(base, ..., mask=mask) instead (the curvature is "
          "estimated on the whole model, only the masked leaves are ranked and amplified).")
    if self.needs_updates and updates is None:
      raise TypeError(f"{who} ranks the gradient passed as `updates`; got None.")


def _f32_leaves(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def resolve(
    curvature: str | Callable[..., Any],
    *,
    ema_decay: float | None,
    num_samples: int,
    axis_name: str | None,
) -> Estimator:
  """IRE's ``curvature`` argument as one :class:`Estimator` (validated here).

  Model-based estimates are per device (IRE averages them over ``axis_name``),
  also under ``shard_map(check_vma=True)``: see ``utils.per_device_if``.
  """
  if isinstance(curvature, str):
    if curvature not in NAMES:
      raise ValueError(
          f"`curvature` must be one of {NAMES} or a function "
          f"(grads, params, key, **extra_args) -> pytree; got {curvature!r}."
      )
  elif not callable(curvature):
    raise TypeError(
        f"`curvature` must be a string or a callable; got {type(curvature).__name__}."
    )
  if ema_decay is not None and not (isinstance(curvature, str) and curvature == "grad_sq"):
    # (a function would be handed the EMA of g² in place of the gradient)
    raise ValueError("`ema_decay` applies to curvature='grad_sq' only.")
  local = lambda tree: utils.per_device_if(tree, axis_name)
  who = lambda name: f"ire(curvature={name!r}).update()"

  if curvature == "grad_sq":
    # The EMA of g² is ranked as it is; otherwise the (data-parallel mean)
    # gradient is squared inside the selection.
    return Estimator("grad_sq", lambda g, p, k, x: _f32_leaves(g), square=ema_decay is None,
                     callbacks=(), needs_params=False, needs_updates=True,
                     random=False)
  if curvature == "fisher":
    why = "params -> logits on the current batch, used to sample labels"
    return Estimator(
        "fisher", lambda g, p, k, x: fisher_diag(
            lambda q: utils.call_callback(x["logits_fn"], q, name="logits_fn",
                                          who=who("fisher"), check=check_logits),
            local(p), k), square=False,
        callbacks=(("logits_fn", why),), needs_params=True,
        needs_updates=False)
  if curvature == "hutchinson":
    n = utils.concrete_value(num_samples)
    if n is None:
      raise TypeError(
          "`num_samples` must be a static int (a loop count); with "
          "optax.inject_hyperparams pass static_args=('num_samples',)."
      )
    why = "params -> gradient of the loss on the current batch, for Hessian-vector products"

    def hutchinson(g, p, k, x):
      grad_fn = x["grad_fn"]
      checked = lambda q: utils.call_callback(
          grad_fn, local(q), name="grad_fn", who=who("hutchinson"),
          check=lambda g: utils.check_gradient(g, q, who=who("hutchinson")))
      return hutchinson_diag(checked, p, k, num_samples=int(n))

    return Estimator("hutchinson", hutchinson, square=False, callbacks=(("grad_fn", why),),
                     needs_params=True, needs_updates=False)
  fn: Callable[..., Any] = curvature  # type: ignore[assignment]  # a callable by now

  def custom(g, p, k, x):
    h = fn(g, local(p), k, **x)
    utils.check_like(h, p, what="the curvature estimate returned by `curvature`",
                     who=who("custom"))
    for leaf in jax.tree.leaves(h):
      dtype = jnp.result_type(leaf)
      if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{who('custom')}: the curvature estimate returned by `curvature` must "
                        f"be real numbers (float or int); got a leaf of dtype {dtype}.")
    return _f32_leaves(h)

  return Estimator("custom", custom, square=False, callbacks=(), needs_params=True,
                   needs_updates=False)
