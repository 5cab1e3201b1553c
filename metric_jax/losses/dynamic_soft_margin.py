"""Dynamic soft margin loss (Zhang & Rusinkiewicz, ICCV 2019).

The margin of a triplet loss is replaced by a weight: each triplet's
``delta = d(a, p) - d(a, n)`` is weighted by the empirical CDF of ``delta``,
kept as a running histogram across training steps. The running histogram is
explicit state, threaded through the train step like optimiser state::

  hist = mj.losses.init_dynamic_soft_margin_histogram(num_bins=10)

  def loss_fn(params, hist, images, labels):
    emb = model.apply(params, images)
    return mj.losses.dynamic_soft_margin_loss(emb, labels, histogram=hist,
                                              return_histogram=True)

  (loss, hist), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, hist, images, labels)

It is statistics, not a learned parameter: no gradient flows into or out of
it (and :class:`metric_jax.losses.Objective` does not thread it: there the
loss starts from the empty histogram at every call).

Cost. With ``mining="all"`` every triplet counts, but nothing of size
B x M x M is built: the positives of all anchors are visited one rank at a
time (the first positive of every anchor, then the second, ...), each visit
an elementwise pass over the [B, M] matrix. Time is O(B M P num_bins) for
at most P positives per anchor (P = 3 in a batch of 4 samples per class;
P ~ B for a batch of few classes, as for PML's B x B x B triplet list).
``mining="hardest"`` is one such pass.
"""

from __future__ import annotations

__all__ = ["dynamic_soft_margin_loss", "init_dynamic_soft_margin_histogram"]

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import pairs
from metric_jax import reductions

MININGS = ("all", "hardest")
BATCH_HISTOGRAMS = ("normalized", "counts")
REDUCTIONS = ("mean", "sum", "none")
# Masked entries are moved here on the node axis, out of reach of every node.
_OFF_GRID = -2.0


def init_dynamic_soft_margin_histogram(num_bins: int = 10) -> jax.Array:
  """The empty running histogram of :func:`dynamic_soft_margin_loss`.

  All zeros means "no history": the first call then uses its batch's
  histogram alone (as a freshly built PML ``DynamicSoftMarginLoss`` does).

  Args:
    num_bins: number of histogram nodes (the loss's ``num_bins``), >= 1.

  Returns:
    ``[num_bins]`` float32 zeros.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> hist = mj.losses.init_dynamic_soft_margin_histogram(4)
    >>> hist.tolist()
    [0.0, 0.0, 0.0, 0.0]
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.], [0.6, 0.8]])
    >>> loss, hist = mj.losses.dynamic_soft_margin_loss(
    ...     emb, jnp.array([0, 0, 1, 1]), histogram=hist, num_bins=4, return_histogram=True)
    >>> [round(h, 4) for h in hist.tolist()]
    [0.0, 0.3264, 0.5862, 0.0874]
  """
  _checks.positive_int(num_bins, "num_bins")
  return jnp.zeros((num_bins,), jnp.float32)


def _check_histogram(histogram, num_bins: int) -> None:
  if histogram is None:
    return
  shape = tuple(np.shape(histogram))
  if shape != (num_bins,):
    raise ValueError(f"`histogram` must have shape ({num_bins},) (`num_bins`), got {shape}.")
  dtype = jnp.result_type(histogram)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`histogram` must be a floating-point array, got dtype {dtype}.")


def _check_settings(min_val, momentum) -> None:
  _checks.scalar(min_val, "min_val")
  if isinstance(min_val, (int, float, np.number)) and not min_val < 0:
    raise ValueError(f"`min_val` must be < 0, got {min_val}.")
  _checks.scalar(momentum, "momentum", non_negative=True)
  if isinstance(momentum, (int, float, np.number)) and not momentum <= 1:
    raise ValueError(f"`momentum` must be in [0, 1], got {momentum}.")


