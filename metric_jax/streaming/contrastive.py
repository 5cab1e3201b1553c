"""Streaming contrastive loss."""

from __future__ import annotations

__all__ = ["streaming_contrastive_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import reductions
from metric_jax.streaming import _engine as eng


def streaming_contrastive_loss(embeddings: jax.Array, labels: jax.Array,
                               ref_embeddings: jax.Array | None = None,
                               ref_labels: jax.Array | None = None, *,
                               pos_margin: float = 0.0, neg_margin: float = 1.0,
                               squared: bool = False,
                               distance="euclidean", reduction: str = "mean_nonzero",
                               where: jax.Array | None = None,
                               ref_where: jax.Array | None = None,
                               pair_mask: jax.Array | None = None,
                               ids: jax.Array | None = None,
                               ref_ids: jax.Array | None = None,
                               tile_size: int | None = None,
                               axis_name: str | None = None) -> jax.Array:
  r"""Contrastive loss in O(B T) memory: :func:`metric_jax.losses.contrastive_loss`
  computed over tiles of T reference columns.

  Same value and gradient as the dense loss::

    l_pos(i, j) = [d_ij - pos_margin]_+     l_neg(i, j) = [neg_margin - d_ij]_+

  (signs flipped for similarities, squared-and-halved with ``squared``),
  each sub-loss reduced separately and the two added. Every reduction
  decomposes over tiles: per anchor the engine accumulates the sum of the
  terms, the number of valid terms and the number of non-zero terms.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    pos_margin, neg_margin, squared, distance: as the dense loss.
    reduction: ``"mean_nonzero"`` (default), ``"mean"`` or ``"sum"``
      (``"none"`` would be a [B, M] matrix: use the dense loss).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: optional [B, M] bool restriction (read one tile at a time,
      but it is itself a [B, M] input).
    ids, ref_ids: optional [B] / [M] integer sample identities (with a
      reference set): a pair with ``ids[i] == ref_ids[j]`` is the same sample
      and never a positive pair.
    tile_size: reference columns per tile (static; default about 16M
      elements per [B, T] block).
    axis_name: inside ``jax.shard_map``: ``embeddings`` is this device's
      shard of the global batch, the references are its all-gather and the
      reduction is global (see :mod:`metric_jax.streaming`).

  Returns:
    Scalar float32 loss.

  References:
    Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an
    Invariant Mapping", CVPR 2006.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_contrastive_loss
    >>> emb = jnp.array([[0., 0.], [0., 0.5], [3., 0.]])
    >>> round(float(streaming_contrastive_loss(emb, jnp.array([0, 0, 1]), tile_size=2)), 4)
    0.5
  """
  reductions.check(reduction)
  eng.no_none(reduction, "streaming_contrastive_loss")
  _checks.scalar(pos_margin, "pos_margin")
  _checks.scalar(neg_margin, "neg_margin")
  eng.check_tile(tile_size)
  inp = eng.prepare(embeddings, labels, ref_embeddings, ref_labels, distance=distance,
                    where=where, ref_where=ref_where, pair_mask=pair_mask, ids=ids,
                    ref_ids=ref_ids, axis_name=axis_name)
  b, m = inp.rows["x"].shape[0], inp.cols["y"].shape[0]
  tile = tile_size or eng.default_tile(b, m)
  sim = inp.is_similarity

  def fn(rows, cols):
    mat = eng.tile_matrix(rows, cols, distance)
    masks = eng.tile_masks(rows, cols)
    if sim:
      pos_terms, neg_terms = jax.nn.relu(pos_margin - mat), jax.nn.relu(mat - neg_margin)
    else:
      pos_terms, neg_terms = jax.nn.relu(mat - pos_margin), jax.nn.relu(neg_margin - mat)
    if squared:
      pos_terms, neg_terms = 0.5 * jnp.square(pos_terms), 0.5 * jnp.square(neg_terms)
    out = {}
    for key, terms, mask in (("pos", pos_terms, masks.pos), ("neg", neg_terms, masks.neg)):
      out[key] = (jnp.sum(jnp.where(mask, terms, 0.0), axis=-1),
                  eng.count(mask), eng.count(mask & (terms > 0)))
    return out, ()

  # The sums reach the loss only through their totals (eng.finish): a batch
  # against itself can take the symmetric backward pass.
  sums, _ = eng.stream(fn, inp.rows, inp.cols, tile, symmetric=eng.symmetric_ok(inp, distance))
  return sum(eng.finish(*sums[k], reduction, inp.ctx) for k in ("pos", "neg"))
