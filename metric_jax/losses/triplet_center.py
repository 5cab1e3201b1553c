"""Triplet-center loss (He, Zhou, Zhou, Bai, Bai, CVPR 2018)."""

from __future__ import annotations

__all__ = ["triplet_center_loss", "init_triplet_center"]

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions


def init_triplet_center(key: jax.Array, num_classes: int, embedding_dim: int,
                        dtype=jnp.float32) -> dict:
  """Initial centres, drawn from a standard normal as in the official code.

  Args:
    key: a JAX PRNG key.
    num_classes: C, the number of classes (one centre each).
    embedding_dim: D, the embedding size.
    dtype: dtype of the centres.

  Returns:
    ``{"centers": [C, D] array}``, the keyword arguments of
    :func:`triplet_center_loss`.

  Example:
    >>> import jax, metric_jax as mj
    >>> mj.losses.init_triplet_center(jax.random.key(0), 10, 4)["centers"].shape
    (10, 4)
  """
  _checks.positive_int(num_classes, "num_classes")
  _checks.positive_int(embedding_dim, "embedding_dim")
  return {"centers": jax.random.normal(key, (num_classes, embedding_dim), dtype)}


def _check_label_range(labels, where, num_classes):
  """Raises on labels outside [0, C) of valid rows when they are concrete."""
  try:
    lab = np.asarray(labels)
    valid = np.ones(lab.shape, bool) if where is None else np.asarray(where)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  bad = valid & ((lab < 0) | (lab >= num_classes))
  if bad.any():
    raise ValueError(
        f"`labels` must lie in [0, {num_classes}) (one centre per class, "
        f"`centers` has {num_classes} rows), got {lab[bad][:5].tolist()}.")


def triplet_center_loss(embeddings: jax.Array, labels: jax.Array,
                        ref_embeddings: jax.Array | None = None,
                        ref_labels: jax.Array | None = None, *,
                        centers: jax.Array, margin: float = 5.0,
                        squared: bool = False, distance="euclidean",
                        reduction: str = "mean",
                        where: jax.Array | None = None,
                        ref_where: jax.Array | None = None,
                        pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Triplet-center loss: the own centre closer than every other centre.

  With learned centres ``c_1..c_C`` (one per class)::

    l_i = [ D(f_i, c_{y_i}) + margin - min_{j != y_i} D(f_i, c_j) ]_+

  where the minimum runs over **all** other centres (official code,
  ``TripletCenter40LossAllClass``), not only the classes in the batch. ``D``
  is the non-squared Euclidean distance (official code); ``squared=True``
  uses the paper's ``D = 1/2 ||f - c||^2`` instead. For a similarity ``s``
  the hinge is ``[max_{j != y} s_ij - s_{i,y} + margin]_+``.

  Training (He et al.): jointly with softmax cross-entropy,
  ``L = L_softmax + lambda * L_tc``; e.g. with logits ``z`` of a classifier
  head::

    loss = optax.softmax_cross_entropy_with_integer_labels(z, y).mean() \
           + lam * triplet_center_loss(emb, y, **params)

  with ``params = init_triplet_center(key, C, D)`` optimised with the
  network (the centres are explicit parameters, not optimiser state; add
  weight decay or they may drift to large norms). The paper's ``lambda``
  and ``margin``: unknown; the official code defaults to margin 0, one
  PyTorch port to 5 (used here, not confirmed against the paper).

  Args:
    embeddings: [B, D] float embeddings.
    labels: [B] integer labels in [0, C) (checked when concrete; under
      ``jit`` an out-of-range label of a valid row makes the loss NaN).
    ref_embeddings: must be None (the centres are the references).
    ref_labels: must be None.
    centers: [C, D] float class centres (see :func:`init_triplet_center`).
    margin: the margin m.
    squared: use ``1/2 ||f - c||^2`` (only with ``distance="euclidean"``).
    distance: metric name or callable between embeddings and centres.
    reduction: ``"mean"`` (default, over valid samples, as
      ``MarginRankingLoss``), ``"mean_nonzero"``, ``"sum"``, ``"none"`` ([B]).
    where: [B] bool validity of the samples.
    ref_where: must be None.
    pair_mask: optional [B, C] bool over (sample, centre) pairs: centres
      where it is False are not candidates for the nearest other centre;
      a sample whose own centre is masked is dropped.

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    He, Zhou, Zhou, Bai, Bai, "Triplet-Center Loss for Multi-View 3D Object
    Retrieval", CVPR 2018, arXiv 1803.06189.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> centers = jnp.array([[0., 0.], [3., 0.], [0., 4.]])
    >>> emb = jnp.array([[1., 0.], [2., 0.]])
    >>> round(float(mj.losses.triplet_center_loss(emb, jnp.array([0, 1]), centers=centers, margin=1.5)), 4)
    0.5
  """
  reductions.check(reduction)
  _checks.scalar(margin, "margin")
  for value, name in ((ref_embeddings, "ref_embeddings"), (ref_labels, "ref_labels"),
                      (ref_where, "ref_where")):
    if value is not None:
      raise ValueError(
          f"`{name}` is not supported by triplet_center_loss (the centres are "
          f"the references), got an array; pass None.")
  _checks.embeddings(embeddings, "embeddings")
  b, d = embeddings.shape
  _checks.labels(labels, b, "labels")
  _checks.mask(where, (b,), "where")
  if centers is None:
    raise ValueError("`centers` must be a [C, D] float array, got None.")
  _checks.embeddings(centers, "centers")
  if centers.shape[1] != d:
    raise ValueError(
        f"`centers` must have the embedding size of `embeddings` ({d}), got "
        f"centers of shape {tuple(centers.shape)} (embedding size {centers.shape[1]}).")
  num_classes = centers.shape[0]
  if num_classes < 2:
    raise ValueError(
        f"`centers` needs at least 2 classes (a nearest other centre), got {num_classes}.")
  _checks.mask(pair_mask, (b, num_classes), "pair_mask")
  if squared and distance != "euclidean":
    raise ValueError(
        f"`squared=True` means 1/2 squared Euclidean; it needs "
        f"`distance`='euclidean', got {distance!r}.")
  _check_label_range(labels, where, num_classes)

  x = pairs.zero_invalid_rows(embeddings, where)
  if squared:
    mat = 0.5 * distances_lib.pairwise(x, centers, "squared_euclidean")
  else:
    mat = distances_lib.pairwise(x, centers, distance)
  dist = -mat if distances_lib.is_similarity(distance) else mat

  row_valid = jnp.ones((b,), bool) if where is None else where
  own = labels[:, None] == jnp.arange(num_classes)[None, :]       # [B, C]
  allowed = jnp.ones((b, num_classes), bool) if pair_mask is None else pair_mask
  in_range = (labels >= 0) & (labels < num_classes)
  d_own = jnp.sum(jnp.where(own, dist, 0.0), axis=1)
  # Out-of-range labels of valid rows: NaN, loudly.
  d_own = jnp.where(in_range | ~row_valid, d_own, jnp.nan)
  d_other, has_other = reductions.masked_min(dist, ~own & allowed)
  own_kept = jnp.any(own & allowed, axis=1) | ~in_range
  terms = jax.nn.relu(d_own + margin - d_other)
  valid = row_valid & has_other & own_kept
  return reductions.reduce(terms, valid, reduction)
