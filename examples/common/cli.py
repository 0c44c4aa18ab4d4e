"""The examples' command lines: ``argv`` -> :class:`~examples.common.config.TrainConfig`.

Every flag is generated from a field of the typed configs
(:mod:`examples.common.config`: its help, group, choices and parser live in the
field's metadata) with the example's ``get_config()`` as its default; a flag
that an example does not use (``--width`` of the ViT) is not offered. This
module turns ``argv`` into a config and nothing else: the run itself is
:func:`examples.common.train.run`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import typing
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

from . import config as config_lib

EXAMPLES = tuple(config_lib.KINDS)
# The sub-configs of a TrainConfig whose fields are flags (None: its own fields).
SECTIONS = ("data", "model", "optimizer", None)


def example_module(example: str) -> Any:
  """The module ``examples.<example>`` (its ``get_config``, ``USAGE`` and docstring)."""
  if example not in config_lib.KINDS:
    raise ValueError(f"unknown example {example!r}; use one of {', '.join(EXAMPLES)}.")
  return importlib.import_module(f"examples.{example}")


def get_config(example: str) -> config_lib.TrainConfig:
  """The defaults of ``python -m examples.<example>``."""
  return example_module(example).get_config()


def _flags(cfg: config_lib.TrainConfig) -> Iterator[tuple[str | None, dataclasses.Field, Any]]:
  """``(section, field, value)`` of every field of ``cfg`` that is a flag of its example."""
  for section in SECTIONS:
    obj = cfg if section is None else getattr(cfg, section)
    for f in dataclasses.fields(obj):
      shown = f.metadata.get("examples")
      if "help" in f.metadata and (shown is None or cfg.example in shown):
        yield section, f, getattr(obj, f.name)


def _dest(section: str | None, f: dataclasses.Field) -> str:
  return f.name if section is None else f"{section}.{f.name}"


def _usage_error(parse: Callable[[str], Any]) -> Callable[[str], Any]:
  """``parse`` whose ``ValueError`` becomes argparse's one-line usage error."""

  def wrapped(text: str) -> Any:
    try:
      return parse(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None

  wrapped.__name__ = parse.__name__
  return wrapped


def _argument(section: str | None, f: dataclasses.Field, default: Any, hint: Any,
              example: str) -> tuple[str, dict[str, Any]]:
  """The flag and the ``add_argument`` keywords of one config field."""
  meta = f.metadata
  flag = meta.get("flag", "--" + f.name.replace("_", "-"))
  text = meta["help"]
  kw: dict[str, Any] = dict(dest=_dest(section, f), default=default,
                            help=text(example) if callable(text) else text)
  typ = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
  if typ is bool:
    kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
  else:
    kw["type"] = _usage_error(meta["parse"]) if "parse" in meta else typ
    choices = meta.get("choices")
    if choices is not None:
      kw["choices"] = list(choices(example) if callable(choices) else choices)
    if "choices" not in kw:  # argparse's default, from the flag rather than the dest
      kw["metavar"] = meta.get("metavar", flag[2:].replace("-", "_").upper())
  return flag, kw


def make_parser(example: str, defaults: config_lib.TrainConfig | None = None, *,
                omit: Collection[str] = (), prog: str | None = None,
                description: str | None = None, usage: Sequence[str] | None = None,
                helps: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
  """The command line of ``example``, its defaults those of ``defaults`` (its get_config()).

  A script that trains the example its own way (``examples/data_parallel.py``) adapts it:
  ``omit``: the fields given no flag (those it does not use), by their argparse ``dest``
  (``"resume"``, ``"optimizer.la_sync_period"``); ``prog``, ``description`` and ``usage``
  (the epilog's example commands) replace the example module's; ``helps``: help texts by
  ``dest`` that replace the fields' own.
  """
  module = example_module(example)
  cfg = module.get_config() if defaults is None else defaults
  usage = module.USAGE if usage is None else usage
  p = argparse.ArgumentParser(
      prog=prog or f"python -m examples.{example}",
      description=module.__doc__ if description is None else description,
      epilog="examples:\n" + "\n".join(f"  {u}" for u in usage),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  groups = {name: p.add_argument_group(name) for name in config_lib.GROUPS}
  hints = {cls: typing.get_type_hints(cls) for cls in (
      config_lib.DataConfig, config_lib.ModelConfig, config_lib.OptimizerConfig,
      config_lib.TrainConfig)}
  for section, f, value in _flags(cfg):
    if _dest(section, f) in omit:
      continue
    cls = type(cfg if section is None else getattr(cfg, section))
    flag, kw = _argument(section, f, value, hints[cls][f.name], example)
    kw["help"] = (helps or {}).get(kw["dest"], kw["help"])
    groups[f.metadata["group"]].add_argument(flag, **kw)
  return p


def to_config(namespace: argparse.Namespace, defaults: config_lib.TrainConfig
              ) -> config_lib.TrainConfig:
  """``defaults`` with every flag's value of ``namespace`` (parsed by :func:`make_parser`;
  an omitted flag keeps its default)."""
  values = vars(namespace)
  changes: dict[str | None, dict[str, Any]] = {s: {} for s in SECTIONS}
  for section, f, _ in _flags(defaults):
    if _dest(section, f) in values:
      changes[section][f.name] = values[_dest(section, f)]
  top = changes.pop(None)
  nested = {s: dataclasses.replace(getattr(defaults, s), **c)
            for s, c in changes.items() if s is not None}
  return dataclasses.replace(defaults, **nested, **top)


def parse(example: str, argv: list[str] | None = None) -> config_lib.TrainConfig:
  """The :class:`~examples.common.config.TrainConfig` of ``python -m examples.<example> argv``.

  ``parse(example, [])`` is the example's ``get_config()``; an invalid value is a
  one-line usage error (``SystemExit(2)``), as for any command line.
  """
  return _parsed(example, argv)[1]


def _parsed(example: str, argv: list[str] | None
            ) -> tuple[argparse.ArgumentParser, config_lib.TrainConfig]:
  """``(parser, config)`` of :func:`parse` (the parser reports later usage errors)."""
  defaults = get_config(example)
  parser = make_parser(example, defaults)
  return parser, checked_config(parser, parser.parse_args(argv), defaults)


def checked_config(parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                   defaults: config_lib.TrainConfig) -> config_lib.TrainConfig:
  """:func:`to_config`, checked by the config and by the optimizer's own checks of its
  hyperparameters (before any data are read); an invalid value is ``parser.error``."""
  try:
    cfg = to_config(namespace, defaults)
    from . import optim
    optim.build_optimizer(cfg.optimizer, cfg.steps)
  except ValueError as e:
    parser.error(str(e))
  return cfg


def main(example: str, argv: list[str] | None = None):
  """Entry point of ``python -m examples.<example>``: parses ``argv`` and trains.

  What only the data or the model can refuse (a data spec that names no data set, a missing
  directory, a ResNet depth that is not 6n+2, heads that do not divide the width) is a
  one-line usage error too, before any training, and so is a ``--resume`` of a run trained
  with other flags.
  """
  from . import train

  parser, cfg = _parsed(example, argv)
  with usage_errors(parser):
    train.check_resume(cfg)
    data = train.load_data(cfg)
    model = train.build_model(cfg, data).model
  return train.run(cfg, data=data, model=model)


@contextlib.contextmanager
def usage_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
  """What the data or the model refuse inside the block (a ``ValueError``, a missing file, a
  missing optional package) becomes ``parser.error``: a one-line usage error, exit 2."""
  try:
    yield
  except (ValueError, FileNotFoundError, ImportError) as e:
    parser.error(str(e))
