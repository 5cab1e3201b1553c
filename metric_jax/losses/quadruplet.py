"""Quadruplet loss (Chen, Chen, Zhang, Huang, CVPR 2017) over every valid
quadruplet of the batch, in O(B M log(B M)) time and O(B M) memory.

Memory. The triplet term uses the exact sorted batch-all form of
:mod:`metric_jax.losses.triplet` (its sorted-negatives helpers). The second term,
``sum_{(i,j) in P} sum_{(l,k) in N_c} [d_ij - d_lk + alpha_2]_+``, depends on
a positive pair only through its distance and its class ``c``; ``N_c`` is
the set of negative pairs with neither sample in class ``c``. Its active
part is ``n * t - S`` with ``t = d_ij + alpha_2``, ``n`` the number of
pairs in ``N_c`` closer than ``t`` and ``S`` the sum of their distances.
Counting over ``N_c`` = all negative pairs - those whose anchor-side sample
is in ``c`` - those whose reference-side sample is in ``c`` (a negative pair
cannot have both), and each count is a rank in a sorted array: one sort of
all negative-pair distances and two segmented by class (one per side):
data and queries are sorted together by value once, then stably by class
once per side (LSD radix passes of single-operand uint32 sorts, XLA's fast
path on CPU), and counts and sums are segmented prefix sums. Nothing of
size B^3 or B^4 is built.
"""

from __future__ import annotations

__all__ = ["quadruplet_loss"]

import functools

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.losses import triplet as triplet_lib

REDUCTIONS = ("mean", "mean_nonzero", "sum")


def _segment_prefix(values: jax.Array, weight: jax.Array,
                    start_index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exclusive prefix sums of ``values`` and counts of ``weight`` within
  segments (``start_index``: where each element's segment begins).

  A plain float32 cumsum loses the small in-segment sums to the large
  prefix of the earlier segments. The value is therefore computed in two
  parts: an integer part on a grid fine enough that every prefix fits in
  int32 (exact), and the float32 remainders, which are tiny. The gradient
  is that of the plain cumsum (a linear map), which is exact. Two cumsums
  in all (one float32 stack, one int32), to keep compilation cheap.
  """
  v = jax.lax.stop_gradient(values)
  scale = jnp.maximum(jnp.sum(jnp.abs(v)) / 2.0**30, jnp.finfo(jnp.float32).tiny)
  q = jnp.round(v / scale)
  lo = v - q * scale
  # Counts are exact in float32 below 2^24 entries.
  stack = jnp.stack([values, lo, weight.astype(jnp.float32)])
  incl = jnp.cumsum(stack, axis=1)
  excl = incl - stack
  excl = excl - excl[:, start_index]
  qi = jnp.cumsum(q.astype(jnp.int32)) - q.astype(jnp.int32)
  qi = qi - qi[start_index]
  plain, lo_c, count = excl[0], excl[1], excl[2]
  exact = qi.astype(jnp.float32) * scale + lo_c
  return plain + jax.lax.stop_gradient(exact - plain), count.astype(jnp.int32)


def _prefix_at_queries(perm, start, values, weight, n_queries):
  """Counts and sums of the data strictly before each query within its
  segment, for one sorted order ``perm`` (queries sort before equal data);
  ``start=None``: one segment."""
  size = perm.shape[0]
  index = jnp.arange(size, dtype=jnp.int32)
  if start is None:
    # Not a cummax of a constant: XLA would constant-fold it, which takes
    # tens of seconds of compilation at B = 1024.
    start_index = jnp.zeros((size,), jnp.int32)
  else:
    start_index = jax.lax.cummax(jnp.where(start, index, 0))
  total, count = _segment_prefix(values[perm], weight[perm], start_index)
  # Queries occupy the first n_queries slots of the unsorted array.
  position = jnp.zeros((size,), jnp.int32).at[perm].set(index)[:n_queries]
  return count[position], total[position]


def _orderable_bits(x: jax.Array) -> jax.Array:
  """uint32 keys whose unsigned order is the float32 order (-0.0 == 0.0)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32) + 0.0, jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(1 << 31))


