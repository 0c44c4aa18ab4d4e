"""ire_optax: sharpness-aware and implicit-regularization optimizers for Optax.

Each optimizer is a factory returning an ``optax.GradientTransformationExtraArgs``
that wraps any Optax optimizer:

* :func:`ire` -- Implicit Regularization Enhancement (Wang et al., NeurIPS 2024),
  with :func:`ire_flat_mask` to read its mask, and the exact sort-free selection
  behind it (:func:`flat_mask`, :func:`kth_smallest`).
* :func:`sam` -- Sharpness-Aware Minimization (Foret et al., 2021) and adaptive
  SAM (Kwon et al., 2021) with ``adaptive=True``.
* :func:`msam` -- micro-batch averaged SAM (Behdin et al., 2023).
* :func:`sala` -- Sharpness-Aware Lookahead (Tan et al., TPAMI 2024), with
  :func:`sala_eval_params` (its slow, evaluation weights) and :func:`sala_stats`.

:mod:`ire_optax.sharpness` measures sharpness (Hessian spectra, traces,
diagonals, SAM sharpness). The algorithms' definitions are in docs/design.md.
"""

# Each public name is imported here and listed in __all__ (tests/test_docs.py checks
# both, and that docs/api.rst documents it).
# --- IRE ---
from ire_optax._src.ire import IREState, ire, ire_flat_mask
from ire_optax._src.selection import flat_mask, kth_smallest, selection_method
# --- SAM / mSAM ---
from ire_optax._src.sam import SAMState, msam, sam, sam_aux
# --- GSAM ---
from ire_optax._src.gsam import gsam
# --- SALA ---
from ire_optax._src.sala import SALAState, sala, sala_eval_params, sala_stats
# --- schedules tied to the learning rate ---
from ire_optax._src.schedules import lr_proportional
# --- sharpness toolkit ---
from ire_optax import sharpness

__version__ = "0.1.0"  # the only place the version is written (pyproject.toml reads it)

__all__ = [
    "IREState",
    "SALAState",
    "SAMState",
    "flat_mask",
    "gsam",
    "ire",
    "ire_flat_mask",
    "kth_smallest",
    "lr_proportional",
    "msam",
    "sala",
    "sala_eval_params",
    "sala_stats",
    "sam",
    "sam_aux",
    "selection_method",
    "sharpness",
]
