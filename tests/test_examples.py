"""Tests of the Flax examples: every optimizer trains every model, BatchNorm rule, resume.

The runs are toy-sized (a few thousand parameters, 2 steps) and compiled with
``--fast-compile`` (XLA backend optimisations off), so that the ~30 distinct
train steps compile in CI time on two CPU cores.
"""

import collections
import dataclasses
import json
import math
import shutil

import chex
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import ire_optax  # noqa: E402
from examples import compare  # noqa: E402
from examples.common import cli, data, models, optim, train  # noqa: E402
from examples.common.config import OptimizerConfig  # noqa: E402

TOY = {
    "resnet": ["--size", "toy", "--batch-size", "8"],
    "vit": ["--size", "toy", "--batch-size", "8"],
    "llama": ["--size", "toy", "--batch-size", "4", "--seq-len", "16", "--max-chars", "20000"],
    "mlp": ["--size", "toy", "--batch-size", "8"],
}
QUICK = ["--steps", "2", "--eval-every", "0", "--eval-batches", "1", "--log-every", "1",
         "--lr", "0.01", "--no-checkpoint", "--no-plot", "--no-progress", "--fast-compile"]
FAST = {"xla_backend_optimization_level": 0}
OPTIMIZERS = ["adamw", "sgd", "sam", "asam", "msam", "sala", "lookahead"]
# IRE over every optimizer; each model gets IRE with the paper's "fisher" estimator.
IRE_CASES = [
    ("resnet", "sam+ire", "fisher"), ("resnet", "msam+ire", "fisher"),
    ("resnet", "sgd+ire", "grad_sq"), ("vit", "adamw+ire", "fisher"),
    ("vit", "sala+ire", "fisher"), ("llama", "lookahead+ire", "fisher"),
    ("llama", "asam+ire", "fisher"), ("llama", "adamw+ire", "hutchinson"),
]


def args_for(example, *extra, out):
  return cli.parse(example, TOY[example] + QUICK + ["--out", str(out)] + list(extra))


def initial_params(example, cfg):
  """The parameters the run starts from (same construction, same seed)."""
  if example == "llama":
    d = data.cached_text(cfg.data.spec, cfg.data.tokenizer, cfg.data.max_chars)
    m = models.build_llama(cfg.model.size, vocab_size=d.vocab_size, seed=cfg.seed)
  else:
    kw = dict(num_classes=10, in_channels=1, seed=cfg.seed)
    m = (models.build_resnet(cfg.model.size, **kw) if example == "resnet"
         else models.build_mlp(cfg.model.size, num_classes=10, in_features=64, seed=cfg.seed)
         if example == "mlp" else models.build_vit(cfg.model.size, image_size=8, **kw))
  return train.split_model(m.model)[1]


def check_run(example, opt, tmp_path, *extra):
  args = args_for(example, "--opt", opt, *extra, out=tmp_path)
  res = train.run(args, quiet=True)
  recs = train.read_metrics(res.summary["run_dir"])
  assert [r["step"] for r in recs] == [1, 2]
  assert all(math.isfinite(r["loss"]) for r in recs)
  assert math.isfinite(res.summary["eval_loss"]) and 0 <= res.summary["eval_acc"] <= 1
  p0 = initial_params(example, args)
  fast = res.state.params.fast if isinstance(res.state.params, optax.LookaheadParams) \
      else res.state.params
  assert jax.tree.structure(fast) == jax.tree.structure(p0)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fast),
                                                   jax.tree.leaves(p0), strict=True)]
  assert sum(moved) > len(moved) // 2, "the optimizer did not move the parameters"
  return res, recs, p0


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("example", ["resnet", "vit", "llama", "mlp"])
def test_every_optimizer_trains_every_model(example, opt, tmp_path):
  res, recs, p0 = check_run(example, opt, tmp_path)
  spec_name = res.summary["opt"]
  assert spec_name == opt
  if opt == "lookahead":  # evaluation uses the slow weights: untouched before the first sync
    for a, b in zip(jax.tree.leaves(res.state.params.slow), jax.tree.leaves(p0), strict=True):
      np.testing.assert_array_equal(a, b)
  if opt == "sala":
    assert "sala_distance" in recs[-1] and "sala_stage" in recs[-1]
    slow = ire_optax.sala_eval_params(res.state.opt_state)
    assert jax.tree.structure(slow) == jax.tree.structure(res.state.params)


@pytest.mark.parametrize("example,opt,curvature", IRE_CASES)
def test_ire_over_every_optimizer(example, opt, curvature, tmp_path):
  res, recs, _ = check_run(example, opt, tmp_path, "--ire-curvature", curvature,
                           "--ire-gamma", "0.6")
  assert res.summary["opt"] == opt
  # The mask was refreshed on the first step: a real fraction of coordinates is flat.
  frac = recs[-1]["ire_flat_fraction"]
  assert 0.5 <= frac <= 1.0, frac
  mask = ire_optax.ire_flat_mask(res.state.opt_state)
  assert sum(int(m.sum()) for m in jax.tree.leaves(mask)) > 0


def test_ire_over_msam_needs_fisher(capsys):
  cfg = dataclasses.replace(cli.get_config("resnet").optimizer, name="msam+ire",
                            ire_curvature="grad_sq")
  with pytest.raises(ValueError, match="fisher"):
    optim.build_optimizer(cfg, 10)
  with pytest.raises(SystemExit):  # on the command line: a usage error
    cli.parse("resnet", ["--opt", "msam+ire", "--ire-curvature", "grad_sq"])
  assert "fisher" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Typed configs: the command line is a thin layer over them
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("example", ["resnet", "vit", "llama", "mlp"])
def test_empty_command_line_is_get_config(example):
  module = __import__(f"examples.{example}", fromlist=["get_config"])
  assert cli.parse(example, []) == module.get_config()
  assert module.get_config().example == example


@pytest.mark.parametrize("argv,path,want", [
    (["--opt", "sam+ire"], "optimizer.name", "sam+ire"),
    (["--data", "cifar10:x"], "data.spec", "cifar10:x"),
    (["--seq-len", "32"], "data.seq_len", 32),
    (["--dim", "24", "--depth", "3"], "model.dim", 24),
    (["--tie-embeddings"], "model.tie_embeddings", True),
    (["--warmup-steps", "0.25"], "optimizer.warmup_steps", 0.25),
    (["--ire-warmup", "7"], "optimizer.ire_warmup", 7.0),
    (["--rho", "0.1"], "optimizer.rho", 0.1),
    (["--decay-mask", "all"], "optimizer.decay_mask", "all"),
    (["--nesterov"], "optimizer.nesterov", True),
    (["--label-noise", "0.2"], "label_noise", 0.2),
    (["--eval-batches", "3"], "eval_batches", 3),
    (["--stop-after", "5", "--no-plot"], "stop_after", 5),
])
def test_a_flag_sets_its_field_and_nothing_else(argv, path, want):
  cfg, default = cli.parse("llama", argv), cli.get_config("llama")
  section, _, name = path.rpartition(".")
  obj = getattr(cfg, section) if section else cfg
  assert getattr(obj, name) == want
  changed = {f"{s}.{k}" if s else k
             for s in ("data", "model", "optimizer", "")
             for k, v in dataclasses.asdict(getattr(cfg, s) if s else cfg).items()
             if not isinstance(v, dict)
             and v != getattr(getattr(default, s) if s else default, k)}
  flags = [a for a in argv if a.startswith("--")]
  assert path in changed and len(changed) == len(flags), changed


