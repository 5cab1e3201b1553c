"""TFDS datasets through ``tfds.data_source`` (random access, no TensorFlow).

A prepared dataset in the ArrayRecord format is read with
``tfds.data_source``: records are decoded with NumPy/PIL, so training needs
neither TensorFlow nor ``tf.data``. Labels are read once, when the source is
built, with every image feature left undecoded (``tfds.decode.SkipDecoding``);
images are decoded on demand with PIL and resized on the host to one fixed
size.

Preparing a dataset needs network access (and, for some builders,
TensorFlow), once, on any machine::

    tfds build caltech_birds2011 --file_format=array_record --data_dir=DIR

then ``load("caltech_birds2011", data_dir=DIR)`` (or set ``TFDS_DATA_DIR``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
from typing import Sequence

import numpy as np

from metric_jax.data import sources as sources_lib
from metric_jax.data.sources import Source

__all__ = ["DatasetNotPreparedError", "TFDS_DATASETS", "TfdsDataset", "TfdsSource",
           "decode_image", "load_tfds"]


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  """How a TFDS dataset becomes a class-disjoint train/test pair.

  Attributes:
    tfds_name: the TFDS name.
    splits: the TFDS splits pooled before the class split; or, when
      ``train_classes`` is None, ``(train_split, test_split)`` used as they are.
    train_classes: number of classes (the first ones, in TFDS label order)
      of the train split; None to use the TFDS splits as given.
    label_key: the ClassLabel feature; default ``"label"``.
    image_size: default host image size (square side); default 256.
    channels: default number of channels of the returned images; default 3.
    note: how the split relates to the literature; default ``""``.

  Example:
    >>> spec = TFDS_DATASETS["cars196"]
    >>> spec.splits, spec.train_classes, spec.image_size
    (('train', 'test'), 98, 256)
  """

  tfds_name: str
  splits: tuple[str, ...]
  train_classes: int | None
  label_key: str = "label"
  image_size: int = 256
  channels: int = 3
  note: str = ""


TFDS_DATASETS: dict[str, TfdsDataset] = {
    "caltech_birds2011": TfdsDataset(
        "caltech_birds2011", ("train", "test"), 100,
        note="CUB-200-2011: classes 1-100 train, 101-200 test, both TFDS splits pooled "
             "(5,864 / 5,924 images)."),
    "cars196": TfdsDataset(
        "cars196", ("train", "test"), 98,
        note="Cars196: classes 1-98 train, 99-196 test, both TFDS splits pooled "
             "(8,054 / 8,131 images)."),
    "stanford_online_products": TfdsDataset(
        "stanford_online_products", ("train", "test"), None, label_key="class_id",
        note="SOP: the dataset's own class-disjoint splits, 11,318 / 11,316 classes "
             "(59,551 / 60,502 images)."),
    "omniglot": TfdsDataset(
        "omniglot", ("train", "test"), None, image_size=28, channels=1,
        note="Omniglot: TFDS train = background (964 classes), test = evaluation "
             "(659 classes); TFDS images are black ink on white."),
    "stanford_dogs": TfdsDataset(
        "stanford_dogs", ("train", "test"), 60,
        note="Stanford Dogs: first 60 / last 60 breeds, both TFDS splits pooled "
             "(a metric_jax convention: there is no standard class-disjoint split)."),
    "oxford_flowers102": TfdsDataset(
        "oxford_flowers102", ("train", "validation", "test"), 51,
        note="Oxford 102 Flowers: first 51 / last 51 classes, all three TFDS splits "
             "pooled (a metric_jax convention)."),
    "oxford_iiit_pet": TfdsDataset(
        "oxford_iiit_pet", ("train", "test"), 18,
        note="Oxford-IIIT Pet: first 18 / last 19 breeds, both TFDS splits pooled "
             "(a metric_jax convention)."),
}
"""The TFDS datasets :func:`metric_jax.data.load` knows, by name: CUB-200-2011
(Wah et al. 2011), Cars196 (Krause et al. 2013), Stanford Online Products
(Oh Song et al. 2016, arXiv 1511.06452), Omniglot (Lake et al. 2015),
Stanford Dogs, Oxford 102 Flowers and Oxford-IIIT Pet; each
:class:`TfdsDataset`'s ``note`` gives its train/test split."""


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared (in the ArrayRecord format) in data_dir.

  A ``FileNotFoundError``; its message gives the ``tfds build`` command that
  prepares the dataset.

  Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...   try:
    ...     load_tfds("omniglot", data_dir=empty)
    ...   except DatasetNotPreparedError as e:
    ...     print("tfds build omniglot --file_format=array_record" in str(e))
    True
  """


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _image_features(features) -> list[str]:
  tfds = _tfds()
  return [k for k, f in features.items() if isinstance(f, tfds.features.Image)]


def open_builder(tfds_name: str, data_dir: str | None):
  """The prepared builder, or :class:`DatasetNotPreparedError` telling how."""
  tfds = _tfds()
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  where = os.fspath(builder.data_dir)
  manual = ""
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    manual = (" This dataset needs a manual download first: put the files in a folder "
              "and add --manual_dir=THAT_FOLDER.")
  command = (f"tfds build {tfds_name} --file_format=array_record"
             f"{' --data_dir=' + data_dir if data_dir else ''}")
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"TFDS dataset {tfds_name!r} is not prepared at {where!r}. Prepare it once "
        f"(network access needed; some builders also need TensorFlow): `{command}`.{manual} "
        "Then pass `data_dir=` (or set TFDS_DATA_DIR) to the folder that holds it.")
  fmt = builder.info.file_format
  if fmt is None or fmt.name not in ("ARRAY_RECORD", "PARQUET"):
    raise DatasetNotPreparedError(
        f"TFDS dataset {tfds_name!r} at {where!r} is prepared as {fmt}, which has no "
        f"random access. Prepare it again as ArrayRecord: `{command}` (into another "
        "data_dir, or after deleting this one).")
  return builder


def _resize(img, size: tuple[int, int], channels: int, mode: str) -> np.ndarray:
  """Resizes a PIL image to ``size`` (H, W) with ``channels``; uint8 HWC."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = img.convert("L" if channels == 1 else "RGB")
  h, w = size
  box = None
  if mode == "center_crop":  # largest centred box with the target aspect ratio
    src_w, src_h = img.size
    scale = min(src_w / w, src_h / h)
    cw, ch = w * scale, h * scale
    left, top = (src_w - cw) / 2.0, (src_h - ch) / 2.0
    box = (left, top, left + cw, top + ch)
  out = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR, box=box), np.uint8)
  return out.reshape(h, w, channels)


