"""The benchmark scripts' former shared module, kept while they move into the package.

Everything here lives in :mod:`benchmarks.data`, :mod:`benchmarks.timing`,
:mod:`benchmarks.schema` and :mod:`benchmarks.metrics`; scripts run as
``python benchmarks/NAME.py`` import it as ``_common`` (importing it puts the repository
root on ``sys.path``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks.data import *  # noqa: E402,F403
from benchmarks.data import DATA_ENV  # noqa: E402,F401
from benchmarks.metrics import *  # noqa: E402,F403
from benchmarks.metrics import quantile as _quantile  # noqa: E402,F401
from benchmarks.schema import *  # noqa: E402,F403
from benchmarks.schema import RESULTS, SCHEMA, _atomic_write, _jsonable  # noqa: E402,F401
from benchmarks.timing import *  # noqa: E402,F403
from benchmarks.timing import _block  # noqa: E402,F401
from examples.common.train import steps_to_reach  # noqa: E402,F401  (re-exported)
