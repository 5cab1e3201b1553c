"""Angular loss (Wang, Zhou, Wen, Liu, Lin, ICCV 2017), N-pair form.

For a positive pair ``(a, p)`` and a negative ``n`` of ``a`` (all three
L2-normalised), the angle at ``n`` of the triangle ``(a, p, n)`` is bounded by
``alpha`` through

  f_apn = 4 tan^2(alpha) (x_a + x_p)^T x_n - 2 (1 + tan^2(alpha)) x_a^T x_p

and ``l_ap = log(1 + sum_n exp(f_apn))``. The logits live on an
(anchor, positive, negative) cube; PML enumerates every positive pair. Three
exact evaluations avoid materialising the cube:

* ``"gathered"``: each anchor's positives are gathered into ``P`` slots
  (``P`` = 4 or 16, or ``max_positives``), then a masked log-sum-exp over a
  [B, P, M] grid: O(B P M), the fast path for PK batches; large grids are
  evaluated in tiles of anchors (small buffers: faster on CPU).
* ``"factorized"``: ``sum_n e^{f_apn} = e^{-c S_ap} sum_n e^{k S_an} e^{k R_pn}``
  (``k = 4 tan^2 alpha``, ``c = 2 (1 + tan^2 alpha)``, ``S`` anchor-reference
  and ``R`` reference-reference cosines) is one [B, M] x [M, M] matrix
  product of row-shifted exponentials. Each factor lies in
  ``[e^{-2k}, 1]``, so the sum cannot overflow and cannot underflow for
  ``k < 21`` (alpha below about 66 degrees); ``"auto"`` uses it up to 60
  degrees when some anchor has more than 16 positives.
* ``"tiled"``: a masked log-sum-exp over each anchor's [M, M] (positive x
  negative) slab, streamed over tiles of anchors and recomputed in the
  backward pass. Exact for any alpha < 90 degrees; O(B M^2) work.
"""

from __future__ import annotations

__all__ = ["angular_loss"]

import math

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.losses import _grid

METHODS = ("auto", "gathered", "factorized", "tiled")
# Positive-slot sizes tried in turn by "auto" (the smallest that fits).
_GATHER_SIZES = (4, 16)
# Largest alpha (radians) for which "auto" picks the factorized product.
_FACTORIZED_MAX_ALPHA = math.radians(60.0)
# Budget for one tile of the streamed path, in [t, M, M] elements.
_TILE_ELEMENTS = 1 << 22


def _factorized(s, r, pos, neg, ref_neg, k, c):
  """[B, M] per-pair terms via one matrix product (see module docstring)."""
  mu, _ = reductions.masked_max(s, neg)                 # [B] shift of the anchors
  nu, _ = reductions.masked_max(r, ref_neg)             # [M] shift of the positives
  mu, nu = jax.lax.stop_gradient(mu), jax.lax.stop_gradient(nu)
  a = jnp.where(neg, jnp.exp(jnp.where(neg, k * (s - mu[:, None]), 0.0)), 0.0)
  e = jnp.exp(k * (r - nu[:, None]))
  g = jnp.matmul(a, e.T, precision=jax.lax.Precision.HIGHEST)   # [B, M]
  ok = pos & ~(g <= 0)                  # NaN inputs stay visible
  log_g = jnp.log(jnp.where(ok, g, 1.0))
  x = log_g + k * (mu[:, None] + nu[None, :]) - c * s
  return jnp.where(ok, jax.nn.softplus(x), 0.0)


def _slot_lse(s, r_rows, s_ap, slot_valid, neg, k, c):
  """[b, p] ``log(1 + sum_n exp(f_apn))`` over each anchor's negatives for
  the anchors' positive slots: ``s`` [b, M] anchor cosines, ``r_rows``
  [b, p, M] cosines of the slots' positives, ``s_ap`` [b, p]."""
  logits = k * (s[:, None, :] + r_rows) - c * s_ap[:, :, None]         # [b, p, M]
  lse, _ = reductions.masked_logsumexp(logits, slot_valid[:, :, None] & neg[:, None, :],
                                       include_zero=True)
  return jnp.where(slot_valid, lse, 0.0)


