"""k-means with k-means++ initialisation, and clustering scores (NMI, AMI).

:func:`kmeans` is pure JAX with static shapes: jittable, vmappable over a
leading axis of independent problems (e.g. per-class clustering for the
magnet loss, with ``where`` masking the padding of smaller classes) and
deterministic given its key.

Objective (Lloyd 1982), over the valid points ``x_n`` (``where[n]``):

  ``inertia = sum_n min_k ||x_n - mu_k||^2``

Initialisation: greedy k-means++ (Arthur & Vassilvitskii 2007): the first
centre is a uniformly drawn valid point; each next centre is the best, by
resulting inertia, of ``2 + floor(ln K)`` candidates drawn with probability
proportional to ``D(x)^2`` (the squared distance to the nearest centre so
far), as scikit-learn does. Then Lloyd iterations (assign every point to its
nearest centre, lower centre index on ties; move every centre to the mean of
its points) until ``num_iters`` or until the total squared centre shift is
``<= tol * mean_d Var(x_d)`` (scikit-learn's tolerance), inside a
``lax.while_loop``. The run with the lowest inertia among ``num_restarts``
is kept (the first on ties). Computation is in float32 on data centred on the
mean of the valid points (so the ``||x||^2 + ||c||^2 - 2 x.c`` expansion used
for assignments cancels less); the reported inertia uses direct differences.

Degenerate cases (never NaN):

* a cluster that loses all its points keeps its previous centre (scikit-learn
  relocates it to a far point instead);
* fewer distinct valid points than ``K``: once every valid point is a centre
  (all ``D(x)^2 = 0``), further centres are drawn uniformly among the valid
  points, i.e. duplicated; duplicates stay empty and keep their position;
* no valid point at all: centres are zeros, inertia 0, assignments -1.

Scores: :func:`nmi` (jittable, float32) and :func:`ami` (host NumPy,
float64, it needs the expected mutual information) follow scikit-learn's
``normalized_mutual_info_score`` / ``adjusted_mutual_info_score`` with the
arithmetic normalisation, including their special cases.
:func:`kmeans_nmi` is a host convenience.

Jittable: :func:`kmeans`, :func:`nmi` (given static ``num_classes`` /
``num_clusters`` when traced). Host only: :func:`ami`, :func:`kmeans_nmi`.

References:
  Lloyd, "Least squares quantization in PCM", IEEE Trans. Inf. Theory 1982.
  Arthur, Vassilvitskii, "k-means++: The Advantages of Careful Seeding",
  SODA 2007.
  Vinh, Epps, Bailey, "Information Theoretic Measures for Clusterings
  Comparison", JMLR 2010 (AMI, expected mutual information).
  Strehl, Ghosh, "Cluster Ensembles", JMLR 2002 (NMI).

Example:
  >>> import jax, jax.numpy as jnp, metric_jax.clustering as cl
  >>> x = jnp.array([[0., 0.], [0., 1.], [10., 0.], [10., 1.]])
  >>> res = cl.kmeans(x, 2, key=jax.random.key(0))
  >>> sorted(res.centers.tolist())
  [[0.0, 0.5], [10.0, 0.5]]
  >>> float(res.inertia)
  1.0
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import special

from metric_jax import _checks
from metric_jax import distances

__all__ = ["KMeansResult", "kmeans", "nmi", "ami", "kmeans_nmi"]

# Rows per chunk in the assignment step: bounds the [rows, K] distance block.
_ASSIGN_BLOCK_ELEMENTS = 1 << 23


class KMeansResult(NamedTuple):
  """Output of :func:`kmeans`.

  Attributes:
    centers: [K, D] float32 cluster centres.
    assignments: [N] int32 index of each point's nearest centre (-1 for
      points masked out by ``where``).
    inertia: float32 scalar, sum over valid points of the squared distance to
      their centre.
    num_iters_run: int32 scalar, Lloyd iterations run by the kept restart.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax.clustering as cl
    >>> x = jnp.array([[0., 0.], [0., 2.], [10., 0.], [10., 2.], [5., 50.]])
    >>> res = cl.kmeans(x, 2, key=jax.random.key(0), where=jnp.arange(5) < 4)
    >>> res.centers.shape, res.assignments.shape, res.inertia.shape
    ((2, 2), (5,), ())
    >>> bool(res.assignments[0] != res.assignments[2]), int(res.assignments[4]), float(res.inertia)
    (True, -1, 4.0)
    >>> centers, assignments, inertia, num_iters_run = res  # a plain NamedTuple
  """
  centers: jax.Array
  assignments: jax.Array
  inertia: jax.Array
  num_iters_run: jax.Array


def _assign(x: jax.Array, centers: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Nearest centre (lowest index on ties) and its squared distance, in row chunks."""
  n, k = x.shape[0], centers.shape[0]

  def block(xb):
    d2 = distances.pairwise(xb, centers, "squared_euclidean")
    a = jnp.argmin(d2, axis=1).astype(jnp.int32)
    return a, jnp.take_along_axis(d2, a[:, None], axis=1)[:, 0]

  rows = max(1, min(n, _ASSIGN_BLOCK_ELEMENTS // max(k, 1)))
  if rows >= n:
    return block(x)
  nb = -(-n // rows)
  xp = jnp.pad(x, ((0, nb * rows - n), (0, 0))).reshape(nb, rows, x.shape[1])
  a, d2 = lax.map(block, xp)
  return a.reshape(-1)[:n], d2.reshape(-1)[:n]


def _sample(key: jax.Array, weights: jax.Array, valid: jax.Array, num: int) -> jax.Array:
  """``num`` indices drawn with probability proportional to ``weights`` over the
  valid points; uniform over the valid points if all their weights are 0;
  uniform over all points if none is valid."""
  w = jnp.where(valid, weights, 0.0)
  total = jnp.sum(w)
  weighted = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
  uniform_valid = jnp.where(valid, 0.0, -jnp.inf)
  logits = jnp.where(total > 0, weighted,
                     jnp.where(jnp.any(valid), uniform_valid, jnp.zeros_like(w)))
  return jax.random.categorical(key, logits, shape=(num,))


def _kmeans_plus_plus(x: jax.Array, valid: jax.Array, key: jax.Array,
                      num_clusters: int) -> jax.Array:
  """Greedy k-means++ seeding: [K, D] centres drawn from the valid rows of x."""
  n_trials = 2 + int(math.log(num_clusters))
  key0, key = jax.random.split(key)
  first = _sample(key0, jnp.ones(x.shape[0], jnp.float32), valid, 1)[0]
  centers = jnp.zeros((num_clusters, x.shape[1]), jnp.float32).at[0].set(x[first])
  closest = distances.pairwise(x[first][None], x, "squared_euclidean")[0]
  closest = jnp.where(valid, closest, 0.0)

  def step(c, state):
    centers, closest = state
    cand = _sample(jax.random.fold_in(key, c), closest, valid, n_trials)
    d2 = distances.pairwise(x[cand], x, "squared_euclidean")  # [T, N]
    new_closest = jnp.where(valid[None], jnp.minimum(closest[None], d2), 0.0)
    best = jnp.argmin(jnp.sum(new_closest, axis=1))
    return centers.at[c].set(x[cand[best]]), new_closest[best]

  centers, _ = lax.fori_loop(1, num_clusters, step, (centers, closest))
  return centers


def _lloyd(x, valid, centers, tol_abs, num_iters):
  k = centers.shape[0]
  wf = valid.astype(jnp.float32)

  def cond(state):
    it, _, shift = state
    return (it < num_iters) & (shift > tol_abs)

  def body(state):
    it, c, _ = state
    a, _ = _assign(x, c)
    sums = jax.ops.segment_sum(x * wf[:, None], a, num_segments=k)
    counts = jax.ops.segment_sum(wf, a, num_segments=k)
    new_c = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)
    return it + 1, new_c, jnp.sum((new_c - c) ** 2)

  it, centers, _ = lax.while_loop(cond, body, (jnp.int32(0), centers, jnp.float32(jnp.inf)))
  return centers, it


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_restarts"))
def _kmeans_impl(x, valid, key, init_centers, tol, num_iters, *, num_clusters, num_restarts):
  x = jnp.where(valid[:, None], x.astype(jnp.float32), 0.0)
  wf = valid.astype(jnp.float32)
  n_valid = jnp.maximum(jnp.sum(wf), 1.0)
  mean = jnp.sum(x, axis=0) / n_valid
  # Centre the data: the ||x||^2 + ||c||^2 - 2 x.c expansion then cancels less.
  x = jnp.where(valid[:, None], x - mean, 0.0)
  var = jnp.sum(x * x, axis=0) / n_valid
  tol_abs = tol * jnp.mean(var)
  if init_centers is not None:
    init_centers = init_centers.astype(jnp.float32) - mean

  def finish(centers, it):
    a, _ = _assign(x, centers)
    # Inertia from direct differences (exact up to rounding, no cancellation).
    inertia = jnp.sum(jnp.where(valid, jnp.sum((x - centers[a]) ** 2, axis=1), 0.0))
    return centers + mean, jnp.where(valid, a, -1), inertia, it

  # Restart i uses fold_in(key, i): a single run equals restart 0 of a multi-restart call.
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_restarts))

  def run(args):
    k, i = args
    c0 = _kmeans_plus_plus(x, valid, k, num_clusters)
    if init_centers is not None:
      c0 = jnp.where(i == 0, init_centers, c0)
    return finish(*_lloyd(x, valid, c0, tol_abs, num_iters))

  if init_centers is not None and num_restarts == 1:
    return KMeansResult(*finish(*_lloyd(x, valid, init_centers, tol_abs, num_iters)))
  centers, assign, inertia, its = lax.map(run, (keys, jnp.arange(num_restarts)))
  best = jnp.argmin(inertia)
  return KMeansResult(centers[best], assign[best], inertia[best], its[best])


