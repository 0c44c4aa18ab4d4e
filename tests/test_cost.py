"""Cost work: static branch hints equal lax.cond where right; SAM/mSAM auxiliary outputs.

* ``utils.cond(..., hint=True)`` (both branches traced, ``jnp.where``) gives the
  values of ``lax.cond``, ``hint=False`` those of the false branch (no conditional);
  IRE's ``refresh_hint``, SALA's and SAM-every-k's ``sam_hint`` give the results of
  the unhinted step when right (or True), and skip the work when wrongly False.
* ``sam(has_aux=True)`` keeps the perturbed loss L(θ+ε) (NumPy reference);
  ``msam(has_aux=True)`` keeps the clean micro-batch losses' mean, which for
  equal micro-batches is the full-batch loss (NumPy reference), and its update
  is that of ``has_aux=False``.
* The examples' mSAM step evaluates the model exactly twice (clean and
  perturbed pass, no extra forward pass) and SAM's logs the sharpness.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import ire_optax
from ire_optax._src import utils


def _lsq():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 3)).astype(np.float32)
  y = rng.standard_normal(8).astype(np.float32)
  p = (0.1 * rng.standard_normal(3)).astype(np.float32)
  return p, x, y


def _np_loss(p, x, y):
  r = x.astype(np.float64) @ p.astype(np.float64) - y
  return float(np.mean(r ** 2))


def _np_grad(p, x, y):
  x64 = x.astype(np.float64)
  return 2.0 * x64.T @ (x64 @ p.astype(np.float64) - y) / len(y)


def _loss(p, mb):
  return jnp.mean((mb["x"] @ p - mb["y"]) ** 2)


def _conv_problem():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"c": 0.3 * jax.random.normal(k[0], (3, 3, 2, 4)),
            "d": 0.3 * jax.random.normal(k[1], (4, 3))}
  x = jax.random.normal(k[2], (6, 5, 5, 2))
  y = jax.random.randint(k[3], (6,), 0, 3)

  def logits_fn(p):
    h = jax.lax.conv_general_dilated(x, p["c"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(h).mean((1, 2)) @ p["d"]

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y).mean()

  return params, logits_fn, loss


class CondHintTest(parameterized.TestCase):

  @parameterized.product(pred=(True, False), hint=(True, False, None))
  def test_hint_gives_the_values_of_lax_cond(self, pred, hint):
    x = jnp.arange(3.0)
    t = lambda: {"a": x * 2.0, "b": jnp.ones(2, jnp.uint8)}
    f = lambda: {"a": x - 1.0, "b": jnp.zeros(2, jnp.uint8)}
    got = jax.jit(lambda p: utils.cond(p, t, f, hint=hint))(jnp.asarray(pred))
    want = jax.jit(lambda p: jax.lax.cond(p, t, f))(jnp.asarray(pred))
    # A hint False is a promise: where it is wrong (pred true) the false branch is returned.
    chex.assert_trees_all_equal(got, f() if hint is False else want)
    chex.assert_trees_all_equal(utils.cond(pred, t, f, hint=hint), want)  # eager: exact

  def test_hints_have_no_conditional(self):
    for hint, primitives in ((True, set()), (False, set()), (None, {"cond"})):
      jaxpr = jax.make_jaxpr(lambda p, h=hint: utils.cond(p, lambda: 1.0, lambda: 0.0,
                                                          hint=h))(True)
      assert {e.primitive.name for e in jaxpr.jaxpr.eqns} & {"cond"} == primitives, hint
    # hint False traces only the false branch.
    calls = []
    jax.make_jaxpr(lambda p: utils.cond(p, lambda: calls.append(1) or 1.0, lambda: 0.0,
                                        hint=False))(True)
    assert not calls

  def test_traced_hint_is_refused(self):
    with pytest.raises(TypeError, match="static Python bool"):
      jax.jit(lambda h: utils.cond(jnp.bool_(True), lambda: 1.0, lambda: 0.0, hint=h))(True)


def _run(tx, params, steps, extra_fn, hint_fn, hint_name):
  """``steps`` jitted updates; ``hint_fn(t)`` is the static hint (None: not passed)."""
  step = jax.jit(lambda p, s, h: tx.update(extra_fn["grad"](p), s, p, **extra_fn["kw"],
                                           **({} if h is None else {hint_name: h})),
                 static_argnums=2)
  state = tx.init(params)
  for t in range(steps):
    updates, state = step(params, state, hint_fn(t))
    params = optax.apply_updates(params, updates)
  return params, state


class HintedStepsEqualCondTest(parameterized.TestCase):
  """Right hints (two compiled variants) equal the lax.cond path step by step; hints True
  are exact anywhere; a wrong hint False skips that step's occasional work."""

  @parameterized.parameters("fisher", "hutchinson", "grad_sq")
  def test_ire_refresh_hint(self, curvature):
    params, logits_fn, loss = _conv_problem()
    tx = ire_optax.ire(optax.sgd(0.1), kappa=2.0, gamma=0.5, refresh_every=3, warmup_steps=1,
                       curvature=curvature)
    extra = {"grad": jax.grad(loss), "kw": {"logits_fn": logits_fn, "grad_fn": jax.grad(loss)}}
    want, ws = _run(tx, params, 8, extra, lambda t: None, "refresh_hint")
    right = lambda t: t >= 1 and (t - 1) % 3 == 0
    for hint in (right, lambda t: right(t) or None, lambda t: True):  # right, mixed, always
      got, gs = _run(tx, params, 8, extra, hint, "refresh_hint")
      chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
      chex.assert_trees_all_equal(gs.mask, ws.mask)

  def test_wrong_refresh_hint_false_skips_that_refresh(self):
    params, _, loss = _conv_problem()
    tx = ire_optax.ire(optax.sgd(0.1), kappa=2.0, gamma=0.5, refresh_every=3)
    extra = {"grad": jax.grad(loss), "kw": {}}
    _, ws = _run(tx, params, 2, extra, lambda t: None, "refresh_hint")  # refreshed at 0
    assert int(sum(m.sum() for m in jax.tree.leaves(ws.mask))) > 0
    _, gs = _run(tx, params, 2, extra, lambda t: False, "refresh_hint")  # wrong at 0
    assert all(not m.any() for m in jax.tree.leaves(gs.mask))  # still the initial mask
    assert int(gs.count) == 2

  def test_sala_sam_hint(self):
    params, _, loss = _conv_problem()
    # rho between the cycle distances: both stages occur.
    tx = ire_optax.sala(optax.sgd(0.5, momentum=0.9), sync_period=2, rho=0.05)
    extra = {"grad": jax.grad(loss), "kw": {"grad_fn": jax.grad(loss)}}
    want, ws = _run(tx, params, 10, extra, lambda t: None, "sam_hint")
    stats = ire_optax.sala_stats(ws)
    assert 0 < int(stats["extra_grads"]) < int(stats["cycles"])  # both stages were taken
    for hint in (lambda t: t % 2 == 0, lambda t: t % 2 == 0 or None, lambda t: True):
      got, gs = _run(tx, params, 10, extra, hint, "sam_hint")
      chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
      chex.assert_trees_all_close(gs.slow, ws.slow, rtol=1e-6, atol=1e-7)
      chex.assert_trees_all_equal(gs.extra_grads, ws.extra_grads)

  def test_sala_cycle_end_hint(self):
    params, _, loss = _conv_problem()
    tx = ire_optax.sala(optax.sgd(0.5, momentum=0.9), sync_period=3, rho=0.05)
    extra = {"grad": jax.grad(loss), "kw": {"grad_fn": jax.grad(loss)}}
    want, ws = _run(tx, params, 9, extra, lambda t: None, "cycle_end_hint")
    for hint in (lambda t: t % 3 == 2, lambda t: t % 3 == 2 or None, lambda t: True):
      got, gs = _run(tx, params, 9, extra, hint, "cycle_end_hint")
      chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
      chex.assert_trees_all_close(gs.slow, ws.slow, rtol=1e-6, atol=1e-7)
    # A wrong False at every end: the slow weights never move.
    _, gs = _run(tx, params, 9, extra, lambda t: False, "cycle_end_hint")
    chex.assert_trees_all_equal(gs.slow, tx.init(params).slow)

  def test_sam_every_k_sam_hint(self):
    params, _, loss = _conv_problem()
    tx = ire_optax.sam(optax.sgd(0.1), rho=0.1, every_k=3)
    extra = {"grad": jax.grad(loss), "kw": {"grad_fn": jax.grad(loss)}}
    want, _ = _run(tx, params, 7, extra, lambda t: None, "sam_hint")
    for hint in (lambda t: t % 3 == 0, lambda t: True):
      got, _ = _run(tx, params, 7, extra, hint, "sam_hint")
      chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    # A wrong False on the ascent steps takes plain steps there: plain SGD.
    got, _ = _run(tx, params, 7, extra, lambda t: False, "sam_hint")
    plain, _ = _run(optax.with_extra_args_support(optax.sgd(0.1)), params, 7, extra,
                    lambda t: None, "sam_hint")
    chex.assert_trees_all_close(got, plain, rtol=1e-6, atol=1e-7)


