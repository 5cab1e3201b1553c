"""Lifted structured loss (Oh Song et al., CVPR 2016) and the generalized
lifted structure loss (Hermans et al., 2017).

Memory. The paper's bound takes, for every positive pair (i, j), a
log-sum-exp over the negatives of i *and* of j. That set is the disjoint
union of row i's and row j's negatives, so the log-sum-exp decomposes as
``logaddexp(LSE_i, LSE_j)``: one masked log-sum-exp per row ([B]) and a
[B, M] combination. Nothing of size B x M x M is ever built.

Empty sets. Mathematically an empty log-sum-exp is ``-inf``: a positive pair
without any negative has ``J = -inf`` and contributes ``[J]_+^2 = 0`` (it
still counts in ``|P|``). PML fills an empty log-sum-exp with 0 instead;
``empty_lse="zero"`` reproduces that.
"""

from __future__ import annotations

__all__ = ["lifted_structure_loss", "generalized_lifted_structure_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.streaming import _engine as streaming_engine

EMPTY_LSE = ("-inf", "zero")
REF_NEGATIVES = ("reference", "anchor_only", "pml")


def _margins(matrix, is_similarity, pos_margin, neg_margin):
  """PML's sign convention: ``(d - pos_margin, neg_margin - d)`` for a
  distance, ``(pos_margin - s, s - neg_margin)`` for a similarity."""
  if is_similarity:
    return pos_margin - matrix, matrix - neg_margin
  return matrix - pos_margin, neg_margin - matrix


def _masked_lse(logits, mask):
  """``reductions.masked_logsumexp`` that keeps a NaN entry visible (the
  shared helper maps a NaN row to a finite value)."""
  lse, nonempty = reductions.masked_logsumexp(logits, mask)
  has_nan = jnp.any(mask & jnp.isnan(logits), axis=-1)
  return jnp.where(has_nan, jnp.nan, lse), nonempty


def _row_soft_max(logits, mask, hard):
  """Per-row (log-sum-exp or max, nonempty) over the masked entries."""
  if hard:
    return reductions.masked_max(logits, mask)
  return _masked_lse(logits, mask)


def _union(v1, has1, v2, has2, hard):
  """Soft (or hard) maximum over the disjoint union of two sets from their
  per-set values; empty sets (value 0, flag False) are ignored, so no
  ``-inf`` ever enters the arithmetic."""
  joint = jnp.maximum(v1, v2) if hard else jnp.logaddexp(v1, v2)
  value = jnp.where(has1 & has2, joint, jnp.where(has1, v1, v2))
  return value, has1 | has2


def lifted_structure_loss(embeddings: jax.Array, labels: jax.Array,
                          ref_embeddings: jax.Array | None = None,
                          ref_labels: jax.Array | None = None, *,
                          neg_margin: float = 1.0, pos_margin: float = 0.0,
                          hard: bool = False, empty_lse: str = "-inf",
                          ref_negatives: str = "reference",
                          distance="euclidean", reduction: str = "mean",
                          where: jax.Array | None = None,
                          ref_where: jax.Array | None = None,
                          pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Lifted structured loss: the smooth upper bound of Oh Song et al.

  For each positive pair (i, j), with ``N(i)`` the negatives of i::

    J_ij = log( sum_{k in N(i)} exp(alpha - D_ik)
              + sum_{l in N(j)} exp(alpha - D_jl) ) + D_ij - pos_margin
    L    = 1 / (2 |P|) * sum_{unordered (i, j) in P} [J_ij]_+^2

  with ``alpha = neg_margin`` and ``D`` the non-squared Euclidean distance of
  the raw (not normalised) embeddings, as in the paper and its Caffe layer.
  Equivalently ``L`` is the mean over *ordered* positive pairs of
  ``[J_ij]_+^2 / 2``, which is what ``reduction="mean"`` computes (PML's
  ``pos_pair`` mean). A negative of both i and j enters the sum twice, as in
  the paper. ``hard=True`` gives the non-smooth form (eq. 3) with ``max`` in
  place of log-sum-exp. For a similarity ``s`` the signs flip (PML):
  ``s_ik - neg_margin`` inside the log-sum-exp and ``pos_margin - s_ij``
  outside.

  The log-sum-exp over ``N(i) u N(j)`` is computed as
  ``logaddexp(LSE_{N(i)}, LSE_{N(j)})`` from one stable masked log-sum-exp
  per row: O(B M) memory.

  Empty sets (``empty_lse``): ``"-inf"`` (default, the paper) -- a pair
  without negatives has ``J = -inf`` and contributes 0; ``"zero"`` (PML) --
  the empty log-sum-exp is 0, so such a pair contributes
  ``[D_ij - pos_margin]_+^2 / 2``, except that a batch without any negative
  pair gives 0 (PML returns early). Both count the pair in ``|P|``.

  Reference sets. With ``ref_embeddings`` the pairs are (anchor i,
  reference j); ``N(i)`` are the references with another label. Where the
  negatives of the *reference* j come from is set by ``ref_negatives``:

  * ``"reference"`` (default): the references with a label other than
    ``ref_labels[j]``, from the [M, M] reference-to-reference matrix, so the
    reference set plays the role of the batch (memory banks, other devices).
    ``pair_mask`` does not restrict these (it covers anchor rows only).
  * ``"anchor_only"``: no second set, ``J_ij = LSE_{N(i)} + D_ij``; O(B M).
  * ``"pml"``: PML's rule, which takes row j of the *anchor* matrix (the
    negatives of ``embeddings[j]`` among the references; row i only once
    when ``i == j``) and none for ``j >= B``; meaningful only when
    references j < B are the anchors.

  Without a reference set the batch is compared with itself and all three
  coincide.

  PML equivalence: ``LiftedStructureLoss(neg_margin, pos_margin)`` is
  ``empty_lse="zero"`` (and ``ref_negatives="pml"`` with ``ref_emb``) on
  L2-normalised embeddings (PML normalises by default; pass
  ``LpDistance(normalize_embeddings=False)`` there for the paper's setting).
  TF-Addons ``lifted_struct_loss(margin=1.0)`` is the default here.

  Args:
    embeddings: [B, D] float anchors (not normalised in the paper).
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    neg_margin: alpha, the margin of the negatives (paper: 1).
    pos_margin: subtracted from the positive distance (PML; paper: 0).
    hard: use the non-smooth max (eq. 3) instead of the log-sum-exp bound.
    empty_lse: ``"-inf"`` (paper) or ``"zero"`` (PML), see above.
    ref_negatives: ``"reference"``, ``"anchor_only"`` or ``"pml"``, see above.
    distance: metric name or callable (see :mod:`metric_jax.distances`).
    reduction: ``"mean"`` (default, the paper's ``1/(2|P|)``),
      ``"mean_nonzero"``, ``"sum"`` (over ordered pairs of ``[J]_+^2 / 2``)
      or ``"none"`` ([B, M] terms, zero off the positive pairs).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool; restricts both the positive pairs and the
      negatives (e.g. :func:`metric_jax.miners.hardest_negative_pair_miner`).

  Returns:
    Scalar float32 loss, or [B, M] terms for ``reduction="none"``.

  References:
    Oh Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted
    Structured Feature Embedding", CVPR 2016, arXiv 1511.06452.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[0., 0.], [0., 1.], [1., 0.], [2., 2.]])
    >>> round(float(mj.losses.lifted_structure_loss(emb, jnp.array([0, 0, 1, 1]))), 4)
    2.9892
  """
  reductions.check(reduction)
  _checks.scalar(pos_margin, "pos_margin")
  _checks.scalar(neg_margin, "neg_margin")
  _checks.choice(empty_lse, EMPTY_LSE, "empty_lse")
  _checks.choice(ref_negatives, REF_NEGATIVES, "ref_negatives")
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  masks = problem.masks
  pos_part, neg_logits = _margins(problem.matrix, problem.is_similarity,
                                  pos_margin, neg_margin)
  row_val, row_has = _row_soft_max(neg_logits, masks.neg, hard)

  b, m = problem.matrix.shape
  if ref_embeddings is None:
    col_val, col_has = row_val, row_has
  elif ref_negatives == "reference":
    ref = pairs.zero_invalid_rows(ref_embeddings, ref_where)
    ref_matrix = distances_lib.pairwise(ref, None, distance)
    ref_masks = pairs.label_masks(ref_labels, None, where=ref_where)
    _, ref_logits = _margins(ref_matrix, problem.is_similarity, pos_margin,
                             neg_margin)
    col_val, col_has = _row_soft_max(ref_logits, ref_masks.neg, hard)
  elif ref_negatives == "anchor_only":
    col_val, col_has = jnp.zeros((m,), jnp.float32), jnp.zeros((m,), bool)
  else:  # "pml": row j of the anchor matrix, none for j >= B.
    k = min(b, m)
    col_val = jnp.zeros((m,), jnp.float32).at[:k].set(row_val[:k])
    col_has = jnp.zeros((m,), bool).at[:k].set(row_has[:k])

  col_val, col_has = col_val[None, :], col_has[None, :]
  if ref_embeddings is not None and ref_negatives == "pml":
    # PML selects negative pairs whose anchor row is i *or* j: for i == j
    # that row is taken once.
    col_has = col_has & (jnp.arange(b)[:, None] != jnp.arange(m)[None, :])
  soft_max, has_neg = _union(row_val[:, None], row_has[:, None], col_val, col_has,
                             hard)
  if empty_lse == "zero":
    j = jnp.where(has_neg, soft_max, 0.0) + pos_part
    # PML returns 0 outright when the batch has no negative pair at all.
    j = jnp.where(jnp.any(masks.neg), j, 0.0)
  else:
    # -inf: the pair's bound is -inf, so [J]_+ = 0.
    j = jnp.where(has_neg, soft_max + pos_part, 0.0)
  terms = 0.5 * jnp.square(jax.nn.relu(j))
  return reductions.reduce(terms, masks.pos, reduction)


def generalized_lifted_structure_loss(embeddings: jax.Array, labels: jax.Array,
                                      ref_embeddings: jax.Array | None = None,
                                      ref_labels: jax.Array | None = None, *,
                                      neg_margin: float = 1.0,
                                      pos_margin: float = 0.0,
                                      empty_lse: str = "-inf",
                                      distance="euclidean",
                                      reduction: str = "mean",
                                      where: jax.Array | None = None,
                                      ref_where: jax.Array | None = None,
                                      pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Generalized lifted structure loss (Hermans et al. 2017, p. 4).

  Per anchor a, with ``P(a)`` its positives and ``N(a)`` its negatives::

    l_a = [ log sum_{p in P(a)} exp(D_ap - pos_margin)
          + log sum_{n in N(a)} exp(neg_margin - D_an) ]_+

  averaged over anchors. For a similarity the signs flip (PML):
  ``pos_margin - s_ap`` and ``s_an - neg_margin``.

  Empty sets (``empty_lse``): with ``"-inf"`` (default) an anchor lacking
  positives or negatives has ``l_a = [-inf]_+ = 0`` and is dropped from the
  mean (it is not a valid anchor). With ``"zero"`` (PML) an empty
  log-sum-exp counts as 0, so an anchor without positives still pays
  ``[LSE_neg]_+`` and every real anchor is in the mean; this is PML's
  ``GeneralizedLiftedStructureLoss`` (except for PML's early return of 0
  when the batch has at most one positive and at most one negative pair).

  PML equivalence: ``GeneralizedLiftedStructureLoss(neg_margin,
  pos_margin)`` is ``empty_lse="zero"`` on L2-normalised embeddings with
  ``distance="euclidean"``.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    neg_margin: margin of the negatives (default 1).
    pos_margin: margin of the positives (default 0).
    empty_lse: ``"-inf"`` (mathematical value) or ``"zero"`` (PML).
    distance: metric name or callable.
    reduction: ``"mean"`` (default, over valid anchors), ``"mean_nonzero"``,
      ``"sum"`` or ``"none"`` ([B] per-anchor terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs.

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification", arXiv 1703.07737.
    Oh Song et al., CVPR 2016, arXiv 1511.06452.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[0., 0.], [0., 1.], [1., 0.], [2., 2.]])
    >>> round(float(mj.losses.generalized_lifted_structure_loss(emb, jnp.array([0, 0, 1, 1]))), 4)
    1.5707
  """
  reductions.check(reduction)
  _checks.scalar(pos_margin, "pos_margin")
  _checks.scalar(neg_margin, "neg_margin")
  _checks.choice(empty_lse, EMPTY_LSE, "empty_lse")
  tile = streaming_engine.routed_tile(embeddings, ref_embeddings)
  if tile is not None:
    # Large problems: the same loss over column tiles (small buffers).
    from metric_jax.streaming import softmax  # pylint: disable=import-outside-toplevel
    return softmax.streaming_generalized_lifted_structure_loss(
        embeddings, labels, ref_embeddings, ref_labels, neg_margin=neg_margin,
        pos_margin=pos_margin, empty_lse=empty_lse, distance=distance, reduction=reduction,
        where=where, ref_where=ref_where, pair_mask=pair_mask, tile_size=tile)
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  masks = problem.masks
  pos_logits, neg_logits = _margins(problem.matrix, problem.is_similarity,
                                    pos_margin, neg_margin)
  pos_lse, has_pos = _masked_lse(pos_logits, masks.pos)
  neg_lse, has_neg = _masked_lse(neg_logits, masks.neg)
  # masked_logsumexp already returns 0 for an empty set (PML's value).
  terms = jax.nn.relu(pos_lse + neg_lse)
  if empty_lse == "zero":
    valid = masks.row_valid
  else:
    valid = has_pos & has_neg
  return reductions.reduce(terms, valid, reduction)
