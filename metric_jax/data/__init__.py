"""Datasets, samplers and on-device preprocessing for metric learning.

* :func:`load` (``DATASET_NAMES``) returns class-disjoint :class:`DataSplits`
  of :class:`Source` objects (labels in memory, uint8 images on demand).
* :func:`build_sampler` (``SAMPLER_NAMES``): stateless samplers whose
  ``batch_indices(step)`` gives the fixed-shape batch of each step.
* :func:`preprocess`: jittable crop / flip / resize / normalisation on device.

Example:
  >>> import numpy as np, jax
  >>> from metric_jax import data
  >>> splits = data.load("digits")
  >>> sampler = data.build_sampler("m_per_class", splits.train.labels, 8, m=2)
  >>> images = splits.train.images(sampler.batch_indices(0))
  >>> data.preprocess(images, jax.random.key(0), train=True, flip=True).shape
  (8, 8, 8, 1)
"""

from metric_jax.data.augment import crop_and_resize
from metric_jax.data.augment import preprocess
from metric_jax.data.augment import sample_crop_box
from metric_jax.data.datasets import DATASET_NAMES
from metric_jax.data.datasets import default_omniglot_path
from metric_jax.data.datasets import load
from metric_jax.data.datasets import load_digits
from metric_jax.data.datasets import load_npz
from metric_jax.data.datasets import load_omniglot_npz
from metric_jax.data.samplers import build_sampler
from metric_jax.data.samplers import MPerClassSampler
from metric_jax.data.samplers import RandomSampler
from metric_jax.data.samplers import register_sampler
from metric_jax.data.samplers import Sampler
from metric_jax.data.samplers import SAMPLER_NAMES
from metric_jax.data.samplers import sampler_names
from metric_jax.data.sources import ArraySource
from metric_jax.data.sources import class_split
from metric_jax.data.sources import DataSplits
from metric_jax.data.sources import relabel
from metric_jax.data.sources import Source
from metric_jax.data.sources import SubsetSource
from metric_jax.data.tfds_sources import DatasetNotPreparedError
from metric_jax.data.tfds_sources import TFDS_DATASETS
from metric_jax.data.tfds_sources import TfdsSource

__all__ = [
    "ArraySource", "DATASET_NAMES", "DataSplits", "DatasetNotPreparedError",
    "MPerClassSampler", "RandomSampler", "SAMPLER_NAMES", "Sampler", "Source",
    "SubsetSource", "TFDS_DATASETS", "TfdsSource", "build_sampler", "class_split",
    "crop_and_resize", "default_omniglot_path", "load", "load_digits", "load_npz",
    "load_omniglot_npz", "preprocess", "register_sampler", "relabel",
    "sample_crop_box", "sampler_names",
]
