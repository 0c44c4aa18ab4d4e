"""Bad input: every public function fails early with an error naming the argument and its range.

``BAD_INPUT`` is the table: one row per (function, bad argument), the expected
exception type and a regular expression that the message must match (it names
the argument and, for numbers, the allowed range). Construction-time errors
are raised by the factories; "update" rows fail when ``update`` is traced.

Property-based tests (hypothesis) then draw hyperparameters on both sides of
every range (out of range -> ``ValueError`` naming it; in range -> accepted),
and random pytrees (nesting, shapes including scalars and empty leaves,
float32/bfloat16/float16 leaves) with random valid hyperparameters on which one
update of every optimizer must return updates of the params' structure, shapes
and dtypes, and a state of unchanged types.
"""

from __future__ import annotations

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ire_optax
import ire_optax.sharpness as sh

SGD = optax.sgd(0.1)
P = {"w": jnp.ones(3)}
G = {"w": jnp.full(3, 0.5)}
KEY = jax.random.key(0)
BATCH = {"x": jnp.ones((4, 2)), "y": jnp.zeros(4)}
NAN, INF = float("nan"), float("inf")


def _loss(p, b):
  return jnp.sum(b * p["w"] ** 2)


def _grad_fn(p):
  return jax.tree.map(lambda x: 2.0 * x, p)


def _mb_grad(p, mb):
  return jax.tree.map(lambda x: jnp.mean(mb["x"]) * x, p)


C64 = {"w": jnp.ones(3, jnp.complex64)}
BAD_GRAD = "the gradient returned by `grad_fn` must have the"
# What a wrong `grad_fn` returns instead of a gradient like P.
_BAD_GRADS = [
    ("a scalar", lambda p: jnp.sum(p["w"])),
    ("a (grads, aux) pair", lambda p: (_grad_fn(p), 1.0)),
    ("wrong keys", lambda p: {"v": p["w"]}),
    ("wrong shapes", lambda p: {"w": p["w"][:, None]}),
]


def _traced(f):
  """Calls ``f`` with a traced scalar (as ``inject_hyperparams`` does inside ``jit``)."""
  return lambda: jax.jit(f)(jnp.int32(2))


def _row(name, fn, exc, match):
  return pytest.param(fn, exc, match, id=name)


def _range(arg, text):
  """The message of ``utils.check_range``: `arg` must be in <text>."""
  return rf"`{arg}` must be in {text}"


F32_MAX = r"3.40282e\+38"  # the largest float32: larger values would become inf
F32_TINY = r"1.17549e-38"  # the smallest normal float32: smaller ones would become 0

IRE_RANGES = [
    ("kappa", v, _range("kappa", rf"\[0, {F32_MAX}\]")) for v in (-0.1, NAN, INF, -INF, 1e39)
] + [
    ("gamma", v, _range("gamma", r"\(0, 1\)")) for v in (0.0, 1.0, -0.5, 1.5, NAN)
] + [
    # A float64 1 is no float32 rounding of a γ below 1 (which may hold 1): refused as 1.0 is.
    ("gamma", v, _range("gamma", r"\(0, 1\)")) for v in (np.float64(1.0), np.array(1.0))
] + [
    ("refresh_every", v, r"`refresh_every` must be an integer >= 1")
    for v in (0, -1, 1.5, INF, 2.0, 10**30, 2**31)
] + [
    ("warmup_steps", v, r"`warmup_steps` must be an integer >= 0") for v in (-1, 2.5, 2**31)
] + [
    ("seed", v, r"`seed` must be an integer") for v in (2**63, -(2**63) - 1, 2.0)
] + [
    ("num_samples", 0, r"`num_samples` must be an integer >= 1"),
    ("ema_decay", -0.1, _range("ema_decay", r"\[0, 1\)")),
    ("ema_decay", 1.0, _range("ema_decay", r"\[0, 1\)")),
    ("seed", 1.5, r"`seed` must be an integer"),
]