def decode_image(data: bytes, size: tuple[int, int], channels: int,
                 mode: str = "center_crop") -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, ...) to uint8 [H, W, channels].

  Any PIL mode is converted (grey, palette, RGBA, CMYK -> RGB or L). JPEGs
  are decoded at a reduced scale when the target is much smaller
  (``Image.draft``: never below the target size). The resize is PIL's
  bilinear filter.

  Args:
    data: the encoded image file's bytes.
    size: output ``(H, W)``.
    channels: 1 (grey, PIL mode ``"L"``) or 3 (RGB).
    mode: ``"center_crop"`` (default: the largest centred box with the
      aspect ratio W / H, then resized) or ``"stretch"`` (the whole image
      resized to ``size``).

  Returns:
    [H, W, channels] uint8 array.

  Example:
    >>> import io
    >>> import numpy as np
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.fromarray(np.full((10, 20, 3), 200, np.uint8)).save(buf, format="PNG")
    >>> out = decode_image(buf.getvalue(), (4, 4), channels=1)
    >>> out.shape, out.dtype, int(out.min()), int(out.max())
    ((4, 4, 1), dtype('uint8'), 200, 200)
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    img.draft("L" if channels == 1 else "RGB", (size[1], size[0]))
    return _resize(img, size, channels, mode)


