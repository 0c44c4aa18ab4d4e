"""Flax NNX: every optimizer in an ``nnx.Optimizer`` + ``nnx.jit`` loop (docs/nnx.md).

* The loop gives bit for bit the parameters, the model's other state (BatchNorm statistics,
  dropout RNG) and the optimizer state of the functional route (``jax.jit`` with
  ``nnx.split`` / ``nnx.merge``), for every optimizer, with and without BatchNorm.
* docs/nnx.md runs, and its table of glue lines is what its code gives.
* The NNX mistakes in a ``grad_fn`` / ``logits_fn`` raise a short error naming them, for
  every optimizer that calls one; correct callbacks are not refused.
"""

from __future__ import annotations

import difflib
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ire_optax

nnx = pytest.importorskip("flax.nnx")
import ire_optax.nnx as ire_nnx  # noqa: E402  (needs Flax)

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


class MLP(nnx.Module):
  """Parameters only."""

  def __init__(self, *, rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


class BNNet(nnx.Module):
  """With non-parameter state: BatchNorm statistics and a dropout RNG stream."""

  def __init__(self, *, rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.bn(self.hidden(x)))))


def loss_fn(model, batch):
  logits = model(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def batches(n=3):
  key = jax.random.key(1)
  return [{"x": jax.random.normal(jax.random.fold_in(key, i), (8, 6)),
           "y": jax.random.randint(jax.random.fold_in(key, 50 + i), (8,), 0, 3)}
          for i in range(n)]


ADAMW = lambda: optax.adamw(3e-2)
# name -> (transformation, the callbacks its update needs)
OPTIMIZERS = {
    "ire_grad_sq": (lambda: ire_optax.ire(ADAMW(), kappa=2.0, refresh_every=2), ()),
    "ire_fisher": (lambda: ire_optax.ire(ADAMW(), kappa=2.0, curvature="fisher"),
                   ("logits_fn",)),
    "ire_hutchinson": (lambda: ire_optax.ire(ADAMW(), kappa=2.0, curvature="hutchinson"),
                       ("grad_fn",)),
    "sam": (lambda: ire_optax.sam(ADAMW(), rho=0.1), ("grad_fn",)),
    "asam": (lambda: ire_optax.sam(ADAMW(), rho=0.5, adaptive=True), ("grad_fn",)),
    "gsam": (lambda: ire_optax.gsam(ADAMW(), rho=0.1, alpha=0.2), ("grad_fn",)),
    "sam_every_2": (lambda: ire_optax.sam(ADAMW(), rho=0.1, every_k=2), ("grad_fn",)),
    "msam": (None, ("grad_fn", "batch")),
    "sala": (lambda: ire_optax.sala(ADAMW(), sync_period=2, rho=0.2), ("grad_fn",)),
    "ire_sam": (lambda: ire_optax.ire(ire_optax.sam(ADAMW(), rho=0.1), kappa=2.0),
                ("grad_fn",)),
}


def make_tx(name, model):
  if name == "msam":
    return ire_optax.msam(ADAMW(), rho=0.1, num_microbatches=2, has_aux=True,
                          aux_init=ire_nnx.aux_init(model, nnx.BatchStat))
  return OPTIMIZERS[name][0]()


# -----------------------------------------------------------------------------
# The two routes
# -----------------------------------------------------------------------------


def nnx_route(name, model_cls, data):
  """The loop of docs/nnx.md: nnx.Optimizer, nnx.jit and the ire_optax.nnx helpers."""
  needs = OPTIMIZERS[name][1]
  model = model_cls(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(name, model), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    if name == "msam":
      grad_fn = ire_nnx.grad_fn(model, loss_fn, stats=nnx.BatchStat)
      optimizer.update(model, None, grad_fn=grad_fn, batch=batch)
      return ire_nnx.update_stats(model, optimizer)
    kwargs = {}
    if "logits_fn" in needs:
      kwargs["logits_fn"] = ire_nnx.of_params(model, lambda m: m(batch["x"]))
    (loss, grads), grad_fn = ire_nnx.value_and_grad(loss_fn, model, batch)
    if "grad_fn" in needs:
      kwargs["grad_fn"] = grad_fn
    optimizer.update(model, grads, **kwargs)
    return loss

  losses = [train_step(model, optimizer, b) for b in data]
  return (losses, nnx.state(model, nnx.Param), nnx.state(model, nnx.Not(nnx.Param)),
          nnx.state(optimizer, nnx.Not(nnx.OptState)), optimizer.opt_state, model, optimizer)


def functional_route(name, model_cls, data):
  """jax.jit with nnx.split / nnx.merge: parameters, other state and optimizer state apart."""
  needs = OPTIMIZERS[name][1]
  model = model_cls(rngs=nnx.Rngs(0))
  tx = make_tx(name, model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, rest, opt_state, batch):
    def loss_and_state(p, b):
      m = nnx.merge(graphdef, p, rest, copy=True)
      return loss_fn(m, b), (m, nnx.state(m, nnx.Not(nnx.Param)))

    if name == "msam":
      def grad_fn(p, mb):
        def f(q):
          loss, (m, _) = loss_and_state(q, mb)
          return loss, (loss, nnx.as_pure(nnx.state(m, nnx.BatchStat)))
        return jax.grad(f, has_aux=True)(p)

      updates, opt_state = tx.update(None, opt_state, params, grad_fn=grad_fn, batch=batch)
      loss, stats = ire_optax.sam_aux(opt_state)
      m = nnx.merge(graphdef, params, rest, copy=True)
      nnx.update(m, stats)
      counts = nnx.as_pure(nnx.state(m, nnx.RngCount))  # as a clean pass would advance them
      nnx.update(m, jax.tree.map(lambda c: c + 1, counts))
      return (optax.apply_updates(params, updates), nnx.state(m, nnx.Not(nnx.Param)),
              opt_state, loss)
    kwargs = {}
    if "grad_fn" in needs:
      kwargs["grad_fn"] = lambda p: jax.grad(lambda q: loss_and_state(q, batch)[0])(p)
    if "logits_fn" in needs:
      kwargs["logits_fn"] = lambda p: nnx.merge(graphdef, p, rest, copy=True)(batch["x"])
    (loss, (_, new_rest)), grads = jax.value_and_grad(
        loss_and_state, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
    return optax.apply_updates(params, updates), new_rest, opt_state, loss

  losses = []
  for b in data:
    params, rest, opt_state, loss = step(params, rest, opt_state, b)
    losses.append(loss)
  return losses, params, rest, opt_state


def assert_bitwise_equal(a, b):
  la, lb = jax.tree.leaves(nnx.as_pure(a)), jax.tree.leaves(nnx.as_pure(b))
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    if jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # two compiled train steps per case (~10-40 s each on 2 CPU cores)
@pytest.mark.parametrize("model_cls", [MLP, BNNet], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nnx_optimizer_loop_equals_functional_route_bit_for_bit(name, model_cls):
  data = batches()
  n_losses, n_params, n_rest, _, n_opt, model, optimizer = nnx_route(name, model_cls, data)
  f_losses, f_params, f_rest, f_opt = functional_route(name, model_cls, data)
  assert_bitwise_equal(n_params, f_params)
  assert_bitwise_equal(n_rest, f_rest)
  assert_bitwise_equal(n_opt, f_opt)
  assert_bitwise_equal(n_losses, f_losses)
  # The loop trained, and the other state moved where the model has one.
  p0 = nnx.state(model_cls(rngs=nnx.Rngs(0)), nnx.Param)
  assert any(not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(nnx.as_pure(p0)), jax.tree.leaves(nnx.as_pure(n_params)), strict=True))
  if model_cls is BNNet:
    stats0 = nnx.as_pure(nnx.state(model_cls(rngs=nnx.Rngs(0)), nnx.BatchStat))
    assert not np.array_equal(stats0["bn"]["mean"], nnx.as_pure(n_rest)["bn"]["mean"])
  if name == "sala":
    slow = ire_nnx.sala_eval_model(model, optimizer.opt_state)
    assert_bitwise_equal(nnx.state(slow, nnx.Param), ire_optax.sala_eval_params(f_opt))
    if model_cls is BNNet:
      assert slow.bn.use_running_average  # evaluation mode
    assert_bitwise_equal(nnx.state(model, nnx.Param), n_params)  # the model is unchanged


def test_ire_over_msam_under_nnx_optimizer():
  """mSAM's recipe passes updates=None, which nnx.Optimizer hands on as an empty nnx.State:
  IRE over mSAM takes it as None, as the functional route's None."""
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  batch = {"x": jnp.arange(32.0).reshape(8, 4) / 32, "y": jnp.arange(8) % 3}

  def loss(m, b):
    return optax.softmax_cross_entropy_with_integer_labels(m(b["x"]), b["y"]).mean()

  make = lambda: ire_optax.ire(ire_optax.msam(optax.sgd(0.1), rho=0.05, num_microbatches=2),
                               curvature="fisher")
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make()
  want, _ = tx.update(None, tx.init(params), params, batch=batch,
                      grad_fn=jax.grad(lambda p, mb: loss(nnx.merge(graphdef, p), mb)),
                      logits_fn=lambda p: nnx.merge(graphdef, p)(batch["x"]))
  before = jax.tree.map(jnp.copy, nnx.as_pure(params))
  optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
  optimizer.update(model, None, grad_fn=ire_nnx.grad_fn(model, loss), batch=batch,
                   logits_fn=ire_nnx.of_params(model, lambda m: m(batch["x"])))
  got = jax.tree.map(lambda a, b: a - b, nnx.as_pure(nnx.state(model, nnx.Param)), before)
  chex.assert_trees_all_close(got, nnx.as_pure(want), atol=1e-6)


def test_functional_route_can_differ():
  """The comparison above can fail: another rho gives other parameters."""
  data = batches(2)
  a = nnx_route("sam", BNNet, data)[1]
  old = OPTIMIZERS["sam"]
  OPTIMIZERS["sam"] = (lambda: ire_optax.sam(ADAMW(), rho=0.2), ("grad_fn",))
  try:
    b = functional_route("sam", BNNet, data)[1]
  finally:
    OPTIMIZERS["sam"] = old
  with pytest.raises(AssertionError):
    assert_bitwise_equal(a, b)


def test_sam_helper_uses_the_clean_pass_dropout_keys_and_drops_perturbed_state():
  """ire_optax.nnx.value_and_grad: grad_fn at the clean params is the clean gradient (same
  dropout mask), and the perturbed pass leaves the model's statistics and RNG alone."""
  model = BNNet(rngs=nnx.Rngs(0))
  batch = batches(1)[0]
  (_, grads), grad_fn = ire_nnx.value_and_grad(loss_fn, model, batch)
  after = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
  again = grad_fn(nnx.as_pure(nnx.state(model, nnx.Param)))
  assert_bitwise_equal(again, nnx.as_pure(grads))
  assert_bitwise_equal(nnx.state(model, nnx.Not(nnx.Param)), after)


def test_msam_update_stats_advances_the_dropout_rng_once_per_step():
  """mSAM's passes run on copies of the model: without update_stats advancing the RNG
  counters, every step would draw the same dropout masks."""
  model = BNNet(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx("msam", model), wrt=nnx.Param)
  count = lambda: [int(c) for c in jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.RngCount)))]
  start = count()
  assert start
  for batch in batches(3):
    optimizer.update(model, None, grad_fn=ire_nnx.grad_fn(model, loss_fn, stats=nnx.BatchStat),
                     batch=batch)
    ire_nnx.update_stats(model, optimizer)
  assert count() == [c + 3 for c in start]