BAD_INPUT = [
    # ---------------------------------------------------------------- ire
    _row("ire/base_optimizer=None", lambda: ire_optax.ire(None), TypeError, "`base_optimizer`"),
    *[_row(f"ire/{a}={v!r}", lambda a=a, v=v: ire_optax.ire(SGD, **{a: v}), ValueError, m)
      for a, v, m in IRE_RANGES],
    _row("ire/kappa=str", lambda: ire_optax.ire(SGD, kappa="3"), TypeError, "`kappa`"),
    _row("ire/kappa=vector", lambda: ire_optax.ire(SGD, kappa=jnp.ones(2)), ValueError,
         "`kappa` must be a scalar"),
    _row("ire/gamma=True", lambda: ire_optax.ire(SGD, gamma=True), TypeError, "`gamma`"),
    _row("ire/refresh_every=schedule", lambda: ire_optax.ire(SGD, refresh_every=lambda t: 3),
         TypeError, "`refresh_every` must be an integer >= 1"),
    _row("ire/refresh_every=True", lambda: ire_optax.ire(SGD, refresh_every=True), TypeError,
         "`refresh_every`"),
    _row("ire/curvature=name", lambda: ire_optax.ire(SGD, curvature="hessian"), ValueError,
         r"`curvature` must be one of \('grad_sq', 'fisher', 'hutchinson'\)"),
    _row("ire/curvature=3", lambda: ire_optax.ire(SGD, curvature=3), TypeError, "`curvature`"),
    *[_row(f"ire/{a}=0", lambda a=a: ire_optax.ire(SGD, **{a: 0}), TypeError, f"`{a}`")
      for a in ("axis_name", "shard_axis_name")],
    _row("ire.update/updates of another tree", lambda: ire_optax.ire(SGD).update(
        {"v": jnp.ones(3)}, ire_optax.ire(SGD).init(P), P), ValueError,
        "`updates` must have the tree structure of `params`"),
    _row("ire.update/updates of another shape", lambda: ire_optax.ire(SGD).update(
        {"w": jnp.ones(4)}, ire_optax.ire(SGD).init(P), P), ValueError,
        "`updates` must have the shapes of `params`"),
    _row("ire.update/complex updates", lambda: ire_optax.ire(SGD).update(
        {"w": jnp.ones(3, jnp.complex64)}, ire_optax.ire(SGD).init(P), P), TypeError,
        "Complex parameters are not supported"),
    _row("ire.update/bool params", lambda: ire_optax.ire(SGD).update(
        G, ire_optax.ire(SGD).init(P), {"w": jnp.ones(3, bool)}), TypeError,
        "every leaf of `params` must be a real floating array"),
    *[_row(f"ire.update/hutchinson grad_fn returns {label}", lambda out=out: ire_optax.ire(
        SGD, curvature="hutchinson").update(G, ire_optax.ire(SGD).init(P), P,
                                            grad_fn=lambda p: out(p)),
        ValueError, BAD_GRAD) for label, out in _BAD_GRADS],
    *[_row(f"ire.update/fisher logits_fn returns {label}", lambda out=out: ire_optax.ire(
        SGD, curvature="fisher").update(G, ire_optax.ire(SGD).init(P), P, logits_fn=out),
        ValueError, "`logits_fn` must return") for label, out in [
            ("a scalar", lambda p: jnp.sum(p["w"])), ("ints", lambda p: jnp.ones((2, 3), int))]],
    *[_row(f"ire.update/custom curvature returns {label}", lambda out=out: ire_optax.ire(
        SGD, curvature=lambda g, p, k: out(p)).update(G, ire_optax.ire(SGD).init(P), P), exc, m)
      for label, out, exc, m in [
          ("complex", lambda p: {"w": p["w"].astype(jnp.complex64)}, TypeError, "real numbers"),
          ("bool", lambda p: {"w": p["w"] > 0}, TypeError, "real numbers"),
          ("wrong keys", lambda p: {"v": p["w"]}, ValueError, "tree structure of `params`"),
          ("wrong shapes", lambda p: {"w": p["w"][:2]}, ValueError, "shapes of `params`")]],
    _row("ire/ema_decay+fisher", lambda: ire_optax.ire(SGD, curvature="fisher", ema_decay=0.9),
         ValueError, "`ema_decay` applies to curvature='grad_sq' only"),
    # (a function would be handed the EMA of g² for its gradient)
    _row("ire/ema_decay+function", lambda: ire_optax.ire(
        SGD, curvature=lambda g, p, k: g, ema_decay=0.9), ValueError,
         "`ema_decay` applies to curvature='grad_sq' only"),
    _row("ire/num_samples=traced", _traced(
        lambda n: ire_optax.ire(SGD, curvature="hutchinson", num_samples=n).init(P)),
        TypeError, "`num_samples` must be a static int"),
    _row("ire.update/fisher without logits_fn", lambda: ire_optax.ire(
        SGD, curvature="fisher").update(G, ire_optax.ire(SGD).init(P), P),
        TypeError, "needs the keyword argument `logits_fn`"),
    _row("ire.update/hutchinson without grad_fn", lambda: ire_optax.ire(
        SGD, curvature="hutchinson").update(G, ire_optax.ire(SGD).init(P), P),
        TypeError, "needs the keyword argument `grad_fn`"),
    _row("ire.update/fisher without params", lambda: ire_optax.ire(
        SGD, curvature="fisher").update(G, ire_optax.ire(SGD).init(P), None,
                                        logits_fn=lambda p: p["w"]),
        ValueError, "`params`"),
    _row("ire.update/grad_sq with updates=None", lambda: ire_optax.ire(SGD).update(
        None, ire_optax.ire(SGD).init(P), P), TypeError, "`updates`"),
    _row("ire.update/logits_fn not callable", lambda: ire_optax.ire(
        SGD, curvature="fisher").update(G, ire_optax.ire(SGD).init(P), P, logits_fn=3),
        TypeError, "`logits_fn` must be callable"),
    _row("ire_flat_mask/no IREState", lambda: ire_optax.ire_flat_mask(SGD.init(P)), ValueError,
         "IREState"),
    # ---------------------------------------------------------------- sam / asam
    _row("sam/base_optimizer=str", lambda: ire_optax.sam("sgd"), TypeError, "`base_optimizer`"),
    *[_row(f"sam/{a}={v!r}", lambda a=a, v=v: ire_optax.sam(SGD, **{a: v}), ValueError,
           _range(a, rf"\[0, {F32_MAX}\]"))
      for a in ("rho", "adaptive_eta") for v in (-0.1, NAN, INF, 1e39)],
    *[_row(f"sam/eps={v!r}", lambda v=v: ire_optax.sam(SGD, eps=v), ValueError,
           _range("eps", rf"\[{F32_TINY}, {F32_MAX}\]")) for v in (-0.1, NAN, INF, 0.0, 1e-50)],
    _row("sam/axis_name=0", lambda: ire_optax.sam(SGD, axis_name=0), TypeError, "`axis_name`"),
    _row("sam/eps=schedule", lambda: ire_optax.sam(SGD, eps=lambda t: 1e-12), TypeError,
         "`eps` must be a number, not a schedule"),
    _row("sam/adaptive=str", lambda: ire_optax.sam(SGD, adaptive="yes"), TypeError,
         "`adaptive` must be True or False"),
    _row("sam/per_device_ascent=str", lambda: ire_optax.sam(SGD, per_device_ascent="no"),
         TypeError, "`per_device_ascent` must be True or False"),
    _row("sam/perturb_mask=int leaves", lambda: ire_optax.sam(SGD, perturb_mask={"w": 1}),
         TypeError, "`perturb_mask` leaves must be Python bools"),
    _row("sam.update/perturb_mask of another structure", lambda: ire_optax.sam(
        SGD, perturb_mask={"v": True}).update(G, ire_optax.sam(SGD).init(P), P,
                                              grad_fn=_grad_fn), ValueError, "`perturb_mask`"),
    _row("sam.update/inside optax.masked", lambda: optax.masked(
        ire_optax.sam(SGD), {"w": False}).init(P), TypeError, "perturb_mask"),
    *[_row(f"sam/every_k={v!r}", lambda v=v: ire_optax.sam(SGD, every_k=v), ValueError,
           "`every_k` must be an integer >= 1") for v in (0, 1.5, 2**31)],
    _row("gsam/every_k=2**31", lambda: ire_optax.gsam(SGD, every_k=2**31), ValueError,
         "`every_k` must be an integer >= 1"),
    _row("sam/every_k=schedule", lambda: ire_optax.sam(SGD, every_k=lambda t: 2), TypeError,
         "`every_k` must be an integer >= 1"),
    # ---------------------------------------------------------------- gsam
    _row("gsam/base_optimizer=str", lambda: ire_optax.gsam("sgd"), TypeError,
         "`base_optimizer`"),
    *[_row(f"gsam/alpha={v!r}", lambda v=v: ire_optax.gsam(SGD, alpha=v), ValueError,
           "`alpha` must be in") for v in (-0.1, NAN, INF)],
    _row("gsam/rho=-0.1", lambda: ire_optax.gsam(SGD, rho=-0.1), ValueError, "`rho` must be in"),
    _row("gsam/every_k=0", lambda: ire_optax.gsam(SGD, every_k=0), ValueError, "`every_k`"),
    _row("gsam.update/without grad_fn", lambda: ire_optax.gsam(SGD).update(
        G, ire_optax.gsam(SGD).init(P), P), TypeError, "needs the keyword argument `grad_fn`"),
    _row("gsam.update/updates=None", lambda: ire_optax.gsam(SGD).update(
        None, ire_optax.gsam(SGD).init(P), P, grad_fn=_grad_fn), TypeError, "`updates`"),
    # ---------------------------------------------------------------- lr_proportional
    _row("lr_proportional/lr_min=lr_max", lambda: ire_optax.lr_proportional(
        0.1, max_value=1.0, lr_max=0.1, lr_min=0.1), ValueError, "`lr_min`"),
    _row("lr_proportional/min_value>max_value", lambda: ire_optax.lr_proportional(
        0.1, max_value=1.0, min_value=2.0, lr_max=0.1), ValueError, "`min_value`"),
    _row("lr_proportional/max_value=-1", lambda: ire_optax.lr_proportional(
        0.1, max_value=-1.0, lr_max=0.1), ValueError, "`max_value`"),
    _row("lr_proportional/lr_max=schedule", lambda: ire_optax.lr_proportional(
        0.1, max_value=1.0, lr_max=lambda t: 0.1), TypeError, "`lr_max` must be a number"),
    _row("sam/per_device_ascent without axis_name",
         lambda: ire_optax.sam(SGD, per_device_ascent=True), ValueError,
         "`per_device_ascent=True` needs an `axis_name`"),
    _row("sam.update/without grad_fn", lambda: ire_optax.sam(SGD).update(
        G, ire_optax.sam(SGD).init(P), P), TypeError, "needs the keyword argument `grad_fn`"),
    _row("sam.update/grad_fn not callable", lambda: ire_optax.sam(SGD).update(
        G, ire_optax.sam(SGD).init(P), P, grad_fn=3), TypeError, "`grad_fn` must be callable"),
    _row("sam.update/updates=None", lambda: ire_optax.sam(SGD).update(
        None, ire_optax.sam(SGD).init(P), P, grad_fn=_grad_fn), TypeError, "`updates`"),
    _row("sam.update/params=None", lambda: ire_optax.sam(SGD).update(
        G, ire_optax.sam(SGD).init(P), None, grad_fn=_grad_fn), ValueError, "`params`"),
    *[_row(f"sam.update/grad_fn returns {label}", lambda out=out: ire_optax.sam(SGD).update(
        G, ire_optax.sam(SGD).init(P), P, grad_fn=lambda p: out(p)), ValueError,
        "the gradient returned by `grad_fn` must have the") for label, out in _BAD_GRADS],
    *[_row(f"{name}.update/int leaf", lambda make=make, kw=kw: make().update(
        {"w": jnp.ones(3), "n": jnp.ones(2)}, make().init({"w": jnp.ones(3), "n": jnp.ones(2)}),
        {"w": jnp.ones(3), "n": jnp.arange(2)}, **kw), TypeError, match)
      for name, make, kw, match in [
          ("ire", lambda: ire_optax.ire(SGD), {}, r"with optax\.masked or optax\.partition"),
          ("sam", lambda: ire_optax.sam(SGD), {"grad_fn": lambda p: p},
           r"cannot run inside optax\.masked: pass it the floating parameters only"),
          ("sala", lambda: ire_optax.sala(SGD), {"grad_fn": lambda p: p},
           r"cannot run inside optax\.masked")]],
    _row("sam.update/complex params", lambda: ire_optax.sam(SGD).update(
        {"w": jnp.ones(3, jnp.complex64)}, ire_optax.sam(SGD).init(P),
        {"w": jnp.ones(3, jnp.complex64)}, grad_fn=_grad_fn), TypeError,
        "Complex parameters are not supported"),
    *[_row(f"msam.update/grad_fn returns {label}", lambda out=out: ire_optax.msam(
        SGD, num_microbatches=2).update(None, ire_optax.msam(SGD, num_microbatches=2).init(P), P,
                                        grad_fn=lambda p, mb: out(p), batch=BATCH),
        ValueError, BAD_GRAD) for label, out in _BAD_GRADS],
    # ---------------------------------------------------------------- msam
    *[_row(f"msam/num_microbatches={v!r}",
           lambda v=v: ire_optax.msam(SGD, num_microbatches=v), ValueError,
           r"`num_microbatches` must be an integer >= 1") for v in (0, -2, 1.5)],
    *[_row(f"msam/num_microbatches={v!r}",
           lambda v=v: ire_optax.msam(SGD, num_microbatches=v), TypeError,
           r"`num_microbatches` must be a static Python int") for v in (None, True)],
    _row("msam/num_microbatches=traced", _traced(
        lambda m: ire_optax.msam(SGD, num_microbatches=m).init(P)), TypeError,
        r"`num_microbatches` must be a static Python int"),
    _row("msam/rho=-1", lambda: ire_optax.msam(SGD, rho=-1.0, num_microbatches=2), ValueError,
         _range("rho", rf"\[0, {F32_MAX}\]")),
    _row("msam/adaptive=str", lambda: ire_optax.msam(SGD, num_microbatches=2, adaptive="no"),
         TypeError, "`adaptive` must be True or False"),
    _row("msam/microbatch_mode", lambda: ire_optax.msam(SGD, num_microbatches=2,
                                                          microbatch_mode="loop"),
         ValueError, "`microbatch_mode` must be .*'vmap', 'scan' or 'unroll'"),
    _row("msam.update/without batch", lambda: ire_optax.msam(SGD, num_microbatches=2).update(
        None, ire_optax.msam(SGD, num_microbatches=2).init(P), P, grad_fn=_mb_grad),
        TypeError, "needs the keyword argument `batch`"),
    _row("msam.update/without grad_fn", lambda: ire_optax.msam(SGD, num_microbatches=2).update(
        None, ire_optax.msam(SGD, num_microbatches=2).init(P), P, batch=BATCH),
        TypeError, "needs the keyword argument `grad_fn`"),
    _row("msam.update/batch not divisible", lambda: ire_optax.msam(
        SGD, num_microbatches=3).update(None, ire_optax.msam(SGD, num_microbatches=3).init(P), P,
                                        grad_fn=_mb_grad, batch=BATCH),
        ValueError, r"leading size of `batch` \(4\) is not divisible by `num_microbatches` \(3\)"),
    _row("msam.update/batch with a scalar leaf", lambda: ire_optax.msam(
        SGD, num_microbatches=2).update(None, ire_optax.msam(SGD, num_microbatches=2).init(P), P,
                                        grad_fn=_mb_grad, batch={"x": jnp.ones(())}),
        ValueError, "`batch` needs a leading batch dimension"),
    _row("msam.update/batch sizes differ", lambda: ire_optax.msam(
        SGD, num_microbatches=2).update(None, ire_optax.msam(SGD, num_microbatches=2).init(P), P,
                                        grad_fn=_mb_grad,
                                        batch={"x": jnp.ones((4, 2)), "y": jnp.ones(6)}),
        ValueError, "all leaves of `batch` must share the leading batch size"),
    _row("msam.update/empty batch", lambda: ire_optax.msam(
        SGD, num_microbatches=2).update(None, ire_optax.msam(SGD, num_microbatches=2).init(P), P,
                                        grad_fn=_mb_grad, batch={}),
        ValueError, "`batch` has no array leaves"),
    _row("msam.update/params=None", lambda: ire_optax.msam(SGD, num_microbatches=2).update(
        None, ire_optax.msam(SGD, num_microbatches=2).init(P), None, grad_fn=_mb_grad,
        batch=BATCH), ValueError, "`params`"),
    # ---------------------------------------------------------------- sala
    _row("sala/base_optimizer=None", lambda: ire_optax.sala(None), TypeError,
         "`base_optimizer`"),
    *[_row(f"sala/sync_period={v!r}", lambda v=v: ire_optax.sala(SGD, sync_period=v),
           ValueError, r"`sync_period` must be an integer >= 1") for v in (0, -2, 1.5)],
    *[_row(f"sala/sync_period={label}", lambda v=v: ire_optax.sala(SGD, sync_period=v),
           TypeError, r"`sync_period`")
      for label, v in [("True", True), ("schedule", lambda t: 2), ("str", "2")]],
    *[_row(f"sala/slow_step_size={v!r}", lambda v=v: ire_optax.sala(SGD, slow_step_size=v),
           ValueError, _range("slow_step_size", r"\[0, 1\]")) for v in (-0.1, 1.5, NAN)],
    *[_row(f"sala/rho={v!r}", lambda v=v: ire_optax.sala(SGD, rho=v), ValueError,
           _range("rho", rf"\[0, {F32_MAX}\]")) for v in (-0.01, INF, 1e39)],
    *[_row(f"sala/eps={v!r}", lambda v=v: ire_optax.sala(SGD, eps=v), ValueError,
           _range("eps", rf"\[{F32_TINY}, {F32_MAX}\]")) for v in (-0.01, INF, 0.0, 1e-50)],
    _row("sala/sync_period=2**31", lambda: ire_optax.sala(SGD, sync_period=2**31), ValueError,
         r"`sync_period` must be an integer >= 1 and <= 2147483647"),
    _row("sala/axis_name=0", lambda: ire_optax.sala(SGD, axis_name=0), TypeError, "`axis_name`"),
    _row("sala.update/updates=None", lambda: ire_optax.sala(SGD).update(
        None, ire_optax.sala(SGD).init(P), P, grad_fn=_grad_fn), TypeError, "`updates`"),
    _row("sala.update/updates of another tree", lambda: ire_optax.sala(SGD).update(
        {"v": jnp.ones(3)}, ire_optax.sala(SGD).init(P), P, grad_fn=_grad_fn), ValueError,
        "`updates` must have the tree structure of `params`"),
    *[_row(f"sala.update/grad_fn returns {label}", lambda out=out: ire_optax.sala(SGD).update(
        G, ire_optax.sala(SGD).init(P), P, grad_fn=lambda p: out(p)), ValueError,
        "the gradient returned by `grad_fn` must have the")
      for label, out in _BAD_GRADS],
    _row("sala.update/int params", lambda: ire_optax.sala(SGD).update(
        {"w": jnp.ones(3, jnp.int32)}, ire_optax.sala(SGD).init({"w": jnp.ones(3, jnp.int32)}),
        {"w": jnp.ones(3, jnp.int32)}, grad_fn=_grad_fn), TypeError,
        "every leaf of `params` must be a real floating array"),
    _row("sala.update/complex params", lambda: ire_optax.sala(SGD).update(
        C64, ire_optax.sala(SGD).init(C64), C64, grad_fn=_grad_fn), TypeError,
        "Complex parameters are not supported"),
    _row("sala/eps=schedule", lambda: ire_optax.sala(SGD, eps=lambda t: 0.0), TypeError,
         "`eps` must be a number, not a schedule"),
    _row("sala.update/params=None", lambda: ire_optax.sala(SGD).update(
        G, ire_optax.sala(SGD).init(P), None, grad_fn=_grad_fn), ValueError, "`params`"),
    _row("sala.update/without grad_fn", lambda: ire_optax.sala(SGD).update(
        G, ire_optax.sala(SGD).init(P), P), TypeError, "needs the keyword argument `grad_fn`"),
    _row("sam_aux/no SAMState with aux", lambda: ire_optax.sam_aux(SGD.init(P)), ValueError,
         "no SAMState with an aux output"),
    _row("selection_method/unknown method", lambda: ire_optax.selection_method("bogus").__enter__(),
         ValueError, "must be one of"),
    _row("sala_eval_params/no SALAState", lambda: ire_optax.sala_eval_params(SGD.init(P)),
         ValueError, "No SALAState"),
    _row("sala_stats/no SALAState",
         lambda: ire_optax.sala_stats(ire_optax.ire(SGD).init(P)), ValueError, "No SALAState"),
    # ---------------------------------------------------------------- selection
    *[_row(f"flat_mask/gamma={v!r}", lambda v=v: ire_optax.flat_mask(P, v), ValueError,
           _range("gamma", r"\(0, 1\]")) for v in (0.0, -1.0, 1.5, NAN)],
    _row("flat_mask/gamma=str", lambda: ire_optax.flat_mask(P, "0.5"), TypeError, "`gamma`"),
    _row("flat_mask/gamma=schedule", lambda: ire_optax.flat_mask(P, lambda t: 0.5), TypeError,
         "`gamma` must be a number, not a schedule"),
    _row("flat_mask/complex tree", lambda: ire_optax.flat_mask({"w": jnp.ones(2, jnp.complex64)},
                                                               0.5),
         TypeError, "`tree` must hold real numbers"),
    *[_row(f"kth_smallest/k={v!r}", lambda v=v: ire_optax.kth_smallest(P, v), ValueError,
           r"`k` must be an integer") for v in (0, 4, 1.5, -1)],
    _row("kth_smallest/k=True", lambda: ire_optax.kth_smallest(P, True), TypeError, "`k`"),
    _row("kth_smallest/empty tree", lambda: ire_optax.kth_smallest({"e": jnp.ones(0)}, 1),
         ValueError, r"`k` must be an integer in \[1, 0\]"),
    _row("kth_smallest/complex tree",
         lambda: ire_optax.kth_smallest([jnp.ones(2, jnp.complex64)], 1), TypeError,
         "`tree` must hold real numbers"),
    # ---------------------------------------------------------------- sharpness
    _row("hvp/loss_fn", lambda: sh.hvp(3, P, None, P), TypeError, "`loss_fn` must be callable"),
    _row("hvp/loss not scalar", lambda: sh.hvp(lambda p, b: p["w"], P, None, P), ValueError,
         "loss_fn must return a scalar"),
    _row("hvp/v structure", lambda: sh.hvp(_loss, P, 1.0, {"x": jnp.ones(3)}), ValueError,
         "`v` must have the tree structure and shapes of `params`"),
    _row("hvp/v shape", lambda: sh.hvp(_loss, P, 1.0, {"w": jnp.ones(4)}), ValueError,
         "`v` must have the tree structure and shapes of `params`"),
    *[_row(f"top_hessian_eigs/{a}={v!r}",
           lambda a=a, v=v: sh.top_hessian_eigs(_loss, P, 1.0, key=KEY, **{a: v}), ValueError,
           rf"`{a}` must be") for a, v in [("k", 0), ("k", 4), ("num_iters", 0), ("k", 1.5),
                                             ("unroll", -1), ("method", "arnoldi")]],
    _row("top_hessian_eigs/num_iters<k", lambda: sh.top_hessian_eigs(
        _loss, P, 1.0, key=KEY, k=3, num_iters=2), ValueError, r"`num_iters` must be >= k=3"),
    *[_row(f"top_hessian_eigs/key={label}",
           lambda v=v: sh.top_hessian_eigs(_loss, P, 1.0, key=v), TypeError,
           "`key` must be one PRNG key")
      for label, v in [("None", None), ("int", 3), ("two keys", jax.random.split(KEY, 2))]],
    _row("top_hessian_eigs/reorthogonalize=str", lambda: sh.top_hessian_eigs(
        _loss, P, 1.0, key=KEY, reorthogonalize="yes"), TypeError,
        "`reorthogonalize` must be True or False"),
    _row("hessian_trace/num_samples=0", lambda: sh.hessian_trace(
        _loss, P, 1.0, key=KEY, num_samples=0), ValueError,
        "`num_samples` must be a static integer >= 1|`num_samples` must be an integer >= 1"),
    _row("hessian_trace/key=None", lambda: sh.hessian_trace(_loss, P, 1.0, key=None),
         TypeError, "`key` must be one PRNG key"),
    _row("hessian_diagonal/method", lambda: sh.hessian_diagonal(
        _loss, P, 1.0, key=KEY, method="exact"), ValueError,
        r"`method` must be one of \('hutchinson', 'fisher', 'grad_sq'\)"),
    _row("hessian_diagonal/no key", lambda: sh.hessian_diagonal(_loss, P, 1.0), ValueError,
         "needs a PRNG `key`"),
    _row("hessian_diagonal/bad key", lambda: sh.hessian_diagonal(_loss, P, 1.0, key=7),
         TypeError, "`key` must be one PRNG key"),
    _row("hessian_diagonal/fisher without logits_fn", lambda: sh.hessian_diagonal(
        _loss, P, 1.0, key=KEY, method="fisher"), TypeError,
        "needs the keyword argument `logits_fn`"),
    _row("hessian_diagonal/num_samples=0", lambda: sh.hessian_diagonal(
        _loss, P, 1.0, key=KEY, num_samples=0), ValueError, "`num_samples` must be"),
    *[_row(f"sam_sharpness/rho={v!r}", lambda v=v: sh.sam_sharpness(_loss, P, 1.0, rho=v),
           ValueError, _range("rho", rf"\[0, {F32_MAX}\]")) for v in (-1.0, NAN, INF, 1e39)],
    _row("sam_sharpness/num_steps=0", lambda: sh.sam_sharpness(_loss, P, 1.0, num_steps=0),
         ValueError, "`num_steps` must be"),
    _row("sam_sharpness/adaptive=str", lambda: sh.sam_sharpness(_loss, P, 1.0, adaptive="no"),
         TypeError, "`adaptive` must be True or False"),
    _row("sam_sharpness/rho=schedule", lambda: sh.sam_sharpness(_loss, P, 1.0,
                                                                rho=lambda t: 0.1),
         TypeError, "`rho` must be a number, not a schedule"),
    _row("m_sharpness/num_microbatches=0", lambda: sh.m_sharpness(
        _loss, P, jnp.ones((4, 3)), num_microbatches=0), ValueError,
        "`num_microbatches` must be"),
    _row("m_sharpness/not divisible", lambda: sh.m_sharpness(
        _loss, P, jnp.ones((4, 3)), num_microbatches=3), ValueError,
        "`num_microbatches`=3 must divide the batch size"),
    _row("m_sharpness/rho=-1", lambda: sh.m_sharpness(
        _loss, P, jnp.ones((4, 3)), num_microbatches=2, rho=-1.0), ValueError,
        _range("rho", rf"\[0, {F32_MAX}\]")),
    *[_row(f"summary/{a}={v!r}", lambda a=a, v=v: sh.summary(_loss, P, 1.0, key=KEY, **{a: v}),
           ValueError, rf"`{a}` must be") for a, v in [("num_iters", 0), ("num_samples", 0),
                                                         ("rho", -1.0), ("num_steps", 0)]],
    _row("summary/key=None", lambda: sh.summary(_loss, P, 1.0, key=None), TypeError,
         "`key` must be one PRNG key"),
]