class SAMAuxTest(parameterized.TestCase):

  def test_sam_keeps_the_perturbed_loss(self):
    p, x, y = _lsq()
    rho = 0.2
    tx = ire_optax.sam(optax.sgd(0.1), rho=rho, has_aux=True)
    mb = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    vg = lambda q: jax.value_and_grad(_loss)(q, mb)[::-1]
    state = tx.init(jnp.asarray(p))
    chex.assert_trees_all_equal(ire_optax.sam_aux(state), jnp.zeros((), jnp.float32))
    updates, state = jax.jit(lambda g, s, q: tx.update(g, s, q, grad_fn=vg))(
        jax.grad(_loss)(jnp.asarray(p), mb), state, jnp.asarray(p))
    g = _np_grad(p, x, y)
    eps = rho * g / (np.linalg.norm(g) + 1e-12)
    np.testing.assert_allclose(float(ire_optax.sam_aux(state)), _np_loss(p + eps, x, y),
                               rtol=1e-5)
    # The update is SAM's: -lr * grad at the perturbed point.
    np.testing.assert_allclose(np.asarray(updates), -0.1 * _np_grad(p + eps, x, y), rtol=1e-4,
                               atol=1e-7)

  def test_gsam_keeps_the_perturbed_loss_and_its_update(self):
    p, x, y = _lsq()
    rho, alpha = 0.2, 0.5
    mb = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    vg = lambda q: jax.value_and_grad(_loss)(q, mb)[::-1]
    tx = ire_optax.gsam(optax.sgd(0.1), rho=rho, alpha=alpha, has_aux=True)
    plain = ire_optax.gsam(optax.sgd(0.1), rho=rho, alpha=alpha)
    g0 = jax.grad(_loss)(jnp.asarray(p), mb)
    updates, state = jax.jit(lambda g, s, q: tx.update(g, s, q, grad_fn=vg))(
        g0, tx.init(jnp.asarray(p)), jnp.asarray(p))
    g = _np_grad(p, x, y)
    eps = rho * g / (np.linalg.norm(g) + 1e-12)
    np.testing.assert_allclose(float(ire_optax.sam_aux(state)), _np_loss(p + eps, x, y),
                               rtol=1e-5)
    # The surrogate gap h = L(θ+ε) − L(θ) is free; the update is GSAM's, as without aux.
    gp = _np_grad(p + eps, x, y)
    gp_hat = gp / (np.linalg.norm(gp) + 1e-12)
    g_perp = g - np.dot(g, gp_hat) * gp_hat
    np.testing.assert_allclose(np.asarray(updates), -0.1 * (gp - alpha * g_perp), rtol=1e-4,
                               atol=1e-7)
    want, _ = plain.update(g0, plain.init(jnp.asarray(p)), jnp.asarray(p),
                           grad_fn=lambda q: jax.grad(_loss)(q, mb))
    chex.assert_trees_all_close(updates, want, rtol=1e-6, atol=1e-8)

  def test_no_aux_raises_in_sam_aux(self):
    tx = ire_optax.sam(optax.sgd(0.1))
    with pytest.raises(ValueError, match="has_aux"):
      ire_optax.sam_aux(tx.init(jnp.zeros(2)))

  @parameterized.parameters("auto", "vmap", "scan", "unroll")
  def test_msam_aux_is_the_clean_loss_and_update_unchanged(self, mode):
    p, x, y = _lsq()
    mb = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    kw = dict(rho=0.05, num_microbatches=4, microbatch_mode=mode)
    tx = ire_optax.msam(optax.sgd(0.1), has_aux=True,
                        aux_init={"loss": jnp.zeros(()), "n": jnp.zeros(2)}, **kw)
    calls = []

    def vg(q, b):
      calls.append(1)
      loss, g = jax.value_and_grad(_loss)(q, b)
      return g, {"loss": loss, "n": jnp.stack([loss, 2 * loss])}

    updates, state = jax.jit(lambda s: tx.update(None, s, jnp.asarray(p), grad_fn=vg,
                                                 batch=mb))(tx.init(jnp.asarray(p)))
    assert len(calls) == (4 if mode == "auto" else 2)  # auto traces the CPU and the other mode
    aux = ire_optax.sam_aux(state)
    # Equal micro-batches: the mean of their mean losses is the full-batch loss.
    np.testing.assert_allclose(float(aux["loss"]), _np_loss(p, x, y), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["n"]), [_np_loss(p, x, y), 2 * _np_loss(p, x, y)],
                               rtol=1e-5)
    plain = ire_optax.msam(optax.sgd(0.1), **kw)
    want, _ = plain.update(None, plain.init(jnp.asarray(p)), jnp.asarray(p),
                           grad_fn=jax.grad(_loss), batch=mb)
    chex.assert_trees_all_close(updates, want, rtol=1e-6, atol=1e-8)

  def test_msam_aux_of_another_structure_raises(self):
    p, x, y = _lsq()
    mb = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    tx = ire_optax.msam(optax.sgd(0.1), num_microbatches=2, has_aux=True)  # a scalar aux
    vg = lambda q, b: (jax.grad(_loss)(q, b), {"loss": _loss(q, b)})
    with pytest.raises(ValueError, match="structure"):
      tx.update(None, tx.init(jnp.asarray(p)), jnp.asarray(p), grad_fn=vg, batch=mb)

  def test_msam_auto_is_unroll_on_cpu(self):
    p, x, y = _lsq()
    mb = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    out = {}
    for mode in ("auto", "unroll"):
      tx = ire_optax.msam(optax.sgd(0.1), rho=0.05, num_microbatches=4, microbatch_mode=mode)
      out[mode] = jax.jit(lambda s, tx=tx: tx.update(None, s, jnp.asarray(p),
                                                     grad_fn=jax.grad(_loss), batch=mb)[0])(
          tx.init(jnp.asarray(p)))
    if jax.default_backend() == "cpu":
      chex.assert_trees_all_equal(out["auto"], out["unroll"])