# -----------------------------------------------------------------------------
# docs/nnx.md
# -----------------------------------------------------------------------------


def _sections():
  text = (DOCS / "nnx.md").read_text()
  out = {}
  for part in re.split(r"^## ", text, flags=re.M)[1:]:
    title = part.splitlines()[0].strip()
    out[title] = re.findall(r"```python\n(.*?)```", part, re.S)
  return text, out


@pytest.mark.slow  # compiles some twenty train steps
def test_page_python_blocks_run():
  pytest.importorskip("orbax.checkpoint")
  text, _ = _sections()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 12
  namespace: dict = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/nnx.md[block {i}]", "exec"), namespace)
  assert np.isfinite(float(namespace["loss"]))


def _code_lines(block):
  lines = []
  for line in block.splitlines():
    code = line.split("  #", 1)[0].rstrip()
    if code.strip() and not code.strip().startswith("#"):
      lines.append(code)
  return lines


def changed_lines(baseline, block):
  """Lines of ``block`` added to or changed from ``baseline`` (blank and comment lines not
  counted, nor trailing comments)."""
  base, new = _code_lines(baseline), _code_lines(block)
  ops = difflib.SequenceMatcher(None, base, new, autojunk=False).get_opcodes()
  return sum(j2 - j1 for tag, _, _, j1, j2 in ops if tag in ("replace", "insert"))


