"""ire_optax: sharpness-aware and implicit-regularization optimizers for Optax.

Public API (each a factory returning an ``optax.GradientTransformation``):

* :func:`ire` -- Implicit Regularization Enhancement (Wang et al., NeurIPS 2024).
* :func:`sam` -- Sharpness-Aware Minimization (Foret et al., 2021) and adaptive
  SAM (Kwon et al., 2021) with ``adaptive=True``.
* :func:`msam` -- micro-batch averaged SAM (Behdin et al., 2023).
* :func:`sala` -- Sharpness-Aware Lookahead (Tan et al., TPAMI 2024) and
  :func:`sala_eval_params` to read its slow (evaluation) weights.
"""

# --- IRE (issue 2) ---
from ire_optax._src.ire import IREState, ire, ire_flat_mask  # noqa: F401
from ire_optax._src.selection import flat_mask, kth_smallest  # noqa: F401
# --- SAM / mSAM (issue 3) ---
from ire_optax._src.sam import SAMState, msam, sam  # noqa: F401
# --- SALA (issue 4) ---
from ire_optax._src.sala import SALAState, sala, sala_eval_params, sala_stats  # noqa: F401
# --- sharpness toolkit (issue 6) ---
from ire_optax import sharpness  # noqa: F401

__version__ = "0.1.0"