def kmeans(x: jax.Array, num_clusters: int, *, key: jax.Array, num_iters: int = 50,
           tol: float = 1e-6, num_restarts: int = 1, where: jax.Array | None = None,
           init_centers: jax.Array | None = None) -> KMeansResult:
  """k-means clustering (k-means++ seeding, Lloyd iterations) in JAX.

  Minimises ``sum_{n: where[n]} min_k ||x_n - mu_k||^2``; see the module
  docstring for the algorithm, the stopping rule and the degenerate cases
  (fewer valid points than clusters gives duplicated centres, never NaN).
  Jittable (``num_clusters`` and ``num_restarts`` are static; ``num_iters``
  is only a loop bound, so changing it does not recompile) and vmappable: ``jax.vmap(lambda x, w, k: kmeans(x, K, key=k, where=w))`` over
  padded per-class arrays clusters every class independently.

  Args:
    x: [N, D] float array (computed in float32).
    num_clusters: K >= 1, static.
    key: PRNG key (``jax.random.key`` or ``PRNGKey``); same key, same result.
    num_iters: maximum Lloyd iterations (0: k-means++ seeding only).
    tol: stop when the total squared centre shift is ``<= tol`` times the
      mean per-feature variance of the valid points (0: run until the
      assignments stop changing or ``num_iters``).
    num_restarts: independent k-means++ runs; the lowest inertia is kept.
    where: optional [N] bool, False marks padding (ignored; assignment -1).
    init_centers: optional [K, D] warm start (e.g. the previous centres). It
      replaces the seeding of the first restart; other restarts use
      k-means++.

  Returns:
    :class:`KMeansResult` ``(centers [K, D], assignments [N] int32, inertia,
    num_iters_run)``.

  Raises:
    ValueError / TypeError: bad ranks, dtypes or shapes, non-int sizes.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax.clustering as cl
    >>> x = jnp.array([[0.], [1.], [9.], [10.], [99.]])
    >>> w = jnp.array([True, True, True, True, False])
    >>> res = cl.kmeans(x, 2, key=jax.random.key(1), where=w)
    >>> res.assignments.tolist()[4], float(res.inertia)
    (-1, 1.0)
  """
  x, where = _as_array(x), _as_array(where)
  _checks.embeddings(x, "x")
  _checks.positive_int(num_clusters, "num_clusters")
  _checks.positive_int(num_iters, "num_iters", minimum=0)
  _checks.positive_int(num_restarts, "num_restarts")
  _checks.scalar(tol, "tol", non_negative=True)
  n = np.shape(x)[0]
  _checks.mask(where, (n,), "where")
  if key is None:
    raise ValueError("`key` must be a PRNG key (jax.random.key(seed)), got None.")
  if init_centers is not None:
    shape = np.shape(init_centers)
    if shape != (num_clusters, np.shape(x)[1]):
      raise ValueError(
          f"`init_centers` must have shape ({num_clusters}, {np.shape(x)[1]}), got {shape}.")
  valid = jnp.ones((n,), bool) if where is None else jnp.asarray(where)
  return _kmeans_impl(jnp.asarray(x), valid, key,
                      None if init_centers is None else jnp.asarray(init_centers),
                      jnp.asarray(tol, jnp.float32), jnp.asarray(num_iters, jnp.int32),
                      num_clusters=int(num_clusters), num_restarts=int(num_restarts))


