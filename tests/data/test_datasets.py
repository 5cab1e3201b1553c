"""In-memory datasets: digits, omniglot.npz, generic npz; sources and splits."""

from __future__ import annotations

import numpy as np
import pytest

from metric_jax import data
from metric_jax.data import datasets as datasets_lib
from metric_jax.data.sources import ArraySource, class_split, relabel

OMNIGLOT = datasets_lib.default_omniglot_path()
needs_omniglot = pytest.mark.skipif(not OMNIGLOT.is_file(),
                                    reason=f"omniglot.npz not found at {OMNIGLOT}")


def _check_contiguous(source):
  labels = source.labels
  assert labels.dtype == np.int32 and labels.ndim == 1 and len(source) == labels.shape[0]
  assert set(np.unique(labels).tolist()) == set(range(source.num_classes))


# ----------------------------------------------------------------- registry


def test_dataset_names():
  assert {"digits", "omniglot_npz", "npz", "caltech_birds2011", "cars196",
          "stanford_online_products", "omniglot", "stanford_dogs", "oxford_flowers102",
          "oxford_iiit_pet"} == set(data.DATASET_NAMES)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"`name`.*'digits'.*'cars196'.*'mnist'"):
    data.load("mnist")


# ----------------------------------------------------------------- digits


def test_digits_split():
  from sklearn.datasets import load_digits
  ref = load_digits()
  splits = data.load("digits")
  assert isinstance(splits, data.DataSplits)
  assert splits.image_shape == (8, 8, 1) and splits.num_classes_train == 5
  assert (len(splits.train), len(splits.test)) == (901, 896)
  assert splits.num_classes_test == 5
  for src, digits in ((splits.train, [0, 1, 2, 3, 4]), (splits.test, [5, 6, 7, 8, 9])):
    _check_contiguous(src)
    assert src.class_ids.tolist() == digits
    # Every image and label is the sklearn one, rescaled to 0..255.
    parent = src.parent_indices
    np.testing.assert_array_equal(src.class_ids[src.labels], ref.target[parent])
    idx = np.arange(0, len(src), 37)
    got = src.images(idx)
    assert got.dtype == np.uint8 and got.shape == (len(idx), 8, 8, 1)
    expected = np.round(ref.images[parent[idx]] * 255 / 16).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(got, expected)
  assert not set(splits.train.parent_indices) & set(splits.test.parent_indices)
  assert splits.train.images(np.arange(len(splits.train))).max() == 255


def test_digits_train_classes_option():
  splits = data.load("digits", train_classes=(1, 3, 5, 7, 9))
  assert splits.train.class_ids.tolist() == [1, 3, 5, 7, 9]
  assert splits.test.class_ids.tolist() == [0, 2, 4, 6, 8]
  with pytest.raises(ValueError, match="train_classes"):
    data.load("digits", train_classes=(3, 11))


# ----------------------------------------------------------------- omniglot.npz


@pytest.fixture(scope="module")
def omniglot():
  return data.load("omniglot_npz")


@needs_omniglot
def test_omniglot_npz_split(omniglot):
  assert (len(omniglot.train), len(omniglot.test)) == (19_280, 13_180)
  assert (omniglot.train.num_classes, omniglot.test.num_classes) == (964, 659)
  assert omniglot.num_classes_train == 964 and omniglot.image_shape == (28, 28, 1)
  _check_contiguous(omniglot.train)
  _check_contiguous(omniglot.test)
  # Background classes are 0..963 of the file, evaluation classes 964..1622.
  np.testing.assert_array_equal(omniglot.train.class_ids, np.arange(964))
  np.testing.assert_array_equal(omniglot.test.class_ids, np.arange(964, 1623))
  assert np.all(np.bincount(omniglot.train.labels) == 20)
  with np.load(OMNIGLOT) as d:
    is_bg = d["is_background"]
    np.testing.assert_array_equal(np.flatnonzero(is_bg), omniglot.train.parent_indices)
    idx = np.array([0, 19, 20, 4321, 13_179])
    np.testing.assert_array_equal(omniglot.test.images(idx)[..., 0],
                                  d["images"][~is_bg][idx])


@needs_omniglot
def test_omniglot_npz_resized_from_full_resolution(omniglot):
  # The packed 105x105 originals, resized to 28x28 on read, reproduce the
  # stored 28x28 images exactly (the same recipe: PIL BOX).
  with np.load(OMNIGLOT) as d:
    idx = np.arange(0, 32_460, 1_201)
    packed = datasets_lib._PackedBitsSource(d["images105_packbits"][idx], d["labels"][idx],
                                            105, (28, 28))
    np.testing.assert_array_equal(packed.images(np.arange(len(idx)))[..., 0], d["images"][idx])
  big = data.load("omniglot_npz", image_size=(56, 40))
  assert big.image_shape == (56, 40, 1) and len(big.train) == 19_280
  img = big.train.images(np.array([0, 5]))
  assert img.shape == (2, 56, 40, 1) and img.dtype == np.uint8 and img.max() > 0


def test_omniglot_npz_missing_file(tmp_path, monkeypatch):
  monkeypatch.setenv("METRIC_JAX_OMNIGLOT", str(tmp_path / "nope.npz"))
  with pytest.raises(FileNotFoundError, match="METRIC_JAX_OMNIGLOT"):
    data.load("omniglot_npz")


