"""Cluster index of the magnet loss (Rippel et al., ICLR 2016, arXiv 1511.05939).

Host-side state, updated functionally (every update returns a new
:class:`MagnetIndex`):

* :func:`build_index`: K clusters per class by k-means (k-means++ seeding,
  Lloyd iterations; :func:`metric_jax.clustering.kmeans` vmapped over the
  classes, padded to the largest class with ``where`` masks).
* :func:`refresh`: the same on new embeddings, warm-started from the
  previous centres (cluster ids keep their meaning, so the running losses
  are kept).
* :func:`update_losses`: running mean of the per-example losses of each
  cluster (the seed distribution of the neighbourhood sampler).
* :func:`update_variance`: running average of the batch ``sigma^2``.
* :func:`nearest_cluster_predict`: soft nearest-cluster classification over
  the L nearest centres (eq. 6).
* :func:`nearest_cluster_accuracy`: eq. 6 accuracy on a labelled set
  (classes unseen in training: a per-class index from one half of each
  class, the other half classified).

Global cluster id of local cluster ``k`` of the ``c``-th class (classes in
increasing label order) is ``c * K + k``.

Classes with fewer than K examples: k-means then returns duplicated centres
(never NaN); the duplicates get no members (``cluster_sizes == 0``), the
sampler never draws them and prediction ignores them.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import clustering
from metric_jax import distances

__all__ = ["MagnetIndex", "build_index", "refresh", "update_losses", "update_variance",
           "nearest_cluster_predict", "nearest_cluster_accuracy"]


class MagnetIndex(NamedTuple):
  """Per-class k-means clusters of the training set (NumPy arrays).

  Attributes:
    centers: [C*K, D] float32 k-means centres.
    center_classes: [C*K] int label of each cluster.
    assignments: [N] int32 global cluster id of each training example.
    cluster_loss: [C*K] float32 running mean loss of each cluster (1.0
      before any update).
    cluster_loss_count: [C*K] number of losses averaged so far.
    cluster_sizes: [C*K] number of training examples in each cluster.
    labels: [N] the training labels.
    variance: running average of the batch sigma^2 (1.0 before any update).
    variance_count: number of batch variances averaged so far.
    clusters_per_class: K.

  Built by :func:`build_index`; never mutated (updates return a new index
  through ``_replace``).

  Example:
    >>> import jax, numpy as np
    >>> x = np.array([[0.], [1.], [5.], [6.]], np.float32)
    >>> idx = build_index(x, np.array([0, 0, 1, 1]), clusters_per_class=1, key=jax.random.key(0))
    >>> idx.center_classes.tolist(), idx.assignments.tolist(), idx.variance
    ([0, 1], [0, 0, 1, 1], 1.0)
  """
  centers: np.ndarray
  center_classes: np.ndarray
  assignments: np.ndarray
  cluster_loss: np.ndarray
  cluster_loss_count: np.ndarray
  cluster_sizes: np.ndarray
  labels: np.ndarray
  variance: float
  variance_count: int
  clusters_per_class: int


@functools.partial(jax.jit, static_argnames=("k", "num_iters"))
def _per_class_kmeans(x, valid, keys, init, *, k, num_iters):
  def one(xc, wc, kc, ic):
    return clustering.kmeans(xc, k, key=kc, where=wc, num_iters=num_iters, init_centers=ic)
  if init is None:
    return jax.vmap(lambda a, b, c: one(a, b, c, None))(x, valid, keys)
  return jax.vmap(one)(x, valid, keys, init)


def _cluster(embeddings, labels, k, key, init, num_iters):
  classes, inverse = np.unique(labels, return_inverse=True)
  c = len(classes)
  counts = np.bincount(inverse, minlength=c)
  nmax = int(counts.max())
  dim = embeddings.shape[1]
  padded = np.zeros((c, nmax, dim), np.float32)
  valid = np.zeros((c, nmax), bool)
  pos = np.zeros((c, nmax), np.int64)
  for ci in range(c):
    members = np.flatnonzero(inverse == ci)
    padded[ci, :len(members)] = embeddings[members]
    valid[ci, :len(members)] = True
    pos[ci, :len(members)] = members
  keys = jax.random.split(key, c)
  res = _per_class_kmeans(jnp.asarray(padded), jnp.asarray(valid), keys,
                          None if init is None else jnp.asarray(init, jnp.float32),
                          k=k, num_iters=num_iters)
  local = np.asarray(res.assignments)
  assignments = np.zeros(len(labels), np.int32)
  for ci in range(c):
    n = counts[ci]
    assignments[pos[ci, :n]] = ci * k + local[ci, :n]
  centers = np.asarray(res.centers, np.float32).reshape(c * k, dim)
  sizes = np.bincount(assignments, minlength=c * k)
  return classes, centers, assignments, sizes


def _check_inputs(embeddings, labels):
  _checks.embeddings(embeddings, "embeddings")
  _checks.labels(labels, np.shape(embeddings)[0], "labels")


def build_index(embeddings, labels, *, clusters_per_class: int, key: jax.Array,
                num_iters: int = 20) -> MagnetIndex:
  """Clusters each class into K clusters by k-means.

  Args:
    embeddings: [N, D] float embeddings of the whole training set.
    labels: [N] integer labels.
    clusters_per_class: K >= 1 (classes with fewer than K examples get
      empty duplicate clusters, see the module docstring).
    key: PRNG key; same key, same index.
    num_iters: Lloyd iterations (20 as sklearn ``max_iter`` in the public
      ports).

  Returns:
    A :class:`MagnetIndex`.

  Example:
    >>> import jax, numpy as np
    >>> x = np.array([[0.], [0.1], [5.], [5.1], [1.], [1.1], [9.], [9.1]], np.float32)
    >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> idx = build_index(x, y, clusters_per_class=2, key=jax.random.key(0))
    >>> idx.centers.shape, idx.cluster_sizes.tolist()
    ((4, 1), [2, 2, 2, 2])
  """
  embeddings = np.asarray(embeddings, np.float32)
  labels = np.asarray(labels)
  _check_inputs(embeddings, labels)
  _checks.positive_int(clusters_per_class, "clusters_per_class")
  _checks.positive_int(num_iters, "num_iters", minimum=0)
  k = int(clusters_per_class)
  classes, centers, assignments, sizes = _cluster(embeddings, labels, k, key, None, num_iters)
  m = len(classes) * k
  return MagnetIndex(
      centers=centers, center_classes=np.repeat(classes, k), assignments=assignments,
      cluster_loss=np.ones(m, np.float32), cluster_loss_count=np.zeros(m, np.int64),
      cluster_sizes=sizes, labels=labels, variance=1.0, variance_count=0,
      clusters_per_class=k)


def refresh(index: MagnetIndex, embeddings, key: jax.Array, *,
            num_iters: int = 20) -> MagnetIndex:
  """Re-clusters new embeddings of the same training set, warm-started from
  ``index.centers``; running losses and variance are kept.

  Args:
    index: the current :class:`MagnetIndex`.
    embeddings: [N, D] float new embeddings of the same N training examples,
      in the same order (D must match ``index.centers``).
    key: PRNG key of the k-means (same key, same result).
    num_iters: Lloyd iterations (default 20).

  Returns:
    The refreshed :class:`MagnetIndex` (new ``centers``, ``assignments``
    and ``cluster_sizes``; everything else unchanged).

  Raises:
    ValueError: if D differs from the index's embedding size.

  Example:
    >>> import jax, numpy as np
    >>> x = np.array([[0.], [1.], [5.], [6.]], np.float32)
    >>> idx = build_index(x, np.array([0, 0, 1, 1]), clusters_per_class=1, key=jax.random.key(0))
    >>> idx = update_losses(idx, np.array([0]), np.array([3.]))
    >>> new = refresh(idx, x + 10, jax.random.key(1))
    >>> new.centers.ravel().tolist(), new.cluster_loss.tolist()
    ([10.5, 15.5], [3.0, 1.0])
  """
  embeddings = np.asarray(embeddings, np.float32)
  _check_inputs(embeddings, index.labels)
  if embeddings.shape[1] != index.centers.shape[1]:
    raise ValueError(
        f"`embeddings` must have the embedding size of the index "
        f"({index.centers.shape[1]}), got {embeddings.shape[1]}.")
  k = index.clusters_per_class
  init = index.centers.reshape(-1, k, index.centers.shape[1])
  _, centers, assignments, sizes = _cluster(embeddings, index.labels, k, key, init, num_iters)
  return index._replace(centers=centers, assignments=assignments, cluster_sizes=sizes)


def update_losses(index: MagnetIndex, cluster_ids, losses) -> MagnetIndex:
  """Folds per-example losses into each cluster's running mean.

  Args:
    index: the current index.
    cluster_ids: [B] global cluster ids of the batch examples.
    losses: [B] their losses (``magnet_loss(..., reduction="none")``).

  Returns:
    The index with updated ``cluster_loss`` / ``cluster_loss_count``.

  Example:
    >>> import jax, numpy as np
    >>> x = np.array([[0.], [1.], [5.], [6.]], np.float32)
    >>> idx = build_index(x, np.array([0, 0, 1, 1]), clusters_per_class=1, key=jax.random.key(0))
    >>> update_losses(idx, np.array([0, 0, 1]), np.array([1., 3., 0.5])).cluster_loss.tolist()
    [2.0, 0.5]
  """
  cluster_ids = np.asarray(cluster_ids)
  losses = np.asarray(losses, np.float64)
  m = len(index.cluster_loss)
  if cluster_ids.shape != losses.shape or cluster_ids.ndim != 1:
    raise ValueError(
        f"`cluster_ids` and `losses` must be 1-D of one length, got shapes "
        f"{cluster_ids.shape} and {losses.shape}.")
  if cluster_ids.size and (cluster_ids.min() < 0 or cluster_ids.max() >= m):
    raise ValueError(f"`cluster_ids` must lie in [0, {m}), got {cluster_ids.tolist()[:5]}...")
  add_sum = np.bincount(cluster_ids, weights=losses, minlength=m)
  add_n = np.bincount(cluster_ids, minlength=m)
  count = index.cluster_loss_count + add_n
  old_sum = index.cluster_loss.astype(np.float64) * index.cluster_loss_count
  new = np.where(count > 0, (old_sum + add_sum) / np.maximum(count, 1), index.cluster_loss)
  return index._replace(cluster_loss=new.astype(np.float32), cluster_loss_count=count)


def update_variance(index: MagnetIndex, variance, *, momentum: float | None = None) -> MagnetIndex:
  """Running average of the batch variance (used by the prediction).

  The first update replaces the initial 1.0; later ones average.

  Args:
    index: the current :class:`MagnetIndex`.
    variance: scalar batch sigma^2 (``magnet_loss(..., return_variance=True)``).
    momentum: None (default) for the mean of all batches so far, else an
      exponential average ``momentum * old + (1 - momentum) * new``.

  Returns:
    The index with updated ``variance`` and ``variance_count``.

  Example:
    >>> import jax, numpy as np
    >>> x = np.array([[0.], [1.], [5.], [6.]], np.float32)
    >>> idx = build_index(x, np.array([0, 0, 1, 1]), clusters_per_class=1, key=jax.random.key(0))
    >>> idx = update_variance(update_variance(idx, 2.0), 4.0)
    >>> idx.variance, idx.variance_count
    (3.0, 2)
    >>> update_variance(idx, 1.0, momentum=0.5).variance
    2.0
  """
  v = float(variance)
  n = index.variance_count
  if n == 0:
    new = v
  elif momentum is None:
    new = index.variance + (v - index.variance) / (n + 1)
  else:
    new = momentum * index.variance + (1.0 - momentum) * v
  return index._replace(variance=float(new), variance_count=n + 1)


@functools.partial(jax.jit, static_argnames=("L", "num_classes"))
def _predict(query, centers, class_idx, usable, variance, *, L, num_classes):
  q = query.astype(jnp.float32)
  # Gram form: O(Q M) memory (not O(Q M D)), clamped at 0.
  d = distances.pairwise(q, centers, "squared_euclidean")            # [Q, M]
  big = jnp.finfo(jnp.float32).max
  d = jnp.where(usable[None, :], d, big)
  neg_top, top = jax.lax.top_k(-d, L)                                 # [Q, L]
  ok = usable[top]
  logits = jnp.where(ok, neg_top / (2.0 * variance), -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(class_idx[top], num_classes)               # [Q, L, C]
  scores = jnp.einsum("ql,qlc->qc", w, onehot)
  return jnp.argmax(scores, axis=-1)


def nearest_cluster_predict(index: MagnetIndex, query, *, L: int = 8,
                            variance: float | None = None) -> np.ndarray:
  r"""Soft nearest-cluster classification (eq. 6)::

    c* = argmax_c sum_{mu in N_L(r), C(mu) = c} exp(-||r - mu||^2 / (2 sigma^2))

  over the L nearest non-empty centres ``N_L(r)`` (the normalisation of
  eq. 6 does not change the argmax).

  Args:
    index: a :class:`MagnetIndex`.
    query: [Q, D] float embeddings.
    L: number of nearest centres (capped at the number of clusters).
    variance: sigma^2; default ``index.variance`` (running average).

  Returns:
    [Q] predicted labels (NumPy).

  Example:
    >>> import jax, numpy as np
    >>> x = np.array([[0.], [1.], [5.], [6.]], np.float32)
    >>> idx = build_index(x, np.array([3, 3, 7, 7]), clusters_per_class=1, key=jax.random.key(0))
    >>> nearest_cluster_predict(idx, np.array([[0.2], [5.9]], np.float32), L=2).tolist()
    [3, 7]
  """
  query = np.asarray(query)
  _checks.embeddings(query, "query")
  _checks.positive_int(L, "L")
  if query.shape[1] != index.centers.shape[1]:
    raise ValueError(
        f"`query` must have the embedding size of the index ({index.centers.shape[1]}), "
        f"got {query.shape[1]}.")
  classes, class_idx = np.unique(index.center_classes, return_inverse=True)
  var = index.variance if variance is None else float(variance)
  if not var > 0:
    raise ValueError(f"`variance` must be > 0, got {var}.")
  L = min(int(L), len(index.centers))
  pred = _predict(jnp.asarray(query), jnp.asarray(index.centers),
                  jnp.asarray(class_idx, jnp.int32), jnp.asarray(index.cluster_sizes > 0),
                  jnp.float32(var), L=L, num_classes=len(classes))
  return classes[np.asarray(pred)]


def nearest_cluster_accuracy(embeddings, labels, *, clusters_per_class: int,
                             variance: float, L: int = 8, key: jax.Array | None = None,
                             num_iters: int = 20) -> float:
  r"""Eq. 6 accuracy on a labelled set whose classes need not be the
  training classes (the class-disjoint DML protocol).

  Each class's examples (in their order in ``labels``) are split
  alternately: even positions build a per-class index
  (:func:`build_index`, K clusters per class), odd positions are
  classified by :func:`nearest_cluster_predict` with the given ``variance``
  (the running training ``sigma^2``, e.g. ``MagnetIndex.variance``). A class
  with a single example only contributes to the index. With every class
  seen in training, pass its training index to
  :func:`nearest_cluster_predict` instead (the paper's protocol).

  Args:
    embeddings: [N, D] float embeddings.
    labels: [N] integer labels (at least 2 classes with 2 examples).
    clusters_per_class: K (classes with fewer index examples than K get
      empty duplicates, which prediction ignores).
    variance: sigma^2 > 0 of eq. 6.
    L: number of nearest centres.
    key: k-means key (default ``jax.random.key(0)``).
    num_iters: Lloyd iterations.

  Returns:
    Fraction of the held-out half classified correctly (float).

  Example:
    >>> import numpy as np
    >>> x = np.array([[0.], [.1], [.2], [.3], [5.], [5.1], [5.2], [5.3]], np.float32)
    >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> nearest_cluster_accuracy(x, y, clusters_per_class=1, variance=1.0, L=2)
    1.0
  """
  embeddings = np.asarray(embeddings, np.float32)
  labels = np.asarray(labels)
  _check_inputs(embeddings, labels)
  _checks.positive_int(clusters_per_class, "clusters_per_class")
  if not float(variance) > 0:
    raise ValueError(f"`variance` must be > 0, got {variance}.")
  order = np.argsort(labels, kind="stable")
  sorted_labels = labels[order]
  starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
  position = np.empty(len(labels), np.int64)
  position[order] = np.arange(len(labels)) - starts          # rank within the class
  gallery = position % 2 == 0
  query = ~gallery
  if len(np.unique(labels[query])) < 2:
    raise ValueError(
        "`labels` must have at least 2 classes with 2 or more examples (one half builds "
        "the index, the other is classified).")
  key = jax.random.key(0) if key is None else key
  index = build_index(embeddings[gallery], labels[gallery],
                      clusters_per_class=clusters_per_class, key=key, num_iters=num_iters)
  pred = nearest_cluster_predict(index, embeddings[query], L=L, variance=float(variance))
  return float(np.mean(pred == labels[query]))
