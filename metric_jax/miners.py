"""Miners as pure functions: [B, M] boolean pair masks with static shapes.

A miner looks at the anchor x reference metric matrix and returns which
pairs to keep. Every loss accepts the result as ``pair_mask=``: it is
intersected with the loss's positive and negative masks, and triplet losses
use the triplets whose (a, p) and (a, n) pairs are both kept::

  mask = miners.batch_hard_miner(emb, labels)
  loss = mj.losses.triplet_margin_loss(emb, labels, pair_mask=mask)

Common signature::

  miner(embeddings, labels, ref_embeddings=None, ref_labels=None, *,
        <parameters>, distance=..., where=None, ref_where=None) -> [B, M] bool

Miners never propagate gradients (``stop_gradient`` on the embeddings), never
enumerate index tuples and work under ``jit`` and ``vmap``. Rules are stated
for a distance ``d``; for a similarity metric they run on ``d = -s``, which
is PML's sign convention (margins keep their meaning in the metric's units).

Note on triplet miners: a pair mask records, per anchor, which positives and
which negatives are used, not which negative goes with which positive. For a
triplet loss, a mask whose rows each keep one positive and one negative
(:func:`batch_hard_miner`) is exact; :func:`semihard_miner` gives the pairs
of the semi-hard triplets, exactly what PML feeds a *pair* loss, while the
exact semi-hard triplet set is ``triplet_margin_loss(mining="semihard")``.
"""

from __future__ import annotations

__all__ = [
    "batch_hard_miner",
    "semihard_miner",
    "hardest_negative_pair_miner",
    "multi_similarity_miner",
    "pair_margin_miner",
    "distance_weighted_miner",
]

import math

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.losses import triplet as triplet_lib

SEMIHARD = ("facenet", "tf")


def _problem(embeddings, labels, ref_embeddings, ref_labels, distance, where,
             ref_where):
  """Distance-oriented matrix (smaller = closer) and masks, no gradient."""
  emb = jax.lax.stop_gradient(embeddings) if embeddings is not None else None
  ref = jax.lax.stop_gradient(ref_embeddings) if ref_embeddings is not None else None
  problem = pairs.prepare(emb, labels, ref, ref_labels, distance=distance,
                          where=where, ref_where=ref_where)
  dist = -problem.matrix if problem.is_similarity else problem.matrix
  return dist, problem.masks, problem.is_similarity


def _one_hot(index: jax.Array, m: int) -> jax.Array:
  return index[..., None] == jnp.arange(m)


def _scatter_rows(index: jax.Array, keep: jax.Array, m: int) -> jax.Array:
  """[B, K] column indices (kept where ``keep``) -> [B, M] bool mask."""
  b = index.shape[0]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], index.shape)
  return jnp.zeros((b, m), bool).at[rows, index].max(keep)


def batch_hard_miner(embeddings: jax.Array, labels: jax.Array,
                     ref_embeddings: jax.Array | None = None,
                     ref_labels: jax.Array | None = None, *,
                     distance="euclidean", where: jax.Array | None = None,
                     ref_where: jax.Array | None = None) -> jax.Array:
  """Batch-hard mining (Hermans et al. 2017): per anchor the farthest
  positive and the nearest negative.

  Anchors lacking a positive or a negative keep nothing. With
  ``triplet_margin_loss(..., pair_mask=mask)`` this is PML's
  ``BatchHardMiner()`` + ``TripletMarginLoss`` (one triplet per anchor,
  mean over non-zero terms with the loss's default reduction).

  Args:
    embeddings: [B, D] anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    distance: metric name or callable.
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.

  Returns:
    [B, M] bool pair mask with at most one positive and one negative per row.

  References:
    Hermans, Beyer, Leibe, arXiv 1703.07737.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax import miners
    >>> emb = jnp.array([[0.], [1.], [3.], [0.5]])
    >>> miners.batch_hard_miner(emb, jnp.array([0, 0, 0, 1]))[0].tolist()
    [False, False, True, True]
  """
  dist, masks, _ = _problem(embeddings, labels, ref_embeddings, ref_labels,
                            distance, where, ref_where)
  m = dist.shape[1]
  p_idx = reductions.first_argmax(jnp.where(masks.pos, dist, -jnp.inf), axis=1)
  n_idx = reductions.first_argmin(jnp.where(masks.neg, dist, jnp.inf), axis=1)
  has = jnp.any(masks.pos, axis=1) & jnp.any(masks.neg, axis=1)
  return (_one_hot(p_idx, m) | _one_hot(n_idx, m)) & has[:, None]