# --------------------------------------------------------------------------
# Scores.
# --------------------------------------------------------------------------


def _as_array(x: Any) -> Any:
  """Python lists / tuples -> NumPy (arrays pass through untouched)."""
  return np.asarray(x) if isinstance(x, (list, tuple)) else x


def _check_label_pair(labels_true: Any, labels_pred: Any) -> None:
  shape = np.shape(labels_true)
  if len(shape) != 1:
    raise ValueError(f"`labels_true` must have rank 1 [N], got shape {shape}.")
  _checks.labels(labels_true, shape[0], "labels_true")
  _checks.labels(labels_pred, shape[0], "labels_pred")


@functools.partial(jax.jit, static_argnames=("num_classes", "num_clusters"))
def _nmi_impl(labels_true, labels_pred, *, num_classes, num_clusters):
  n = labels_true.shape[0]
  _, ti = jnp.unique(labels_true, size=num_classes, return_inverse=True)
  _, pi = jnp.unique(labels_pred, size=num_clusters, return_inverse=True)
  cont = jax.ops.segment_sum(jnp.ones(n, jnp.float32), ti.reshape(-1) * num_clusters
                             + pi.reshape(-1), num_segments=num_classes * num_clusters)
  cont = cont.reshape(num_classes, num_clusters)
  a = jnp.sum(cont, axis=1)
  b = jnp.sum(cont, axis=0)
  logn = jnp.log(jnp.float32(n))

  def xlogx(c):  # c log c with 0 log 0 = 0
    return jnp.where(c > 0, c * jnp.log(jnp.where(c > 0, c, 1.0)), 0.0)

  # MI = sum_ij (n_ij/n) log(n n_ij / (a_i b_j)) = [sum n_ij log n_ij - sum a log a
  #      - sum b log b] / n + log n
  mi = (jnp.sum(xlogx(cont)) - jnp.sum(xlogx(a)) - jnp.sum(xlogx(b))) / n + logn
  h_true = logn - jnp.sum(xlogx(a)) / n
  h_pred = logn - jnp.sum(xlogx(b)) / n
  mi = jnp.maximum(mi, 0.0)
  single = (jnp.sum(a > 0) == 1) & (jnp.sum(b > 0) == 1)
  normalizer = jnp.maximum(0.5 * (h_true + h_pred), jnp.finfo(jnp.float32).eps)
  return jnp.where(single, 1.0, jnp.where(mi > 0, mi / normalizer, 0.0))