# -----------------------------------------------------------------------------
# The examples' train steps
# -----------------------------------------------------------------------------


def _example(argv, example="llama"):
  from examples.common import cli, models, optim, train

  args = cli.parse(example, ["--size", "toy", "--batch-size", "8", "--warmup-steps", "0", *argv])
  if example == "llama":
    m = models.build_llama("toy", vocab_size=11, seed=0)
    tokens = np.random.default_rng(0).integers(0, 11, (8, 9)).astype(np.int32)
    batch, num_classes = {"x": tokens[:, :-1], "y": tokens[:, 1:]}, 11
  else:
    m = models.build_resnet("toy", num_classes=3, in_channels=1, seed=0)
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((8, 6, 6, 1)).astype(np.float32),
             "y": rng.integers(0, 3, 8).astype(np.int32)}
    num_classes = 3
  graphdef, params, stats = train.split_model(m.model)
  spec = optim.build_optimizer(args.optimizer, 100, seed=args.seed, model_stats=stats)
  state = train.TrainState(params, stats, spec.tx.init(params))
  return args, spec, graphdef, state, batch, num_classes


def _count_model_calls(monkeypatch, spec, graphdef, state, batch, num_classes):
  from examples.common import train

  calls = []
  real = train.apply_model

  def counting(*a, **k):
    calls.append(1)
    return real(*a, **k)

  monkeypatch.setattr(train, "apply_model", counting)
  fn = train.step_function(graphdef, spec, num_classes=num_classes)
  _, metrics = jax.jit(fn)(state, batch, jnp.int32(0))
  return len(calls), metrics