def _split_setup(block):
  """(the lines up to the one building nnx.Optimizer, the rest) of a loop."""
  lines = block.splitlines()
  i = next(i for i, line in enumerate(lines) if "nnx.Optimizer(" in line)
  return "\n".join(lines[:i + 1]), "\n".join(lines[i + 1:])


def glue_lines(baseline, block):
  """(transformation lines, glue lines): the changed lines of the setup, of the rest."""
  (b0, b1), (n0, n1) = _split_setup(baseline), _split_setup(block)
  return changed_lines(b0, n0), changed_lines(b1, n1)


def glue_table():
  _, s = _sections()
  base = s["The baseline: AdamW"][0]
  without = s["The same steps without `ire_optax.nnx`"]
  rows = [("IRE (`grad_sq`)", s["IRE"][0], s["IRE"][0]),
          ("IRE (`fisher`)", s["IRE"][1], without[0]),
          ("SAM, ASAM, GSAM, SAM every k, `ire(sam)`", s["SAM, ASAM and GSAM"][0], without[1]),
          ("mSAM with BatchNorm", s["mSAM with BatchNorm"][0], without[2]),
          ("SALA", s["SALA"][0], without[3])]
  lines = ["| optimizer | building the transformation | glue with `ire_optax.nnx` | "
           "glue without |", "| --- | --- | --- | --- |"]
  for name, a, b in rows:
    (tx, glue), (_, glue_without) = glue_lines(base, a), glue_lines(base, b)
    lines.append(f"| {name} | {tx} | {glue} | {glue_without} |")
  return "\n".join(lines)