def nmi(labels_true: Any, labels_pred: Any, *, num_classes: int | None = None,
        num_clusters: int | None = None) -> jax.Array:
  """Normalised mutual information with the arithmetic normalisation.

  ``NMI = I(Y; C) / ((H(Y) + H(C)) / 2)`` from the contingency table
  ``n_ij`` (scikit-learn's ``normalized_mutual_info_score``, including its
  special cases: 1 if both labelings have a single group, 0 if I = 0).
  Computed in float32.

  Jittable when ``num_classes`` and ``num_clusters`` (the numbers of distinct
  values of each labeling, static) are given; otherwise the inputs must be
  concrete and they are counted on the host. Labels may be any integers.

  Args:
    labels_true: [N] integer labels.
    labels_pred: [N] integer cluster ids.
    num_classes: number of distinct ``labels_true`` values (static).
    num_clusters: number of distinct ``labels_pred`` values (static).

  Returns:
    float32 scalar in [0, 1].

  References:
    Strehl, Ghosh, "Cluster Ensembles", JMLR 2002.

  Example:
    >>> import metric_jax.clustering as cl
    >>> round(float(cl.nmi([0, 0, 1, 1], [5, 5, 7, 7])), 4)
    1.0
    >>> round(float(cl.nmi([0, 0, 1, 1], [0, 1, 0, 1])), 4)
    0.0
  """
  labels_true, labels_pred = _as_array(labels_true), _as_array(labels_pred)
  _check_label_pair(labels_true, labels_pred)
  if np.shape(labels_true)[0] == 0:
    return jnp.float32(1.0)
  sizes = []
  for name, y, size in (("labels_true", labels_true, num_classes),
                        ("labels_pred", labels_pred, num_clusters)):
    if size is None:
      if isinstance(y, jax.core.Tracer):
        raise ValueError(f"`{name}` is traced: pass its number of distinct values "
                         f"(`{'num_classes' if name == 'labels_true' else 'num_clusters'}`) "
                         "as a static int.")
      size = len(np.unique(np.asarray(y)))
    _checks.positive_int(size, "num_classes" if name == "labels_true" else "num_clusters")
    sizes.append(int(size))
  return _nmi_impl(jnp.asarray(labels_true), jnp.asarray(labels_pred),
                   num_classes=sizes[0], num_clusters=sizes[1])


