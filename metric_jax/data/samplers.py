"""Stateless batch samplers: ``batch_indices(step)`` is a pure function of
``(seed, step)``.

Every sampler returns a fixed-shape [batch_size] int64 array of indices into
a source, so a resumed run (same seed, same step) sees exactly the same
batches without any saved sampler state, and every host of a multi-host job
can compute the global batch and take its own slice.

``batch_indices(step)`` is the sampler protocol of metric_jax: samplers with
extra state (magnet, lifted structure) implement the same method plus their
own update methods, and register with :func:`register_sampler`.
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

import numpy as np

from metric_jax import _checks

__all__ = ["MPerClassSampler", "RandomSampler", "SAMPLER_NAMES", "Sampler", "build_sampler",
           "register_sampler", "sampler_names"]


class Sampler(Protocol):
  """What the training loop needs from a sampler (a typing protocol).

  Any object with an int ``batch_size`` and a ``batch_indices(step)`` method
  returning [batch_size] int64 indices is a sampler: :class:`RandomSampler`,
  :class:`MPerClassSampler`, or your own class (register it with
  :func:`register_sampler`). ``batch_indices`` must be a pure function of the
  sampler's seed and ``step`` so that resumed and multi-host runs agree.

  Args:
    *args: unused: a protocol is never instantiated; implement its two
      members in a class of your own.
    **kwargs: unused (see ``*args``).

  Attributes:
    batch_size: B, the number of indices of every batch.

  Example:
    >>> s: Sampler = RandomSampler(num_examples=10, batch_size=4)
    >>> s.batch_size, s.batch_indices(3).shape
    (4, (4,))
  """

  batch_size: int

  def batch_indices(self, step: int) -> np.ndarray:
    """[batch_size] int64 indices of the batch of training step ``step`` (an int >= 0)."""


def _rng(seed: int, *stream: int) -> np.random.Generator:
  # SeedSequence mixes the whole tuple: (seed, stream, epoch/step) streams are
  # independent and reproducible.
  return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def _check_step(step) -> int:
  if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
    raise TypeError(f"`step` must be a Python int, got {type(step).__name__} {step!r}.")
  if step < 0:
    raise ValueError(f"`step` must be >= 0, got {step}.")
  return int(step)


def _check_seed(seed) -> int:
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
  return int(seed)


def _check_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] == 0:
    raise ValueError(f"`labels` must be a non-empty 1-D integer array, got shape {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"`labels` must be integers, got dtype {labels.dtype}.")
  return labels


class RandomSampler:
  """Uniform batches: the examples in a fresh random order every epoch.

  The stream of examples is the concatenation of one permutation of
  ``range(num_examples)`` per epoch; step ``s`` takes positions
  ``[s * B, (s + 1) * B)`` of that stream. Every example therefore appears
  exactly once in each window of ``num_examples`` consecutive positions;
  a batch that straddles two epochs (or a batch larger than the dataset) may
  repeat an example.

  Args:
    num_examples: N, the size of the source (positive int).
    batch_size: B (positive int).
    seed: non-negative int; default 0.

  Raises:
    ValueError: on a non-positive ``num_examples`` / ``batch_size`` or a
      negative ``seed``.

  Example:
    >>> s = RandomSampler(10, 4, seed=0)
    >>> b = s.batch_indices(0)
    >>> b.shape, b.dtype, bool((b == s.batch_indices(0)).all())
    ((4,), dtype('int64'), True)
    >>> sorted(s.batch_indices(0).tolist() + s.batch_indices(1).tolist()
    ...        + s.batch_indices(2).tolist()[:2]) == list(range(10))
    True
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int = 0):
    _checks.positive_int(num_examples, "num_examples")
    _checks.positive_int(batch_size, "batch_size")
    self.num_examples = int(num_examples)
    self.batch_size = int(batch_size)
    self.seed = _check_seed(seed)

  @property
  def steps_per_epoch(self) -> float:
    """Batches per pass over the data (``num_examples / batch_size``)."""
    return self.num_examples / self.batch_size

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The permutation of the examples used in ``epoch``."""
    return _rng(self.seed, 0, epoch).permutation(self.num_examples)

  def batch_indices(self, step: int) -> np.ndarray:
    step = _check_step(step)
    n, b = self.num_examples, self.batch_size
    start = step * b
    first, last = start // n, (start + b - 1) // n
    stream = np.concatenate([self.epoch_order(e) for e in range(first, last + 1)])
    offset = start - first * n
    return stream[offset:offset + b].astype(np.int64)


class MPerClassSampler:
  """P classes x m examples per batch ("PK" batches), classes cycled by epoch.

  Epoch ``e`` is a random permutation of the C classes cut into
  ``steps_per_epoch = ceil(C / P)`` consecutive groups of ``P = batch_size // m``
  classes; every class appears in exactly one batch of the epoch. When P does
  not divide C the last group is completed with the first classes of the same
  permutation (never one already in that group), so a few classes appear
  twice in that epoch. Within a batch, each class contributes ``m`` distinct
  examples drawn uniformly; a class with fewer than ``m`` examples is drawn
  with replacement. The batch is laid out class by class:
  ``[c_1 x m, c_2 x m, ..., c_P x m]``.

  Args:
    labels: [N] integer labels of the source.
    batch_size: B, a multiple of ``m``.
    m: examples per class in a batch.
    seed: non-negative int; default 0.

  Raises:
    ValueError: when ``batch_size % m != 0`` or there are fewer than
      ``batch_size // m`` classes.

  References:
    Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification", arXiv 1703.07737, 2017 (P x K batches).

  Example:
    >>> import numpy as np
    >>> s = MPerClassSampler(np.repeat(np.arange(5), 4), batch_size=6, m=2)
    >>> b = s.batch_indices(0)
    >>> np.bincount(np.repeat(np.arange(5), 4)[b], minlength=5).tolist().count(2)
    3
  """

  def __init__(self, labels, batch_size: int, m: int, seed: int = 0):
    labels = _check_labels(labels)
    _checks.positive_int(batch_size, "batch_size")
    _checks.positive_int(m, "m")
    if batch_size % m:
      raise ValueError(f"`batch_size` ({batch_size}) must be a multiple of `m` ({m}).")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    self.classes_per_batch = batch_size // m
    if len(classes) < self.classes_per_batch:
      raise ValueError(
          f"`labels` has {len(classes)} classes, fewer than batch_size // m = "
          f"{batch_size} // {m} = {self.classes_per_batch} classes per batch.")
    self.labels = labels
    self.batch_size = int(batch_size)
    self.m = int(m)
    self.seed = _check_seed(seed)
    self.classes = classes
    # Indices of the examples of class k: _order[_starts[k]:_starts[k] + _counts[k]].
    self._order = np.argsort(inverse.reshape(-1), kind="stable")
    self._counts = counts
    self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

  @property
  def num_classes(self) -> int:
    return int(len(self.classes))

  @property
  def steps_per_epoch(self) -> int:
    """``ceil(C / P)``: batches until every class has been drawn once."""
    return -(-self.num_classes // self.classes_per_batch)

  def epoch_classes(self, epoch: int) -> np.ndarray:
    """The class permutation (positions into ``self.classes``) of ``epoch``."""
    return _rng(self.seed, 1, epoch).permutation(self.num_classes)

  def batch_classes(self, step: int) -> np.ndarray:
    """[P] positions into ``self.classes`` of the classes of batch ``step``."""
    step = _check_step(step)
    epoch, j = divmod(step, self.steps_per_epoch)
    perm = self.epoch_classes(epoch)
    p = self.classes_per_batch
    group = perm[j * p:(j + 1) * p]
    if len(group) < p:  # last group of the epoch: complete from the start.
      group = np.concatenate([group, perm[:p - len(group)]])
    return group

  def batch_indices(self, step: int) -> np.ndarray:
    group = self.batch_classes(step)
    rng = _rng(self.seed, 2, step)
    out = np.empty((self.classes_per_batch, self.m), np.int64)
    for row, k in enumerate(group):
      members = self._order[self._starts[k]:self._starts[k] + self._counts[k]]
      out[row] = rng.choice(members, self.m, replace=len(members) < self.m)
    return out.reshape(-1)


_SAMPLERS: dict[str, Callable[..., Sampler]] = {}


def register_sampler(name: str, factory: Callable[..., Sampler]) -> None:
  """Makes ``build_sampler(name, labels, batch_size, seed, **kwargs)`` call
  ``factory(labels, batch_size, seed=seed, **kwargs)``.

  A later registration under the same name replaces the earlier one.

  Args:
    name: the sampler's name in :func:`build_sampler` and configs.
    factory: ``factory(labels [N], batch_size, seed=..., **kwargs)``
      returning a :class:`Sampler`.

  Returns:
    None.

  Example:
    >>> import numpy as np
    >>> register_sampler("every_other", lambda labels, batch_size, seed=0:
    ...                  RandomSampler(len(labels) // 2, batch_size, seed=seed))
    >>> build_sampler("every_other", np.arange(10), 3).num_examples
    5
    >>> del _SAMPLERS["every_other"]  # keep the registry as it was
  """
  _SAMPLERS[name] = factory


register_sampler("m_per_class", lambda labels, batch_size, seed=0, **kw:
                 MPerClassSampler(labels, batch_size, seed=seed, **kw))
register_sampler("random", lambda labels, batch_size, seed=0:
                 RandomSampler(len(_check_labels(labels)), batch_size, seed=seed))

# Modules of other samplers, imported on demand so that they can register.
_PLUGIN_MODULES = ("metric_jax.data.lifted_sampler", "metric_jax.data.magnet_sampler")


def _load_plugins() -> None:
  for module in _PLUGIN_MODULES:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name != module:
        raise


def sampler_names() -> tuple[str, ...]:
  """Names accepted by :func:`build_sampler`.

  Imports the optional sampler modules first, so that their samplers
  (e.g. ``"magnet"``, ``"lifted"``) are registered.

  Returns:
    tuple of str, the built-in :data:`SAMPLER_NAMES` first.

  Example:
    >>> sampler_names()[:2]
    ('m_per_class', 'random')
  """
  _load_plugins()
  return tuple(_SAMPLERS)


SAMPLER_NAMES: tuple[str, ...] = ("m_per_class", "random")
"""The samplers defined in this module (see :func:`sampler_names` for all)."""


def build_sampler(name: str, labels, batch_size: int, seed: int = 0, **kwargs) -> Sampler:
  """Builds a sampler by name.

  Args:
    name: ``"m_per_class"`` (needs ``m=``), ``"random"``, or a name
      registered with :func:`register_sampler` (see :func:`sampler_names`).
    labels: [N] integer labels of the training source.
    batch_size: B.
    seed: non-negative int; default 0.
    **kwargs: the sampler's own options (``m`` for ``"m_per_class"``).

  Returns:
    A :class:`Sampler`: ``batch_indices(step) -> [batch_size] int64``.

  Raises:
    ValueError: on an unknown ``name`` or ``"m_per_class"`` without ``m``.

  Example:
    >>> import numpy as np
    >>> s = build_sampler("m_per_class", np.repeat(np.arange(4), 3), 4, m=2)
    >>> s.batch_indices(7).shape
    (4,)
  """
  if name not in _SAMPLERS:
    _load_plugins()
  if name not in _SAMPLERS:
    raise ValueError(f"`name` must be one of {tuple(_SAMPLERS)}, got {name!r}.")
  if name == "m_per_class" and "m" not in kwargs:
    raise ValueError("The 'm_per_class' sampler needs `m` (examples per class).")
  return _SAMPLERS[name](labels, batch_size, seed=seed, **kwargs)
