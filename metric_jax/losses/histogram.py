"""Histogram loss (Ustinova & Lempitsky, NeurIPS 2016)."""

from __future__ import annotations

__all__ = ["histogram_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import pairs
from metric_jax import reductions

REDUCTIONS = ("sum", "none")


def _soft_histogram(s: jax.Array, mask: jax.Array, num_bins: int) -> jax.Array:
  """Linear-interpolation histogram of the masked similarities in [-1, 1] on
  ``num_bins + 1`` nodes ``t_r = -1 + r delta``, normalised to sum to 1."""
  delta = 2.0 / num_bins
  s = jnp.clip(s, -1.0, 1.0)
  r = jnp.clip(jnp.floor(jax.lax.stop_gradient((s + 1.0) / delta)), 0, num_bins - 1)
  w_hi = (s + 1.0 - r * delta) / delta          # weight on node r + 1
  w_lo = ((r + 1.0) * delta - 1.0 - s) / delta  # weight on node r
  # NaN similarities go to node 0 (not an out-of-range index that
  # segment_sum would drop), so NaN inputs stay visible.
  r = jnp.where(jnp.isnan(r), 0.0, r).astype(jnp.int32).reshape(-1)
  maskf = mask.reshape(-1)
  w_hi = jnp.where(maskf, w_hi.reshape(-1), 0.0)
  w_lo = jnp.where(maskf, w_lo.reshape(-1), 0.0)
  hist = (jax.ops.segment_sum(w_lo, r, num_segments=num_bins + 1)
          + jax.ops.segment_sum(w_hi, r + 1, num_segments=num_bins + 1))
  count = jnp.sum(maskf).astype(jnp.float32)
  return hist / jnp.maximum(count, 1.0)


def histogram_loss(embeddings: jax.Array, labels: jax.Array,
                   ref_embeddings: jax.Array | None = None,
                   ref_labels: jax.Array | None = None, *,
                   num_bins: int = 100,
                   distance="cosine", reduction: str = "sum",
                   where: jax.Array | None = None,
                   ref_where: jax.Array | None = None,
                   pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Histogram loss: probability that a negative pair is more similar than a
  positive pair, from soft similarity histograms.

  Similarities ``s`` in [-1, 1] are spread over ``R = num_bins + 1`` nodes
  ``t_r = -1 + r Delta`` (``Delta = 2 / num_bins``) by linear interpolation,
  giving the densities ``h+`` (positive pairs) and ``h-`` (negative pairs),
  each normalised by its number of pairs. With ``Phi+_r = sum_{q <= r} h+_q``::

    L = sum_r h-_r Phi+_r

  Pairs (PML semantics): a positive pair is used if its anchor has a
  negative, a negative pair if its anchor has a positive (the pairs of the
  batch's triplets); when the batch is compared with itself each unordered
  pair is counted once. A batch without such pairs gives 0. The paper's R
  nodes correspond to ``num_bins = R - 1``. Gradients flow through the
  interpolation weights; similarities outside [-1, 1] are clipped.

  With L2-normalised inputs the defaults reproduce PML's ``HistogramLoss()``
  (``n_bins=100``, cosine similarity).

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references (ordered anchor-reference
      pairs, no de-duplication; PML does not support them).
    ref_labels: [M] labels of the references.
    num_bins: number of histogram bins (>= 1).
    distance: a similarity with values in [-1, 1] (default cosine).
    reduction: ``"sum"`` (the loss, default) or ``"none"`` (the
      ``num_bins + 1`` per-node terms ``h-_r Phi+_r``).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).

  Returns:
    Scalar float32 loss, or [num_bins + 1] terms for ``reduction="none"``.

  References:
    Ustinova, Lempitsky, "Learning Deep Embeddings with Histogram Loss",
    NeurIPS 2016, arXiv 1611.00822.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.], [0.6, 0.8]])
    >>> round(float(mj.losses.histogram_loss(emb, jnp.array([0, 0, 1, 1]), num_bins=4)), 4)
    0.498
  """
  reductions.check(reduction, REDUCTIONS)
  _checks.positive_int(num_bins, "num_bins")
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  if not problem.is_similarity:
    raise ValueError(
        "histogram_loss needs a similarity `distance` with values in [-1, 1] "
        f"(\"cosine\"), got the distance {distance!r}.")
  s, masks = problem.matrix, problem.masks
  has_p = jnp.any(masks.pos, axis=1)
  has_n = jnp.any(masks.neg, axis=1)
  pos = masks.pos & has_n[:, None]
  neg = masks.neg & has_p[:, None]
  if ref_embeddings is None:
    upper = jnp.triu(jnp.ones(pos.shape, bool), k=1)
    pos = (pos | pos.T) & upper
    neg = (neg | neg.T) & upper
  h_pos = _soft_histogram(s, pos, num_bins)
  h_neg = _soft_histogram(s, neg, num_bins)
  terms = h_neg * jnp.cumsum(h_pos)
  terms = jnp.where(jnp.any(pos) & jnp.any(neg), terms, 0.0)
  if reduction == "none":
    return terms
  return jnp.sum(terms)
