"""Signal-to-noise-ratio contrastive loss (Yuan, Chen, Wang, Xu, Lu, CVPR 2019).

The SNR distance between an anchor ``x`` and a reference ``y`` is the
variance of the "noise" ``y - x`` over the variance of the "signal" ``x``
(both over the D embedding entries)::

  d_snr(x, y) = var(y - x) / var(x)

It is asymmetric (anchor first) and, unlike the Euclidean distance, not a
metric. The [N, M] matrix is computed without forming [N, M, D] differences:
``D var(y - x) = ||x - y||^2 - D (mean(x) - mean(y))^2``.
"""

from __future__ import annotations

__all__ = ["snr_contrastive_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax.losses import contrastive
from metric_jax.losses import regularizers

# Floor of the anchor variance: a constant anchor (zero signal variance)
# gives a large finite ratio instead of inf/NaN.
_VAR_FLOOR = 1e-12


def _snr_matrix(x: jax.Array, y: jax.Array) -> jax.Array:
  """[N, D] x [M, D] -> [N, M] SNR distances ``var(y_j - x_i) / var(x_i)``."""
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  d = x.shape[-1]
  mx, my = jnp.mean(x, axis=-1), jnp.mean(y, axis=-1)
  xc = x - mx[:, None]
  yc = y - my[:, None]
  # Centred vectors: ||xc - yc||^2 = D var(x - y); exact up to cancellation.
  sq = distances_lib.pairwise(xc, yc, "squared_euclidean")
  var_x = jnp.sum(xc * xc, axis=-1)
  return sq / jnp.maximum(var_x, _VAR_FLOOR * d)[:, None]


SNR = distances_lib.custom(_snr_matrix, is_similarity=False, name="snr")


def snr_contrastive_loss(embeddings: jax.Array, labels: jax.Array,
                         ref_embeddings: jax.Array | None = None,
                         ref_labels: jax.Array | None = None, *,
                         pos_margin: float = 0.0, neg_margin: float = 1.0,
                         zero_mean_weight: float = 0.0,
                         distance="snr", reduction: str = "mean_nonzero",
                         where: jax.Array | None = None,
                         ref_where: jax.Array | None = None,
                         pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Contrastive loss on the signal-to-noise-ratio distance.

  With ``d_ij = var(f_j - f_i) / var(f_i)``::

    l_pos(i, j) = [d_ij - pos_margin]_+        (y_i == y_j, i != j)
    l_neg(i, j) = [neg_margin - d_ij]_+        (y_i != y_j)

  Positive and negative terms are reduced separately (default: mean over the
  non-zero terms) and added, as :func:`metric_jax.losses.contrastive_loss`.
  ``zero_mean_weight`` adds the paper's regulariser
  ``lambda * mean_i |sum_k f_ik|`` over the valid raw embeddings (PML's
  ``ZeroMeanRegularizer`` as ``embedding_regularizer``).

  PML's ``SignalToNoiseRatioContrastiveLoss()`` normalises the embeddings
  inside its ``SNRDistance``; L2-normalise the inputs to reproduce it
  (defaults pos_margin=0, neg_margin=1). A constant anchor (zero variance)
  has its variance floored at 1e-12 instead of dividing by 0.

  Args:
    embeddings: [B, D] float anchors (D >= 2).
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    pos_margin: positives with an SNR distance below this cost nothing.
    neg_margin: negatives with an SNR distance above this cost nothing.
    zero_mean_weight: weight lambda of the zero-mean regulariser (>= 0).
    distance: only ``"snr"``.
    reduction: ``"mean_nonzero"`` (default), ``"mean"``, ``"sum"`` or
      ``"none"`` ([B, M] pair terms, regulariser not included).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).

  Returns:
    Scalar float32 loss, or [B, M] terms for ``reduction="none"``.

  References:
    Yuan, Chen, Wang, Xu, Lu, "Signal-to-Noise Ratio: A Robust Distance
    Metric for Deep Metric Learning", CVPR 2019, arXiv 1904.02616.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0., 0.], [1., 0.2, 0.], [0., 1., 0.]])
    >>> round(float(mj.losses.snr_contrastive_loss(emb, jnp.array([0, 0, 1]))), 4)
    0.0438
  """
  _checks.choice(distance, ("snr",), "distance")
  _checks.scalar(zero_mean_weight, "zero_mean_weight", non_negative=True)
  if embeddings is not None and len(jnp.shape(embeddings)) == 2 and jnp.shape(embeddings)[1] < 2:
    raise ValueError(
        f"`embeddings` must have D >= 2 for a variance, got shape {tuple(jnp.shape(embeddings))}.")
  loss = contrastive.contrastive_loss(
      embeddings, labels, ref_embeddings, ref_labels, pos_margin=pos_margin,
      neg_margin=neg_margin, distance=SNR, reduction=reduction, where=where,
      ref_where=ref_where, pair_mask=pair_mask)
  if reduction == "none":
    return loss
  if isinstance(zero_mean_weight, (int, float)) and zero_mean_weight == 0:
    return loss
  return loss + zero_mean_weight * regularizers.zero_mean_regularizer(embeddings, where=where)