class TfdsSource(Source):
  """Several TFDS splits of one dataset pooled into one random-access source.

  Labels are read once at construction (every image left encoded); the
  images of :meth:`images` are decoded and resized on demand
  (:func:`decode_image`), in ``num_threads`` host threads. Example ``i`` of
  the pooled source is example ``i - offset_k`` of split ``k``, the splits
  laid end to end in the order given.

  Args:
    tfds_name: a TFDS dataset prepared in the ArrayRecord format.
    splits: TFDS split names, pooled in this order.
    label_key: the integer/ClassLabel feature holding the class; default
      ``"label"``.
    image_key: the image feature; default ``"image"``.
    data_dir: the TFDS data directory (default None: TFDS's).
    image_size: output (H, W) (an int means square); default 256.
    channels: 1 (grey) or 3 (RGB, the default) channels in the output.
    resize: ``"center_crop"`` (default: keep the aspect ratio: scale the
      shorter side, crop the centre) or ``"stretch"`` (resize the whole image).
    num_threads: host threads decoding and resizing images; default 8.

  Raises:
    DatasetNotPreparedError: if the dataset is not prepared (as ArrayRecord)
      in ``data_dir``.
    ValueError: on an unknown feature or split, a bad ``resize`` or
      ``channels``.

  Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...   try:
    ...     TfdsSource("omniglot", ["train"], data_dir=empty, channels=1)
    ...   except DatasetNotPreparedError as e:
    ...     print(type(e).__name__)
    DatasetNotPreparedError

    With a prepared dataset: ``src = TfdsSource("cars196", ["train", "test"],
    data_dir=DIR, image_size=224)``, then ``src.images(np.arange(8)).shape ==
    (8, 224, 224, 3)``.
  """

  def __init__(self, tfds_name: str, splits: Sequence[str], *, label_key: str = "label",
               image_key: str = "image", data_dir: str | None = None,
               image_size: int | tuple[int, int] = 256, channels: int = 3,
               resize: str = "center_crop", num_threads: int = 8):
    tfds = _tfds()
    if resize not in ("center_crop", "stretch"):
      raise ValueError(f"`resize` must be 'center_crop' or 'stretch', got {resize!r}.")
    if channels not in (1, 3):
      raise ValueError(f"`channels` must be 1 or 3, got {channels!r}.")
    self._size = sources_lib.size_pair(image_size)
    self._channels = channels
    self._resize_mode = resize
    self._image_key = image_key
    self._num_threads = max(1, int(num_threads))
    builder = open_builder(tfds_name, data_dir)
    features = builder.info.features
    for key in (label_key, image_key):
      if key not in features:
        raise ValueError(f"TFDS dataset {tfds_name!r} has no feature {key!r}; "
                         f"it has {sorted(features.keys())}.")
    known = set(builder.info.splits.keys())
    bad = [s for s in splits if s not in known]
    if bad:
      raise ValueError(f"TFDS dataset {tfds_name!r} has no split(s) {bad}; it has {sorted(known)}.")
    # Images stay encoded: the label pass decodes none, and _read_one decodes
    # with PIL itself (any colour mode, reduced-scale JPEG decoding).
    skip = {k: tfds.decode.SkipDecoding() for k in _image_features(features)}
    if image_key not in skip:
      raise ValueError(f"Feature {image_key!r} of {tfds_name!r} is not an image.")
    self._parts = [builder.as_data_source(split=split, decoders=skip) for split in splits]
    labels = [self._read_labels(part, label_key) for part in self._parts]
    self._offsets = np.cumsum([0] + [len(p) for p in self._parts])
    self.labels = np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32)
    self.class_ids = np.unique(self.labels)
    self.image_shape = (self._size[0], self._size[1], channels)
    self.tfds_name = tfds_name
    self.splits = tuple(splits)

  @staticmethod
  def _read_labels(ds, label_key: str, chunk: int = 1024) -> np.ndarray:
    out = []
    for start in range(0, len(ds), chunk):
      keys = list(range(start, min(start + chunk, len(ds))))
      out.extend(int(ex[label_key]) for ex in ds.__getitems__(keys))
    return np.asarray(out, np.int64)

  def _read_one(self, i: int) -> np.ndarray:
    part = int(np.searchsorted(self._offsets, i, side="right") - 1)
    example = self._parts[part][int(i - self._offsets[part])]
    return decode_image(example[self._image_key], self._size, self._channels, self._resize_mode)

  def _read(self, indices: np.ndarray) -> np.ndarray:
    out = np.empty((len(indices),) + self.image_shape, np.uint8)
    if self._num_threads == 1 or len(indices) <= 1:
      for j, i in enumerate(indices):
        out[j] = self._read_one(int(i))
      return out
    with concurrent.futures.ThreadPoolExecutor(self._num_threads) as pool:
      for j, img in enumerate(pool.map(self._read_one, indices.tolist())):
        out[j] = img
    return out


