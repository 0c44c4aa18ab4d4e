"""Typed declarations of the benchmarks, plain frozen data read by the runner and the renderer.

A training experiment is an :class:`Experiment` (arms trained on tasks over seeds); a
micro-benchmark is a :class:`Micro` (blocks timed or compiled against a baseline, over sizes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

_Overrides = Mapping[str, Any]


def _overrides() -> Any:
  return dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer of an experiment: overrides of the example's configs for this arm."""

  label: str  # its name in tables and plots
  optimizer: _Overrides = _overrides()  # of the example's ``OptimizerConfig``
  train: _Overrides = _overrides()  # of its ``TrainConfig``, this arm only (e.g. ``steps``)
  note: str = ""  # what a reader of the table needs to know about this arm


@dataclasses.dataclass(frozen=True)
class Task:
  """What is trained: an example (``"resnet"``, ``"llama"``, ...), its data, config overrides.

  ``overrides`` are of the example's ``TrainConfig``; a nested config by a mapping
  (``{"model": {"size": "toy"}, "optimizer": {"lr": 0.1}}``).
  """

  example: str
  data: str  # a data set of :data:`benchmarks.data.DATASETS`
  overrides: _Overrides = _overrides()
  name: str = ""  # its key in the results (default ``"{example}-{data}"``)
  arms: tuple[str, ...] = ()  # the labels of the arms trained on it (default: every arm)

  @property
  def key(self) -> str:
    return self.name or f"{self.example}-{self.data}"


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A training experiment: every arm on every task and seed, from the same initialisation.

  Results go to ``results/{name}.json``, the report's template is ``templates/{name}.md``;
  ``smoke`` overrides fields for a seconds-long run (``--smoke``; never committed).
  """

  name: str
  claim: str  # the claim tested, with its source
  tasks: tuple[Task, ...]
  arms: tuple[Arm, ...]
  seeds: tuple[int, ...]  # each changes the initialisation, the batch order, the draws
  steps: int  # training steps (an arm may override them)
  metrics: tuple[str, ...]  # what each run records (``"test_acc"``, ``"top_eig"``, ...)
  baseline: str  # label of the arm the others are compared with
  smoke: _Overrides = _overrides()

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
  """A micro-benchmark: blocks measured against a baseline block, over sizes."""

  name: str  # results are ``results/{name}.json``
  measures: str  # what is measured, in which unit
  blocks: tuple[str, ...]
  baseline: str  # the block every other one is a ratio to
  sizes: tuple[Any, ...] = ()  # problem sizes, as the benchmark reads them
  reps: int = 1  # repetitions (compiled benchmarks are deterministic)
  smoke: _Overrides = _overrides()

  def __post_init__(self):
    if self.baseline not in self.blocks:
      raise ValueError(f"{self.name}: baseline {self.baseline!r} is not a block.")


def smoke(spec: Experiment | Micro) -> Experiment | Micro:
  """``spec`` with its smoke overrides applied."""
  return dataclasses.replace(spec, **spec.smoke) if spec.smoke else spec


def config_hash(*parts: Any) -> str:
  """SHA-256 (16 hex digits) of ``parts`` as JSON, dataclasses by their fields: a run's id."""
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
