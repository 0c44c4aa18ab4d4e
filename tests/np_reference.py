"""Independent plain-NumPy references of the base optimizers and of IRE.

Written from the formulas (docs/design.md §1 and Optax's documented update rules),
in float64, without calling optax or ire_optax.
"""

from __future__ import annotations

import math

import numpy as np


class NpSGD:
  """SGD with optional (Nesterov) momentum and coupled weight decay, as optax.sgd/trace."""

  def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    self.lr, self.mu, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay
    self.m = None

  def step(self, g, p, t):
    g = g + self.wd * p
    if self.mu:
      self.m = g if self.m is None else g + self.mu * self.m
      d = g + self.mu * self.m if self.nesterov else self.m
    else:
      d = g
    lr = self.lr(t) if callable(self.lr) else self.lr
    return -lr * d


class NpAdamW:
  """AdamW as optax.adamw: bias-corrected moments, eps outside the sqrt, decoupled wd."""

  def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4):
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
    self.m = self.v = None
    self.n = 0

  def step(self, g, p, t):
    if self.m is None:
      self.m, self.v = np.zeros_like(g), np.zeros_like(g)
    self.n += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    mh = self.m / (1 - self.b1**self.n)
    vh = self.v / (1 - self.b2**self.n)
    lr = self.lr(t) if callable(self.lr) else self.lr
    return -lr * (mh / (np.sqrt(vh) + self.eps) + self.wd * p)


class NpAdamWTree:
  """:class:`NpAdamW` applied leaf by leaf to a dict of arrays: ``step(g, p) -> updates``."""

  def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8, wd=1e-4):
    self._make = lambda: NpAdamW(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    self._leaves: dict = {}

  def step(self, g, p):
    return {k: self._leaves.setdefault(k, self._make()).step(g[k], p[k], None) for k in g}


def canon_keys(x):
  """``x`` as float32 with the selection's ties made equal: -0.0 ties with +0.0, and XLA
  flushes denormals to zero, so they tie with 0 too (NaN stays NaN)."""
  x = np.asarray(x, np.float32)
  return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)


def np_ordered_keys(x):
  """The selection's uint32 keys in plain NumPy: unsigned order = float order over
  :func:`canon_keys` (negatives bit-flipped, positives with the sign bit set), NaN largest."""
  x = canon_keys(x)
  bits = x.view(np.uint32)
  keys = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
  return np.where(np.isnan(x), np.uint32(0xFFFFFFFF), keys).astype(np.uint32)


def np_flat_mask(h, gamma):
  """Mask of the k = max(1, floor(gamma N)) smallest entries, ties at tau included (full sort)."""
  h = np.asarray(h, np.float64)
  k = max(1, math.floor(gamma * h.size))
  tau = np.sort(h)[k - 1]
  return (h <= tau).astype(np.float64)


class NpIRE:
  """Algorithm 1 (Practical IRE) of Wang et al. with the grad_sq estimator."""

  def __init__(self, base, kappa, gamma, refresh_every, warmup_steps, curvature=None):
    self.base, self.kappa, self.gamma = base, kappa, gamma
    self.K, self.Tw = refresh_every, warmup_steps
    self.curvature = curvature or (lambda g, p: g * g)
    self.mask = None
    self.t = 0

  def step(self, g, p):
    t = self.t
    delta = self.base.step(g, p, t)
    if self.mask is None:
      self.mask = np.zeros_like(g)
    if t >= self.Tw and (t - self.Tw) % self.K == 0:
      self.mask = np_flat_mask(self.curvature(g, p), self.gamma)
    kappa = self.kappa(t) if callable(self.kappa) else self.kappa
    self.t += 1
    return delta + kappa * self.mask * delta