def test_glue_table_is_counted_from_the_code():
  text, _ = _sections()
  begin, end = "<!-- glue-table begin -->\n", "\n<!-- glue-table end -->"
  table = text[text.index(begin) + len(begin):text.index(end)]
  assert table == glue_table(), "docs/nnx.md's table of glue lines is stale:\n" + glue_table()


def test_glue_count_counts_changed_and_added_lines():
  base = "a = 1\nb = 2  # two\n\nc = 3\n"
  assert changed_lines(base, base) == 0
  assert changed_lines(base, "a = 1\n# note\nb = 2\nc = 4\nd = 5\n") == 2
  assert changed_lines(base, "a = 1\nc = 3\n") == 0  # a removed line is not glue
  loop = "m = M()\no = nnx.Optimizer(m, t)\nstep()\n"
  assert glue_lines(loop, "m = M()\nt = T()\no = nnx.Optimizer(m, t)\nf = F()\nstep()\n") == (
      1, 1)


# -----------------------------------------------------------------------------
# Errors that name the NNX mistake
# -----------------------------------------------------------------------------

# name -> (transformation, the callback it calls)
CALLERS = {
    "sam": (lambda: ire_optax.sam(optax.sgd(0.1)), "grad_fn"),
    "asam": (lambda: ire_optax.sam(optax.sgd(0.1), adaptive=True), "grad_fn"),
    "gsam": (lambda: ire_optax.gsam(optax.sgd(0.1)), "grad_fn"),
    "sam_every_2": (lambda: ire_optax.sam(optax.sgd(0.1), every_k=2), "grad_fn"),
    "msam": (lambda: ire_optax.msam(optax.sgd(0.1), num_microbatches=2), "grad_fn"),
    "sala": (lambda: ire_optax.sala(optax.sgd(0.1)), "grad_fn"),
    "ire_hutchinson": (lambda: ire_optax.ire(optax.sgd(0.1), curvature="hutchinson"),
                       "grad_fn"),
    "ire_fisher": (lambda: ire_optax.ire(optax.sgd(0.1), curvature="fisher"), "logits_fn"),
    "ire_sam": (lambda: ire_optax.ire(ire_optax.sam(optax.sgd(0.1))), "grad_fn"),
}

