"""One training loop for every example: jitted functional step, eval, logs, checkpoints.

:func:`run` trains a :class:`~examples.common.config.TrainConfig`: it loads the
data (:func:`load_data`), builds the model (:func:`build_model`), the batchers
(:func:`make_task`) and the optimizer
(:func:`examples.common.optim.build_optimizer`), and runs the loop; the
examples' command lines and the benchmarks both train through it.

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

import csv
import dataclasses
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

from . import data as data_lib
from . import models, optim, plots
from .config import LOOP_ONLY_FIELDS, PRECISIONS, TrainConfig, check_branch_hints, to_dict


class TrainState(NamedTuple):
  params: Any  # pure dict (or optax.LookaheadParams of pure dicts)
  stats: Any  # pure dict of the non-parameter state (BatchNorm statistics)
  opt_state: Any
  # --precision float16: the dynamic loss scale {"scale": float32, "counter": int32}
  loss_scale: Any = ()


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
  graphdef, *states = nnx.split(model, nnx.Param, ...)
  params, stats = states
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
  statistics and optimizer state unchanged; metrics ``skipped`` 1, SAM's
  ``perturbed_loss`` and ``sharpness`` NaN) and the scale halves. IRE's
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
  if axis_name is not None and spec.lookahead:
    raise ValueError("lookahead is not available with an axis_name.")
  initial_loss_scale(precision)  # checks the name
  o = _StepOptions(graphdef, spec, num_classes, label_smoothing, label_noise, seed, axis_name,
                   precision)
  if precision == "float16":
    import jmp  # noqa: F401  (the examples' [examples] extra: fail here, not when tracing)

  def step_fn(state: TrainState, batch, step, hints: tuple = ()):
    return _train_step(o, state, batch, step, hints)

  return step_fn


class _StepOptions(NamedTuple):
  """The static settings of a train step (:func:`step_function`'s arguments)."""

  graphdef: Any
  spec: optim.OptSpec
  num_classes: int
  label_smoothing: float
  label_noise: float
  seed: int
  axis_name: str | None
  precision: str

  def pmean(self, tree):
    return tree if self.axis_name is None else jax.lax.pmean(tree, self.axis_name)

  def to_compute(self, tree):
    """Floating leaves in the compute dtype of ``precision`` (float32: unchanged)."""
    dtype = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[self.precision]
    if dtype is None:
      return tree
    return jax.tree.map(
        lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree)


class _Passes:
  """The forward/backward passes of one step, all from the statistics the step started from.

  ``value_and_grad`` is the clean pass; the others are the callbacks the optimizer
  takes (their BatchNorm statistics are dropped, except mSAM's clean micro-batch
  passes, which return them as aux). Under loss scaling every gradient is scaled by
  the same ``ls`` and unscaled before the optimizer sees it.
  """

  def __init__(self, o: _StepOptions, stats, ls, batch):
    self.o, self.stats, self.ls, self.batch = o, stats, ls, batch

  def loss_fn(self, q, b):
    o = self.o
    logits, new_stats = apply_model(o.graphdef, o.to_compute(q), self.stats,
                                    o.to_compute(b["x"]), train=True)
    new_stats = jax.tree.map(lambda n, old: n.astype(old.dtype), new_stats, self.stats)
    loss, acc = optim.cross_entropy(logits.astype(jnp.float32), b["y"],
                                    label_smoothing=o.label_smoothing)
    return loss, (new_stats, acc)

  def value_and_grad(self, q, b):
    """``((loss, (stats, acc)), gradient)``; under loss scaling the gradient is unscaled."""
    if self.ls is None:
      return jax.value_and_grad(self.loss_fn, has_aux=True)(q, b)

    def scaled_loss(q):
      loss, aux = self.loss_fn(q, b)
      return self.ls.scale(loss), (loss, aux)

    (_, out), g = jax.value_and_grad(scaled_loss, has_aux=True)(q)
    return out, self.ls.unscale(g)

  def grad(self, q, b=None):  # gradient only: its BatchNorm statistics are dropped
    return self.value_and_grad(q, self.batch if b is None else b)[1]

  def grad_and_loss(self, q, b=None):  # SAM: the perturbed loss comes back as aux
    (loss, _), g = self.value_and_grad(q, self.batch if b is None else b)
    return g, loss

  def micro_grad(self, q, b):  # mSAM: the clean passes' loss and statistics come back as aux
    (loss, (new_stats, acc)), g = self.value_and_grad(q, b)
    return g, {"loss": loss, "acc": acc, "stats": new_stats}

  def logits(self, q):  # IRE's "fisher": float32, statistics dropped
    return apply_model(self.o.graphdef, q, self.stats, self.batch["x"], train=True)[0]


def _noisy_labels(o: _StepOptions, y, step):
  """``y`` with label noise drawn from the step (and the device, under an axis)."""
  if o.label_noise <= 0:
    return y
  key = jax.random.fold_in(jax.random.key(o.seed), step)
  if o.axis_name is not None:  # independent noise on every device's slice
    key = jax.random.fold_in(key, jax.lax.axis_index(o.axis_name))
  return optim.label_noise(key, y, o.num_classes, o.label_noise)


def _clean_pass(o: _StepOptions, passes: _Passes, p, hints: tuple):
  """``(grads, extra, clean)``: the step's gradient (None for mSAM), the keyword arguments
  of ``tx.update`` and the clean pass's ``(loss, acc, stats)`` (None for mSAM)."""
  spec = o.spec
  extra: dict[str, Any] = dict(hints)  # static branch hints (spec.hints)
  grads, clean = None, None
  if spec.family == "msam":
    extra["grad_fn"] = passes.micro_grad
    extra["batch"] = passes.batch
  else:
    (loss, (new_stats, acc)), grads = passes.value_and_grad(p, passes.batch)
    clean = (loss, acc, new_stats)
    if spec.family == "plain":
      grads = o.pmean(grads)  # plain Optax and IRE: the step averages the gradient
    if spec.family == "sam" or spec.curvature == "hutchinson":
      extra["grad_fn"] = passes.grad_and_loss if spec.sam_aux else passes.grad
  if spec.curvature == "fisher":
    extra["logits_fn"] = passes.logits
  return grads, extra, clean


def _train_step(o: _StepOptions, state: TrainState, batch, step, hints: tuple):
  """The body of :func:`step_function`'s ``step_fn``."""
  params, stats, opt_state, loss_scale = state
  ls = None
  if o.precision == "float16":
    import jmp

    ls = jmp.DynamicLossScale(loss_scale["scale"], loss_scale["counter"])
  batch = {"x": batch["x"], "y": _noisy_labels(o, batch["y"], step)}
  p = params.fast if o.spec.lookahead else params
  if o.axis_name is not None:
    # The parameters are replicated: marked as varying over the axis, jax.grad
    # returns this device's gradient instead of its sum over the axis.
    p = jax.lax.pcast(p, o.axis_name, to="varying")
  grads, extra, clean = _clean_pass(o, _Passes(o, stats, ls, batch), p, hints)
  old = (params, stats, opt_state)
  updates, opt_state = o.spec.tx.update(grads, opt_state, params, **extra)
  params = optax.apply_updates(params, updates)
  if clean is None:  # mSAM: its clean micro-batch passes
    aux = ire_optax.sam_aux(opt_state)
    clean = (aux["loss"], aux["acc"], aux["stats"])
  loss, acc, new_stats = o.pmean(clean)
  metrics = {"loss": loss, "acc": acc, "lr": o.spec.schedule(step)}
  finite = None
  if ls is not None:
    # Every gradient of the step shares the scale: a non-finite one makes the update
    # non-finite, and the whole step is skipped (on every device alike).
    finite = jmp.all_finite((grads, updates))
    if o.axis_name is not None:
      finite = jax.lax.pmin(finite.astype(jnp.int32), o.axis_name).astype(bool)
    metrics["loss_scale"] = ls.loss_scale
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    ls = ls.adjust(finite)
    loss_scale = {"scale": ls.loss_scale, "counter": ls.counter}
    params, new_stats, opt_state = jmp.select_tree(finite, (params, new_stats, opt_state), old)
  metrics.update(_optimizer_metrics(o, opt_state, grads, loss, finite))
  return TrainState(params, new_stats, opt_state, loss_scale), metrics


def _optimizer_metrics(o: _StepOptions, opt_state, grads, loss, finite=None) -> dict:
  """What the optimizer's state tells of the step: SAM's perturbed loss and sharpness,
  the gradient norm, SALA's statistics (IRE's flat fraction: :func:`flat_fraction`, read
  when a record is logged).

  ``finite``: False on a skipped float16 step, whose ``opt_state`` is the reverted one: SAM's
  perturbed loss and sharpness are then NaN (the state holds the previous step's perturbed
  loss, or none before any step), not a stale or bogus number.
  """
  spec, metrics = o.spec, {}
  if spec.sam_aux:
    perturbed = o.pmean(ire_optax.sam_aux(opt_state))
    if finite is not None:  # the step's perturbed pass was discarded with the step
      perturbed = jnp.where(finite, perturbed, jnp.nan)
    metrics["perturbed_loss"] = perturbed
    metrics["sharpness"] = perturbed - loss
  if grads is not None:
    g = grads if spec.family == "plain" else o.pmean(grads)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                                        for x in jax.tree.leaves(g)))
  if spec.sala:
    metrics.update({f"sala_{k}": v for k, v in ire_optax.sala_stats(opt_state).items()})
  return metrics


