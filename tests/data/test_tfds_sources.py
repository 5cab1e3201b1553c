"""TFDS loaders, on tiny real datasets prepared in a temporary data_dir.

Why not ``tfds.testing.mock_data``: it can drive ``tfds.data_source``
without TensorFlow only while no decoder is given. The loaders read all
labels first with every image feature left undecoded
(``tfds.decode.SkipDecoding``; otherwise every image of e.g. SOP would be
decoded just to read its label), and under the mock any decoder switches to
an example *encoder* that needs TensorFlow. So each test dataset here is
really prepared, in the ArrayRecord format, by a subclass of the real TFDS
builder (same name, version and features) whose only change is that it
generates a few known examples instead of downloading. The loaders then run
their real path: builder metadata, ``as_data_source``, SkipDecoding, PIL
decoding and resizing.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # noqa: E402
from tensorflow_datasets.core import registered  # noqa: E402

from metric_jax import data  # noqa: E402
from metric_jax.data import tfds_sources  # noqa: E402


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
  return buf.getvalue()


def example_image(split_index: int, i: int, label: int, channels: int, shape=None):
  """A constant image whose colour identifies (split, position, label)."""
  h, w = shape if shape else (7 + i % 5, 9 + i % 3)
  colour = np.array([10 + 3 * i, 50 * split_index + 20, label % 256], np.uint8)
  if channels == 1:
    colour = colour[:1]
  return np.broadcast_to(colour, (h, w, channels)).copy()


def _fake(feature, label_key, key, label, image):
  F = tfds.features
  if isinstance(feature, F.FeaturesDict):
    return {k: _fake(f, label_key, k, label, image) for k, f in feature.items()}
  if isinstance(feature, F.Image):
    if key == "image":
      return _png(image)
    c = feature.shape[-1] or 3
    return _png(np.zeros((image.shape[0], image.shape[1], c), np.uint8))
  if isinstance(feature, F.ClassLabel):
    return int(label) if key == label_key else 0
  if isinstance(feature, F.Text):
    return "x"
  if isinstance(feature, F.BBoxFeature):
    return F.BBox(0.1, 0.2, 0.5, 0.6)
  if isinstance(feature, F.Sequence):
    return [_fake(feature.feature, label_key, key, label, image)]
  if isinstance(feature, F.Tensor):
    return np.zeros([1 if s is None else s for s in feature.shape], feature.np_dtype)
  raise TypeError(f"no fake value for {type(feature).__name__}")


def prepare(name: str, data_dir: str, split_labels: dict, label_key: str = "label",
            image_shape=None):
  """Prepares TFDS dataset ``name`` with the given labels per split."""
  real = tfds.builder_cls(name)
  with registered.skip_registration():

    class Tiny(real):  # pylint: disable=missing-class-docstring
      name = real.name
      code_path = None  # no checksums file: this builder downloads nothing

      def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in split_labels}

      def _generate_examples(self, split):
        split_index = list(split_labels).index(split)
        features = self.info.features
        c = features["image"].shape[-1] or 3
        fixed = features["image"].shape[:2]
        shape = fixed if None not in fixed else image_shape
        for i, label in enumerate(split_labels[split]):
          image = example_image(split_index, i, label, c, shape)
          yield f"{split}-{i}", _fake(features, label_key, None, label, image)

  builder = Tiny(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder


SPLIT_LABELS = {
    # Class 0/1 in both splits, 99|100 straddle the CUB cut, 199 is the last class.
    "caltech_birds2011": {"train": [0, 1, 99, 100, 150, 199, 1],
                          "test": [0, 5, 99, 100, 101, 199, 199]},
    "cars196": {"train": [0, 97, 98, 195, 3], "test": [97, 98, 1, 195]},
    "stanford_online_products": {"train": [3, 3, 8, 11317], "test": [11318, 20000, 20000]},
    "omniglot": {"train": [0, 0, 963], "test": [964, 1622, 1000]},
    "stanford_dogs": {"train": [0, 59, 60, 119], "test": [59, 60, 5]},
    "oxford_flowers102": {"train": [0, 50], "validation": [51, 1], "test": [101, 50, 51]},
    "oxford_iiit_pet": {"train": [0, 17, 18], "test": [36, 17]},
}
LABEL_KEYS = {"stanford_online_products": "class_id"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  for name, split_labels in SPLIT_LABELS.items():
    prepare(name, str(root), split_labels, LABEL_KEYS.get(name, "label"))
  return str(root)


def _identity(s, i, lab, channels, stored_channels):
  """The pixel of example (s, i, lab) after the loader's channel conversion."""
  pixel = example_image(s, i, lab, stored_channels, (1, 1))
  if channels == 1 and stored_channels == 3:
    pixel = np.asarray(Image.fromarray(pixel).convert("L"))[..., None]
  return tuple(pixel[0, 0])