# mistake -> (make the callback from (model, batch, graphdef, rest), exception, message)
MISTAKES = {
    "treats its argument as a Module": (
        lambda model, batch, gd, rest, cb: (
            (lambda m: nnx.grad(loss_fn)(m, batch)) if cb == "grad_fn" else
            (lambda m: m(batch["x"]))),
        TypeError, r"`(grad|logits)_fn` treats its argument as a Module \('State' object"),
    "returns Variable-wrapped state": (
        lambda model, batch, gd, rest, cb: (
            lambda p: nnx.grad(loss_fn)(nnx.merge(gd, p, rest, copy=True), batch)),
        ValueError, r"holds Flax NNX Variables \(nnx.Param, ...\), as nnx.grad returns"),
    "returns another tree": (
        lambda model, batch, gd, rest, cb: (
            (lambda p: {"hidden": p["hidden"]}) if cb == "grad_fn" else
            (lambda p: (p["hidden"]["kernel"], p["out"]["bias"]))),
        ValueError, r"must have the tree structure of `params`; got 2 leaves where `params` "
        r"has 4; missing \['out'\]\['bias'\], \['out'\]\['kernel'\]|`logits_fn` must return an "
        r"array of logits"),
    "differentiates the model it closes over": (
        lambda model, batch, gd, rest, cb: (
            (lambda p: nnx.as_pure(nnx.grad(loss_fn)(model, batch))) if cb == "grad_fn" else
            (lambda p: model(batch["x"]))),
        # Flax refuses the outer trace's model, or (a forward pass that writes nothing) the
        # output does not depend on the argument.
        ValueError, r"`(grad|logits)_fn` uses a Flax NNX Module or Variable it closes over|"
        r"what `(grad|logits)_fn` returns does not depend on its argument"),
    "ignores its argument": (
        lambda model, batch, gd, rest, cb: (
            (lambda p: nnx.as_pure(jax.grad(lambda q: loss_fn(nnx.merge(gd, q, rest, copy=True),
                                                            batch))(P0))) if cb == "grad_fn"
            else (lambda p: nnx.merge(gd, P0, rest, copy=True)(batch["x"]))),
        ValueError, r"what `(grad|logits)_fn` returns does not depend on its argument"),
}
P0 = nnx.as_pure(nnx.state(MLP(rngs=nnx.Rngs(3)), nnx.Param))