@jax.jit
def flat_fraction(opt_state) -> jax.Array:
  """The fraction of the parameters in IRE's flat mask. It changes at refreshes only, so the
  loop reads it when it logs: computed in every step it would sum every leaf's mask there,
  a kernel per leaf on TPU that the refresh could otherwise fuse into the update."""
  mask = jax.tree.leaves(ire_optax.ire_flat_mask(opt_state))
  return sum(jnp.sum(m, dtype=jnp.float32) for m in mask) / sum(m.size for m in mask)


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
  passed must be the optimizer's own step count (as this loop keeps it). With
  ``precision="float16"`` a step skipped for a non-finite gradient leaves the
  optimizer's counters behind the loop's step, so ``"auto"`` is off there and
  ``"on"`` is refused.
  """
  step_fn = step_function(graphdef, spec, num_classes=num_classes,
                          label_smoothing=label_smoothing, label_noise=label_noise, seed=seed,
                          precision=precision)
  jitted = jax.jit(step_fn, donate_argnums=0, static_argnames="hints",
                   compiler_options=compiler_options(fast_compile))
  return TrainStep(jitted, hints_at(spec, branch_hints, precision))


def hints_at(spec: optim.OptSpec, branch_hints: str, precision: str
             ) -> Callable[[int], tuple] | None:
  """``step -> static hints`` of :func:`make_train_step`'s ``branch_hints`` (None: off)."""
  check_branch_hints(branch_hints, precision)
  use = branch_hints == "on" or (branch_hints == "auto" and precision != "float16")
  return spec.hints if use else None


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


