"""Sharpness toolkit: Hessian spectra, traces, diagonals and SAM sharpness.

Pure, jittable functions over any loss ``loss_fn(params, batch) -> scalar`` and
any parameter pytree (bfloat16 allowed, computed in float32, sharded arrays
allowed). The batch is an argument, so one compiled function serves every
batch. Use as ``import ire_optax.sharpness as sh``; see ``docs/sharpness.md``.

* :func:`hvp` -- Hessian-vector product (forward-over-reverse).
* :func:`top_hessian_eigs` -- top-``k`` eigenpairs (Lanczos with full
  reorthogonalisation, or power iteration with deflation).
* :func:`hessian_trace` -- Hutchinson trace estimate and its standard error.
* :func:`hessian_diagonal` -- the diagonal estimates IRE ranks by.
* :func:`sam_sharpness` / :func:`m_sharpness` -- SAM's
  ``max_{||eps|| <= rho} L(theta + eps) - L(theta)``, on the batch or averaged
  over micro-batches.
* :func:`summary` -- loss, top eigenvalue, trace and SAM sharpness in one call.
"""

from ire_optax._src.sharpness import (
    hessian_diagonal,
    hessian_trace,
    hvp,
    m_sharpness,
    sam_sharpness,
    summary,
    top_hessian_eigs,
)

__all__ = [
    "hessian_diagonal",
    "hessian_trace",
    "hvp",
    "m_sharpness",
    "sam_sharpness",
    "summary",
    "top_hessian_eigs",
]
