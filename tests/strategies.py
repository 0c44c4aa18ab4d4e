"""Hypothesis strategies shared by the selection tests."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import strategies as st

# Values drawn from a small pool produce many ties; the pool has both zeros, negatives,
# denormals, huge values and infinities.
POOL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, -1e-30, 1e30, 1e-45, np.inf, -np.inf, 3.0]


def float_trees(pool, *, pool_side: int, random_side: int, random_min_dims: int,
                max_leaves: int):
  """Lists of float32 leaves (a tree's leaves): each leaf either drawn from ``pool`` (ties)
  or of random floats in [-1e6, 1e6]; empty and scalar leaves included."""
  leaf = st.one_of(
      hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                              max_side=pool_side),
                 elements=st.sampled_from(pool)),
      hnp.arrays(np.float32, hnp.array_shapes(min_dims=random_min_dims, max_dims=2,
                                              min_side=0, max_side=random_side),
                 elements=st.floats(-1e6, 1e6, width=32)),
  )
  return st.lists(leaf, min_size=1, max_size=max_leaves)