def _positions(delta, mask, min_val, num_bins: int) -> jax.Array:
  """Position of each ``delta`` on the node axis: node k sits at
  ``min_val + k w`` with ``w = 2 |min_val| / num_bins``; clamped to the
  nodes [0, num_bins - 1]; masked entries go off the grid."""
  if isinstance(min_val, (int, float, np.number)):
    width = 2.0 * abs(float(min_val)) / num_bins   # as PML: computed in float64
  else:
    width = 2.0 * jnp.abs(min_val) / num_bins
  t = jnp.clip((delta - min_val) / width, 0.0, num_bins - 1)
  return jnp.where(mask, t, _OFF_GRID)


def _node_masses(t: jax.Array, num_bins: int) -> jax.Array:
  """Linear-interpolation histogram: node k gets ``sum max(0, 1 - |t - k|)``
  (``1 - frac`` to the node below, ``frac`` to the node above). One sum per
  node keeps float32 totals exact enough at millions of triplets (a scatter
  into a few bins accumulates sequentially and drifts)."""
  return jnp.stack(reductions.fused_sums(
      [jnp.maximum(1.0 - jnp.abs(t - k), 0.0) for k in range(num_bins)]))


def _cdf_weights(t: jax.Array, mask: jax.Array, cdf: jax.Array) -> jax.Array:
  """``cdf[floor(t)]`` where ``mask``, else 0."""
  bins = jnp.clip(jnp.floor(t), 0, cdf.shape[0] - 1).astype(jnp.int32)
  return jnp.where(mask, jnp.take(cdf, bins, mode="clip"), 0.0)


def _update(old, masses, count, momentum, batch_histogram: str) -> jax.Array:
  """The running histogram after a batch with ``count`` terms (unchanged
  without terms; the batch alone when ``old`` is all zeros); sums to 1."""
  batch = masses / jnp.maximum(count, 1.0) if batch_histogram == "normalized" else masses
  mixed = jnp.where(jnp.sum(old) != 0, (1.0 - momentum) * old + momentum * batch, batch)
  total = jnp.sum(mixed)
  return jnp.where(count > 0, mixed / jnp.where(total > 0, total, 1.0), old)


def _positive_slots(d, pos, neg):
  """``(num_slots, slot)``: ``slot(s)`` gives, for every anchor at once, its
  (s + 1)-th positive as ``(sel [B, M] one-hot of that column, delta [B, M]
  = d(a, p) - d(a, n), triplets [B, M] mask of the valid negatives n)``;
  slots run from 0 to the largest number of positives of an anchor that has
  a negative."""
  rank = jnp.cumsum(pos, axis=1, dtype=jnp.int32) - 1
  n_pos = jnp.sum(pos, axis=1, dtype=jnp.int32)
  num_slots = jnp.max(jnp.where(jnp.any(neg, axis=1), n_pos, 0))

  def slot(s):
    sel = pos & (rank == s)
    x = jnp.sum(jnp.where(sel, d, 0.0), axis=1, keepdims=True)
    return sel, x - d, neg & (n_pos > s)[:, None]

  return num_slots, slot


def _all_triplets(d, masks, old, min_val, num_bins, momentum, batch_histogram):
  """Every triplet: ``(per-anchor terms [B], count, new histogram)``. The
  terms are ``sum_j d_aj A_aj`` with the constant weights ``A``: a positive
  column gets the summed CDF weight of its triplets, a negative column minus
  the summed weight of its triplets."""
  d_const = jax.lax.stop_gradient(d)
  num_slots, slot = _positive_slots(d_const, masks.pos, masks.neg)

  def add_masses(s, masses):
    _, delta, tri = slot(s)
    return masses + _node_masses(_positions(delta, tri, min_val, num_bins), num_bins)

  masses = jax.lax.fori_loop(0, num_slots, add_masses, jnp.zeros((num_bins,), jnp.float32))
  n_pos = jnp.sum(masks.pos, axis=1).astype(jnp.float32)
  n_neg = jnp.sum(masks.neg, axis=1).astype(jnp.float32)
  count = jnp.sum(n_pos * n_neg)
  new = _update(old, masses, count, momentum, batch_histogram)
  cdf = jnp.cumsum(new)

  def add_weights(s, acc):
    sel, delta, tri = slot(s)
    w = _cdf_weights(_positions(delta, tri, min_val, num_bins), tri, cdf)
    return acc + jnp.where(sel, jnp.sum(w, axis=1, keepdims=True), 0.0) - w

  weights = jax.lax.fori_loop(0, num_slots, add_weights, jnp.zeros(d.shape, jnp.float32))
  return jnp.sum(d * weights, axis=1), count, new


