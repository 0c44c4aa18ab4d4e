"""Data-parallel training of the Llama-style decoder over every visible device (and host).

The model, data, optimizer flags and the jitted train step are those of
``examples/llama.py`` (``examples/common``); this script adds the placement:

* ``--data-parallel gspmd`` (default): the *unchanged* train step under
  ``jax.jit``; the training state is replicated over a ``("data",)`` mesh of
  all devices and every batch is split over it. XLA inserts the gradient
  all-reduces (and SAM's, IRE's, SALA's global reductions); the optimizers need
  no ``axis_name``. mSAM's micro-batches are then slices of the *global* batch.
* ``--data-parallel shard_map``: an explicit SPMD step under ``jax.shard_map``
  in which each device computes its own gradient and the optimizers are built
  with ``axis_name="data"``: SAM/ASAM/SALA/IRE average across devices
  themselves, and ``msam`` perturbs every device with its own micro-batches
  (``--num-microbatches`` per device: m-sharpness over
  ``devices x num_microbatches`` micro-batches).

``--batch-size`` is the global batch; it must divide by the number of devices.

Several hosts (one process per host, every process runs the same command)::

  # on host 0 (its address reachable by the others), and on host i = 1..N-1:
  python examples/data_parallel.py --coordinator HOST0:12345 --num-processes N \\
      --process-id i --opt adamw+ire --steps 2000

On Cloud TPU pods and SLURM/Open MPI GPU clusters ``--coordinator auto`` lets
``jax.distributed.initialize()`` read the cluster environment. To try it on one
machine with CPU devices, start two processes with ``--cpu-devices 4
--coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0`` (and ``1``).
Every process builds the same global batch from the same seed; each device
receives only its slice (``jax.make_array_from_callback``).

Metrics go to ``OUT/NAME/metrics.jsonl`` (written by process 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_parser() -> argparse.ArgumentParser:
  from examples.common import cli

  p = cli.make_parser("llama")
  p.prog = "examples/data_parallel.py"
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


def shard_map_optimizer(args: argparse.Namespace, axis: str):
  """The optimizer of ``--opt`` built with ``axis_name`` (for the shard_map step)."""
  import ire_optax
  from examples.common import optim

  algo, use_ire = optim.parse_name(args.opt, getattr(args, "ire", False))
  if algo == "lookahead":
    raise ValueError("--data-parallel shard_map supports adamw, sgd, sam, asam, msam and sala "
                     "(+ire); use --data-parallel gspmd for lookahead.")
  warmup = optim.to_steps(args.warmup_steps, args.steps)
  schedule = optim.lr_schedule(args.lr, args.steps, warmup, args.schedule, args.final_lr_ratio)
  base = optim.build_base(args, algo if algo in ("adamw", "sgd") else args.base or "adamw",
                          schedule)
  rho = args.rho if args.rho is not None else optim.DEFAULT_RHO.get(algo, 0.05)
  family = "plain"
  if algo in ("sam", "asam"):
    tx, family = ire_optax.sam(base, rho=rho, adaptive=algo == "asam", axis_name=axis), "sam"
  elif algo == "msam":
    tx, family = ire_optax.msam(base, rho=rho, num_microbatches=args.num_microbatches,
                                microbatch_mode=args.microbatch_mode, axis_name=axis), "msam"
  elif algo == "sala":
    tx, family = ire_optax.sala(base, sync_period=args.sala_sync_period,
                                slow_step_size=args.sala_slow_step, rho=rho,
                                axis_name=axis), "sam"
  else:
    tx = base
  curvature = None
  if use_ire:
    curvature = args.ire_curvature
    if algo == "msam" and curvature != "fisher":
      raise ValueError("IRE over mSAM needs --ire-curvature fisher.")
    ire_warm = warmup if args.ire_warmup is None else optim.to_steps(args.ire_warmup, args.steps)
    tx = ire_optax.ire(tx, kappa=args.ire_kappa, gamma=args.ire_gamma,
                       refresh_every=args.ire_refresh_every, warmup_steps=ire_warm,
                       curvature=curvature, seed=args.seed, axis_name=axis)
  return tx, family, curvature, schedule


def shard_map_step(graphdef, stats, tx, family, curvature, mesh, axis: str):
  """``(params, opt_state, batch) -> (params, opt_state, loss)`` as an SPMD program.

  Inside, ``batch`` is this device's slice. ``jax.lax.pcast(..., to="varying")``
  makes ``jax.grad`` return this device's gradient (under ``check_vma`` JAX
  would otherwise sum it over the axis); the optimizers average it.
  """
  import jax
  import optax

  from examples.common import optim, train

  P = jax.sharding.PartitionSpec

  def loss_fn(q, b):
    logits, _ = train.apply_model(graphdef, q, stats, b["x"], train=True)
    return optim.cross_entropy(logits, b["y"])[0]

  def step(params, opt_state, batch):
    local = jax.lax.pcast(params, axis, to="varying")
    extra = {}
    if family == "msam":
      loss, grads = loss_fn(local, batch), None
      extra = {"grad_fn": jax.grad(loss_fn), "batch": batch}
    else:
      loss, grads = jax.value_and_grad(loss_fn)(local, batch)
      if family == "plain":
        grads = jax.lax.pmean(grads, axis)  # plain Optax and IRE: the step averages
      if family == "sam" or curvature == "hutchinson":
        extra["grad_fn"] = lambda q: jax.grad(loss_fn)(q, batch)
    if curvature == "fisher":
      extra["logits_fn"] = lambda q: train.apply_model(graphdef, q, stats, batch["x"],
                                                       train=True)[0]
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, jax.lax.pmean(loss, axis)

  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(axis)),
                               out_specs=(P(), P(), P())), donate_argnums=(0, 1))


def main(argv: list[str] | None = None) -> dict:
  args = make_parser().parse_args(argv)
  setup_devices(args)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from examples.common import data as data_lib
  from examples.common import models, optim, train

  axis = "data"
  # Auto axes: GSPMD propagates the batch sharding through model code that has no
  # sharding annotations (an Explicit mesh would ask the model for them).
  mesh = jax.make_mesh((jax.device_count(),), (axis,),
                       axis_types=(jax.sharding.AxisType.Auto,))
  n = jax.device_count()
  if args.batch_size % n:
    raise SystemExit(f"--batch-size {args.batch_size} must divide by the {n} devices.")
  P = jax.sharding.PartitionSpec
  replicated = jax.sharding.NamedSharding(mesh, P())
  split = jax.sharding.NamedSharding(mesh, P(axis))

  def put(tree, sharding):
    """Global arrays from host NumPy copies: each device receives only its slice."""
    return jax.tree.map(lambda a: jax.make_array_from_callback(
        np.shape(a), sharding, lambda idx: np.asarray(a)[idx]), tree)

  d = data_lib.load_text(args.data, tokenizer=args.tokenizer, max_chars=args.max_chars)
  m = models.build_llama(args.size, vocab_size=d.vocab_size, seed=args.seed, dim=args.dim,
                         depth=args.depth, heads=args.heads, ffn_dim=args.ffn_dim,
                         tie_embeddings=args.tie_embeddings or None)
  batcher = data_lib.TextBatcher(d.train, args.batch_size, args.seq_len, seed=args.seed)
  graphdef, params, stats = train.split_model(m.model)

  if args.data_parallel == "gspmd":
    spec = optim.build_optimizer(args, args.steps, default_base="adamw")
    if spec.lookahead:
      raise SystemExit("the data-parallel example does not cover lookahead.")
    opt_state = spec.tx.init(params)
    state = put(train.TrainState(params, stats, opt_state), replicated)
    step_fn = train.make_train_step(graphdef, spec, num_classes=d.vocab_size, seed=args.seed,
                                    fast_compile=args.fast_compile)

    def run_step(state, batch, t):
      state, metrics = step_fn(state, batch, jnp.asarray(t, jnp.int32))
      return state, metrics["loss"]

    params_of = lambda state: state.params
    name = spec.name
  else:
    tx, family, curvature, _ = shard_map_optimizer(args, axis)
    opt_state = tx.init(params)
    state = put((params, opt_state), replicated)
    step_fn = shard_map_step(graphdef, stats, tx, family, curvature, mesh, axis)

    def run_step(state, batch, t):
      params, opt_state, loss = step_fn(*state, batch)
      return (params, opt_state), loss

    params_of = lambda state: state[0]
    name = args.opt

  run_name = args.name or f"data_parallel-{args.data_parallel}-{name}"
  out = Path(args.out) / run_name
  lead = jax.process_index() == 0
  if lead:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(vars(args), indent=2, default=str))
    print(f"{jax.process_count()} process(es), {n} devices ({jax.local_device_count()} local, "
          f"{jax.devices()[0].platform}) | {args.data_parallel} | llama {args.size} "
          f"({m.num_params:,} params) | {name} | global batch {args.batch_size} "
          f"= {args.batch_size // n} per device", flush=True)
  log = (out / "metrics.jsonl").open("w") if lead else None
  t_start = t_window = time.perf_counter()
  tokens, loss = 0, float("nan")
  for t in range(args.steps):
    state, loss_arr = run_step(state, put(batcher.batch_at(t), split), t)
    tokens += args.batch_size * args.seq_len
    done = t + 1
    if done % args.log_every == 0 or done == args.steps:
      loss = float(np.asarray(loss_arr.addressable_data(0)))
      now = time.perf_counter()
      rec = {"step": done, "loss": loss, "tok_per_s": tokens / (now - t_window),
             "time": now - t_start}
      tokens, t_window = 0, now
      if lead:
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(f"step {done:6d} | loss {loss:.4f} | {rec['tok_per_s']:,.0f} tok/s", flush=True)
  if log is not None:
    log.close()
  final_params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params_of(state))
  if args.coordinator:
    jax.distributed.shutdown()
  return {"loss": loss, "params": final_params, "devices": n}


if __name__ == "__main__":
  main()
