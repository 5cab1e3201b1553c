"""Batch construction of the lifted structure paper (Oh Song et al. 2016):
a few random positive pairs, then their hard negative neighbours.

The sampler lives on the host. It keeps an exact k-nearest-neighbour index
of the training set over the latest embeddings (refreshed by the training
loop with :meth:`LiftedStructureSampler.update_embeddings`) and answers
``batch_indices(step)`` deterministically from ``(seed, step)`` and the
current index.

Example:
  >>> import numpy as np
  >>> from metric_jax.data.lifted_sampler import LiftedStructureSampler
  >>> labels = np.repeat(np.arange(10), 4)
  >>> sampler = LiftedStructureSampler(labels, batch_size=8, num_pairs=2, seed=0)
  >>> batch = sampler.batch_indices(0)
  >>> batch.shape, len(set(batch.tolist()))
  ((8,), 8)
  >>> sampler.update_embeddings(np.random.default_rng(0).normal(size=(40, 3)))
  >>> bool(np.array_equal(sampler.batch_indices(5), sampler.batch_indices(5)))
  True
"""

from __future__ import annotations

__all__ = ["LiftedStructureSampler", "knn_other_label"]

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import distances as distances_lib
from metric_jax.data import samplers


def knn_other_label(embeddings, labels, k: int, *, distance="euclidean",
                    chunk_size: int = 1024) -> np.ndarray:
  """Exact k nearest neighbours of every row among the rows of *other* labels.

  Computed with :func:`metric_jax.distances.pairwise` over chunks of query
  rows (one compilation: the last chunk is padded), so memory is
  ``chunk_size x N`` floats.

  Args:
    embeddings: [N, D] float array.
    labels: [N] integer labels.
    k: neighbours per row.
    distance: metric name or callable (similarities: most similar first).
    chunk_size: query rows per chunk.

  Returns:
    [N, k] int64 indices, nearest first (ties: lower index first); -1 where
    a row has fewer than k other-label samples.

  Example:
    >>> import numpy as np
    >>> from metric_jax.data.lifted_sampler import knn_other_label
    >>> emb = np.array([[0.], [1.], [5.], [6.]])
    >>> knn_other_label(emb, np.array([0, 0, 1, 1]), 3).tolist()
    [[2, 3, -1], [2, 3, -1], [1, 0, -1], [1, 0, -1]]
  """
  x = np.asarray(embeddings, np.float32)
  lab = np.asarray(labels)
  n = x.shape[0]
  k_eff = min(k, n)
  is_sim = distances_lib.is_similarity(distance)
  xs = jnp.asarray(x)
  ls = jnp.asarray(lab)

  @jax.jit
  def chunk_knn(q, q_lab, xs, ls):
    mat = distances_lib.pairwise(q, xs, distance)
    dist = -mat if is_sim else mat
    other = q_lab[:, None] != ls[None, :]
    # top_k is stable (ties: lower index first) on the negated distances.
    neg_d = jnp.where(other, -dist, -jnp.inf)
    vals, idx = jax.lax.top_k(neg_d, k_eff)
    return jnp.where(jnp.isfinite(vals), idx, -1)

  out = np.full((n, k), -1, np.int64)
  for start in range(0, n, chunk_size):
    stop = min(start + chunk_size, n)
    q = np.zeros((chunk_size, x.shape[1]), np.float32)
    q_lab = np.zeros((chunk_size,), lab.dtype)
    q[: stop - start] = x[start:stop]
    q_lab[: stop - start] = lab[start:stop]
    out[start:stop, :k_eff] = np.asarray(chunk_knn(jnp.asarray(q), jnp.asarray(q_lab), xs, ls))[: stop - start]
  return out


