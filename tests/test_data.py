"""Tests of the examples' data loaders, tokenisers and batchers on files the tests write."""

import gzip
import os
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")

from examples.common import data  # noqa: E402


def real_data(name: str) -> Path | None:
  """``$IRE_OPTAX_DATA/name`` (the benchmarks' data directory) if it exists, else None."""
  root = os.environ.get("IRE_OPTAX_DATA")
  path = Path(root, name) if root else None
  return path if path is not None and path.exists() else None


# -----------------------------------------------------------------------------
# IDX / MNIST
# -----------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, code: int = 0x08, compress: bool = False):
  dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
  raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
  raw += np.asarray(arr, dtype).tobytes()
  if compress:
    path = path.with_name(path.name + ".gz")
    raw = gzip.compress(raw)
  path.write_bytes(raw)
  return path


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("code", [0x08, 0x0C, 0x0D])
def test_read_idx_roundtrip(tmp_path, compress, code):
  rng = np.random.default_rng(0)
  arr = rng.integers(0, 200, (3, 4, 5))
  if code == 0x0D:
    arr = rng.normal(size=(3, 4, 5)).astype(np.float32)
  p = write_idx(tmp_path / "a-idx3-ubyte", arr, code, compress)
  out = data.read_idx(p)
  assert out.shape == (3, 4, 5)
  np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_bad_magic(tmp_path):
  p = tmp_path / "bad"
  p.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(p)


def make_mnist(directory: Path, n_train=12, n_test=5, dotted=False, compress=(True, False)):
  rng = np.random.default_rng(1)
  arrays = {
      ("train", "images"): rng.integers(0, 256, (n_train, 28, 28)),
      ("train", "labels"): rng.integers(0, 10, n_train),
      ("t10k", "images"): rng.integers(0, 256, (n_test, 28, 28)),
      ("t10k", "labels"): rng.integers(0, 10, n_test),
  }
  for i, ((tag, kind), arr) in enumerate(arrays.items()):
    nd = 3 if kind == "images" else 1
    name = f"{tag}-{kind}.idx{nd}-ubyte" if dotted else f"{tag}-{kind}-idx{nd}-ubyte"
    write_idx(directory / name, arr, compress=compress[i % 2])
  return arrays


@pytest.mark.parametrize("dotted", [False, True])
def test_load_mnist(tmp_path, dotted):
  arrays = make_mnist(tmp_path, dotted=dotted)
  d = data.load_mnist(tmp_path, standardise=False)
  assert d.x_train.shape == (12, 28, 28, 1) and d.x_test.shape == (5, 28, 28, 1)
  assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
  np.testing.assert_array_equal(d.x_train[..., 0], arrays["train", "images"])
  np.testing.assert_array_equal(d.y_test, arrays["t10k", "labels"])
  assert d.num_classes == 10
  s = data.load_images(f"mnist:{tmp_path}")  # standardised with the training statistics
  assert abs(float(s.x_train.mean())) < 1e-4 and abs(float(s.x_train.std()) - 1) < 1e-3
  np.testing.assert_array_equal(s.y_train, arrays["train", "labels"])


def test_load_mnist_missing_file(tmp_path):
  make_mnist(tmp_path)
  next(tmp_path.glob("t10k-labels*")).unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels"):
    data.load_mnist(tmp_path)


@pytest.mark.skipif(real_data("mnist") is None, reason="$IRE_OPTAX_DATA/mnist not present")
def test_load_real_mnist_files():
  d = data.load_mnist(real_data("mnist"), standardise=False)
  # Any MNIST: the official 10,000 test images; the training set may be a subset.
  assert d.x_train.shape[1:] == (28, 28, 1) and d.x_test.shape == (10000, 28, 28, 1)
  assert d.x_train.max() == 255 and set(np.unique(d.y_test)) == set(range(10))


# -----------------------------------------------------------------------------
# CIFAR
# -----------------------------------------------------------------------------


def cifar_image(label: int) -> np.ndarray:
  """A 32x32 RGB image whose channels are distinguishable: R=label, G=100+row, B=200."""
  img = np.zeros((32, 32, 3), np.uint8)
  img[..., 0] = label
  img[..., 1] = 100 + np.arange(32)[:, None]
  img[..., 2] = 200
  return img


def cifar_blob(labels, key: bytes, bytes_keys=True) -> bytes:
  rows = np.stack([cifar_image(y).transpose(2, 0, 1).reshape(-1) for y in labels])
  d = {b"data": rows, key: list(labels), b"batch_label": b"x"}
  if not bytes_keys:
    d = {k.decode(): v for k, v in d.items()}
  return pickle.dumps(d, protocol=2)