def semihard_miner(embeddings: jax.Array, labels: jax.Array,
                   ref_embeddings: jax.Array | None = None,
                   ref_labels: jax.Array | None = None, *,
                   margin: float = 0.2, semihard: str = "facenet",
                   distance="euclidean", where: jax.Array | None = None,
                   ref_where: jax.Array | None = None) -> jax.Array:
  """Pairs of the semi-hard triplets.

  * ``semihard="facenet"`` (default): the band ``d_ap < d_an < d_ap +
    margin`` (Schroff et al.; PML ``TripletMarginMiner(margin,
    type_of_triplets="semihard")`` uses ``<=`` at the upper end). A
    positive is kept if its band is non-empty; a negative if it lies in the
    band of some positive.
  * ``semihard="tf"`` (TF-Addons ``triplet_semihard_loss``): per positive
    pair the nearest negative farther than the positive, or if there is
    none the farthest negative. Every positive of an anchor with a negative
    is kept, with its chosen negative.

  See the module note: as a pair mask this is what a pair loss needs; the
  exact triplets are ``triplet_margin_loss(mining="semihard")``.

  Args:
    embeddings: [B, D] anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    margin: width of the FaceNet band (unused by ``"tf"``).
    semihard: ``"facenet"`` or ``"tf"``.
    distance: metric name or callable.
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.

  Returns:
    [B, M] bool pair mask.

  References:
    Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015, arXiv 1503.03832.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax import miners
    >>> emb = jnp.array([[0.], [1.], [1.1], [3.]])
    >>> miners.semihard_miner(emb, jnp.array([0, 0, 1, 1]), margin=0.5)[0].tolist()
    [False, True, True, False]
  """
  _checks.scalar(margin, "margin")
  _checks.choice(semihard, SEMIHARD, "semihard")
  dist, masks, _ = _problem(embeddings, labels, ref_embeddings, ref_labels,
                            distance, where, ref_where)
  pos, neg = masks.pos, masks.neg
  m = dist.shape[1]
  srt = triplet_lib._sort_negatives(dist, neg)  # pylint: disable=protected-access
  rank = triplet_lib._rank  # pylint: disable=protected-access
  if semihard == "tf":
    k = rank(srt.values, dist, "right")            # negatives with d_an <= d_ap
    has_farther = k < srt.count[:, None]
    slot = jnp.where(has_farther, k, jnp.maximum(srt.count[:, None] - 1, 0))
    n_idx = jnp.take_along_axis(srt.index, slot, axis=1)
    keep = pos & (srt.count[:, None] > 0)
    return keep | _scatter_rows(n_idx, keep, m)
  # FaceNet band, from both sides.
  hi = jnp.minimum(rank(srt.values, dist + margin, "left"), srt.count[:, None])
  lo = rank(srt.values, dist, "right")
  pos_keep = pos & (hi > lo)
  srt_p = triplet_lib._sort_negatives(dist, pos)  # pylint: disable=protected-access
  hi_p = jnp.minimum(rank(srt_p.values, dist, "left"), srt_p.count[:, None])
  lo_p = rank(srt_p.values, dist - margin, "right")
  neg_keep = neg & (hi_p > lo_p)
  return pos_keep | neg_keep


def hardest_negative_pair_miner(embeddings: jax.Array, labels: jax.Array,
                                ref_embeddings: jax.Array | None = None,
                                ref_labels: jax.Array | None = None, *,
                                distance="euclidean",
                                where: jax.Array | None = None,
                                ref_where: jax.Array | None = None) -> jax.Array:
  """Every positive pair plus the lifted-structure hard negative neighbours.

  For a positive pair (i, j) the hardest negative of the lifted structure
  (Oh Song et al., eq. 3) is the nearest negative of i or of j, so the union
  over all positive pairs is: every positive pair, and for every anchor
  with a positive, its nearest negative. With
  ``lifted_structure_loss(..., pair_mask=mask)`` each pair's log-sum-exp
  then runs over the two hard negatives of i and j only.

  Args:
    embeddings: [B, D] anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    distance: metric name or callable.
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.

  Returns:
    [B, M] bool pair mask.

  References:
    Oh Song, Xiang, Jegelka, Savarese, CVPR 2016, arXiv 1511.06452.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax import miners
    >>> emb = jnp.array([[0.], [1.], [2.], [5.]])
    >>> miners.hardest_negative_pair_miner(emb, jnp.array([0, 0, 1, 1]))[1].tolist()
    [True, False, True, False]
  """
  dist, masks, _ = _problem(embeddings, labels, ref_embeddings, ref_labels,
                            distance, where, ref_where)
  m = dist.shape[1]
  n_idx = reductions.first_argmin(jnp.where(masks.neg, dist, jnp.inf), axis=1)
  has = jnp.any(masks.pos, axis=1) & jnp.any(masks.neg, axis=1)
  return masks.pos | (_one_hot(n_idx, m) & has[:, None])