def _check_split(source, expected, channels, size, stored_channels=None, contiguous=True):
  """``expected``: (split_index, position, dataset label) of each example.

  TFDS shuffles records when it prepares a dataset, so examples are matched
  through their colour, which encodes (split, position, label).
  """
  assert len(source) == len(expected)
  labels = source.labels
  assert labels.dtype == np.int32
  if contiguous:
    assert set(labels.tolist()) == set(range(source.num_classes))
  images = source.images(np.arange(len(source)))
  assert images.shape == (len(source), size, size, channels) and images.dtype == np.uint8
  assert all((img == img[0, 0]).all() for img in images)  # constant images stay constant
  stored = stored_channels or channels
  want = {_identity(s, i, lab, channels, stored): lab for s, i, lab in expected}
  assert len(want) == len(expected)
  got = [tuple(img[0, 0]) for img in images]
  assert sorted(got) == sorted(want)  # every example exactly once
  # Each image comes with its own label.
  dataset_ids = source.class_ids[np.searchsorted(np.unique(labels), labels)]
  np.testing.assert_array_equal(dataset_ids, [want[g] for g in got])


def _pooled(name, keep):
  splits = list(SPLIT_LABELS[name].items())
  return [(s, i, lab) for s, (_, labs) in enumerate(splits) for i, lab in enumerate(labs)
          if keep(lab)]


@pytest.mark.parametrize("name,cut", [
    ("caltech_birds2011", 100), ("cars196", 98), ("stanford_dogs", 60),
    ("oxford_flowers102", 51), ("oxford_iiit_pet", 18)])
def test_class_disjoint_pooled_splits(data_dir, name, cut):
  splits = data.load(name, data_dir=data_dir, image_size=12, num_threads=2)
  assert splits.image_shape == (12, 12, 3)
  _check_split(splits.train, _pooled(name, lambda lab: lab < cut), 3, 12)
  _check_split(splits.test, _pooled(name, lambda lab: lab >= cut), 3, 12)
  assert splits.num_classes_train == splits.train.num_classes
  assert not set(splits.train.class_ids) & set(splits.test.class_ids)


def test_caltech_birds_pools_both_splits(data_dir):
  splits = data.load("caltech_birds2011", data_dir=data_dir, image_size=8)
  # 4 train-class examples from TFDS train + 3 from TFDS test, and so on.
  assert (len(splits.train), len(splits.test)) == (7, 7)
  assert splits.train.class_ids.tolist() == [0, 1, 5, 99]
  assert splits.test.class_ids.tolist() == [100, 101, 150, 199]
  assert np.bincount(splits.test.labels).tolist() == [2, 1, 1, 3]


@pytest.mark.parametrize("name,channels,size", [
    ("stanford_online_products", 3, 10), ("omniglot", 1, 28)])
def test_tfds_class_disjoint_splits(data_dir, name, channels, size):
  kwargs = {"image_size": size} if name == "stanford_online_products" else {}
  splits = data.load(name, data_dir=data_dir, **kwargs)
  assert splits.image_shape == (size, size, channels)
  train_labels, test_labels = SPLIT_LABELS[name]["train"], SPLIT_LABELS[name]["test"]
  for source, s, labels in ((splits.train, 0, train_labels), (splits.test, 1, test_labels)):
    # TFDS omniglot stores RGB images; the loader returns grey ones.
    _check_split(source, [(s, i, lab) for i, lab in enumerate(labels)], channels, size,
                 stored_channels=3)


def test_classification_protocol(data_dir):
  splits = data.load("cars196", data_dir=data_dir, image_size=8, protocol="classification")
  # TFDS train vs TFDS test, dataset class ids kept as labels.
  assert sorted(splits.train.labels.tolist()) == sorted(SPLIT_LABELS["cars196"]["train"])
  assert sorted(splits.test.labels.tolist()) == sorted(SPLIT_LABELS["cars196"]["test"])
  for source, s in ((splits.train, 0), (splits.test, 1)):
    labels = SPLIT_LABELS["cars196"][("train", "test")[s]]
    _check_split(source, [(s, i, lab) for i, lab in enumerate(labels)], 3, 8, contiguous=False)
  with pytest.raises(ValueError, match="protocol"):
    data.load("stanford_online_products", data_dir=data_dir, protocol="classification")
  with pytest.raises(ValueError, match="protocol"):
    data.load("cars196", data_dir=data_dir, protocol="few_shot")


