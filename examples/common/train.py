"""One training loop for every example: jitted functional step, eval, logs, checkpoints.

The model is split once into its graph definition, its parameters and its
other state (BatchNorm statistics), both as pure nested dicts of arrays::

    graphdef, params, stats = nnx.split(model, nnx.Param, ...)

and every step is the pure function ``(TrainState, batch, step) -> (TrainState,
metrics)`` compiled once with ``jax.jit``. What the step computes depends on
the optimizer family (:class:`~examples.common.optim.OptSpec`):

* plain (AdamW, SGD, Lookahead, IRE over them): one ``value_and_grad``.
* SAM, ASAM, SALA: the clean ``value_and_grad`` plus ``grad_fn(params)`` for the
  optimizer to call at the perturbed point.
* mSAM: ``grad_fn(params, microbatch)`` + ``batch``; mSAM computes every
  gradient (clean and perturbed, per micro-batch) itself, and its clean passes
  return the logged loss and the BatchNorm statistics (``ire_optax.sam_aux``):
  two gradients' worth in all, no extra forward pass.
* SAM and ASAM log the perturbed loss ``L(θ+ε)`` their ``grad_fn`` computes
  anyway and the sharpness ``L(θ+ε) − L(θ)`` (free).
* IRE adds ``logits_fn(params)`` ("fisher": labels sampled from the model) or
  ``grad_fn(params)`` ("hutchinson").

**BatchNorm rule.** Batch statistics come from the clean pass only: every
extra pass (``grad_fn`` at SAM's perturbed point, ``logits_fn``, mSAM's
micro-batch passes) starts from the statistics the clean pass started from,
and whatever statistics it computes are discarded. In training mode BatchNorm
normalises with the current batch's moments, so the stored statistics only
matter for evaluation.

Batches are a pure function of the step and checkpoints hold the whole
``TrainState`` and the step, so ``--resume`` continues bit-identically.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ire_optax

from . import optim, plots


class TrainState(NamedTuple):
  params: Any  # pure dict (or optax.LookaheadParams of pure dicts)
  stats: Any  # pure dict of the non-parameter state (BatchNorm statistics)
  opt_state: Any
  # --precision float16: the dynamic loss scale {"scale": float32, "counter": int32}
  loss_scale: Any = ()


PRECISIONS = ("float32", "bfloat16", "float16")
INITIAL_LOSS_SCALE = 2.0**15


def initial_loss_scale(precision: str, scale: float = INITIAL_LOSS_SCALE) -> Any:
  """The ``loss_scale`` field of a fresh :class:`TrainState` for ``precision``."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
  if precision != "float16":
    return ()
  return {"scale": jnp.asarray(scale, jnp.float32), "counter": jnp.zeros((), jnp.int32)}


def split_model(model: nnx.Module) -> tuple[Any, dict, dict]:
  """``(graphdef, params, stats)`` with params and stats as pure nested dicts."""
  graphdef, params, stats = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def apply_model(graphdef, params, stats, x, *, train: bool) -> tuple[jax.Array, dict]:
  """Runs the model functionally: ``(logits, new_stats)``."""
  model = nnx.merge(graphdef, params, stats)
  logits = model(x, train=train)
  return logits, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))


def eval_params(spec: optim.OptSpec, state: TrainState):
  """The weights to evaluate: SALA's and Lookahead's slow weights, else the params."""
  if spec.sala:
    return ire_optax.sala_eval_params(state.opt_state)
  if spec.lookahead:
    return state.params.slow
  return state.params