@pytest.mark.parametrize("fn, exc, match", BAD_INPUT)
def test_bad_input_fails_early_naming_the_argument(fn, exc, match):
  with pytest.raises(exc, match=match):
    fn()


def test_every_public_function_is_in_the_table():
  """Adding a public function without bad-input rows fails here."""
  tested = {row.id.split("/")[0].split(".")[0] for row in BAD_INPUT}
  public = {n for n in dir(ire_optax) if not n.startswith("_") and callable(getattr(ire_optax, n))
            and not isinstance(getattr(ire_optax, n), type)}
  public |= set(sh.__all__)
  assert public <= tested, sorted(public - tested)


# -----------------------------------------------------------------------------
# Hypothesis: both sides of every range
# -----------------------------------------------------------------------------


def _floats(lo=None, hi=None, **kw):
  return st.floats(lo, hi, allow_nan=False, allow_infinity=False, **kw)


# (factory, argument, valid values, invalid values)
RANGES = [
    (lambda **kw: ire_optax.ire(SGD, **kw), "kappa", _floats(0, 1e9),
     _floats(hi=0, exclude_max=True) | st.sampled_from([NAN, INF])),
    (lambda **kw: ire_optax.ire(SGD, **kw), "gamma",
     _floats(0, 1, exclude_min=True, exclude_max=True),
     _floats(hi=0) | _floats(lo=1) | st.just(NAN)),
    (lambda **kw: ire_optax.ire(SGD, **kw), "refresh_every", st.integers(1, 2**31 - 1),
     st.integers(max_value=0) | _floats(1, 1e6).filter(lambda v: v != int(v))),
    (lambda **kw: ire_optax.ire(SGD, **kw), "warmup_steps", st.integers(0, 2**31 - 1),
     st.integers(max_value=-1)),
    (lambda **kw: ire_optax.ire(SGD, **kw), "ema_decay", _floats(0, 1, exclude_max=True),
     _floats(hi=0, exclude_max=True) | _floats(lo=1)),
    (lambda **kw: ire_optax.sam(SGD, **kw), "rho", _floats(0, 1e9),
     _floats(hi=0, exclude_max=True)),
    (lambda **kw: ire_optax.sam(SGD, adaptive=True, **kw), "adaptive_eta", _floats(0, 1e9),
     _floats(hi=0, exclude_max=True)),
    (lambda **kw: ire_optax.msam(SGD, **kw), "num_microbatches", st.integers(1, 4096),
     st.integers(max_value=0)),
    (lambda **kw: ire_optax.sala(SGD, **kw), "sync_period", st.integers(1, 10**6),
     st.integers(max_value=0)),
    (lambda **kw: ire_optax.sala(SGD, **kw), "slow_step_size", _floats(0, 1),
     _floats(hi=0, exclude_max=True) | _floats(lo=1, exclude_min=True)),
    (lambda **kw: ire_optax.sala(SGD, **kw), "rho", _floats(0, 1e9),
     _floats(hi=0, exclude_max=True)),
    (lambda **kw: ire_optax.flat_mask(P, kw["gamma"]), "gamma", _floats(0, 1, exclude_min=True),
     _floats(hi=0) | _floats(lo=1, exclude_min=True)),
    (lambda **kw: ire_optax.kth_smallest(P, kw["k"]), "k", st.integers(1, 3),
     st.integers(max_value=0) | st.integers(min_value=4)),
    (lambda **kw: sh.sam_sharpness(_loss, P, 1.0, **kw), "rho", _floats(0, 1e3),
     _floats(hi=0, exclude_max=True)),
]


