"""Intra-pair variance loss (Yu & Tao, ICCV 2019)."""

from __future__ import annotations

__all__ = ["intra_pair_variance_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import pairs
from metric_jax import reductions


def intra_pair_variance_loss(embeddings: jax.Array, labels: jax.Array,
                             ref_embeddings: jax.Array | None = None,
                             ref_labels: jax.Array | None = None, *,
                             pos_eps: float = 0.01, neg_eps: float = 0.01,
                             distance="cosine", reduction: str = "mean",
                             where: jax.Array | None = None,
                             ref_where: jax.Array | None = None,
                             pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Intra-pair variance loss: penalise pairs far from their set's mean.

  With ``mu_p`` / ``mu_n`` the mean similarity over all valid positive /
  negative pairs of the batch (gradients flow through the means)::

    l_pos(i, j) = [(1 - pos_eps) mu_p - s_ij]_+^2     (positive pairs)
    l_neg(i, j) = [s_ij - (1 + neg_eps) mu_n]_+^2     (negative pairs)

  For a distance metric the roles flip (PML):
  ``[d_ij - (1 + pos_eps) mu_p]_+^2`` and ``[(1 - neg_eps) mu_n - d_ij]_+^2``.
  The positive and negative terms are reduced separately with ``reduction``
  and added (PML's ``MultipleReducers``); an empty set contributes 0.
  Defaults reproduce PML's ``IntraPairVarianceLoss()`` on L2-normalised
  inputs (mean over ordered pairs).

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    pos_eps: relative slack of the positive pairs.
    neg_eps: relative slack of the negative pairs.
    distance: metric name or callable (default cosine).
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or
      ``"none"`` ([B, M], positive plus negative terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).

  Returns:
    Scalar float32 loss, or [B, M] terms for ``reduction="none"``.

  References:
    Yu, Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019
    (the intra-pair variance regulariser).

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.], [0.6, 0.8]])
    >>> round(float(mj.losses.intra_pair_variance_loss(emb, jnp.array([0, 0, 1, 1]))), 4)
    0.0445
  """
  reductions.check(reduction)
  _checks.scalar(pos_eps, "pos_eps")
  _checks.scalar(neg_eps, "neg_eps")
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask,
                          symmetric=reduction != "none")
  mat, masks = problem.matrix, problem.masks
  # The two means in one pass over the matrix.
  sum_p, count_p, sum_n, count_n = reductions.fused_sums(
      [jnp.where(masks.pos, mat, 0.0), masks.pos.astype(jnp.float32),
       jnp.where(masks.neg, mat, 0.0), masks.neg.astype(jnp.float32)])
  mu_p = sum_p / jnp.maximum(count_p, 1.0)
  mu_n = sum_n / jnp.maximum(count_n, 1.0)
  if problem.is_similarity:
    pos_terms = jnp.square(jax.nn.relu((1.0 - pos_eps) * mu_p - mat))
    neg_terms = jnp.square(jax.nn.relu(mat - (1.0 + neg_eps) * mu_n))
  else:
    pos_terms = jnp.square(jax.nn.relu(mat - (1.0 + pos_eps) * mu_p))
    neg_terms = jnp.square(jax.nn.relu((1.0 - neg_eps) * mu_n - mat))
  return reductions.reduce_parts(
      [(pos_terms, masks.pos), (neg_terms, masks.neg)], reduction)