def step_function(graphdef, spec: optim.OptSpec, *, num_classes: int,
                  label_smoothing: float = 0.0, label_noise: float = 0.0, seed: int = 0,
                  axis_name: str | None = None, precision: str = "float32") -> Callable:
  """The pure ``(state, batch, step) -> (state, metrics)`` for this optimizer (not jitted).

  ``batch`` is ``{"x": inputs, "y": integer targets}``; ``step`` an int32 scalar
  (it seeds the label noise, so the same step always sees the same noise).

  ``precision`` is the dtype of the training passes' compute (the parameters,
  the optimizer and evaluation stay float32). ``"float16"`` uses dynamic loss
  scaling (``jmp``, ``docs/mixed_precision.md``): every gradient of the step --
  the clean one and those the optimizer takes through ``grad_fn`` (SAM's
  perturbed pass, mSAM's micro-batches, SALA's SAM step, Hutchinson's HVPs) --
  is scaled by the same ``state.loss_scale`` and unscaled before the optimizer
  sees it; a step whose gradient or update is not finite is skipped (parameters,
  statistics and optimizer state unchanged) and the scale halves. IRE's
  ``fisher`` pass runs in float32.

  With ``axis_name`` the function is the body of a data-parallel
  ``jax.shard_map`` over that axis: ``state`` and ``step`` are replicated,
  ``batch`` is this device's slice, and ``spec`` must have been built with the
  same ``axis_name`` (:func:`examples.common.optim.build_optimizer`). Every
  device differentiates its own slice; the step averages the gradient of the
  plain optimizers (AdamW, SGD and IRE over them), SAM, ASAM, mSAM and SALA
  average theirs themselves, and the logged metrics and BatchNorm statistics are
  averaged over the axis, so that the returned state and metrics are replicated.
  """
  tx = spec.tx
  if axis_name is not None and spec.lookahead:
    raise ValueError("lookahead is not available with an axis_name.")
  initial_loss_scale(precision)  # checks the name
  compute_dtype = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[precision]
  scaled = precision == "float16"
  if scaled:
    import jmp  # the examples' [examples] extra

  def to_compute(tree):
    if compute_dtype is None:
      return tree
    return jax.tree.map(
        lambda v: v.astype(compute_dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree)

  def pmean(tree):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

  def step_fn(state: TrainState, batch, step, hints: tuple = ()):
    params, stats, opt_state, loss_scale = state
    if scaled:
      ls = jmp.DynamicLossScale(loss_scale["scale"], loss_scale["counter"])
    y = batch["y"]
    if label_noise > 0:
      key = jax.random.fold_in(jax.random.key(seed), step)
      if axis_name is not None:  # independent noise on every device's slice
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
      y = optim.label_noise(key, y, num_classes, label_noise)
    batch = {"x": batch["x"], "y": y}
    p = params.fast if spec.lookahead else params
    if axis_name is not None:
      # The parameters are replicated: marked as varying over the axis, jax.grad
      # returns this device's gradient instead of its sum over the axis.
      p = jax.lax.pcast(p, axis_name, to="varying")

    def loss_fn(q, b):
      logits, new_stats = apply_model(graphdef, to_compute(q), stats, to_compute(b["x"]),
                                      train=True)
      new_stats = jax.tree.map(lambda n, o: n.astype(o.dtype), new_stats, stats)
      loss, acc = optim.cross_entropy(logits.astype(jnp.float32), b["y"],
                                      label_smoothing=label_smoothing)
      return loss, (new_stats, acc)

    def value_and_grad(q, b):
      """``((loss, (stats, acc)), gradient)``; under loss scaling the gradient is unscaled."""
      if not scaled:
        return jax.value_and_grad(loss_fn, has_aux=True)(q, b)

      def scaled_loss(q):
        loss, aux = loss_fn(q, b)
        return ls.scale(loss), (loss, aux)

      (_, out), g = jax.value_and_grad(scaled_loss, has_aux=True)(q)
      return out, ls.unscale(g)

    def grad_fn(q, b=batch):  # gradient only: its BatchNorm statistics are dropped
      return value_and_grad(q, b)[1]

    def micro_grad_fn(q, b):  # mSAM: the clean passes' loss and statistics come back as aux
      (loss, (new_stats, acc)), g = value_and_grad(q, b)
      return g, {"loss": loss, "acc": acc, "stats": new_stats}

    def grad_and_loss_fn(q, b=batch):  # SAM: the perturbed loss comes back as aux
      (loss, _), g = value_and_grad(q, b)
      return g, loss

    extra: dict[str, Any] = dict(hints)  # static branch hints (spec.hints)
    if spec.family == "msam":
      grads = None
      extra["grad_fn"] = micro_grad_fn
      extra["batch"] = batch
    else:
      (loss, (new_stats, acc)), grads = value_and_grad(p, batch)
      if spec.family == "plain":
        grads = pmean(grads)  # plain Optax and IRE: the step averages the gradient
      if spec.family == "sam" or spec.curvature == "hutchinson":
        extra["grad_fn"] = grad_and_loss_fn if spec.sam_aux else grad_fn
    if spec.curvature == "fisher":
      extra["logits_fn"] = lambda q: apply_model(graphdef, q, stats, batch["x"], train=True)[0]

    old = (params, stats, opt_state)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    if spec.family == "msam":
      aux = ire_optax.sam_aux(opt_state)
      loss, acc, new_stats = aux["loss"], aux["acc"], aux["stats"]
    loss, acc, new_stats = pmean((loss, acc, new_stats))
    metrics = {"loss": loss, "acc": acc, "lr": spec.schedule(step)}
    if scaled:
      # Every gradient of the step shares the scale: a non-finite one makes the update
      # non-finite, and the whole step is skipped (on every device alike).
      finite = jmp.all_finite((grads, updates))
      if axis_name is not None:
        finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name).astype(bool)
      metrics["loss_scale"] = ls.loss_scale
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
      ls = ls.adjust(finite)
      loss_scale = {"scale": ls.loss_scale, "counter": ls.counter}
      params, new_stats, opt_state = jmp.select_tree(finite, (params, new_stats, opt_state),
                                                     old)
    if spec.sam_aux:
      perturbed = pmean(ire_optax.sam_aux(opt_state))
      metrics["perturbed_loss"] = perturbed
      metrics["sharpness"] = perturbed - loss
    if grads is not None:
      g = grads if spec.family == "plain" else pmean(grads)
      metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                                          for x in jax.tree.leaves(g)))
    if spec.curvature is not None:
      mask = jax.tree.leaves(ire_optax.ire_flat_mask(opt_state))
      metrics["ire_flat_fraction"] = (sum(jnp.sum(m, dtype=jnp.float32) for m in mask)
                                      / sum(m.size for m in mask))
    if spec.sala:
      metrics.update({f"sala_{k}": v for k, v in ire_optax.sala_stats(opt_state).items()})
    return TrainState(params, new_stats, opt_state, loss_scale), metrics

  return step_fn


