"""Exact, jit-compiled retrieval and clustering evaluation (no faiss needed).

The standard deep-metric-learning protocol: embed a held-out set of classes,
use every embedding as a query against the others (or against a separate
gallery, In-Shop style), rank the gallery by distance and score the ranking
with the labels.

Two layers:

* jittable building blocks with static shapes: :func:`knn` (exact k-nearest
  neighbours, chunked over queries) and :func:`retrieval_per_query` (per-query
  metric values for a static ``max_r``);
* host-side conveniences returning Python floats: :func:`retrieval_metrics`
  and :func:`evaluate` (retrieval + k-means NMI/AMI), which validate the
  inputs (NaN included), derive the static sizes from the labels and average
  the per-query values in float64.

**Ranking.** The gallery is ranked by the float32 values of
``metric_jax.distances.pairwise(query, gallery, metric)``: smallest first for
distances, largest first for similarities. Ties are broken by gallery index
(lower index first), explicitly and on every backend. Non-finite scores rank
last (after every finite score).
With ``gallery=None`` the query set is the gallery and each query's *own
index* is removed from its ranking (another item at distance 0 is kept, as
PML does).

**Memory.** Queries are processed in chunks of ``chunk_size`` rows
(``lax.map``; the last chunk is padded), so the live score matrix is
``chunk_size x G`` float32 whatever the number of queries.

**Metrics** (per query, then averaged over the queries that have at least one
relevant gallery item; R = number of gallery items with the query's label,
the query itself excluded; ``pos_1 < pos_2 < ... < pos_R`` the 1-based
positions of those items in the query's full ranking):

* ``precision_at_1`` = ``[pos_1 = 1]``;
* ``recall_at_{k}`` = ``[pos_1 <= k]`` (DML recall: a hit if any of the top k
  shares the label; Oh Song et al. 2016);
* ``r_precision`` = ``#{i : pos_i <= R} / R``;
* ``map_at_r`` = ``(1/R) sum_{i : pos_i <= R} i / pos_i`` (MAP@R, Musgrave et
  al. 2020);
* ``mean_average_precision`` = ``(1/R) sum_{i=1..R} i / pos_i`` (average
  precision over the full ranking; equal to PML's ``mean_average_precision``
  with ``k=None``, which divides by R);
* ``mean_reciprocal_rank`` = ``1 / pos_1`` over the full ranking.

**Two exact strategies.** If only the first four metrics (``KNN_METRICS``)
are requested they come from the ``max(k_values, max R)`` nearest neighbours
of :func:`knn`. The last two (``FULL_RANKING_METRICS``) need the position of
every relevant item in the full ranking: then every metric is computed by
counting, for each relevant item, the gallery items ranked ahead of it
(``O(Q G max_R)`` comparisons on top of the ``O(Q G D)`` distances, no sort;
on CPU about 1.5-4x the k-NN time). Both give identical values; ask only for
the metrics you need (``metrics=``) to skip the counting pass.

**Top-k.** Exact and parallel-friendly: the score row is cut into blocks of
128 columns, the k best blocks by their maximum are kept (they provably hold
the k best items), and ``lax.top_k`` runs on those ``128 k`` candidates only,
with ties made explicit by (score, index). On CPU this avoids XLA's serial
partial sort over all G columns.

**Jittable:** :func:`knn`, :func:`retrieval_per_query` (static ``k`` /
``max_r``, ``chunk_size``, ``metric``). **Host only:** :func:`retrieval_metrics`,
:func:`evaluate` (they read label counts and return Python floats). The NaN
check runs only on concrete inputs; under ``jit`` NaN rows cannot raise and
simply rank last.

References:
  Oh Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted
  Structured Feature Embedding", CVPR 2016, arXiv 1511.06452 (Recall@K).
  Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020,
  arXiv 2003.08505 (R-precision, MAP@R).

Example:
  >>> import numpy as np, metric_jax.evaluation as ev
  >>> emb = np.array([[0., 0.], [0., 1.], [5., 5.], [5., 6.], [0., 2.]], np.float32)
  >>> labels = np.array([0, 0, 1, 1, 1])
  >>> out = ev.retrieval_metrics(emb, labels, k_values=(1, 2), normalize=False)
  >>> {k: round(v, 4) for k, v in out.items()}  # doctest: +NORMALIZE_WHITESPACE
  {'precision_at_1': 0.8, 'recall_at_1': 0.8, 'recall_at_2': 0.8,
   'r_precision': 0.8, 'map_at_r': 0.8, 'mean_average_precision': 0.8833,
   'mean_reciprocal_rank': 0.8667, 'num_queries': 5.0, 'num_excluded_queries': 0.0}
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metric_jax import _checks
from metric_jax import distances

__all__ = [
    "KNN_METRICS",
    "FULL_RANKING_METRICS",
    "knn",
    "retrieval_per_query",
    "retrieval_metrics",
    "evaluate",
]

# Metrics computed from the max(k_values, max R) nearest neighbours.
KNN_METRICS = ("precision_at_1", "recall_at_k", "r_precision", "map_at_r")
# Metrics that need every relevant item's position in the full ranking.
FULL_RANKING_METRICS = ("mean_average_precision", "mean_reciprocal_rank")
_ALL_METRICS = KNN_METRICS + FULL_RANKING_METRICS
# Needs R nearest neighbours (else only max(k_values)).
_NEEDS_R = ("r_precision", "map_at_r")

# Position given to relevant slots that are padding or lie outside the k-NN
# window (larger than any real position).
_FAR = np.iinfo(np.int32).max


# --------------------------------------------------------------------------
# Validation helpers (host side; they look at static properties, plus values
# when the inputs are concrete).
# --------------------------------------------------------------------------


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_metric(metric: Any) -> bool:
  """Validates ``metric``; returns True if it is a similarity."""
  if isinstance(metric, str):
    _checks.choice(metric, distances.METRIC_NAMES, "metric")
    return distances.is_similarity(metric)
  if callable(metric):
    return distances.is_similarity(metric)
  raise TypeError(
      f"`metric` must be one of {distances.METRIC_NAMES} or a callable "
      f"fn(x [N, D], y [M, D]) -> [N, M], got {type(metric).__name__}.")


def _check_finite(x: Any, name: str) -> None:
  """Raises if a concrete embedding array holds NaN or inf (no-op on tracers)."""
  if not _is_concrete(x):
    return
  arr = np.asarray(jax.device_get(x)).astype(np.float32)
  bad = ~np.isfinite(arr).all(axis=-1)
  if bad.any():
    rows = np.flatnonzero(bad)
    raise ValueError(
        f"`{name}` must be finite, got NaN or inf in {rows.size} row(s) "
        f"(first: {rows[:5].tolist()}).")


def _check_nonempty(x: Any, name: str) -> None:
  if np.shape(x)[0] == 0:
    raise ValueError(f"`{name}` must hold at least one row, got shape {tuple(np.shape(x))}.")


def _check_integer_labels(y: Any, n: int, name: str) -> None:
  _checks.labels(y, n, name)


def _check_k_values(k_values: Any) -> tuple[int, ...]:
  if isinstance(k_values, (int, np.integer)):
    k_values = (k_values,)
  try:
    k_values = tuple(k_values)
  except TypeError:
    raise TypeError(
        f"`k_values` must be a sequence of positive ints, got {type(k_values).__name__}.") from None
  if not k_values:
    raise ValueError("`k_values` must hold at least one k, got an empty sequence.")
  for k in k_values:
    _checks.positive_int(k, "k_values")
  return tuple(int(k) for k in k_values)


def _check_metrics_arg(metrics: Iterable[str] | None) -> tuple[str, ...]:
  if metrics is None:
    return _ALL_METRICS
  if isinstance(metrics, str):
    metrics = (metrics,)
  metrics = tuple(metrics)
  for m in metrics:
    # "recall_at_8" style names are accepted as aliases of "recall_at_k".
    name = "recall_at_k" if isinstance(m, str) and m.startswith("recall_at_") else m
    _checks.choice(name, _ALL_METRICS, "metrics")
  out = tuple(dict.fromkeys(
      "recall_at_k" if m.startswith("recall_at_") else m for m in metrics))
  if not out:
    raise ValueError(f"`metrics` must name at least one of {_ALL_METRICS}, got ().")
  return out


def _resolve_exclude_self(exclude_self: bool | None, gallery: Any, q: int, g: int) -> bool:
  if exclude_self is None:
    return gallery is None
  _checks.flag(exclude_self, "exclude_self", allow_none=True)
  if exclude_self and g < q:
    raise ValueError(
        "`exclude_self=True` means query i is gallery item i, so the gallery must have at "
        f"least as many rows as the query; got {q} queries and {g} gallery rows.")
  return bool(exclude_self)


# --------------------------------------------------------------------------
# Ranking core (jittable).
# --------------------------------------------------------------------------


def _ranking_key(qc: jax.Array, qidx: jax.Array, gallery: jax.Array, metric: Any,
                 is_sim: bool, exclude_self: bool, num_valid: int | None = None) -> jax.Array:
  """[C, G] float32 ranking key (larger = better ranked).

  The key is ``pairwise(qc, gallery, metric)``, negated for distances, clamped
  to ``>= finfo.min`` (NaN and infinite scores become the lowest finite value,
  so they rank after every finite score, by index). The query itself
  (``exclude_self``) and padding columns (``>= num_valid``) get -inf: strictly
  last, never among the k <= G - 1 neighbours.
  """
  scores = distances.pairwise(qc, gallery, metric)
  key = scores if is_sim else -scores
  lowest = jnp.finfo(jnp.float32).min
  key = jnp.where(key >= lowest, key, lowest)  # NaN compares False
  col = lax.broadcasted_iota(jnp.int32, key.shape, 1)
  if exclude_self:
    key = jnp.where(col == qidx[:, None], -jnp.inf, key)
  if num_valid is not None and num_valid < key.shape[1]:
    key = jnp.where(col < num_valid, key, -jnp.inf)
  return key


def _stable_top_k(key: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k of each row ordered by (key descending, column ascending).

  ``lax.top_k`` documents lower-index-first ties, but a backend may order
  -0.0 / +0.0 or equal values differently, so the order is made explicit:
  take k + 1 candidates, sort them by (value, index), and if the k-th and
  (k+1)-th values tie (a tie straddles the cut), refill the tied slots with
  the lowest columns holding that value (a second, rare pass under
  ``lax.cond``).
  """
  rows, g = key.shape
  kk = min(k + 1, g)
  vals, idx = lax.top_k(key, kk)
  neg, idx = lax.sort((-vals, idx), dimension=1, num_keys=2)
  vals = -neg
  if kk == k:  # every column returned: nothing crosses the cut
    return vals, idx

  def fix(idx):
    t = vals[:, k - 1:k]
    n_above = jnp.sum(vals[:, :k] > t, axis=1, keepdims=True, dtype=jnp.int32)
    col = lax.broadcasted_iota(jnp.int32, key.shape, 1)
    tie_key = jnp.where(key == t, -col, -g)
    tie_cols = -lax.top_k(tie_key, k)[0]  # ascending columns whose key equals t
    slot = lax.broadcasted_iota(jnp.int32, (rows, k), 1)
    take = jnp.clip(slot - n_above, 0, k - 1)
    return jnp.where(slot < n_above, idx[:, :k], jnp.take_along_axis(tie_cols, take, axis=1))

  straddles = vals[:, k - 1] == vals[:, k]
  idx = lax.cond(jnp.any(straddles), fix, lambda i: i[:, :k], idx)
  return vals[:, :k], idx


