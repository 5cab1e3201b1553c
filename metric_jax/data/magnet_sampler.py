"""Neighbourhood sampler of the magnet loss (Rippel et al., ICLR 2016,
arXiv 1511.05939, section 3.2).

A batch is M clusters x D examples:

1. a seed cluster drawn with probability proportional to its running mean
   loss (``MagnetIndex.cluster_loss``; uniform when every loss is 0);
2. the M - 1 clusters of other classes ("impostors") whose centres are
   nearest to the seed's centre;
3. D examples drawn uniformly from each of the M clusters, without
   replacement, or with replacement when a cluster has fewer than D members.

Empty clusters (``cluster_sizes == 0``) are never drawn. The batch of step
``s`` is a pure function of ``(seed, s, index)``: after :meth:`update_index`
the same step gives the batch of the new index.
"""

from __future__ import annotations

import numpy as np

from metric_jax import _checks
from metric_jax.data import samplers

__all__ = ["MagnetSampler"]


class MagnetSampler:
  """Loss-driven neighbourhood batches for :func:`metric_jax.losses.magnet_loss`.

  Args:
    index: a :class:`metric_jax.magnet_index.MagnetIndex`.
    clusters_per_batch: M >= 2 (the seed and its M - 1 impostors).
    examples_per_cluster: D >= 2 (the batch variance needs D >= 2).
    seed: non-negative int.

  Attributes:
    batch_size: M * D.

  Example:
    >>> import jax, numpy as np
    >>> from metric_jax import magnet_index as mi
    >>> x = np.arange(12, dtype=np.float32)[:, None]
    >>> idx = mi.build_index(x, np.repeat([0, 1, 2], 4), clusters_per_class=1, key=jax.random.key(0))
    >>> s = MagnetSampler(idx, 2, 3, seed=0)
    >>> ids, cids = s.batch(0)
    >>> ids.shape, bool((idx.assignments[ids] == cids).all())
    ((6,), True)
  """

  def __init__(self, index, clusters_per_batch: int, examples_per_cluster: int, seed: int = 0):
    _checks.positive_int(clusters_per_batch, "clusters_per_batch", minimum=2)
    _checks.positive_int(examples_per_cluster, "examples_per_cluster", minimum=2)
    self.seed = samplers._check_seed(seed)  # pylint: disable=protected-access
    self.clusters_per_batch = int(clusters_per_batch)
    self.examples_per_cluster = int(examples_per_cluster)
    self.batch_size = self.clusters_per_batch * self.examples_per_cluster
    self.update_index(index)

  def update_index(self, index) -> None:
    """Uses a new index (after :func:`refresh` / :func:`update_losses`)."""
    sizes = np.asarray(index.cluster_sizes)
    classes = np.asarray(index.center_classes)
    usable = sizes > 0
    m = self.clusters_per_batch
    for c in np.unique(classes[usable]):
      n_other = int(np.sum(usable & (classes != c)))
      if n_other < m - 1:
        raise ValueError(
            f"`clusters_per_batch` must be <= 1 + the number of non-empty clusters of "
            f"other classes ({n_other + 1} for class {c}), got {m}.")
    self.index = index
    order = np.argsort(index.assignments, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    self._members = [order[bounds[k]:bounds[k + 1]] for k in range(len(sizes))]
    self._usable = usable
    centers = np.asarray(index.centers, np.float64)
    d = np.sum((centers[:, None, :] - centers[None, :, :]) ** 2, axis=-1)
    d = np.where(usable[None, :] & (classes[None, :] != classes[:, None]), d, np.inf)
    # Impostors of each cluster, nearest first (ties by id).
    self._impostors = np.argsort(d, axis=1, kind="stable")[:, :m - 1]

  def seed_probabilities(self) -> np.ndarray:
    """[C*K] probability of each cluster being the seed."""
    loss = np.where(self._usable, np.maximum(np.asarray(self.index.cluster_loss, np.float64), 0),
                    0.0)
    if loss.sum() <= 0:
      loss = self._usable.astype(np.float64)
    return loss / loss.sum()

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices [M*D] int64, cluster_ids [M*D] int32)`` of step ``step``."""
    step = samplers._check_step(step)  # pylint: disable=protected-access
    rng = samplers._rng(self.seed, 1, step)  # pylint: disable=protected-access
    p = self.seed_probabilities()
    first = int(rng.choice(len(p), p=p))
    clusters = np.concatenate([[first], self._impostors[first]]).astype(np.int32)
    d = self.examples_per_cluster
    ids = []
    for k in clusters:
      members = self._members[k]
      ids.append(rng.choice(members, d, replace=len(members) < d))
    return np.concatenate(ids).astype(np.int64), np.repeat(clusters, d)

  def batch_indices(self, step: int) -> np.ndarray:
    """[M*D] int64 indices of step ``step`` (the sampler protocol)."""
    return self.batch(step)[0]

  def batch_cluster_ids(self, step: int) -> np.ndarray:
    """[M*D] int32 global cluster ids of step ``step``."""
    return self.batch(step)[1]


def _factory(labels, batch_size, seed=0, *, index, clusters_per_batch: int,
             examples_per_cluster: int | None = None):
  del labels
  if examples_per_cluster is None:
    examples_per_cluster = batch_size // clusters_per_batch
  if clusters_per_batch * examples_per_cluster != batch_size:
    raise ValueError(
        f"`batch_size` must equal clusters_per_batch * examples_per_cluster "
        f"({clusters_per_batch} * {examples_per_cluster}), got {batch_size}.")
  return MagnetSampler(index, clusters_per_batch, examples_per_cluster, seed=seed)


samplers.register_sampler("magnet", _factory)