def make_train_step(graphdef, spec: optim.OptSpec, *, num_classes: int,
                    label_smoothing: float = 0.0, label_noise: float = 0.0,
                    seed: int = 0, fast_compile: bool = False,
                    branch_hints: str = "auto", precision: str = "float32") -> TrainStep:
  """:func:`step_function` under ``jax.jit`` (the state's buffers are donated).

  Returns a :class:`TrainStep`, ``(state, batch, step) -> (state, metrics)``
  (:meth:`TrainStep.compile` compiles its variants ahead). ``fast_compile``
  compiles without XLA's backend optimisations: a few times faster to compile,
  slower to run (for tests and smoke runs). ``branch_hints``: ``"on"`` passes
  the optimizer the static hints of the step (``spec.hints``: which steps do
  IRE's refresh or SALA's SAM step), one compiled step per distinct hint, the
  step number read on the host; ``"off"`` one compiled step whose occasional
  work runs under ``lax.cond``; ``"auto"`` (on): the hints follow from the step
  number exactly, so the results are the same, while a plain step makes no
  host round trip on GPU and XLA:CPU runs the occasional work outside a
  conditional, many times faster (``docs/performance.md``). The ``step``
  passed must be the optimizer's own step count (as this loop keeps it).
  """
  step_fn = step_function(graphdef, spec, num_classes=num_classes,
                          label_smoothing=label_smoothing, label_noise=label_noise, seed=seed,
                          precision=precision)
  jitted = jax.jit(step_fn, donate_argnums=0, static_argnames="hints",
                   compiler_options=compiler_options(fast_compile))
  if branch_hints not in ("auto", "on", "off"):
    raise ValueError(f"branch_hints must be 'auto', 'on' or 'off'; got {branch_hints!r}.")
  use = branch_hints != "off"
  return TrainStep(jitted, spec.hints if use else None)