def _encode(array, fmt="PNG", mode=None):
  buf = io.BytesIO()
  img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  (img.convert(mode) if mode else img).save(buf, format=fmt)
  return buf.getvalue()


def test_resize_modes():
  # A 10x30 image: red | green | blue thirds.
  image = np.zeros((10, 30, 3), np.uint8)
  image[:, :10, 0] = image[:, 10:20, 1] = image[:, 20:, 2] = 255
  resized = {mode: tfds_sources.decode_image(_encode(image), (10, 10), 3, mode)
             for mode in ("center_crop", "stretch")}
  crop, stretch = resized["center_crop"], resized["stretch"]
  np.testing.assert_array_equal(crop, np.broadcast_to([0, 255, 0], (10, 10, 3)))
  np.testing.assert_array_equal(stretch[:, 0], np.broadcast_to([255, 0, 0], (10, 3)))
  np.testing.assert_array_equal(stretch[:, -1], np.broadcast_to([0, 0, 255], (10, 3)))
  grey = tfds_sources.decode_image(_encode(image), (4, 6), 1, "stretch")
  assert grey.shape == (4, 6, 1) and grey.dtype == np.uint8


@pytest.mark.parametrize("fmt,mode", [("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "P"),
                                      ("PNG", "RGBA"), ("PNG", "LA")])
def test_decode_any_colour_mode(fmt, mode):
  colour = np.array([200, 40, 90], np.uint8)
  image = np.broadcast_to(colour, (40, 48, 3)).copy()
  rgb = tfds_sources.decode_image(_encode(image, fmt, mode), (8, 8), 3)
  grey = tfds_sources.decode_image(_encode(image, fmt, mode), (8, 8), 1)
  assert rgb.shape == (8, 8, 3) and grey.shape == (8, 8, 1)
  expected_grey = np.asarray(Image.fromarray(image).convert("L"))[0, 0]
  tol = 1 if mode in ("RGBA", "LA") else 6  # JPEG and palettes are lossy
  np.testing.assert_allclose(grey.astype(int), expected_grey, atol=tol)
  if mode in ("L", "LA"):
    np.testing.assert_allclose(rgb.astype(int), expected_grey, atol=tol)
  else:
    np.testing.assert_allclose(rgb.astype(int), np.broadcast_to(colour, (8, 8, 3)), atol=tol)


def test_large_jpeg_decoded_at_reduced_scale():
  # A 400x480 JPEG for a 20x24 target: decoded via draft, still exact in shape
  # and close in content to a full decode + resize.
  rng = np.random.default_rng(0)
  image = np.kron(rng.integers(0, 256, (10, 12, 3)), np.ones((40, 40, 1))).astype(np.uint8)
  data_bytes = _encode(image, "JPEG")
  fast = tfds_sources.decode_image(data_bytes, (20, 24), 3, "stretch")
  full = np.asarray(Image.open(io.BytesIO(data_bytes)).convert("RGB").resize(
      (24, 20), Image.Resampling.BILINEAR), np.uint8)
  assert fast.shape == (20, 24, 3)
  assert np.abs(fast.astype(int) - full.astype(int)).mean() < 8


def test_missing_dataset_tells_how_to_prepare(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError,
                     match=r"tfds build cars196 --file_format=array_record --data_dir="):
    data.load("cars196", data_dir=str(tmp_path))
  assert issubclass(data.DatasetNotPreparedError, FileNotFoundError)


def test_bad_options(data_dir):
  with pytest.raises(ValueError, match="resize"):
    data.load("cars196", data_dir=data_dir, resize="pad")
  with pytest.raises(ValueError, match="channels"):
    data.load("cars196", data_dir=data_dir, channels=2)
  with pytest.raises(ValueError, match="image_size"):
    data.load("cars196", data_dir=data_dir, image_size=(3, 0))
  with pytest.raises(ValueError, match="no split"):
    data.TfdsSource("cars196", ["validation"], data_dir=data_dir)
  with pytest.raises(ValueError, match="no feature 'class_id'"):
    data.TfdsSource("cars196", ["train"], data_dir=data_dir, label_key="class_id")