@pytest.mark.parametrize("factory, arg, good, bad", RANGES,
                         ids=[f"{i}-{r[1]}" for i, r in enumerate(RANGES)])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hyperparameter_ranges(factory, arg, good, bad, data):
  value = data.draw(good, label="valid")
  factory(**{arg: value})
  value = data.draw(bad, label="invalid")
  with pytest.raises(ValueError, match=rf"`{arg}` must be"):
    factory(**{arg: value})


# -----------------------------------------------------------------------------
# Hypothesis: random pytrees, shapes and dtypes
# -----------------------------------------------------------------------------

DTYPES = [np.float32, jnp.bfloat16, np.float16]

leaf = st.builds(
    lambda shape, dtype, seed: jnp.asarray(
        np.random.default_rng(seed).standard_normal(shape), dtype),
    hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3),
    st.sampled_from(DTYPES), st.integers(0, 2**16))
pytrees = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=2).map(tuple)),
    max_leaves=4)


def _optimizers(kappa, gamma, rho, k):
  """Every optimizer with the given hyperparameters, with its extra update arguments."""
  grad_fn = lambda p: jax.tree.map(lambda x: 0.5 * x, p)
  kw = {"grad_fn": grad_fn}
  # Plain (momentum) SGD bases: optax.adam itself overflows in float16 (its eps = 1e-8
  # rounds to 0 there), which is not what this test is about.
  return [
      (ire_optax.ire(optax.sgd(1e-2, momentum=0.9), kappa=kappa, gamma=gamma, refresh_every=k),
       {}),
      (ire_optax.ire(optax.sgd(1e-2), kappa=kappa, gamma=gamma, curvature="hutchinson"), kw),
      (ire_optax.sam(optax.sgd(1e-2, momentum=0.9), rho=rho), kw),
      (ire_optax.sam(optax.sgd(1e-2), rho=rho, adaptive=True), kw),
      (ire_optax.msam(optax.sgd(1e-2), rho=rho, num_microbatches=2),
       {"grad_fn": lambda p, mb: grad_fn(p), "batch": jnp.ones((4, 1))}),
      (ire_optax.sala(optax.sgd(1e-2), sync_period=k, rho=rho), kw),
      (ire_optax.ire(ire_optax.sam(optax.sgd(1e-2), rho=rho), kappa=kappa, gamma=gamma), kw),
  ]


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(params=pytrees, kappa=_floats(0, 10), gamma=_floats(0.05, 0.95),
       rho=_floats(0, 1), k=st.integers(1, 3))