def _stable_argsort_bits(key: jax.Array, nbits: int, order: jax.Array) -> jax.Array:
  """Stable reordering of ``order`` by the low ``nbits`` of the uint32
  ``key`` (indexed by original position): an LSD radix sort whose passes
  are single-operand uint32 sorts of ``digit << p | position``, which XLA
  runs several times faster on CPU than a sort carrying an index operand."""
  n = key.shape[0]
  pos_bits = max(1, (n - 1).bit_length())
  digit_bits = 32 - pos_bits
  if digit_bits < 1:
    raise ValueError(f"too many elements to sort: {n}")
  position = jnp.arange(n, dtype=jnp.uint32)
  pos_mask = jnp.uint32((1 << pos_bits) - 1)
  for shift in range(0, nbits, digit_bits):
    width = min(digit_bits, nbits - shift)
    digit = (key[order] >> shift) & jnp.uint32((1 << width) - 1)
    packed = jnp.sort((digit << pos_bits) | position)
    order = order[(packed & pos_mask).astype(jnp.int32)]
  return order


@functools.partial(jax.jit, static_argnames=("num_segments",))
def segmented_count_sum(data_val: jax.Array, data_valid: jax.Array,
                        query_val: jax.Array, segments=(), *,
                        num_segments: int = 1) -> tuple[jax.Array, jax.Array]:
  """For each query: how many valid data entries lie strictly below it, and
  their sum -- over all data, and within the query's segment for each
  segmentation in ``segments``.

  ``count[0, q] = #{n : valid_n, val_n < qval_q}`` and, for segmentation
  ``s = 1..S`` given as ``(data_seg [N], query_seg [Q])`` with ids in
  ``[0, num_segments)``,
  ``count[s, q] = #{n : valid_n, data_seg_n = query_seg_q, val_n < qval_q}``;
  ``sum`` holds the matching sums of ``val_n``. Data and queries are sorted
  together once by value (stable, queries first, so equal values do not
  count), then once per segmentation by segment (stable, so the value order
  survives inside each segment); counts and sums are segmented prefix sums.
  Differentiable in ``data_val``. ``N + Q`` must stay below 2^24.

  Args:
    data_val: [N] float values.
    data_valid: [N] bool, False entries are ignored.
    query_val: [Q] float thresholds.
    segments: tuple of ``(data_seg [N] int, query_seg [Q] int)`` pairs.
    num_segments: static bound on the segment ids.

  Returns:
    ``(count [1 + S, Q] int32, sum [1 + S, Q] float32)``.
  """
  q = query_val.shape[0]
  n = data_val.shape[0]
  key = _orderable_bits(jax.lax.stop_gradient(jnp.concatenate([query_val, data_val])))
  identity = jnp.arange(q + n, dtype=jnp.int32)
  by_value = _stable_argsort_bits(key, 32, identity)
  values = jnp.concatenate([jnp.zeros((q,), data_val.dtype),
                            jnp.where(data_valid, data_val, 0.0)])
  weight = jnp.concatenate([jnp.zeros((q,), bool), data_valid])
  counts, sums = [], []
  c, t = _prefix_at_queries(by_value, None, values, weight, q)
  counts.append(c)
  sums.append(t)
  seg_bits = max(1, (num_segments - 1).bit_length())
  for data_seg, query_seg in segments:
    seg = jnp.concatenate([query_seg, data_seg]).astype(jnp.uint32)
    perm = _stable_argsort_bits(seg, seg_bits, by_value)
    seg_sorted = seg[perm]
    start = jnp.concatenate([jnp.ones((1,), bool), seg_sorted[1:] != seg_sorted[:-1]])
    c, t = _prefix_at_queries(perm, start, values, weight, q)
    counts.append(c)
    sums.append(t)
  return jnp.stack(counts), jnp.stack(sums)


