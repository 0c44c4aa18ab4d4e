"""Flax NNX glue: the callbacks of the ire_optax optimizers, built from a Module and a loss.

Needs Flax (``pip install "ire_optax[nnx]"``); ``import ire_optax`` does not import it.

The optimizers evaluate the model at parameters of their choosing (SAM's ascent point
:math:`\\theta + \\epsilon`, SALA's slow weights, mSAM's micro-batches), through a callback
that receives the parameters, not the Module. With ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` they are the ``nnx.State`` of the model's ``nnx.Param`` arrays. The
callback rebuilds the model at them with ``nnx.merge(graphdef, params, rest, copy=True)``:
the copy's other state (BatchNorm statistics, RNG counters) starts from the model's and
whatever the callback's forward pass writes into it is dropped, so the perturbed passes
leave the model as it was. These helpers write that once:

* :func:`of_params` -- ``fn(model, *args)`` as ``(params, *args) -> ...`` (a ``logits_fn``);
* :func:`grad_fn` -- the gradient of ``loss_fn(model, *args)`` at ``params`` (a ``grad_fn``
  for :func:`ire_optax.sam`, :func:`ire_optax.gsam`, :func:`ire_optax.sala`,
  :func:`ire_optax.msam` and IRE's ``"hutchinson"``), optionally with the model state
  (BatchNorm statistics) its forward pass computed, for ``msam(has_aux=True)``;
* :func:`value_and_grad` -- ``nnx.value_and_grad`` that also returns that ``grad_fn``;
* :func:`aux_init` -- the matching ``aux_init`` of ``msam``, and :func:`update_stats`,
  which writes the statistics ``msam`` kept into the model;
* :func:`sala_eval_model` -- a copy of the model holding SALA's slow (evaluation) weights.

Complete training loops: ``docs/nnx.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ire_optax._src import sala as sala_lib
from ire_optax._src import sam as sam_lib

__all__ = ["aux_init", "grad_fn", "of_params", "sala_eval_model", "update_stats",
           "value_and_grad"]


def of_params(model: nnx.Module, fn: Callable[..., Any], *bound: Any,
              wrt: Any = nnx.Param) -> Callable[..., Any]:
  """``fn(model, *bound)`` as a function of the parameters: ``(params, *args) -> fn(...)``.

  The returned function merges ``params`` (the state of ``model`` matching ``wrt``) with
  a copy of the model's other state, as it was when ``of_params`` was called, and calls
  ``fn(copy, *bound, *args)``; what ``fn`` writes into the copy is dropped.

  Example:
    >>> import jax.numpy as jnp, optax, ire_optax, ire_optax.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((4, 2))
    >>> logits_fn = ire_optax.nnx.of_params(model, lambda m, x: m(x), x)  # for IRE's Fisher
    >>> logits_fn(nnx.state(model, nnx.Param)).shape
    (4, 3)

  Args:
    model: the Flax NNX Module.
    fn: ``(model, *bound, *args) -> anything``.
    *bound: arguments passed to ``fn`` after the model (e.g. the batch).
    wrt: the filter of the parameters, as given to ``nnx.Optimizer``.
  """
  graphdef, _, rest = nnx.split(model, wrt, ...)  # type: ignore[misc]
  # The values as they are now (the Variables in `rest` are the model's own: a clean pass
  # after this call would otherwise show through, e.g. advanced dropout RNG counters).
  rest = nnx.as_pure(rest)

  def at(params: Any, *args: Any) -> Any:
    try:
      merged = nnx.merge(graphdef, params, rest, copy=True)
    except ValueError as e:  # e.g. "Incorrect number of leaves, expected 10 leaves, but got 6"
      raise ValueError(
          "ire_optax.nnx: the parameters the optimizer passed do not match "
          f"wrt={getattr(wrt, '__name__', wrt)!s} of this helper ({e}); pass the helper the "
          "`wrt` given to nnx.Optimizer.") from e
    return fn(merged, *bound, *args)

  return at


def grad_fn(model: nnx.Module, loss_fn: Callable[..., Any], *bound: Any, wrt: Any = nnx.Param,
            has_aux: bool = False, stats: Any = None) -> Callable[..., Any]:
  """The gradient of ``loss_fn(model, *bound, *args)`` at ``params``: ``(params, *args) -> grads``.

  ``jax.grad`` of :func:`of_params`. For :func:`ire_optax.sam` (ASAM, GSAM, SALA, IRE's
  ``"hutchinson"``) bind the batch, ``grad_fn(model, loss_fn, batch)``, which gives
  ``params -> grads``; for :func:`ire_optax.msam` do not, ``grad_fn(model, loss_fn)`` gives
  ``(params, microbatch) -> grads``.

  Build it at the start of the train step, before the clean pass changes the model: the
  perturbed pass then starts from the model's state of the clean pass (the same dropout
  keys). :func:`value_and_grad` does both at once.

  Example:
    >>> import jax.numpy as jnp, optax, ire_optax, ire_optax.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> loss_fn = lambda model: jnp.mean((model(x) - y) ** 2)
    >>> optimizer = nnx.Optimizer(model, ire_optax.sam(optax.sgd(0.1)), wrt=nnx.Param)
    >>> g = ire_optax.nnx.grad_fn(model, loss_fn)  # loss_fn closes over the batch here
    >>> _ = optimizer.update(model, nnx.grad(loss_fn)(model), grad_fn=g)

  Args:
    model: the Flax NNX Module.
    loss_fn: ``(model, *bound, *args) -> loss`` (a scalar), or ``(loss, aux)`` with
      ``has_aux``.
    *bound: arguments passed to ``loss_fn`` after the model (e.g. the batch).
    wrt: the filter of the parameters, as given to ``nnx.Optimizer``.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the gradient function then returns
      ``(grads, aux)``. ``sam``/``gsam``/``msam(has_aux=True)`` keep that ``aux`` in their
      state: pass them ``aux_init=`` an example of it unless it is a float32 scalar.
    stats: ``None``, or a filter of the model's other state, e.g. ``nnx.BatchStat``: the
      gradient function returns ``(grads, (out, state))``, with ``out`` what ``loss_fn``
      returned and ``state`` the matching state of the model after the forward pass (the
      train-mode BatchNorm statistics of the batch), as arrays. With
      ``msam(has_aux=True, aux_init=ire_optax.nnx.aux_init(model, stats))`` the state keeps
      the clean passes' average, which :func:`update_stats` writes into the model.
  """
  if stats is None:
    return jax.grad(of_params(model, loss_fn, *bound, wrt=wrt), has_aux=has_aux)

  def with_stats(m: nnx.Module, *args: Any) -> Any:
    out = loss_fn(m, *args)
    return (out[0] if has_aux else out), (out, nnx.as_pure(nnx.state(m, stats)))

  return jax.grad(of_params(model, with_stats, *bound, wrt=wrt), has_aux=True)


def value_and_grad(loss_fn: Callable[..., Any], model: nnx.Module, *args: Any,
                   wrt: Any = nnx.Param, has_aux: bool = False) -> tuple[Any, Callable]:
  """``nnx.value_and_grad(loss_fn)(model, *args)``, and the matching ``grad_fn``.

  Returns ``((loss, grads), grad_fn)``: the clean pass, which updates the model's state
  (BatchNorm statistics, RNG counters) as ``nnx.value_and_grad`` does, and
  ``grad_fn = grad_fn(model, loss_fn, *args)`` built before it, so the perturbed pass
  starts from the same model state as the clean one (the same dropout keys). A train step
  with SAM then reads::

    (loss, grads), grad_fn = ire_optax.nnx.value_and_grad(loss_fn, model, batch)
    optimizer.update(model, grads, grad_fn=grad_fn)

  Example:
    >>> import jax.numpy as jnp, optax, ire_optax, ire_optax.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> batch = (jnp.ones((4, 2)), jnp.zeros((4, 1)))
    >>> loss_fn = lambda model, b: jnp.mean((model(b[0]) - b[1]) ** 2)
    >>> optimizer = nnx.Optimizer(model, ire_optax.sam(optax.sgd(0.1)), wrt=nnx.Param)
    >>> (loss, grads), g = ire_optax.nnx.value_and_grad(loss_fn, model, batch)
    >>> _ = optimizer.update(model, grads, grad_fn=g)
    >>> bool(loss_fn(model, batch) < loss)
    True

  Args:
    loss_fn: ``(model, *args) -> loss``, or ``(loss, aux)`` with ``has_aux``.
    model: the Flax NNX Module.
    *args: the rest of ``loss_fn``'s arguments (the batch).
    wrt: the filter of the parameters, as given to ``nnx.Optimizer``.
    has_aux: as for ``nnx.value_and_grad`` (and :func:`grad_fn`).
  """
  fn = grad_fn(model, loss_fn, *args, wrt=wrt, has_aux=has_aux)
  return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(
      model, *args), fn


def aux_init(model: nnx.Module, stats: Any = nnx.BatchStat) -> Any:
  """The ``aux_init`` matching :func:`grad_fn` with ``stats``: ``(0.0, the model's state)``.

  A float32 zero for the loss and the model's current state matching ``stats``, as
  arrays (for a ``loss_fn`` that returns the loss only).

  Example:
    >>> import ire_optax.nnx
    >>> from flax import nnx
    >>> model = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> loss, state = ire_optax.nnx.aux_init(model)
    >>> loss, state["mean"]
    (Array(0., dtype=float32), Array([0., 0., 0.], dtype=float32))
  """
  return jnp.zeros((), jnp.float32), nnx.as_pure(nnx.state(model, stats))


def update_stats(model: nnx.Module, optimizer: nnx.Optimizer) -> Any:
  """Writes the model state kept by ``msam(has_aux=True)`` into ``model``; returns the loss.

  For :func:`ire_optax.msam` with ``grad_fn(model, loss_fn, stats=...)`` and
  ``aux_init=aux_init(model, stats)``: the clean micro-batch passes' state (BatchNorm
  statistics), averaged, goes into ``model`` (``nnx.update``), and what ``loss_fn``
  returned, averaged, is returned as arrays (not as the optimizer's ``Variable``, which the
  next step overwrites). The model's RNG counters advance by one, as one clean pass would
  advance them: mSAM's passes run on copies of the model, so without it every step would
  draw the same dropout masks.

  Example:
    >>> import jax.numpy as jnp, optax, ire_optax, ire_optax.nnx
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    >>> x = jnp.arange(16.0).reshape(8, 2)
    >>> loss_fn = lambda model, xb: jnp.mean(model(xb) ** 2)
    >>> tx = ire_optax.msam(optax.sgd(0.1), num_microbatches=2, has_aux=True,
    ...                     aux_init=ire_optax.nnx.aux_init(model))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> g = ire_optax.nnx.grad_fn(model, loss_fn, stats=nnx.BatchStat)
    >>> _ = optimizer.update(model, None, grad_fn=g, batch=x)
    >>> loss = ire_optax.nnx.update_stats(model, optimizer)  # the clean passes' statistics
    >>> bool(jnp.any(model.layers[1].mean[...] != 0.0)), loss.shape
    (True, ())
  """
  out, state = sam_lib.sam_aux(nnx.as_pure(optimizer.opt_state))
  nnx.update(model, state)
  _advance_rng_counters(model)
  return out


def _advance_rng_counters(model: nnx.Module) -> None:
  """Adds one to every RNG counter (``nnx.RngCount``) of ``model``: the next pass draws new
  random numbers (dropout masks), as after one pass that drew from each stream."""
  counts = nnx.as_pure(nnx.state(model, nnx.RngCount))
  nnx.update(model, jax.tree.map(lambda c: c + 1, counts))


def sala_eval_model(model: nnx.Module, opt_state: Any) -> nnx.Module:
  """A copy of ``model`` holding SALA's slow weights (:func:`ire_optax.sala_eval_params`).

  ``opt_state`` is the state of an optimizer holding :func:`ire_optax.sala`
  (``optimizer.opt_state`` of an ``nnx.Optimizer``). The copy is in evaluation mode
  (``.eval()``: BatchNorm's running statistics, no dropout); ``model`` is unchanged.

  Example:
    >>> import jax.numpy as jnp, optax, ire_optax, ire_optax.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, ire_optax.sala(optax.sgd(0.1)), wrt=nnx.Param)
    >>> slow = ire_optax.nnx.sala_eval_model(model, optimizer.opt_state)
    >>> bool(jnp.all(slow.kernel[...] == model.kernel[...]))  # φ starts at the params
    True
  """
  copy = nnx.clone(model)
  nnx.update(copy, sala_lib.sala_eval_params(opt_state))
  copy.eval()
  return copy
