"""Label masks over pairs: positives, negatives, self-pair exclusion, validity.

A loss compares anchors (the rows, from ``embeddings``) with references (the
columns, from ``ref_embeddings`` or, by default, the batch itself). Every
mask here is a static-shape boolean [B, M] matrix; nothing enumerates pairs.

When the batch is compared with itself (no ``ref_labels``), the diagonal is
never a positive pair. With an explicit reference set the caller decides
what identity means (a memory bank may hold earlier copies of an anchor):
pass ``exclude_self=True`` only when row i and column i are the same sample.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib

__all__ = ["PairMasks", "PairwiseProblem", "check_inputs", "label_masks", "prepare",
           "zero_invalid_rows"]


class PairMasks(NamedTuple):
  """Boolean masks over the [B, M] anchor x reference grid.

  Attributes:
    pos: [B, M] valid positive pairs (same label, not the same sample).
    neg: [B, M] valid negative pairs (different labels).
    row_valid: [B] anchors that are real (``where``).
    col_valid: [M] references that are real (``ref_where``).

  Example:
    >>> import jax.numpy as jnp
    >>> masks = label_masks(jnp.array([0, 0, 1]))
    >>> masks.pos.shape, masks.pos.sum().item(), masks.neg.sum().item()
    ((3, 3), 2, 4)
  """
  pos: jax.Array
  neg: jax.Array
  row_valid: jax.Array
  col_valid: jax.Array


def label_masks(labels: jax.Array, ref_labels: jax.Array | None = None, *,
                where: jax.Array | None = None,
                ref_where: jax.Array | None = None,
                exclude_self: bool | None = None,
                pair_mask: jax.Array | None = None) -> PairMasks:
  """Positive and negative pair masks from integer labels.

  With ``valid(i, j) = where_i and ref_where_j and pair_mask_ij``::

    pos(i, j) = labels_i == ref_labels_j and valid(i, j) [and i != j]
    neg(i, j) = labels_i != ref_labels_j and valid(i, j)

  Args:
    labels: [B] integer labels of the anchors.
    ref_labels: [M] integer labels of the references; None means the batch
      itself (M = B) and implies ``exclude_self=True``.
    where: optional [B] bool, False marks padding anchors.
    ref_where: optional [M] bool, False marks padding references. Defaults to
      ``where`` when ``ref_labels`` is None.
    exclude_self: drop the diagonal from the positives (requires M = B).
      Defaults to ``ref_labels is None``.
    pair_mask: optional [B, M] bool restriction (e.g. from a miner): only
      pairs where it is True are kept.

  Returns:
    :class:`PairMasks`.

  Raises:
    ValueError: if ``exclude_self=True`` with M != B.

  Example:
    >>> import jax.numpy as jnp
    >>> masks = label_masks(jnp.array([0, 1]), jnp.array([0, 0, 1]))
    >>> masks.pos.astype(int).tolist(), masks.neg.astype(int).tolist()
    ([[1, 1, 0], [0, 0, 1]], [[0, 0, 1], [1, 1, 0]])
    >>> label_masks(jnp.array([0, 0]), where=jnp.array([True, False])).pos.astype(int).tolist()
    [[0, 0], [0, 0]]
  """
  b = labels.shape[0]
  same = ref_labels is None
  # Labels are often constants of the traced program (a NumPy array closed
  # over by a jitted loss, fixed instance labels in self-supervised use):
  # XLA would then evaluate every [B, M] mask operation at compile time,
  # which takes seconds at B = 1024 and minutes at B = 2048. The barrier
  # keeps the masks run-time values; it costs nothing at run time.
  labels = jax.lax.optimization_barrier(jnp.asarray(labels))
  if same:
    ref_labels = labels
    if ref_where is None:
      ref_where = where
  else:
    ref_labels = jax.lax.optimization_barrier(jnp.asarray(ref_labels))
  m = ref_labels.shape[0]
  if exclude_self is None:
    exclude_self = same
  row_valid = jnp.ones((b,), bool) if where is None else where
  col_valid = jnp.ones((m,), bool) if ref_where is None else ref_where
  valid = row_valid[:, None] & col_valid[None, :]
  if pair_mask is not None:
    valid = valid & pair_mask
  same_label = labels[:, None] == ref_labels[None, :]
  pos = same_label & valid
  if exclude_self:
    if m != b:
      raise ValueError(
          f"`exclude_self=True` needs as many references as anchors, got {b} and {m}.")
    pos = pos & ~jnp.eye(b, dtype=bool)
  neg = ~same_label & valid
  return PairMasks(pos, neg, row_valid, col_valid)


class PairwiseProblem(NamedTuple):
  """What almost every embedding loss starts from.

  Attributes:
    matrix: [B, M] float32 distances or similarities.
    is_similarity: True if ``matrix`` holds similarities.
    masks: :class:`PairMasks`.
    symmetric: True when ``matrix`` came from
      :func:`metric_jax.distances.self_pairwise_for_symmetric_loss` (see
      ``prepare(symmetric=True)``): its gradient is exact only for a
      symmetric cotangent, e.g. the one of
      :func:`metric_jax.reductions.symmetric_masked_logsumexps`.

  Example:
    >>> import jax.numpy as jnp
    >>> problem = prepare(jnp.array([[0., 0.], [3., 4.]]), jnp.array([0, 1]))
    >>> problem.matrix.tolist(), problem.is_similarity, problem.masks.neg.sum().item()
    ([[0.0, 5.0], [5.0, 0.0]], False, 2)
  """
  matrix: jax.Array
  is_similarity: bool
  masks: PairMasks
  symmetric: bool = False


def check_inputs(embeddings, labels, ref_embeddings=None, ref_labels=None,
                 where=None, ref_where=None, pair_mask=None) -> None:
  """Validates the standard loss arguments of the public contract.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] float references (same D); default None.
    ref_labels: [M] integer labels, given exactly when ``ref_embeddings`` is.
    where: optional [B] bool validity of the anchors.
    ref_where: optional [M] bool validity of the references.
    pair_mask: optional [B, M] bool restriction of the pairs.

  Returns:
    None.

  Raises:
    ValueError / TypeError: naming the first argument of the wrong rank,
      shape or dtype (or ``ref_embeddings`` / ``ref_labels`` given alone).

  Example:
    >>> import jax.numpy as jnp
    >>> check_inputs(jnp.zeros((2, 3)), jnp.array([0, 1]))
    >>> try:
    ...   check_inputs(jnp.zeros((2, 3)), jnp.array([0, 1]), ref_embeddings=jnp.zeros((4, 3)))
    ... except ValueError as e:
    ...   print(str(e)[:56])
    `ref_embeddings` and `ref_labels` must be given together
  """
  _checks.embeddings(embeddings, "embeddings")
  b = embeddings.shape[0]
  _checks.labels(labels, b, "labels")
  _checks.mask(where, (b,), "where")
  if (ref_embeddings is None) != (ref_labels is None):
    raise ValueError(
        "`ref_embeddings` and `ref_labels` must be given together, got "
        f"ref_embeddings={'None' if ref_embeddings is None else 'array'} and "
        f"ref_labels={'None' if ref_labels is None else 'array'}.")
  m = b
  if ref_embeddings is not None:
    _checks.embeddings(ref_embeddings, "ref_embeddings")
    _checks.same_dim(embeddings, ref_embeddings, "embeddings", "ref_embeddings")
    m = ref_embeddings.shape[0]
    _checks.labels(ref_labels, m, "ref_labels")
  _checks.mask(ref_where, (m,), "ref_where")
  _checks.mask(pair_mask, (b, m), "pair_mask")


def zero_invalid_rows(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """Zeroes masked rows so padding (even NaN padding) cannot leak into
  valid rows' values or gradients: ``out_i = x_i if valid_i else 0``.

  Args:
    x: [B, ...] array.
    valid: [B] bool, False for the rows to zero; None keeps ``x`` as is.

  Returns:
    Array of the shape and dtype of ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> zero_invalid_rows(jnp.array([[1., 2.], [jnp.nan, 3.]]), jnp.array([True, False])).tolist()
    [[1.0, 2.0], [0.0, 0.0]]
  """
  if valid is None:
    return x
  return jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))


def prepare(embeddings: jax.Array, labels: jax.Array,
            ref_embeddings: jax.Array | None = None,
            ref_labels: jax.Array | None = None, *,
            distance: distances_lib.MetricLike = "euclidean",
            where: jax.Array | None = None,
            ref_where: jax.Array | None = None,
            pair_mask: jax.Array | None = None,
            symmetric: bool = False,
            exclude_self: bool | None = None) -> PairwiseProblem:
  """Validates inputs, computes the [B, M] metric matrix and the label masks.

  Invalid rows (``where`` / ``ref_where`` False) are zeroed before the
  metric (:func:`zero_invalid_rows`), and the masks come from
  :func:`label_masks` (self-pairs excluded when ``ref_embeddings`` is None).

  Args:
    embeddings: [B, D] anchors.
    labels: [B] integer labels.
    ref_embeddings: [M, D] references, or None (default) for the batch itself.
    ref_labels: [M] integer labels of the references (default None).
    distance: metric name or callable (see :mod:`metric_jax.distances`);
      default ``"euclidean"``.
    where: optional [B] bool validity of anchors.
    ref_where: optional [M] bool validity of references.
    pair_mask: optional [B, M] bool restriction of the pairs (miners).
    symmetric: the caller's loss weighs pair ``(i, j)`` exactly as
      ``(j, i)`` (global sums or means over pair masks, no per-anchor
      normalisation), or reads the matrix only through functions that
      return a symmetric cotangent
      (:func:`metric_jax.reductions.symmetric_masked_logsumexps` when
      ``PairwiseProblem.symmetric``). When the batch is compared with
      itself under a built-in metric, with no ``pair_mask`` and no separate
      ``ref_where``, the matrix then comes from
      :func:`metric_jax.distances.self_pairwise_for_symmetric_loss`, whose
      gradient takes one matrix product instead of two. Default False.
    exclude_self: as in :func:`label_masks` (default None: the diagonal
      leaves the positives when the batch is compared with itself); False
      keeps each anchor among its own positives.

  Returns:
    :class:`PairwiseProblem`.

  Example:
    >>> import jax.numpy as jnp
    >>> emb = jnp.array([[1., 0.], [0., 1.], [1., 1.]])
    >>> problem = prepare(emb, jnp.array([0, 0, 1]), distance="dot")
    >>> problem.matrix.shape, problem.is_similarity, problem.masks.pos.sum().item()
    ((3, 3), True, 2)
  """
  check_inputs(embeddings, labels, ref_embeddings, ref_labels, where,
               ref_where, pair_mask)
  is_sim = distances_lib.is_similarity(distance)
  x = zero_invalid_rows(embeddings, where)
  if ref_embeddings is None:
    one_product = (symmetric and ref_where is None and pair_mask is None
                   and isinstance(distance, str))
    matrix = (distances_lib.self_pairwise_for_symmetric_loss(x, distance) if one_product
              else distances_lib.pairwise(x, None, distance))
    symmetric = one_product
  else:
    y = zero_invalid_rows(ref_embeddings, ref_where)
    matrix = distances_lib.pairwise(x, y, distance)
    symmetric = False
  masks = label_masks(labels, ref_labels, where=where, ref_where=ref_where,
                      exclude_self=exclude_self, pair_mask=pair_mask)
  return PairwiseProblem(matrix, is_sim, masks, symmetric)
