"""Triplet margin loss (FaceNet) with batch-all, batch-hard, semi-hard and
easy-positive mining, soft margin and anchor swap.

Memory. Batch-all never builds a [B, M, M] tensor. When no anchor has more
than 16 positives (PK batches) it works on a [B, P, M] grid of each anchor's
positives, P in (4, 8, 16) the smallest that holds them; otherwise (decided at
run time with ``lax.cond``), with the hinge
it uses an exact O(B M log M) form, sorting each anchor's negative distances
once and reading every positive pair's active negatives from a prefix sum,
and with ``soft=True`` or ``swap=True`` it streams over tiles of anchors
(``anchor_tile``), recomputing each tile in the backward pass. Only
``reduction="none"`` with batch-all materialises the cube.
"""

from __future__ import annotations

__all__ = ["triplet_margin_loss"]

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.losses import _grid
from metric_jax.streaming import _engine as streaming_engine

MINING = ("all", "hard", "semihard", "easy")
SEMIHARD = ("facenet", "tf")
BAND_SELECT = ("all", "hardest")

# Budget for one tile of the streamed batch-all path, in [t, M, M] elements.
_TILE_ELEMENTS = 1 << 22
# Batch-all works on a [B, P, M] grid over each anchor's first P positives,
# P the smallest of these sizes that holds every anchor's positives (chosen
# at run time with lax.cond; exact, e.g. P = 4 for PK batches with K <= 5),
# and falls back to the sorted or streamed path when an anchor has more than
# the largest. An empty tuple disables the grid.
_FAST_POSITIVES = (4, 8, 16)


class _SortedNegatives(NamedTuple):
  """Each anchor's negative distances sorted ascending.

  values: [B, M] sorted distances, invalid slots filled with a large value.
  index:  [B, M] column index of each sorted slot.
  csum:   [B, M + 1] prefix sums of the valid sorted distances.
  count:  [B] number of negatives of each anchor.
  """
  values: jax.Array
  index: jax.Array
  csum: jax.Array
  count: jax.Array


def _sort_negatives(dist: jax.Array, neg: jax.Array) -> _SortedNegatives:
  big = jnp.finfo(jnp.float32).max
  keys = jnp.where(neg, dist, big)
  index = jnp.argsort(keys, axis=1)
  values = jnp.take_along_axis(keys, index, axis=1)
  count = jnp.sum(neg, axis=1)
  slot_valid = jnp.arange(dist.shape[1])[None, :] < count[:, None]
  csum = jnp.cumsum(jnp.where(slot_valid, values, 0.0), axis=1)
  csum = jnp.pad(csum, ((0, 0), (1, 0)))
  return _SortedNegatives(values, index, csum, count)


def _rank(sorted_values: jax.Array, queries: jax.Array, side: str) -> jax.Array:
  """Per row: how many sorted values are < (side='left') or <= (side='right')
  each query. [B, M] sorted x [B, M] queries -> [B, M] int."""
  return jax.vmap(lambda s, q: jnp.searchsorted(s, q, side=side, method="scan"))(
      sorted_values, queries)


def _softplus(x: jax.Array) -> jax.Array:
  """Stable ``log(1 + e^x)``; cheaper on CPU than ``jnp.logaddexp(x, 0)``."""
  return jax.nn.relu(x) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _hinge(x: jax.Array, margin, soft: bool) -> jax.Array:
  return _softplus(x + margin) if soft else jax.nn.relu(x + margin)


def _reduce_sums(total, nonzero, valid, reduction: str) -> jax.Array:
  if reduction == "sum":
    return total
  count = valid if reduction == "mean" else nonzero
  return total / jnp.maximum(count, 1.0)


