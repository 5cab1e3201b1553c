"""Neighbourhood components analysis loss (Goldberger et al., NeurIPS 2004)."""

from __future__ import annotations

__all__ = ["nca_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.streaming import _engine as streaming_engine


def nca_loss(embeddings: jax.Array, labels: jax.Array,
             ref_embeddings: jax.Array | None = None,
             ref_labels: jax.Array | None = None, *,
             softmax_scale: float = 1.0,
             distance="squared_euclidean", reduction: str = "mean",
             where: jax.Array | None = None,
             ref_where: jax.Array | None = None,
             pair_mask: jax.Array | None = None) -> jax.Array:
  r"""NCA: minus the log-probability that an anchor picks a same-class neighbour.

  With logits ``z_ij = -scale * d_ij`` (``+scale * s_ij`` for a similarity)
  over every valid reference ``j`` (self excluded when the batch is compared
  with itself)::

    p_i = sum_{j in P_i} softmax_j(z_i)
    l_i = -log p_i = LSE_{j in P_i u N_i} z_ij - LSE_{j in P_i} z_ij

  Anchors without a positive are dropped (``p_i = 0``). The difference of
  two masked log-sum-exps stays finite where ``p_i`` underflows; PML
  instead drops anchors whose ``p_i`` underflows to exactly 0 in float32
  (a loss above ~100), the only difference from PML's ``NCALoss()``, which
  the defaults reproduce on L2-normalised inputs (squared Euclidean,
  ``softmax_scale=1``, mean over anchors).

  Derivatives: reverse mode, gradients of gradients included. A batch
  compared with itself under a built-in metric takes a custom VJP (one
  [B, B] x [B, D] product in the backward pass), so forward mode
  (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is not available there.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    softmax_scale: inverse temperature (> 0).
    distance: metric name or callable (default squared Euclidean, as PML).
    reduction: ``"mean"`` over anchors with a positive (default),
      ``"mean_nonzero"``, ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners): only its True
      entries enter the softmax.

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Goldberger, Roweis, Hinton, Salakhutdinov, "Neighbourhood Components
    Analysis", NeurIPS 2004.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(mj.losses.nca_loss(emb, jnp.array([0, 0, 1]))), 4)
    0.3485
  """
  reductions.check(reduction)
  _checks.scalar(softmax_scale, "softmax_scale", positive=True)
  tile = streaming_engine.routed_tile(embeddings, ref_embeddings)
  if tile is not None:
    # Large problems: the same loss over column tiles (small buffers).
    from metric_jax.streaming import softmax  # pylint: disable=import-outside-toplevel
    return softmax.streaming_nca_loss(
        embeddings, labels, ref_embeddings, ref_labels, softmax_scale=softmax_scale,
        distance=distance, reduction=reduction, where=where, ref_where=ref_where,
        pair_mask=pair_mask, tile_size=tile)
  # A batch against itself: symmetric logits and masks, so the gradient
  # takes one [B, B] x [B, D] product (reductions.symmetric_masked_logsumexps).
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask, symmetric=True)
  mat, masks = problem.matrix, problem.masks
  z = softmax_scale * (mat if problem.is_similarity else -mat)
  logsumexps = (reductions.symmetric_masked_logsumexps if problem.symmetric
                else reductions.masked_logsumexps)
  (lse_all, lse_pos), (_, has_p) = logsumexps(z, [masks.pos | masks.neg, masks.pos])
  terms = jnp.where(has_p, lse_all - lse_pos, 0.0)
  # A NaN entry makes its row's lse_all NaN; keep it visible in the loss
  # even when that row has no positive.
  return reductions.keep_nan(reductions.reduce(terms, has_p, reduction), lse_all, True)
