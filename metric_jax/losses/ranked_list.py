"""Ranked list loss (Wang, Hua, Kodirov, Hu, Garnier, Robertson, CVPR 2019)."""

from __future__ import annotations

__all__ = ["ranked_list_loss"]

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.streaming import _engine as streaming_engine

# PML adds this to every reference column's weight in both denominators.
_PML_EPS = 1e-5


def weighted_sets(d, pos, neg, *, margin, Tn, Tp, alpha, pml_compat):  # pylint: disable=invalid-name
  """The two weighted sets of the loss on a [B, T] block of distances ``d``
  with its positive / negative masks: ``[(x, logw, active)]`` for the
  violating positives and negatives (shared with the streamed loss)."""
  pos_bound = alpha - margin
  # Comparisons written as negations so that NaN distances count as active
  # and NaN inputs stay visible in the loss.
  act_p = pos & ~(d <= pos_bound)
  act_n = neg & ~(d >= alpha)
  if pml_compat:
    act_p = act_p & ~(d <= 0)
    act_n = act_n & ~(d <= 0)
  return [(d - pos_bound, Tp * (d - pos_bound), act_p), (alpha - d, Tn * (alpha - d), act_n)]


def masked_log_weights(sets):
  """``logw`` on the active entries, -inf elsewhere (row maxima give the
  weights' shifts), per set."""
  return [jnp.where(active, logw, -jnp.inf) for _, logw, active in sets]


def finite_shift(row_max):
  """The shift from a masked row maximum: 0 for an empty row, NaN kept."""
  return jnp.where(row_max == -jnp.inf, 0.0, row_max)


def weighted_summands(sets, shifts):
  """``[w, w x]`` per set, ``w = exp(logw - shift)`` on the active entries."""
  summands = []
  for (x, logw, active), shift in zip(sets, shifts):
    w = jnp.where(active, jnp.exp(jnp.where(active, logw - shift, 0.0)), 0.0)
    summands += [w, w * x]
  return summands


def weighted_mean(den, num, compat, n_cols):
  """``num / den`` per row; 0 for an empty set (``den = 0``), NaN kept.
  ``compat``: PML's ``num / (den + 1e-5 n_cols)``."""
  if compat:
    return num / (den + _PML_EPS * n_cols)
  empty = den <= 0                   # written so that NaN stays visible
  return jnp.where(empty, 0.0, num / jnp.where(empty, 1.0, den))


def combine(loss_p, loss_n, imbalance):
  return (1.0 - imbalance) * loss_p + imbalance * loss_n


def check_args(margin, Tn, Tp, imbalance, alpha, distance):  # pylint: disable=invalid-name
  """Validates the hyper-parameters and the metric (a distance); returns
  ``alpha`` (None: 1 + margin / 2)."""
  if distances_lib.is_similarity(distance):
    raise ValueError(
        f"ranked_list_loss needs a distance, got the similarity {distance!r}.")
  _checks.scalar(margin, "margin")
  _checks.scalar(Tn, "Tn")
  _checks.scalar(Tp, "Tp")
  _checks.scalar(imbalance, "imbalance")
  if isinstance(imbalance, (int, float, np.number)) and not 0 <= imbalance <= 1:
    raise ValueError(f"`imbalance` must be in [0, 1], got {imbalance}.")
  if alpha is None:
    alpha = 1.0 + margin / 2.0
  _checks.scalar(alpha, "alpha")
  return alpha


def _weighted_means(sets, compat, n_cols):
  """For each ``(x, logw, active)`` of ``sets``: sum_active w x / sum_active w
  per row, with w = exp(logw); 0 if empty. All sets share one pass for their
  maxima and one for their sums.

  Exact form: weights shifted by their (stop-gradient) row maximum, which
  leaves the ratio and its gradient unchanged. ``compat``: PML's unshifted
  weights plus ``1e-5`` per reference column in the denominator."""
  if compat:
    shifts = [0.0] * len(sets)
  else:
    # Masked row maxima; empty rows (-inf) get 0, NaN stays NaN.
    shifts = reductions.fused_maxima(masked_log_weights(sets), axis=1)
    shifts = [finite_shift(s)[:, None] for s in shifts]
  sums = reductions.fused_sums(weighted_summands(sets, shifts), axis=1)
  return [weighted_mean(den, num, compat, n_cols) for den, num in zip(sums[::2], sums[1::2])]