def _expected_mutual_information(a: np.ndarray, b: np.ndarray, n: int) -> float:
  """E[I] under the hypergeometric model of random labelings with row sums ``a``
  and column sums ``b`` (Vinh et al. 2010, eq. 24), grouped by distinct sizes."""
  ua, ca = np.unique(a, return_counts=True)
  ub, cb = np.unique(b, return_counts=True)
  ub = ub.astype(np.float64)
  lg = special.gammaln
  total = 0.0
  for ai, mult_a in zip(ua.astype(np.float64), ca):
    nij = np.arange(1, int(ai) + 1, dtype=np.float64)[None, :]  # [1, ai]
    bj = ub[:, None]  # [|B|, 1]
    ok = (nij <= np.minimum(ai, bj)) & (nij >= np.maximum(1.0, ai + bj - n))
    nij_s = np.where(ok, nij, 1.0)
    log_p = (lg(ai + 1) + lg(bj + 1) + lg(n - ai + 1) + lg(n - bj + 1) - lg(n + 1)
             - lg(nij_s + 1) - lg(ai - nij_s + 1) - lg(np.maximum(bj - nij_s, 0) + 1)
             - lg(np.maximum(n - ai - bj + nij_s, 0) + 1))
    term = nij_s / n * np.log(n * nij_s / (ai * bj)) * np.exp(log_p)
    total += mult_a * float(np.sum(cb[:, None] * np.where(ok, term, 0.0)))
  return total