def _cadence(cfg: TrainConfig, done: int) -> tuple[bool, bool]:
  """``(evaluate, log)`` after ``done`` steps, by the run's cadence (``--stop-after`` also logs
  where it stops)."""
  do_eval = done == cfg.steps or (cfg.eval_every > 0 and done % cfg.eval_every == 0)
  return do_eval, do_eval or done % cfg.log_every == 0


class MetricsLog:
  """Appends one JSON record per line to ``metrics.jsonl``; writes ``metrics.csv`` at the end."""

  def __init__(self, run_dir: Path, *, resume_step: int | None,
               on_cadence: Callable[[int], bool] = lambda step: True):
    self.path = run_dir / "metrics.jsonl"
    self.records: list[dict] = []
    if resume_step is not None and self.path.exists():
      # Keep what was logged up to the checkpoint (later lines will be redone), but not the
      # record an earlier --stop-after wrote off the cadence: one run in two invocations logs
      # what one uninterrupted run logs.
      for line in self.path.read_text().splitlines():
        rec = json.loads(line)
        step = rec.get("step", 0)
        if step < resume_step or (step == resume_step and on_cadence(step)):
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


def _fmt_rate(x: float) -> str:
  return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _progress_bar(*, total: int, initial: int, desc: str, disable: bool):
  """A tqdm bar on a terminal; disabled (the loop prints plain lines) when stderr is not one."""
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
              disable=disable or not sys.stderr.isatty(), leave=True)


