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
# nor resumes, nor runs lookahead), by their argparse dest: they get no flag, so passing one is
# an error rather than silently ignored.
NOT_HERE = ("eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "no_checkpoint",
            "resume", "stop_after", "no_plot", "no_progress", "optimizer.la_sync_period",
            "optimizer.la_slow_step")
# The --opt names this script refuses (lookahead has no axis_name for the shard_map step).
NOT_COVERED = ("lookahead",)
# The default run name (--name).
RUN_NAME = "data_parallel-{placement}-{opt}"
USAGE = (
    "python -m examples.data_parallel --opt adamw+ire --steps 2000",
    "python -m examples.data_parallel --cpu-devices 8 --opt sam --size toy",
    "python -m examples.data_parallel --cpu-devices 8 --data-parallel shard_map --opt msam "
    "--size toy",
    "python -m examples.data_parallel --coordinator host0:12345 --num-processes 2 "
    "--process-id 0 --opt adamw+ire --steps 2000  # and --process-id 1 on the other host",
)


def make_parser() -> argparse.ArgumentParser:
  from examples.common import cli, config

  offered = [o for o in config.OPTIMIZERS if o not in NOT_COVERED]
  p = cli.make_parser(
      "llama", omit=NOT_HERE, prog="python -m examples.data_parallel",
      description=__doc__.split("\n\n")[0], usage=USAGE,
      helps={"optimizer.name": config.opt_help(offered),
             "optimizer.base": config.base_help(offered),
             "name": config.run_name_help(RUN_NAME.format(placement="<placement>",
                                                          opt="<opt>"))})
  g = p.add_argument_group("devices and hosts")
  g.add_argument("--data-parallel", choices=("gspmd", "shard_map"), default="gspmd",
                 help="placement of the train step (%(default)s)")
  g.add_argument("--cpu-devices", type=int, default=None,
                 help="emulate this many CPU devices per process (testing without "
                      "accelerators)")
  g.add_argument("--coordinator", default=None,
                 help="HOST:PORT of process 0 for multi-host runs, or 'auto' (TPU pods, "
                      "SLURM, Open MPI)")
  g.add_argument("--num-processes", type=int, default=None, metavar="N",
                 help="multi-host runs: the number of processes (one per host); needs "
                      "--coordinator (with 'auto': read from the cluster if not given)")
  g.add_argument("--process-id", type=int, default=None, metavar="I",
                 help="multi-host runs: this process's index, 0 .. N-1 (0 on the host of "
                      "--coordinator); needs --coordinator (with 'auto': read from the "
                      "cluster if not given)")
  return p


def check_hosts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """The multi-host flags, checked before any device is touched (``parser.error``): without
  ``--coordinator`` nothing would read ``--num-processes``/``--process-id``, and each host
  would train alone as process 0."""
  given = [f for f, v in (("--num-processes", args.num_processes),
                          ("--process-id", args.process_id)) if v is not None]
  if not args.coordinator:
    if given:
      parser.error(f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} "
                   "--coordinator HOST:PORT (or 'auto'): without it every process would train "
                   "alone, as process 0.")
    return
  if args.coordinator != "auto" and len(given) < 2:
    parser.error(f"--coordinator {args.coordinator} needs --num-processes and --process-id "
                 "(or --coordinator auto on a cluster that provides them).")
  if args.num_processes is not None and args.num_processes < 1:
    parser.error(f"--num-processes must be >= 1; got {args.num_processes}.")
  pid, num = args.process_id, args.num_processes
  if pid is not None and (pid < 0 or (num is not None and pid >= num)):
    parser.error(f"--process-id must be in 0 .. --num-processes - 1; got {pid} "
                 f"(--num-processes {num}).")


def setup_devices(args: argparse.Namespace) -> None:
  """Emulated CPU devices and ``jax.distributed`` (before any computation)."""
  import jax

  if args.cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  if args.coordinator == "auto":  # what is not given is read from the cluster's environment
    jax.distributed.initialize(num_processes=args.num_processes, process_id=args.process_id)
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
  check_hosts(parser, args)
  setup_devices(args)

  import jax
  import numpy as np

  from examples.common import cli, config, train

  cfg = cli.checked_config(parser, args, cli.get_config("llama"))
  n = jax.device_count()
  if cfg.batch_size % n:
    parser.error(f"--batch-size {cfg.batch_size} must divide by the {n} devices.")
  algo = cfg.optimizer.algorithm[0]
  if algo in NOT_COVERED:
    parser.error(f"the data-parallel example does not cover {algo}.")
  m_micro = cfg.optimizer.num_microbatches
  if args.data_parallel == "shard_map" and algo == "msam" and (cfg.batch_size // n) % m_micro:
    parser.error(f"--data-parallel shard_map splits every device's batch into mSAM's "
                 f"micro-batches: the per-device batch, --batch-size {cfg.batch_size} / {n} "
                 f"devices = {cfg.batch_size // n}, must be divisible by --num-microbatches "
                 f"{m_micro}.")
  # Auto axes: GSPMD propagates the batch sharding through model code that has no
  # sharding annotations (an Explicit mesh would ask the model for them).
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  replicated, split = (jax.sharding.NamedSharding(mesh, P()),
                       jax.sharding.NamedSharding(mesh, P("data")))
  with cli.usage_errors(parser):  # what the data or the model refuse, as examples.llama
    d = train.load_data(cfg)
    m = train.build_model(cfg, d)
    task = train.make_task(cfg, d)
  graphdef, params, stats = train.split_model(m.model)
  spec, step_fn = build_step(cfg, args.data_parallel, mesh, graphdef, stats, task.num_classes)
  state = put(train.TrainState(params, stats, spec.tx.init(params),
                               train.initial_loss_scale(cfg.precision)), replicated)

  out = Path(cfg.out) / (cfg.name or RUN_NAME.format(placement=args.data_parallel,
                                                     opt=spec.name))
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