@pytest.mark.parametrize("example", ["llama", "resnet"])
def test_examples_msam_step_evaluates_the_model_twice(monkeypatch, example):
  from examples.common import train

  _, spec, graphdef, state, batch, nc = _example(
      ["--opt", "msam", "--num-microbatches", "2", "--microbatch-mode", "unroll"], example)
  n, metrics = _count_model_calls(monkeypatch, spec, graphdef, state, batch, nc)
  assert n == 2, n  # the clean and the perturbed pass (traced once for all micro-batches)
  # The logged loss is the clean passes' (mean over the 2 equal micro-batches).
  monkeypatch.undo()
  halves = [jax.tree.map(lambda v, i=i: v[4 * i:4 * i + 4], batch) for i in range(2)]
  losses = []
  for h in halves:
    logits, _ = train.apply_model(graphdef, state.params, state.stats, h["x"], train=True)
    losses.append(float(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), h["y"]).mean()))
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)


def test_examples_sam_step_logs_free_sharpness(monkeypatch):
  _, spec, graphdef, state, batch, nc = _example(["--opt", "sam", "--rho", "0.1"])
  n, metrics = _count_model_calls(monkeypatch, spec, graphdef, state, batch, nc)
  assert n == 2, n
  np.testing.assert_allclose(float(metrics["sharpness"]),
                             float(metrics["perturbed_loss"]) - float(metrics["loss"]),
                             rtol=1e-6)
  assert float(metrics["sharpness"]) > 0.0  # a small ascent step raises the loss