def test_flags_follow_the_example():
  """Options of another example's model or data are not offered (a usage error)."""
  assert cli.parse("resnet", ["--width", "8"]).model.width == 8
  assert cli.parse("mlp", ["--width", "8"]).model.width == 8
  for example, argv in (("vit", ["--width", "8"]), ("resnet", ["--seq-len", "8"]),
                        ("llama", ["--augment", "on"])):
    with pytest.raises(SystemExit):
      cli.parse(example, argv)


def test_configs_validate_their_values():
  import dataclasses

  from examples.common.config import DataConfig, TrainConfig

  cfg = cli.get_config("vit")
  with pytest.raises(ValueError, match="unknown optimizer"):
    dataclasses.replace(cfg.optimizer, name="adam")
  with pytest.raises(ValueError, match="decay_mask"):
    OptimizerConfig(decay_mask="biases")
  with pytest.raises(ValueError, match="augment"):
    DataConfig(augment="maybe")
  with pytest.raises(ValueError, match="precision"):
    dataclasses.replace(cfg, precision="float8")
  with pytest.raises(ValueError, match="example"):
    TrainConfig(example="mnist")
  with pytest.raises(ValueError, match="warmup_steps"):
    OptimizerConfig(warmup_steps=-1)
  for name in ("msam", "sala", "adamw+ire"):  # it would be silently ignored
    with pytest.raises(ValueError, match="sam_every_k"):
      OptimizerConfig(name=name, sam_every_k=2)
  assert OptimizerConfig(name="gsam+ire", sam_every_k=2).sam_every_k == 2
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.steps = 3


def test_unset_data_and_size_are_the_examples_defaults():
  from examples.common.config import DataConfig, ModelConfig, TrainConfig

  for example in ("resnet", "vit", "llama", "mlp"):
    cfg = TrainConfig(example=example)
    default = cli.get_config(example)
    assert (cfg.data.spec, cfg.model.size) == (default.data.spec, default.model.size)
  cfg = TrainConfig(example="vit", data=DataConfig(spec="mnist:x"), model=ModelConfig("toy"))
  assert (cfg.data.spec, cfg.model.size) == ("mnist:x", "toy")


def test_run_trains_a_typed_config(tmp_path):
  """The Python API: get_config() + dataclasses.replace + train.run, no argv."""
  import dataclasses

  from examples import vit

  cfg = vit.get_config()
  cfg = dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, size="toy"), batch_size=8, steps=2,
      eval_every=0, eval_batches=1, log_every=1, fast_compile=True, no_checkpoint=True,
      no_plot=True, out=str(tmp_path),
      optimizer=dataclasses.replace(cfg.optimizer, name="sam", lr=0.01))
  res = train.run(cfg, quiet=True)
  assert res.summary["opt"] == "sam" and res.summary["name"] == "vit-sam"
  assert math.isfinite(res.summary["eval_loss"])
  assert res.spec.family == "sam" and res.graphdef is not None
  chex.assert_trees_all_equal(res.eval_params(), res.state.params)
  saved = json.loads((tmp_path / "vit-sam" / "config.json").read_text())
  assert saved["optimizer"]["name"] == "sam" and saved["model"]["size"] == "toy"
  # The same run from the command line is the same config, hence the same numbers.
  argv = TOY["vit"] + QUICK + ["--opt", "sam", "--out", str(tmp_path), "--name", "cli"]
  again = train.run(cli.parse("vit", argv), quiet=True)
  assert again.summary["eval_loss"] == res.summary["eval_loss"]


def test_optimizer_names():
  assert optim.parse_name("SAM+ire") == ("sam", True)
  assert optim.parse_name("sgd", ire_flag=True) == ("sgd", True)
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.parse_name("adam")
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.parse_name("sam+lookahead")


