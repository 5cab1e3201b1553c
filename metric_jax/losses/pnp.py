"""PNP loss: penalise only the negatives ranked before each positive (Li, Xie,
Ye, Zhang, Lu, AAAI 2022).

Each positive ``j`` of an anchor needs the soft count of the anchor's
negatives ranked before it, a sum over (anchor, positive, negative)
triplets. With ``P`` a static bound on the positives of any anchor (K - 1
in a PK batch) the sums run over a [B, P, M] grid of each anchor's positive
slots against every reference (:mod:`metric_jax.losses._grid`), ``P`` the
smallest of 3, 7, 15 that holds every anchor's positives (chosen at run time)
or ``max_positives``. Otherwise every reference column is a slot: the same
sums over [M, M] slabs, streamed over tiles of anchors (O(B M^2) work,
bounded memory).
"""

from __future__ import annotations

__all__ = ["pnp_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.losses import _grid

VARIANTS = ("O", "Ds", "Dq", "Iu", "Ib")
"""PML's variant names: PNP-O, PNP-D_s, PNP-D_q, PNP-I_u and PNP-I_b."""
# Positive-slot grids tried in turn (the smallest that holds every anchor's
# positives): K - 1 for PK batches of K = 4, 8 or 16 samples per class.
_GRID_SIZES = (3, 7, 15)
# Similarity given to the references that are not negatives of an anchor:
# finite, so no inf enters the arithmetic. Masking the [B, M] row once is
# 3-4 times faster on CPU than masking the [B, P, M] grid.
_NOT_NEGATIVE = -1e30


def _penalty(r, variant, b, alpha):
  """The variant's ``f(R)`` for soft counts ``R >= 0``; ``f(0) = 0``."""
  if variant == "O":
    return r
  if variant == "Ds":
    return jnp.log1p(r)
  if variant == "Dq":
    return -jnp.expm1(-alpha * jnp.log1p(r))      # 1 - (1 + R)^-alpha
  if variant == "Iu":
    return (1.0 + r) * jnp.log1p(r)
  return (b * r - jnp.log1p(b * r)) / (b * b)      # "Ib"


def _slot_sums(s_neg, v, valid, penalty, inv_anneal):
  """[b] ``sum_q valid_q f(R_q)`` with the soft counts of the negatives
  ranked before each slot, ``R_q = sum_k sigmoid((s_k - v_q) / anneal)``:
  ``s_neg`` [b, M] the anchors' similarities, :data:`_NOT_NEGATIVE` at
  their non-negatives (whose sigmoids are then exactly 0, with a zero
  gradient); ``v``, ``valid`` [b, q] their slots' similarities and
  validity."""
  z = (s_neg[:, None, :] - v[:, :, None]) * inv_anneal                # [b, q, M]
  r = jnp.sum(jax.nn.sigmoid(z), axis=-1)
  return jnp.sum(jnp.where(valid, penalty(r), 0.0), axis=-1)


def _with_self(v, valid, s_self, self_valid):
  """Appends the anchors' own slot (``include_self``) when ``s_self`` is given."""
  if s_self is None:
    return v, valid
  return (jnp.concatenate([v, s_self[:, None]], axis=1),
          jnp.concatenate([valid, self_valid[:, None]], axis=1))


def _sums(slot_sums, s_neg, v, valid, whole):
  """:func:`_slot_sums` over all anchors: as :func:`_grid.over_every_anchor`
  when ``whole``, else always in tiles of anchors."""
  rows, row_elements = (s_neg, v, valid), v.shape[1] * s_neg.shape[1]
  evaluate = _grid.over_every_anchor if whole else _grid.over_anchors
  return evaluate(slot_sums, rows, row_elements)


def _self_similarity(matrix, embeddings, where, ref_embeddings, distance, sign):
  """[B] similarity of each anchor to itself: the diagonal of the batch's own
  matrix, else computed pair by pair."""
  if ref_embeddings is None:
    return jnp.diagonal(matrix)
  x = pairs.zero_invalid_rows(embeddings, where)
  return sign * distances_lib.paired(x, x, distance)


def pnp_loss(embeddings: jax.Array, labels: jax.Array,
             ref_embeddings: jax.Array | None = None,
             ref_labels: jax.Array | None = None, *,
             b: float = 2.0, alpha: float = 1.0, anneal: float = 0.01,
             variant: str = "O", include_self: bool = False,
             distance="cosine", reduction: str = "mean",
             where: jax.Array | None = None,
             ref_where: jax.Array | None = None,
             pair_mask: jax.Array | None = None,
             max_positives: int | None = None) -> jax.Array:
  r"""PNP loss: a smoothed average-precision surrogate that only counts the
  negatives ranked before each positive.

  Per anchor ``i`` with positives ``P_i``, negatives ``N_i`` and
  similarities ``s`` (a distance ``d`` is used as ``s = -d``)::

    R_ij = sum_{k in N_i} sigmoid((s_ik - s_ij) / anneal)        (j in P_i)
    l_i  = 1/|P_i| sum_{j in P_i} f(R_ij)

  ``R_ij`` softly counts the negatives ranked before positive ``j``; ``f``
  is the variant's penalty:

  ========= ================================ =====================
  variant   f(R)                             paper
  ========= ================================ =====================
  ``"O"``   ``R``                            PNP-O
  ``"Ds"``  ``log(1 + R)``                   PNP-D_s
  ``"Dq"``  ``1 - (1 + R)^(-alpha)``         PNP-D_q
  ``"Iu"``  ``(1 + R) log(1 + R)``           PNP-I_u
  ``"Ib"``  ``(b R - log(1 + b R)) / b^2``   PNP-I_b
  ========= ================================ =====================

  (``"Dq"``: PML averages ``(1 + R)^(-alpha)`` and returns one minus the
  mean, the same number.) Anchors without a positive are dropped; an anchor
  without negatives gives 0 (``f(0) = 0``). The default reduction averages
  over the anchors with a positive, as PML does.

  PML's ``PNPLoss(b, alpha, anneal, variant)`` is
  ``pnp_loss(x, y, b=b, alpha=alpha, anneal=anneal, variant=variant,
  include_self=True)`` (cosine similarity, normalised inside in both).
  ``include_self=True`` counts each anchor with a positive as one more of
  its own positives, at its similarity to itself (1 for cosine), as the
  authors' code and PML do; the paper ranks the other samples only (the
  default). PML also clamps the sigmoid's argument to [-50, 50], which
  changes each term by less than 2e-22, and supports neither a reference set
  nor another metric.

  Cost: O(B P M) for anchors with at most ``P`` positives (see the module
  docstring), O(B M^2) streamed otherwise; never a [B, M, M] tensor.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references (PML does not support them).
    ref_labels: [M] labels of the references.
    b: the ``"Ib"`` variant's scale (> 0).
    alpha: the ``"Dq"`` variant's exponent (> 0).
    anneal: sigmoid temperature (> 0).
    variant: one of ``"O"`` (default, as PML), ``"Ds"``, ``"Dq"``, ``"Iu"``,
      ``"Ib"`` (table above).
    include_self: count each anchor with a positive among its own positives
      (PML; see above). With ``ref_embeddings`` its similarity to itself is
      computed from ``embeddings``. Default False (the paper).
    distance: metric name or callable; default ``"cosine"`` (PML's only
      metric). Distances rank in increasing order (``s = -d``).
    reduction: ``"mean"`` over anchors with a positive (default),
      ``"mean_nonzero"``, ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners): it restricts
      both the positives and the negatives of each anchor.
    max_positives: static bound on the positives of any anchor (K - 1 for a
      PK batch of K samples per class): the [B, max_positives, M] grid
      without a run-time choice. An anchor with more positives makes the
      loss NaN, never a silently truncated value.

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Li, Xie, Ye, Zhang, Lu, "Rethinking the Optimization of Average
    Precision: Only Penalizing Negative Instances before Positive Ones is
    Enough", AAAI 2022, arXiv 2102.04640.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0.9, -0.1], [0.6, 0.8]])
    >>> labels = jnp.array([0, 0, 1, 1])
    >>> round(float(mj.losses.pnp_loss(emb, labels, anneal=0.1)), 4)
    1.4381
    >>> round(float(mj.losses.pnp_loss(emb, labels, anneal=0.1, variant="Dq")), 4)
    0.5801
  """
  reductions.check(reduction)
  _checks.choice(variant, VARIANTS, "variant")
  _checks.scalar(b, "b", positive=True)
  _checks.scalar(alpha, "alpha", positive=True)
  _checks.scalar(anneal, "anneal", positive=True)
  _checks.flag(include_self, "include_self")
  if max_positives is not None:
    _checks.positive_int(max_positives, "max_positives")
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  sign = 1.0 if problem.is_similarity else -1.0
  s, pos, neg = sign * problem.matrix, problem.masks.pos, problem.masks.neg
  n_pos = _grid.positive_counts(pos)
  has_pos = n_pos > 0
  s_self = None
  if include_self:
    s_self = _self_similarity(s, embeddings, where, ref_embeddings, distance, sign)
  penalty = lambda r: _penalty(r, variant, b, alpha)
  slot_sums = lambda *rows: _slot_sums(*rows, penalty, 1.0 / anneal)
  s_neg = jnp.where(neg, s, _NOT_NEGATIVE)
  m = s.shape[1]

  def gathered(p):
    p = min(p, m)
    index, valid = _grid.first_positive_columns(pos, p)
    v = jnp.take_along_axis(s, index, axis=1)
    totals = _sums(slot_sums, s_neg, *_with_self(v, valid, s_self, has_pos), whole=True)
    return jnp.where(n_pos > p, jnp.nan, totals)      # never a silent truncation

  def dense():
    return _sums(slot_sums, s_neg, *_with_self(s, pos, s_self, has_pos), whole=False)

  if max_positives is not None:
    totals = gathered(max_positives)
  else:
    totals = _grid.smallest_fitting_grid(_GRID_SIZES, m, jnp.max(n_pos), gathered, dense)
  count = n_pos + (1.0 if include_self else 0.0)
  terms = jnp.where(has_pos, totals / jnp.maximum(count, 1.0), 0.0)
  # Dropped anchors and filled non-negatives would hide NaN inputs: surface them.
  return reductions.keep_nan(reductions.reduce(terms, has_pos, reduction), s, pos | neg)
