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

import functools
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import Literal, jaxpr_as_fun

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

# The range of float32, in which hyperparameters are applied: a larger number
# becomes inf there, and a positive number below the smallest normal float32
# becomes 0 (denormals are flushed to zero on CPU and GPU).
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
INT32_MAX = 2**31 - 1


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
    hint = ""
    if getattr(value, "dtype", None) in (jnp.float16, jnp.bfloat16):
      hint = (f" optax.inject_hyperparams casts float hyperparameters to the parameters' "
              f"dtype: pass static_args=({name!r},).")
    raise ValueError(f"`{name}` must be in {lb}{lo}, {hi}{hb}; got {value!r}.{hint}")


def check_int(name: str, value: Any, *, low: int, high: int | None = None) -> None:
  """Raises if a concrete ``value`` is not an integer in ``[low, high]`` (or not a number).

  An integer setting is never a schedule: a callable raises ``TypeError``. A
  float, even an integral one such as ``2.0``, is not an integer
  (``ValueError``). ``high`` is typically :data:`INT32_MAX` for a setting
  compared with an int32 step count.
  """
  if callable(value):
    raise TypeError(f"`{name}` must be an integer >= {low}, not a {type(value).__name__}.")
  check_scalar(name, value)
  if isinstance(value, int):  # exact, also beyond the range of a float
    v: float | int | None = value
  else:
    v = concrete_value(value)
  if v is None:
    return
  floating = jnp.issubdtype(jnp.result_type(value), jnp.floating) and not isinstance(value, int)
  if (floating or not math.isfinite(v) or v != int(v) or v < low
      or (high is not None and v > high)):
    span = f">= {low}" if high is None else f">= {low} and <= {high}"
    raise ValueError(f"`{name}` must be an integer {span}; got {value!r}.")


def check_axis_name(name: str, value: Any) -> None:
  """Raises ``TypeError`` unless ``value`` is ``None``, an axis name (str) or a tuple of them."""
  if value is None or isinstance(value, str):
    return
  if isinstance(value, tuple) and value and all(isinstance(a, str) for a in value):
    return
  raise TypeError(f"`{name}` must be None, an axis name (a str) or a tuple of axis names; got "
                  f"{value!r} ({type(value).__name__}).")


def check_float_tree(tree: Any, *, what: str, who: str, hint: str | None = None) -> None:
  """Raises ``TypeError`` unless every leaf of ``tree`` is a real floating array.

  The optimizers reject complex leaves (their norms, rankings and comparisons
  are defined for real numbers) and integer/bool leaves (which have no
  gradient step); checked at trace time, on the first ``update``. ``hint``
  replaces the optimizers' advice in the message.
  """
  for x in jax.tree.leaves(tree):
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      if hint is None:
        hint = (" Complex parameters are not supported: optimize the real and imaginary parts "
                "as two real leaves." if jnp.issubdtype(dtype, jnp.complexfloating) else
                " Keep integer/bool leaves out of the optimizer: with optax.masked or "
                "optax.partition (and optax.set_to_zero), except around an optimizer that "
                "evaluates the model on the whole tree (SAM, mSAM, GSAM, SALA, IRE with fisher "
                "or hutchinson, or over one of them), which cannot run inside optax.masked: "
                "pass it the floating parameters only (e.g. nnx.split(model, nnx.Param, ...)).")
      raise TypeError(f"{who}: every leaf of `{what}` must be a real floating array; got a "
                      f"leaf of dtype {dtype}.{hint}")


