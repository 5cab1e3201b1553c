"""Contrastive loss (Hadsell, Chopra, LeCun, CVPR 2006), two-margin form."""

from __future__ import annotations

__all__ = ["contrastive_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.streaming import _engine as streaming_engine


def contrastive_loss(embeddings: jax.Array, labels: jax.Array,
                     ref_embeddings: jax.Array | None = None,
                     ref_labels: jax.Array | None = None, *,
                     pos_margin: float = 0.0, neg_margin: float = 1.0,
                     squared: bool = False,
                     distance="euclidean", reduction: str = "mean_nonzero",
                     where: jax.Array | None = None,
                     ref_where: jax.Array | None = None,
                     pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Contrastive loss over all positive and negative pairs.

  For a distance ``d``::

    l_pos(i, j) = [d_ij - pos_margin]_+        (y_i == y_j, i != j)
    l_neg(i, j) = [neg_margin - d_ij]_+        (y_i != y_j)

  For a similarity ``s`` the signs flip (``[pos_margin - s]_+`` and
  ``[s - neg_margin]_+``), as in PML. With ``squared=True`` each hinge is
  squared and halved, the paper's form
  ``(1 - Y) 1/2 D^2 + Y 1/2 [m - D]_+^2`` (TF-Addons omits the 1/2).

  The positive and the negative terms are reduced separately with
  ``reduction`` and the two results are added (PML's MultipleReducers).
  Ordered pairs are used; means equal those over unordered pairs. A batch
  without positive pairs still pays its negative terms (and vice versa); the
  loss is 0, with zero gradients, only when no pair of either kind exists.

  Defaults reproduce PML's ``ContrastiveLoss()`` when the embeddings are
  L2-normalised first (PML normalises inside its distance).

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references (memory bank, other devices).
    ref_labels: [M] labels of the references.
    pos_margin: positives closer than this cost nothing.
    neg_margin: negatives farther than this cost nothing.
    squared: use the squared, halved hinge of the paper.
    distance: metric name or callable (see :mod:`metric_jax.distances`).
    reduction: ``"mean_nonzero"`` (default), ``"mean"``, ``"sum"``, ``"none"``
      (then a [B, M] matrix of per-pair terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool, restricts the pairs (e.g. a miner's output).

  Returns:
    Scalar float32 loss, or [B, M] terms for ``reduction="none"``.

  References:
    Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an
    Invariant Mapping", CVPR 2006.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[0., 0.], [0., 0.5], [3., 0.]])
    >>> round(float(mj.losses.contrastive_loss(emb, jnp.array([0, 0, 1]))), 4)
    0.5
  """
  reductions.check(reduction)
  _checks.scalar(pos_margin, "pos_margin")
  _checks.scalar(neg_margin, "neg_margin")
  tile = streaming_engine.routed_symmetric_tile(embeddings, ref_embeddings, pair_mask, distance)
  if tile is not None and reduction != "none":
    # A large batch against itself: the streamed twin's symmetric backward
    # pass (one product per tile) over small buffers beats the dense
    # matrices (B = 2048: 36 -> 25 ms forward + backward).
    from metric_jax.streaming import contrastive as streamed  # pylint: disable=import-outside-toplevel
    return streamed.streaming_contrastive_loss(
        embeddings, labels, pos_margin=pos_margin, neg_margin=neg_margin, squared=squared,
        distance=distance, reduction=reduction, where=where, tile_size=tile)
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask,
                          symmetric=reduction != "none")
  mat, masks = problem.matrix, problem.masks
  if problem.is_similarity:
    pos_terms = jax.nn.relu(pos_margin - mat)
    neg_terms = jax.nn.relu(mat - neg_margin)
  else:
    pos_terms = jax.nn.relu(mat - pos_margin)
    neg_terms = jax.nn.relu(neg_margin - mat)
  if squared:
    pos_terms = 0.5 * jnp.square(pos_terms)
    neg_terms = 0.5 * jnp.square(neg_terms)
  return reductions.reduce_parts(
      [(pos_terms, masks.pos), (neg_terms, masks.neg)], reduction)
