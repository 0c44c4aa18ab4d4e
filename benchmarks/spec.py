"""Typed declarations of the benchmarks: what is run, on what, against what, to test which claim.

A training experiment is an :class:`Experiment`: a task (an example's config with overrides),
its arms (label -> optimizer overrides), seeds, steps, the metrics recorded and the claim it
tests. A micro-benchmark is a :class:`Micro`: named blocks timed (or compiled) against a
baseline block, over sizes. Both are plain frozen data: the runner and the renderer read them,
nothing in them runs.

Example::

  SPEC = Experiment(
      name="sala", claim="SALA beats its base (Tan et al. 2024, Table 2)",
      task=Task(example="mlp", data="mnist", overrides={"batch_size": 128}),
      arms=(Arm("base", {"name": "sgd", "lr": 0.05}),
            Arm("sala", {"name": "sala", "rho": 0.2, "sala_sync_period": 2})),
      seeds=(0, 1, 2), steps=2000, metrics=("test_acc", "test_loss"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer of an experiment.

  Attributes:
    label: its name in tables and plots.
    optimizer: overrides of the example's ``OptimizerConfig`` (field -> value).
    train: overrides of the example's ``TrainConfig`` for this arm only (e.g. ``steps``).
    note: what a reader of the table needs to know about this arm.
  """

  label: str
  optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Task:
  """What is trained: an example (``"resnet"``, ``"llama"``, ...), its data, config overrides.

  Attributes:
    example: the example whose ``get_config()`` is the starting point.
    data: the data set's name (:data:`benchmarks.data.DATASETS`).
    overrides: of the ``TrainConfig``; a nested config by a mapping
      (``{"model": {"size": "toy"}, "optimizer": {"lr": 0.1}}``).
    name: its key in the results (default ``"{example}-{data}"``).
    arms: the labels of the arms trained on it (default: every arm).
  """

  example: str
  data: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  name: str = ""
  arms: tuple[str, ...] = ()

  @property
  def key(self) -> str:
    return self.name or f"{self.example}-{self.data}"


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A training experiment: every arm on every task and seed, from the same initialisation.

  Attributes:
    name: results are ``results/{name}.json``; the report's template ``templates/{name}.md``.
    claim: the claim tested, with its source.
    tasks: the tasks (model + data) the arms are trained on.
    arms: the optimizers; ``baseline`` names the one the others are compared with.
    seeds: each changes the initialisation, the batch order and the optimizers' draws.
    steps: training steps (an arm may override them).
    metrics: what each run records (``"test_acc"``, ``"test_loss"``, ``"top_eig"``, ...).
    baseline: label of the reference arm.
    smoke: overrides of these fields for a seconds-long run (``--smoke``; never committed).
  """

  name: str
  claim: str
  tasks: tuple[Task, ...]
  arms: tuple[Arm, ...]
  seeds: tuple[int, ...]
  steps: int
  metrics: tuple[str, ...]
  baseline: str
  smoke: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    labels = [a.label for a in self.arms]
    if len(set(labels)) != len(labels):
      raise ValueError(f"{self.name}: arm labels must be unique; got {labels}.")
    if self.baseline not in labels:
      raise ValueError(f"{self.name}: baseline {self.baseline!r} is not an arm ({labels}).")

  def arm(self, label: str) -> Arm:
    return next(a for a in self.arms if a.label == label)


@dataclasses.dataclass(frozen=True)
class Micro:
  """A micro-benchmark: blocks measured against a baseline block, over sizes.

  Attributes:
    name: results are ``results/{name}.json``.
    measures: what is measured and in which unit (e.g. "train-step time over the base's").
    blocks: labels of the blocks measured.
    baseline: the block every other one is a ratio to.
    sizes: the problem sizes (parameters, widths, ...), as the benchmark reads them.
    reps: repetitions (timed micro-benchmarks; compiled ones are deterministic).
    smoke: overrides for a seconds-long run.
  """

  name: str
  measures: str
  blocks: tuple[str, ...]
  baseline: str
  sizes: tuple[Any, ...] = ()
  reps: int = 1
  smoke: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.baseline not in self.blocks:
      raise ValueError(f"{self.name}: baseline {self.baseline!r} is not a block.")


def smoke(spec: Experiment | Micro) -> Experiment | Micro:
  """``spec`` with its smoke overrides applied."""
  return dataclasses.replace(spec, **spec.smoke) if spec.smoke else spec


def config_hash(*parts: Any) -> str:
  """SHA-256 (hex, 16 digits) of a JSON rendering of ``parts``: the identity of one run.

  Dataclasses are hashed by their fields, so any change of any setting is a new run.
  """
  def plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
      return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
      return {str(k): plain(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    return x if isinstance(x, (str, int, float, bool, type(None))) else repr(x)

  text = json.dumps(plain(parts), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]