def make_cifar10(directory: Path, bytes_keys=True):
  directory.mkdir(parents=True, exist_ok=True)
  labels = {"data_batch_1": [0, 1, 2], "data_batch_2": [3, 4, 9], "test_batch": [5, 6]}
  for name, ys in labels.items():
    (directory / name).write_bytes(cifar_blob(ys, b"labels", bytes_keys))
  (directory / "batches.meta").write_bytes(pickle.dumps({"label_names": []}))
  (directory / "readme.html").write_text("<html/>")
  return labels


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_load_cifar10_dir(tmp_path, bytes_keys):
  make_cifar10(tmp_path / "cifar-10-batches-py", bytes_keys)
  d = data.load_cifar(tmp_path / "cifar-10-batches-py", standardise=False)
  assert d.x_train.shape == (6, 32, 32, 3) and d.x_test.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(d.y_train, [0, 1, 2, 3, 4, 9])
  np.testing.assert_array_equal(d.y_test, [5, 6])
  for x, y in zip(d.x_train, d.y_train, strict=True):  # channel order and layout are right
    np.testing.assert_array_equal(x, cifar_image(int(y)))
  assert d.num_classes == 10


def test_load_cifar10_tarball(tmp_path):
  src = tmp_path / "src" / "cifar-10-batches-py"
  make_cifar10(src)
  tgz = tmp_path / "cifar-10-python.tar.gz"
  with tarfile.open(tgz, "w:gz") as tar:
    tar.add(src, arcname="cifar-10-batches-py")
  d = data.load_images(f"cifar10:{tgz}")
  assert d.x_train.shape == (6, 32, 32, 3)
  np.testing.assert_allclose(d.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)


def test_load_cifar100(tmp_path):
  root = tmp_path / "cifar-100-python"
  root.mkdir()
  (root / "train").write_bytes(cifar_blob([0, 55, 99], b"fine_labels"))
  (root / "test").write_bytes(cifar_blob([42], b"fine_labels"))
  (root / "meta").write_bytes(pickle.dumps({"fine_label_names": []}))
  d = data.load_cifar(root, num_classes=100, standardise=False)
  np.testing.assert_array_equal(d.y_train, [0, 55, 99])
  np.testing.assert_array_equal(d.x_test[0], cifar_image(42))
  assert d.num_classes == 100 and d.name == "cifar100"


def test_load_cifar_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    data.load_cifar(tmp_path)
  with pytest.raises(ValueError, match="num_classes"):
    data.load_cifar(tmp_path, num_classes=20)


# -----------------------------------------------------------------------------
# Digits, specs, optional online loaders
# -----------------------------------------------------------------------------


def test_digits_offline_default():
  d = data.load_images("digits")
  assert d.x_train.shape == (1438, 8, 8, 1) and d.x_test.shape == (359, 8, 8, 1)
  assert set(np.unique(d.y_train)) == set(range(10)) and d.num_classes == 10
  assert abs(float(d.x_train.mean())) < 1e-4
  d2 = data.load_digits()  # the held-out split is fixed
  np.testing.assert_array_equal(d.y_test, d2.y_test)


def test_bad_specs():
  with pytest.raises(ValueError, match="unknown image data"):
    data.load_images("imagenet")
  with pytest.raises(ValueError, match="needs a path"):
    data.load_images("mnist")
  with pytest.raises(ValueError, match="unknown text data"):
    data.load_text("books")


def test_online_loaders_explain_missing_packages(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="pip install datasets"):
    data.load_images("hf:cifar10")
  with pytest.raises(ImportError, match="pip install datasets"):
    data.load_text("hf:wikitext:wikitext-2-raw-v1")
  with pytest.raises(ImportError, match="tensorflow-datasets"):
    data.load_images("tfds:cifar10")


def test_hf_loaders_with_fake_module(monkeypatch):
  """The Hugging Face code paths, driven by a stand-in for ``datasets``."""

  class Split(dict):
    def __init__(self, cols):
      super().__init__(cols)
      self.features = cols

  class FakeDatasets:
    @staticmethod
    def load_dataset(name, config=None):
      if name == "wikitext":
        return {"train": Split({"text": ["hello world", "again"]}),
                "validation": Split({"text": ["held out"]})}
      imgs = [np.full((4, 4, 3), i, np.uint8) for i in range(4)]
      return {"train": Split({"img": imgs[:3], "label": [0, 1, 2]}),
              "test": Split({"img": imgs[3:], "label": [1]})}

  monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
  d = data.load_images("hf:cifar10")
  assert d.x_train.shape == (3, 4, 4, 3) and d.num_classes == 3
  t = data.load_text("hf:wikitext:wikitext-2-raw-v1", tokenizer="byte")
  assert t.tokenizer.decode(t.train) == "hello world\nagain"
  assert t.tokenizer.decode(t.valid) == "held out"
  assert t.name == "hf:wikitext:wikitext-2-raw-v1"  # the spec, not the branch's dataset name