def load_tfds(name: str, *, data_dir: str | None = None,
              image_size: int | tuple[int, int] | None = None,
              channels: int | None = None, resize: str = "center_crop",
              protocol: str = "retrieval", num_threads: int = 8):
  """One of :data:`TFDS_DATASETS` as class-disjoint :class:`DataSplits`.

  With ``train_classes = K``, the pooled splits' classes ``0 .. K-1`` (TFDS
  label order) form the train split and the others the test split
  (:func:`~metric_jax.data.class_split`); otherwise the dataset's own
  class-disjoint TFDS splits are used.

  Args:
    name: a key of :data:`TFDS_DATASETS`.
    data_dir: TFDS data directory holding the prepared dataset (default
      None: TFDS's, or ``TFDS_DATA_DIR``).
    image_size: host image size (default None: the dataset's, 256 or 28).
    channels: 1 or 3 output channels (default None: the dataset's).
    resize: ``"center_crop"`` (default) or ``"stretch"`` (see
      :class:`TfdsSource`).
    protocol: ``"retrieval"`` (class-disjoint train/test, the default) or
      ``"classification"`` (TFDS's own train split(s) vs its ``test`` split,
      sharing classes; for the datasets whose retrieval split is by class).
      Labels are then the dataset's class ids in both splits (contiguous as
      long as every class occurs in the split, as in the real datasets).
    num_threads: host decoding threads; default 8.

  Returns:
    :class:`metric_jax.data.DataSplits`; ``test.class_ids`` name the
    dataset's classes.

  Raises:
    DatasetNotPreparedError: if the dataset is not prepared in ``data_dir``.
    ValueError: on a bad ``protocol`` (or ``"classification"`` for a dataset
      whose TFDS splits are class-disjoint).

  References:
    The retrieval splits follow Oh Song, Xiang, Jegelka, Savarese, "Deep
    Metric Learning via Lifted Structured Feature Embedding", CVPR 2016,
    arXiv 1511.06452 (CUB-200-2011, Cars196, Stanford Online Products).

  Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...   try:
    ...     load_tfds("cars196", data_dir=empty)
    ...   except DatasetNotPreparedError:
    ...     print("not prepared")
    not prepared

    With a prepared dataset: ``splits = load_tfds("cars196", data_dir=DIR)``
    gives ``splits.num_classes_train == splits.num_classes_test == 98``.
  """
  spec = TFDS_DATASETS[name]
  if protocol not in ("retrieval", "classification"):
    raise ValueError(f"`protocol` must be 'retrieval' or 'classification', got {protocol!r}.")
  if protocol == "classification" and spec.train_classes is None:
    raise ValueError(f"`protocol='classification'` is not available for {name!r}: its "
                     "TFDS splits are class-disjoint.")
  kwargs = dict(label_key=spec.label_key, data_dir=data_dir,
                image_size=spec.image_size if image_size is None else image_size,
                channels=spec.channels if channels is None else channels,
                resize=resize, num_threads=num_threads)
  if spec.train_classes is None:
    train = TfdsSource(spec.tfds_name, spec.splits[:1], **kwargs)
    test = TfdsSource(spec.tfds_name, spec.splits[1:], **kwargs)
    return sources_lib.make_splits(train.subset(np.arange(len(train))), test.subset(np.arange(len(test))))
  pooled = TfdsSource(spec.tfds_name, spec.splits, **kwargs)
  if protocol == "classification":
    is_test = np.concatenate([np.full(n, s == "test") for s, n in
                              zip(pooled.splits, np.diff(pooled._offsets))])  # pylint: disable=protected-access
    # Both splits keep the dataset's class ids so that train and test agree.
    return sources_lib.make_splits(
        pooled.subset(np.flatnonzero(~is_test), relabel_classes=False),
        pooled.subset(np.flatnonzero(is_test), relabel_classes=False))
  return sources_lib.make_splits(*sources_lib.class_split(pooled, np.arange(spec.train_classes)))
