"""Multi-class N-pair loss (Sohn, NeurIPS 2016).

Two entry points:

* :func:`npair_loss` takes a labelled batch (the public loss signature) and
  picks one positive pair per class with static-shape mask arithmetic.
* :func:`npair_loss_from_pairs` takes the pairs already laid out as two
  [N, D] arrays (anchors, positives), as tf.contrib ``npairs_loss`` does.
"""

from __future__ import annotations

__all__ = ["npair_loss", "npair_loss_from_pairs"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions

PAIRS = ("first", "all")


def _sq_norms(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return jnp.sum(x * x, axis=-1)


def _logits(x, y, distance):
  """[N, M] logits: the similarity, or minus the distance."""
  mat = distances_lib.pairwise(x, y, distance)
  return mat if distances_lib.is_similarity(distance) else -mat


def _check_l2_reg(l2_reg):
  _checks.scalar(l2_reg, "l2_reg", non_negative=True)


def npair_loss(embeddings: jax.Array, labels: jax.Array,
               ref_embeddings: jax.Array | None = None,
               ref_labels: jax.Array | None = None, *,
               l2_reg: float = 0.002, pairs_per_class: str = "first",
               distance="dot", reduction: str = "mean",
               where: jax.Array | None = None,
               ref_where: jax.Array | None = None,
               pair_mask: jax.Array | None = None,
               max_pairs: int | None = None) -> jax.Array:
  r"""Multi-class N-pair loss over one positive pair per class.

  From a labelled batch, pairs ``(f_a, f_a^+)`` are chosen (below); with
  ``s`` the similarity (``-d`` for a distance) and ``A`` the chosen
  anchors::

    l_a = -log( exp(s(f_a, f_a^+)) / sum_{b in A} exp(s(f_a, f_b^+)) )
          + 0.25 * l2_reg * (||f_a||^2 + ||f_a^+||^2)

  so the mean over ``A`` is softmax cross-entropy over the ``|A| x |A|``
  anchor-by-positive logits (target: the diagonal) plus tf.contrib's
  regulariser ``0.25 * l2_reg * (mean ||f_a||^2 + mean ||f_a^+||^2)`` on the
  raw embeddings. The paper uses unnormalised inner products
  (``distance="dot"``, the default); any metric is accepted.

  Pair choice (``pairs_per_class``):

  * ``"first"`` (default, PML's rule): per class, the lowest-index sample
    that has a positive, with its lowest-index positive. Further samples of
    the class are ignored; classes with one sample are skipped.
  * ``"all"``: every sample that has a positive is an anchor, with its
    lowest-index positive. An anchor's softmax runs over its own positive
    and the positives of the anchors of *other* classes; same-class columns
    other than its own are left out (they are neither target nor negative).

  PML equivalence: ``NPairsLoss()`` is ``l2_reg=0`` on L2-normalised
  embeddings (PML's default ``DotProductSimilarity`` normalises), or with
  ``DotProductSimilarity(normalize_embeddings=False)`` on raw ones. PML's
  ``embedding_regularizer=LpRegularizer(power=2)`` with weight
  ``0.5 * l2_reg`` equals this regulariser on a batch of exactly two
  samples per class.

  Args:
    embeddings: [B, D] float embeddings (anchors).
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references from which the positives are
      taken (the anchors stay in ``embeddings``).
    ref_labels: [M] labels of the references.
    l2_reg: lambda of the L2 regulariser (tf.contrib default 0.002; the 0.25
      factor is applied inside).
    pairs_per_class: ``"first"`` or ``"all"``, see above.
    distance: metric name or callable; ``"dot"`` (default) as in the paper.
    reduction: ``"mean"`` (default, over chosen anchors), ``"mean_nonzero"``,
      ``"sum"`` or ``"none"`` ([B] terms, zero for unchosen samples).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the candidate positive pairs.
    max_pairs: optional static cap on the number of pairs (anchors beyond it,
      in index order, are dropped). The softmax is computed over
      ``K = min(max_pairs, B // 2)`` static slots (``B`` for ``"all"`` or
      with a reference set), or over ``K // 2`` of them when the batch's
      pairs fit (decided at run time: a batch of 4 or more samples per
      class); for P x K batches ``max_pairs=P`` is exact and makes the
      softmax P x P.

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
    Objective", NeurIPS 2016.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.9, 0.1], [0., 1.], [0.2, 0.8], [0., 1.]])
    >>> round(float(mj.losses.npair_loss(emb, jnp.array([0, 0, 1, 1, 1]))), 4)
    0.4041
  """
  reductions.check(reduction)
  _check_l2_reg(l2_reg)
  _checks.choice(pairs_per_class, PAIRS, "pairs_per_class")
  if max_pairs is not None:
    _checks.positive_int(max_pairs, "max_pairs")
  pairs.check_inputs(embeddings, labels, ref_embeddings, ref_labels, where,
                     ref_where, pair_mask)
  # `pairs.prepare` would build the anchor x reference matrix; here the
  # logits are between the anchors and their chosen positives instead.
  masks = pairs.label_masks(labels, ref_labels, where=where,
                            ref_where=ref_where, pair_mask=pair_mask)
  labels = jnp.asarray(labels)
  x = jnp.asarray(pairs.zero_invalid_rows(embeddings, where))
  if ref_embeddings is None:
    ref = x
  else:
    ref = jnp.asarray(pairs.zero_invalid_rows(ref_embeddings, ref_where))
  b = x.shape[0]

  has_pos = jnp.any(masks.pos, axis=1)
  first_pos = reductions.first_argmax(masks.pos, axis=1)   # lowest-index positive
  same = labels[:, None] == labels[None, :]
  if pairs_per_class == "first":
    earlier = jnp.arange(b)[None, :] < jnp.arange(b)[:, None]   # [i, k]: k < i
    taken = jnp.any(same & earlier & has_pos[None, :], axis=1)
    chosen = has_pos & ~taken
  else:
    chosen = has_pos

  # Compact the chosen anchors into K static slots (ascending index): the
  # softmax is [K, K], not [B, B]. Without a reference set every chosen
  # class has >= 2 samples, so K = B // 2 always suffices.
  if pairs_per_class == "all":
    k = b
  elif ref_embeddings is None:
    k = max(b // 2, 1)
  else:
    k = min(b, ref.shape[0])
  if max_pairs is not None:
    k = min(k, max_pairs)
    chosen = chosen & (jnp.cumsum(chosen) <= k)

  def on_slots(n_slots):
    """The loss with the chosen anchors compacted into n_slots static slots."""
    slot = jnp.nonzero(chosen, size=n_slots, fill_value=0)[0]          # [K]
    slot_valid = jnp.arange(n_slots) < jnp.sum(chosen)
    anchors = x[slot]
    positives = ref[first_pos[slot]]
    slot_labels = labels[slot]
    logits = _logits(anchors, positives, distance)                # [K, K]
    cols = slot_valid[None, :] & slot_valid[:, None]
    cols = cols & ((slot_labels[:, None] != slot_labels[None, :]) | jnp.eye(n_slots, dtype=bool))
    lse, _ = reductions.masked_logsumexp(logits, cols)
    ce = lse - jnp.diagonal(logits)
    reg = 0.25 * l2_reg * (_sq_norms(anchors) + _sq_norms(positives))
    terms = ce + reg
    if reduction == "none":
      return jnp.zeros((b,), jnp.float32).at[slot].add(jnp.where(slot_valid, terms, 0.0))
    return reductions.reduce(terms, slot_valid, reduction)

  # k slots hold the pairs of any batch (B / 2 without references), but a
  # batch of classes with 4 or more samples each chooses at most B / 4:
  # then half the slots (a quarter of the softmax and of its products) are
  # used, chosen at run time; other batches (e.g. 2 per class) take all k.
  # A plain cond: its backward keeps zero-filled residuals of the branch not
  # taken, cheaper here than recomputing either branch.
  half = max(k // 2, 1)
  if half == k:
    return on_slots(k)
  return jax.lax.cond(jnp.sum(chosen) <= half, lambda: on_slots(half), lambda: on_slots(k))


def npair_loss_from_pairs(anchors: jax.Array, positives: jax.Array, *,
                          labels: jax.Array | None = None,
                          l2_reg: float = 0.002, distance="dot",
                          reduction: str = "mean",
                          where: jax.Array | None = None) -> jax.Array:
  r"""N-pair loss on an explicit pair layout (tf.contrib ``npairs_loss``).

  Row i of ``anchors`` and row i of ``positives`` form a pair. With
  ``L_ij = s(a_i, p_j)`` (``-d`` for a distance) and targets ``T``::

    l_i = -sum_j T_ij log softmax_j(L_i) + 0.25 * l2_reg * (||a_i||^2 + ||p_i||^2)

  ``T`` is the identity when ``labels`` is None (every pair from a distinct
  class, Sohn's setting), and otherwise the row-normalised label-equality
  matrix, as in tf.contrib ``npairs_loss(labels, embeddings_anchor,
  embeddings_positive, reg_lambda=0.002)``; the mean over pairs is exactly
  that function.

  Args:
    anchors: [N, D] float anchor embeddings.
    positives: [N, D] float positive embeddings, row-aligned with anchors.
    labels: optional [N] integer class of each pair.
    l2_reg: lambda of the regulariser (0.25 factor applied inside).
    distance: metric name or callable; ``"dot"`` as in the paper.
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"``,
      ``"none"`` ([N] terms).
    where: [N] bool validity of the pairs (padding rows and columns are
      removed from every softmax).

  Returns:
    Scalar float32 loss, or [N] terms for ``reduction="none"``.

  References:
    Sohn, NeurIPS 2016.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> a = jnp.array([[1., 0.], [0., 1.]])
    >>> p = jnp.array([[0.9, 0.1], [0.2, 0.8]])
    >>> round(float(mj.losses.npair_loss_from_pairs(a, p)), 4)
    0.4041
  """
  reductions.check(reduction)
  _check_l2_reg(l2_reg)
  _checks.embeddings(anchors, "anchors")
  _checks.embeddings(positives, "positives")
  if anchors.shape != positives.shape:
    raise ValueError(
        "`anchors` and `positives` must have the same shape [N, D], got "
        f"{tuple(anchors.shape)} and {tuple(positives.shape)}.")
  n = anchors.shape[0]
  _checks.mask(where, (n,), "where")
  if labels is not None:
    _checks.labels(labels, n, "labels")
  a = pairs.zero_invalid_rows(anchors, where)
  p = pairs.zero_invalid_rows(positives, where)
  valid = jnp.ones((n,), bool) if where is None else where
  logits = _logits(a, p, distance)
  cols = valid[None, :] & valid[:, None]
  lse, _ = reductions.masked_logsumexp(logits, cols)
  log_prob = logits - lse[:, None]
  if labels is None:
    ce = -jnp.diagonal(log_prob)
  else:
    target = (labels[:, None] == labels[None, :]) & cols
    target = target / jnp.maximum(jnp.sum(target, axis=1, keepdims=True), 1)
    ce = -jnp.sum(jnp.where(cols, target * log_prob, 0.0), axis=1)
  reg = 0.25 * l2_reg * (_sq_norms(a) + _sq_norms(p))
  return reductions.reduce(ce + reg, valid, reduction)
