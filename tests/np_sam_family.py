"""Plain-NumPy (float64) references of the SAM family's newer pieces.

Written from the formulas (Foret et al. 2021, Kwon et al. 2021, Zhuang et al.
2022), without calling JAX, Optax or ire_optax: a softmax classifier with a
hand-derived gradient, SAM's ascent with a perturbation mask, GSAM's
surrogate-gap direction, SAM every k steps, and SGD / AdamW on dicts.
"""

from __future__ import annotations

import numpy as np

from tests.np_reference import NpAdamWTree, NpSGD

__all__ = ["NpAdamWTree", "NpSGDTree", "np_grad", "np_loss", "np_perturbed", "np_gsam_direction",
           "np_run", "make_problem"]


def make_problem(seed=0, batch=16, d_in=5, d_out=3):
  """Params ``{"w": (d_in, d_out), "b": (d_out,), "s": (d_out,)}``, inputs and labels.

  ``logits = (x @ w + b) * s``: ``s`` plays the role of a norm scale.
  """
  rng = np.random.default_rng(seed)
  params = {
      "w": 0.5 * rng.standard_normal((d_in, d_out)),
      "b": 0.1 * rng.standard_normal(d_out),
      "s": 1.0 + 0.1 * rng.standard_normal(d_out),
  }
  x = rng.standard_normal((batch, d_in))
  y = rng.integers(0, d_out, size=batch)
  return params, x, y


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def np_loss(p, x, y):
  z = (x @ p["w"] + p["b"]) * p["s"]
  logp = np.log(_softmax(z))
  return -np.mean(logp[np.arange(len(y)), y])


def np_grad(p, x, y):
  a = x @ p["w"] + p["b"]
  z = a * p["s"]
  dz = _softmax(z)
  dz[np.arange(len(y)), y] -= 1.0
  dz /= len(y)
  da = dz * p["s"]
  return {"w": x.T @ da, "b": da.sum(0), "s": (dz * a).sum(0)}


def np_perturbed(p, g, rho, *, mask=None, adaptive=False, eta=0.0, eps=1e-12):
  """θ + ε, ε = ρ T² g / (‖T g‖ + eps) over the leaves with ``mask[k]`` True only."""
  keys = [k for k in p if mask is None or mask[k]]
  t = {k: (np.abs(p[k]) + eta) if adaptive else np.ones_like(p[k]) for k in p}
  norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in keys))
  return {k: p[k] + rho * t[k] ** 2 * g[k] / (norm + eps) if k in keys else p[k] for k in p}


def np_gsam_direction(g, gp, alpha, eps=1e-12):
  """g_p − α (g − ⟨g, ĝ_p⟩ ĝ_p), ĝ_p = g_p / (‖g_p‖ + eps)."""
  norm = np.sqrt(sum(np.sum(v ** 2) for v in gp.values()))
  unit = {k: v / (norm + eps) for k, v in gp.items()}
  dot = sum(np.sum(g[k] * unit[k]) for k in g)
  return {k: gp[k] - alpha * (g[k] - dot * unit[k]) for k in g}


class NpSGDTree:
  """:class:`NpSGD` leaf by leaf on a dict: ``step(g, p) -> updates``."""

  def __init__(self, lr, momentum=0.0, nesterov=False):
    self._make = lambda: NpSGD(lr, momentum=momentum, nesterov=nesterov)
    self._leaves: dict = {}
    self.t = 0

  def step(self, g, p):
    out = {k: self._leaves.setdefault(k, self._make()).step(g[k], p[k], self.t) for k in g}
    self.t += 1
    return out


def np_run(p, batches, base, steps, *, rho, alpha=None, every_k=1, mask=None, adaptive=False,
           eta=0.0, eps=1e-12):
  """Parameters after each step of SAM (``alpha=None``) or GSAM, ascent every ``every_k``.

  ``rho`` and ``alpha`` may be functions of the step. ``batches[t % len]`` is
  step t's ``(x, y)``.
  """
  out = []
  for t in range(steps):
    x, y = batches[t % len(batches)]
    g = np_grad(p, x, y)
    if t % every_k == 0:
      r = rho(t) if callable(rho) else rho
      gp = np_grad(np_perturbed(p, g, r, mask=mask, adaptive=adaptive, eta=eta, eps=eps), x, y)
      if alpha is not None and r != 0:
        a = alpha(t) if callable(alpha) else alpha
        gp = np_gsam_direction(g, gp, a, eps)
      g = gp
    u = base.step(g, p)
    p = {k: p[k] + u[k] for k in p}
    out.append(p)
  return out
