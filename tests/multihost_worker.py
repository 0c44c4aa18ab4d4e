"""One process of the 2-process CPU test in ``tests/test_multihost.py``.

Run as ``python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz``:
the process joins a ``jax.distributed`` cluster on ``127.0.0.1:PORT`` with
:data:`LOCAL_DEVICES` emulated CPU devices (gloo collectives), trains the
small MLP of :func:`train` data-parallel over *all* devices of all processes,
and writes the final parameters (fully replicated, read from a local shard) to
``OUT.npz``. The same :func:`train` with ``mesh=None`` is the single-process
reference computed by the test. Exit status 3 means that this JAX cannot run
multi-process CPU collectives (the test then skips).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

LOCAL_DEVICES = 4
STEPS = 3
GLOBAL_BATCH = 64
UNSUPPORTED = 3


def data(steps: int = STEPS) -> list[dict[str, np.ndarray]]:
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  b = GLOBAL_BATCH
  return [{"x": x[t * b:(t + 1) * b], "y": y[t * b:(t + 1) * b]} for t in range(steps)]


def init_params() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
      "w1": rng.normal(0, 0.3, (64, 16)).astype(np.float32),
      "b1": rng.normal(0, 0.1, (16,)).astype(np.float32),
      "w2": rng.normal(0, 0.3, (16, 10)).astype(np.float32),
      "b2": rng.normal(0, 0.1, (10,)).astype(np.float32),
  }


# (optimizer, how the train step is distributed). "shard_map" uses the
# optimizer's axis_name; "gspmd" is plain jit over the sharded global batch.
RUNS = ("sam:shard_map", "adamw_ire:shard_map", "adamw_ire:gspmd", "sam:gspmd")


def make_tx(name: str, axis_name: str | None):
  import optax

  import ire_optax

  if name == "sam":
    return ire_optax.sam(optax.sgd(0.05, momentum=0.9), rho=0.1, axis_name=axis_name)
  return ire_optax.ire(optax.adamw(1e-2, weight_decay=0.1), kappa=2.0, gamma=0.5,
                       refresh_every=2, axis_name=axis_name)


def train(run: str, mesh=None) -> dict[str, np.ndarray]:
  """Trains ``STEPS`` steps; ``mesh=None``: on one device with the whole batch."""
  import jax
  import jax.numpy as jnp
  import optax

  name, mode = run.split(":")
  P = jax.sharding.PartitionSpec
  axis = "d" if (mesh is not None and mode == "shard_map") else None
  tx = make_tx(name, axis)

  def loss(p, batch):
    h = jnp.tanh(batch["x"] @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

  def step(params, state, batch):
    # Per-device gradient (shard_map's check_vma would otherwise psum it).
    local = jax.lax.pcast(params, axis, to="varying") if axis else params
    g = jax.grad(loss)(local, batch)
    if name == "sam":
      u, state = tx.update(g, state, params, grad_fn=lambda q: jax.grad(loss)(q, batch))
    else:
      g = jax.lax.pmean(g, axis) if axis else g
      u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  params, batches = init_params(), data()
  if mesh is None:
    put_rep = put_dp = jnp.asarray
    fn = jax.jit(step)
  else:
    rep = jax.sharding.NamedSharding(mesh, P())
    dp = jax.sharding.NamedSharding(mesh, P("d"))
    # Every process holds the global arrays in NumPy; each device receives its shard.
    put = lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
    put_rep = lambda a: put(a, rep)
    put_dp = lambda a: put(a, dp)
    if axis:
      fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("d")),
                                 out_specs=(P(), P())))
    else:
      fn = jax.jit(step)
  state = tx.init(jax.tree.map(jnp.asarray, params))  # on this process's first device
  params = jax.tree.map(put_rep, params)
  state = jax.tree.map(lambda a: put_rep(np.asarray(a)), state)
  for batch in batches:
    params, state = fn(params, state, jax.tree.map(put_dp, batch))
  # Replicated result: any local shard holds the whole array.
  return {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}


def main(argv: list[str]) -> int:
  process_id, num_processes, port, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, KeyError, ValueError) as e:  # pragma: no cover - old JAX
    print(f"MULTIHOST_UNSUPPORTED: no gloo CPU collectives in jax {jax.__version__}: {e}",
          flush=True)
    return UNSUPPORTED
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)
  try:
    assert jax.process_count() == num_processes
    assert jax.local_device_count() == LOCAL_DEVICES
    assert jax.device_count() == LOCAL_DEVICES * num_processes
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    results = {}
    for run in RUNS:
      t0 = time.perf_counter()
      for k, v in train(run, mesh).items():
        results[f"{run}/{k}"] = v
      print(f"process {process_id}: {run} done in {time.perf_counter() - t0:.1f}s", flush=True)
    np.savez(Path(out), **results)
  finally:
    jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  sys.exit(main(sys.argv))