def _gathered(s, r, pos, neg, k, c, p):
  """[B, M] per-pair terms from each anchor's first ``p`` positives: an exact
  masked log-sum-exp over a [B, p, M] (positive x negative) grid. Anchors
  with more than ``p`` positives get NaN terms (never a silent truncation).

  Large grids go in tiles of anchors (:func:`_grid.over_every_anchor`)."""
  b, m = s.shape
  p_idx, p_valid = _grid.first_positive_columns(pos, min(p, m))          # [B, p]
  s_ap = jnp.take_along_axis(s, p_idx, axis=1)                           # [B, p]
  slot_lse = lambda s_a, idx_a, s_ap_a, valid_a, neg_a: _slot_lse(
      s_a, r[idx_a], s_ap_a, valid_a, neg_a, k, c)
  rows, row_elements = (s, p_idx, s_ap, p_valid, neg), p_idx.shape[1] * m
  lse = _grid.over_every_anchor(slot_lse, rows, row_elements)
  terms = jnp.zeros((b, m), lse.dtype).at[jnp.arange(b)[:, None], p_idx].add(lse)
  overflow = _grid.positive_counts(pos) > p
  return jnp.where(overflow[:, None], jnp.nan, terms)


def _tiled(s, r, pos, neg, k, c, tile):
  """[B, M] per-pair terms, exact masked LSE over each anchor's slab."""
  m = s.shape[1]
  if tile is None:
    tile = max(1, min(s.shape[0], _TILE_ELEMENTS // max(m * m, 1)))

  @jax.checkpoint
  def row(args):
    s_a, pos_a, neg_a = args
    logits = k * (s_a[None, :] + r) - c * s_a[:, None]            # [p, n]
    mask = pos_a[:, None] & neg_a[None, :]
    lse, _ = reductions.masked_logsumexp(logits, mask, include_zero=True)
    return jnp.where(pos_a, lse, 0.0)

  return jax.lax.map(row, (s, pos, neg), batch_size=tile)


def angular_loss(embeddings: jax.Array, labels: jax.Array,
                 ref_embeddings: jax.Array | None = None,
                 ref_labels: jax.Array | None = None, *,
                 alpha: float = math.radians(40.0),
                 distance="euclidean", reduction: str = "mean",
                 where: jax.Array | None = None,
                 ref_where: jax.Array | None = None,
                 pair_mask: jax.Array | None = None,
                 method: str = "auto", max_positives: int | None = None,
                 anchor_tile: int | None = None) -> jax.Array:
  r"""Angular loss over every positive pair and all negatives of its anchor.

  With L2-normalised ``x`` and ``t = tan(alpha)``::

    f_apn = 4 t^2 (x_a + x_p)^T x_n - 2 (1 + t^2) x_a^T x_p
    l_ap  = log(1 + sum_{n in N_a} exp(f_apn))

  averaged over the positive pairs ``(a, p)``. An anchor without negatives
  gives 0 for its pairs (they still count in the mean). The embeddings are
  L2-normalised inside (the loss is defined on the unit sphere).

  ``alpha`` is in **radians**. PML's ``AngularLoss(alpha=40)`` takes degrees:
  it equals ``alpha=math.radians(40)``, the default (the paper uses 36 to 55
  degrees). Differences from PML: PML takes the negatives of an anchor from
  its labels even when a miner restricts the pairs, here ``pair_mask``
  restricts both the positive pairs and the negatives; PML does not
  normalise the negatives ``x_n`` (the same on normalised inputs).

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references (positives and negatives).
    ref_labels: [M] labels of the references.
    alpha: angle bound in radians, in (0, pi/2).
    distance: only ``"euclidean"`` (PML's only compatible distance; the loss
      uses the cosines of the normalised embeddings).
    reduction: ``"mean"`` over positive pairs (default), ``"mean_nonzero"``,
      ``"sum"`` or ``"none"`` ([B, M] per-pair terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).
    method: how the (anchor, positive, negative) sums are evaluated, all
      exact (see the module docstring): ``"auto"`` (default: ``"gathered"``
      when every anchor has at most 16 positives, else ``"factorized"`` up to
      alpha = 60 degrees or a traced alpha, else ``"tiled"``), ``"gathered"``,
      ``"factorized"`` or ``"tiled"``.
    max_positives: static bound on the positives of any anchor (K - 1 for a
      PK batch of K samples per class): the gathered path with that many
      slots. An anchor with more positives makes the loss NaN, never a
      silently truncated value.
    anchor_tile: anchors per tile of the tiled path.

  Returns:
    Scalar float32 loss, or [B, M] terms for ``reduction="none"``.

  References:
    Wang, Zhou, Wen, Liu, Lin, "Deep Metric Learning with Angular Loss",
    ICCV 2017, arXiv 1708.01682.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(mj.losses.angular_loss(emb, jnp.array([0, 0, 1]))), 4)
    0.3035
  """
  reductions.check(reduction)
  _checks.choice(method, METHODS, "method")
  _checks.choice(distance, ("euclidean",), "distance")
  _checks.scalar(alpha, "alpha")
  concrete = isinstance(alpha, (int, float, np.number))
  if concrete and not 0 < alpha < math.pi / 2:
    raise ValueError(f"`alpha` is in radians and must be in (0, pi/2), got {alpha} "
                     f"(degrees? use math.radians({alpha})).")
  if anchor_tile is not None:
    _checks.positive_int(anchor_tile, "anchor_tile")
  if max_positives is not None:
    _checks.positive_int(max_positives, "max_positives")
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance="cosine", where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  s, masks = problem.matrix, problem.masks
  if ref_embeddings is None:
    r = s
    r_labels, r_valid = labels, masks.col_valid
  else:
    y = distances_lib.l2_normalize(
        pairs.zero_invalid_rows(ref_embeddings, ref_where).astype(jnp.float32))
    r = jnp.matmul(y, y.T, precision=jax.lax.Precision.HIGHEST)
    r_labels, r_valid = ref_labels, masks.col_valid
  tan2 = jnp.square(jnp.tan(jnp.asarray(alpha, jnp.float32)))
  k, c = 4.0 * tan2, 2.0 * (1.0 + tan2)
  pos, neg = masks.pos, masks.neg

  def dense():
    if method == "tiled" or (method == "auto" and concrete and alpha > _FACTORIZED_MAX_ALPHA):
      return _tiled(s, r, pos, neg, k, c, anchor_tile)
    # Through label_masks: labels that are constants of the program are
    # then not folded into [M, M] masks at compile time.
    ref_neg = pairs.label_masks(r_labels, where=r_valid).neg
    return _factorized(s, r, pos, neg, ref_neg, k, c)

  if max_positives is not None or method == "gathered":
    terms = _gathered(s, r, pos, neg, k, c, max_positives or _GATHER_SIZES[-1])
  elif method != "auto":
    terms = dense()
  else:
    # The smallest positive-slot grid that holds every anchor's positives
    # (a runtime branch over static shapes), else the dense evaluation.
    terms = _grid.smallest_fitting_grid(
        _GATHER_SIZES, s.shape[1], jnp.max(_grid.positive_counts(pos)),
        lambda p: _gathered(s, r, pos, neg, k, c, p), dense)
  # masked_logsumexp drops NaN sums: keep NaN inputs visible.
  return reductions.keep_nan(reductions.reduce(terms, masks.pos, reduction), s,
                              masks.pos | masks.neg)