def _hardest_pairs(d, masks, old, min_val, num_bins, momentum, batch_histogram):
  """One term per positive pair (a, p): ``delta = d(a, p) - min(hardest
  negative of a, hardest anchor negative to p)``; returns ``(per-anchor
  terms [B], count, new histogram)``."""
  row, has_row = reductions.masked_min(d, masks.neg, axis=1)
  col, has_col = reductions.masked_min(d, masks.neg, axis=0)
  both = has_row[:, None] & has_col[None, :]
  hardest = jnp.where(both, jnp.minimum(row[:, None], col[None, :]),
                      jnp.where(has_row[:, None], row[:, None], col[None, :]))
  valid = masks.pos & (has_row[:, None] | has_col[None, :])
  delta = d - hardest
  t = _positions(jax.lax.stop_gradient(delta), valid, min_val, num_bins)
  count = jnp.sum(valid).astype(jnp.float32)
  new = _update(old, _node_masses(t, num_bins), count, momentum, batch_histogram)
  w = _cdf_weights(t, valid, jnp.cumsum(new))
  return jnp.sum(jnp.where(valid, w * delta, 0.0), axis=1), count, new


def dynamic_soft_margin_loss(embeddings: jax.Array, labels: jax.Array,
                             ref_embeddings: jax.Array | None = None,
                             ref_labels: jax.Array | None = None, *,
                             histogram: jax.Array | None = None,
                             min_val: float = -2.0, num_bins: int = 10,
                             momentum: float = 0.01, mining: str = "all",
                             batch_histogram: str = "normalized",
                             return_histogram: bool = False,
                             distance="euclidean", reduction: str = "mean",
                             where: jax.Array | None = None,
                             ref_where: jax.Array | None = None,
                             pair_mask: jax.Array | None = None):
  r"""Dynamic soft margin loss: triplet terms weighted by the running CDF of
  ``d(a, p) - d(a, n)``.

  For each term ``delta = d(a, p) - d(a, n)`` (for a similarity,
  ``s(a, n) - s(a, p)``), with nodes ``c_k = min_val + k w``,
  ``w = 2 |min_val| / K``, ``k = 0 .. K - 1`` (``K = num_bins``) and the
  clamped node position ``t = clip((delta - min_val) / w, 0, K - 1)``::

    h_k  = sum_terms max(0, 1 - |t - k|)               (batch histogram)
    H'   = normalise((1 - m) H + m h / |T|)              (running histogram)
    Phi_k = sum_{j <= k} H'_j
    L    = 1/|T| sum_terms sg(Phi_{floor(t)}) delta

  ``H`` is ``histogram`` (None or all zeros: no history, then ``H' = h /
  |T|``), ``m`` is ``momentum`` and ``|T|`` the number of terms; a batch
  without terms leaves ``H`` unchanged and costs 0. ``sg`` is stop-gradient:
  the gradient of a term is its CDF weight (a soft margin that follows the
  distribution of ``delta``), and ``H'`` carries no gradient.

  Terms (``mining``): ``"all"`` (default, PML with labels) uses every triplet
  (a, p, n); ``"hardest"`` (the paper, HardNet sampling) uses one term per
  positive pair with ``d(a, n)`` the smallest distance from ``a`` to its
  negatives or from ``p`` to the anchors negative to it. Anchors ``a`` and
  positives ``p`` of paired descriptors ``ref_embeddings[i] <->
  embeddings[i]`` with ``labels = ref_labels = arange(B)`` give PML's
  label-free mode ``DynamicSoftMarginLoss()(anchors, None, ref_emb=positives)``.

  PML parity: ``DynamicSoftMarginLoss(min_val=v, num_bins=K, momentum=m)``
  is this loss with the same three settings and ``batch_histogram="counts"``
  on L2-normalised embeddings (PML normalises and uses the Euclidean
  distance), a fresh PML module being ``histogram=None`` and each later call
  getting the histogram the previous one returned. PML mixes the running
  histogram with the batch's raw counts, ``normalise((1 - m) H + m h)``, so
  the batch outweighs the history by ``|T|``; the paper's (and this loss's
  default) ``"normalized"`` mixes frequencies. The first call from the empty
  histogram is the same under both. Known PML differences: PML's gradient
  also flows through the histogram (and a second ``backward`` then fails,
  PML issue #731); PML raises an index error for ``delta`` outside
  ``[min_val, -min_val - w)``, where this loss clamps to the end nodes; PML
  accumulates its histogram in float32 one triplet at a time, which drifts
  by ~1% at B = 2048. The authors' code also has a node at ``-min_val``.

  Args:
    embeddings: [B, D] float anchors (f32, bf16, f16; computed in f32).
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references (no self-pair exclusion).
    ref_labels: [M] labels of the references.
    histogram: [num_bins] float running histogram from the previous call
      (see :func:`init_dynamic_soft_margin_histogram`); None means empty.
    min_val: lowest node (< 0); the nodes span ``[min_val, -min_val)``,
      which for the Euclidean distance of unit vectors covers every delta.
    num_bins: number of nodes K (>= 1, static).
    momentum: weight of the batch in the running histogram, in [0, 1].
    mining: ``"all"`` (default) or ``"hardest"``, see above.
    batch_histogram: ``"normalized"`` (default, the paper) or ``"counts"``
      (PML), see above.
    return_histogram: also return the updated histogram.
    distance: metric name or callable; a similarity enters as
      ``s(a, n) - s(a, p)``.
    reduction: ``"mean"`` (default, over the terms), ``"sum"`` or ``"none"``
      ([B] per-anchor sums of the terms).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).

  Returns:
    Scalar float32 loss (or [B] terms for ``reduction="none"``); with
    ``return_histogram=True`` the pair ``(loss, new_histogram [num_bins]
    float32)``.

  References:
    Zhang, Rusinkiewicz, "Learning Local Descriptors with a CDF-Based
    Dynamic Soft Margin", ICCV 2019 (CVF open access; no arXiv version).

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.], [0.6, 0.8]])
    >>> labels = jnp.array([0, 0, 1, 1])
    >>> round(float(mj.losses.dynamic_soft_margin_loss(emb, labels)), 4)
    -0.054
    >>> hist = mj.losses.init_dynamic_soft_margin_histogram()   # the train state holds it
    >>> for labels in ([0, 0, 1, 1], [0, 1, 0, 1]):
    ...   loss, hist = mj.losses.dynamic_soft_margin_loss(
    ...       emb, jnp.array(labels), histogram=hist, momentum=0.5, return_histogram=True)
    ...   print(round(float(loss), 4))
    -0.054
    0.2003
  """
  reductions.check(reduction, REDUCTIONS)
  _checks.choice(mining, MININGS, "mining")
  _checks.choice(batch_histogram, BATCH_HISTOGRAMS, "batch_histogram")
  _checks.positive_int(num_bins, "num_bins")
  _check_settings(min_val, momentum)
  _check_histogram(histogram, num_bins)
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  d = -problem.matrix if problem.is_similarity else problem.matrix
  masks = problem.masks
  old = (jnp.zeros((num_bins,), jnp.float32) if histogram is None
         else jax.lax.stop_gradient(jnp.asarray(histogram, jnp.float32)))
  terms_fn = _all_triplets if mining == "all" else _hardest_pairs
  terms, count, new = terms_fn(d, masks, old, min_val, num_bins, momentum, batch_histogram)
  if reduction == "none":
    loss = terms
  else:
    loss = jnp.sum(terms)
    if reduction == "mean":
      loss = loss / jnp.maximum(count, 1.0)
  # A NaN distance in any valid pair makes the loss and the histogram NaN.
  used = masks.pos | masks.neg
  loss = reductions.keep_nan(loss, d, used)
  if return_histogram:
    return loss, jax.lax.stop_gradient(reductions.keep_nan(new, d, used))
  return loss