def test_random_pytrees_keep_structure_shapes_and_dtypes(params, kappa, gamma, rho, k):
  grads = jax.tree.map(lambda x: (0.1 * x.astype(jnp.float32) + 0.01).astype(x.dtype), params)
  for tx, kw in _optimizers(kappa, gamma, rho, k):
    state = tx.init(params)
    updates, new_state = tx.update(None if "batch" in kw else grads, state, params, **kw)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    chex.assert_tree_all_finite(updates)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    for s in jax.tree.leaves(new_state, is_leaf=lambda x: isinstance(x, ire_optax.IREState)):
      if isinstance(s, ire_optax.IREState) and n:
        flat = sum(int(m.sum()) for m in jax.tree.leaves(s.mask))
        assert flat >= max(1, math.floor(gamma * n))  # ties can only add coordinates


# -----------------------------------------------------------------------------
# The callbacks' dependence check costs nothing at run time
# -----------------------------------------------------------------------------


def _compiled_instructions(f, *args):
  """The instructions of the compiled HLO of ``jax.jit(f)``, without their metadata."""
  import re

  text = jax.jit(f).lower(*args).compile().as_text()
  return [re.sub(r", metadata=\{[^}]*\}", "", line) for line in text.splitlines()
          if " = " in line and not line.lstrip().startswith(("FileNames", "FunctionNames"))]


