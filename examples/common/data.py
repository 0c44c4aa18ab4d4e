"""Datasets for the examples: loaders, tokenisers and deterministic batchers.

Every loader returns plain NumPy arrays; nothing here imports JAX. Images are
``float32`` arrays of shape ``(N, H, W, C)`` standardised per channel with the
training set's statistics, labels are ``int32``. Text is a 1-D ``int32`` array
of token ids.

Data are chosen with a *spec* string ``kind[:argument]``:

========================  =====================================================
``digits``                scikit-learn's bundled 8x8 digits (1,797 images; the
                          offline default for images: no download needed)
``mnist:DIR``             MNIST IDX files (``train-images-idx3-ubyte[.gz]``, ...)
``cifar10:PATH``          CIFAR-10 python pickle batches (directory or ``.tar.gz``)
``cifar100:PATH``         CIFAR-100 python pickles (``train``/``test``, fine labels)
``hf:NAME[:CONFIG]``      a Hugging Face ``datasets`` dataset (online, optional)
``tfds:NAME``             a TensorFlow Datasets dataset (online, optional)
``cpython-docs``          the documentation text that ships with CPython
                          (``pydoc_data.topics``; the offline default for text)
``text:PATH``             any text file, or every text file under a directory
``wikitext:DIR``          WikiText (``wiki.{train,valid,test}.tokens`` or
                          ``{train,valid,test}.txt``)
========================  =====================================================

Batches are a pure function of ``(seed, step)`` (see :class:`ImageBatcher` and
:class:`TextBatcher`), which is what makes ``--resume`` bit-identical: a resumed
run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# -----------------------------------------------------------------------------
# Containers
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class ImageData:
  """A labelled image-classification dataset split into train and test."""

  x_train: np.ndarray  # (N, H, W, C) float32, standardised
  y_train: np.ndarray  # (N,) int32
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


@dataclasses.dataclass
class TextData:
  """A tokenised text corpus split into train and validation token arrays."""

  train: np.ndarray  # (N,) int32
  valid: np.ndarray  # (M,) int32
  tokenizer: Tokenizer
  name: str

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size


def _standardise(x_train: np.ndarray, x_test: np.ndarray,
                 enabled: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel standardisation with the training set's mean and std (as float32)."""
  x_train = x_train.astype(np.float32)
  x_test = x_test.astype(np.float32)
  if not enabled:
    return x_train, x_test
  mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
  std = x_train.std(axis=(0, 1, 2), keepdims=True) + 1e-6
  return (x_train - mean) / std, (x_test - mean) / std


# -----------------------------------------------------------------------------
# Images: digits (offline default), MNIST IDX, CIFAR pickles, HF, TFDS
# -----------------------------------------------------------------------------


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> ImageData:
  """scikit-learn's bundled handwritten digits (8x8 grey, 10 classes, 1,797 images).

  The data ship inside scikit-learn, so this works on a fresh offline machine.
  A fixed random ``test_fraction`` of the images is held out for evaluation.
  """
  from sklearn.datasets import load_digits as _sk_load_digits

  d = _sk_load_digits()
  x = d.images.astype(np.float32)[..., None]  # (1797, 8, 8, 1), values 0..16
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(test_fraction * len(x)))
  test, train = perm[:n_test], perm[n_test:]
  x_train, x_test = _standardise(x[train], x[test])
  return ImageData(x_train, y[train], x_test, y[test], 10, "digits")