# Columns per block of the two-stage top-k (see _block_top_k).
_BLOCK = 128


def _use_blocks(g: int, k: int) -> bool:
  """Whether the two-stage top-k saves work for k of g columns."""
  return 2 * k * _BLOCK <= g


def _block_top_k(key: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k of each row, (key descending, column ascending), in two stages.

  The G columns (a multiple of ``_BLOCK``) are cut into blocks; the k best
  blocks, ranked by their best element (max value, then lower block), contain
  the k best elements: a block outside them is beaten by k blocks whose best
  elements beat all of its elements. So a row-wise max (a reduction that
  parallelises and vectorises) and a top-k over k * _BLOCK candidates replace
  the top-k over all G columns (a serial partial sort on CPU).
  """
  rows, g = key.shape
  nb = g // _BLOCK
  kb = key.reshape(rows, nb, _BLOCK)
  _, best = _stable_top_k(jnp.max(kb, axis=2), k)
  best = jnp.sort(best, axis=1)  # candidates in ascending column order
  flat = (lax.broadcasted_iota(jnp.int32, best.shape, 0) * nb + best).reshape(-1)
  cand = kb.reshape(rows * nb, _BLOCK)[flat].reshape(rows, k * _BLOCK)  # whole-block gather
  vals, pos = _stable_top_k(cand, k)
  cols = jnp.take_along_axis(best, pos // _BLOCK, axis=1) * _BLOCK + pos % _BLOCK
  return vals, cols


def _chunked(q: jax.Array, chunk_size: int, *extra: jax.Array):
  """Pads [Q, ...] arrays to a multiple of the chunk and reshapes to [n, C, ...]."""
  n_q = q.shape[0]
  c = min(chunk_size, n_q)
  n = -(-n_q // c)
  pad = n * c - n_q

  def split(a, fill=0):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    return a.reshape((n, c) + a.shape[1:])

  qidx = jnp.arange(n * c, dtype=jnp.int32)
  qidx = jnp.where(qidx < n_q, qidx, -1)  # padded rows match no gallery column
  return split(q), qidx.reshape(n, c), tuple(split(a) for a in extra)


@functools.partial(jax.jit, static_argnames=("k", "metric", "chunk_size", "exclude_self", "is_sim"))
def _knn_impl(query, gallery, *, k, metric, chunk_size, exclude_self, is_sim):
  n_q = query.shape[0]
  n_g = gallery.shape[0]
  q_chunks, qidx, _ = _chunked(query, chunk_size)
  blocks = _use_blocks(n_g, k)
  if blocks and n_g % _BLOCK:  # pad the gallery so the score block reshapes for free
    gallery = jnp.pad(gallery, ((0, _BLOCK - n_g % _BLOCK), (0, 0)))

  def body(args):
    qc, qi = args
    key = _ranking_key(qc, qi, gallery, metric, is_sim, exclude_self, n_g)
    return _block_top_k(key, k) if blocks else _stable_top_k(key, k)

  vals, idx = lax.map(body, (q_chunks, qidx))
  vals = vals.reshape(-1, k)[:n_q]
  idx = idx.reshape(-1, k)[:n_q]
  # The key is the score (negated for distances) except where it was clamped.
  scores = jnp.where(vals > jnp.finfo(jnp.float32).min, vals if is_sim else -vals, jnp.nan)
  return idx, scores


def knn(query: jax.Array, gallery: jax.Array | None = None, *, k: int,
        metric: distances.MetricLike = "euclidean", chunk_size: int = 1024,
        exclude_self: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact k-nearest neighbours of every query in the gallery.

  Ranks gallery item j for query i by ``s_ij = pairwise(query, gallery,
  metric)[i, j]`` (float32): ascending for distances, descending for
  similarities, ties broken by the lower gallery index. Queries are processed
  in chunks of ``chunk_size`` rows, so memory is ``O(chunk_size * G)``.
  Jittable (``k``, ``metric``, ``chunk_size``, ``exclude_self`` are static)
  and usable inside other jitted functions.

  Args:
    query: [Q, D] float array.
    gallery: [G, D] float array, or None to search ``query`` itself, in which
      case each query's own index is excluded (other zero-distance items are
      not).
    k: number of neighbours, ``1 <= k <= G`` (``G - 1`` when excluding self).
    metric: a name of :mod:`metric_jax.distances` (``"euclidean"``,
      ``"squared_euclidean"``, ``"cosine"``, ``"dot"``) or a callable
      ``fn(x [N, D], y [M, D]) -> [N, M]`` (a distance unless it has
      ``is_similarity=True``, see :func:`metric_jax.distances.custom`).
    chunk_size: queries per chunk (the last chunk is padded).
    exclude_self: drop gallery item i from query i's ranking. Defaults to
      ``gallery is None``; with an explicit gallery, True means query i is
      gallery item i (the query set is a prefix of the gallery).

  Returns:
    ``(indices [Q, k] int32, scores [Q, k] float32)``, best first: distances
    ascending or similarities descending. Non-finite scores (NaN, or an
    infinite distance) rank after every finite one and are returned as NaN.

  Raises:
    ValueError / TypeError: wrong ranks or dtypes, different D, empty inputs,
      ``k`` larger than the gallery, unknown metric, NaN in concrete inputs.

  Example:
    >>> import jax.numpy as jnp, metric_jax.evaluation as ev
    >>> x = jnp.array([[0.], [1.], [3.], [1.]])
    >>> idx, d = ev.knn(x, k=2)
    >>> idx.tolist()
    [[1, 3], [3, 0], [1, 3], [1, 0]]
    >>> d.tolist()
    [[1.0, 1.0], [0.0, 1.0], [2.0, 2.0], [0.0, 1.0]]
  """
  query, gallery = _as_array(query), _as_array(gallery)
  _checks.embeddings(query, "query")
  _check_nonempty(query, "query")
  if gallery is not None:
    _checks.embeddings(gallery, "gallery")
    _check_nonempty(gallery, "gallery")
    _checks.same_dim(query, gallery, "query", "gallery")
  _checks.positive_int(chunk_size, "chunk_size")
  _checks.positive_int(k, "k")
  n_q = np.shape(query)[0]
  n_g = n_q if gallery is None else np.shape(gallery)[0]
  excl = _resolve_exclude_self(exclude_self, gallery, n_q, n_g)
  available = n_g - int(excl)
  if k > available:
    raise ValueError(
        f"`k` must be at most the number of gallery items a query can retrieve "
        f"({available}{' = G - 1, self excluded' if excl else ''}), got {k}.")
  is_sim = _check_metric(metric)
  _check_finite(query, "query")
  if gallery is not None:
    _check_finite(gallery, "gallery")
  q = jnp.asarray(query)
  g = q if gallery is None else jnp.asarray(gallery)
  return _knn_impl(q, g, k=int(k), metric=metric, chunk_size=int(chunk_size),
                   exclude_self=excl, is_sim=is_sim)


# --------------------------------------------------------------------------
# Per-query metrics (jittable).
# --------------------------------------------------------------------------


def _relevant_sets(query_labels, gallery_labels, exclude_self: bool, slots: int):
  """Per-query relevant gallery items from a stable sort of the gallery labels.

  Returns ``(num_relevant [Q] int32, members [Q, slots] int32)``: members in
  ascending gallery order, the query itself skipped, slots >= R are padding
  (clipped to a valid index).
  """
  n_q = query_labels.shape[0]
  n_g = gallery_labels.shape[0]
  order = jnp.argsort(gallery_labels, stable=True).astype(jnp.int32)
  sorted_labels = gallery_labels[order]
  left = jnp.searchsorted(sorted_labels, query_labels, side="left").astype(jnp.int32)
  right = jnp.searchsorted(sorted_labels, query_labels, side="right").astype(jnp.int32)
  count = right - left
  m = jnp.arange(slots, dtype=jnp.int32)[None, :]
  if exclude_self:
    qi = jnp.arange(n_q, dtype=jnp.int32)
    self_in = gallery_labels[qi] == query_labels
    rank_in_sorted = jnp.zeros(n_g, jnp.int32).at[order].set(jnp.arange(n_g, dtype=jnp.int32))
    self_pos = jnp.where(self_in, rank_in_sorted[qi] - left, slots + n_g)
    num_rel = count - self_in.astype(jnp.int32)
    src = left[:, None] + m + (m >= self_pos[:, None]).astype(jnp.int32)
  else:
    num_rel = count
    src = left[:, None] + m
  members = order[jnp.clip(src, 0, n_g - 1)]
  return num_rel, members


def _positions_from_knn(rel: jax.Array) -> jax.Array:
  """[Q, K] same-label flags of the ranked neighbours -> [Q, K] sorted 1-based
  positions of the relevant ones (``_FAR`` beyond the window)."""
  pos = lax.broadcasted_iota(jnp.int32, rel.shape, 1) + 1
  return jnp.sort(jnp.where(rel, pos, _FAR), axis=1)


def _metrics_from_positions(pos, num_rel, k_values: Sequence[int], metrics: Sequence[str],
                            xp=jnp) -> dict[str, Any]:
  """Per-query metric values from the ascending positions of the relevant items.

  One implementation for both callers: ``xp=jnp`` (float32, jittable) and
  ``xp=np`` (float64, the host means of :func:`retrieval_metrics`).

  Args:
    pos: [Q, S] ascending 1-based positions of the relevant items (``_FAR``
      for padding / unknown).
    num_rel: [Q] R per query.
  """
  fdt = np.float64 if xp is np else jnp.float32
  r = num_rel[:, None]
  rank = xp.arange(1, pos.shape[1] + 1, dtype=np.int32)[None, :]  # i: rank among relevant
  is_rel = rank <= r
  safe_r = xp.maximum(num_rel, 1).astype(fdt)
  inv_pos = xp.where(is_rel & (pos < _FAR), 1.0 / pos.astype(fdt), 0.0).astype(fdt)
  prec_i = rank.astype(fdt) * inv_pos  # precision at the i-th relevant item
  within_r = is_rel & (pos <= r)
  first = pos[:, 0]
  out = {}
  if "precision_at_1" in metrics:
    out["precision_at_1"] = (first == 1).astype(fdt)
  if "recall_at_k" in metrics:
    for k in k_values:
      out[f"recall_at_{k}"] = (first <= k).astype(fdt)
  if "r_precision" in metrics:
    out["r_precision"] = xp.sum(within_r, axis=1).astype(fdt) / safe_r
  if "map_at_r" in metrics:
    out["map_at_r"] = xp.sum(xp.where(within_r, prec_i, 0.0), axis=1) / safe_r
  if "mean_average_precision" in metrics:
    out["mean_average_precision"] = xp.sum(prec_i, axis=1) / safe_r
  if "mean_reciprocal_rank" in metrics:
    out["mean_reciprocal_rank"] = inv_pos[:, 0]
  return out


def _full_ranking_positions(query, gallery, query_labels, gallery_labels, *, max_r,
                            metric, chunk_size, exclude_self, is_sim):
  """[Q, max_r] ascending full-ranking positions of each query's relevant items."""
  n_q = query.shape[0]
  num_rel, members = _relevant_sets(query_labels, gallery_labels, exclude_self, max_r)
  # Chunks of queries with similar R: the counting loop of a chunk stops at
  # the chunk's largest R.
  perm = jnp.argsort(-num_rel, stable=True)
  q_chunks, _, (mem_chunks, r_chunks, qidx_chunks) = _chunked(
      query[perm], chunk_size, members[perm], num_rel[perm], perm.astype(jnp.int32))
  qidx_chunks = jnp.where(r_chunks > 0, qidx_chunks, -1)  # padding never matches a column
  n_g = gallery.shape[0]

  def body(args):
    qc, qi, mem, r = args
    key = _ranking_key(qc, qi, gallery, metric, is_sim, exclude_self)
    rkey = jnp.take_along_axis(key, mem, axis=1)
    col = lax.broadcasted_iota(jnp.int32, (1, n_g), 1)

    def count(m, acc):
      rm = lax.dynamic_slice_in_dim(rkey, m, 1, axis=1)
      jm = lax.dynamic_slice_in_dim(mem, m, 1, axis=1)
      ahead = (key > rm) | ((key == rm) & (col < jm))
      n_ahead = jnp.sum(ahead, axis=1, dtype=jnp.int32)[:, None]
      return lax.dynamic_update_slice_in_dim(acc, n_ahead, m, axis=1)

    ahead = lax.fori_loop(0, jnp.max(r), count, jnp.zeros(mem.shape, jnp.int32))
    slot = lax.broadcasted_iota(jnp.int32, mem.shape, 1)
    pos = jnp.where(slot < r[:, None], ahead + 1, _FAR)
    return jnp.sort(pos, axis=1)

  pos = lax.map(body, (q_chunks, qidx_chunks, mem_chunks, r_chunks))
  pos = pos.reshape(-1, max_r)[:n_q]
  pos = jnp.zeros_like(pos).at[perm].set(pos)
  return pos, num_rel


_STATIC = ("max_r", "k_values", "metric", "chunk_size", "exclude_self", "is_sim", "metrics",
           "normalize")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _positions_impl(query, query_labels, gallery, gallery_labels, *, max_r, k_values, metric,
                    chunk_size, exclude_self, is_sim, metrics, normalize):
  """([Q, S] ascending positions of the relevant items, [Q] R)."""
  if normalize:
    query = distances.l2_normalize(query.astype(jnp.float32))
    gallery = query if gallery is None else distances.l2_normalize(gallery.astype(jnp.float32))
  elif gallery is None:
    gallery = query
  if gallery_labels is None:
    gallery_labels = query_labels
  if any(m in FULL_RANKING_METRICS for m in metrics):
    return _full_ranking_positions(
        query, gallery, query_labels, gallery_labels, max_r=max(max_r, 1), metric=metric,
        chunk_size=chunk_size, exclude_self=exclude_self, is_sim=is_sim)
  need_r = any(m in _NEEDS_R for m in metrics)
  k = max(max(k_values), max_r if need_r else 1)
  idx, _ = _knn_impl(query, gallery, k=k, metric=metric, chunk_size=chunk_size,
                     exclude_self=exclude_self, is_sim=is_sim)
  pos = _positions_from_knn(gallery_labels[idx] == query_labels[:, None])
  num_rel, _ = _relevant_sets(query_labels, gallery_labels, exclude_self, 1)
  return pos, num_rel


@functools.partial(jax.jit, static_argnames=_STATIC)
def _per_query_impl(*args, **kwargs):
  pos, num_rel = _positions_impl(*args, **kwargs)
  out = _metrics_from_positions(pos, num_rel, kwargs["k_values"], kwargs["metrics"])
  out["num_relevant"] = num_rel
  out["valid"] = num_rel > 0
  return out


def _check_query_gallery(query, query_labels, gallery, gallery_labels):
  """Validates shapes and labels of a query set and an optional gallery;
  returns the four as arrays (gallery and its labels may be None)."""
  query, query_labels, gallery, gallery_labels = map(
      _as_array, (query, query_labels, gallery, gallery_labels))
  _checks.embeddings(query, "query")
  _check_nonempty(query, "query")
  _check_integer_labels(query_labels, np.shape(query)[0], "query_labels")
  if (gallery is None) != (gallery_labels is None):
    raise ValueError("`gallery` and `gallery_labels` must be given together, got "
                     f"gallery={'None' if gallery is None else 'an array'} and "
                     f"gallery_labels={'None' if gallery_labels is None else 'an array'}.")
  if gallery is not None:
    _checks.embeddings(gallery, "gallery")
    _check_nonempty(gallery, "gallery")
    _checks.same_dim(query, gallery, "query", "gallery")
    _check_integer_labels(gallery_labels, np.shape(gallery)[0], "gallery_labels")
  return query, query_labels, gallery, gallery_labels


def _prepare(query, query_labels, gallery, gallery_labels, *, max_r, k_values, metric,
             normalize, chunk_size, metrics, exclude_self):
  """Validates the arguments of the per-query functions; returns (args, static kwargs)."""
  query, query_labels, gallery, gallery_labels = _check_query_gallery(
      query, query_labels, gallery, gallery_labels)
  n_q = np.shape(query)[0]
  n_g = n_q if gallery is None else np.shape(gallery)[0]
  excl = _resolve_exclude_self(exclude_self, gallery, n_q, n_g)
  _checks.positive_int(chunk_size, "chunk_size")
  _checks.positive_int(max_r, "max_r", minimum=0)
  k_values = _check_k_values(k_values)
  metrics = _check_metrics_arg(metrics)
  is_sim = _check_metric(metric)
  available = n_g - int(excl)
  if max(k_values) > available:
    raise ValueError(
        f"`k_values` must not exceed the number of gallery items a query can retrieve "
        f"({available}), got max k = {max(k_values)}.")
  if max_r > available:
    raise ValueError(f"`max_r` must be at most {available} (the retrievable gallery), got {max_r}.")
  args = (jnp.asarray(query), jnp.asarray(query_labels),
          None if gallery is None else jnp.asarray(gallery),
          None if gallery_labels is None else jnp.asarray(gallery_labels))
  static = dict(max_r=int(max_r), k_values=k_values, metric=metric, chunk_size=int(chunk_size),
                exclude_self=excl, is_sim=is_sim, metrics=metrics, normalize=bool(normalize))
  return args, static


def retrieval_per_query(query: jax.Array, query_labels: jax.Array,
                        gallery: jax.Array | None = None,
                        gallery_labels: jax.Array | None = None, *, max_r: int,
                        k_values: Sequence[int] = (1, 2, 4, 8),
                        metric: distances.MetricLike = "euclidean", normalize: bool = True,
                        chunk_size: int = 1024, metrics: Iterable[str] | None = None,
                        exclude_self: bool | None = None) -> dict[str, jax.Array]:
  """Per-query retrieval metrics; jittable (the jit-friendly core of
  :func:`retrieval_metrics`).

  See the module docstring for the formulas. Average a metric over the
  queries with ``valid`` True (queries with at least one relevant gallery
  item). Per-query values are float32 here (the host function
  :func:`retrieval_metrics` redoes the final arithmetic in float64).

  Args:
    query: [Q, D] float array.
    query_labels: [Q] integer labels.
    gallery: [G, D] float array, or None (query set = gallery, self excluded).
    gallery_labels: [G] integer labels (required with ``gallery``).
    max_r: static upper bound on R, the number of relevant gallery items of
      a query (the largest gallery class count, minus one in query-is-gallery
      mode). Results are wrong for queries with R > ``max_r``.
    k_values: static ks of ``recall_at_{k}``.
    metric: a :mod:`metric_jax.distances` name or callable.
    normalize: L2-normalise query and gallery first.
    chunk_size: queries per chunk.
    metrics: names among ``KNN_METRICS + FULL_RANKING_METRICS`` (None: all).
    exclude_self: as in :func:`knn`.

  Returns:
    dict of [Q] arrays: one float32 array per metric (``recall_at_{k}`` per
    k), ``num_relevant`` (int32 R) and ``valid`` (bool, R > 0).

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax.evaluation as ev
    >>> x = jnp.array([[0.], [1.], [3.], [4.]])
    >>> y = jnp.array([0, 1, 0, 1])
    >>> f = jax.jit(lambda x, y: ev.retrieval_per_query(
    ...     x, y, max_r=1, k_values=(1,), normalize=False, metrics=("precision_at_1",)))
    >>> f(x, y)["precision_at_1"].tolist()
    [0.0, 0.0, 0.0, 0.0]
  """
  args, static = _prepare(query, query_labels, gallery, gallery_labels, max_r=max_r,
                          k_values=k_values, metric=metric, normalize=normalize,
                          chunk_size=chunk_size, metrics=metrics, exclude_self=exclude_self)
  return _per_query_impl(*args, **static)


# --------------------------------------------------------------------------
# Host-side API: Python floats.
# --------------------------------------------------------------------------


def _host_labels(y: Any) -> np.ndarray:
  return np.asarray(jax.device_get(y))


def _output_names(metrics: Sequence[str], k_values: Sequence[int]) -> list[str]:
  """Metric keys in the documented order."""
  names = []
  for m in _ALL_METRICS:
    if m in metrics:
      names.extend([f"recall_at_{k}" for k in k_values] if m == "recall_at_k" else [m])
  return list(dict.fromkeys(names))


def _as_array(x: Any) -> Any:
  """Python lists / tuples -> NumPy (arrays pass through untouched)."""
  return np.asarray(x) if isinstance(x, (list, tuple)) else x


def retrieval_metrics(query: Any, query_labels: Any, gallery: Any | None = None,
                      gallery_labels: Any | None = None, *,
                      k_values: Sequence[int] = (1, 2, 4, 8),
                      metric: distances.MetricLike = "euclidean", normalize: bool = True,
                      chunk_size: int = 1024, metrics: Iterable[str] | None = None,
                      per_class: bool = False,
                      exclude_self: bool | None = None) -> dict[str, float]:
  """Retrieval metrics of a labelled query set against a gallery, as floats.

  Host function (not jittable): the labels must be concrete, since the
  number of neighbours needed for R-precision / MAP@R is the largest class
  count. Inside ``jit`` use :func:`retrieval_per_query` with a static
  ``max_r``. Formulas in the module docstring.

  Args:
    query: [Q, D] float array (NumPy or JAX).
    query_labels: [Q] integer labels.
    gallery: [G, D] float array, or None: the query set is the gallery and a
      query never retrieves itself.
    gallery_labels: [G] integer labels (required with ``gallery``).
    k_values: the ks of ``recall_at_{k}``.
    metric: a :mod:`metric_jax.distances` name or callable.
    normalize: L2-normalise before evaluation (the DML convention).
    chunk_size: queries per chunk (memory ``O(chunk_size * G)``).
    metrics: subset of ``("precision_at_1", "recall_at_k", "r_precision",
      "map_at_r", "mean_average_precision", "mean_reciprocal_rank")``; None
      means all. Leaving out the last two skips the full-ranking pass.
    per_class: also return ``"{metric}/class_{label}"``: the mean over the
      valid queries of each class.
    exclude_self: as in :func:`knn`.

  Returns:
    dict of floats with keys ``precision_at_1``, ``recall_at_{k}`` for each
    k, ``r_precision``, ``map_at_r``, ``mean_average_precision``,
    ``mean_reciprocal_rank`` (those requested), ``num_queries`` (queries
    evaluated) and ``num_excluded_queries`` (queries whose class has no other
    gallery member; excluded as in PML). Metrics are NaN if no query is
    valid.

  Raises:
    ValueError / TypeError: mismatched lengths, non-integer labels, empty
      inputs, k larger than the gallery, NaN/inf embeddings.

  Example:
    >>> import numpy as np, metric_jax.evaluation as ev
    >>> q = np.array([[1., 0.], [0., 1.]], np.float32)
    >>> g = np.array([[1., .1], [.1, 1.], [1., -.1]], np.float32)
    >>> out = ev.retrieval_metrics(q, np.array([0, 1]), g, np.array([1, 0, 0]),
    ...                            k_values=(1,), metrics=("precision_at_1", "r_precision"))
    >>> out
    {'precision_at_1': 0.0, 'r_precision': 0.25, 'num_queries': 2.0, 'num_excluded_queries': 0.0}
  """
  query, query_labels, gallery, gallery_labels = _check_query_gallery(
      query, query_labels, gallery, gallery_labels)
  n_q = np.shape(query)[0]
  for name, a in (("query_labels", query_labels), ("gallery_labels", gallery_labels)):
    if a is not None and not _is_concrete(a):
      raise TypeError(f"`{name}` must be concrete (retrieval_metrics is a host function); "
                      "under jit use retrieval_per_query with a static max_r.")
  _check_finite(query, "query")
  if gallery is not None:
    _check_finite(gallery, "gallery")
  metrics = _check_metrics_arg(metrics)
  k_values = _check_k_values(k_values)

  # Dense int32 label codes shared by query and gallery (any integer dtype in).
  ql = _host_labels(query_labels)
  gl = ql if gallery_labels is None else _host_labels(gallery_labels)
  uniq, codes = np.unique(np.concatenate([ql, gl]), return_inverse=True)
  qcodes = codes[:n_q].astype(np.int32)
  gcodes = qcodes if gallery is None else codes[n_q:].astype(np.int32)
  n_g = len(gcodes)
  excl = _resolve_exclude_self(exclude_self, gallery, n_q, n_g)
  if excl and gallery is not None and not np.array_equal(gcodes[:n_q], qcodes):
    raise ValueError("`exclude_self=True` means query i is gallery item i, but "
                     "`gallery_labels[:Q]` differs from `query_labels`.")
  counts = np.bincount(gcodes, minlength=len(uniq))
  num_rel = counts[qcodes] - int(excl)
  max_r = int(num_rel.max()) if n_q else 0

  args, static = _prepare(
      query, qcodes, gallery, None if gallery is None else gcodes, max_r=max_r,
      k_values=k_values, metric=metric, normalize=normalize, chunk_size=chunk_size,
      metrics=metrics, exclude_self=excl)
  pos, num_rel_q = jax.device_get(_positions_impl(*args, **static))
  # Per-query arithmetic in float64 on the host (the same formulas as under jit).
  per_q = _metrics_from_positions(np.asarray(pos), np.asarray(num_rel_q), k_values, metrics,
                                  xp=np)
  per_q = {name: per_q[name] for name in _output_names(metrics, k_values)}
  valid = num_rel > 0
  n_valid = int(valid.sum())
  out: dict[str, float] = {}
  for name, vals in per_q.items():
    vals = np.asarray(vals, np.float64)[valid]
    out[name] = float(vals.mean()) if n_valid else float("nan")
  out["num_queries"] = float(n_valid)
  out["num_excluded_queries"] = float(n_q - n_valid)
  if per_class:
    vq = qcodes[valid]
    for name, vals in per_q.items():
      vals = np.asarray(vals, np.float64)[valid]
      sums = np.bincount(vq, weights=vals, minlength=len(uniq))
      cnt = np.bincount(vq, minlength=len(uniq))
      for c in np.flatnonzero(cnt):
        out[f"{name}/class_{uniq[c]}"] = float(sums[c] / cnt[c])
  return out


def evaluate(embeddings: Any, labels: Any, *, gallery: Any | None = None,
             gallery_labels: Any | None = None, k_values: Sequence[int] = (1, 2, 4, 8),
             metric: distances.MetricLike = "euclidean", normalize: bool = True,
             chunk_size: int = 1024, clustering: bool = True, key: jax.Array | None = None,
             num_kmeans_restarts: int = 1, num_kmeans_iters: int = 20,
             metrics: Iterable[str] | None = None) -> dict[str, float]:
  """Every retrieval metric plus k-means NMI/AMI, as a dict of floats.

  The one-call evaluation of the DML protocol: ``embeddings`` are the
  queries; without ``gallery`` they are also the gallery (each query's own
  index excluded), with ``gallery`` / ``gallery_labels`` the In-Shop style
  split. Clustering runs k-means (k-means++ init, Lloyd iterations; see
  :func:`metric_jax.clustering.kmeans`) on the (normalised) query embeddings
  with as many clusters as query classes, and scores it against the labels.

  Host function (concrete inputs; NumPy or JAX arrays).

  Args:
    embeddings: [N, D] float query embeddings.
    labels: [N] integer labels.
    gallery: optional [G, D] gallery embeddings.
    gallery_labels: optional [G] gallery labels.
    k_values: the ks of ``recall_at_{k}``.
    metric: a :mod:`metric_jax.distances` name or callable.
    normalize: L2-normalise before evaluation and clustering.
    chunk_size: queries per chunk.
    clustering: also compute ``nmi`` and ``ami``.
    key: PRNG key of k-means (default ``jax.random.key(0)``: deterministic).
    num_kmeans_restarts: k-means restarts (the lowest inertia is kept).
    num_kmeans_iters: Lloyd iterations (20, like PML's faiss k-means).
    metrics: retrieval metrics to compute (None: all), see
      :func:`retrieval_metrics`.

  Returns:
    dict of floats: ``precision_at_1``, ``recall_at_{k}``, ``r_precision``,
    ``map_at_r``, ``mean_average_precision``, ``mean_reciprocal_rank``,
    ``nmi``, ``ami`` (with ``clustering``), ``num_queries``,
    ``num_excluded_queries``.

  Example:
    >>> import numpy as np, metric_jax.evaluation as ev
    >>> emb = np.array([[1., 0.], [.9, .1], [0., 1.], [.1, .9]], np.float32)
    >>> out = ev.evaluate(emb, np.array([0, 0, 1, 1]), k_values=(1,))
    >>> [round(out[k], 4) for k in ("precision_at_1", "map_at_r", "nmi", "ami")]
    [1.0, 1.0, 1.0, 1.0]
  """
  embeddings, labels = _as_array(embeddings), _as_array(labels)
  _checks.embeddings(embeddings, "embeddings")
  _checks.labels(labels, np.shape(embeddings)[0], "labels")
  out = retrieval_metrics(
      embeddings, labels, gallery, gallery_labels, k_values=k_values, metric=metric,
      normalize=normalize, chunk_size=chunk_size, metrics=metrics)
  if clustering:
    from metric_jax import clustering as clustering_lib  # pylint: disable=g-import-not-at-top
    _checks.positive_int(num_kmeans_restarts, "num_kmeans_restarts")
    _checks.positive_int(num_kmeans_iters, "num_kmeans_iters")
    x = jnp.asarray(embeddings, jnp.float32)
    if normalize:
      x = distances.l2_normalize(x)
    y = _host_labels(labels)
    k = int(len(np.unique(y)))
    if key is None:
      key = jax.random.key(0)
    result = clustering_lib.kmeans(x, k, key=key, num_iters=num_kmeans_iters,
                                   num_restarts=num_kmeans_restarts)
    pred = np.asarray(jax.device_get(result.assignments))
    out["nmi"] = float(clustering_lib.nmi(y, pred))
    out["ami"] = float(clustering_lib.ami(y, pred))
  return out