@pytest.mark.parametrize(("argv", "message"), [
    (["--log-every", "0"], "--log-every) must be >= 1"),
    (["--batch-size", "0"], "--batch-size) must be >= 1"),
    (["--eval-batches", "0"], "--eval-batches) must be >= 1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints) must be >= 1"),
    (["--label-noise", "1.5"], "--label-noise) must be in [0, 1]"),
    (["--max-chars", "0"], "--max-chars) must be >= 1"),
    (["--opt", "adamw+ire", "--ire-gamma", "1.5"], "`gamma` must be in (0, 1)"),
    (["--opt", "sam", "--rho", "-1"], "rho"),
    (["--opt", "sala", "--sala-sync-period", "0"], "sync_period"),
    (["--opt", "adamw+ire", "--ire-refresh-every", "0"], "refresh_every"),
    (["--opt", "sam", "--sam-every-k", "0"], "every_k"),
    (["--branch-hints", "on", "--precision", "float16"], "--branch-hints on"),
    (["--momentum", "1.5"], "momentum"),
    (["--lr", "-1"], "lr"),
    (["--opt", "msam", "--num-microbatches", "3", "--batch-size", "16"], "--num-microbatches 3"),
])
def test_an_out_of_range_value_is_a_one_line_usage_error(argv, message, capsys):
  """Refused on the command line (exit 2), before any data are read or a step compiled: the
  loop's own settings by their bounds, the optimizer's by the library's checks."""
  with pytest.raises(SystemExit) as e:
    cli.parse("llama", argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err
  assert message in [line for line in err.splitlines() if "error:" in line][0], err


@pytest.mark.parametrize("example,argv,message", [
    ("resnet", ["--depth", "7"], "6n+2"),
    ("resnet", ["--data", "bogus"], "bogus"),
    ("vit", ["--heads", "5"], "heads"),
])
def test_what_the_data_or_the_model_refuses_is_a_one_line_usage_error(example, argv, message,
                                                                     capsys, tmp_path):
  module = __import__(f"examples.{example}", fromlist=["main"])
  with pytest.raises(SystemExit) as e:
    module.main(argv + ["--steps", "1", "--out", str(tmp_path), "--no-progress"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err
  assert message in [line for line in err.splitlines() if "error:" in line][0], err
  assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_a_held_out_text_too_short_for_one_window_is_refused_before_training():
  cfg = cli.parse("llama", ["--max-chars", "1000", "--seq-len", "128"])
  with pytest.raises(ValueError, match=r"held-out text has \d+ tokens.*--max-chars"):
    train.make_task(cfg, train.load_data(cfg))


@pytest.mark.parametrize("example", ["resnet", "llama"])
@pytest.mark.parametrize("name", ["ire", "adam", "sam+lookahead"])
def test_a_bad_optimizer_name_is_a_one_line_usage_error(example, name, capsys):
  """``--opt ire`` stops at the command line (exit 2), with the valid names, no traceback."""
  module = __import__(f"examples.{example}", fromlist=["main"])
  with pytest.raises(SystemExit) as e:
    module.main(["--opt", name, "--steps", "1"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  error = [line for line in err.splitlines() if "error:" in line]
  assert len(error) == 1 and "Traceback" not in err, err
  assert f"unknown optimizer {name!r}" in error[0]
  assert all(n in error[0] for n in optim.OPTIMIZERS)
  assert ("adamw+ire" in error[0]) == (name == "ire")


# -----------------------------------------------------------------------------
# BatchNorm: statistics come from the clean pass only
# -----------------------------------------------------------------------------


def _bn_setup(opt, *extra):
  args = cli.parse("resnet", TOY["resnet"] + ["--opt", opt, "--rho", "0.5", "--fast-compile",
                                              *extra])
  m = models.build_resnet("toy", num_classes=10, in_channels=1, seed=0)
  graphdef, params, stats = train.split_model(m.model)
  spec = optim.build_optimizer(args.optimizer, 10, model_stats=stats)
  # Non-trivial running statistics, so that "unchanged" and "updated" differ.
  stats = jax.tree.map(lambda s: s + 0.3, stats)
  d = data.cached_images("digits")
  batch = data.ImageBatcher(d.x_train, d.y_train, 8, seed=0).batch_at(0)
  return args, spec, graphdef, params, stats, batch


@pytest.mark.parametrize("opt", ["sam", "msam", "asam+ire"])
def test_batchnorm_statistics_from_clean_pass_only(opt):
  """SAM/ASAM/SALA share the code path of "sam"; "asam+ire" adds IRE's fisher pass."""
  args, spec, graphdef, params, stats, batch = _bn_setup(opt)
  state = train.TrainState(params, stats, spec.tx.init(params))
  state = jax.tree.map(jnp.copy, state)
  step = train.make_train_step(graphdef, spec, num_classes=10, fast_compile=True)
  new_state, _ = step(state, batch, jnp.int32(0))

  @jax.jit
  def reference(params, stats, batch):
    # What a single clean forward pass in training mode does to the statistics
    # (mSAM: its clean micro-batch passes, averaged over the micro-batches)...
    if opt == "msam":
      m = args.optimizer.num_microbatches
      parts = [train.apply_model(graphdef, params, stats, xb, train=True)[1]
               for xb in jnp.split(batch["x"], m)]
      clean = jax.tree.map(lambda *a: sum(a) / m, *parts)
    else:
      _, clean = train.apply_model(graphdef, params, stats, batch["x"], train=True)

    # ...and what the perturbed pass would do to them, were its statistics kept.
    def loss(p):
      logits, _ = train.apply_model(graphdef, p, stats, batch["x"], train=True)
      return optim.cross_entropy(logits, batch["y"])[0]

    g = jax.grad(loss)(params)
    gn = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
    perturbed_params = jax.tree.map(lambda p, x: p + 0.5 * x / gn, params, g)
    _, perturbed = train.apply_model(graphdef, perturbed_params, stats, batch["x"], train=True)
    return clean, perturbed

  clean, perturbed = reference.lower(params, stats, batch).compile(FAST)(params, stats, batch)
  got, want, bad = (jax.tree.leaves(t) for t in (new_state.stats, clean, perturbed))
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The test can fail: the perturbed pass's statistics are far from the clean ones.
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(want, bad, strict=True)) > 1e-3
  # ...and from the statistics before the step (the clean pass did update them).
  old = jax.tree.leaves(stats)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, old, strict=True)) > 1e-3


def test_evaluation_uses_running_statistics():
  _, _, graphdef, params, stats, batch = _bn_setup("sgd")
  out = train.evaluate(graphdef, params, stats, [dict(batch, w=np.ones(8, np.float32))],
                       fast_compile=True)
  logits, new_stats = jax.jit(lambda p, s, x: train.apply_model(graphdef, p, s, x, train=False))(
      params, stats, batch["x"])
  for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(stats), strict=True):
    np.testing.assert_array_equal(a, b)  # evaluation does not touch the statistics
  want = float(optim.cross_entropy(logits, batch["y"])[0])
  assert out["eval_loss"] == pytest.approx(want, rel=1e-5)


# -----------------------------------------------------------------------------
# Checkpoints: --resume continues bit-identically
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("example,opt,extra", [
    ("resnet", "sala+ire", ["--label-noise", "0.2", "--ire-curvature", "fisher"]),
    ("llama", "lookahead", ["--label-smoothing", "0.1"]),
])
def test_resume_is_bit_identical(example, opt, extra, tmp_path):
  base = TOY[example] + ["--opt", opt, "--steps", "4", "--eval-every", "2", "--eval-batches",
                         "1", "--log-every", "1", "--lr", "0.01", "--no-plot", "--no-progress",
                         "--fast-compile", "--out", str(tmp_path), *extra]
  run = lambda *argv: train.run(cli.parse(example, base + list(argv)), quiet=True)
  # Checkpoints every step: the step after each (asynchronous) save donates the buffers.
  full = run("--name", "full", "--ckpt-every", "1")
  part = run("--name", "part", "--stop-after", "2")
  assert part.summary["eval_loss"] is not None  # evaluated at step 2
  assert (tmp_path / "part" / "checkpoints" / "2").exists()
  resumed = run("--name", "part", "--resume")
  a, b = jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)
  assert jax.tree.structure(full.state) == jax.tree.structure(resumed.state)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The logs agree too, and the resumed run's log has each step once.
  fr, rr = train.read_metrics(tmp_path / "full"), train.read_metrics(tmp_path / "part")
  assert [r["step"] for r in rr] == [1, 2, 3, 4]
  for k in ("loss", "acc", "eval_loss"):
    assert [r.get(k) for r in fr] == [r.get(k) for r in rr]
  # The partial run's state differs from the final one (the test can fail).
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(part.state), a,
                                                      strict=True))
  # The intermediate checkpoint of step 3, saved while training went on, resumes exactly.
  shutil.rmtree(tmp_path / "full" / "checkpoints" / "4")
  again = run("--name", "full", "--resume")
  for x, y in zip(a, jax.tree.leaves(again.state), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_files_and_fresh_runs(tmp_path):
  argv = TOY["vit"] + [a for a in QUICK if a != "--no-checkpoint"] + [
      "--out", str(tmp_path), "--name", "r"]
  ckpts = lambda: sorted(int(p.name) for p in (tmp_path / "r" / "checkpoints").iterdir()
                         if p.name.isdigit())
  run = lambda *extra: train.run(cli.parse("vit", argv + list(extra)), quiet=True)
  run("--ckpt-every", "1")
  assert ckpts() == [1, 2]
  # A fresh run (no --resume) of the same name replaces the old run's checkpoints.
  run()
  assert ckpts() == [2]
  # Resuming a finished run trains no further and keeps its log.
  res = run("--resume")
  assert [r["step"] for r in train.read_metrics(tmp_path / "r")] == [1, 2]
  assert res.summary["eval_loss"] is not None
  # A fresh run that writes no checkpoint still removes the old ones (a later --resume would
  # continue the old run).
  run("--no-checkpoint")
  assert not (tmp_path / "r" / "checkpoints").exists()


def test_resuming_with_other_flags_is_refused(tmp_path, capsys):
  """--resume continues a checkpoint only with the run's own configuration (the loop's
  settings, such as --stop-after, may change): a usage error on the command line."""
  argv = TOY["mlp"] + ["--steps", "4", "--log-every", "2", "--eval-every", "0",
                       "--eval-batches", "1", "--no-plot", "--no-progress", "--fast-compile",
                       "--out", str(tmp_path), "--name", "r"]
  train.run(cli.parse("mlp", argv + ["--stop-after", "2"]), quiet=True)
  with pytest.raises(ValueError, match=r"optimizer.lr: 0.1 -> 0.5"):
    train.run(cli.parse("mlp", argv + ["--lr", "0.5", "--resume"]), quiet=True)
  from examples import mlp
  with pytest.raises(SystemExit) as e:
    mlp.main(argv + ["--lr", "0.5", "--resume"])
  assert e.value.code == 2 and "trained with another configuration" in capsys.readouterr().err
  train.run(cli.parse("mlp", argv + ["--resume", "--stop-after", "1"]), quiet=True)
  assert [r["step"] for r in train.read_metrics(tmp_path / "r")] == [2, 3]


def test_a_stop_off_the_logging_cadence_leaves_the_log_of_one_run(tmp_path):
  """--stop-after 3 logs step 3 (where it stops), and --resume drops that record: the
  resumed log and the summary's training loss are those of one uninterrupted run."""
  base = TOY["mlp"] + ["--steps", "4", "--log-every", "2", "--eval-every", "0",
                       "--eval-batches", "1", "--no-plot", "--no-progress", "--fast-compile",
                       "--out", str(tmp_path)]
  run = lambda *argv: train.run(cli.parse("mlp", base + list(argv)), quiet=True)
  full = run("--name", "full")
  assert [r["step"] for r in train.read_metrics(tmp_path / "full")] == [2, 4]
  run("--name", "part", "--stop-after", "3")
  assert [r["step"] for r in train.read_metrics(tmp_path / "part")] == [2, 3]
  resumed = run("--name", "part", "--resume")
  assert [r["step"] for r in train.read_metrics(tmp_path / "part")] == [2, 4]
  assert resumed.summary["train_loss"] == full.summary["train_loss"]


# -----------------------------------------------------------------------------
# Outputs, command lines, comparison script
# -----------------------------------------------------------------------------


def test_outputs_csv_jsonl_png(tmp_path, capsys):
  argv = TOY["vit"] + QUICK + ["--out", str(tmp_path), "--name", "plotted"]
  argv.remove("--no-plot")
  argv.remove("--no-progress")
  res = train.run(cli.parse("vit", argv))
  # Not a terminal (pytest captures it): plain lines, no progress bar's carriage returns.
  out, err = capsys.readouterr()
  assert "\r" not in out + err
  assert "plotted step 2/2: loss" in out and "compiled the train step in" in out
  run = tmp_path / "plotted"
  for f in ("config.json", "metrics.jsonl", "metrics.csv", "summary.json", "curves.png"):
    assert (run / f).exists(), f
  assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
  assert header[:3] == ["step", "loss", "acc"] and "eval_loss" in header
  assert json.loads((run / "summary.json").read_text())["eval_loss"] == res.summary["eval_loss"]
  assert json.loads((run / "config.json").read_text())["optimizer"]["name"] == "adamw"
  from examples import plot

  out = plot.main([str(run), str(run), "-o", str(tmp_path / "both.png")])
  assert out.read_bytes()[:4] == b"\x89PNG"
  # Runs of one name from two comparisons keep both curves, told apart by their parents.
  assert plot.labels([tmp_path / "llama" / "adamw", tmp_path / "llama-2" / "adamw",
                      tmp_path / "llama" / "sam"]) == ["llama/adamw", "llama-2/adamw", "llama/sam"]
  with pytest.raises(SystemExit):  # not a run directory: a usage error
    plot.main([str(tmp_path), "-o", str(tmp_path / "none.png")])


def test_reported_speed_excludes_compilation(tmp_path, monkeypatch):
  """Every step variant compiles before the timed loop; compile time is reported apart.

  IRE refreshing every 2 steps and branch hints on: a refresh step and a plain step are
  two compiled programs. Nothing may compile between the loop's first and last batch,
  and ``steps_per_s`` is the rate of exactly the logged (timed) windows.
  """
  events = []
  batch_at = data.ImageBatcher.batch_at
  monkeypatch.setattr(data.ImageBatcher, "batch_at",
                      lambda self, step: events.append(("batch", step)) or batch_at(self, step))

  def on_duration(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(("compile", duration))

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    args = args_for("resnet", "--opt", "sgd+ire", "--ire-refresh-every", "2", "--ire-warmup",
                    "0", "--ire-curvature", "grad_sq", "--branch-hints", "on", "--steps", "4",
                    "--name", "timed", out=tmp_path)
    res = train.run(args, quiet=True)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
  loop = [i for i, (kind, _) in enumerate(events) if kind == "batch"][-4:]  # steps 0..3
  assert [events[i][1] for i in loop] == [0, 1, 2, 3]
  assert [e for e in events[loop[0]:loop[-1]] if e[0] == "compile"] == []
  s = res.summary
  assert s["compile_s"] > 0 and s["first_step_s"] >= s["compile_s"]
  # The rate is that of the timed windows: steps 2..4, one logged window each.
  recs = train.read_metrics(tmp_path / "timed")
  assert math.isnan(recs[0]["img_per_s"])  # the first step is not timed
  window_s = sum(8 / r["img_per_s"] for r in recs[1:])
  assert s["steps_per_s"] == pytest.approx(3 / window_s, rel=1e-9)


def test_a_single_evaluation_is_drawn(tmp_path, monkeypatch):
  """One logged step and one evaluation: every panel shows its point (a marker)."""
  import matplotlib.figure

  from examples.common import plots

  figures = []
  save = matplotlib.figure.Figure.savefig
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                      lambda fig, *a, **k: figures.append(fig) or save(fig, *a, **k))
  plots.plot_runs({"run": [{"step": 2, "loss": 1.5, "eval_loss": 1.7, "eval_acc": 0.4}]},
                  tmp_path / "one.png")
  (fig,) = figures
  for ax in fig.axes:
    (line,) = ax.get_lines()
    assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", "None"), ax
    assert line.get_markersize() > 0


@pytest.mark.parametrize("script", ["resnet", "vit", "llama", "mlp", "compare", "plot"])
def test_help(script, capsys):
  mod = compare if script == "compare" else __import__(f"examples.{script}",
                                                       fromlist=["main"])
  with pytest.raises(SystemExit) as e:
    mod.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "--opt" in out or "--opts" in out or "--output" in out


@pytest.mark.parametrize("example", ["resnet", "vit", "llama", "mlp"])
def test_model_flags_are_described_for_the_example(example):
  """--depth and --width say what they mean for this example's model, not every model's."""
  text = " ".join(cli.make_parser(example).format_help().split())
  depth = {"resnet": "layers: 6n+2", "mlp": "hidden layers", "vit": "transformer blocks",
           "llama": "transformer blocks"}[example]
  assert f"--depth DEPTH {depth}" in text
  assert ("6n+2" in text) == (example == "resnet")
  assert ("hidden units" in text) == (example == "mlp")


def test_compare_script(tmp_path, capsys):
  argv = ["--example", "vit", "--out", str(tmp_path), *TOY["vit"], "--steps", "2",
          "--eval-every", "1", "--eval-batches", "1", "--fast-compile"]
  rows = compare.main(argv + ["--opts", "adamw", "adamw+ire,ire-kappa=1", "adamw,lr=0.02"])
  out = capsys.readouterr().out
  assert "| optimizer" in out and "adamw+ire,ire-kappa=1" in out
  assert [r["opt"] for r in rows] == ["adamw", "adamw+ire", "adamw"]
  assert (tmp_path / "vit" / "comparison.png").exists()
  assert (tmp_path / "vit" / "comparison.md").read_text().startswith("| optimizer")
  assert rows[0]["speedup"] == 1.0
  # Every run has its own directory, named after its whole specification.
  config = lambda run: json.loads((tmp_path / run / "config.json").read_text())
  opt = lambda run: config(run)["optimizer"]
  assert opt("vit/adamw")["lr"] == 0.001 and opt("vit/adamw_lr=0.02")["lr"] == 0.02
  assert opt("vit/adamw_ire_ire-kappa=1")["ire_kappa"] == 1.0
  assert [r["run_dir"] for r in rows] == [str(tmp_path / "vit" / n) for n in (
      "adamw", "adamw_ire_ire-kappa=1", "adamw_lr=0.02")]
  # A rerun goes to a new directory and leaves the first comparison as it was (the same
  # last run: its compiled step is reused).
  first = (tmp_path / "vit" / "comparison.md").read_text()
  again = compare.main(argv + ["--opts", "adamw,lr=0.02"])
  assert again[0]["run_dir"] == str(tmp_path / "vit-2" / "adamw_lr=0.02")
  assert (tmp_path / "vit" / "comparison.md").read_text() == first
  assert "--overwrite" in capsys.readouterr().out


def test_compare_run_names_and_output_dir(tmp_path):
  assert compare.run_names(["adamw", "adamw,lr=3e-3", "adamw+ire", "sam+ire,rho=0.1,nesterov"]
                           ) == ["adamw", "adamw_lr=3e-3", "adamw_ire", "sam_ire_rho=0.1_nesterov"]
  assert compare.run_names(["sgd", "sgd", "a+b", "a,b"]) == ["sgd_0", "sgd_1", "a_b_2", "a_b_3"]
  root = tmp_path / "llama"
  assert compare.output_dir(root) == root  # absent
  root.mkdir()
  assert compare.output_dir(root) == root  # empty
  (root / "adamw").mkdir()
  assert compare.output_dir(root) == tmp_path / "llama-2"
  (tmp_path / "llama-2").mkdir()
  assert compare.output_dir(root) == tmp_path / "llama-3"
  assert compare.output_dir(root, overwrite=True) == root


# -----------------------------------------------------------------------------
# Data parallelism: the shard_map step uses the same builders
# -----------------------------------------------------------------------------


def _data_parallel_params(tmp_path, placement, *extra):
  from examples import data_parallel

  argv = ["--size", "toy", "--steps", "3", "--log-every", "3", "--batch-size", "16",
          "--seq-len", "16", "--max-chars", "20000", "--opt", "adamw+ire", "--ire-curvature",
          "grad_sq", "--ire-refresh-every", "1", "--ire-kappa", "3", "--fast-compile",
          "--out", str(tmp_path), "--data-parallel", placement, *extra]
  res = data_parallel.main([*argv, "--name", "-".join([placement, *extra])])
  assert res["devices"] == jax.device_count() > 1 and np.isfinite(res["loss"])
  return res["params"]


@pytest.mark.parametrize("flag", ["--resume", "--eval-every=5", "--stop-after=2",
                                  "--ckpt-every=1", "--no-checkpoint", "--la-sync-period=3",
                                  "--la-slow-step=0.5"])
def test_data_parallel_refuses_the_flags_it_does_not_use(flag, capsys):
  """It neither evaluates, checkpoints, resumes nor runs lookahead: those flags are errors, not
  ignored."""
  from examples import data_parallel

  with pytest.raises(SystemExit):
    data_parallel.make_parser().parse_args([flag])
  assert "unrecognized arguments" in capsys.readouterr().err


def test_data_parallel_shard_map_honours_the_kappa_schedule(tmp_path):
  """``--ire-kappa-schedule lr`` takes effect under ``--data-parallel shard_map`` too."""
  lr_shard_map = _data_parallel_params(tmp_path, "shard_map", "--ire-kappa-schedule", "lr")
  lr_gspmd = _data_parallel_params(tmp_path, "gspmd", "--ire-kappa-schedule", "lr")
  constant = _data_parallel_params(tmp_path, "shard_map", "--ire-kappa-schedule", "constant")
  chex.assert_trees_all_close(lr_shard_map, lr_gspmd, rtol=1e-5, atol=1e-5)
  # kappa_t = 3 lr_t / lr_peak is 2.25 at the second step of the 3-step cosine: the
  # parameters move differently from a constant kappa = 3 (the test can fail).
  gap = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(lr_shard_map), jax.tree.leaves(constant), strict=True))
  assert gap > 1e-4, gap


