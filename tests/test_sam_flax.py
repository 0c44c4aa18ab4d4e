"""SAM / mSAM train steps on a Flax NNX CNN with BatchNorm (docs/sam.md's recipe).

Batch statistics must come from the clean pass only: the perturbed pass runs in
train mode with the *old* statistics and its statistic updates are discarded.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ire_optax

nnx = pytest.importorskip("flax.nnx")


class CNN(nnx.Module):

  def __init__(self, *, rngs):
    self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.out = nnx.Linear(4, 10, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.conv(x)))
    return self.out(h.mean(axis=(1, 2)))


def data(n=32):
  datasets = pytest.importorskip("sklearn.datasets")
  digits = datasets.load_digits()
  x = jnp.asarray(digits.images[:n, :, :, None] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[:n], jnp.int32)
  return {"image": x, "label": y}


def make_model():
  model = CNN(rngs=nnx.Rngs(0))
  model.train()
  return nnx.split(model, nnx.Param, nnx.BatchStat)


GRAPHDEF, PARAMS0, STATS0 = make_model()


def loss_fn(params, batch_stats, batch):
  """Train-mode loss; returns (loss, new batch statistics)."""
  model = nnx.merge(GRAPHDEF, params, batch_stats, copy=True)
  logits = model(batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, nnx.state(model, nnx.BatchStat)


def sam_train_step(tx):
  @jax.jit
  def train_step(params, batch_stats, opt_state, batch):
    # Clean pass: loss, gradient and the new batch statistics.
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, batch)

    # Perturbed pass: old statistics, its statistic updates are discarded.
    def grad_fn(p):
      return jax.grad(loss_fn, has_aux=True)(p, batch_stats, batch)[0]

    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return train_step


def msam_train_step(tx):
  @jax.jit
  def train_step(params, batch_stats, opt_state, batch):
    def grad_fn(p, microbatch):  # old statistics, updates discarded
      return jax.grad(loss_fn, has_aux=True)(p, batch_stats, microbatch)[0]

    updates, opt_state = tx.update(None, opt_state, params, grad_fn=grad_fn, batch=batch)
    # mSAM's clean passes run inside `update`; the new statistics (and the loss)
    # come from one forward pass at the unperturbed parameters.
    loss, new_stats = loss_fn(params, batch_stats, batch)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return train_step


def test_sam_step_with_batchnorm_uses_clean_statistics():
  batch = data()
  rho, lr = 0.5, 0.1
  tx = ire_optax.sam(optax.sgd(lr), rho=rho)
  params, stats, opt_state, loss = sam_train_step(tx)(PARAMS0, STATS0, tx.init(PARAMS0), batch)

  # Statistics equal those of one plain clean forward pass ...
  _, clean_stats = loss_fn(PARAMS0, STATS0, batch)
  chex.assert_trees_all_close(stats, clean_stats, rtol=1e-6, atol=1e-7)
  # ... and differ from the initial ones and from what the perturbed pass gives.
  g = jax.grad(loss_fn, has_aux=True)(PARAMS0, STATS0, batch)[0]
  norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda p, gg: p + rho * gg / norm, PARAMS0, g)
  _, perturbed_stats = loss_fn(perturbed, STATS0, batch)
  diff = lambda a, b: max(float(jnp.abs(x - y).max())
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  assert diff(stats, STATS0) > 1e-3
  assert diff(stats, perturbed_stats) > 1e-4

  # Parameters took one SGD step along the SAM gradient (old statistics).
  g_sam = jax.grad(loss_fn, has_aux=True)(perturbed, STATS0, batch)[0]
  want = jax.tree.map(lambda p, gg: p - lr * gg, PARAMS0, g_sam)
  chex.assert_trees_all_close(params, want, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(loss))


@pytest.mark.parametrize("which", ["sam", "asam", "msam"])
def test_train_steps_run_and_learn(which):
  batch = data()
  tx = {
      "sam": lambda: ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05),
      "asam": lambda: ire_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.5, adaptive=True),
      "msam": lambda: ire_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.05,
                                     num_microbatches=4),
  }[which]()
  step = msam_train_step(tx) if which == "msam" else sam_train_step(tx)
  params, stats, opt_state = PARAMS0, STATS0, tx.init(PARAMS0)
  losses = []
  for _ in range(6):
    params, stats, opt_state, loss = step(params, stats, opt_state, batch)
    losses.append(float(loss))
  chex.assert_tree_all_finite((params, stats))
  assert losses[-1] < losses[0], losses
