"""Smooth-AP: average precision with sigmoid-relaxed ranks (Brown, Xie,
Kalogeiton, Zisserman, ECCV 2020).

The rank of a positive ``p`` of anchor ``a`` counts the references ranked
above it; Smooth-AP replaces the step function of each comparison by a
sigmoid, so every term lives on an (anchor, positive, reference) cube.
Each anchor's positives are gathered into ``P`` slots (the smallest of 4 or
16 that holds them, or ``max_positives``) and the ranks come from a
[B, P, M] grid of the slots against the negatives plus a [B, P, P] grid of
the slots against each other: O(B P M) work instead of PML's O(B M^2). An
anchor with more than 16 positives sends the batch to the dense [B, M, M]
evaluation (the same code with every column as a slot). Large grids are
evaluated in tiles of anchors (:func:`_grid.over_anchors`).
"""

from __future__ import annotations

__all__ = ["smooth_ap_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.losses import _grid

# Positive-slot sizes tried in turn (the smallest that holds every anchor's
# positives); more positives than the largest: the dense evaluation.
_GRID_SIZES = (4, 16)


def _precision_sums(z, z_slots, slot_valid, neg):
  """[b] sum over each anchor's positive slots of ``R+ / R``.

  ``z`` [b, M] similarities divided by the temperature, ``z_slots`` [b, P]
  those of the anchors' positive slots (distinct columns), ``slot_valid``
  [b, P], ``neg`` [b, M]. Reference ``j`` is above slot ``p`` by
  ``sigmoid(z_j - z_p)``."""
  above = lambda rows, slots: jax.nn.sigmoid(rows[:, None, :] - slots[:, :, None])
  p = z_slots.shape[1]
  others = slot_valid[:, None, :] & ~jnp.eye(p, dtype=bool)[None]            # [b, P, P]
  pos_above = jnp.sum(jnp.where(others, above(z_slots, z_slots), 0.0), axis=2)
  neg_above = jnp.sum(jnp.where(neg[:, None, :], above(z, z_slots), 0.0), axis=2)   # [b, P]
  ratio = (1.0 + pos_above) / (1.0 + pos_above + neg_above)
  return jnp.sum(jnp.where(slot_valid, ratio, 0.0), axis=1)


def _slot_sums(z, slot_index, slot_valid, neg):
  """:func:`_precision_sums` for the slots ``slot_index`` [B, P] (columns of
  ``z``), in one piece or in tiles of anchors."""
  rows = (z, jnp.take_along_axis(z, slot_index, axis=1), slot_valid, neg)
  row_elements = slot_index.shape[1] * (z.shape[1] + slot_index.shape[1])
  return _grid.over_every_anchor(_precision_sums, rows, row_elements)


def _gathered(z, pos, neg, p):
  """Precision sums from each anchor's first ``p`` positives; NaN for an
  anchor with more (never a silent truncation)."""
  slot_index, slot_valid = _grid.first_positive_columns(pos, min(p, z.shape[1]))
  sums = _slot_sums(z, slot_index, slot_valid, neg)
  return jnp.where(_grid.positive_counts(pos) > p, jnp.nan, sums)


def _dense(z, pos, neg):
  """Precision sums with every reference column as a slot ([B, M, M])."""
  every = jnp.broadcast_to(jnp.arange(z.shape[1], dtype=jnp.int32)[None, :], z.shape)
  return _slot_sums(z, every, pos, neg)


def smooth_ap_loss(embeddings: jax.Array, labels: jax.Array,
                   ref_embeddings: jax.Array | None = None,
                   ref_labels: jax.Array | None = None, *,
                   temperature: float = 0.01, include_self: bool = False,
                   distance="cosine", reduction: str = "mean",
                   where: jax.Array | None = None,
                   ref_where: jax.Array | None = None,
                   pair_mask: jax.Array | None = None,
                   max_positives: int | None = None) -> jax.Array:
  r"""Smooth-AP loss: one minus average precision with sigmoid-relaxed ranks.

  Per anchor ``a`` with positives ``P_a``, negatives ``N_a``, similarities
  ``s_aj`` (``s = -d`` for a distance) and ``G(x) = sigmoid(x / temperature)``::

    R+(a, p) = 1 + sum_{j in P_a, j != p} G(s_aj - s_ap)
    R(a, p)  = R+(a, p) + sum_{n in N_a} G(s_an - s_ap)
    AP_a = 1/|P_a| sum_{p in P_a} R+(a, p) / R(a, p)        l_a = 1 - AP_a

  As ``temperature -> 0``, ``R+`` and ``R`` become the ranks of ``p`` among
  the positives and among all references, and ``AP_a`` the average
  precision of the ranking. Anchors without a positive are dropped; the
  default reduction averages over the others. Gradients vanish for
  references whose similarity differs from ``s_ap`` by much more than the
  temperature (the paper's ``tau = 0.01`` on cosines).

  Cost: O(B P M) for at most P <= 16 positives per anchor (or
  ``max_positives``), else O(B M^2) in tiles of anchors (module docstring).

  PML's ``SmoothAPLoss`` (like the authors' code) puts the anchor itself in
  its retrieval set, as a positive at cosine 1: ``include_self=True``. PML
  also requires every class of the batch to have the same number of samples
  K and then treats consecutive blocks of C rows (C the number of classes)
  as the classes: with labels sorted into contiguous classes and K == C,
  ``SmoothAPLoss(temperature=t)(emb, labels)`` equals
  ``smooth_ap_loss(emb, labels, temperature=t, include_self=True)``; for any
  batch PML accepts it equals the same call with the labels
  ``jnp.arange(B) // C``.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] retrieval set (PML does not support it).
    ref_labels: [M] labels of the references.
    temperature: sigmoid temperature ``tau`` (> 0); paper and PML: 0.01.
    include_self: also rank the anchor itself, as a positive (PML and the
      authors' code); needs ``ref_embeddings=None``. Default False (the
      paper: the query is not in its retrieval set).
    distance: ``"cosine"`` (default, as in the paper and PML), ``"dot"``, a
      distance (ranked by ascending value) or a callable metric.
    reduction: ``"mean"`` over anchors with a positive (default, PML's
      ``MeanReducer``), ``"mean_nonzero"``, ``"sum"`` or ``"none"`` ([B]
      per-anchor terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners); only the kept
      pairs are ranked.
    max_positives: static bound on the positives of any anchor (K - 1 in a
      batch of K samples per class, K with ``include_self``): the [B, P, M]
      grid with that many slots and no run-time choice. An anchor with more
      positives makes the loss NaN, never a silently truncated value.

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Brown, Xie, Kalogeiton, Zisserman, "Smooth-AP: Smoothing the Path
    Towards Large-Scale Image Retrieval", ECCV 2020, arXiv 2007.12163.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0.6, 0.8], [0., 1.]])
    >>> labels = jnp.array([0, 0, 1, 1])
    >>> round(float(mj.losses.smooth_ap_loss(emb, labels)), 4)   # AP 1, 1/2, 1/2, 1
    0.25
  """
  reductions.check(reduction)
  _checks.scalar(temperature, "temperature", positive=True)
  _checks.flag(include_self, "include_self")
  if include_self and ref_embeddings is not None:
    raise ValueError("`include_self=True` ranks each anchor among the batch itself and "
                     "needs ref_embeddings=None, got a reference set.")
  if max_positives is not None:
    _checks.positive_int(max_positives, "max_positives")
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask, exclude_self=False if include_self else None)
  s = problem.matrix if problem.is_similarity else -problem.matrix
  z = s / temperature
  pos, neg = problem.masks.pos, problem.masks.neg
  n_pos = _grid.positive_counts(pos)
  if max_positives is not None:
    sums = _gathered(z, pos, neg, max_positives)
  else:
    sums = _grid.smallest_fitting_grid(_GRID_SIZES, z.shape[1], jnp.max(n_pos),
                                       lambda p: _gathered(z, pos, neg, p),
                                       lambda: _dense(z, pos, neg))
  has_p = n_pos > 0
  terms = jnp.where(has_p, 1.0 - sums / jnp.maximum(n_pos, 1.0), 0.0)
  # Anchors without positives are dropped: keep NaN inputs visible anyway.
  return reductions.keep_nan(reductions.reduce(terms, has_p, reduction), s, pos | neg)