def test_shard_map_builders_reject_lookahead():
  cfg = cli.parse("llama", ["--opt", "lookahead"])
  with pytest.raises(ValueError, match="lookahead"):
    optim.build_optimizer(cfg.optimizer, 10, axis_name="data")


DP_TOY = ["--size", "toy", "--steps", "1", "--batch-size", "16", "--seq-len", "16",
          "--max-chars", "20000", "--fast-compile"]


def _data_parallel_usage_error(argv, tmp_path, capsys) -> str:
  """The one error line of ``python -m examples.data_parallel argv``, which must stop with a
  usage error (exit 2, no traceback) before anything is written."""
  from examples import data_parallel

  with pytest.raises(SystemExit) as e:
    data_parallel.main([*DP_TOY, "--out", str(tmp_path), *argv])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err, err
  (line,) = [line for line in err.splitlines() if "error:" in line]
  assert not any(tmp_path.iterdir())  # nothing trained, nothing written
  return line


def test_data_parallel_shard_map_msam_refuses_a_per_device_batch_of_fewer_micro_batches(
    tmp_path, capsys):
  """Under shard_map --num-microbatches splits every device's batch: 16 rows over 8 devices
  leave 2 per device, which 4 micro-batches do not divide (a traceback while tracing, naming a
  batch of 2 the user never passed; the global batch alone divides by 4)."""
  n = jax.device_count()
  line = _data_parallel_usage_error(["--data-parallel", "shard_map", "--opt", "msam",
                                     "--num-microbatches", "4"], tmp_path, capsys)
  assert (f"--batch-size 16 / {n} devices = {16 // n}" in line
          and "--num-microbatches 4" in line), line


