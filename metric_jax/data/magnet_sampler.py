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

Training-loop hooks (``metric_jax.training.loop``): the sampler can start
without an index (``labels`` and ``clusters_per_class`` instead) and builds
it on the first :meth:`update_embeddings` (k-means++ on the embeddings of
the whole training set), refreshing it (warm-started k-means) on later
calls; :meth:`batch_extras` gives the batch's ``cluster_ids`` for the loss;
:meth:`update_from_step` folds the per-example losses and the batch variance
of a train step into the index; :meth:`state_dict` /
:meth:`load_state_dict` save and restore the index next to a checkpoint.
"""

from __future__ import annotations

import jax
import numpy as np

from metric_jax import _checks
from metric_jax import magnet_index as mi
from metric_jax.data import samplers

__all__ = ["MagnetSampler"]


class MagnetSampler:
  """Loss-driven neighbourhood batches for :func:`metric_jax.losses.magnet_loss`.

  Args:
    index: a :class:`metric_jax.magnet_index.MagnetIndex`, or None to build
      it on the first :meth:`update_embeddings` (then ``labels`` and
      ``clusters_per_class`` are required).
    clusters_per_batch: M >= 2 (the seed and its M - 1 impostors).
    examples_per_cluster: D >= 2 (the batch variance needs D >= 2).
    seed: non-negative int.
    labels: [N] training labels (only with ``index=None``).
    clusters_per_class: K >= 1 (only with ``index=None``).
    kmeans_iters: Lloyd iterations of every build / refresh (default 20).
    variance_momentum: None (default) for the mean of all batch variances,
      else an exponential average (:func:`metric_jax.magnet_index.update_variance`).

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

  def __init__(self, index, clusters_per_batch: int, examples_per_cluster: int, seed: int = 0,
               *, labels=None, clusters_per_class: int | None = None, kmeans_iters: int = 20,
               variance_momentum: float | None = None):
    _checks.positive_int(clusters_per_batch, "clusters_per_batch", minimum=2)
    _checks.positive_int(examples_per_cluster, "examples_per_cluster", minimum=2)
    _checks.positive_int(kmeans_iters, "kmeans_iters", minimum=0)
    if variance_momentum is not None and not 0.0 <= float(variance_momentum) < 1.0:
      raise ValueError(f"`variance_momentum` must be None or in [0, 1), got {variance_momentum!r}.")
    self.seed = samplers._check_seed(seed)  # pylint: disable=protected-access
    self.clusters_per_batch = int(clusters_per_batch)
    self.examples_per_cluster = int(examples_per_cluster)
    self.batch_size = self.clusters_per_batch * self.examples_per_cluster
    self.kmeans_iters = int(kmeans_iters)
    self.variance_momentum = variance_momentum
    self.index = None
    if index is None:
      if labels is None or clusters_per_class is None:
        raise ValueError("`labels` and `clusters_per_class` are required when `index` is None.")
      self._labels = samplers._check_labels(labels)  # pylint: disable=protected-access
      _checks.positive_int(clusters_per_class, "clusters_per_class")
      self.clusters_per_class = int(clusters_per_class)
    else:
      self._labels = np.asarray(index.labels)
      self.clusters_per_class = int(index.clusters_per_class)
      self.update_index(index)

  @property
  def num_clusters(self) -> int:
    """Width of the global cluster ids: ``(max label + 1) * K`` (an upper
    bound on every id of the index, for ``magnet_loss(num_clusters=)``)."""
    return (int(np.max(self._labels)) + 1) * self.clusters_per_class

  @property
  def has_index(self) -> bool:
    """Whether an index exists (given, or built by :meth:`update_embeddings`)."""
    return self.index is not None

  def _require_index(self) -> None:
    if self.index is None:
      raise RuntimeError(
          "MagnetSampler has no cluster index yet: call update_embeddings(embeddings of the "
          "whole training set) first (the training loop does so with "
          "config.sampler.refresh_every > 0).")

  def update_embeddings(self, embeddings, step: int = 0) -> None:
    """Builds (first call) or refreshes the index from embeddings of the
    whole training set ([N, E], in the order of ``labels``). The k-means
    key is ``fold_in(key(seed), step)``, so a refresh at a given step is
    reproducible."""
    key = jax.random.fold_in(jax.random.key(self.seed), samplers._check_step(step))  # pylint: disable=protected-access
    embeddings = np.asarray(embeddings, np.float32)
    if self.index is None:
      if embeddings.ndim != 2 or embeddings.shape[0] != len(self._labels):
        raise ValueError(
            f"`embeddings` must have shape ({len(self._labels)}, E) (one row per training "
            f"example), got {embeddings.shape}.")
      index = mi.build_index(embeddings, self._labels, clusters_per_class=self.clusters_per_class,
                             key=key, num_iters=self.kmeans_iters)
    else:
      index = mi.refresh(self.index, embeddings, key, num_iters=self.kmeans_iters)
    self.update_index(index)

  def batch_extras(self, step: int) -> dict[str, np.ndarray]:
    """``{"cluster_ids": [M*D] int32}`` of step ``step`` (keyword arguments
    of the loss)."""
    return {"cluster_ids": self.batch_cluster_ids(step)}

  def update_from_step(self, cluster_ids, losses, variance=None) -> None:
    """Folds one train step's per-example losses (``[M*D]``, e.g.
    ``magnet_loss(..., reduction="none")``) into the running cluster losses
    and, when given, the batch ``sigma^2`` into the running variance."""
    self._require_index()
    index = mi.update_losses(self.index, cluster_ids, losses)
    if variance is not None:
      index = mi.update_variance(index, variance, momentum=self.variance_momentum)
    self.index = index   # same centres and members: the neighbourhoods are unchanged

  def state_dict(self) -> dict[str, np.ndarray]:
    """The index as a dict of NumPy arrays (for ``np.savez``)."""
    self._require_index()
    return {name: np.asarray(value) for name, value in self.index._asdict().items()}

  def load_state_dict(self, state) -> None:
    """Restores an index saved with :meth:`state_dict` (same training labels)."""
    fields = mi.MagnetIndex._fields
    missing = [f for f in fields if f not in state]
    if missing:
      raise ValueError(f"`state` lacks the index fields {missing}.")
    values = {f: np.asarray(state[f]) for f in fields}
    if not np.array_equal(values["labels"], self._labels):
      raise ValueError("`state` was saved for other training labels than this sampler's.")
    values["variance"] = float(values["variance"])
    values["variance_count"] = int(values["variance_count"])
    values["clusters_per_class"] = int(values["clusters_per_class"])
    self.update_index(mi.MagnetIndex(**values))

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
    sq = np.sum(centers * centers, axis=-1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * centers @ centers.T, 0.0)
    d = np.where(usable[None, :] & (classes[None, :] != classes[:, None]), d, np.inf)
    # Impostors of each cluster, nearest first (ties by id).
    self._impostors = np.argsort(d, axis=1, kind="stable")[:, :m - 1]

  def seed_probabilities(self) -> np.ndarray:
    """[C*K] probability of each cluster being the seed."""
    self._require_index()
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


def _factory(labels, batch_size, seed=0, *, clusters_per_batch: int, index=None,
             examples_per_cluster: int | None = None, clusters_per_class: int | None = None,
             kmeans_iters: int = 20, variance_momentum: float | None = None):
  _checks.positive_int(clusters_per_batch, "clusters_per_batch", minimum=2)
  if examples_per_cluster is None:
    examples_per_cluster = batch_size // clusters_per_batch
  if clusters_per_batch * examples_per_cluster != batch_size:
    raise ValueError(
        f"`batch_size` must equal clusters_per_batch * examples_per_cluster "
        f"({clusters_per_batch} * {examples_per_cluster}), got {batch_size}.")
  if index is None and clusters_per_class is None:
    raise ValueError("The 'magnet' sampler needs `index` or `clusters_per_class` (K).")
  return MagnetSampler(index, clusters_per_batch, examples_per_cluster, seed=seed,
                       labels=None if index is not None else labels,
                       clusters_per_class=clusters_per_class, kmeans_iters=kmeans_iters,
                       variance_momentum=variance_momentum)


samplers.register_sampler("magnet", _factory)