class TrainStep:
  """A jitted train step ``(state, batch, step) -> (state, metrics)`` and its variants.

  With branch hints, every distinct hint (an IRE refresh step, a SALA or
  SAM-every-k ascent step, a plain step) is its own compiled program, picked on
  the host from the step number. :meth:`compile` compiles, ahead of time, every
  variant that a range of steps uses, so that a timed loop compiles nothing;
  later calls run the compiled programs (the same programs ``jax.jit`` would
  compile on first use: the results are the same). A variant not compiled
  ahead compiles on first use, as under plain ``jax.jit``.
  """

  def __init__(self, jitted: Any, hints_at: Callable[[int], tuple] | None = None):
    self.jitted = jitted
    self.hints_at = hints_at
    self.compiled: dict[tuple, Any] = {}

  def hints(self, step) -> tuple:
    """The static hints of ``step`` (``()`` without branch hints)."""
    return () if self.hints_at is None else self.hints_at(int(step))

  def compile(self, state: TrainState, batch, steps: Iterable[int]) -> float:
    """Compiles every variant that ``steps`` use; the seconds it took (0 if all were)."""
    t0 = time.perf_counter()
    step = np.int32(0)
    for hints in dict.fromkeys(self.hints(t) for t in steps):
      if hints not in self.compiled:
        self.compiled[hints] = self.jitted.lower(state, batch, step,
                                                 **self._static(hints)).compile()
    return time.perf_counter() - t0

  def _static(self, hints: tuple) -> dict:
    return {} if self.hints_at is None else {"hints": hints}

  def __call__(self, state: TrainState, batch, step):
    hints = self.hints(step)
    compiled = self.compiled.get(hints)
    if compiled is None:
      return self.jitted(state, batch, step, **self._static(hints))
    return compiled(state, batch, np.int32(step) if isinstance(step, int) else step)


def compiler_options(fast_compile: bool) -> dict | None:
  """XLA options of ``--fast-compile`` (backend optimisations off), else None."""
  return {"xla_backend_optimization_level": 0} if fast_compile else None


def _eval_sums(graphdef, params, stats, batch):
  logits, _ = apply_model(graphdef, params, stats, batch["x"], train=False)
  w = batch["w"]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch["y"][..., None].astype(jnp.int32), -1)[..., 0]
  correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(correct * w), jnp.sum(w)


@functools.cache
def _eval_fn(fast_compile: bool) -> Callable:
  # One jitted function per setting, shared by all runs of this process: runs of
  # the same model (equal graphdefs) reuse its compilation.
  return jax.jit(_eval_sums, static_argnums=0, compiler_options=compiler_options(fast_compile))


def evaluate(graphdef, params, stats, batches: Iterable[dict], *,
             fast_compile: bool = False) -> dict[str, float]:
  """Mean loss (no smoothing, clean labels) and accuracy over the held-out batches."""
  fn = _eval_fn(fast_compile)
  tot = np.zeros(3)
  for b in batches:
    tot += np.asarray([float(v) for v in fn(graphdef, params, stats, b)])
  loss = tot[0] / max(tot[2], 1.0)
  return {"eval_loss": float(loss), "eval_acc": float(tot[1] / max(tot[2], 1.0))}


# -----------------------------------------------------------------------------
# Logging
# -----------------------------------------------------------------------------