@pytest.mark.parametrize("argv,message", [
    (["--heads", "3"], "not divisible by the 3 heads"),
    (["--data", "digits"], "unknown text data 'digits'"),
    (["--data", "wikitext:/nonexistent"], "/nonexistent"),
    (["--max-chars", "1000", "--seq-len", "128"], "held-out text has"),
])
def test_data_parallel_reports_what_the_data_or_the_model_refuse_as_usage_errors(
    argv, message, tmp_path, capsys):
  """As ``python -m examples.llama`` does (one helper, ``cli.usage_errors``)."""
  assert message in _data_parallel_usage_error(argv, tmp_path, capsys)


@pytest.mark.parametrize("argv,message", [
    (["--num-processes", "2", "--process-id", "1"],
     "--num-processes and --process-id need --coordinator"),
    (["--process-id", "1"], "--process-id needs --coordinator"),
    (["--coordinator", "127.0.0.1:1"], "needs --num-processes and --process-id"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2"],
     "needs --num-processes and --process-id"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in 0 .. --num-processes - 1; got 2"),
])
def test_data_parallel_multi_host_flags_are_checked(argv, message, tmp_path, capsys):
  """Without --coordinator, --num-processes/--process-id were ignored (every host trained alone
  as process 0, all writing the same files); --coordinator HOST:PORT without them was JAX's
  traceback. Both are refused before JAX's distributed runtime starts."""
  assert message in _data_parallel_usage_error(argv, tmp_path, capsys)


def test_data_parallel_coordinator_auto_passes_the_given_host_flags_on(monkeypatch):
  """With --coordinator auto the cluster supplies what is not given; what is given is used,
  not dropped."""
  import argparse

  from examples import data_parallel

  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  args = argparse.Namespace(cpu_devices=None, coordinator="auto", num_processes=2,
                            process_id=None)
  data_parallel.check_hosts(data_parallel.make_parser(), args)
  data_parallel.setup_devices(args)
  assert calls == [{"num_processes": 2, "process_id": None}]


def test_data_parallel_help_is_its_own(capsys):
  """--help offers what the script runs: no lookahead, its own commands, its own run name."""
  import shlex

  from examples import data_parallel

  parser = data_parallel.make_parser()
  with pytest.raises(SystemExit) as e:
    parser.parse_args(["--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "--opt NAME one of adamw, sgd, sam, asam, gsam, msam, sala; append '+ire'" in text
  assert "lookahead" not in text and "--la-" not in text
  assert "(default: data_parallel-<placement>-<opt>)" in text
  assert "<example>-<opt>" not in text and "examples.llama" not in text
  assert "--num-processes N multi-host runs" in text and "--process-id I multi-host" in text
  epilog = text.split("examples: ", 1)[1]
  assert epilog.startswith("python -m examples.data_parallel --opt adamw+ire")
  for command in data_parallel.USAGE:  # every example command parses, flags and hosts
    words = shlex.split(command, comments=True)
    assert words[:3] == ["python", "-m", "examples.data_parallel"]
    data_parallel.check_hosts(parser, parser.parse_args(words[3:]))
  # The Llama example's own help is unchanged.
  llama = " ".join(cli.make_parser("llama").format_help().split())
  assert "msam, sala, lookahead; append '+ire'" in llama and "--la-sync-period" in llama
  assert "(default: <example>-<opt>)" in llama and "examples.data_parallel" not in llama


def test_compare_helpers():
  assert compare.parse_opt("sam+ire,rho=0.1,nesterov") == (
      "sam+ire", ["--opt", "sam+ire", "--rho", "0.1", "--nesterov"])
  recs = [{"step": 1, "eval_loss": 3.0}, {"step": 2}, {"step": 3, "eval_loss": 1.0}]
  assert compare.steps_to_reach(recs, 2.0) == 3 and compare.steps_to_reach(recs, 0.5) is None


# -----------------------------------------------------------------------------
# Losses and schedules against NumPy
# -----------------------------------------------------------------------------


def test_cross_entropy_with_smoothing_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  y = rng.integers(0, 7, (3, 5))
  s = 0.1
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  target = np.full((3, 5, 7), s / 7)
  np.put_along_axis(target, y[..., None], 1 - s + s / 7, axis=-1)
  want = float(np.mean(-(target * logp).sum(-1)))
  loss, acc = optim.cross_entropy(jnp.asarray(logits), jnp.asarray(y), label_smoothing=s)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(acc) == pytest.approx(float(np.mean(logits.argmax(-1) == y)))
  w = (rng.random((3, 5)) > 0.5).astype(np.float32)
  lw, _ = optim.cross_entropy(jnp.asarray(logits), jnp.asarray(y), weights=jnp.asarray(w))
  nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  assert float(lw) == pytest.approx(float((nll * w).sum() / w.sum()), rel=1e-5)


def test_label_noise():
  y = jnp.zeros(20000, jnp.int32)
  key = jax.random.key(0)
  np.testing.assert_array_equal(optim.label_noise(key, y, 10, 0.0), y)
  noisy = np.asarray(optim.label_noise(key, y, 10, 0.3))
  # A label is changed with probability p (1 - 1/C); new labels are uniform.
  assert np.mean(noisy != 0) == pytest.approx(0.3 * 0.9, abs=0.015)
  counts = np.bincount(noisy[noisy != 0], minlength=10)[1:]
  assert counts.min() > 0.8 * counts.mean()
  assert not np.array_equal(noisy, optim.label_noise(jax.random.key(1), y, 10, 0.3))


def test_label_noise_in_the_train_step_depends_on_the_step(tmp_path):
  argv = TOY["vit"] + QUICK + ["--out", str(tmp_path), "--label-noise", "1.0", "--opt", "sgd",
                               "--lr", "0.0"]
  res = train.run(cli.parse("vit", argv), quiet=True)
  recs = train.read_metrics(res.summary["run_dir"])
  clean = train.run(cli.parse("vit", [a for a in argv if a not in ("--label-noise", "1.0")]
                              + ["--name", "c"]), quiet=True)
  crecs = train.read_metrics(clean.summary["run_dir"])
  # lr 0: same parameters, so a different loss comes from the noisy labels alone.
  assert recs[0]["loss"] != crecs[0]["loss"]


def test_lr_schedule_matches_numpy():
  peak, total, warm, final = 0.5, 100, 10, 0.1
  sched = optim.lr_schedule(peak, total, warm, "cosine", final)
  for t in [0, 5, 9, 10, 40, 99, 150]:
    if t < warm:
      want = peak * (t + 1) / warm
    else:
      frac = min((t - warm) / (total - warm), 1.0)
      want = peak * final + (peak - peak * final) * 0.5 * (1 + math.cos(math.pi * frac))
    assert float(sched(t)) == pytest.approx(want, rel=1e-5), t
  const = optim.lr_schedule(peak, total, 0, "constant")
  assert float(const(0)) == float(const(99)) == pytest.approx(peak)
  assert float(optim.lr_schedule(peak, total, 0, "linear")(50)) == pytest.approx(peak / 2)
  assert optim.to_steps(0.25, 200) == 50 and optim.to_steps(30, 200) == 30


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("mask", ["weights", "all"])
def test_weight_decay_mask(base, mask):
  """``decay_mask="weights"`` skips biases and norm scales; ``"all"`` decays them too."""
  cfg = OptimizerConfig(name=base, weight_decay=0.5, lr=1.0, momentum=0, decay_mask=mask)
  tx = optim.build_optimizer(cfg, 10).tx
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, tx.init(params), params)
  # Zero gradients: SGD's and Adam's steps are 0, only the decay -lr * wd * p remains.
  np.testing.assert_allclose(upd["kernel"], -0.5 * np.ones((2, 2)))
  np.testing.assert_allclose(upd["bias"], -0.5 * np.ones(2) if mask == "all" else np.zeros(2))


def test_clipping_is_inside_the_base():
  cfg = cli.parse("llama", ["--opt", "sgd", "--clip-norm", "1.0", "--lr", "1.0", "--momentum",
                            "0", "--weight-decay", "0"])
  tx = optim.build_optimizer(cfg.optimizer, 10).tx
  params = {"w": jnp.zeros(4)}
  upd, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)
  assert float(np.linalg.norm(upd["w"])) == pytest.approx(1.0, rel=1e-5)


# -----------------------------------------------------------------------------
# Models
# -----------------------------------------------------------------------------


def _count(make):
  from flax import nnx

  abstract = nnx.eval_shape(make)
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("preset,want", [("resnet20", 0.27e6), ("resnet56", 0.85e6)])
def test_resnet_presets_have_the_papers_sizes(preset, want):
  from flax import nnx

  cfg = models.RESNET_PRESETS[preset]
  n = _count(lambda: models.ResNet(num_classes=10, rngs=nnx.Rngs(0), **cfg))
  assert n == pytest.approx(want, rel=0.06)


def test_vit_s_and_llama_60m_sizes():
  from flax import nnx

  n = _count(lambda: models.ViT(num_classes=100, image_size=32, patch_size=4,
                                rngs=nnx.Rngs(0), **models.VIT_PRESETS["vit-s"]))
  assert n == pytest.approx(21.4e6, rel=0.02)  # ViT-S/4 on CIFAR
  n = _count(lambda: models.Llama(vocab_size=32000, rngs=nnx.Rngs(0),
                                  **models.LLAMA_PRESETS["60m"]))
  assert n == pytest.approx(58.1e6, rel=0.01)  # GaLore/IRE Llama-60M, T5 vocabulary
  assert models.swiglu_hidden(512) == 1376


def test_llama_is_causal_and_tied_embeddings_share_weights():
  from flax import nnx

  m = models.Llama(vocab_size=11, dim=16, depth=2, heads=2, tie_embeddings=True,
                   rngs=nnx.Rngs(0))
  assert m.lm_head is None
  x = jnp.asarray([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 6]])
  graphdef, state = nnx.split(m)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile(FAST)(state, x)
  a, b = out[:1], out[1:]
  assert a.shape == (1, 6, 11)
  np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, 4:], b[:, 4:])
  untied = models.Llama(vocab_size=11, dim=16, depth=2, heads=2, rngs=nnx.Rngs(0))
  assert _count(lambda: untied) == _count(lambda: m) + 16 * 11