def ami(labels_true: Any, labels_pred: Any) -> float:
  """Adjusted mutual information with the arithmetic normalisation (host, float64).

  ``AMI = (I - E[I]) / ((H(Y) + H(C)) / 2 - E[I])`` with ``E[I]`` the expected
  mutual information of two random labelings with the same group sizes
  (Vinh et al. 2010), as scikit-learn's ``adjusted_mutual_info_score``,
  special cases included (1 if both labelings have one group, 0 if only one
  does). Not jittable: NumPy on concrete inputs.

  Args:
    labels_true: [N] integer labels.
    labels_pred: [N] integer cluster ids.

  Returns:
    Python float (1 for identical partitions, about 0 for random ones).

  References:
    Vinh, Epps, Bailey, "Information Theoretic Measures for Clusterings
    Comparison", JMLR 2010.

  Example:
    >>> import metric_jax.clustering as cl
    >>> round(cl.ami([0, 0, 1, 1], [1, 1, 0, 0]), 4)
    1.0
  """
  labels_true, labels_pred = _as_array(labels_true), _as_array(labels_pred)
  _check_label_pair(labels_true, labels_pred)
  yt = np.asarray(jax.device_get(labels_true))
  yp = np.asarray(jax.device_get(labels_pred))
  n = yt.shape[0]
  classes, ti = np.unique(yt, return_inverse=True)
  clusters, pi = np.unique(yp, return_inverse=True)
  if len(classes) == len(clusters) == 1 or n == 0:
    return 1.0
  if len(classes) == 1 or len(clusters) == 1:
    return 0.0
  _, nij = np.unique(ti.astype(np.int64) * len(clusters) + pi, return_counts=True)
  a = np.bincount(ti).astype(np.float64)
  b = np.bincount(pi).astype(np.float64)
  nij = nij.astype(np.float64)
  mi = (np.sum(nij * np.log(nij)) - np.sum(a * np.log(a)) - np.sum(b * np.log(b))) / n + np.log(n)
  h_true = np.log(n) - np.sum(a * np.log(a)) / n
  h_pred = np.log(n) - np.sum(b * np.log(b)) / n
  emi = _expected_mutual_information(a, b, n)
  eps = np.finfo(np.float64).eps
  den = 0.5 * (h_true + h_pred) - emi
  den = min(den, -eps) if den < 0 else max(den, eps)
  num = mi - emi
  num = min(num, -eps) if num < 0 else max(num, eps)
  return float(num / den)


def kmeans_nmi(embeddings: Any, labels: Any, *, key: jax.Array, num_restarts: int = 1,
               num_iters: int = 20, normalize: bool = True) -> float:
  """NMI between the labels and k-means clusters of the embeddings (host).

  k-means (:func:`kmeans`) with K = number of distinct labels, the DML
  clustering protocol; the result depends on ``key``: average over keys to
  report it.

  Args:
    embeddings: [N, D] float array.
    labels: [N] integer labels (concrete).
    key: PRNG key of k-means.
    num_restarts: k-means restarts (lowest inertia kept).
    num_iters: Lloyd iterations.
    normalize: L2-normalise the embeddings first.

  Returns:
    Python float.

  Example:
    >>> import jax, numpy as np, metric_jax.clustering as cl
    >>> x = np.array([[1., 0.], [1., .1], [0., 1.], [.1, 1.]], np.float32)
    >>> cl.kmeans_nmi(x, np.array([3, 3, 8, 8]), key=jax.random.key(0))
    1.0
  """
  embeddings, labels = _as_array(embeddings), _as_array(labels)
  _checks.embeddings(embeddings, "embeddings")
  n = np.shape(embeddings)[0]
  _checks.labels(labels, n, "labels")
  if n == 0:
    raise ValueError("`embeddings` must hold at least one row, got 0.")
  y = np.asarray(jax.device_get(labels))
  x = jnp.asarray(embeddings, jnp.float32)
  if normalize:
    x = distances.l2_normalize(x)
  res = kmeans(x, int(len(np.unique(y))), key=key, num_restarts=num_restarts,
               num_iters=num_iters)
  return float(nmi(y, np.asarray(res.assignments)))
