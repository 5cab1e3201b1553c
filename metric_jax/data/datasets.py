"""Named datasets with class-disjoint train/test splits: ``load(name, **options)``.

Deep metric learning is evaluated on classes never seen in training, so every
dataset here is split by class (the "zero-shot retrieval" protocol of Oh Song
et al. 2016): the model trains on ``splits.train`` and retrieval metrics are
computed among the images of ``splits.test``.

=========================  ===========================  =====================
name                       train / test                 images
=========================  ===========================  =====================
``digits``                 digits 0-4 / 5-9 (sklearn)   8x8x1, offline
``omniglot_npz``           background / evaluation      28x28x1 (964/659 cl.)
``npz``                    split array, or class halves any ``.npz``
``caltech_birds2011``      classes 1-100 / 101-200      TFDS, both splits
``cars196``                classes 1-98 / 99-196        TFDS, both splits
``stanford_online_products`` TFDS train / TFDS test     (class-disjoint)
``omniglot``               TFDS train / TFDS test       background/evaluation
``stanford_dogs``          first 60 / last 60 classes   TFDS, both splits
``oxford_flowers102``      first 51 / last 51 classes   TFDS, all 3 splits
``oxford_iiit_pet``        first 18 / last 19 classes   TFDS, both splits
=========================  ===========================  =====================

Validation split (for tuning hyper-parameters without touching the test
classes): ``load(name, validation=True)`` keeps only the training classes and
splits them by class again, deterministically: the first classes (in sorted
order of the dataset's class ids) train, the last ``validation_fraction`` of
them (default 0.4, at least one) form the held-out ``test`` split. The test
classes of the dataset are never read. For digits the default gives train
digits 0-2 / validation digits 3-4; for ``omniglot_npz`` 578 / 386 of the
964 background characters (labels follow alphabet names, so the held-out
characters are those of the last 12 background alphabets, one of which,
Japanese (hiragana), is shared with the train part). See
:func:`validation_split`.

References:
  Oh Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted
  Structured Feature Embedding", CVPR 2016, arXiv 1511.06452 (the CUB /
  Cars196 / SOP class splits). Lake, Salakhutdinov, Tenenbaum, Science 2015
  (Omniglot background/evaluation split).
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, Sequence

import numpy as np

from metric_jax import _checks
from metric_jax.data import sources as sources_lib
from metric_jax.data import tfds_sources
from metric_jax.data.sources import ArraySource, DataSplits, Source
from metric_jax.data.sources import make_splits as _splits
from metric_jax.data.sources import size_pair as _size_pair


# ----------------------------------------------------------------- digits


def load_digits(*, train_classes: Sequence[int] = (0, 1, 2, 3, 4)) -> DataSplits:
  """scikit-learn's 8x8 digits (1,797 images), split by class.

  Pixel values 0..16 are rescaled to uint8 by ``round(v * 255 / 16)``.

  Args:
    train_classes: digits of the train split; the others form the test split.

  Returns:
    :class:`DataSplits` with 8x8x1 images (default: 901 train images of
    digits 0-4, 896 test images of digits 5-9, relabelled 0-4).
  """
  from sklearn.datasets import load_digits as sk_load_digits  # pylint: disable=g-import-not-at-top
  d = sk_load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
  train_classes = np.asarray(train_classes)
  if not np.isin(train_classes, np.arange(10)).all():
    raise ValueError(f"`train_classes` must be digits 0..9, got {train_classes.tolist()}.")
  source = ArraySource(images, d.target)
  return _splits(*sources_lib.class_split(source, train_classes))


# ----------------------------------------------------------------- npz


class _PackedBitsSource(Source):
  """Binary images stored with ``np.packbits`` (ink = 1), resized on read.

  The binary image becomes 8-bit grey (ink 255) and is resized with PIL's
  area filter (``BOX``), the recipe of the 28x28 images of omniglot.npz.
  """

  def __init__(self, packed: np.ndarray, labels: np.ndarray, side: int,
               size: tuple[int, int]):
    self._packed = packed
    self._side = side
    self._size = size
    self.labels = np.asarray(labels, np.int32)
    self.class_ids = np.unique(self.labels)
    self.image_shape = (size[0], size[1], 1)

  def _read(self, indices: np.ndarray) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    bits = np.unpackbits(self._packed[indices], axis=1, count=self._side * self._side)
    out = np.empty((len(indices),) + self.image_shape, np.uint8)
    for i, b in enumerate(bits):
      img = Image.fromarray((b.reshape(self._side, self._side) * 255).astype(np.uint8), "L")
      if (self._side, self._side) != self._size:
        img = img.resize((self._size[1], self._size[0]), Image.Resampling.BOX)
      out[i, ..., 0] = np.asarray(img)
    return out


def load_npz(path: str | os.PathLike, *, image_key: str = "images",
             label_key: str = "labels", split_key: str | None = None,
             train_classes: Sequence[int] | None = None,
             train_class_fraction: float = 0.5,
             packed_key: str | None = None, packed_side: int | None = None,
             image_size: int | tuple[int, int] | None = None) -> DataSplits:
  """Any ``.npz`` holding uint8 images and integer labels.

  The split comes from, in this order: a per-example boolean array
  ``split_key`` (True = train); an explicit list ``train_classes``; else the
  first ``round(C * train_class_fraction)`` classes in sorted label order.

  Args:
    path: the ``.npz`` file (read with ``allow_pickle=False``).
    image_key: [N, H, W] or [N, H, W, C] uint8 images.
    label_key: [N] integer labels.
    split_key: optional [N] boolean (or 0/1) array, True for train examples.
    train_classes: label values of the train split (when no ``split_key``).
    train_class_fraction: fraction of the classes in the train split (when
      neither ``split_key`` nor ``train_classes`` is given).
    packed_key, packed_side: optional [N, ceil(side^2 / 8)] ``np.packbits``
      binary images of ``packed_side`` x ``packed_side`` pixels, used instead
      of ``image_key`` when ``image_size`` differs from the stored images
      (resized with PIL's BOX filter on read).
    image_size: optional output size; requires ``packed_key`` unless it equals
      the stored size.

  Returns:
    :class:`DataSplits`.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"`path`: no .npz file at {str(path)!r}.")
  with np.load(path, allow_pickle=False) as d:
    missing = [k for k in (image_key, label_key, split_key, packed_key)
               if k is not None and k not in d.files]
    if missing:
      raise ValueError(f"{str(path)!r} has no array(s) {missing}; it has {sorted(d.files)}.")
    labels = d[label_key]
    stored = d[image_key]
    stored = stored[..., None] if stored.ndim == 3 else stored
    size = None if image_size is None else _size_pair(image_size)
    if size is None or size == tuple(stored.shape[1:3]):
      source = ArraySource(stored, labels)
    elif packed_key is not None:
      if packed_side is None:
        raise ValueError("`packed_side` is required with `packed_key`.")
      source = _PackedBitsSource(d[packed_key], labels, packed_side, size)
    else:
      raise ValueError(
          f"`image_size` {size} differs from the stored images {tuple(stored.shape[1:3])} "
          "and no `packed_key` full-resolution array was given.")
    split = None if split_key is None else d[split_key]

  if split is not None:
    split = np.asarray(split)
    if split.shape != (len(source),):
      raise ValueError(f"`{split_key}` must have shape [{len(source)}], got {split.shape}.")
    split = split.astype(bool)
    if split.all() or not split.any():
      raise ValueError(f"`{split_key}` must mark some but not all examples as train.")
    return _splits(source.subset(np.flatnonzero(split)), source.subset(np.flatnonzero(~split)))
  if train_classes is None:
    classes = np.unique(source.labels)
    if not 0.0 < train_class_fraction < 1.0:
      raise ValueError(f"`train_class_fraction` must be in (0, 1), got {train_class_fraction}.")
    k = int(round(len(classes) * train_class_fraction))
    train_classes = classes[:min(max(k, 1), len(classes) - 1)]
  return _splits(*sources_lib.class_split(source, train_classes))