def _batch_all_sorted(dist, pos, neg, margin, band: bool, reduction: str):
  """Exact batch-all (or semi-hard band, every member) hinge loss from sorted
  negatives; never forms a triplet tensor."""
  srt = _sort_negatives(dist, neg)
  threshold = dist + margin                      # [B, M]: active iff d_an < t
  k_hi = _rank(srt.values, threshold, "left")    # negatives with d_an < t
  k_hi = jnp.minimum(k_hi, srt.count[:, None])
  if band:
    k_lo = _rank(srt.values, dist, "right")      # negatives with d_an <= d_ap
    k_lo = jnp.minimum(k_lo, k_hi)
  else:
    k_lo = jnp.zeros_like(k_hi)
  gather = lambda k: jnp.take_along_axis(srt.csum, k, axis=1)
  n_active = (k_hi - k_lo)
  sums = n_active.astype(jnp.float32) * threshold - (gather(k_hi) - gather(k_lo))
  total = jnp.sum(jnp.where(pos, sums, 0.0))
  # Triplet counts pass 2^31 at large B: accumulate them in float32.
  nonzero = jnp.sum(jnp.where(pos, n_active, 0), dtype=jnp.float32)
  if band:
    valid = nonzero
  else:
    valid = jnp.sum(jnp.where(pos, srt.count[:, None], 0), dtype=jnp.float32)
  return _reduce_sums(total, nonzero, valid, reduction)


def _triplet_cube_row(d_a, pos_a, neg_a, ref_dist, margin, soft, swap, band):
  """Terms and mask of one anchor's [M, M] (positive x negative) grid."""
  d_ap = d_a[:, None]
  d_an = jnp.broadcast_to(d_a[None, :], (d_a.shape[0], d_a.shape[0]))
  mask = pos_a[:, None] & neg_a[None, :]
  if band:
    mask = mask & (d_an > d_ap) & (d_an < d_ap + margin)
  if swap:
    d_an = jnp.minimum(d_an, ref_dist)
  return _hinge(d_ap - d_an, margin, soft), mask