@functools.partial(jax.jit, static_argnames=("symmetric",))
def _quadruplet_sums(dist, pos, neg, labels, col_labels, margins, weights, adaptive,
                     *, symmetric: bool):
  """``(total, nonzero, valid)`` of each term from the distance matrix and
  masks. Jitted, and independent of the reduction and of ``adaptive``
  (traced), so eager calls compile once per shape."""
  mu_p, _ = reductions.per_anchor_mean(dist.reshape(1, -1), pos.reshape(1, -1))
  mu_n, _ = reductions.per_anchor_mean(dist.reshape(1, -1), neg.reshape(1, -1))
  gap = jax.lax.stop_gradient(mu_n[0] - mu_p[0])
  alpha1 = jnp.where(adaptive, weights[0] * gap, margins[0])
  alpha2 = jnp.where(adaptive, weights[1] * gap, margins[1])

  # Term 1: exact batch-all triplet sums from each anchor's sorted negatives
  # (the method of triplet._batch_all_sorted, kept unreduced here).
  srt = triplet_lib._sort_negatives(dist, neg)  # pylint: disable=protected-access
  t1 = dist + alpha1
  k_hi = jnp.minimum(triplet_lib._rank(srt.values, t1, "left"), srt.count[:, None])  # pylint: disable=protected-access
  sums1 = k_hi.astype(jnp.float32) * t1 - jnp.take_along_axis(srt.csum, k_hi, axis=1)
  total1 = jnp.sum(jnp.where(pos, sums1, 0.0))
  nonzero1 = jnp.sum(jnp.where(pos, k_hi.astype(jnp.float32), 0.0))
  valid1 = jnp.sum(jnp.where(pos, srt.count[:, None].astype(jnp.float32), 0.0))

  b, m = dist.shape
  # Dense class ids in [0, B + M) for the segment sorts.
  all_labels = jnp.sort(jnp.concatenate([labels, col_labels]))
  dense = lambda y: jnp.searchsorted(all_labels, y, side="left").astype(jnp.int32)
  row_lab = jnp.broadcast_to(dense(labels)[:, None], (b, m)).reshape(-1)
  col_lab = jnp.broadcast_to(dense(col_labels)[None, :], (b, m)).reshape(-1)
  anchor_class = row_lab                                  # class of pair (i, j)
  d_flat = dist.reshape(-1)
  neg_flat = neg.reshape(-1)
  threshold = d_flat + alpha2                             # active iff d_lk < t

  # Segmentations: 0 = all negative pairs (one segment); 1 = by the class of
  # the pair's anchor-side sample; 2 = by the class of its reference-side
  # sample. Without a reference set or pair mask, 2 mirrors 1 (neg and dist
  # are symmetric), so it is not computed.
  segments = ((row_lab, anchor_class),)
  if not symmetric:
    segments += ((col_lab, anchor_class),)
  cnt, tot = segmented_count_sum(d_flat, neg_flat, threshold, segments,
                                 num_segments=b + m)
  g_cnt, r_cnt, g_sum, r_sum = cnt[0], cnt[1], tot[0], tot[1]
  c_cnt, c_sum = (r_cnt, r_sum) if symmetric else (cnt[2], tot[2])
  n_active = g_cnt - r_cnt - c_cnt
  active_sum = n_active.astype(jnp.float32) * threshold - (g_sum - r_sum - c_sum)

  # Valid negative pairs per anchor class, for "mean".
  row_count = jnp.sum(neg, axis=1)
  col_count = jnp.sum(neg, axis=0)
  same_rows = labels[:, None] == labels[None, :]
  same_cols = labels[:, None] == col_labels[None, :]
  excluded = (jnp.sum(jnp.where(same_rows, row_count[None, :], 0), axis=1)
              + jnp.sum(jnp.where(same_cols, col_count[None, :], 0), axis=1))
  n_valid = jnp.sum(row_count) - excluded                 # [B]

  pos_flat = pos.reshape(-1)
  total2 = jnp.sum(jnp.where(pos_flat, active_sum, 0.0))
  # Counts of quadruplets exceed int32 at large B: accumulate in float32.
  nonzero2 = jnp.sum(jnp.where(pos_flat, n_active.astype(jnp.float32), 0.0))
  valid2 = jnp.sum(jnp.where(pos, n_valid[:, None].astype(jnp.float32), 0.0))
  return (total1, nonzero1, valid1), (total2, nonzero2, valid2)


def _reduce(sums, reduction: str) -> jax.Array:
  total, nonzero, valid = sums
  if reduction == "sum":
    return total
  count = valid if reduction == "mean" else nonzero
  return total / jnp.maximum(count, 1.0)