# ----------------------------------------------------------------- npz


def _write_npz(path, n=24, **extra):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 6, 5), dtype=np.uint8)
  labels = np.array([10, 20, 30, 40, 50, 60] * (n // 6))
  np.savez(path, images=images, labels=labels, **extra)
  return images, labels


def test_npz_split_array(tmp_path):
  path = tmp_path / "d.npz"
  split = np.arange(24) % 3 != 0
  images, labels = _write_npz(path, split=split)
  splits = data.load("npz", path=str(path), split_key="split")
  assert (len(splits.train), len(splits.test)) == (16, 8)
  assert splits.image_shape == (6, 5, 1)
  np.testing.assert_array_equal(splits.train.parent_indices, np.flatnonzero(split))
  np.testing.assert_array_equal(splits.test.images(np.arange(8))[..., 0], images[~split])
  np.testing.assert_array_equal(splits.train.class_ids[splits.train.labels], labels[split])
  _check_contiguous(splits.train)


def test_npz_class_split(tmp_path):
  path = tmp_path / "d.npz"
  images, labels = _write_npz(path)
  halves = data.load("npz", path=path)
  assert halves.train.class_ids.tolist() == [10, 20, 30]
  assert halves.test.class_ids.tolist() == [40, 50, 60]
  assert (len(halves.train), len(halves.test)) == (12, 12)
  third = data.load("npz", path=path, train_class_fraction=1 / 3)
  assert third.train.class_ids.tolist() == [10, 20]
  chosen = data.load("npz", path=path, train_classes=[20, 60])
  assert chosen.train.class_ids.tolist() == [20, 60]
  assert chosen.test.class_ids.tolist() == [10, 30, 40, 50]
  np.testing.assert_array_equal(chosen.train.images(np.arange(8))[..., 0],
                                images[np.isin(labels, [20, 60])])


def test_npz_errors(tmp_path):
  path = tmp_path / "d.npz"
  _write_npz(path, split=np.zeros(5, bool))
  with pytest.raises(FileNotFoundError, match="path"):
    data.load("npz", path=tmp_path / "missing.npz")
  with pytest.raises(ValueError, match="'pixels'"):
    data.load("npz", path=path, image_key="pixels")
  with pytest.raises(ValueError, match=r"`split`.*shape \[24\]"):
    data.load("npz", path=path, split_key="split")
  with pytest.raises(ValueError, match="train_class_fraction"):
    data.load("npz", path=path, train_class_fraction=1.5)
  with pytest.raises(ValueError, match="train_classes"):
    data.load("npz", path=path, train_classes=[99])
  with pytest.raises(ValueError, match="image_size"):
    data.load("npz", path=path, image_size=12)
  float_path = tmp_path / "f.npz"
  np.savez(float_path, images=np.zeros((4, 3, 3), np.float32), labels=np.arange(4))
  with pytest.raises(TypeError, match=r"`images`.*uint8"):
    data.load("npz", path=float_path)


# ----------------------------------------------------------------- sources


def test_relabel_and_class_ids():
  new, ids = relabel(np.array([7, 3, 7, 9, 3]))
  assert new.tolist() == [1, 0, 1, 2, 0] and new.dtype == np.int32
  assert ids.tolist() == [3, 7, 9]


def test_subset_composes_class_ids():
  src = ArraySource(np.arange(8, dtype=np.uint8).reshape(8, 1, 1),
                    np.array([5, 9, 7, 5, 11, 9, 7, 11]))
  train, test = class_split(src, [5, 11])
  assert train.class_ids.tolist() == [5, 11] and test.class_ids.tolist() == [7, 9]
  # A subset of a relabelled subset still names the dataset's classes.
  sub = test.subset(np.array([1, 3]))  # examples 2 and 6 of src: labels 7, 7
  assert sub.labels.tolist() == [0, 0] and sub.class_ids.tolist() == [7]
  np.testing.assert_array_equal(sub.images(np.array([0, 1]))[:, 0, 0, 0], [2, 6])
  raw = test.subset(np.array([0, 1]), relabel_classes=False)
  assert raw.labels.tolist() == [1, 0] and raw.class_ids.tolist() == [7, 9]


def test_source_index_validation():
  src = ArraySource(np.zeros((5, 2, 2, 3), np.uint8), np.arange(5))
  assert src.images(np.array([], np.int64)).shape == (0, 2, 2, 3)
  with pytest.raises(ValueError, match=r"`indices`.*\[0, 5\)"):
    src.images(np.array([0, 5]))
  with pytest.raises(ValueError, match=r"`indices`.*\[0, 5\)"):
    src.images(np.array([-1]))
  with pytest.raises(ValueError, match="`indices`.*1-D"):
    src.images(np.zeros((2, 2), np.int64))
  with pytest.raises(TypeError, match="`indices`.*integer"):
    src.images(np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="`labels`"):
    ArraySource(np.zeros((5, 2, 2), np.uint8), np.arange(4))
  with pytest.raises(ValueError, match="train_classes"):
    class_split(src, [0, 1, 2, 3, 4])