def multi_similarity_miner(embeddings: jax.Array, labels: jax.Array,
                           ref_embeddings: jax.Array | None = None,
                           ref_labels: jax.Array | None = None, *,
                           epsilon: float = 0.1, distance="cosine",
                           where: jax.Array | None = None,
                           ref_where: jax.Array | None = None) -> jax.Array:
  """Multi-similarity pair mining (Wang et al., CVPR 2019), PML's rule.

  For a similarity ``s`` (default cosine): a negative is kept if
  ``s_an + epsilon > min_p s_ap`` and a positive if
  ``s_ap - epsilon < max_n s_an``; for a distance the mirrored rule
  ``d_an - epsilon < max_p d_ap``, ``d_ap + epsilon > min_n d_an``. Anchors
  without positives keep no negative and vice versa. Equals PML's
  ``MultiSimilarityMiner(epsilon)``.

  Args:
    embeddings: [B, D] anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    epsilon: the mining margin.
    distance: metric name or callable (default ``"cosine"``).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.

  Returns:
    [B, M] bool pair mask.

  References:
    Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General Pair
    Weighting for Deep Metric Learning", CVPR 2019, arXiv 1904.06627.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax import miners
    >>> emb = jnp.array([[1., 0.], [0.6, 0.8], [0.8, 0.6], [0., 1.]])
    >>> miners.multi_similarity_miner(emb, jnp.array([0, 0, 1, 1]))[0].tolist()
    [False, True, True, False]
  """
  _checks.scalar(epsilon, "epsilon")
  dist, masks, _ = _problem(embeddings, labels, ref_embeddings, ref_labels,
                            distance, where, ref_where)
  hardest_neg, has_neg = reductions.masked_min(dist, masks.neg)
  hardest_pos, has_pos = reductions.masked_max(dist, masks.pos)
  keep_pos = masks.pos & has_neg[:, None] & (dist + epsilon > hardest_neg[:, None])
  keep_neg = masks.neg & has_pos[:, None] & (dist - epsilon < hardest_pos[:, None])
  return keep_pos | keep_neg


def pair_margin_miner(embeddings: jax.Array, labels: jax.Array,
                      ref_embeddings: jax.Array | None = None,
                      ref_labels: jax.Array | None = None, *,
                      pos_margin: float = 0.2, neg_margin: float = 0.8,
                      distance="euclidean", where: jax.Array | None = None,
                      ref_where: jax.Array | None = None) -> jax.Array:
  """Keeps positives farther than ``pos_margin`` and negatives closer than
  ``neg_margin`` (PML ``PairMarginMiner``).

  For a similarity: positives with ``s < pos_margin``, negatives with
  ``s > neg_margin``.

  Args:
    embeddings: [B, D] anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    pos_margin: positives beyond it are kept.
    neg_margin: negatives within it are kept.
    distance: metric name or callable.
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.

  Returns:
    [B, M] bool pair mask.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax import miners
    >>> emb = jnp.array([[0.], [0.1], [0.5], [2.]])
    >>> miners.pair_margin_miner(emb, jnp.array([0, 0, 0, 1]))[0].tolist()
    [False, False, True, False]
  """
  _checks.scalar(pos_margin, "pos_margin")
  _checks.scalar(neg_margin, "neg_margin")
  dist, masks, is_sim = _problem(embeddings, labels, ref_embeddings, ref_labels,
                                 distance, where, ref_where)
  sign = -1.0 if is_sim else 1.0
  return ((masks.pos & (dist > sign * pos_margin))
          | (masks.neg & (dist < sign * neg_margin)))