@pytest.mark.parametrize("opt", ["ire", "sala"])
def test_examples_branch_hints_on_equal_off(opt):
  """The examples' hints are exactly right: a hint False is trusted, so a wrong one would
  skip a refresh or a SAM step and the runs would differ."""
  from examples.common import train

  if opt == "ire":
    argv = ["--opt", "sgd+ire", "--ire-curvature", "fisher", "--ire-refresh-every", "3",
            "--ire-warmup", "1", "--fast-compile"]
    want = [(("refresh_hint", h),) for h in (False, True, False, False, True)]
  else:  # rho large enough for stage 2
    argv = ["--opt", "sala", "--sala-sync-period", "2", "--rho", "5", "--fast-compile"]
    want = [(("sam_hint", t % 2 == 0), ("cycle_end_hint", t % 2 == 1)) for t in range(5)]
  _, spec, graphdef, state, batch, nc = _example(argv, "resnet")
  assert spec.hints is not None and [spec.hints(t) for t in range(5)] == want
  out = {}
  for mode in ("on", "off"):
    step = train.make_train_step(graphdef, spec, num_classes=nc, fast_compile=True,
                                 branch_hints=mode)
    s = jax.tree.map(jnp.array, state)
    for t in range(5):
      s, _ = step(s, batch, jnp.int32(t))
    out[mode] = s
  chex.assert_trees_all_close(out["on"].params, out["off"].params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(out["on"].opt_state, out["off"].opt_state, rtol=1e-5, atol=1e-6)
  if opt == "sala":
    stats = ire_optax.sala_stats(out["off"].opt_state)
    assert int(stats["extra_grads"]) > 0  # stage 2 was reached: the SAM steps ran


def test_cli_offers_every_microbatch_mode():
  from examples.common import cli

  for mode in ("auto", "vmap", "scan", "unroll"):
    assert cli.parse("resnet", ["--microbatch-mode", mode]).optimizer.microbatch_mode == mode
  assert cli.parse("resnet", []).optimizer.microbatch_mode == "auto"