def default_omniglot_path() -> pathlib.Path:
  """``$METRIC_JAX_OMNIGLOT``, else ``../shared/data/omniglot/omniglot.npz``
  relative to the repository root."""
  env = os.environ.get("METRIC_JAX_OMNIGLOT")
  if env:
    return pathlib.Path(env)
  root = pathlib.Path(__file__).resolve().parents[2]
  return root.parent / "shared" / "data" / "omniglot" / "omniglot.npz"


def load_omniglot_npz(*, path: str | os.PathLike | None = None,
                      image_size: int | tuple[int, int] | None = None) -> DataSplits:
  """Omniglot from ``omniglot.npz``: background (train) / evaluation (test).

  19,280 train images of 964 classes, 13,180 test images of 659 classes
  (20 drawings per character), 28x28x1, ink = 255.

  Args:
    path: the ``.npz`` (default :func:`default_omniglot_path`).
    image_size: optional other size, resized from the 105x105 originals with
      PIL's BOX filter (the recipe of the stored 28x28 images).

  Returns:
    :class:`DataSplits`.
  """
  path = pathlib.Path(path) if path is not None else default_omniglot_path()
  if not path.is_file():
    raise FileNotFoundError(
        f"Omniglot npz not found at {str(path)!r}. Pass `path=...` or set "
        "METRIC_JAX_OMNIGLOT; the file is described in shared/data/omniglot/README.md "
        "(or use the TFDS dataset 'omniglot').")
  return load_npz(path, image_key="images", label_key="labels", split_key="is_background",
                  packed_key="images105_packbits", packed_side=105, image_size=image_size)