def _log_sphere_distance_normalizer(n: int) -> float:
  """log of ``int_0^2 d^(n-2) (1 - d^2/4)^((n-3)/2) dd = 2^(n-2) B((n-1)/2, (n-1)/2)``."""
  a = (n - 1) / 2.0
  return (n - 2) * math.log(2.0) + 2 * math.lgamma(a) - math.lgamma(2 * a)


def distance_weighted_miner(key: jax.Array, embeddings: jax.Array,
                            labels: jax.Array,
                            ref_embeddings: jax.Array | None = None,
                            ref_labels: jax.Array | None = None, *,
                            cutoff: float = 0.5,
                            nonzero_loss_cutoff: float = 1.4,
                            num_negatives: int = 1, lam: float | None = None,
                            normalize: bool = True,
                            where: jax.Array | None = None,
                            ref_where: jax.Array | None = None) -> jax.Array:
  r"""Distance-weighted negative sampling (Wu et al., ICCV 2017).

  On the unit sphere in R^n pairwise distances have density
  ``q(d) = d^(n-2) (1 - d^2/4)^((n-3)/2) / Z_n``. Each anchor with a
  positive samples ``num_negatives`` negatives (with replacement) with
  probability ``\propto min(lam, q(d)^-1)`` computed in log space; PML's
  clamps apply: ``d`` is clamped below at ``cutoff``, negatives with
  ``d >= nonzero_loss_cutoff`` (which give zero margin loss) and
  non-finite weights get weight 0. ``lam=None`` (default, as PML and the
  reference Gluon code) applies no upper clip; with ``lam`` the exact
  normalised density is used so ``lam`` has the paper's meaning. The mask
  keeps all the anchor's positives and the sampled negatives.

  The metric is always the non-squared Euclidean distance; with
  ``normalize=True`` (default, as PML requires) embeddings are
  L2-normalised first, since ``q`` is the density on the unit sphere. There
  is therefore no ``distance`` argument.

  Args:
    key: JAX PRNG key.
    embeddings: [B, D] anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    cutoff: lower clamp of the distance (0.5).
    nonzero_loss_cutoff: negatives at or beyond it are never drawn (1.4).
    num_negatives: draws per anchor.
    lam: optional clip of the inverse density.
    normalize: L2-normalise the embeddings first.
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.

  Returns:
    [B, M] bool pair mask.

  References:
    Wu, Manmatha, Smola, Krahenbuhl, "Sampling Matters in Deep Embedding
    Learning", ICCV 2017, arXiv 1706.07567.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metric_jax import miners
    >>> emb = jax.random.normal(jax.random.key(0), (8, 16))
    >>> labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
    >>> mask = miners.distance_weighted_miner(jax.random.key(1), emb, labels)
    >>> mask.shape, int(mask[0].sum())
    ((8, 8), 2)
  """
  _checks.scalar(cutoff, "cutoff")
  _checks.scalar(nonzero_loss_cutoff, "nonzero_loss_cutoff")
  _checks.positive_int(num_negatives, "num_negatives")
  if lam is not None:
    _checks.scalar(lam, "lam", positive=True)
  pairs.check_inputs(embeddings, labels, ref_embeddings, ref_labels, where, ref_where)
  x = jax.lax.stop_gradient(embeddings)
  y = None if ref_embeddings is None else jax.lax.stop_gradient(ref_embeddings)
  if normalize:
    x = distances_lib.l2_normalize(x)
    y = None if y is None else distances_lib.l2_normalize(y)
  dist, masks, _ = _problem(x, labels, y, ref_labels, "euclidean", where, ref_where)
  n = embeddings.shape[1]
  d = jnp.maximum(dist, cutoff)
  inner = 1.0 - 0.25 * d * d
  finite = inner > 0
  log_w = ((2.0 - n) * jnp.log(d)
           - ((n - 3.0) / 2.0) * jnp.log(jnp.where(finite, inner, 1.0)))
  if lam is not None:
    log_w = jnp.minimum(log_w + _log_sphere_distance_normalizer(n), math.log(lam))
  allowed = masks.neg & finite & (d < nonzero_loss_cutoff)
  logits = jnp.where(allowed, log_w, -jnp.inf)
  b, m = dist.shape
  draws = jax.random.categorical(key, logits, axis=-1, shape=(num_negatives, b)).T
  sampler = jnp.any(masks.pos, axis=1) & jnp.any(allowed, axis=1)
  keep = jnp.broadcast_to(sampler[:, None], draws.shape)
  return (masks.pos & sampler[:, None]) | _scatter_rows(draws, keep, m)
