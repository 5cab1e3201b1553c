"""Softmax contrastive losses over pairs: NT-Xent / InfoNCE (SimCLR) and
supervised contrastive (SupCon)."""

from __future__ import annotations

__all__ = ["ntxent_loss", "supcon_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import pairs
from metric_jax import reductions


def _logits(problem, temperature):
  """``s / tau`` for similarities, ``-d / tau`` for distances (PML)."""
  mat = problem.matrix if problem.is_similarity else -problem.matrix
  return mat / temperature


def ntxent_loss(embeddings: jax.Array, labels: jax.Array,
                ref_embeddings: jax.Array | None = None,
                ref_labels: jax.Array | None = None, *,
                temperature: float = 0.07,
                distance="cosine", reduction: str = "mean",
                where: jax.Array | None = None,
                ref_where: jax.Array | None = None,
                pair_mask: jax.Array | None = None) -> jax.Array:
  r"""NT-Xent / InfoNCE loss, label-aware: one term per positive pair.

  For every positive pair ``(i, p)`` with logits ``z = s / tau``::

    l_ip = -log( e^{z_ip} / (e^{z_ip} + sum_{n in N_i} e^{z_in}) )
         = softplus( LSE_{n in N_i} z_in - z_ip )

  Other positives of ``i`` are **not** in the denominator. A positive pair
  whose anchor has no negative costs 0 (and still counts in the mean). For a
  distance metric the logits are ``-d / tau``.

  SimCLR: concatenate the two views ``[z1; z2]`` with labels
  ``[arange(N); arange(N)]`` (PML's ``SelfSupervisedLoss(NTXentLoss())``).
  With L2-normalised inputs the defaults reproduce PML's ``NTXentLoss()``
  (PML adds the float ``tiny`` inside the log, which matters only for a
  loss above ~87; here the softplus form is exact).

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels (instance ids for self-supervised use).
    ref_embeddings: optional [M, D] references (e.g. a memory queue).
    ref_labels: [M] labels of the references.
    temperature: tau > 0.
    distance: metric name or callable.
    reduction: ``"mean"`` over positive pairs (default), ``"mean_nonzero"``,
      ``"sum"`` or ``"none"`` ([B, M] per-pair terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).

  Returns:
    Scalar float32 loss, or [B, M] terms for ``reduction="none"``.

  References:
    Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive
    Learning of Visual Representations", ICML 2020, arXiv 2002.05709.
    van den Oord, Li, Vinyals, "Representation Learning with Contrastive
    Predictive Coding", arXiv 1807.03748.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(mj.losses.ntxent_loss(emb, jnp.array([0, 0, 1]), temperature=0.5)), 4)
    0.3485
  """
  reductions.check(reduction)
  _checks.scalar(temperature, "temperature", positive=True)
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  z, masks = _logits(problem, temperature), problem.masks
  lse_n, has_n = reductions.masked_logsumexp(z, masks.neg)
  terms = jnp.where(has_n[:, None], jax.nn.softplus(lse_n[:, None] - z), 0.0)
  # masked_logsumexp drops NaN sums: keep NaN inputs visible.
  return reductions.keep_nan(reductions.reduce(terms, masks.pos, reduction), z,
                              masks.pos | masks.neg)


def supcon_loss(embeddings: jax.Array, labels: jax.Array,
                ref_embeddings: jax.Array | None = None,
                ref_labels: jax.Array | None = None, *,
                temperature: float = 0.1,
                distance="cosine", reduction: str = "mean_nonzero",
                where: jax.Array | None = None,
                ref_where: jax.Array | None = None,
                pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Supervised contrastive loss (SupCon, "L_out" form).

  Per anchor ``i`` with positives ``P(i)`` and logits ``z = s / tau``::

    l_i = -1/|P(i)| sum_{p in P(i)} ( z_ip - LSE_{a in P(i) u N(i)} z_ia )

  i.e. minus the mean over the positives of the log-softmax over every other
  (non-self) valid reference. Anchors without a positive are dropped. As in
  PML, a batch without any positive pair or without any negative pair gives
  0 (PML issue #744), and the default ``"mean_nonzero"`` averages over the
  anchors with a non-zero loss (``AvgNonZeroReducer``): with L2-normalised
  inputs the defaults reproduce PML's ``SupConLoss()``. The paper sums over
  anchors (``reduction="sum"``); Khosla et al.'s code also multiplies by
  ``tau / 0.07``, which is not applied here.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    temperature: tau > 0.
    distance: metric name or callable (distances give logits ``-d / tau``).
    reduction: ``"mean_nonzero"`` (default), ``"mean"`` (over anchors with a
      positive), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu, Krishnan,
    "Supervised Contrastive Learning", NeurIPS 2020, arXiv 2004.11362.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(mj.losses.supcon_loss(emb, jnp.array([0, 0, 1]), temperature=0.5)), 4)
    0.3485
  """
  reductions.check(reduction)
  _checks.scalar(temperature, "temperature", positive=True)
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  z, masks = _logits(problem, temperature), problem.masks
  lse_all, _ = reductions.masked_logsumexp(z, masks.pos | masks.neg)
  mean_pos, has_p = reductions.per_anchor_mean(z, masks.pos)
  terms = lse_all - mean_pos
  valid = has_p & jnp.any(masks.pos) & jnp.any(masks.neg)
  terms = jnp.where(valid, terms, 0.0)
  # A NaN logit makes its row's lse_all NaN: keep it visible in every reduction.
  return reductions.keep_nan(reductions.reduce(terms, valid, reduction), lse_all, True)