def test_rotary_is_relative():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

  def score(i, j):
    return float(jnp.sum(models.rotary(q, jnp.asarray([i])) * models.rotary(k, jnp.asarray([j]))))

  assert score(3, 1) == pytest.approx(score(7, 5), rel=1e-5)
  assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
  rq = models.rotary(q, jnp.asarray([5]))
  assert float(jnp.linalg.norm(rq)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-6)


def test_model_errors():
  from flax import nnx

  with pytest.raises(ValueError, match="6n\\+2"):
    models.ResNet(num_classes=10, depth=21, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="preset"):
    models.build_llama("1b", vocab_size=10)
  with pytest.raises(ValueError, match="patch size"):
    models.ViT(num_classes=10, image_size=8, patch_size=3, rngs=nnx.Rngs(0))


# -----------------------------------------------------------------------------
# --precision: float16 compute with one dynamic loss scale per step
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["sam", "msam", "sala"])
def test_float16_step_matches_float32_and_skips_on_overflow(opt):
  # SGD: a step linear in the gradient (Adam's first step is sign(g), which flips on noise)
  args, spec, graphdef, params, stats, batch = _bn_setup(opt, "--base", "sgd",
                                                         "--sala-sync-period", "1")
  opt_state = spec.tx.init(params)

  def run(precision, scale=train.INITIAL_LOSS_SCALE):
    state = train.TrainState(params, stats, opt_state,
                             train.initial_loss_scale(precision, scale))
    step = train.make_train_step(graphdef, spec, num_classes=10, fast_compile=True,
                                 precision=precision, branch_hints="off")
    return step(jax.tree.map(jnp.copy, state), batch, jnp.int32(0))

  def delta(state):
    return np.concatenate([np.ravel(np.asarray(a - b)) for a, b in
                           zip(jax.tree.leaves(state.params), jax.tree.leaves(params),
                               strict=True)])

  ref, ref_m = run("float32")
  # The same step up to the compute dtype's rounding (measured on this toy ResNet, batch 8:
  # the step is off by 24-30% in bfloat16 and 6% in float16, 15% for mSAM, whose BatchNorm
  # normalises micro-batches of a few images; the loss by under 0.02%); an unscaled gradient
  # would be 2^15 times too large.
  for precision, step_tol, loss_tol in (("bfloat16", 0.4, 2e-3), ("float16", 0.2, 5e-4)):
    got, m = run(precision)
    assert abs(float(m["loss"]) - float(ref_m["loss"])) < loss_tol * float(ref_m["loss"])
    err = np.linalg.norm(delta(got) - delta(ref)) / np.linalg.norm(delta(ref))
    assert err < step_tol, (precision, err)
  _, m = run("float16")
  assert float(m["skipped"]) == 0.0 and float(m["loss_scale"]) == train.INITIAL_LOSS_SCALE
  # A scale of 2^100 overflows float16's backward pass: the step is skipped (parameters,
  # statistics and optimizer state unchanged) and the scale halves.
  skipped, m = run("float16", 2.0**100)
  assert float(m["skipped"]) == 1.0
  chex.assert_trees_all_equal(skipped.params, params)
  chex.assert_trees_all_equal(skipped.stats, stats)
  chex.assert_trees_all_equal(skipped.opt_state, opt_state)
  assert float(skipped.loss_scale["scale"]) == 2.0**99
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(skipped.params))


