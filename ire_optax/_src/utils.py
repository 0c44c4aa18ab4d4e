"""Helpers shared by the ire_optax transformations.

Everything here is a small pure function over pytrees. Conventions used by
all transformations of the library:

* Reductions (norms, dot products, rankings) are computed in float32 whatever
  the parameters' dtype; returned updates keep the dtype of the updates they
  replace.
* Hyperparameters that the papers vary over training accept an
  ``optax.Schedule`` (a function of the step count) or a number.
* Validation of a hyperparameter happens at construction time when its value
  is a concrete Python/NumPy number. Values that are JAX tracers (for example
  when the factory is called by :func:`optax.inject_hyperparams` inside a
  jitted ``update``) cannot be checked and are trusted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


# -----------------------------------------------------------------------------
# Validation
# -----------------------------------------------------------------------------


def concrete_value(value: Any) -> float | None:
  """Returns ``value`` as a Python float if it is concrete, else ``None``.

  Callables (schedules) and JAX tracers return ``None``: they cannot be
  checked at construction time.
  """
  if callable(value) or isinstance(value, bool):
    return None
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
  """Raises ``ValueError`` naming ``name`` if a concrete ``value`` is out of range.

  NaN and infinities are out of every range. A bool, a string or an array that
  is not a real scalar raises ``TypeError``/``ValueError`` (see
  :func:`check_scalar`). Callables (schedules) and tracers are not checked.
  """
  check_scalar(name, value)
  v = concrete_value(value)
  if v is None:
    return
  ok = math.isfinite(v)
  if ok and low is not None:
    ok = v >= low if low_inclusive else v > low
  if ok and high is not None:
    ok = v <= high if high_inclusive else v < high
  if not ok:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    lb = "[" if low_inclusive and low is not None else "("
    hb = "]" if high_inclusive and high is not None else ")"
    raise ValueError(f"`{name}` must be in {lb}{lo}, {hi}{hb}; got {value!r}.")


def check_int(name: str, value: Any, *, low: int) -> None:
  """Raises if a concrete ``value`` is not an integer ``>= low`` (or is not a number at all).

  An integer setting is never a schedule: a callable raises ``TypeError``.
  """
  if callable(value):
    raise TypeError(f"`{name}` must be an integer >= {low}, not a {type(value).__name__}.")
  check_scalar(name, value)
  v = concrete_value(value)
  if v is None:
    return
  if not math.isfinite(v) or v != int(v) or v < low:
    raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}.")


def check_transformation(name: str, value: Any) -> None:
  """Raises ``TypeError`` unless ``value`` looks like an Optax transformation."""
  if not (hasattr(value, "init") and hasattr(value, "update")):
    raise TypeError(
        f"`{name}` must be an optax.GradientTransformation (with `init` and "
        f"`update`); got {type(value).__name__}."
    )


def require_callable(name: str, value: Any, *, who: str, why: str) -> Callable:
  """Returns ``value`` if callable, else raises a ``TypeError`` that explains.

  The one error for a missing or non-callable callback (``grad_fn``,
  ``logits_fn``): ``who`` names the call that needs it, e.g. ``"sam.update()"``.
  """
  if value is None:
    raise TypeError(
        f"{who} needs the keyword argument `{name}` ({why}); it was not given."
    )
  if not callable(value):
    raise TypeError(f"{who}: `{name}` must be callable; got {type(value).__name__}.")
  return value


def check_static_int(name: str, value: Any, *, low: int = 1) -> int:
  """Returns ``value`` as an int; it must be a concrete Python/NumPy integer ``>= low``.

  For integer settings that fix shapes or loop counts: a float, a bool, a
  tracer or a schedule raises ``ValueError``.
  """
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(
        f"`{name}` must be a static integer >= {low}; got {value!r} "
        f"(of type {type(value).__name__})."
    )
  check_int(name, value, low=low)
  return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")


def find_states(state: Any, cls: type) -> list[Any]:
  """Every sub-state of type ``cls`` in a (nested) optimizer state, outermost first.

  Looks through ``optax.chain``, wrappers such as :func:`ire_optax.ire`,
  ``optax.MultiSteps``, ``optax.inject_hyperparams`` and any other pytree.
  """
  return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
          if isinstance(s, cls)]


# -----------------------------------------------------------------------------
# Schedules
# -----------------------------------------------------------------------------


def resolve(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """Evaluates a schedule at ``count``, or returns the constant as an array."""
  if callable(value):
    return jnp.asarray(value(count), dtype=jnp.float32)
  return jnp.asarray(value, dtype=jnp.float32)


# -----------------------------------------------------------------------------
# Pytree arithmetic (float32 reductions)
# -----------------------------------------------------------------------------


def tree_sum_sq(tree: Any) -> jax.Array:
  """Sum of squares over all leaves, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return sum((jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves),
             jnp.zeros((), jnp.float32))


