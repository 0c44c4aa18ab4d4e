"""Benchmark data (``--data-dir``, else the offline fallbacks) and the small models timed."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from examples.common import data as _data

DATA_ENV = "IRE_OPTAX_DATA"


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
  """Adds ``--data-dir`` (default: ``$IRE_OPTAX_DATA``; absent: the offline data)."""
  parser.add_argument(
      "--data-dir", default=os.environ.get(DATA_ENV) or None, metavar="DIR",
      help=f"directory holding mnist/, wikitext-2/, tinyshakespeare/ (default: ${DATA_ENV}; "
           "without it the offline fallbacks are used: scikit-learn digits, CPython text)")


def data_path(data_dir: str | os.PathLike | None, *parts: str) -> Path | None:
  """``data_dir/parts...`` if ``data_dir`` is given and that path exists, else None."""
  p = Path(data_dir).joinpath(*parts) if data_dir else None
  return p if p is not None and p.exists() else None


def mnist_dir(data_dir: str | os.PathLike | None) -> Path | None:
  """The ``mnist`` directory under ``data_dir`` if it holds the training images."""
  d = data_path(data_dir, "mnist")
  return d if d is not None and any(d.glob("train-images*")) else None


def load_images(data_dir: str | os.PathLike | None, *, scale: str = "standard",
                require_mnist: bool = False) -> _data.ImageData:
  """MNIST under ``data_dir`` (``scale``: ``"standard"``ised or ``"unit"``: pixels / 255), else
  the standardised digits (``require_mnist``: raise ``FileNotFoundError`` instead)."""
  if scale not in ("standard", "unit"):
    raise ValueError(f"`scale` must be 'standard' or 'unit'; got {scale!r}.")
  d = mnist_dir(data_dir)
  if d is None:
    if require_mnist:
      raise FileNotFoundError(
          f"MNIST not found: pass --data-dir DIR (or set ${DATA_ENV}) with DIR/mnist/ holding "
          "the IDX files.")
    return _data.load_digits()
  if scale == "unit":
    img = _data.load_mnist(d, standardise=False)
    img.x_train /= 255.0
    img.x_test /= 255.0
    return img
  return _data.load_mnist(d)


# The training experiments' data sets: name -> (path under --data-dir or None: built in,
# the examples' --data spec of that path).
DATASETS = {"mnist": ("mnist", "mnist:{}"), "wikitext2": ("wikitext-2", "wikitext:{}"),
            "shakespeare": ("tinyshakespeare/input.txt", "text:{}"),
            "digits": (None, "digits"), "cpython-docs": (None, "cpython-docs")}


def data_spec(name: str, data_dir: str | os.PathLike | None) -> str:
  """The examples' data spec of data set ``name`` (:data:`DATASETS`) under ``data_dir``."""
  path, spec = DATASETS[name]
  return spec if path is None else spec.format(_find(path, data_dir))


def _find(path: str, data_dir: str | os.PathLike | None) -> Path:
  """``data_dir/path`` of a data set, or a ``FileNotFoundError`` saying how to give it."""
  found = data_path(data_dir, *path.split("/"))
  if found is None:
    raise FileNotFoundError(f"{path} not found: pass --data-dir DIR (or set ${DATA_ENV}) with "
                            f"DIR/{path}; --smoke runs on offline data.")
  return found


def fingerprint(name: str, data_dir: str | os.PathLike | None) -> Any:
  """What a run on data set ``name`` under ``data_dir`` trains on, for its cache key: the name,
  and the name and size of every file of it (raises as :func:`data_spec` if it is absent)."""
  path, _ = DATASETS[name]
  if path is None:
    return name
  root = _find(path, data_dir)
  files = [root] if root.is_file() else sorted(q for q in root.rglob("*") if q.is_file())
  return [name, [(q.relative_to(root).as_posix() if q != root else q.name, q.stat().st_size)
                 for q in files]]


def describe_images(img: _data.ImageData) -> str:
  """One line naming the data set and its split sizes."""
  name = {"mnist": "MNIST", "digits": "scikit-learn digits (MNIST not found)"}.get(img.name,
                                                                                 img.name)
  return f"{name} ({len(img.x_train):,} train / {len(img.x_test):,} test)"