class MetricsLog:
  """Appends one JSON record per line to ``metrics.jsonl``; writes ``metrics.csv`` at the end."""

  def __init__(self, run_dir: Path, *, resume_step: int | None):
    self.path = run_dir / "metrics.jsonl"
    self.records: list[dict] = []
    if resume_step is not None and self.path.exists():
      # Keep what was logged up to the checkpoint; later lines will be redone.
      for line in self.path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("step", 0) <= resume_step:
          self.records.append(rec)
    self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

  def write(self, record: dict) -> None:
    self.records.append(record)
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def write_csv(self) -> Path:
    keys: list[str] = []
    for r in self.records:
      keys += [k for k in r if k not in keys]
    out = self.path.with_suffix(".csv")
    with out.open("w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=keys)
      w.writeheader()
      w.writerows(self.records)
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
  """The records of a run's ``metrics.jsonl``."""
  path = Path(run_dir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_to_reach(curve: Iterable[tuple[int, float]], target: float) -> int | None:
  """The first step of ``(step, loss)`` pairs whose loss is <= ``target``; None if never.

  The speed-up measure of Wang et al. (2024) is the ratio of two such steps.
  """
  for step, loss in curve:
    if loss <= target + 1e-12:
      return int(step)
  return None


# -----------------------------------------------------------------------------
# The loop
# -----------------------------------------------------------------------------


def add_train_args(parser: argparse.ArgumentParser) -> None:
  """Options of the loop shared by every example."""
  g = parser.add_argument_group("training")
  g.add_argument("--steps", type=int, default=500, help="optimizer steps (%(default)s)")
  g.add_argument("--batch-size", type=int, default=128, help="(%(default)s)")
  g.add_argument("--seed", type=int, default=0, help="model init, data order, noise")
  g.add_argument("--eval-every", type=int, default=100,
                 help="evaluate on held-out data every N steps and at the end (0: end only)")
  g.add_argument("--eval-batches", type=int, default=None,
                 help="cap on held-out batches per evaluation (default: all)")
  g.add_argument("--log-every", type=int, default=10,
                 help="log training metrics every N steps (%(default)s)")
  g.add_argument("--fast-compile", action="store_true",
                 help="compile without XLA backend optimisations: starts sooner, runs "
                      "slower (smoke tests)")
  g.add_argument("--branch-hints", choices=("auto", "on", "off"), default="auto",
                 help="compile one step per kind of step (IRE refresh, SALA SAM step) and "
                      "pick it on the host from the step number, instead of lax.cond: no "
                      "host round trip per step on GPU, no slow conditional on CPU; auto = "
                      "on (%(default)s)")
  g.add_argument("--precision", choices=PRECISIONS, default="float32",
                 help="compute dtype of the training passes (params, optimizer and evaluation "
                      "stay float32); float16 uses dynamic loss scaling shared by all of a "
                      "step's gradients and skips non-finite steps (%(default)s)")
  g = parser.add_argument_group("output")
  g.add_argument("--out", default="runs", help="output root directory (%(default)s)")
  g.add_argument("--name", default=None,
                 help="run name (default: <example>-<opt>); the run writes to OUT/NAME/")
  g.add_argument("--ckpt-every", type=int, default=0,
                 help="save an Orbax checkpoint every N steps (and at the end); 0: end only")
  g.add_argument("--keep-checkpoints", type=int, default=2, help="(%(default)s)")
  g.add_argument("--no-checkpoint", action="store_true", help="save no checkpoints at all")
  g.add_argument("--resume", action="store_true",
                 help="continue from the run's latest checkpoint (bit-identical)")
  g.add_argument("--stop-after", type=int, default=None, metavar="N",
                 help="stop (with a checkpoint) after N steps of this invocation; the "
                      "schedules still span --steps, so --resume continues the same run")
  g.add_argument("--no-plot", action="store_true", help="skip the PNG of the curves")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fmt_rate(x: float) -> str:
  return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


_STEP_CACHE: dict = {}
# Arguments that do not change the computation of a train step.
_LOOP_ONLY_ARGS = frozenset({
    "out", "name", "resume", "stop_after", "ckpt_every", "keep_checkpoints", "no_checkpoint",
    "no_plot", "no_progress", "eval_every", "eval_batches", "log_every"})


def _progress_bar(*, total: int, initial: int, desc: str, disable: bool):
  """A tqdm bar on a terminal; disabled (the loop prints plain lines) when stderr is not one."""
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
              disable=disable or not sys.stderr.isatty(), leave=True)


class RunResult(NamedTuple):
  summary: dict  # also written to summary.json
  state: TrainState


def run(args: argparse.Namespace, *, example: str, model, spec: optim.OptSpec,
        batch_at: Callable[[int], dict], eval_batches: Callable[[], Iterable[dict]],
        num_classes: int, unit: str, unit_per_example: int = 1,
        quiet: bool = False) -> RunResult:
  """Trains ``model`` for ``args.steps`` steps; returns the summary and the final state.

  Writes ``config.json``, ``metrics.jsonl``/``.csv``, ``summary.json``,
  ``curves.png`` and ``checkpoints/`` under ``args.out/args.name``.
  """
  import orbax.checkpoint as ocp

  name = args.name or f"{example}-{spec.name}"
  run_dir = Path(args.out) / name
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "config.json").write_text(json.dumps(vars(args), indent=2, default=str))

  graphdef, params, stats = split_model(model)
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  if spec.lookahead:
    params = optax.LookaheadParams.init_synced(params)
  opt_state = jax.jit(spec.tx.init, compiler_options=compiler_options(True))(params)
  # The step donates its input buffers; an optimizer state may alias the params
  # (e.g. slow weights initialised to them), so give every leaf its own buffer.
  # Committed to one device, like restored checkpoints, so that a resumed run
  # hits the same compiled step.
  precision = getattr(args, "precision", "float32")
  state = jax.device_put(TrainState(params, stats, opt_state, initial_loss_scale(precision)),
                         jax.devices()[0], may_alias=False)
  # Runs of this process with the same model and the same arguments (a resumed
  # run, a repeated comparison) reuse one compiled step.
  key = (graphdef, num_classes, tuple(sorted((k, str(v)) for k, v in vars(args).items()
                                             if k not in _LOOP_ONLY_ARGS)))
  if key not in _STEP_CACHE:
    _STEP_CACHE.clear()  # keep at most one (compiled steps hold memory)
    _STEP_CACHE[key] = make_train_step(graphdef, spec, num_classes=num_classes,
                                       label_smoothing=args.label_smoothing,
                                       label_noise=args.label_noise, seed=args.seed,
                                       fast_compile=args.fast_compile,
                                       branch_hints=getattr(args, "branch_hints", "auto"),
                                       precision=precision)
  step_fn = _STEP_CACHE[key]

  ckpt_dir = (run_dir / "checkpoints").absolute()
  start = 0
  mngr = None
  if not args.no_checkpoint or args.resume:
    if not args.resume and ckpt_dir.exists():
      shutil.rmtree(ckpt_dir)  # a fresh run replaces the old one's checkpoints
    mngr = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=args.keep_checkpoints))
  latest = mngr.latest_step() if args.resume else None
  if args.resume and latest is None and not quiet:
    print(f"--resume: no checkpoint in {ckpt_dir} yet; starting from step 0")
  if latest is not None:
    target = {"state": jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    restored = mngr.restore(latest, args=ocp.args.StandardRestore(target))
    state, start = restored["state"], int(restored["step"])
    if not quiet:
      print(f"resumed {name} from step {start}")
  log = MetricsLog(run_dir, resume_step=start if latest is not None else None)

  def save(step):
    if mngr is not None and not args.no_checkpoint:
      mngr.save(step, args=ocp.args.StandardSave(
          {"state": state, "step": jnp.asarray(step, jnp.int32)}), force=True)

  stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
  t_run = time.perf_counter()  # wall_s and the records' "time" include the compilation
  # Every step variant (IRE refresh, SALA / SAM-every-k ascent, plain) compiles here,
  # before the clock starts: the logged rates and steps_per_s time training only.
  compile_s = step_fn.compile(state, batch_at(start), range(start, stop)) if stop > start \
      else 0.0
  if not quiet:
    print(f"{name}: compiled the train step in {compile_s:.1f}s", flush=True)
  progress = not (args.no_progress or quiet)
  bar = _progress_bar(total=args.steps, initial=start, desc=name, disable=not progress)
  t_window, n_window = time.perf_counter(), 0
  first_step_s = None
  train_time, train_steps = 0.0, 0
  last_eval: dict[str, float] = {}
  for step in range(start, stop):
    batch = batch_at(step)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch, np.int32(step))
    n_window += 1
    done = step + 1
    if first_step_s is None:
      jax.block_until_ready(metrics)
      first_step_s = compile_s + time.perf_counter() - t0  # not in the rates either
      t_window, n_window = time.perf_counter(), 0
    do_eval = done == args.steps or (args.eval_every > 0 and done % args.eval_every == 0)
    if do_eval or done % args.log_every == 0 or done == stop:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      if n_window:
        rate = n_window * args.batch_size * unit_per_example / (now - t_window)
        train_time += now - t_window
        train_steps += n_window
      else:
        rate = float("nan")
      t_window, n_window = now, 0
      rec = {"step": done, "loss": m.pop("loss"), "acc": m.pop("acc"), **m,
             f"{unit}_per_s": rate, "time": now - t_run}
      if not math.isfinite(rec["loss"]):
        bar.close()
        raise FloatingPointError(f"{name}: loss is {rec['loss']} at step {done}")
      if do_eval:
        last_eval = evaluate(graphdef, eval_params(spec, state), state.stats, eval_batches(),
                             fast_compile=args.fast_compile)
        rec.update(last_eval)
        t_window = time.perf_counter()  # do not count evaluation as training time
      log.write(rec)
      status = (f"loss {rec['loss']:.4f} | {_fmt_rate(rate)} {unit}/s"
                + (f" | eval {last_eval['eval_loss']:.4f}" if last_eval else ""))
      if bar.disable and progress:  # not a terminal: plain lines, no carriage returns
        print(f"{name} step {done}/{args.steps}: {status}", flush=True)
      bar.set_postfix_str(status)
    if args.ckpt_every and done % args.ckpt_every == 0 and done != stop:
      save(done)
    bar.update(1)
  bar.close()
  if stop > start:
    save(stop)
  if mngr is not None:
    mngr.wait_until_finished()
    mngr.close()

  log.write_csv()
  final = next((r for r in reversed(log.records) if "eval_loss" in r), {})
  recent = [r["loss"] for r in log.records[-5:] if "loss" in r]
  summary = {
      "name": name, "example": example, "opt": spec.name, "steps": args.steps,
      "params": num_params,
      "train_loss": float(np.mean(recent)) if recent else None,
      "eval_loss": final.get("eval_loss"), "eval_acc": final.get("eval_acc"),
      # compile_s: compiling the step variants before the loop; first_step_s: that and
      # the first step; steps_per_s (and the logged rates): the steps after the first,
      # with no compilation and no evaluation in them.
      "compile_s": compile_s, "first_step_s": first_step_s,
      "wall_s": time.perf_counter() - t_run,
      "steps_per_s": train_steps / train_time if train_time > 0 else None,
      "run_dir": str(run_dir),
  }
  (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  if not args.no_plot and log.records:
    summary["plot"] = str(plots.plot_runs({name: log.records}, run_dir / "curves.png",
                                          title=name))
  if not quiet:
    ev = (f"held-out loss {summary['eval_loss']:.4f}, acc {summary['eval_acc']:.4f}"
          if summary["eval_loss"] is not None else "")
    print(f"{name}: {ev} ({summary['wall_s']:.1f}s) -> {run_dir}")
  return RunResult(summary, state)