def check_like(out: Any, like: Any, *, what: str, who: str, hint: str = "",
               like_name: str = "`params`") -> None:
  """Raises unless ``out`` has the tree structure and leaf shapes of ``like``.

  For what a callback returns (``grad_fn``'s gradient or aux output, a curvature estimate):
  ``ValueError`` naming ``what``, ``who`` and ``like_name``, with ``hint`` appended. Tree
  structures are compared by their printed form, so trees whose node types compare by
  identity (as some model-state containers do) still match. The message says where the
  trees differ (a few key paths, never the whole trees); Flax NNX ``Variable`` wrappers in
  ``out`` (the output of ``nnx.grad``) get their own explanation.
  """
  if str(jax.tree.structure(out)) != str(jax.tree.structure(like)):
    if has_nnx_variables(out) and not has_nnx_variables(like):
      raise ValueError(
          f"{who}: {what} holds Flax NNX Variables (nnx.Param, ...), as nnx.grad returns, where "
          f"{like_name} are plain arrays. {nnx_fix('grad_fn')}")
    raise ValueError(f"{who}: {what} must have the tree structure of {like_name}; "
                     f"{tree_difference(out, like, like_name)}.{hint}")
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(like), strict=True):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(f"{who}: {what} must have the shapes of {like_name}; got a leaf of shape "
                       f"{jnp.shape(a)} where {like_name} has shape {jnp.shape(b)}.{hint}")


def check_gradient(out: Any, like: Any, *, who: str) -> Any:
  """Returns ``out`` (what ``grad_fn`` returned) after checking it is a gradient like ``like``."""
  check_like(out, like, what="the gradient returned by `grad_fn`", who=who,
             hint=" `grad_fn` must return only the gradient, a pytree like `params` (for a "
             "loss with auxiliary outputs, drop them: lambda p: jax.grad(loss, has_aux=True)"
             "(p)[0]).")
  return out


# -----------------------------------------------------------------------------
# Callbacks (grad_fn, logits_fn): the mistakes they are checked for
# -----------------------------------------------------------------------------

def nnx_fix(name: str) -> str:
  """How a Flax NNX user writes the callback ``name`` (``grad_fn`` or ``logits_fn``)."""
  call = ("jax.grad(lambda q: loss_fn(nnx.merge(graphdef, q, rest, copy=True), batch))(p)"
          if name == "grad_fn" else "nnx.merge(graphdef, p, rest, copy=True)(x)")
  helper = ("grad_fn(model, loss_fn, batch)" if name == "grad_fn" else
            "of_params(model, lambda m: m(x))")
  return (f"`{name}` gets the parameters (with nnx.Optimizer an nnx.State of arrays), not the "
          f"Module: use ire_optax.nnx.{helper} (docs/nnx.md), or lambda p: {call} with "
          "graphdef, _, rest = nnx.split(model, nnx.Param, ...); rest = nnx.as_pure(rest) "
          "before the clean pass (its dropout masks).")


def is_nnx_variable(x: Any) -> bool:
  """Whether ``x`` is a Flax NNX ``Variable`` (``nnx.Param``, ...), without importing Flax."""
  return any(c.__name__ == "Variable" and c.__module__.split(".")[0] == "flax"
             for c in type(x).__mro__)


def has_nnx_variables(tree: Any) -> bool:
  """Whether any node of ``tree`` is a Flax NNX ``Variable``."""
  return any(is_nnx_variable(x) for x in jax.tree.leaves(tree, is_leaf=is_nnx_variable))


def _short(text: str, limit: int = 80) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def tree_difference(out: Any, like: Any, like_name: str = "`params`") -> str:
  """How the tree of ``out`` differs from that of ``like``, in a line (a few key paths at most)."""
  paths = lambda t: [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(t)]
  got, want = paths(out), paths(like)
  missing = [p for p in want if p not in set(got)]
  extra = [p for p in got if p not in set(want)]
  show = lambda ps: ", ".join(_short(p or "(the root)") for p in ps[:2]) + (
      f" and {len(ps) - 2} more" if len(ps) > 2 else "")
  parts = [f"got {len(got)} leaves where {like_name} has {len(want)}"]
  if missing:
    parts.append(f"missing {show(missing)}")
  if extra:
    parts.append(f"unexpected {show(extra)}")
  if not missing and not extra:
    parts.append(f"the same key paths in other containers (a {type(out).__name__} at the root, "
                 f"where {like_name} is a {type(like).__name__})")
  return "; ".join(parts)