class LiftedStructureSampler:
  """Random positive pairs plus their hard negative neighbours.

  Each batch of ``batch_size`` distinct indices holds ``num_pairs`` positive
  pairs (two samples of one class, from ``num_pairs`` distinct classes
  drawn at random) followed by ``batch_size - 2 * num_pairs`` negatives:
  the nearest other-class neighbours of the pair members in the latest
  embeddings (taken round-robin: every member's nearest, then every
  member's second nearest, ..., members in random order). Before the first
  :meth:`update_embeddings`, or when the neighbour lists run out, the
  negatives are random samples, preferably of classes not among the pairs.

  ``batch_indices(step)`` depends only on ``(seed, step)`` and the current
  index, so a restarted run with the same embeddings reproduces its batches.

  Args:
    labels: [N] integer labels of the training set.
    batch_size: fixed batch size B (>= 2).
    num_pairs: positive pairs per batch, ``1 <= num_pairs <= B // 2``
      (default ``B // 4``, at least 1).
    num_neighbors: neighbours kept per sample in the index (default
      ``max(8, ceil((B - 2 num_pairs) / (2 num_pairs)) + 4)``).
    seed: integer seed.
    distance: metric of the neighbour search.
    chunk_size: query rows per chunk of the neighbour search.

  Raises:
    ValueError: for impossible configurations (naming the argument).

  References:
    Oh Song, Xiang, Jegelka, Savarese, CVPR 2016, arXiv 1511.06452, sec. 4.

  Example:
    Only class 0 has two samples, so every batch pairs samples 0 and 1 and
    fills the other slots with their nearest other-class neighbours:

    >>> import numpy as np
    >>> from metric_jax.data.lifted_sampler import LiftedStructureSampler
    >>> labels = np.array([0, 0, 1, 2, 3])
    >>> sampler = LiftedStructureSampler(labels, batch_size=4, num_pairs=1, seed=0)
    >>> sampler.has_index, sampler.batch_indices(0).shape
    (False, (4,))
    >>> sampler.update_embeddings(np.array([[0.], [1.], [1.5], [5.], [9.]]))
    >>> batch = sampler.batch_indices(3)
    >>> sorted(batch[:2].tolist()), batch[2:].tolist()
    ([0, 1], [2, 3])
  """

  def __init__(self, labels, batch_size: int, *, num_pairs: int | None = None,
               num_neighbors: int | None = None, seed: int = 0,
               distance="euclidean", chunk_size: int = 1024):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
          f"`labels` must be a 1-D integer array, got shape {labels.shape} and "
          f"dtype {labels.dtype}.")
    n = labels.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
      raise ValueError(f"`batch_size` must be an int >= 2, got {batch_size!r}.")
    if batch_size > n:
      raise ValueError(
          f"`batch_size` ({batch_size}) exceeds the number of samples in `labels` ({n}).")
    if num_pairs is None:
      num_pairs = max(1, batch_size // 4)
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)) \
        or num_pairs < 1 or 2 * num_pairs > batch_size:
      raise ValueError(
          f"`num_pairs` must be an int in [1, batch_size // 2 = {batch_size // 2}], "
          f"got {num_pairs!r}.")
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= 2]
    if len(eligible) < num_pairs:
      raise ValueError(
          f"`num_pairs`={num_pairs} needs as many classes with >= 2 samples, but "
          f"`labels` has {len(eligible)}.")
    if 2 * num_pairs < batch_size and len(classes) < 2:
      raise ValueError(
          "`labels` has a single class, so there are no negatives for the "
          f"{batch_size - 2 * num_pairs} negative slots of a batch.")
    num_neg = batch_size - 2 * num_pairs
    if num_neighbors is None:
      num_neighbors = max(8, -(-num_neg // (2 * num_pairs)) + 4)
    if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, (int, np.integer)) \
        or num_neighbors < 1:
      raise ValueError(f"`num_neighbors` must be an int >= 1, got {num_neighbors!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
      raise ValueError(f"`chunk_size` must be an int >= 1, got {chunk_size!r}.")
    distances_lib.is_similarity(distance)  # validates the metric

    self.labels = labels
    self.batch_size = int(batch_size)
    self.num_pairs = int(num_pairs)
    self.num_neighbors = int(num_neighbors)
    self.seed = int(seed)
    self.distance = distance
    self.chunk_size = int(chunk_size)
    self._eligible = eligible
    self._members = {int(c): np.flatnonzero(labels == c) for c in eligible}
    self._neighbors: np.ndarray | None = None

  @property
  def has_index(self) -> bool:
    """Whether :meth:`update_embeddings` has been called."""
    return self._neighbors is not None

  def update_embeddings(self, embeddings) -> None:
    """Rebuilds the neighbour index from the latest [N, D] embeddings of the
    whole training set (row i is sample i of ``labels``)."""
    emb = np.asarray(embeddings)
    n = self.labels.shape[0]
    if emb.ndim != 2 or emb.shape[0] != n:
      raise ValueError(
          f"`embeddings` must have shape [{n}, D] (one row per label), got {emb.shape}.")
    if not np.issubdtype(emb.dtype, np.floating):
      raise ValueError(f"`embeddings` must be floating point, got dtype {emb.dtype}.")
    if not np.all(np.isfinite(emb)):
      raise ValueError("`embeddings` contains NaN or inf; the neighbour index needs finite values.")
    self._neighbors = knn_other_label(emb, self.labels, self.num_neighbors,
                                      distance=self.distance,
                                      chunk_size=self.chunk_size)

  def _random_negatives(self, rng, chosen: np.ndarray, pair_classes, count: int):
    taken = np.zeros(self.labels.shape[0], bool)
    taken[chosen] = True
    preferred = np.flatnonzero(~taken & ~np.isin(self.labels, pair_classes))
    rest = np.flatnonzero(~taken & np.isin(self.labels, pair_classes))
    pick = rng.permutation(preferred)[:count]
    if len(pick) < count:
      pick = np.concatenate([pick, rng.permutation(rest)[: count - len(pick)]])
    return pick

  def batch_indices(self, step: int) -> np.ndarray:
    """Indices of the batch for ``step``: [batch_size] int64, all distinct.

    The first ``2 * num_pairs`` entries are the pairs (two consecutive
    entries per pair), the rest the negatives.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"`step` must be an int >= 0, got {step!r}.")
    rng = np.random.default_rng((self.seed, int(step)))
    pair_classes = rng.choice(self._eligible, size=self.num_pairs, replace=False)
    members = np.concatenate(
        [rng.choice(self._members[int(c)], size=2, replace=False) for c in pair_classes])
    num_neg = self.batch_size - members.size
    chosen = list(members.tolist())
    in_batch = set(chosen)
    if self._neighbors is not None and num_neg > 0:
      order = rng.permutation(members)
      for rank in range(self._neighbors.shape[1]):
        for s in order:
          cand = int(self._neighbors[s, rank])
          if cand >= 0 and cand not in in_batch:
            chosen.append(cand)
            in_batch.add(cand)
            if len(chosen) == self.batch_size:
              break
        if len(chosen) == self.batch_size:
          break
    missing = self.batch_size - len(chosen)
    if missing > 0:
      extra = self._random_negatives(rng, np.asarray(chosen), pair_classes, missing)
      chosen.extend(extra.tolist())
    return np.asarray(chosen, np.int64)


samplers.register_sampler(
    "lifted", lambda labels, batch_size, seed=0, **kwargs:
    LiftedStructureSampler(labels, batch_size, seed=seed, **kwargs))