def _matmul_operand_dtypes(jaxpr) -> collections.Counter:
  """(primitive, operand dtypes) of every dot_general and convolution in ``jaxpr`` and the
  jaxprs inside it (both branches of a conditional)."""
  found: collections.Counter = collections.Counter()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      found[(eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars))] += 1
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _matmul_operand_dtypes(inner)
  return found


@pytest.mark.parametrize("example,precision", [
    ("llama", "bfloat16"), ("resnet", "bfloat16"), ("vit", "bfloat16"), ("mlp", "bfloat16"),
    ("resnet", "float16"), ("mlp", "float16")])
def test_precision_runs_every_matmul_and_convolution_in_the_compute_dtype(example, precision):
  """--precision casts the compute of every layer, not only the first one: float32 running
  statistics (BatchNorm) and nnx.Embed's dtype (fixed to float32 at construction) must not
  promote what follows. Some backward products of the attention mix a float32 cotangent (of
  its float32 softmax) with a cast operand; none multiplies two float32 operands. (float16
  attention runs in float32 on the CPU: test_float16_attention_runs_on_the_cpu.)"""
  extra = ["--seq-len", "16"] if example == "llama" else []
  cfg = cli.parse(example, TOY[example] + ["--precision", precision, "--opt", "sam", *extra])
  d = train.load_data(cfg)
  task = train.make_task(cfg, d)
  graphdef, params, stats = train.split_model(train.build_model(cfg, d).model)
  spec = optim.build_optimizer(cfg.optimizer, cfg.steps, model_stats=stats)
  state = train.init_state(spec, params, stats, precision)
  fn = train.step_function(graphdef, spec, num_classes=task.num_classes, precision=precision)
  found = _matmul_operand_dtypes(jax.make_jaxpr(fn)(state, task.batch_at(0), np.int32(0)).jaxpr)
  assert any(precision in dtypes for _, dtypes in found), found
  assert not [k for k in found if set(k[1]) == {"float32"}], found