def test_tfds_loader_with_fake_module(monkeypatch):
  class FakeTFDS:
    @staticmethod
    def load(name, split, batch_size):
      assert split == ["train", "test"] and batch_size == -1
      img = lambda n: np.arange(n * 2 * 2 * 3, dtype=np.uint8).reshape(n, 2, 2, 3)
      return [{"image": img(3), "label": np.array([0, 1, 4])},
              {"image": img(2), "label": np.array([2, 3])}]

    as_numpy = staticmethod(lambda x: x)

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", FakeTFDS)
  d = data.load_images("tfds:cifar10")
  assert d.x_train.shape == (3, 2, 2, 3) and d.x_test.shape == (2, 2, 2, 3)
  np.testing.assert_array_equal(d.y_test, [2, 3])
  assert d.num_classes == 5 and d.name == "tfds:cifar10"


# -----------------------------------------------------------------------------
# Text
# -----------------------------------------------------------------------------


def test_tokenizers_roundtrip():
  text = "héllo, wörld\n"
  b = data.ByteTokenizer()
  ids = b.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text.encode()) and b.vocab_size == 256
  assert b.decode(ids) == text
  c = data.CharTokenizer(text)
  assert c.vocab_size == len(set(text)) + 1
  assert c.decode(c.encode(text)) == text
  np.testing.assert_array_equal(c.encode("zz"), [0, 0])  # unknown characters map to 0


def test_hf_tokenizer_explains_missing_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "transformers", None)
  with pytest.raises(ImportError, match="transformers"):
    data.make_tokenizer("gpt2", "")


def test_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers

  tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  t = data.make_tokenizer(str(tmp_path / "tokenizer.json"), "")
  np.testing.assert_array_equal(t.encode("a b c"), [0, 1, 2])
  assert t.vocab_size == 3


def test_read_text_path_dir(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "a.txt").write_text("first")
  (tmp_path / "b" / "c.md").write_text("second")
  (tmp_path / "b" / "d.txt.gz").write_bytes(gzip.compress(b"third"))
  (tmp_path / "binary.bin").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80]))
  (tmp_path / ".hidden").write_text("secret")
  assert data.read_text_path(tmp_path) == "first\nsecond\nthird"
  assert data.read_text_path(tmp_path / "a.txt") == "first"
  with pytest.raises(FileNotFoundError):
    data.read_text_path(tmp_path / "nope")


def test_load_text_file_char_and_byte(tmp_path):
  text = "".join(f"line {i}: the quick brown fox\n" for i in range(50))
  (tmp_path / "corpus.txt").write_text(text)
  t = data.load_text(f"text:{tmp_path / 'corpus.txt'}")
  train, valid = data.split_text(text)
  assert len(t.train) == len(train) and len(t.valid) == len(valid)
  assert t.tokenizer.decode(t.train) == train and t.tokenizer.decode(t.valid) == valid
  assert len(valid) == pytest.approx(0.1 * len(text), abs=1)
  b = data.load_text(f"text:{tmp_path}", tokenizer="byte", max_chars=100)
  assert len(b.train) == 100 and len(b.valid) == 10 and b.vocab_size == 256


def test_wikitext_layouts(tmp_path):
  official = tmp_path / "wikitext-2"
  official.mkdir()
  for split in ("train", "valid", "test"):
    (official / f"wiki.{split}.tokens").write_text(f" = {split} = \n words of {split} \n")
  tr, va, desc = data.wikitext_splits(official)
  assert "train" in tr and "valid" in va and desc == "train/valid"
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / "valid.txt").write_text("valid text")
  (partial / "test.txt").write_text("test text")
  tr, va, desc = data.wikitext_splits(partial)
  assert (tr, va) == ("valid text", "test text") and "evaluated on test" in desc
  t = data.load_text(f"wikitext:{official}", tokenizer="byte")
  assert t.tokenizer.decode(t.valid).startswith(" = valid")
  assert t.name == f"wikitext:{official}"
  # Trained on valid and evaluated on test: the data's name, which the run prints, says so.
  t = data.load_text(f"wikitext:{partial}", tokenizer="byte")
  assert t.name == f"wikitext:{partial} (trained on valid, evaluated on test)"
  with pytest.raises(FileNotFoundError):
    data.wikitext_splits(tmp_path)


def test_a_data_path_may_start_with_a_tilde(tmp_path, monkeypatch):
  """The shell leaves `~` after `wikitext:` (or `mnist:`) as it is: the loaders expand it."""
  (tmp_path / "wt").mkdir()
  for split in ("train", "valid"):
    (tmp_path / "wt" / f"{split}.txt").write_text(f"{split} text")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert data.load_text("wikitext:~/wt", tokenizer="byte").tokenizer.decode(
      data.load_text("wikitext:~/wt", tokenizer="byte").train) == "train text"
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
    data.load_images("mnist:~/none")