_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (the MNIST format), gzip-compressed or not.

  The header is two zero bytes, a type code, the number of dimensions ``d``
  and ``d`` big-endian ``uint32`` sizes; the data follow in C order.
  """
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path} is not an IDX file (bad magic number).")
  code, ndim = raw[2], raw[3]
  if code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}.")
  shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  dtype = _IDX_DTYPES[code]
  count = int(np.prod(shape)) if shape else 1
  data = np.frombuffer(raw, dtype=dtype, count=count, offset=4 + 4 * ndim)
  return data.reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stems: list[str]) -> Path:
  for stem in stems:
    for suffix in ("", ".gz"):
      p = directory / (stem + suffix)
      if p.exists():
        return p
  raise FileNotFoundError(f"none of {stems} (optionally .gz) found in {directory}.")


def load_mnist(directory: str | os.PathLike, *, standardise: bool = True) -> ImageData:
  """MNIST (or Fashion-MNIST) from the four standard IDX files in ``directory``.

  Accepts both ``train-images-idx3-ubyte`` and ``train-images.idx3-ubyte``
  spellings, gzip-compressed or not. With ``standardise=False`` the pixels
  keep their 0..255 values (as float32).
  """
  d = Path(directory)
  files = {}
  for split, tag in (("train", "train"), ("test", "t10k")):
    for kind, nd in (("images", 3), ("labels", 1)):
      files[split, kind] = _find(d, [f"{tag}-{kind}-idx{nd}-ubyte", f"{tag}-{kind}.idx{nd}-ubyte"])
  x_train = read_idx(files["train", "images"])[..., None]
  y_train = read_idx(files["train", "labels"]).astype(np.int32)
  x_test = read_idx(files["test", "images"])[..., None]
  y_test = read_idx(files["test", "labels"]).astype(np.int32)
  if len(x_train) != len(y_train) or len(x_test) != len(y_test):
    raise ValueError(f"{d}: image and label counts differ.")
  x_train, x_test = _standardise(x_train, x_test, standardise)
  return ImageData(x_train, y_train, x_test, y_test, 10, "mnist")


def _cifar_members(path: Path) -> dict[str, bytes]:
  """Maps the base names of the pickles under ``path`` (dir or tarball) to their bytes."""
  out = {}
  if path.is_dir():
    for p in sorted(path.rglob("*")):
      if p.is_file() and not p.name.endswith((".html", ".meta")) and "." not in p.name:
        out[p.name] = p.read_bytes()
  else:
    with tarfile.open(path, "r:*") as tar:
      for m in tar.getmembers():
        name = os.path.basename(m.name)
        if m.isfile() and "." not in name:
          out[name] = tar.extractfile(m).read()  # type: ignore[union-attr]
  return out


def _unpickle(blob: bytes) -> dict[str, Any]:
  d = pickle.load(io.BytesIO(blob), encoding="bytes")
  return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def load_cifar(path: str | os.PathLike, *, num_classes: int = 10,
               standardise: bool = True) -> ImageData:
  """CIFAR-10 or CIFAR-100 in the standard "python version" pickle format.

  ``path`` is the extracted directory (``cifar-10-batches-py`` holding
  ``data_batch_1..5`` and ``test_batch``; ``cifar-100-python`` holding
  ``train`` and ``test``) or the downloaded ``.tar.gz`` itself. CIFAR-100 uses
  the 100 fine labels. With ``standardise=False`` the pixels keep their
  0..255 values (as float32).
  """
  if num_classes not in (10, 100):
    raise ValueError(f"`num_classes` must be 10 or 100; got {num_classes!r}.")
  members = _cifar_members(Path(path))
  if num_classes == 10:
    train_names = sorted(n for n in members if n.startswith("data_batch"))
    test_names = ["test_batch"] if "test_batch" in members else []
    label_key = "labels"
  else:
    train_names = ["train"] if "train" in members else []
    test_names = ["test"] if "test" in members else []
    label_key = "fine_labels"
  if not train_names or not test_names:
    raise FileNotFoundError(f"no CIFAR-{num_classes} python batches found under {path}.")

  def read(names):
    xs, ys = [], []
    for n in names:
      d = _unpickle(members[n])
      xs.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
      ys.append(np.asarray(d[label_key], np.int32))
    return np.concatenate(xs), np.concatenate(ys)

  x_train, y_train = read(train_names)
  x_test, y_test = read(test_names)
  x_train, x_test = _standardise(x_train, x_test, standardise)
  return ImageData(x_train, y_train, x_test, y_test, num_classes, f"cifar{num_classes}")


def _hf_image_split(ds) -> tuple[np.ndarray, np.ndarray]:
  feats = ds.features
  img_key = next(k for k in ("img", "image", "pixel_values") if k in feats)
  lab_key = next(k for k in ("label", "fine_label", "labels") if k in feats)
  x = np.stack([np.asarray(im) for im in ds[img_key]])
  if x.ndim == 3:
    x = x[..., None]
  return x, np.asarray(ds[lab_key], np.int32)


def load_hf_images(name: str, config: str | None = None) -> ImageData:
  """An image dataset from the Hugging Face hub (needs ``datasets`` and internet)."""
  try:
    import datasets
  except ImportError as e:
    raise ImportError("`hf:` data need the `datasets` package: pip install datasets") from e
  ds = datasets.load_dataset(name, config)
  x_train, y_train = _hf_image_split(ds["train"])
  x_test, y_test = _hf_image_split(ds["test"])
  x_train, x_test = _standardise(x_train, x_test)
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  return ImageData(x_train, y_train, x_test, y_test, num_classes, f"hf:{name}")


def load_tfds_images(name: str) -> ImageData:
  """An image dataset from TensorFlow Datasets (needs ``tensorflow_datasets``)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
        "`tfds:` data need tensorflow-datasets: pip install tensorflow-datasets"
    ) from e
  train, test = tfds.as_numpy(tfds.load(name, split=["train", "test"], batch_size=-1))
  x_train, x_test = _standardise(train["image"], test["image"])
  y_train = np.asarray(train["label"], np.int32)
  y_test = np.asarray(test["label"], np.int32)
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  return ImageData(x_train, y_train, x_test, y_test, num_classes, f"tfds:{name}")