def test_callback_check_compiles_to_the_same_step(monkeypatch):
  """SAM, mSAM and IRE-Fisher compile to the same instructions with the callbacks called
  directly (the check traces once and evaluates that trace), and the comparison can fail."""
  from ire_optax._src import utils

  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  x, y = jnp.linspace(0.0, 1.0, 32).reshape(8, 4), jnp.ones((8, 3))
  loss = lambda p, b: jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2)
  batch = {"x": x, "y": y}
  g = lambda p: jax.grad(loss)(p, batch)
  steps = {
      "sam": (ire_optax.sam(SGD), lambda tx, p, s: tx.update(g(p), s, p, grad_fn=g)),
      "msam": (ire_optax.msam(SGD, num_microbatches=2), lambda tx, p, s: tx.update(
          None, s, p, grad_fn=jax.grad(loss), batch=batch)),
      "fisher": (ire_optax.ire(SGD, curvature="fisher"), lambda tx, p, s: tx.update(
          g(p), s, p, logits_fn=lambda q: x @ q["w"] + q["b"])),
  }
  compile_all = lambda: {name: _compiled_instructions(lambda p, s, tx=tx, f=f: f(tx, p, s),
                                                      params, tx.init(params))
                         for name, (tx, f) in steps.items()}
  checked = compile_all()
  with monkeypatch.context() as m:
    m.setattr(utils, "call_callback",
              lambda fn, p, *a, name, who, check=None: fn(p, *a))
    direct = compile_all()
  assert checked == direct
  other = _compiled_instructions(lambda p, s: ire_optax.sam(SGD, rho=0.1).update(
      g(p), s, p, grad_fn=lambda q: jax.tree.map(jnp.tanh, g(q))), params,
      ire_optax.sam(SGD).init(params))
  assert other != checked["sam"]