@pytest.mark.skipif(real_data("wikitext-2") is None,
                    reason="$IRE_OPTAX_DATA/wikitext-2 not present")
def test_real_wikitext_files():
  t = data.load_text(f"wikitext:{real_data('wikitext-2')}", max_chars=50_000)
  assert len(t.train) == 50_000 and t.vocab_size > 50


def test_cpython_docs_offline_default():
  text = data.cpython_docs_text()
  assert len(text) > 100_000 and "for" in text and "while" in text
  t = data.load_text("cpython-docs")
  assert len(t.train) > 9 * len(t.valid) * 0.9 and t.vocab_size > 60
  assert t.tokenizer.decode(t.train[:200]) == text[:200]


# -----------------------------------------------------------------------------
# Batchers
# -----------------------------------------------------------------------------


def test_image_batcher_epochs_and_determinism():
  x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
  y = np.arange(10, dtype=np.int32)
  b = data.ImageBatcher(x, y, 3, seed=7)
  assert b.steps_per_epoch == 3
  epoch0 = np.concatenate([b.batch_at(s)["y"] for s in range(3)])
  assert len(set(epoch0.tolist())) == 9  # no repeats within an epoch (one dropped)
  epoch1 = np.concatenate([b.batch_at(s)["y"] for s in range(3, 6)])
  assert not np.array_equal(epoch0, epoch1)  # reshuffled
  b2 = data.ImageBatcher(x, y, 3, seed=7)  # a pure function of (seed, step), in any order
  np.testing.assert_array_equal(b2.batch_at(4)["y"], b.batch_at(4)["y"])
  np.testing.assert_array_equal(b2.batch_at(1)["y"], epoch0[3:6])
  for s in range(6):
    bb = b.batch_at(s)
    np.testing.assert_array_equal(bb["x"][:, 0, 0, 0], bb["y"])
  assert not np.array_equal(data.ImageBatcher(x, y, 3, seed=8).batch_at(0)["y"], epoch0[:3])
  with pytest.raises(ValueError, match="batch size"):
    data.ImageBatcher(x, y, 11)


def test_augmentation_shifts_and_flips():
  x = np.random.default_rng(0).normal(size=(64, 6, 6, 2)).astype(np.float32)
  out = data.augment_images(x, np.random.default_rng(1), pad=2)
  assert out.shape == x.shape
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  kinds = set()
  for j in range(64):  # every output is a crop of the padded input, maybe mirrored
    matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
               if np.array_equal(out[j], padded[j, dy:dy + 6, dx:dx + 6][:, ::-1] if f
                                 else padded[j, dy:dy + 6, dx:dx + 6])]
    assert matches, j
    kinds.add(matches[0])
  assert len(kinds) > 20  # shifts and flips vary across images


def test_text_batcher():
  tokens = np.arange(1000, dtype=np.int32)
  b = data.TextBatcher(tokens, 4, 16, seed=3)
  bb = b.batch_at(5)
  assert bb["x"].shape == (4, 16) and bb["y"].shape == (4, 16)
  np.testing.assert_array_equal(bb["y"], bb["x"] + 1)  # targets are the next tokens
  np.testing.assert_array_equal(data.TextBatcher(tokens, 4, 16, seed=3).batch_at(5)["x"],
                                bb["x"])
  assert not np.array_equal(b.batch_at(6)["x"], bb["x"])
  assert bb["y"].max() < 1000
  with pytest.raises(ValueError, match="too short"):
    data.TextBatcher(tokens[:10], 2, 16)


def test_eval_batches_cover_everything_once():
  x = np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1)
  y = np.arange(7, dtype=np.int32)
  batches = list(data.image_eval_batches(x, y, 3))
  assert [b["w"].sum() for b in batches] == [3, 3, 1]
  seen = np.concatenate([b["y"][b["w"] > 0] for b in batches])
  np.testing.assert_array_equal(seen, y)
  assert len(list(data.image_eval_batches(x, y, 3, max_examples=4))) == 2
  tokens = np.arange(101, dtype=np.int32)
  tb = list(data.text_eval_batches(tokens, 3, 10))
  assert sum(b["w"].sum() for b in tb) == 100  # 10 windows of 10 targets
  np.testing.assert_array_equal(tb[0]["x"][1], np.arange(10, 20))
  np.testing.assert_array_equal(tb[0]["y"][1], np.arange(11, 21))
  assert len(list(data.text_eval_batches(tokens, 3, 10, max_batches=2))) == 2