def quadruplet_loss(embeddings: jax.Array, labels: jax.Array,
                    ref_embeddings: jax.Array | None = None,
                    ref_labels: jax.Array | None = None, *,
                    margin1: float = 0.2, margin2: float = 0.1,
                    adaptive: bool = False,
                    adaptive_weights: tuple[float, float] = (1.0, 0.5),
                    squared: bool = False, distance="euclidean",
                    reduction: str = "mean",
                    where: jax.Array | None = None,
                    ref_where: jax.Array | None = None,
                    pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Quadruplet loss over all valid quadruplets of the batch.

  ::

    L = R( [d_ij - d_ik + alpha_1]_+  over  y_i = y_j, i != j, y_k != y_i )
      + R( [d_ij - d_lk + alpha_2]_+  over  y_i = y_j, i != j,
                                             y_l != y_i, y_k != y_i, y_l != y_k )

  ``R`` is ``reduction`` applied to each term separately (the two results
  are added). The second term compares a positive pair with a negative pair
  ``(l, k)`` in which *neither* sample has the anchor's class (ALGORITHMS.md
  section 6); since ``y_j = y_i`` this also keeps i and j out of the
  negative pair, so the pair shares no sample with the positive pair. Pairs
  are ordered: ``(l, k)`` and ``(k, l)`` both count (means are unchanged).
  For a similarity ``s``, ``d = -s``.

  Margins: fixed ``margin1 > margin2`` by default (the paper wants the
  triplet term to dominate; Roth et al.'s Euclidean variant uses 0.2 for
  both). With ``adaptive=True``:
  ``alpha = w * stop_gradient(mean d over negative pairs - mean d over
  positive pairs)`` with ``w = adaptive_weights`` (1 and 0.5, the paper's
  values as reported by secondary summaries); ``margin1``/``margin2`` are
  then ignored. The paper uses squared outputs of a learned metric g;
  ``squared=True`` squares the distance (any distance callable stands in for
  g), ``squared=False`` (default) is Roth et al.'s non-squared Euclidean.

  With ``ref_embeddings``, positive pairs are (anchor i, reference j) and
  negative pairs (anchor l, reference k) come from the same [B, M] matrix.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    margin1: alpha_1, margin of the triplet term.
    margin2: alpha_2, margin of the negative-pair term.
    adaptive: use the paper's batch-adaptive margins.
    adaptive_weights: ``(w_1, w_2)`` of the adaptive margins.
    squared: square the distance (distances only).
    distance: metric name or callable.
    reduction: ``"mean"`` (default), ``"mean_nonzero"`` or ``"sum"``, per
      term. (``"none"`` is not offered: it would need B^3 and B^4 arrays.)
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool; restricts positive pairs, triplet negatives and
      the negative pairs of the second term.

  Returns:
    Scalar float32 loss.

  References:
    Chen, Chen, Zhang, Huang, "Beyond triplet loss: a deep quadruplet
    network for person re-identification", CVPR 2017, arXiv 1704.01719.
    Roth et al., "Revisiting Training Strategies and Generalization
    Performance in Deep Metric Learning", ICML 2020, arXiv 2002.08473.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[0., 0.], [0., 0.3], [1., 0.], [1., 0.2], [0.3, 0.1], [0.2, 0.2]])
    >>> labels = jnp.array([0, 0, 1, 1, 2, 2])
    >>> round(float(mj.losses.quadruplet_loss(emb, labels, margin1=1.0, margin2=0.5)), 4)
    0.6731
  """
  _checks.choice(reduction, REDUCTIONS, "reduction")
  _checks.scalar(margin1, "margin1")
  _checks.scalar(margin2, "margin2")
  if len(tuple(adaptive_weights)) != 2:
    raise ValueError(
        f"`adaptive_weights` must be a pair (w_1, w_2), got {adaptive_weights!r}.")
  if squared and distances_lib.is_similarity(distance):
    raise ValueError(
        f"`squared=True` needs a distance, got the similarity `distance`={distance!r}.")
  metric = distance
  if squared and distance == "euclidean":
    metric = "squared_euclidean"
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=metric, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  dist = -problem.matrix if problem.is_similarity else problem.matrix
  if squared and distance != "euclidean":
    dist = jnp.square(dist)
  pos, neg = problem.masks.pos, problem.masks.neg

  col_labels = labels if ref_labels is None else ref_labels
  symmetric = ref_embeddings is None and pair_mask is None
  margins = jnp.stack([jnp.asarray(margin1, jnp.float32), jnp.asarray(margin2, jnp.float32)])
  weights = jnp.asarray(tuple(adaptive_weights), jnp.float32)
  term1, term2 = _quadruplet_sums(dist, pos, neg, labels, col_labels, margins, weights,
                                  jnp.asarray(bool(adaptive)), symmetric=symmetric)
  return _reduce(term1, reduction) + _reduce(term2, reduction)