class Task(NamedTuple):
  """The data side of a run: its batches and how the loop counts and describes them."""

  batch_at: Callable[[int], dict]  # the training batch of a step (a pure function of it)
  eval_batches: Callable[[], Iterable[dict]]  # the held-out batches, afresh
  num_classes: int  # classes, or the vocabulary
  unit: str  # "img" or "tok": what the logged rates count
  unit_per_example: int  # 1, or the sequence length
  description: str


def load_data(cfg: TrainConfig) -> data_lib.ImageData | data_lib.TextData:
  """The data set of ``cfg`` (cached: the runs of a process share it)."""
  spec = str(cfg.data.spec)  # set by TrainConfig
  if cfg.kind == "image":
    return data_lib.cached_images(spec)
  return data_lib.cached_text(spec, cfg.data.tokenizer, cfg.data.max_chars)


def build_model(cfg: TrainConfig, data: Any) -> models.ModelSpec:
  """The example's model for ``cfg`` and its data (image shape, classes or vocabulary)."""
  m, seed, size = cfg.model, cfg.seed, str(cfg.model.size)  # size: set by TrainConfig
  if cfg.kind == "text":
    return models.build_llama(size, vocab_size=data.vocab_size, seed=seed, dim=m.dim,
                              depth=m.depth, heads=m.heads, ffn_dim=m.ffn_dim,
                              tie_embeddings=m.tie_embeddings or None)
  h, w, c = data.image_shape
  if cfg.example == "resnet":
    return models.build_resnet(size, num_classes=data.num_classes, in_channels=c, seed=seed,
                               depth=m.depth, width=m.width)
  if cfg.example == "mlp":
    return models.build_mlp(size, num_classes=data.num_classes, in_features=h * w * c,
                            seed=seed, depth=m.depth, width=m.width)
  if h != w:
    raise ValueError(f"the ViT example needs square images; got {h}x{w}.")
  return models.build_vit(size, num_classes=data.num_classes, image_size=h, in_channels=c,
                          seed=seed, dim=m.dim, depth=m.depth, heads=m.heads,
                          mlp_dim=m.mlp_dim, patch_size=m.patch_size)


def make_task(cfg: TrainConfig, data: Any) -> Task:
  """The batchers of ``cfg`` over ``data`` (an ``ImageData`` or a ``TextData``)."""
  b = cfg.batch_size
  if cfg.kind == "image":
    h, w, c = data.image_shape
    augment = cfg.data.augment == "on" or (cfg.data.augment == "auto"
                                           and data.name.startswith("cifar"))
    images = data_lib.ImageBatcher(data.x_train, data.y_train, b, seed=cfg.seed,
                                   augment=augment)
    cap = None if cfg.eval_batches is None else cfg.eval_batches * b
    return Task(images.batch_at,
                lambda: data_lib.image_eval_batches(data.x_test, data.y_test, b, cap),
                data.num_classes, "img", 1,
                f"{data.name}: {len(data.x_train)} train / {len(data.x_test)} held-out "
                f"images {h}x{w}x{c}")
  seq = cfg.data.seq_len
  if len(data.valid) <= seq:  # refused now, not at the first evaluation
    cut = " (--max-chars also keeps a tenth as many of the held-out text)" \
        if cfg.data.max_chars is not None else ""
    raise ValueError(f"the held-out text has {len(data.valid)} tokens, too few for one window "
                     f"of --seq-len {seq}{cut}.")
  windows = data_lib.TextBatcher(data.train, b, seq, seed=cfg.seed)
  return Task(windows.batch_at,
              lambda: data_lib.text_eval_batches(data.valid, b, seq, cfg.eval_batches),
              data.vocab_size, "tok", seq,
              f"{data.name}: {len(data.train)} train / {len(data.valid)} held-out tokens, "
              f"vocabulary {data.vocab_size} ({cfg.data.tokenizer})")


def init_state(spec: optim.OptSpec, params: Any, stats: Any,
               precision: str = "float32") -> TrainState:
  """A fresh :class:`TrainState` on the first device, every leaf in its own buffer.

  The step donates its input buffers, and an optimizer state may alias the
  params (e.g. slow weights initialised to them); committed to one device, like
  restored checkpoints, so that a resumed run hits the same compiled step.
  """
  if spec.lookahead:
    params = optax.LookaheadParams.init_synced(params)
  opt_state = jax.jit(spec.tx.init, compiler_options=compiler_options(True))(params)
  return jax.device_put(TrainState(params, stats, opt_state, initial_loss_scale(precision)),
                        jax.devices()[0], may_alias=False)