def load_images(spec: str) -> ImageData:
  """Loads image data from a spec string (see the module docstring)."""
  kind, _, arg = spec.partition(":")
  if kind == "digits":
    return load_digits()
  if kind == "mnist":
    return load_mnist(_need(arg, spec))
  if kind in ("cifar10", "cifar100"):
    return load_cifar(_need(arg, spec), num_classes=int(kind[5:]))
  if kind == "hf":
    name, _, config = _need(arg, spec).partition(":")
    return load_hf_images(name, config or None)
  if kind == "tfds":
    return load_tfds_images(_need(arg, spec))
  raise ValueError(
      f"unknown image data {spec!r}; use digits, mnist:DIR, cifar10:PATH, cifar100:PATH, "
      "hf:NAME[:CONFIG] or tfds:NAME."
  )


def _need(arg: str, spec: str) -> str:
  """The path or name after ``kind:`` (``~`` expanded: the shell leaves ``mnist:~/data``)."""
  if not arg:
    raise ValueError(f"data spec {spec!r} needs a path or name after ':'.")
  return os.path.expanduser(arg)


# -----------------------------------------------------------------------------
# Text: tokenisers
# -----------------------------------------------------------------------------


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocabulary of 256)."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


class CharTokenizer:
  """Characters as tokens; the vocabulary is the training text's characters.

  Characters not in the vocabulary map to id 0, which is reserved for them.
  """

  def __init__(self, text: str):
    self.chars = ["\0"] + sorted(set(text) - {"\0"})
    self.index = {c: i for i, c in enumerate(self.chars)}
    self.vocab_size = len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    get = self.index.get
    return np.fromiter((get(c, 0) for c in text), np.int32, count=len(text))

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)


class HFTokenizer:
  """A Hugging Face tokenizer: a ``tokenizer.json`` file or a hub/local model name."""

  def __init__(self, name: str):
    if os.path.isfile(name):
      try:
        from tokenizers import Tokenizer as _Tok
      except ImportError as e:
        raise ImportError("a tokenizer.json needs the `tokenizers` package") from e
      tok = _Tok.from_file(name)
      self._encode = lambda s: tok.encode(s).ids
      self._decode = tok.decode
      self.vocab_size = tok.get_vocab_size()
    else:
      try:
        from transformers import AutoTokenizer
      except ImportError as e:
        raise ImportError(
            f"--tokenizer {name!r} needs the `transformers` package (or pass a "
            "tokenizer.json file with `tokenizers` installed)."
        ) from e
      tok = AutoTokenizer.from_pretrained(name)
      self._encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
      self._decode = tok.decode
      self.vocab_size = len(tok)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._decode([int(i) for i in ids])


def make_tokenizer(kind: str, train_text: str) -> Tokenizer:
  """``"char"``, ``"byte"`` or a Hugging Face tokenizer name / ``tokenizer.json`` path."""
  if kind == "char":
    return CharTokenizer(train_text)
  if kind == "byte":
    return ByteTokenizer()
  return HFTokenizer(kind)


# -----------------------------------------------------------------------------
# Text: corpora
# -----------------------------------------------------------------------------