@pytest.mark.parametrize("example", ["vit", "llama"])
def test_float16_attention_runs_on_the_cpu(example, tmp_path):
  """XLA:CPU has no float16 dot product with float32 accumulation, which
  jax.nn.dot_product_attention's logits use: the models run it in float32 there."""
  res = train.run(args_for(example, "--precision", "float16", out=tmp_path), quiet=True)
  assert math.isfinite(res.summary["eval_loss"])
  q = jnp.ones((2, 4, 2, 8), jnp.float16)
  out = jax.jit(lambda q: models.attention(q, q, q, causal=True))(q)
  assert out.dtype == jnp.float16 and bool(jnp.isfinite(out).all())


def test_float16_turns_branch_hints_off():
  """A skipped float16 step leaves the optimizer's counters behind the step number that the
  hints are read from (hinted, IRE would never refresh again after one skip): "auto" is
  off with float16, "on" is refused, and IRE refreshes on its own count after a skip."""
  args, spec, graphdef, params, stats, batch = _bn_setup(
      "sgd+ire", "--ire-refresh-every", "2", "--ire-warmup", "0", "--ire-curvature", "grad_sq")
  with pytest.raises(ValueError, match="float16"):
    train.make_train_step(graphdef, spec, num_classes=10, branch_hints="on",
                          precision="float16")
  steps = {mode: train.make_train_step(graphdef, spec, num_classes=10, fast_compile=True,
                                       branch_hints=mode, precision="float16")
           for mode in ("auto", "off")}
  assert steps["auto"].hints_at is None
  # The first step overflows (scale 2^100) and is skipped: the optimizer's count stays at 0,
  # so its step 1 (the loop's step 2) refreshes the mask, which starts all zeros.
  state = jax.tree.map(jnp.copy, train.TrainState(  # the step donates its state's buffers
      params, stats, spec.tx.init(params), train.initial_loss_scale("float16", 2.0**100)))
  skipped = []
  for t in range(3):
    state, m = steps["auto"](state, batch, jnp.int32(t))
    state = state._replace(loss_scale=train.initial_loss_scale("float16"))
    skipped.append(float(m["skipped"]))
  assert skipped == [1.0, 0.0, 0.0]
  assert float(train.flat_fraction(state.opt_state)) > 0.0


def test_precision_flag_runs_the_example_and_logs_the_scale(tmp_path):
  out = tmp_path / "runs"
  train_args = TOY["resnet"] + QUICK + ["--opt", "sam", "--precision", "float16",
                                        "--out", str(out), "--name", "fp16"]
  from examples import resnet

  resnet.main(train_args)
  recs = [json.loads(line) for line in (out / "fp16" / "metrics.jsonl").read_text().splitlines()]
  assert [r["loss_scale"] for r in recs] == [train.INITIAL_LOSS_SCALE] * 2
  assert all(r["skipped"] == 0.0 and math.isfinite(r["loss"]) for r in recs)
  with pytest.raises(ValueError, match="precision"):
    train.initial_loss_scale("float8")


def test_a_skipped_float16_step_logs_no_sharpness():
  """SAM's perturbed loss is read from the optimizer state, which a skipped step reverts: it
  was the previous step's (0.0 before any step, the sharpness then -loss). A skipped step's
  perturbed loss and sharpness are NaN; a step that is not skipped logs its own."""
  args, spec, graphdef, params, stats, batch = _bn_setup("sam")
  step = train.make_train_step(graphdef, spec, num_classes=10, fast_compile=True,
                               precision="float16")
  state = jax.tree.map(jnp.copy, train.TrainState(
      params, stats, spec.tx.init(params), train.initial_loss_scale("float16", 2.0**100)))
  state, m = step(state, batch, np.int32(0))
  assert float(m["skipped"]) == 1.0 and math.isfinite(float(m["loss"]))
  assert math.isnan(float(m["perturbed_loss"])) and math.isnan(float(m["sharpness"]))
  state = state._replace(loss_scale=train.initial_loss_scale("float16"))
  _, m = step(state, batch, np.int32(1))
  assert float(m["skipped"]) == 0.0
  assert float(m["perturbed_loss"]) > 0
  assert float(m["sharpness"]) == pytest.approx(float(m["perturbed_loss"]) - float(m["loss"]))


def test_a_nan_sharpness_is_logged_and_left_out_of_the_plot(tmp_path, monkeypatch):
  """The NaN sharpness of a skipped float16 step goes through metrics.jsonl and the CSV, and the
  plot draws the other steps' values (NaN spread over the smoothing window, or broke the line)."""
  import matplotlib.figure

  from examples.common import plots

  log = train.MetricsLog(tmp_path, resume_step=None)
  for step in range(1, 121):
    log.write({"step": step, "loss": 2.0, "skipped": float(step == 60),
               "sharpness": float("nan") if step == 60 else 0.01 * step})
  log.write_csv()
  recs = train.read_metrics(tmp_path)
  assert math.isnan(recs[59]["sharpness"]) and recs[60]["sharpness"] == pytest.approx(0.61)
  assert "nan" in (tmp_path / "metrics.csv").read_text()
  figures = []
  save = matplotlib.figure.Figure.savefig
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                      lambda fig, *a, **k: figures.append(fig) or save(fig, *a, **k))
  plots.plot_runs({"run": recs}, tmp_path / "curves.png")
  (fig,) = figures
  (line,) = fig.axes[-1].get_lines()
  assert fig.axes[-1].get_title().startswith("SAM sharpness")
  y = np.asarray(line.get_ydata(), float)
  assert np.isfinite(y).all(), y
  assert len(y) == 118  # the 119 finite values, smoothed over k = 2 steps