# Every update that calls a user's callback, with a callback taking one argument too many.
_TWO_ARG = lambda p, i: _grad_fn(p)
_CALLBACK_ARITY = {
    "sam": lambda: ire_optax.sam(SGD).update(G, ire_optax.sam(SGD).init(P), P,
                                             grad_fn=_TWO_ARG),
    "sam every_k": lambda: ire_optax.sam(SGD, every_k=2).update(
        G, ire_optax.sam(SGD, every_k=2).init(P), P, grad_fn=_TWO_ARG),
    "gsam": lambda: ire_optax.gsam(SGD).update(G, ire_optax.gsam(SGD).init(P), P,
                                               grad_fn=_TWO_ARG),
    "sala": lambda: ire_optax.sala(SGD).update(G, ire_optax.sala(SGD).init(P), P,
                                               grad_fn=_TWO_ARG),
    "msam": lambda: ire_optax.msam(SGD, num_microbatches=2).update(
        None, ire_optax.msam(SGD, num_microbatches=2).init(P), P, batch=BATCH,
        grad_fn=lambda p, b, i: _grad_fn(p)),
    "ire hutchinson": lambda: ire_optax.ire(SGD, curvature="hutchinson").update(
        G, ire_optax.ire(SGD, curvature="hutchinson").init(P), P, grad_fn=_TWO_ARG),
    "ire fisher": lambda: ire_optax.ire(SGD, curvature="fisher").update(
        G, ire_optax.ire(SGD, curvature="fisher").init(P), P, logits_fn=lambda p, x: p["w"]),
}


