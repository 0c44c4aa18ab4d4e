"""Data-parallel training of the Llama-style decoder over every visible device (and host).

The model, data, optimizer flags and the jitted train step are those of
``python -m examples.llama`` (``examples/common``); this script adds the placement:

* ``--data-parallel gspmd`` (default): the *unchanged* train step under
  ``jax.jit``; the training state is replicated over a ``("data",)`` mesh of
  all devices and every batch is split over it. XLA inserts the gradient
  all-reduces (and SAM's, IRE's, SALA's global reductions); the optimizers need
  no ``axis_name``. mSAM's micro-batches are then slices of the *global* batch.
* ``--data-parallel shard_map``: the same train step as the body of a
  ``jax.shard_map`` over ``"data"``, in which each device computes its own
  gradient: the optimizer is built with ``axis_name="data"``
  (``build_optimizer(..., axis_name=...)``, ``step_function(...,
  axis_name=...)``), so SAM/ASAM/SALA/IRE average across devices themselves,
  the step averages the plain optimizers' gradient, and ``msam`` perturbs every
  device with its own micro-batches (``--num-microbatches`` per device:
  m-sharpness over ``devices x num_microbatches`` micro-batches).

``--batch-size`` is the global batch; it must divide by the number of devices.

Several hosts (one process per host, every process runs the same command)::

  # on host 0 (its address reachable by the others), and on host i = 1..N-1:
  python -m examples.data_parallel --coordinator HOST0:12345 --num-processes N \\
      --process-id i --opt adamw+ire --steps 2000

On Cloud TPU pods and SLURM/Open MPI GPU clusters ``--coordinator auto`` lets
``jax.distributed.initialize()`` read the cluster environment. To try it on one
machine with CPU devices, start two processes with ``--cpu-devices 4
--coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0`` (and ``1``).
Every process builds the same global batch from the same seed; each device
receives only its slice (``jax.make_array_from_callback``).

Metrics go to ``OUT/NAME/metrics.jsonl`` (written by process 0). This script trains and
logs; it has no flags for evaluation, checkpoints or resuming (``python -m examples.llama``
has them).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any

# JAX, the models and the optimizers are imported inside the functions: the
# device options must be set (setup_devices) before anything touches a device.


# The Llama example's settings this script does not use (it neither evaluates, checkpoints
# nor resumes): they get no flag, so passing one is an error rather than silently ignored.
NOT_HERE = ("eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "no_checkpoint",
            "resume", "stop_after", "no_plot", "no_progress")


def make_parser() -> argparse.ArgumentParser:
  from examples.common import cli

  p = cli.make_parser("llama", omit=NOT_HERE)
  p.prog = "python -m examples.data_parallel"
  p.description = __doc__.split("\n\n")[0]
  g = p.add_argument_group("devices and hosts")
  g.add_argument("--data-parallel", choices=("gspmd", "shard_map"), default="gspmd",
                 help="placement of the train step (%(default)s)")
  g.add_argument("--cpu-devices", type=int, default=None,
                 help="emulate this many CPU devices per process (testing without "
                      "accelerators)")
  g.add_argument("--coordinator", default=None,
                 help="HOST:PORT of process 0 for multi-host runs, or 'auto' (TPU pods, "
                      "SLURM, Open MPI)")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)
  return p


def setup_devices(args: argparse.Namespace) -> None:
  """Emulated CPU devices and ``jax.distributed`` (before any computation)."""
  import jax

  if args.cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  if args.coordinator == "auto":
    jax.distributed.initialize()
  elif args.coordinator:
    # Cross-process collectives of CPU devices (GPUs and TPUs bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def put(tree, sharding):
  """Global arrays from host NumPy copies: each device receives only its slice."""
  import jax
  import numpy as np

  return jax.tree.map(lambda a: jax.make_array_from_callback(
      np.shape(a), sharding, lambda idx: np.asarray(a)[idx]), tree)


def build_step(cfg, placement: str, mesh, graphdef, stats, num_classes: int):
  """``(spec, step)``: the optimizer and the train step of ``placement`` over ``mesh`` (not
  for lookahead, which :func:`main` refuses)."""
  import jax

  from examples.common import optim, train

  P = jax.sharding.PartitionSpec
  axis = mesh.axis_names[0]
  loss_options = dict(num_classes=num_classes, label_smoothing=cfg.label_smoothing,
                      label_noise=cfg.label_noise, seed=cfg.seed, precision=cfg.precision)
  if placement == "gspmd":
    # The unchanged step: XLA partitions it along the batch's sharding.
    spec = optim.build_optimizer(cfg.optimizer, cfg.steps, seed=cfg.seed, model_stats=stats)
    return spec, train.make_train_step(graphdef, spec, **loss_options,
                                       fast_compile=cfg.fast_compile,
                                       branch_hints=cfg.branch_hints)
  spec = optim.build_optimizer(cfg.optimizer, cfg.steps, seed=cfg.seed, axis_name=axis,
                               model_stats=stats)
  body = train.step_function(graphdef, spec, **loss_options, axis_name=axis)

  def placed(state, batch, step, hints=()):
    # state and step replicated, the batch split; the returned state and metrics
    # are replicated (the step averages what differs between devices).
    return jax.shard_map(functools.partial(body, hints=hints), mesh=mesh,
                         in_specs=(P(), P(axis), P()), out_specs=(P(), P()))(state, batch, step)

  jitted = jax.jit(placed, donate_argnums=0, static_argnames="hints",
                   compiler_options=train.compiler_options(cfg.fast_compile))
  return spec, train.TrainStep(jitted, train.hints_at(spec, cfg.branch_hints, cfg.precision))


def train_steps(cfg, step_fn, state, batch_at, log) -> tuple[Any, float]:
  """Runs ``cfg.steps`` steps; logs loss and tokens per second to ``log`` (None: quiet).

  ``batch_at(t)`` is step t's global batch, placed; returns the final state and loss.
  """
  import numpy as np

  t_start = t_window = time.perf_counter()
  tokens, loss = 0, float("nan")
  for t in range(cfg.steps):
    state, metrics = step_fn(state, batch_at(t), np.int32(t))
    tokens += cfg.batch_size * cfg.data.seq_len
    done = t + 1
    if done % cfg.log_every == 0 or done == cfg.steps:
      loss = float(np.asarray(metrics["loss"].addressable_data(0)))
      now = time.perf_counter()
      rec = {"step": done, "loss": loss, "tok_per_s": tokens / (now - t_window),
             "time": now - t_start}
      tokens, t_window = 0, now
      if log is not None:
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(f"step {done:6d} | loss {loss:.4f} | {rec['tok_per_s']:,.0f} tok/s", flush=True)
  return state, loss


def main(argv: list[str] | None = None) -> dict:
  parser = make_parser()
  args = parser.parse_args(argv)
  setup_devices(args)

  import jax
  import numpy as np

  from examples.common import cli, config, train

  cfg = cli.checked_config(parser, args, cli.get_config("llama"))
  n = jax.device_count()
  if cfg.batch_size % n:
    parser.error(f"--batch-size {cfg.batch_size} must divide by the {n} devices.")
  if cfg.optimizer.algorithm[0] == "lookahead":
    parser.error("the data-parallel example does not cover lookahead.")
  # Auto axes: GSPMD propagates the batch sharding through model code that has no
  # sharding annotations (an Explicit mesh would ask the model for them).
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  replicated, split = (jax.sharding.NamedSharding(mesh, P()),
                       jax.sharding.NamedSharding(mesh, P("data")))
  d = train.load_data(cfg)
  m = train.build_model(cfg, d)
  task = train.make_task(cfg, d)
  graphdef, params, stats = train.split_model(m.model)
  spec, step_fn = build_step(cfg, args.data_parallel, mesh, graphdef, stats, task.num_classes)
  state = put(train.TrainState(params, stats, spec.tx.init(params),
                               train.initial_loss_scale(cfg.precision)), replicated)

  out = Path(cfg.out) / (cfg.name or f"data_parallel-{args.data_parallel}-{spec.name}")
  lead = jax.process_index() == 0
  if lead:
    out.mkdir(parents=True, exist_ok=True)
    record = dict(config.to_dict(cfg), data_parallel=args.data_parallel)
    (out / "config.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"{jax.process_count()} process(es), {n} devices ({jax.local_device_count()} local, "
          f"{jax.devices()[0].platform}) | {args.data_parallel} | llama {cfg.model.size} "
          f"({m.num_params:,} params) | {spec.name} | global batch {cfg.batch_size} "
          f"= {cfg.batch_size // n} per device", flush=True)
  batch_at = lambda t: put(task.batch_at(t), split)
  # Every step variant compiles before the clock starts: the rates time training only.
  compile_s = step_fn.compile(state, batch_at(0), range(cfg.steps))
  if lead:
    print(f"compiled the train step in {compile_s:.1f}s", flush=True)
  with (out / "metrics.jsonl").open("w") if lead else contextlib.nullcontext() as log:
    state, loss = train_steps(cfg, step_fn, state, batch_at, log)
  final_params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state.params)
  if args.coordinator:
    jax.distributed.shutdown()
  return {"loss": loss, "params": final_params, "devices": n}


if __name__ == "__main__":
  main()