def cpython_docs_text() -> str:
  """The Python documentation topics that ship with CPython (``pydoc_data.topics``).

  About 465,000 characters of real English technical prose (the text behind
  ``help("if")``), present on every CPython installation.
  """
  from pydoc_data import topics

  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def read_text_path(path: str | os.PathLike) -> str:
  """A text file, or the concatenation of every UTF-8 text file under a directory.

  Files are read in sorted path order; files that are not valid UTF-8 (binary
  files) and hidden files are skipped.
  """
  p = Path(path)
  if p.is_file():
    return _read_text_file(p)
  if not p.is_dir():
    raise FileNotFoundError(f"no such file or directory: {p}")
  parts = []
  for f in sorted(p.rglob("*")):
    if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts):
      try:
        parts.append(_read_text_file(f))
      except UnicodeDecodeError:
        continue
  if not parts:
    raise FileNotFoundError(f"no UTF-8 text files under {p}")
  return "\n".join(parts)


def _read_text_file(p: Path) -> str:
  raw = p.read_bytes()
  if p.suffix == ".gz":
    raw = gzip.decompress(raw)
  return raw.decode("utf-8")


def split_text(text: str, valid_fraction: float = 0.1) -> tuple[str, str]:
  """Holds out the last ``valid_fraction`` of the characters for validation."""
  cut = int(len(text) * (1.0 - valid_fraction))
  return text[:cut], text[cut:]


def wikitext_splits(directory: str | os.PathLike) -> tuple[str, str, str]:
  """``(train, valid, description)`` texts of a WikiText directory.

  Recognises ``wiki.{train,valid,test}.tokens`` (the official archives, also
  ``.raw``) and ``{train,valid,test}.txt``. Evaluation uses ``valid`` when a
  training split exists. If the training split is missing, ``valid`` is used
  to train and ``test`` to evaluate, and the description says so.
  """
  d = Path(directory)

  def find(split):
    for name in (f"wiki.{split}.tokens", f"wiki.{split}.raw", f"{split}.txt"):
      if (d / name).exists():
        return d / name
    return None

  train, valid, test = find("train"), find("valid"), find("test")
  if train is not None and (valid or test) is not None:
    return _read_text_file(train), _read_text_file(valid or test), "train/valid"
  if valid is not None and test is not None:
    return _read_text_file(valid), _read_text_file(test), "trained on valid, evaluated on test"
  raise FileNotFoundError(f"{d} holds no WikiText splits (wiki.train.tokens, train.txt, ...).")


def load_hf_text(name: str, config: str | None = None) -> tuple[str, str]:
  """Train and validation text of a Hugging Face dataset with a ``text`` column."""
  try:
    import datasets
  except ImportError as e:
    raise ImportError("`hf:` data need the `datasets` package: pip install datasets") from e
  ds = datasets.load_dataset(name, config)
  valid_split = "validation" if "validation" in ds else "test"
  return "\n".join(ds["train"]["text"]), "\n".join(ds[valid_split]["text"])


def load_text(spec: str, *, tokenizer: str = "char", max_chars: int | None = None) -> TextData:
  """Loads and tokenises a corpus from a spec string (see the module docstring).

  Args:
    spec: ``cpython-docs``, ``text:PATH``, ``wikitext:DIR`` or ``hf:NAME[:CONFIG]``.
    tokenizer: ``"char"``, ``"byte"`` or a Hugging Face tokenizer.
    max_chars: if given, keep only this many characters of the training text
      (and a tenth of that of the validation text): handy for quick runs.
  """
  kind, _, arg = spec.partition(":")
  label = spec  # what the run prints
  if kind == "cpython-docs":
    train, valid = split_text(cpython_docs_text())
  elif kind == "text":
    train, valid = split_text(read_text_path(_need(arg, spec)))
  elif kind == "wikitext":
    train, valid, splits = wikitext_splits(_need(arg, spec))
    label = spec if splits == "train/valid" else f"{spec} ({splits})"
  elif kind == "hf":
    name, _, config = _need(arg, spec).partition(":")
    train, valid = load_hf_text(name, config or None)
  else:
    raise ValueError(
        f"unknown text data {spec!r}; use cpython-docs, text:PATH, wikitext:DIR or hf:NAME."
    )
  if max_chars is not None:
    train, valid = train[:max_chars], valid[: max(max_chars // 10, 1)]
  tok = make_tokenizer(tokenizer, train)
  return TextData(tok.encode(train), tok.encode(valid), tok, label)


# -----------------------------------------------------------------------------
# Batching (deterministic functions of the step)
# -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def cached_images(spec: str) -> ImageData:
  """:func:`load_images`, remembered: the runs of a process share the arrays (read-only)."""
  return load_images(spec)


@functools.lru_cache(maxsize=4)
def cached_text(spec: str, tokenizer: str = "char", max_chars: int | None = None) -> TextData:
  """:func:`load_text`, remembered: the runs of a process share the arrays (read-only)."""
  return load_text(spec, tokenizer=tokenizer, max_chars=max_chars)


def _rng(*seeds: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(s) for s in seeds]))