def _batch_all_streamed(dist, pos, neg, ref_dist, margin, soft, swap, band,
                        reduction, tile):
  m = dist.shape[1]
  if tile is None:
    tile = max(1, min(dist.shape[0], _TILE_ELEMENTS // max(m * m, 1)))

  @jax.checkpoint
  def row_stats(args):
    d_a, pos_a, neg_a = args
    terms, mask = _triplet_cube_row(d_a, pos_a, neg_a, ref_dist, margin, soft,
                                    swap, band)
    terms = jnp.where(mask, terms, 0.0)
    return (jnp.sum(terms), jnp.sum(mask & (terms > 0)), jnp.sum(mask))

  total, nonzero, valid = jax.lax.map(row_stats, (dist, pos, neg), batch_size=tile)
  return _reduce_sums(jnp.sum(total), jnp.sum(nonzero, dtype=jnp.float32),
                      jnp.sum(valid, dtype=jnp.float32), reduction)


def _gathered_terms(dist, p_idx, p_valid, neg, ref_dist, margin, soft, swap, band):
  """Terms and mask [b, P, M] of the anchors' positive slots ``p_idx`` [b, P]
  against every reference (``dist`` [b, M], ``neg`` [b, M])."""
  p, m = p_idx.shape[1], dist.shape[1]
  d_ap = jnp.take_along_axis(dist, p_idx, axis=1)[:, :, None]    # [b, P, 1]
  d_an = jnp.broadcast_to(dist[:, None, :], (dist.shape[0], p, m))
  mask = p_valid[:, :, None] & neg[:, None, :]
  if band:
    mask = mask & (d_an > d_ap) & (d_an < d_ap + margin)
  if swap:
    d_an = jnp.minimum(d_an, ref_dist[p_idx])                    # d_pn: [b, P, M]
  return _hinge(d_ap - d_an, margin, soft), mask


def _batch_all_gathered(dist, pos, neg, ref_dist, margin, soft, swap, band,
                        reduction, max_positives):
  """Batch-all over each anchor's (at most ``max_positives``) positives only:
  a [B, P, M] grid instead of [B, M, M]. If an anchor has more positives than
  ``max_positives`` the result is NaN (loud, never silently truncated).

  Large grids are reduced in tiles of anchors (:func:`_grid.over_anchors`)."""
  b, m = dist.shape
  p = min(max_positives, m)
  p_idx, p_valid = _grid.first_positive_columns(pos, p)         # [B, P]
  overflow = jnp.any(_grid.positive_counts(pos) > p)

  rows = (dist, p_idx, p_valid, neg)
  if _grid.in_one_piece(b * p * m):
    terms, mask = _gathered_terms(*rows, ref_dist, margin, soft, swap, band)
    result = reductions.reduce(terms, mask, reduction)
  else:
    def anchor_stats(*rows):   # [1] total, counts of non-zero and of valid terms
      terms, mask = _gathered_terms(*rows, ref_dist, margin, soft, swap, band)
      terms = jnp.where(mask, terms, 0.0)
      count = lambda m: jnp.sum(m, axis=(1, 2), dtype=jnp.float32)
      return jnp.sum(terms, axis=(1, 2)), count(mask & (terms > 0)), count(mask)

    total, nonzero, valid = _grid.over_anchors(anchor_stats, rows, p * m)
    result = _reduce_sums(jnp.sum(total), jnp.sum(nonzero), jnp.sum(valid), reduction)
  return jnp.where(overflow, jnp.nan, result)


def _argmax_masked(values, mask):
  return reductions.first_argmax(jnp.where(mask, values, -jnp.inf), axis=1)


def triplet_margin_loss(embeddings: jax.Array, labels: jax.Array,
                        ref_embeddings: jax.Array | None = None,
                        ref_labels: jax.Array | None = None, *,
                        margin: float = 0.2, mining: str = "all",
                        semihard: str = "facenet", band_select: str = "all",
                        soft: bool = False, swap: bool = False,
                        distance="euclidean", reduction: str = "mean_nonzero",
                        where: jax.Array | None = None,
                        ref_where: jax.Array | None = None,
                        pair_mask: jax.Array | None = None,
                        anchor_tile: int | None = None,
                        max_positives: int | None = None) -> jax.Array:
  r"""Triplet margin loss ``h(d_ap - d_an + margin)`` with online mining.

  ``h`` is the hinge ``[x]_+`` or, with ``soft=True``, ``softplus`` (PML's
  ``smooth_loss``; Hermans et al.'s soft margin is ``soft=True, margin=0``).
  For a similarity metric ``d = -s`` (so ``s_an - s_ap + margin``). With
  ``swap=True`` ``d_an`` becomes ``min(d_an, d_pn)`` (Balntas et al. 2016).

  Mining (``mining=``):

  * ``"all"``: every valid triplet ``a != p, y_a = y_p, y_n != y_a``.
  * ``"hard"``: batch-hard (Hermans et al. 2017), one triplet per anchor with
    its farthest positive and nearest negative; anchors lacking either are
    dropped.
  * ``"semihard"`` with ``semihard="facenet"`` (default): triplets in the band
    ``d_ap < d_an < d_ap + margin``; ``band_select="all"`` uses every band
    member (PML's ``TripletMarginMiner(type_of_triplets="semihard")``),
    ``"hardest"`` only the nearest band negative of each positive pair; an
    empty band contributes nothing.
    With ``semihard="tf"`` (TF-Addons ``triplet_semihard_loss``): per
    positive pair the nearest negative farther than the positive, or if none
    the farthest negative; use ``reduction="mean"`` to match TF-Addons.
  * ``"easy"``: easy-positive mining (Xuan et al., WACV 2020), per anchor the
    nearest positive and the nearest negative.

  PML equivalences (on L2-normalised embeddings, ``distance="euclidean"``):
  ``TripletMarginLoss(margin=m)`` is ``mining="all", margin=m``;
  ``BatchHardMiner`` + ``TripletMarginLoss`` is ``mining="hard"``, both with
  the default ``reduction="mean_nonzero"``. Hermans et al. and TF-Addons
  average batch-hard over anchors: ``reduction="mean"``.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references for positives and negatives.
    ref_labels: [M] labels of the references.
    margin: the margin (scalar; may be traced).
    mining: ``"all"``, ``"hard"``, ``"semihard"``, ``"easy"``.
    semihard: ``"facenet"`` or ``"tf"`` (only with ``mining="semihard"``).
    band_select: ``"all"`` or ``"hardest"`` (FaceNet semi-hard band).
    soft: softplus instead of the hinge.
    swap: anchor swap, uses reference-to-reference distances.
    distance: metric name or callable.
    reduction: ``"mean_nonzero"`` (default), ``"mean"``, ``"sum"`` or
      ``"none"``. ``"none"`` returns [B] terms for hard/easy mining, [B, M]
      (anchor x positive) for single-negative semi-hard, and the full
      [B, M, M] (anchor x positive x negative) cube for batch-all and band
      "all" (small batches only).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool; only triplets whose (a, p) and (a, n) pairs are
      both True are used (compose with :mod:`metric_jax.miners`).
    anchor_tile: anchors per tile in the streamed batch-all path (default:
      about 4M cube elements per tile).
    max_positives: static bound on the positives of any anchor (K - 1 for a
      PK batch of K samples per class). When given, batch-all and the
      semi-hard band work on a [B, max_positives, M] grid: exact and much
      faster for PK batches. If some anchor has more positives the loss is
      NaN, never a silently truncated value.

  Returns:
    Scalar float32 loss (or unreduced terms, see ``reduction``).

  References:
    Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015, arXiv 1503.03832.
    Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification", arXiv 1703.07737.
    Xuan, Stylianou, Pless, "Improved Embeddings with Easy Positive Triplet
    Mining", WACV 2020.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[0., 0.], [0., 1.], [0.5, 0.]])
    >>> round(float(mj.losses.triplet_margin_loss(emb, jnp.array([0, 0, 1]), margin=1.0)), 4)
    1.191
  """
  _checks.choice(mining, MINING, "mining")
  _checks.choice(semihard, SEMIHARD, "semihard")
  _checks.choice(band_select, BAND_SELECT, "band_select")
  _checks.scalar(margin, "margin")
  reductions.check(reduction)
  if anchor_tile is not None:
    _checks.positive_int(anchor_tile, "anchor_tile")
  if max_positives is not None:
    _checks.positive_int(max_positives, "max_positives")
  if mining in ("hard", "easy"):
    tile = streaming_engine.routed_tile(embeddings, ref_embeddings)
    if tile is not None:
      # Large problems: the same choice over column tiles (small buffers;
      # B = 2048: 37 -> 10.5 ms forward + backward).
      from metric_jax.streaming import triplet as streamed  # pylint: disable=import-outside-toplevel
      return streamed.streaming_triplet_margin_loss(
          embeddings, labels, ref_embeddings, ref_labels, margin=margin, mining=mining,
          soft=soft, swap=swap, distance=distance, reduction=reduction, where=where,
          ref_where=ref_where, pair_mask=pair_mask, tile_size=tile)
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  if mining in ("hard", "easy"):
    return _one_triplet_per_anchor(problem, embeddings, where, ref_embeddings, ref_where,
                                   distance, margin, mining == "hard", soft, swap, reduction)
  result = _mined_loss(problem, ref_embeddings, ref_where, distance, margin, mining,
                       semihard, band_select, soft, swap, reduction, anchor_tile,
                       max_positives)
  # Band tests and argmin selections drop NaN distances silently: surface them.
  masks = problem.masks
  return reductions.keep_nan(result, problem.matrix, masks.pos | masks.neg)


def _one_triplet_per_anchor(problem, embeddings, where, ref_embeddings, ref_where, distance,
                            margin, hardest_positive, soft, swap, reduction):
  """Batch-hard (or easy-positive) mining: the matrix only chooses each
  anchor's positive and negative; their distances (and the gradient) are
  then recomputed from the embeddings, O(B D) instead of a backward pass
  through the [B, M] matrix (two matrix products)."""
  sign = -1.0 if problem.is_similarity else 1.0
  dist = jax.lax.stop_gradient(sign * problem.matrix)
  pos, neg = problem.masks.pos, problem.masks.neg
  p_idx = _argmax_masked(dist if hardest_positive else -dist, pos)
  n_idx = _argmax_masked(-dist, neg)
  has = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
  x = pairs.zero_invalid_rows(embeddings, where)
  refs = x if ref_embeddings is None else pairs.zero_invalid_rows(ref_embeddings, ref_where)
  positives, negatives = refs[p_idx], refs[n_idx]
  d_ap = sign * distances_lib.paired(x, positives, distance)
  d_an = sign * distances_lib.paired(x, negatives, distance)
  if swap:
    d_an = jnp.minimum(d_an, sign * distances_lib.paired(positives, negatives, distance))
  result = reductions.reduce(_hinge(d_ap - d_an, margin, soft), has, reduction)
  # The selection skips NaN distances of other pairs: surface them.
  return reductions.keep_nan(result, dist, pos | neg)


def _mined_loss(problem, ref_embeddings, ref_where, distance, margin, mining,
                semihard, band_select, soft, swap, reduction, anchor_tile,
                max_positives):
  """The body of :func:`triplet_margin_loss` after validation, for the
  batch-all and semi-hard minings (hard and easy: _one_triplet_per_anchor)."""
  dist = -problem.matrix if problem.is_similarity else problem.matrix
  pos, neg = problem.masks.pos, problem.masks.neg
  ref_dist = None
  if swap:
    if ref_embeddings is None:
      ref_dist = dist
    else:
      ref = pairs.zero_invalid_rows(ref_embeddings, ref_where)
      ref_dist = distances_lib.pairwise(ref, None, distance)
      ref_dist = -ref_dist if problem.is_similarity else ref_dist

  band = mining == "semihard"
  single_negative = band and (semihard == "tf" or band_select == "hardest")
  if single_negative:
    srt = _sort_negatives(dist, neg)
    k = _rank(srt.values, dist, "right")             # first d_an > d_ap
    has_farther = k < srt.count[:, None]
    if semihard == "tf":
      slot = jnp.where(has_farther, k, jnp.maximum(srt.count[:, None] - 1, 0))
      valid = pos & (srt.count[:, None] > 0)
    else:
      slot = jnp.minimum(k, dist.shape[1] - 1)
      in_band = jnp.take_along_axis(srt.values, slot, axis=1) < dist + margin
      valid = pos & has_farther & in_band
    n_idx = jnp.take_along_axis(srt.index, slot, axis=1)
    d_an = jnp.take_along_axis(dist, n_idx, axis=1)
    if swap:
      p_idx = jnp.broadcast_to(jnp.arange(dist.shape[1])[None, :], dist.shape)
      d_an = jnp.minimum(d_an, ref_dist[p_idx, n_idx])
    terms = _hinge(dist - d_an, margin, soft)
    return reductions.reduce(terms, valid, reduction)

  if reduction == "none":
    terms, mask = jax.vmap(_triplet_cube_row, in_axes=(0, 0, 0, None, None, None, None, None))(
        dist, pos, neg, ref_dist, margin, soft, swap, band)
    return reductions.reduce(terms, mask, "none")
  gathered = lambda p: _batch_all_gathered(dist, pos, neg, ref_dist, margin, soft,
                                           swap, band, reduction, p)
  if max_positives is not None:
    return gathered(max_positives)

  def fallback():
    if not soft and not swap:
      return _batch_all_sorted(dist, pos, neg, margin, band, reduction)
    return _batch_all_streamed(dist, pos, neg, ref_dist, margin, soft, swap, band,
                               reduction, anchor_tile)

  if not _FAST_POSITIVES:
    return fallback()
  return _grid.smallest_fitting_grid(_FAST_POSITIVES, dist.shape[1],
                                     jnp.max(_grid.positive_counts(pos)), gathered, fallback)