# ----------------------------------------------------------------- registry

_LOADERS: dict[str, Callable[..., DataSplits]] = {
    "digits": load_digits,
    "npz": load_npz,
    "omniglot_npz": load_omniglot_npz,
}
for _name in tfds_sources.TFDS_DATASETS:
  _LOADERS[_name] = (lambda n: lambda **kw: tfds_sources.load_tfds(n, **kw))(_name)

DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)


def validation_split(splits: DataSplits, fraction: float = 0.4) -> DataSplits:
  """Class-disjoint train / validation splits carved out of ``splits.train``.

  The training classes, in sorted order of their dataset class ids, are cut
  in two: the first ``C - k`` train, the last ``k = round(C * fraction)``
  (clipped to ``[1, C - 1]``) are held out as the returned ``test`` split.
  Deterministic (no random choice) and independent of ``splits.test``, which
  is dropped, so hyper-parameters tuned on the result never see a test class.

  Args:
    splits: a dataset's :class:`DataSplits` (only ``train`` is used).
    fraction: fraction of the training classes held out, in (0, 1).

  Returns:
    :class:`DataSplits` whose ``train`` and ``test`` are class-disjoint
    subsets of ``splits.train``, relabelled ``0 .. C-1`` each;
    ``class_ids`` keep the dataset's class ids.

  Raises:
    ValueError: when ``fraction`` is not in (0, 1) or ``splits.train`` has
      fewer than 2 classes.

  Example:
    >>> from metric_jax.data import datasets
    >>> val = datasets.validation_split(datasets.load("digits"))
    >>> val.train.class_ids.tolist(), val.test.class_ids.tolist(), len(val.train), len(val.test)
    ([0, 1, 2], [3, 4], 537, 364)
  """
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
      0.0 < fraction < 1.0):
    raise ValueError(f"`validation_fraction` must be a number in (0, 1), got {fraction!r}.")
  train = splits.train
  num_classes = train.num_classes
  if num_classes < 2:
    raise ValueError(
        f"a validation split needs at least 2 training classes, got {num_classes}.")
  held_out = min(max(int(round(num_classes * fraction)), 1), num_classes - 1)
  # train.labels are contiguous 0..C-1 in sorted class-id order.
  return _splits(*sources_lib.class_split(train, np.arange(num_classes - held_out)))


def load(name: str, *, validation: bool = False, validation_fraction: float = 0.4,
         **options) -> DataSplits:
  """Loads a dataset's class-disjoint train/test splits.

  Args:
    name: one of :data:`DATASET_NAMES`.
    validation: if True, return :func:`validation_split` of the training
      classes instead (train = the first training classes, test = the last
      ``validation_fraction`` of them); the dataset's test classes are not
      used. For tuning hyper-parameters.
    validation_fraction: fraction of the training classes held out when
      ``validation`` is True (default 0.4).
    **options: the loader's options (``load_digits``, ``load_npz``,
      ``load_omniglot_npz``, ``tfds_sources.load_tfds``).

  Returns:
    :class:`DataSplits`.

  Example:
    >>> from metric_jax import data
    >>> splits = data.load("digits")
    >>> len(splits.train), len(splits.test), splits.num_classes_train, splits.image_shape
    (901, 896, 5, (8, 8, 1))
    >>> val = data.load("digits", validation=True)
    >>> val.num_classes_train, val.test.class_ids.tolist()
    (3, [3, 4])
  """
  if name not in _LOADERS:
    raise ValueError(f"`name` must be one of {DATASET_NAMES}, got {name!r}.")
  _checks.flag(validation, "validation")
  splits = _LOADERS[name](**options)
  if validation:
    splits = validation_split(splits, validation_fraction)
  return splits