def read_text(data_dir: str | os.PathLike | None, *parts: str) -> tuple[str, str]:
  """``(text, name)`` of ``data_dir/parts...``; CPython's documentation text if absent."""
  p = data_path(data_dir, *parts)
  if p is not None:
    return _data.read_text_path(p), "/".join(parts)
  return _data.cpython_docs_text(), "CPython documentation text (data not found)"


def tree_sizes(n: int, blocks: int = 21) -> list[int]:
  """Leaf sizes of a convnet-like tree of ``n`` parameters: ``blocks`` blocks of a large kernel
  and two small vectors (63 leaves by default)."""
  small = max(1, n // blocks // 512)
  sizes: list[int] = []
  for b in range(blocks):
    big = (n - sum(sizes)) // (blocks - b) - 2 * small
    sizes += [big, small, small]
  sizes[-1] += n - sum(sizes)
  return sizes


def _he(key: Any, shape: tuple[int, ...], fan_in: int) -> dict[str, Any]:
  """One layer: He-normal weights of ``shape``, zero biases."""
  import jax
  import jax.numpy as jnp

  return {"w": jax.random.normal(key, shape) * jnp.sqrt(2.0 / fan_in), "b": jnp.zeros(shape[-1])}


def _dense(layers: Sequence[dict[str, Any]], h: Any) -> Any:
  """ReLU dense ``layers`` on ``h``, the last one linear."""
  import jax

  for layer in layers[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return h @ layers[-1]["w"] + layers[-1]["b"]


def mlp_init(key: Any, sizes: Sequence[int]) -> list[dict[str, Any]]:
  """A pure-JAX MLP of widths ``sizes``: He-normal weights (layer i: ``fold_in(key, i)``)."""
  import jax

  return [_he(jax.random.fold_in(key, i), (m, n), m)
          for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]


def mlp_logits(params: list[dict[str, Any]], x: Any) -> Any:
  """ReLU MLP on the flattened input."""
  return _dense(params, x.reshape(x.shape[0], -1))


def cnn_init(key: Any, *, channels: Sequence[int], num_classes: int = 10) -> dict[str, Any]:
  """A pure-JAX CNN on one-channel images: 3x3 ``SAME`` ReLU convolutions of widths
  ``channels``, a global mean pool, a linear head; He-normal weights."""
  import jax

  keys = iter(jax.random.split(key, len(channels) + 1))
  conv, c_in = [], 1
  for c in channels:
    conv.append(_he(next(keys), (3, 3, c_in, c), 9 * c_in))
    c_in = c
  return {"conv": conv, "dense": [_he(next(keys), (c_in, num_classes), c_in)]}


def cnn_logits(params: dict[str, Any], x: Any, *, strides: Sequence[int]) -> Any:
  """Logits of :func:`cnn_init`'s network on NHWC images ``x``, its convolutions' ``strides``."""
  import jax

  h = x
  for layer, s in zip(params["conv"], strides, strict=True):
    h = jax.lax.conv_general_dilated(h, layer["w"], (s, s), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + layer["b"])
  return _dense(params["dense"], h.mean(axis=(1, 2)))


def cross_entropy(logits: Any, labels: Any) -> Any:
  """Mean softmax cross-entropy with integer labels."""
  import optax

  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def small_net(*, in_shape: Sequence[int], channels: Sequence[int] = (),
              strides: Sequence[int] = (), dense: Sequence[int] = (), num_classes: int = 10,
              seed: int = 0, **_: Any) -> Any:
  """:func:`cnn_init`'s flattened network in Flax NNX, for ``train.run(cfg, model=...)``.
  ``in_shape``: one image's (H, W, C)."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      h, w, c = in_shape
      convs = []
      for c_out, s in zip(channels, strides, strict=True):
        convs.append(nnx.Conv(c, c_out, (3, 3), strides=s, padding="SAME", rngs=rngs))
        c, h, w = c_out, -(-h // s), -(-w // s)
      self.convs = nnx.List(convs)
      widths = [h * w * c, *dense, num_classes]
      self.dense = nnx.List([nnx.Linear(m, n, rngs=rngs)
                             for m, n in zip(widths, widths[1:], strict=False)])

    def __call__(self, x: Any, *, train: bool = False) -> Any:
      import jax

      for conv in self.convs:
        x = jax.nn.relu(conv(x))
      x = x.reshape(x.shape[0], -1)
      for layer in self.dense[:-1]:
        x = jax.nn.relu(layer(x))
      return self.dense[-1](x)

  return Net(nnx.Rngs(seed))