def _depends_on_inputs(jaxpr: Any, num_inputs: int) -> bool:
  """Whether an output of ``jaxpr`` depends on one of its first ``num_inputs`` inputs.

  Conservative: an equation with a dependent input makes all its outputs dependent (also
  ``cond``, ``scan``, ``pjit``, ..., whose sub-jaxprs get their operands as inputs).
  """
  dependent = set(jaxpr.invars[:num_inputs])
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, Literal) and v in dependent for v in eqn.invars):
      dependent.update(eqn.outvars)
  return any(not isinstance(v, Literal) and v in dependent for v in jaxpr.outvars)


_TRACER_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                  jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


def _check_arity(fn: Callable, given: int, *, name: str, who: str) -> None:
  """Raises ``TypeError`` if ``fn`` cannot be called with ``given`` positional arguments."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):  # no signature (a builtin): calling it will tell
    return
  try:
    signature.bind(*range(given))
  except TypeError as e:
    called, gets, fix = (("params", "the parameters", "lambda p: jax.grad(loss_fn)(p, batch)")
                         if given == 1 else ("params, batch", "the parameters and a batch",
                                             "lambda p, b: jax.grad(loss_fn)(p, b)"))
    raise TypeError(
        f"{who}: `{name}{signature}` cannot be called as `{name}({called})` ({e}). Here "
        f"`{name}` gets {gets} only (optax.contrib.sam's `grad_fn(params, i)` gets an index "
        f"too): close over anything else, e.g. `{name}={fix}`.") from None


def call_callback(fn: Callable, params: Any, *args: Any, name: str, who: str,
                  check: Callable[[Any], Any] | None = None) -> Any:
  """``fn(params, *args)`` (a ``grad_fn`` or ``logits_fn``), refused if it ignores ``params``.

  ``fn`` is traced once to a jaxpr, at the abstract values of its inputs, and the jaxpr is
  evaluated on them: the same computation as calling ``fn``, no run-time cost. ``check``
  (if given) validates the output first. ``fn`` is called once, with tracers also when the
  update runs eagerly (called eagerly, a callback that needs concrete values cannot be
  traced: it is called as it is, unchecked). Raises, at trace time:

  * ``ValueError`` if no output depends on ``params``: a ``grad_fn`` that differentiates a
    model or parameters it closes over would silently turn SAM into its base optimizer;
  * ``TypeError`` naming the fix if ``fn`` treats the parameters it gets, an ``nnx.State``,
    as a Flax NNX Module (calls it or reads its layers' attributes), and ``ValueError`` if
    it uses a Module or Variable of the caller's trace (a model it closes over);
  * ``TypeError`` naming the fix if ``fn`` needs more positional arguments than it is given
    (``optax.contrib.sam``'s ``grad_fn(params, i)``).
  """
  _check_arity(fn, 1 + len(args), name=name, who=who)
  try:
    # A new function object each time: no trace cached from another call (whose closure
    # may hold other values) is reused.
    closed, shape = jax.make_jaxpr(lambda *a: fn(*a), return_shape=True)(params, *args)
  except _TRACER_ERRORS:
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((params, args))):
      raise
    # Called eagerly, a callback that needs concrete values (NumPy, Python control flow)
    # cannot be traced: it is called as it is, unchecked.
    out = fn(params, *args)
    if check is not None:
      check(out)
    return out
  except Exception as e:
    flax_params = type(params).__module__.split(".")[0] == "flax"
    if flax_params and f"'{type(params).__name__}' object" in str(e):
      raise TypeError(f"{who}: `{name}` treats its argument as a Module ({_short(str(e))}). "
                      f"{nnx_fix(name)}") from e
    if "different trace level" in str(e):
      # Flax refuses a Module or Variable of the caller's trace used inside the callback.
      raise ValueError(f"{who}: `{name}` uses a Flax NNX Module or Variable it closes over "
                       f"({_short(str(e))}). {nnx_fix(name)}") from e
    raise
  flat = jaxpr_as_fun(closed)(*jax.tree.leaves((params, *args)))
  out = jax.tree.unflatten(jax.tree.structure(shape), flat)
  if check is not None:
    check(out)
  # A tree without elements has nothing to depend on.
  num_params = len(jax.tree.leaves(params))
  if (any(jnp.size(x) for x in jax.tree.leaves(params))
      and not _depends_on_inputs(closed.jaxpr, num_params)):
    effect = ("the ascent would change nothing: SAM would silently be its base optimizer"
              if name == "grad_fn" else "the curvature estimate would be zero")
    raise ValueError(
        f"{who}: what `{name}` returns does not depend on its argument, the parameters it is "
        f"called with, so {effect}. It probably evaluates a model or parameters it closes "
        f"over. {nnx_fix(name)} (A loss linear in them: use the base optimizer alone.)")
  return out


# The keyword argument by which ire() hands its amplification to a wrapper that
# is not a plain step (e.g. SALA): the wrapper applies it to its base optimizer's step.
IRE_AMPLIFY_KWARG = "ire_amplify"
_AMPLIFY_CONSUMERS: list[type] = []


def applies_ire_amplification(state_cls: type) -> type:
  """Declares that the transformation with states ``state_cls`` applies IRE's amplification.

  A wrapper whose update is not one plain step (SALA: base steps and jumps back to slow
  weights) registers its state class here; ``ire()`` over a state holding one passes the
  amplification ``tree -> tree`` as the keyword argument ``IRE_AMPLIFY_KWARG`` instead of
  amplifying the wrapper's output, and the wrapper applies it to its base step only.
  Returns ``state_cls`` (usable as a class decorator).
  """
  if state_cls not in _AMPLIFY_CONSUMERS:
    _AMPLIFY_CONSUMERS.append(state_cls)
  return state_cls


def applies_amplification_inside(state: Any) -> bool:
  """Whether ``state`` holds the state of a transformation that applies IRE's amplification."""
  return any(find_states(state, cls) for cls in _AMPLIFY_CONSUMERS)


def compute_dtype(*trees: Any) -> Any:
  """The dtype the transformations compute in: the widest of float32 and the trees' floats.

  float32 for float32/bfloat16/float16 (and integer) leaves, float64 when a
  leaf is float64 (``jax_enable_x64``).
  """
  dtype = jnp.dtype(jnp.float32)
  for x in jax.tree.leaves(trees):
    d = jnp.result_type(x)
    if jnp.issubdtype(d, jnp.floating):
      dtype = jnp.promote_types(dtype, d)
  return dtype


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
    # An optimizer's update is often called by a wrapper that drops extra arguments.
    hint = (f" Pass it to `tx.update(grads, opt_state, params, {name}=...)`; a wrapper that "
            "calls `tx.update(grads, opt_state, params)` for you, such as Flax Linen's "
            "`TrainState.apply_gradients`, does not forward it (docs/nnx.md, 'Flax Linen')."
            if who.endswith(".update()") else "")
    raise TypeError(
        f"{who} needs the keyword argument `{name}` ({why}); it was not given.{hint}")
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


def resolve(value: ScalarOrSchedule, count: jax.Array, *, low: float | None = None,
            high: float | None = None, dtype: Any = jnp.float32) -> jax.Array:
  """Evaluates a schedule at ``count`` (or takes the constant) as ``dtype``, clipped to
  [low, high]: float32, or the transformation's :func:`compute_dtype` (float64 for float64
  parameters, so that a constant such as ρ = 0.1 is not rounded to float32's 0.100000001).

  The one place every schedule-able hyperparameter is evaluated: a schedule's
  value outside the documented range of its hyperparameter (a negative κ or ρ,
  a SALA step size above 1) is clipped into it, as a constant outside it would
  have been rejected at construction (a constant or an injected value in range
  is unchanged). NaN stays NaN.
  """
  v = jnp.asarray(value(count) if callable(value) else value, dtype=dtype)
  if low is None and high is None:
    return v
  return jnp.clip(v, low, high)


# -----------------------------------------------------------------------------
# Pytree arithmetic (float32 reductions)
# -----------------------------------------------------------------------------


def tree_sum_sq(tree: Any) -> jax.Array:
  """Sum of squares over all leaves, accumulated in :func:`compute_dtype` (float32 or wider)."""
  dtype = compute_dtype(tree)
  return sum((jnp.sum(jnp.square(jnp.asarray(x, dtype))) for x in jax.tree.leaves(tree)),
             jnp.zeros((), dtype))


def tree_max_abs(tree: Any, *, axis_name: str | None = None) -> jax.Array:
  """``max |x|`` over all leaves (0 for a tree without elements), in :func:`compute_dtype`."""
  dtype = compute_dtype(tree)
  m = jnp.zeros((), dtype)
  for x in jax.tree.leaves(tree):
    if jnp.size(x):
      m = jnp.maximum(m, jnp.max(jnp.abs(jnp.asarray(x, dtype))))
  return m if axis_name is None else jax.lax.pmax(m, axis_name)


def safe_scale(m: jax.Array) -> jax.Array:
  """A divisor for values of magnitude up to ``m``: ``m`` clipped to ``[2**-120, 2**120]``
  (float32; float64: ``[2**-1016, 2**1016]``, eight binades inside its normal range).

  Dividing by it brings the values to at most 256 in magnitude without
  overflow, and its reciprocal is a normal number of ``m``'s dtype (XLA divides by
  multiplying with the reciprocal, and flushes denormals to zero: ``x / 3e38`` is
  0 on CPU). ``m = 0``, inf or NaN gives 1, so the values pass unchanged and a
  NaN/inf still shows in what is computed from them.
  """
  m = jnp.asarray(m)
  limit = 2.0 ** (int(jnp.finfo(m.dtype).maxexp) - 8)
  ok = (m > 0) & jnp.isfinite(m)
  return jnp.where(ok, jnp.clip(m, 1.0 / limit, limit), jnp.ones_like(m))


def _norm_scales(dtype: Any) -> tuple[float, float, float]:
  """``(big, small, low)`` of :func:`tree_scaled_sum_sq` for ``dtype``: powers of two."""
  emax = int(jnp.finfo(dtype).maxexp)  # 128 for float32, 1024 for float64
  return 2.0 ** (3 * emax // 4), 2.0 ** -(emax // 2 + emax // 16), 2.0 ** -(emax // 2)


def tree_scaled_sum_sq(tree: Any, *, axis_name: str | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  r"""``(s, q)`` with :math:`\lVert x \rVert_2 = s \sqrt{q}`, without overflow or underflow.

  :math:`\lVert x / s \rVert_2 = \sqrt{q}` has no overflow or underflow for any finite
  tree. On TPU and GPU (every platform but the CPU) ``s`` is a power of two, so ``x / s`` is
  exact, and every leaf is read once, by one reduction to three sums of squares: plain,
  scaled down and scaled up by fixed powers of two (float32: :math:`\Sigma x^2`,
  :math:`\Sigma (2^{-96} x)^2`, :math:`\Sigma (2^{72} x)^2`). The plain sum is used when
  it is finite and at least :math:`2^{-64}` (the squares it flushes to zero then weigh less
  than :math:`n\,2^{-62}` of it), the scaled-down one when it overflowed, else the
  scaled-up one (every entry is then below :math:`2^{-32}`); float64: the same with
  :math:`2^{-768}`, :math:`2^{576}`, :math:`2^{-512}`. One reduction (not three) per leaf
  lets XLA fuse it with the leaf's other work (on TPU: into the optimizer's per-leaf
  kernel). On the CPU, ``s`` is ``max |x|`` (:func:`safe_scale`) and :math:`q = \Sigma
  (x/s)^2`: two passes. A NaN gives ``q`` NaN, an inf ``q`` inf, a zero tree ``q = 0``. In
  :func:`compute_dtype`; with ``axis_name`` the sums are ``psum``-ed (a tree *partitioned*
  over that axis).
  """
  leaves = [jnp.asarray(x, compute_dtype(tree)) for x in jax.tree.leaves(tree)]
  # XLA:TPU and XLA:GPU fuse the broadcast into each leaf's other work. XLA:CPU at jax 0.8.2
  # materializes it (three parameter buffers of peak memory), and so it does the three sums
  # written apart; as one variadic reduction, its SPMD partitioner all-gathers the partial
  # sums instead of adding them with an all-reduce. So the CPU reads the leaves twice.
  return jax.lax.platform_dependent(
      leaves, cpu=functools.partial(_sum_sq_two_passes, axis_name=axis_name),
      default=functools.partial(_sum_sq_one_pass, axis_name=axis_name))


def _sum_sq_one_pass(leaves: list[jax.Array], *, axis_name: str | None
                     ) -> tuple[jax.Array, jax.Array]:
  """:func:`tree_scaled_sum_sq` on TPU and GPU (leaves in :func:`compute_dtype`)."""
  dtype = compute_dtype(leaves)
  big, small, low = _norm_scales(dtype)
  f = jnp.asarray((1.0, 1.0 / big, 1.0 / small), dtype)  # a [3, *shape] broadcast per leaf
  total = sum((jnp.sum(jnp.square(f.reshape((3,) + (1,) * x.ndim) * x),
                       axis=tuple(range(1, x.ndim + 1))) for x in leaves), jnp.zeros((3,), dtype))
  mid, high, tiny = total if axis_name is None else jax.lax.psum(total, axis_name)
  use_mid = jnp.isfinite(mid) & (mid >= low)
  over = mid == jnp.inf
  q = jnp.where(use_mid, mid, jnp.where(over, high, tiny))
  # s from q's operands, not from Python scalars: under vmap inside a cond (msam's vectorised
  # micro-batches, lax.platform_dependent), a scalar operand of where is broadcast with the
  # batch's sharding, which fails for a batch sharded over a mesh axis.
  one = jnp.ones_like(mid)
  return jnp.where(use_mid, one, jnp.where(over, one * big, one * small)), q


def _sum_sq_two_passes(leaves: list[jax.Array], *, axis_name: str | None
                       ) -> tuple[jax.Array, jax.Array]:
  """:func:`tree_scaled_sum_sq` on the CPU: ``max |x|``, then the squares scaled by it."""
  m = safe_scale(tree_max_abs(leaves, axis_name=axis_name))
  q = tree_sum_sq([x / m for x in leaves])
  return m, q if axis_name is None else jax.lax.psum(q, axis_name)


def tree_norm(tree: Any, *, axis_name: str | None = None) -> jax.Array:
  """Global L2 norm, without overflow or underflow; with ``axis_name`` over all devices.

  Computed as ``s · sqrt(q)`` (:func:`tree_scaled_sum_sq`: one pass over the leaves on TPU
  and GPU, two on the CPU; the squares of values above ~1.8e19 overflow float32), in
  :func:`compute_dtype`. NaN anywhere gives NaN, ±inf gives inf, a zero tree gives 0. Use
  ``axis_name`` only when the tree is *partitioned* across that axis (each device holds a
  different piece), not when it is replicated.
  """
  s, q = tree_scaled_sum_sq(tree, axis_name=axis_name)
  return s * jnp.sqrt(q)


def tree_cast_like(tree: Any, like: Any) -> Any:
  """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: jnp.asarray(x).astype(jnp.asarray(y).dtype), tree, like)


def tree_add_scaled(x: Any, scale: jax.Array, y: Any) -> Any:
  """``x + scale * y`` computed in the wider of float32 and ``x``'s dtype, returned in ``x``'s."""

  def one(a, b):
    dtype = compute_dtype(a)
    return (jnp.asarray(a, dtype) + scale * jnp.asarray(b, dtype)).astype(jnp.asarray(a).dtype)

  return jax.tree.map(one, x, y)


def cond(pred: jax.Array, true_fn: Any, false_fn: Any, *, hint: bool | None = None) -> Any:
  """``lax.cond`` that runs only the taken branch, also outside ``jit``, steered by a hint.

  ``hint`` is the caller's static knowledge of ``pred`` (a Python bool), for a train loop
  that knows which steps do the occasional work:

  * ``None`` (no hint): ``jax.lax.cond`` under tracing -- exact, only the taken branch runs.
    On XLA:GPU every executed conditional copies its predicate to the host first (a host
    round trip each step), and a branch that passes an operand through copies it.
  * ``True``: both branches are traced at the level of the caller and the result is
    selected with ``jnp.where(pred, ...)``: the values of ``lax.cond`` whatever ``pred``
    is (a wrong ``True`` costs the ``true_fn`` work, never a different result), with no
    conditional (XLA:CPU runs some work many times slower inside a branch).
  * ``False``: a promise that ``pred`` is false. Only ``false_fn`` is traced: no
    conditional, no host round trip, nothing copied. **A wrong** ``False`` **returns**
    ``false_fn()`` **where** ``pred`` **is true**: the occasional work of that step is
    skipped (see each optimizer's hint for what that means there).

  With a concrete predicate (eager execution) the taken branch is called directly, whatever
  the hint, which avoids compiling both branches on every call. See ``docs/performance.md``.
  """
  if hint is not None and not isinstance(hint, (bool, np.bool_)):
    raise TypeError(f"a branch hint must be a static Python bool or None; got "
                    f"{type(hint).__name__} (pass it as a static argument of jit).")
  if isinstance(pred, jax.core.Tracer):
    if hint is None:
      return jax.lax.cond(pred, true_fn, false_fn)
    if hint:
      taken, other = true_fn(), false_fn()
      return jax.tree.map(lambda a, b: jnp.where(pred, a, b), taken, other)
    return false_fn()
  return true_fn() if bool(pred) else false_fn()


def pmean_if(tree: Any, axis_name: str | None) -> Any:
  """``lax.pmean`` over ``axis_name`` if given, identity otherwise."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def varying_axes(x: Any) -> frozenset:
  """The mapped axes ``x`` varies over (``shard_map``'s ``check_vma`` types; else none)."""
  aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)  # type: ignore[attr-defined]
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(getattr(mat, "varying", ()))
  return frozenset(getattr(aval, "vma", ()))


def tree_varying_axes(tree: Any) -> frozenset:
  """The mapped axes any leaf of ``tree`` varies over (:func:`varying_axes`)."""
  return frozenset().union(*map(varying_axes, jax.tree.leaves(tree)))


def check_axes_named(tree: Any, *axis_names: Any, who: str, what: str, hint: str) -> None:
  """Raises ``ValueError`` if a leaf of ``tree`` varies over a mapped axis (inside
  ``shard_map`` with ``check_vma=True``) that none of ``axis_names`` (each None, one axis or a
  tuple of them) names: an update that forgot its ``axis_name`` would otherwise fail later
  inside ``lax.cond``, or train each device on its own where the step takes no conditional."""
  named = {a for n in axis_names if n is not None for a in axes_of(n)}
  unnamed = tree_varying_axes(tree) - named
  if unnamed:
    axes = ", ".join(repr(a) for a in sorted(unnamed, key=str))
    raise ValueError(f"{who}: {what} varies over the mapped axis {axes} (inside shard_map), "
                     f"which the optimizer was not given: {hint}")


def axes_of(axis_name: Any) -> tuple:
  """``axis_name`` (one mapped axis, or a tuple of them) as a tuple of axis names."""
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def has_masked_nodes(tree: Any) -> bool:
  """Whether ``tree`` holds ``optax.MaskedNode`` leaves (the parameters ``optax.masked`` /
  ``optax.partition`` keep from the transformation inside them)."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return any(is_masked(x) for x in jax.tree.leaves(tree, is_leaf=is_masked))


def vma_typed(axis_name: Any) -> bool:
  """Whether values are typed by the mapped axes they vary over, here: inside ``shard_map``
  with ``check_vma=True`` over ``axis_name`` (not under ``pmap``, ``check_vma=False`` or
  ``jax.vmap``)."""
  return bool(set(axes_of(axis_name))
              & varying_axes(per_device_if(jnp.zeros((), jnp.float32), axis_name)))


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
  already vary over the axis are returned unchanged, and so is every leaf under
  ``jax.vmap(..., axis_name=...)``, whose axes carry no such types. A tuple of
  axes casts each axis the leaf does not vary over yet.
  """
  if axis_name is None:
    return tree
  manual = frozenset(jax.sharding.get_abstract_mesh().manual_axes)  # shard_map's and pmap's
  axes = tuple(a for a in axes_of(axis_name) if a in manual)
  return jax.tree.map(lambda x: _cast_varying(x, axes), tree)


def vary_like(x: Any, ref: Any) -> Any:
  """``x`` cast to vary over every mapped axis that ``ref`` varies over (``check_vma``).

  For the operands of a primitive that needs matching types: a replicated PRNG key used
  with per-device values (``jax.random.categorical`` refuses the mix from JAX 0.12 on).
  """
  return _cast_varying(x, tuple(sorted(varying_axes(ref), key=str)))


def _cast_varying(x: Any, axes: tuple) -> Any:
  """``x`` marked as varying over those of ``axes`` it does not vary over yet."""
  missing = tuple(a for a in axes if a not in varying_axes(x))
  if not missing:
    return x
  pcast = getattr(jax.lax, "pcast", None)
  if pcast is not None:
    return pcast(x, missing, to="varying")
  pvary = getattr(jax.lax, "pvary", None)  # JAX < 0.8
  return x if pvary is None else pvary(x, missing)


def resolve_leaf_mask(mask: Any, *, name: str, verb: str, none_selected: str
                      ) -> Callable[[Any], Any]:
  """Checks a leaf mask argument and returns ``params -> one bool per leaf`` (``None`` for no
  mask).

  ``mask`` is, as for :func:`optax.masked`, ``None`` (every leaf), a pytree of Python bools
  with the structure of the params or a prefix of it (``True``: this leaf or subtree), or a
  function ``params ->`` such a pytree. The bools are fixed when the step is traced. A mask
  that selects nothing warns (``none_selected`` says what that does): under
  :func:`optax.inject_hyperparams` a mask function is taken for a schedule.
  """
  def check_leaves(m: Any) -> None:
    for leaf in jax.tree.leaves(m):
      if not isinstance(leaf, (bool, np.bool_)):
        raise TypeError(f"`{name}` leaves must be Python bools (True: {verb} this leaf), fixed "
                        f"when the step is traced; got {type(leaf).__name__}.")

  if mask is None:
    return lambda params: None
  if not callable(mask):
    check_leaves(mask)

  def full(params: Any) -> Any:
    m = mask(params) if callable(mask) else mask
    check_leaves(m)
    try:
      out = jax.tree.map(lambda b, sub: jax.tree.map(lambda _: bool(b), sub), m, params)
    except (ValueError, TypeError) as e:
      raise ValueError(f"`{name}` must have the structure of the params (or a prefix of it), "
                       f"one bool per leaf or subtree: {e}") from e
    inject = ("Under optax.inject_hyperparams, a mask function is taken for a schedule and "
              f"called with the step count: pass static_args=('{name}',).")
    if jax.tree.leaves(params) and not any(jax.tree.leaves(out)):
      warnings.warn(f"`{name}` selects no parameter, so {none_selected}. {inject}",
                    stacklevel=3)
    elif isinstance(mask, (bool, np.bool_)) and len(jax.tree.leaves(params)) > 1:
      # A True passed as the mask itself (not returned by a mask function) for a tree of
      # several leaves means `None`, and it is what inject_hyperparams passes when it called a
      # mask function with the step count.
      warnings.warn(f"`{name}` is the single bool True, which selects every leaf (as `None` "
                    f"does). {inject}", stacklevel=3)
    return out

  return full


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
