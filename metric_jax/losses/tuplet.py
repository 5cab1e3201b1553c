"""Tuplet margin loss (Yu & Tao, ICCV 2019)."""

from __future__ import annotations

__all__ = ["tuplet_margin_loss"]

import math

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions


def tuplet_margin_loss(embeddings: jax.Array, labels: jax.Array,
                       ref_embeddings: jax.Array | None = None,
                       ref_labels: jax.Array | None = None, *,
                       margin: float = math.radians(5.73), scale: float = 64.0,
                       distance="cosine", reduction: str = "mean",
                       where: jax.Array | None = None,
                       ref_where: jax.Array | None = None,
                       pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Tuplet margin loss: a slack angular margin on each positive pair.

  For every positive pair ``(a, p)`` with ``cos(theta_ap) = s_ap`` and the
  negatives ``n`` of ``a``::

    l_ap = log(1 + sum_n exp(scale * (s_an - cos(theta_ap - margin))))

  ``cos(theta - m) = cos(theta) cos(m) + sin(theta) sin(m)`` is evaluated
  with a guarded ``sin(theta) = sqrt(1 - cos^2(theta))`` (no ``arccos``, so
  the gradient stays finite at ``cos = +-1``). Reduction: mean over positive
  pairs (a pair whose anchor has no negative costs 0 and still counts).

  The margin is in **radians**. PML's ``TupletMarginLoss(margin=5.73,
  scale=64)`` takes degrees: it equals ``margin=math.radians(5.73)``
  (0.1000), the default here, with L2-normalised inputs.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    margin: angular slack margin in radians, in [0, pi).
    scale: logit scale (> 0).
    distance: ``"cosine"`` (default) or another similarity whose values are
      cosines in [-1, 1] (they are clipped to that range).
    reduction: ``"mean"`` over positive pairs (default), ``"mean_nonzero"``,
      ``"sum"`` or ``"none"`` ([B, M] per-pair terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).

  Returns:
    Scalar float32 loss, or [B, M] terms for ``reduction="none"``.

  References:
    Yu, Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(mj.losses.tuplet_margin_loss(emb, jnp.array([0, 0, 1]), scale=8.0)), 4)
    0.0612
  """
  reductions.check(reduction)
  _checks.scalar(margin, "margin")
  _checks.scalar(scale, "scale", positive=True)
  if isinstance(margin, (int, float, np.number)) and not 0 <= margin < math.pi:
    raise ValueError(f"`margin` is in radians and must be in [0, pi), got {margin} "
                     f"(degrees? use math.radians({margin})).")
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  if not problem.is_similarity:
    raise ValueError(
        "tuplet_margin_loss needs a cosine similarity `distance` (\"cosine\"), got the "
        f"distance {distance!r}.")
  cos, masks = jnp.clip(problem.matrix, -1.0, 1.0), problem.masks
  sin = distances_lib.safe_sqrt(1.0 - cos * cos)
  cos_shifted = cos * jnp.cos(margin) + sin * jnp.sin(margin)
  lse_n, has_n = reductions.masked_logsumexp(scale * cos, masks.neg)
  terms = jnp.where(has_n[:, None], jax.nn.softplus(lse_n[:, None] - scale * cos_shifted), 0.0)
  # masked_logsumexp drops NaN sums: keep NaN inputs visible.
  return reductions.keep_nan(reductions.reduce(terms, masks.pos, reduction), cos,
                              masks.pos | masks.neg)