def tree_norm(tree: Any, *, axis_name: str | None = None) -> jax.Array:
  """Global L2 norm in float32; with ``axis_name`` the squares are ``psum``-ed.

  Use ``axis_name`` only when the tree is *partitioned* across that axis
  (each device holds a different piece), not when it is replicated.
  """
  sq = tree_sum_sq(tree)
  if axis_name is not None:
    sq = jax.lax.psum(sq, axis_name)
  return jnp.sqrt(sq)


def tree_cast_like(tree: Any, like: Any) -> Any:
  """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: jnp.asarray(x).astype(jnp.asarray(y).dtype), tree, like)


def tree_add_scaled(x: Any, scale: jax.Array, y: Any) -> Any:
  """``x + scale * y`` computed in float32, returned in ``x``'s dtypes."""
  return jax.tree.map(
      lambda a, b: (jnp.asarray(a, jnp.float32) + scale * jnp.asarray(b, jnp.float32)).astype(
          jnp.asarray(a).dtype
      ),
      x,
      y,
  )


def cond(pred: jax.Array, true_fn: Any, false_fn: Any) -> Any:
  """``lax.cond`` that runs only the taken branch, also outside ``jit``.

  Under tracing this is ``jax.lax.cond`` (only the taken branch executes). With
  a concrete predicate (eager execution) the branch is called directly, which
  avoids compiling both branches on every call.
  """
  if isinstance(pred, jax.core.Tracer):
    return jax.lax.cond(pred, true_fn, false_fn)
  return true_fn() if bool(pred) else false_fn()


def pmean_if(tree: Any, axis_name: str | None) -> Any:
  """``lax.pmean`` over ``axis_name`` if given, identity otherwise."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def _varying_axes(x: Any) -> frozenset:
  aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)  # type: ignore[attr-defined]
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(getattr(mat, "varying", ()))
  return frozenset(getattr(aval, "vma", ()))


def per_device_if(tree: Any, axis_name: str | None) -> Any:
  """Marks the leaves of ``tree`` as varying over ``axis_name`` (idempotent).

  Under ``shard_map`` with ``check_vma=True`` (the default), JAX differentiates
  an input that is *replicated* over ``axis_name`` with an implicit ``psum``:
  ``jax.grad(loss)(params, local_batch)`` returns the **sum** of the devices'
  gradients. The transformations call their callbacks (``grad_fn``,
  ``logits_fn``) at points built from replicated parameters; casting those
  points to "varying" first makes the callbacks return the per-device gradient
  that the ``axis_name`` convention expects (and that ``pmap`` or
  ``check_vma=False`` give anyway, where this is the identity). Leaves that
  already vary over the axis are returned unchanged.
  """
  if axis_name is None:
    return tree
  pcast = getattr(jax.lax, "pcast", None)

  def cast(x):
    if axis_name in _varying_axes(x):
      return x
    if pcast is not None:
      return pcast(x, axis_name, to="varying")
    pvary = getattr(jax.lax, "pvary", None)  # JAX < 0.8
    return x if pvary is None else pvary(x, axis_name)

  return jax.tree.map(cast, tree)


def check_scalar(name: str, value: Any) -> None:
  """Raises unless ``value`` is a real number (a scalar), a schedule or a tracer.

  ``TypeError`` for a bool, a string or a non-numeric/complex dtype (they would
  otherwise be silently converted); ``ValueError`` for an array with more than
  one element. Callables pass (schedules), and so do scalar tracers (values
  injected by :func:`optax.inject_hyperparams`).
  """
  if callable(value):
    return
  if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
    raise TypeError(f"`{name}` must be a real number; got {value!r} ({type(value).__name__}).")
  try:
    shape, dtype = np.shape(value), jnp.result_type(value)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"`{name}` must be a real number; got a {type(value).__name__}.") from e
  if shape != ():
    raise ValueError(f"`{name}` must be a scalar; got an array of shape {shape}.")
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f"`{name}` must be a real number; got dtype {dtype}.")


def check_not_schedule(name: str, value: Any, why: str = "it is a constant") -> None:
  """Raises ``TypeError`` if ``value`` is callable where only a number is accepted."""
  if callable(value):
    raise TypeError(f"`{name}` must be a number, not a schedule ({why}); got "
                    f"{type(value).__name__}.")


def check_bool(name: str, value: Any) -> None:
  """Raises ``TypeError`` unless ``value`` is a bool (a truthy string is not ``True``)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be True or False; got {value!r} ({type(value).__name__}).")