def ranked_list_loss(embeddings: jax.Array, labels: jax.Array,
                     ref_embeddings: jax.Array | None = None,
                     ref_labels: jax.Array | None = None, *,
                     margin: float = 0.2, Tn: float = 10.0, Tp: float = 0.0,  # pylint: disable=invalid-name
                     imbalance: float = 0.5, alpha: float | None = None,
                     pml_compat: bool = False,
                     distance="euclidean", reduction: str = "mean",
                     where: jax.Array | None = None,
                     ref_where: jax.Array | None = None,
                     pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Ranked list loss (RLL-Simpler): push negatives beyond ``alpha`` and pull
  positives inside ``alpha - margin``, with loss-dependent pair weights.

  Per anchor ``i`` (distance ``d``), over the violating positives
  ``P*_i = {j in P_i: d_ij > alpha - margin}`` and negatives
  ``N*_i = {j in N_i: d_ij < alpha}``::

    w+_ij = exp(Tp (d_ij - (alpha - margin)))      w-_ij = exp(Tn (alpha - d_ij))
    L_P(i) = sum_{P*} w+ (d - (alpha - margin)) / sum_{P*} w+
    L_N(i) = sum_{N*} w- (alpha - d) / sum_{N*} w-
    l_i = (1 - imbalance) L_P(i) + imbalance L_N(i)

  averaged over all valid anchors (an empty set contributes 0). The weights
  are differentiated (as in PML); they are shifted by their row maximum,
  which leaves each weighted mean unchanged and prevents overflow at large
  temperatures.

  Defaults: ``margin=0.2``, ``Tn=10``, ``Tp=0`` as in the authors' CUB
  configuration (``XinshaoAmosWang/Ranked-List-Loss-for-DML``, which also
  uses ``alpha=1.4``); ``alpha=None`` means ``1 + margin / 2`` and
  ``imbalance=0.5`` as in PML (PML's ``RankedListLoss`` has no default for
  ``margin`` and ``Tn``).

  PML differences, reproduced by ``pml_compat=True``: PML adds ``1e-5`` per
  reference column to both denominators (a bias of relative size
  ``1e-5 M / sum w``) and ignores pairs at distance exactly 0 (so collapsed
  embeddings cost nothing there; here a negative at distance 0 costs
  ``alpha``).

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references (PML does not support them).
    ref_labels: [M] labels of the references.
    margin: gap between the positive and the negative boundary.
    Tn: temperature of the negative weights.
    Tp: temperature of the positive weights.
    imbalance: weight of the negative part, in [0, 1].
    alpha: negative boundary; None gives ``1 + margin / 2``.
    pml_compat: reproduce PML's numerics (see above).
    distance: a distance (default Euclidean), not a similarity.
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or
      ``"none"`` ([B] terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Wang, Hua, Kodirov, Hu, Garnier, Robertson, "Ranked List Loss for Deep
    Metric Learning", CVPR 2019, arXiv 1903.03238.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(mj.losses.ranked_list_loss(emb, jnp.array([0, 0, 1]))), 4)
    0.0685
  """
  reductions.check(reduction)
  alpha = check_args(margin, Tn, Tp, imbalance, alpha, distance)
  params = dict(margin=margin, Tn=Tn, Tp=Tp, imbalance=imbalance, alpha=alpha,
                pml_compat=pml_compat)
  tile = streaming_engine.routed_tile(embeddings, ref_embeddings)
  if tile is not None:
    # Large problems: the same loss over column tiles (small buffers).
    from metric_jax.streaming import ranked_list  # pylint: disable=import-outside-toplevel
    return ranked_list.streaming_ranked_list_loss(
        embeddings, labels, ref_embeddings, ref_labels, distance=distance,
        reduction=reduction, where=where, ref_where=ref_where, pair_mask=pair_mask,
        tile_size=tile, **params)
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  masks = problem.masks
  sets = weighted_sets(problem.matrix, masks.pos, masks.neg, margin=margin, Tn=Tn, Tp=Tp,
                       alpha=alpha, pml_compat=pml_compat)
  n_cols = jnp.sum(masks.col_valid).astype(jnp.float32)
  loss_p, loss_n = _weighted_means(sets, pml_compat, n_cols)
  return reductions.reduce(combine(loss_p, loss_n, imbalance), masks.row_valid, reduction)
