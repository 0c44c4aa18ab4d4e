"""Two processes on localhost train like one process (``jax.distributed``, CPU).

The test starts two copies of ``tests/multihost_worker.py``; each joins a
``jax.distributed`` cluster on ``127.0.0.1`` with 4 emulated CPU devices, so the
global mesh has 8 devices in 2 processes and every collective (the ``pmean``
of SAM and IRE under ``shard_map``, the all-reduces GSPMD inserts under plain
``jit``) crosses the process boundary through JAX's gloo CPU collectives. A few
training steps of SAM and of AdamW+IRE must give the parameters of the same
training in this (single) process on one device.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from tests import multihost_worker as worker

TIMEOUT_S = 240
NUM_PROCESSES = 2


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp_path: Path) -> tuple[list[Path], list[str]]:
  port = _free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # the workers set their own device count (not conftest's 8)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
  script = str(Path(__file__).with_name("multihost_worker.py"))
  outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
  procs = [
      subprocess.Popen([sys.executable, script, str(i), str(NUM_PROCESSES), str(port), str(out)],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i, out in enumerate(outs)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    logs = [p.communicate()[0] for p in procs]
    pytest.fail(f"the worker processes did not finish in {TIMEOUT_S}s:\n" + "\n".join(
        log[-3000:] for log in logs))
  codes = [p.returncode for p in procs]
  if any(c == worker.UNSUPPORTED for c in codes):
    pytest.skip(f"this JAX ({jax.__version__}) cannot run multi-process CPU collectives: "
                + " ".join(line for log in logs for line in log.splitlines()
                           if "MULTIHOST_UNSUPPORTED" in line))
  assert codes == [0] * NUM_PROCESSES, "\n\n".join(
      f"process {i} exited with {c}:\n{log[-4000:]}" for i, (c, log) in enumerate(zip(
          codes, logs, strict=True)))
  return outs, logs


def test_two_processes_train_like_one(tmp_path):
  outs, logs = _launch(tmp_path)
  results = [dict(np.load(out)) for out in outs]
  for run in worker.RUNS:
    want = worker.train(run, mesh=None)  # this process, one device, whole batch
    init = worker.init_params()
    for i, res in enumerate(results):
      got = {k: res[f"{run}/{k}"] for k in want}
      chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5,
                                  custom_message=f"{run}, process {i}")
    # Not vacuous: the parameters moved.
    assert not np.allclose(want["w2"], init["w2"])
  # The two processes hold identical replicas.
  for k in results[0]:
    np.testing.assert_array_equal(results[0][k], results[1][k])
  assert all("done" in log for log in logs)
