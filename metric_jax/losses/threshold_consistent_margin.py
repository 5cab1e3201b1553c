"""Threshold-consistent margin (TCM) loss (Zhang et al., ICLR 2024)."""

from __future__ import annotations

__all__ = ["threshold_consistent_margin_loss"]

import jax

from metric_jax import _checks
from metric_jax import pairs
from metric_jax import reductions


def threshold_consistent_margin_loss(embeddings: jax.Array, labels: jax.Array,
                                     ref_embeddings: jax.Array | None = None,
                                     ref_labels: jax.Array | None = None, *,
                                     lambda_plus: float = 1.0, lambda_minus: float = 1.0,
                                     margin_plus: float = 0.9, margin_minus: float = 0.5,
                                     distance="cosine", reduction: str = "mean",
                                     where: jax.Array | None = None,
                                     ref_where: jax.Array | None = None,
                                     pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Threshold-consistent margin loss: a regulariser on the hard pairs.

  With cosine similarities ``s_ij``, the hard positives
  ``P = {(i, j): y_i == y_j, i != j, s_ij <= m+}`` and the hard negatives
  ``N = {(i, j): y_i != y_j, s_ij >= m-}``::

    L = lambda+ 1/|P| sum_{(i,j) in P} (m+ - s_ij)
      + lambda- 1/|N| sum_{(i,j) in N} (s_ij - m-)

  Each part is 0 when its set is empty. The pairs are ordered (means equal
  those over unordered pairs). The paper adds this term to a base metric
  loss (e.g. with :func:`metric_jax.losses.make_objective`) to make the
  distance threshold that separates positives from negatives consistent
  across classes.

  Defaults reproduce PML's ``ThresholdConsistentMarginLoss()`` (lambda+ =
  lambda- = 1, m+ = 0.9, m- = 0.5, cosine similarity, its own averaging)
  on the batch itself, for any inputs (PML normalises). PML's ``ref_emb``
  path is not reproduced: it indexes the batch with reference-set indices;
  here the positives and negatives come from the reference set.

  Args:
    embeddings: [B, D] float anchors (f32, bf16, f16; computed in f32).
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    lambda_plus: weight of the positive part, >= 0.
    lambda_minus: weight of the negative part, >= 0.
    margin_plus: positive pairs with a similarity at most this cost.
    margin_minus: negative pairs with a similarity at least this cost.
    distance: a **similarity** metric (``"cosine"``, the default and the
      paper's, ``"dot"`` or a callable marked ``is_similarity``).
    reduction: ``"mean"`` (default: the mean of each part over its set, as
      above), ``"mean_nonzero"`` (each part over its pairs strictly inside
      the margin; differs only at ties), ``"sum"`` (the weighted sums) or
      ``"none"`` ([B, M] weighted per-pair terms, 0 outside ``P`` and ``N``).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).

  Returns:
    Scalar float32 loss, or [B, M] terms for ``reduction="none"``.

  References:
    Zhang, Xu, Tang, Fang, Wu, Tighe, Xing, "Threshold-Consistent Margin
    Loss for Open-World Deep Metric Learning",
    ICLR 2024, arXiv 2307.04047.

  Example:
    The positive pair has ``s = 0.8 <= 0.9`` (cost 0.1), one negative pair
    ``s = 0.6 >= 0.5`` (cost 0.1), the other ``s = 0``:

    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(mj.losses.threshold_consistent_margin_loss(emb, jnp.array([0, 0, 1]))), 4)
    0.2
  """
  reductions.check(reduction)
  _checks.scalar(lambda_plus, "lambda_plus", non_negative=True)
  _checks.scalar(lambda_minus, "lambda_minus", non_negative=True)
  _checks.scalar(margin_plus, "margin_plus")
  _checks.scalar(margin_minus, "margin_minus")
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask, symmetric=reduction != "none")
  if not problem.is_similarity:
    raise ValueError(
        "threshold_consistent_margin_loss needs a similarity `distance` (\"cosine\", "
        f"\"dot\" or a callable with is_similarity=True), got the distance {distance!r}.")
  s, masks = problem.matrix, problem.masks
  hard_pos = masks.pos & (s <= margin_plus)
  hard_neg = masks.neg & (s >= margin_minus)
  loss = reductions.reduce_parts([(lambda_plus * (margin_plus - s), hard_pos),
                                  (lambda_minus * (s - margin_minus), hard_neg)], reduction)
  # A NaN similarity fails both comparisons: keep it visible.
  return reductions.keep_nan(loss, s, masks.pos | masks.neg)
