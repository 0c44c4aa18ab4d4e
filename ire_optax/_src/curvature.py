"""Hessian-diagonal estimators used by IRE to rank coordinates.

IRE only *ranks* coordinates by their curvature, so every estimator here may
be off by a positive constant factor. All estimates are returned as float32
pytrees with the structure of ``params``.

* :func:`grad_sq_diag` -- ``g ⊙ g`` of a gradient you already have (free).
* :func:`fisher_diag` -- Gauss-Newton-Bartlett / sampled Fisher: labels ``ŷ``
  drawn from the model's own predictive distribution, ``h = (∇ CE(f(θ), ŷ))²``.
  One extra forward/backward pass. This is the estimator of Wang et al. (2024).
* :func:`hutchinson_diag` -- ``z ⊙ (H z)`` with Rademacher ``z``: one
  Hessian-vector product (forward-over-reverse through ``grad_fn``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Params = Any


def _f32(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


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
  labels = jax.random.categorical(key, jax.lax.stop_gradient(logits32), axis=-1)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits32, labels))


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
  g = jax.grad(lambda p: sampled_label_loss(logits_fn(p), key))(params)
  return grad_sq_diag(g)
