"""Random-access image sources with integer labels, and class-disjoint splits.

A :class:`Source` is the host-side view of one split of a dataset: it knows
every label up front (samplers need them) and reads images on demand, always
at one fixed shape, so that batches can be stacked and sent to the device
without recompilation.

Labels of a split returned by :func:`metric_jax.data.load` are contiguous
``0 .. num_classes - 1`` within that split; ``class_ids`` maps each of them
back to the dataset's own class id (e.g. CUB class 101 is test label 0).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Sequence

import numpy as np

__all__ = ["ArraySource", "DataSplits", "Source", "SubsetSource", "class_split", "relabel"]


def relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Maps arbitrary integer labels to contiguous ``0 .. C-1`` (sorted order).

  Args:
    labels: [N] integer array.

  Returns:
    ``(new_labels, class_ids)``: [N] int32 labels in ``0 .. C-1`` and the [C]
    original class id of each new label (``class_ids[new_labels] == labels``).

  Example:
    >>> import numpy as np
    >>> new, ids = relabel(np.array([7, 3, 7, 9]))
    >>> new.tolist(), ids.tolist()
    ([1, 0, 1, 2], [3, 7, 9])
  """
  labels = np.asarray(labels)
  class_ids, new = np.unique(labels, return_inverse=True)
  return new.reshape(-1).astype(np.int32), class_ids


def check_indices(indices, n: int, name: str = "indices") -> np.ndarray:
  """Validates a 1-D array of integer indices into a source of length ``n``."""
  idx = np.asarray(indices)
  if idx.ndim != 1:
    raise ValueError(f"`{name}` must be a 1-D integer array, got shape {idx.shape}.")
  if idx.size and not np.issubdtype(idx.dtype, np.integer):
    raise TypeError(f"`{name}` must be an integer array, got dtype {idx.dtype}.")
  idx = idx.astype(np.int64)
  if idx.size and (idx.min() < 0 or idx.max() >= n):
    raise ValueError(
        f"`{name}` must lie in [0, {n}), got values in [{idx.min()}, {idx.max()}].")
  return idx


class Source(abc.ABC):
  """One split of an image dataset: labels in memory, images read on demand.

  Attributes:
    labels: [N] int32 labels.
    class_ids: [num_classes] dataset class id of each label value, in sorted
      label order: the k-th smallest label value stands for dataset class
      ``class_ids[k]`` (so ``class_ids[labels]`` for contiguous labels, and
      ``class_ids == np.unique(labels)`` for a source that was not relabelled).
    image_shape: ``(H, W, C)`` of every image returned by :meth:`images`.

  A subclass sets these three attributes and implements ``_read(indices)``
  (validated int64 [n] indices -> [n, H, W, C] uint8); :meth:`images`
  validates the indices and the result.

  Example:
    >>> import numpy as np
    >>> class Ramp(Source):
    ...   def __init__(self, n):
    ...     self.labels = np.arange(n, dtype=np.int32) % 2
    ...     self.class_ids = np.array([0, 1])
    ...     self.image_shape = (2, 2, 1)
    ...   def _read(self, indices):
    ...     return np.broadcast_to(indices.astype(np.uint8)[:, None, None, None],
    ...                            (len(indices), 2, 2, 1)).copy()
    >>> src = Ramp(5)
    >>> len(src), src.num_classes, src.images(np.array([4, 1]))[:, 0, 0, 0].tolist()
    (5, 2, [4, 1])
  """

  labels: np.ndarray
  class_ids: np.ndarray
  image_shape: tuple[int, int, int]

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def num_classes(self) -> int:
    """Number of distinct labels."""
    return int(self.class_ids.shape[0])

  def images(self, indices: np.ndarray) -> np.ndarray:
    """Reads images.

    Args:
      indices: [n] integer indices in ``[0, len(self))``.

    Returns:
      [n, H, W, C] uint8 array, ``(H, W, C) == self.image_shape``.
    """
    idx = check_indices(indices, len(self))
    out = self._read(idx)
    expected = (idx.shape[0],) + tuple(self.image_shape)
    if out.shape != expected or out.dtype != np.uint8:  # internal invariant
      raise RuntimeError(
          f"{type(self).__name__} returned {out.dtype} {out.shape}, expected uint8 {expected}.")
    return out

  @abc.abstractmethod
  def _read(self, indices: np.ndarray) -> np.ndarray:
    """Reads validated int64 ``indices``; returns [n, H, W, C] uint8."""

  def subset(self, indices: np.ndarray, *, relabel_classes: bool = True) -> "Source":
    """The examples at ``indices`` as a new source (labels made contiguous)."""
    return SubsetSource(self, indices, relabel_classes=relabel_classes)

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(num_examples={len(self)}, "
            f"num_classes={self.num_classes}, image_shape={self.image_shape})")


