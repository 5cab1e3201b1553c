"""Multi-similarity loss (Wang et al., CVPR 2019)."""

from __future__ import annotations

__all__ = ["multi_similarity_loss"]

import jax

from metric_jax import _checks
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.streaming import _engine as streaming_engine


def multi_similarity_loss(embeddings: jax.Array, labels: jax.Array,
                          ref_embeddings: jax.Array | None = None,
                          ref_labels: jax.Array | None = None, *,
                          alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                          distance="cosine", reduction: str = "mean",
                          where: jax.Array | None = None,
                          ref_where: jax.Array | None = None,
                          pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Multi-similarity loss: soft positive and negative pair weighting.

  Per anchor ``i`` with similarities ``S_ik`` (cosine by default)::

    l_i = 1/alpha * log(1 + sum_{k in P_i} exp(-alpha (S_ik - base)))
        + 1/beta  * log(1 + sum_{k in N_i} exp( beta (S_ik - base)))

  ``P_i`` / ``N_i`` are the positives / negatives of ``i`` (restricted by
  ``pair_mask``, e.g. the multi-similarity miner's output). Both
  ``log(1 + sum exp)`` terms are masked log-sum-exps with a zero logit, so an
  empty set contributes exactly 0. For a distance metric ``d`` the signs flip
  as in PML: ``alpha (d - base)`` and ``beta (base - d)``.

  Reduction: mean over **all** valid anchors (``where``), including anchors
  without any positive (they still pay the negative term) or without any pair
  (they contribute 0 but count), as PML's ``MultiSimilarityLoss`` with its
  default ``MeanReducer``. With L2-normalised inputs the defaults reproduce
  ``MultiSimilarityLoss()`` (alpha=2, beta=50, base=0.5); the paper uses
  ``base=1`` according to the PML documentation.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references (memory bank, other devices).
    ref_labels: [M] labels of the references.
    alpha: positive scale (> 0).
    beta: negative scale (> 0).
    base: similarity offset lambda.
    distance: metric name or callable (see :mod:`metric_jax.distances`).
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or
      ``"none"`` (then the [B] per-anchor terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool, restricts the pairs (e.g. a miner's output).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General Pair
    Weighting for Deep Metric Learning", CVPR 2019, arXiv 1904.06627.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(mj.losses.multi_similarity_loss(emb, jnp.array([0, 0, 1]))), 4)
    0.2126
  """
  reductions.check(reduction)
  _checks.scalar(alpha, "alpha", positive=True)
  _checks.scalar(beta, "beta", positive=True)
  _checks.scalar(base, "base")
  tile = streaming_engine.routed_symmetric_tile(embeddings, ref_embeddings, pair_mask, distance)
  if tile is not None:
    # A large batch against itself: the streamed twin's symmetric backward
    # pass over small buffers (B = 2048: 39 -> 31 ms forward + backward).
    from metric_jax.streaming import softmax  # pylint: disable=import-outside-toplevel
    return softmax.streaming_multi_similarity_loss(
        embeddings, labels, alpha=alpha, beta=beta, base=base, distance=distance,
        reduction=reduction, where=where, tile_size=tile)
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  mat, masks = problem.matrix, problem.masks
  # PML's ``distance.margin``: similarities pull up positives, distances down.
  shift = (base - mat) if problem.is_similarity else (mat - base)
  (pos_lse, neg_lse), _ = reductions.masked_logsumexps(
      [alpha * shift, -beta * shift], [masks.pos, masks.neg], include_zero=True)
  terms = pos_lse / alpha + neg_lse / beta
  # A NaN entry under either mask makes its row's terms NaN; keep it visible
  # also where the row is not valid.
  return reductions.keep_nan(reductions.reduce(terms, masks.row_valid, reduction), terms, True)