@pytest.mark.parametrize("name", _CALLBACK_ARITY)
def test_a_callback_that_needs_more_arguments_names_what_it_gets(name):
  """optax.contrib.sam's ``grad_fn(params, i)`` used to fail deep inside the trace with a bare
  'missing 1 required positional argument'."""
  with pytest.raises(TypeError, match=r"cannot be called as `(grad|logits)_fn\(params"
                     r"(, batch)?\)`.*close over anything else, e.g. `(grad|logits)_fn=lambda"):
    _CALLBACK_ARITY[name]()


def test_a_missing_callback_of_an_update_names_wrappers_that_drop_it():
  """Flax Linen's TrainState.apply_gradients(grads=g, grad_fn=f) passes grad_fn to replace(),
  not to tx.update: the error says so, where an optimizer's update needs it."""
  with pytest.raises(TypeError, match=r"needs the keyword argument `grad_fn`.*it was not "
                     r"given\. Pass it to `tx\.update\(.*TrainState\.apply_gradients"):
    ire_optax.sam(SGD).update(G, ire_optax.sam(SGD).init(P), P)
  with pytest.raises(TypeError, match=r"`logits_fn` \(.*\); it was not given\.$"):
    sh.hessian_diagonal(_loss, P, 1.0, key=KEY, method="fisher")