def _as_nhwc_uint8(images, name: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(f"`{name}` must be a uint8 array, got dtype {images.dtype}.")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(
        f"`{name}` must have shape [N, H, W] or [N, H, W, C], got {images.shape}.")
  return images


class ArraySource(Source):
  """A source over in-memory arrays.

  Args:
    images: [N, H, W] or [N, H, W, C] uint8 (a missing channel axis is
      added: C = 1).
    labels: [N] integers (kept as they are, as int32; see :func:`relabel`).

  Raises:
    TypeError / ValueError: on non-uint8 images, a wrong rank, or labels that
      are not [N] integers.

  Example:
    >>> import numpy as np
    >>> src = ArraySource(np.zeros((4, 8, 8), np.uint8), np.array([0, 0, 1, 1]))
    >>> len(src), src.num_classes, src.image_shape, src.images(np.array([3, 0])).shape
    (4, 2, (8, 8, 1), (2, 8, 8, 1))
  """

  def __init__(self, images, labels):
    self._images = _as_nhwc_uint8(images, "images")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != self._images.shape[0]:
      raise ValueError(
          f"`labels` must have shape [{self._images.shape[0]}] to match `images`, "
          f"got {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
      raise TypeError(f"`labels` must be integers, got dtype {labels.dtype}.")
    self.labels = labels.astype(np.int32)
    self.class_ids = np.unique(self.labels)
    self.image_shape = tuple(int(s) for s in self._images.shape[1:])

  def _read(self, indices: np.ndarray) -> np.ndarray:
    return self._images[indices]


class SubsetSource(Source):
  """The examples of ``parent`` at ``indices``, labels made contiguous.

  Args:
    parent: any source.
    indices: [n] indices into ``parent``.
    relabel_classes: map labels to ``0 .. C-1`` (default True);
      ``class_ids`` always names the dataset's classes (composed through a
      relabelled parent).

  Example:
    >>> import numpy as np
    >>> parent = ArraySource(np.arange(4, dtype=np.uint8).reshape(4, 1, 1), np.array([5, 5, 7, 9]))
    >>> sub = SubsetSource(parent, np.array([3, 2]))
    >>> sub.labels.tolist(), sub.class_ids.tolist(), int(sub.images(np.array([0]))[0, 0, 0, 0])
    ([1, 0], [7, 9], 3)
  """

  def __init__(self, parent: Source, indices, *, relabel_classes: bool = True):
    self._parent = parent
    self._indices = check_indices(indices, len(parent))
    parent_labels = parent.labels[self._indices]
    if relabel_classes:
      self.labels, present = relabel(parent_labels)
    else:
      self.labels = parent_labels.astype(np.int32)
      present = np.unique(self.labels)
    # The k-th smallest parent label value names parent.class_ids[k].
    pos = np.searchsorted(np.unique(parent.labels), present)
    self.class_ids = parent.class_ids[pos]
    self.image_shape = parent.image_shape

  @property
  def parent_indices(self) -> np.ndarray:
    """[n] index into the parent source of each example."""
    return self._indices

  def _read(self, indices: np.ndarray) -> np.ndarray:
    return self._parent.images(self._indices[indices])


def class_split(source: Source, train_classes: Sequence[int] | np.ndarray
                ) -> tuple[Source, Source]:
  """Splits a source by class: ``train_classes`` vs every other class.

  Args:
    source: a source whose ``labels`` are dataset class ids.
    train_classes: [K] label values that go to the train split.

  Returns:
    ``(train, test)`` subsets with disjoint classes, each relabelled to
    ``0 .. C-1`` in sorted class order (``class_ids`` keeps the original ids).

  Raises:
    ValueError: if ``train_classes`` selects no example or every example.

  Example:
    >>> import numpy as np
    >>> src = ArraySource(np.zeros((6, 2, 2), np.uint8), np.array([0, 1, 2, 3, 2, 0]))
    >>> tr, te = class_split(src, [0, 1])
    >>> tr.labels.tolist(), te.labels.tolist(), te.class_ids.tolist()
    ([0, 1, 0], [0, 1, 0], [2, 3])
  """
  train_classes = np.asarray(train_classes)
  in_train = np.isin(source.labels, train_classes)
  if not in_train.any() or in_train.all():
    raise ValueError(
        "`train_classes` must select some but not all examples; got "
        f"{train_classes.size} train classes out of {source.num_classes}.")
  return (source.subset(np.flatnonzero(in_train)),
          source.subset(np.flatnonzero(~in_train)))


def size_pair(image_size, name: str = "image_size") -> tuple[int, int]:
  if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
    size = (int(image_size), int(image_size))
  elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
    size = (int(image_size[0]), int(image_size[1]))
  else:
    raise ValueError(f"`{name}` must be an int or an (H, W) pair, got {image_size!r}.")
  if min(size) < 1:
    raise ValueError(f"`{name}` must be positive, got {image_size!r}.")
  return size


@dataclasses.dataclass(frozen=True)
class DataSplits:
  """A dataset's class-disjoint train and test sources.

  Attributes:
    train: the training split (labels ``0 .. num_classes_train - 1``).
    test: the held-out split (its own contiguous labels).
    num_classes_train: number of classes of ``train``.
    image_shape: ``(H, W, C)`` of the images of both splits.

  Example:
    >>> import numpy as np
    >>> src = ArraySource(np.zeros((4, 2, 2), np.uint8), np.array([0, 1, 2, 2]))
    >>> train, test = class_split(src, [0, 1])
    >>> splits = DataSplits(train, test, train.num_classes, train.image_shape)
    >>> splits.num_classes_train, splits.num_classes_test, splits.image_shape
    (2, 1, (2, 2, 1))
  """

  train: Source
  test: Source
  num_classes_train: int
  image_shape: tuple

  @property
  def num_classes_test(self) -> int:
    return self.test.num_classes


def make_splits(train: Source, test: Source) -> DataSplits:
  if train.image_shape != test.image_shape:  # internal invariant
    raise RuntimeError(f"train/test image shapes differ: {train.image_shape} {test.image_shape}")
  return DataSplits(train=train, test=test, num_classes_train=train.num_classes,
                    image_shape=tuple(train.image_shape))