class ImageBatcher:
  """Shuffled epochs of an image dataset; the batch of step ``t`` is a pure function of t.

  Each epoch is a fresh permutation drawn from ``(seed, epoch)``; the last
  incomplete batch of an epoch is dropped. With ``augment`` every image is
  randomly shifted by up to ``pad`` pixels (zero padding, then a random crop)
  and flipped horizontally with probability 1/2, the standard CIFAR recipe.
  """

  def __init__(self, x, y, batch_size: int, *, seed: int = 0, augment: bool = False,
               pad: int = 4):
    if batch_size > len(x):
      raise ValueError(f"batch size {batch_size} exceeds the {len(x)} training examples.")
    self.x, self.y = x, y
    self.batch_size, self.seed, self.augment, self.pad = batch_size, seed, augment, pad
    self.steps_per_epoch = len(x) // batch_size
    self._perm_epoch, self._perm = -1, np.arange(0)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(int(step), self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = _rng(self.seed, epoch).permutation(len(self.x))
      self._perm_epoch = epoch
    idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
    x = self.x[idx]
    if self.augment:
      x = augment_images(x, _rng(self.seed, 1_000_003, step), self.pad)
    return {"x": x, "y": self.y[idx]}


def augment_images(x: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
  """Random ``pad``-pixel shifts (zero padding + crop) and horizontal flips."""
  n, h, w = (int(d) for d in x.shape[:3])
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  flip = rng.random(n) < 0.5
  out = np.empty_like(x)
  for j in range(n):
    img = padded[j, dy[j]:dy[j] + h, dx[j]:dx[j] + w]
    out[j] = img[:, ::-1] if flip[j] else img
  return out


class TextBatcher:
  """Random windows of ``seq_len + 1`` tokens; inputs are tokens, targets the next tokens.

  The start positions of step ``t`` are drawn from ``(seed, t)``.
  """

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0):
    if len(tokens) < seq_len + 2:
      raise ValueError(f"text of {len(tokens)} tokens is too short for seq_len {seq_len}.")
    self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
    self.steps_per_epoch = max(1, (len(tokens) - 1) // (batch_size * seq_len))

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    starts = _rng(self.seed, step).integers(0, len(self.tokens) - self.seq_len - 1,
                                            self.batch_size)
    win = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
    return {"x": win[:, :-1], "y": win[:, 1:]}


def image_eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int,
                       max_examples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The held-out set in order, the last batch zero-padded; ``w`` marks real examples."""
  n = len(x) if max_examples is None else min(len(x), max_examples)
  for i in range(0, n, batch_size):
    xb, yb = x[i:min(i + batch_size, n)], y[i:min(i + batch_size, n)]
    k = len(xb)
    w = np.zeros(batch_size, np.float32)
    w[:k] = 1.0
    if k < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - k, *xb.shape[1:]), xb.dtype)])
      yb = np.concatenate([yb, np.zeros(batch_size - k, yb.dtype)])
    yield {"x": xb, "y": yb, "w": w}


def text_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                      max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Consecutive non-overlapping windows of the validation tokens (padded last batch)."""
  n_win = (len(tokens) - 1) // seq_len
  if n_win < 1:
    raise ValueError(f"validation text of {len(tokens)} tokens is shorter than seq_len.")
  n_batches = -(-n_win // batch_size)
  if max_batches is not None:
    n_batches = min(n_batches, max_batches)
  for b in range(n_batches):
    idx = range(b * batch_size, min((b + 1) * batch_size, n_win))
    win = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in idx])
    k = len(win)
    w = np.zeros((batch_size, seq_len), np.float32)
    w[:k] = 1.0
    if k < batch_size:
      win = np.concatenate([win, np.zeros((batch_size - k, seq_len + 1), win.dtype)])
    yield {"x": win[:, :-1], "y": win[:, 1:], "w": w}