def _update_with(caller, callback):
  """One nnx.jit step of `caller` whose callback comes from `callback(model, batch, gd, rest)`."""
  make, cb = CALLERS[caller]
  model = MLP(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
  batch = batches(1)[0]

  @nnx.jit
  def step(model, optimizer, batch):
    gd, _, rest = nnx.split(model, nnx.Param, ...)
    fn = callback(model, batch, gd, rest, cb)
    if caller == "msam":
      fn1 = fn
      optimizer.update(model, None, grad_fn=lambda p, mb: fn1(p), batch=batch)
    else:
      optimizer.update(model, nnx.grad(loss_fn)(model, batch), **{cb: fn})

  step(model, optimizer, batch)
  return model


@pytest.mark.parametrize("mistake", list(MISTAKES))
@pytest.mark.parametrize("caller", list(CALLERS))
def test_nnx_mistake_raises_a_short_error_naming_it(caller, mistake):
  if caller == "ire_fisher" and mistake == "returns Variable-wrapped state":
    pytest.skip("logits are an array, not a tree like the parameters")
  callback, exc, match = MISTAKES[mistake]
  with pytest.raises(exc, match=match) as info:
    _update_with(caller, callback)
  message = str(info.value).split("\n----")[0]  # without JAX's note on filtered frames
  assert len(message) < 700, message
  assert "PyTreeDef" not in message
  if mistake != "returns another tree":
    assert "ire_optax.nnx." in message and "nnx.merge(graphdef" in message
    # The hand-written fix takes the other state's values before the clean pass (else the
    # perturbed pass draws other dropout masks).
    assert "rest = nnx.as_pure(rest)" in message


def test_a_helper_built_for_other_parameters_than_the_optimizers_names_wrt():
  model = MLP(rngs=nnx.Rngs(0))
  wrt = nnx.All(nnx.Param, nnx.PathContains("out"))
  optimizer = nnx.Optimizer(model, ire_optax.sam(optax.sgd(0.1), rho=0.05), wrt=wrt)

  @nnx.jit
  def step(model, optimizer, batch):
    (_, grads), grad_fn = ire_nnx.value_and_grad(loss_fn, model, batch, wrt=wrt)
    optimizer.update(model, grads, grad_fn=ire_nnx.grad_fn(model, loss_fn, batch))  # Param

  with pytest.raises(ValueError, match=r"do not match wrt=Param of this helper.*`wrt` given "
                                       r"to nnx.Optimizer"):
    step(model, optimizer, batches(1)[0])


def test_an_aux_without_aux_init_says_what_the_default_is():
  model = MLP(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ire_optax.sam(optax.sgd(0.1), has_aux=True), wrt=nnx.Param)
  with_acc = lambda m, b: (loss_fn(m, b), {"acc": jnp.float32(1.0)})
  with pytest.raises(ValueError, match=r"default aux \(no `aux_init`: a float32 scalar\).*"
                                       r"Pass `aux_init=`"):
    batch = batches(1)[0]
    (_, grads), grad_fn = ire_nnx.value_and_grad(with_acc, model, batch, has_aux=True)
    optimizer.update(model, grads, grad_fn=grad_fn)


def test_plain_jax_grad_fn_that_ignores_params_is_refused_for_every_optimizer():
  """No Flax: a grad_fn differentiating parameters it closes over, for each caller."""
  params = {"w": jnp.ones(3)}
  stale = {"w": jnp.full(3, 2.0)}
  loss = lambda p: jnp.sum(p["w"] ** 2)
  for caller, (make, cb) in CALLERS.items():
    tx = make()
    if cb == "logits_fn":
      kwargs = {"logits_fn": lambda p: jnp.stack([stale["w"], stale["w"]])}
    elif caller == "msam":
      kwargs = {"grad_fn": lambda p, mb: jax.grad(loss)(stale), "batch": {"x": jnp.ones(2)}}
    else:
      kwargs = {"grad_fn": lambda p: jax.grad(loss)(stale)}
    grads = None if caller == "msam" else jax.grad(loss)(params)
    with pytest.raises(ValueError, match="does not depend on its argument"):
      jax.jit(lambda p, s, g, kwargs=kwargs, tx=tx: tx.update(g, s, p, **kwargs))(
          params, tx.init(params), grads)


def _cond_grad(p):
  return jax.lax.cond(p["a"][0] > 0, lambda q: {"a": 2 * q["a"], "b": q["b"]},
                      lambda q: {"a": -q["a"], "b": q["b"]}, p)


def _scan_grad(p):
  def body(c, x):
    return c + x * p["a"], None
  total, _ = jax.lax.scan(body, jnp.zeros(2), jnp.arange(3.0))
  return {"a": total, "b": jnp.zeros_like(p["b"])}


CORRECT = {
    "part of the tree": lambda p: {"a": 2.0 * p["a"], "b": jnp.ones(2)},
    "lax.cond": _cond_grad,
    "lax.scan": _scan_grad,
    "a jitted function": jax.jit(lambda p: jax.tree.map(lambda x: 3.0 * x, p)),
}


@pytest.mark.parametrize("label", list(CORRECT))
@pytest.mark.parametrize("caller", ["sam", "gsam", "sala", "ire_hutchinson", "msam"])
def test_correct_grad_fn_is_not_refused_and_gives_the_same_result(caller, label):
  """The check traces the callback once and evaluates that trace: the same values as a
  plain call (compared with the gradient the callback gives at the ascent point)."""
  fn = CORRECT[label]
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.25])}
  tx = CALLERS[caller][0]()
  if caller == "msam":
    kwargs = {"grad_fn": lambda p, mb: fn(p), "batch": {"x": jnp.ones(2)}}
    grads = None
  else:
    kwargs = {"grad_fn": fn}
    grads = {"a": jnp.array([0.5, 1.0]), "b": jnp.array([1.0, -1.0])}
  u, _ = jax.jit(lambda p, s, g: tx.update(g, s, p, **kwargs))(params, tx.init(params), grads)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(u))
  if caller == "sam":  # SGD(0.1) on the gradient at the ascent point, computed here
    g = grads
    norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
    ascent = jax.tree.map(lambda p, gg: p + 0.05 * gg / (norm + 1e-12), params, g)
    want = jax.tree.map(lambda x: -0.1 * x, fn(ascent))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, want)


def test_grad_fn_with_aux_is_not_refused():
  params = {"a": jnp.array([1.0, -2.0])}
  loss = lambda p: jnp.sum(p["a"] ** 2)
  tx = ire_optax.sam(optax.sgd(0.1), has_aux=True)
  vg = lambda p: jax.value_and_grad(loss)(p)[::-1]
  _, state = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, grad_fn=vg))(
      params, tx.init(params))
  assert float(ire_optax.sam_aux(state)) > float(loss(params))  # the perturbed loss


def test_eager_callback_that_needs_concrete_values_still_runs():
  """Outside jit a grad_fn may use NumPy: it cannot be traced, so it is called unchecked."""
  params = {"w": jnp.array([1.0, 2.0])}
  g = lambda q: {"w": jnp.asarray(2.0 * np.asarray(q["w"]))}
  tx = ire_optax.sam(optax.sgd(0.1), rho=0.0)
  u, _ = tx.update(g(params), tx.init(params), params, grad_fn=g)
  np.testing.assert_allclose(u["w"], [-0.2, -0.4], rtol=1e-6)
  with pytest.raises(jax.errors.TracerArrayConversionError):  # under jit it never could
    jax.jit(lambda p, s: tx.update(g(p), s, p, grad_fn=g))(params, tx.init(params))