_STEP_CACHE: dict = {}


def _cached_train_step(cfg: TrainConfig, graphdef, spec: optim.OptSpec,
                       num_classes: int) -> TrainStep:
  """The run's jitted step; runs of this process with the same model and the same
  step-relevant config (a resumed run, a repeated comparison) reuse one compiled step."""
  step_cfg = tuple((f.name, repr(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)
                   if f.name not in LOOP_ONLY_FIELDS)
  key = (graphdef, num_classes, step_cfg)
  if key not in _STEP_CACHE:
    _STEP_CACHE.clear()  # keep at most one (compiled steps hold memory)
    _STEP_CACHE[key] = make_train_step(
        graphdef, spec, num_classes=num_classes, label_smoothing=cfg.label_smoothing,
        label_noise=cfg.label_noise, seed=cfg.seed, fast_compile=cfg.fast_compile,
        branch_hints=cfg.branch_hints, precision=cfg.precision)
  return _STEP_CACHE[key]


class Checkpoints:
  """The run's Orbax checkpoints: ``TrainState`` and step, every ``ckpt_every`` steps."""

  def __init__(self, cfg: TrainConfig, run_dir: Path):
    import orbax.checkpoint as ocp

    self.ocp, self.cfg = ocp, cfg
    self.dir = (run_dir / "checkpoints").absolute()
    self.manager = None
    if not cfg.resume and self.dir.exists():
      # A fresh run replaces the old one's checkpoints, also when it writes none (a later
      # --resume would otherwise continue the old run).
      shutil.rmtree(self.dir)
    if not cfg.no_checkpoint or cfg.resume:
      self.manager = ocp.CheckpointManager(
          self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints))

  def restore(self, state: TrainState) -> tuple[TrainState, int | None]:
    """``(state, step)`` of the latest checkpoint with ``resume``; else ``(state, None)``."""
    latest = self.manager.latest_step() if self.cfg.resume and self.manager else None
    if latest is None or self.manager is None:
      return state, None
    target = {"state": jax.tree.map(self.ocp.utils.to_shape_dtype_struct, state),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    restored = self.manager.restore(latest, args=self.ocp.args.StandardRestore(target))
    return restored["state"], int(restored["step"])

  def save(self, state: TrainState, step: int) -> None:
    if self.manager is not None and not self.cfg.no_checkpoint:
      self.manager.save(step, args=self.ocp.args.StandardSave(
          {"state": state, "step": jnp.asarray(step, jnp.int32)}), force=True)

  def close(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()


class RunResult(NamedTuple):
  """What :func:`run` returns: the summary, the final state, and how to read it."""

  summary: dict  # also written to summary.json
  state: TrainState
  spec: optim.OptSpec | None = None  # the built optimizer
  graphdef: Any = None  # the model's graph: apply_model(graphdef, params, state.stats, x)

  def eval_params(self) -> Any:
    """The weights to evaluate (:func:`eval_params`: SALA's and Lookahead's slow weights)."""
    assert self.spec is not None
    return eval_params(self.spec, self.state)


def run(cfg: TrainConfig, *, data: Any = None, model: nnx.Module | None = None,
        quiet: bool = False) -> RunResult:
  """Trains ``cfg``: loads its data and builds its model and optimizer, unless given.

  ``data`` (an ``ImageData`` / ``TextData``) replaces the loading of
  ``cfg.data``; ``model`` (a Flax NNX module taking ``(x, train=...)``)
  replaces the example's model. Writes ``config.json``, ``metrics.jsonl``/
  ``.csv``, ``summary.json``, ``curves.png`` and ``checkpoints/`` under
  ``cfg.out/cfg.run_name``; returns the summary and the final state.
  """
  data = load_data(cfg) if data is None else data
  task = make_task(cfg, data)
  model = build_model(cfg, data).model if model is None else model
  graphdef, params, stats = split_model(model)
  # After the model: mSAM's auxiliary output carries its BatchNorm statistics.
  spec = optim.build_optimizer(cfg.optimizer, cfg.steps, seed=cfg.seed, model_stats=stats)
  if not quiet:
    num_params = sum(x.size for x in jax.tree.leaves(params))
    over = f" over {cfg.optimizer.base}" if spec.name.split("+")[0] not in ("adamw", "sgd") \
        else ""
    print(f"{cfg.example} {cfg.model.size} ({num_params:,} parameters) | {task.description} | "
          f"optimizer {spec.name}{over}")
  return _train(cfg, task, graphdef, spec, params, stats, quiet=quiet)


def check_resume(cfg: TrainConfig) -> None:
  """Raises ``ValueError`` if ``--resume`` would continue a checkpoint trained with another
  configuration (any field but the loop's settings, :data:`~examples.common.config.
  LOOP_ONLY_FIELDS`): the run would silently mix two configurations."""
  run_dir = Path(cfg.out) / cfg.run_name
  ckpts = run_dir / "checkpoints"
  if not (cfg.resume and (run_dir / "config.json").is_file() and ckpts.is_dir()
          and any(p.name.isdigit() for p in ckpts.iterdir())):
    return
  def flat(d: dict, prefix: str = "") -> dict:  # {"optimizer.lr": 0.1, ...}
    out: dict[str, Any] = {}
    for k, v in d.items():
      if not prefix and k in LOOP_ONLY_FIELDS:
        continue
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out

  old = flat(json.loads((run_dir / "config.json").read_text()))
  new = flat(json.loads(json.dumps(to_dict(cfg), default=str)))
  changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
  if changed:
    raise ValueError(f"--resume: the checkpoints in {run_dir} were trained with another "
                     f"configuration ({'; '.join(changed)}); resume with the run's own flags, "
                     "or start a fresh run (another --name, or no --resume).")


def _train(cfg: TrainConfig, task: Task, graphdef, spec: optim.OptSpec, params, stats, *,
           quiet: bool) -> RunResult:
  """The loop of :func:`run` over a built model and optimizer."""
  name = cfg.run_name
  run_dir = Path(cfg.out) / name
  check_resume(cfg)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  state = init_state(spec, params, stats, cfg.precision)
  step_fn = _cached_train_step(cfg, graphdef, spec, task.num_classes)
  ckpt = Checkpoints(cfg, run_dir)
  state, resumed = ckpt.restore(state)
  if cfg.resume and resumed is None and not quiet:
    print(f"--resume: no checkpoint in {ckpt.dir} yet; starting from step 0")
  if resumed is not None and not quiet:
    print(f"resumed {name} from step {resumed}")
  start = resumed or 0
  log = MetricsLog(run_dir, resume_step=resumed, on_cadence=lambda s: _cadence(cfg, s)[1])
  stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
  loop = _Loop(cfg, task, graphdef, spec, step_fn, log, name, quiet=quiet)
  state = loop.train(state, start, stop, ckpt)
  ckpt.close()
  log.write_csv()
  summary = loop.summary(num_params, str(run_dir))
  (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  if not cfg.no_plot and log.records:
    summary["plot"] = str(plots.plot_runs({name: log.records}, run_dir / "curves.png",
                                          title=name))
  if not quiet:
    ev = (f"held-out loss {summary['eval_loss']:.4f}, acc {summary['eval_acc']:.4f}"
          if summary["eval_loss"] is not None else "")
    print(f"{name}: {ev} ({summary['wall_s']:.1f}s) -> {run_dir}")
  return RunResult(summary, state, spec, graphdef)


class _Loop:
  """The steps of one run, their timing (training only) and their log records."""

  def __init__(self, cfg: TrainConfig, task: Task, graphdef, spec: optim.OptSpec,
               step_fn: TrainStep, log: MetricsLog, name: str, *, quiet: bool):
    self.cfg, self.task, self.graphdef, self.spec = cfg, task, graphdef, spec
    self.step_fn, self.log, self.name, self.quiet = step_fn, log, name, quiet
    self.t_run = time.perf_counter()  # wall_s and the records' "time" include compilation
    self.compile_s: float = 0.0
    self.first_step_s: float | None = None
    self.train_time, self.train_steps = 0.0, 0
    self.t_window, self.n_window = self.t_run, 0
    self.last_eval: dict[str, float] = {}

  def train(self, state: TrainState, start: int, stop: int, ckpt: Checkpoints) -> TrainState:
    """Steps ``start .. stop-1``; logs, evaluates and saves on the config's cadence."""
    cfg = self.cfg
    # Every step variant (IRE refresh, SALA / SAM-every-k ascent, plain) compiles here,
    # before the clock starts: the logged rates and steps_per_s time training only.
    if stop > start:
      self.compile_s = self.step_fn.compile(state, self.task.batch_at(start),
                                            range(start, stop))
      if self.spec.curvature is not None:  # the records' flat fraction compiles here too
        t0 = time.perf_counter()
        jax.block_until_ready(flat_fraction(state.opt_state))
        self.compile_s += time.perf_counter() - t0
    if not self.quiet:
      print(f"{self.name}: compiled the train step in {self.compile_s:.1f}s", flush=True)
    self.progress = not (cfg.no_progress or self.quiet)
    self.bar = _progress_bar(total=cfg.steps, initial=start, desc=self.name,
                             disable=not self.progress)
    for step in range(start, stop):
      batch = self.task.batch_at(step)
      t0 = time.perf_counter()
      state, metrics = self.step_fn(state, batch, np.int32(step))
      self.n_window += 1
      done = step + 1
      if self.first_step_s is None:
        jax.block_until_ready(metrics)
        self.first_step_s = self.compile_s + time.perf_counter() - t0  # not in the rates
        self.t_window, self.n_window = time.perf_counter(), 0
      do_eval, do_log = _cadence(cfg, done)
      if do_log or done == stop:
        self._record(state, metrics, done, do_eval)
      if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != stop:
        ckpt.save(state, done)
      self.bar.update(1)
    self.bar.close()
    if stop > start:
      ckpt.save(state, stop)
    return state

  def _record(self, state: TrainState, metrics: dict, done: int, do_eval: bool) -> None:
    """Logs the step's metrics (and a held-out evaluation) and the rate since the last log."""
    if self.spec.curvature is not None:
      metrics = {**metrics, "ire_flat_fraction": flat_fraction(state.opt_state)}
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    rate = float("nan")
    if self.n_window:
      rate = (self.n_window * self.cfg.batch_size * self.task.unit_per_example
              / (now - self.t_window))
      self.train_time += now - self.t_window
      self.train_steps += self.n_window
    self.t_window, self.n_window = now, 0
    unit = self.task.unit
    rec = {"step": done, "loss": m.pop("loss"), "acc": m.pop("acc"), **m,
           f"{unit}_per_s": rate, "time": now - self.t_run}
    if not math.isfinite(rec["loss"]):
      self.bar.close()
      raise FloatingPointError(f"{self.name}: loss is {rec['loss']} at step {done}")
    if do_eval:
      self.last_eval = evaluate(self.graphdef, eval_params(self.spec, state), state.stats,
                                self.task.eval_batches(), fast_compile=self.cfg.fast_compile)
      rec.update(self.last_eval)
      self.t_window = time.perf_counter()  # do not count evaluation as training time
    self.log.write(rec)
    status = (f"loss {rec['loss']:.4f} | {_fmt_rate(rate)} {unit}/s"
              + (f" | eval {self.last_eval['eval_loss']:.4f}" if self.last_eval else ""))
    if self.bar.disable and self.progress:  # not a terminal: plain lines, no carriage returns
      print(f"{self.name} step {done}/{self.cfg.steps}: {status}", flush=True)
    self.bar.set_postfix_str(status)

  def summary(self, num_params: int, run_dir: str) -> dict:
    """What ``summary.json`` holds."""
    records = self.log.records
    final: dict = next((r for r in reversed(records) if "eval_loss" in r), {})
    recent = [r["loss"] for r in records[-5:] if "loss" in r]
    return {
        "name": self.name, "example": self.cfg.example, "opt": self.spec.name,
        "steps": self.cfg.steps, "params": num_params,
        "train_loss": float(np.mean(recent)) if recent else None,
        "eval_loss": final.get("eval_loss"), "eval_acc": final.get("eval_acc"),
        # compile_s: compiling the step variants before the loop; first_step_s: that and
        # the first step; steps_per_s (and the logged rates): the steps after the first,
        # with no compilation and no evaluation in them.
        "compile_s": self.compile_s, "first_step_s": self.first_step_s,
        "wall_s": time.perf_counter() - self.t_run,
        "steps_per_s": self.train_steps / self.train_time if self.train_time > 0 else None,
        "run_dir": run_dir,
    }
