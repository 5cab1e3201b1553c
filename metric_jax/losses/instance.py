"""Instance loss (Zheng et al., ACM TOMM 2020), PML's batch form."""

from __future__ import annotations

__all__ = ["instance_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.streaming import _engine as streaming_engine


def _dense_rank(labels: jax.Array, valid: jax.Array) -> jax.Array:
  """Rank of each valid label among the distinct valid labels (``torch.unique``'s
  ``return_inverse``), with static shapes and one 1-D sort: [B] -> [B] int32
  (arbitrary for invalid entries)."""
  order = jnp.lexsort((labels, ~valid))          # valid first, then by label
  srt, vs = labels[order], valid[order]
  first = vs & jnp.concatenate([jnp.ones((1,), bool), srt[1:] != srt[:-1]])
  dense = jnp.cumsum(first.astype(jnp.int32)) - 1
  return jnp.zeros_like(dense).at[order].set(dense)


def instance_loss(embeddings: jax.Array, labels: jax.Array,
                  ref_embeddings: jax.Array | None = None,
                  ref_labels: jax.Array | None = None, *,
                  gamma: float = 64.0,
                  distance="cosine", reduction: str = "mean",
                  where: jax.Array | None = None,
                  ref_where: jax.Array | None = None,
                  pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Instance loss as in PML: the batch itself is the instance classifier.

  Zheng et al. train a classifier with one class per training *instance*
  (image and text of an instance share the class). PML's ``InstanceLoss``
  (adapted from ``layumi/Person_reID_baseline_pytorch``) replaces the
  classifier weights by the batch's own normalised embeddings: logits
  ``gamma * cos(x_i, x_j)`` over **every** sample ``j`` of the batch,
  itself included, and the cross-entropy target of sample ``i`` is column
  ``t_i`` = the rank of ``y_i`` among the batch's distinct labels::

    l_i = LSE_j(gamma s_ij) - gamma s_{i, t_i}

  averaged over the samples. With instance labels ``arange(B)`` (or any
  increasing distinct labels) ``t_i = i``: each sample must be closer to
  itself than to every other sample, an instance-discrimination softmax.
  With repeated labels this follows PML literally (the target column is a
  sample index chosen by label rank), which is rarely what is wanted; use
  :func:`metric_jax.losses.nca_loss` or ``supcon_loss`` for label-aware
  batch softmaxes.

  Padding (``where``) is removed first, then ranks and columns are those
  of the remaining samples, so a padded batch gives the loss of its valid
  part. ``ref_embeddings`` and ``pair_mask`` are not supported (as in PML).

  Derivatives: reverse mode, gradients of gradients included. A batch
  compared with itself under a built-in metric takes a custom VJP (one
  [B, B] x [B, D] product in the backward pass), so forward mode
  (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is not available there.

  Args:
    embeddings: [B, D] float embeddings.
    labels: [B] integer labels (instance ids).
    ref_embeddings: must be None.
    ref_labels: must be None.
    gamma: logit scale (> 0).
    distance: a similarity (default cosine, PML's only compatible one).
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or
      ``"none"`` ([B] terms).
    where: [B] bool validity of the samples.
    ref_where: must be None.
    pair_mask: must be None.

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Zheng, Zheng, Garrett, Yang, Xu, Shen, "Dual-Path Convolutional
    Image-Text Embeddings with Instance Loss", ACM TOMM 2020, arXiv 1711.05535.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(mj.losses.instance_loss(emb, jnp.arange(3), gamma=4.0)), 4)
    0.3614
  """
  for value, name in ((ref_embeddings, "ref_embeddings"), (ref_labels, "ref_labels"),
                      (ref_where, "ref_where"), (pair_mask, "pair_mask")):
    if value is not None:
      raise ValueError(f"instance_loss does not support `{name}` (the batch is its own "
                       f"classifier, as in PML); got an array.")
  reductions.check(reduction)
  _checks.scalar(gamma, "gamma", positive=True)
  pairs.check_inputs(embeddings, labels, where=where)
  if not distances_lib.is_similarity(distance):
    raise ValueError(
        "instance_loss needs a similarity `distance` (\"cosine\"), got the distance "
        f"{distance!r}.")
  valid = jnp.ones(embeddings.shape[0], bool) if where is None else jnp.asarray(where)
  rank = _dense_rank(jnp.asarray(labels), valid)
  # Original index of the k-th valid column (ranks never exceed #valid - 1).
  valid_cols = jnp.nonzero(valid, size=valid.shape[0], fill_value=0)[0]
  target = valid_cols[jnp.clip(rank, 0, valid.shape[0] - 1)]
  x = pairs.zero_invalid_rows(embeddings, valid).astype(jnp.float32)
  tile = streaming_engine.routed_tile(embeddings)
  if tile is None:
    # The logits are symmetric and only their row log-sum-exps read them:
    # the gradient takes one [B, B] x [B, D] product.
    problem = pairs.prepare(embeddings, labels, distance=distance, where=where,
                            symmetric=True)
    logits = gamma * problem.matrix
    logsumexps = (reductions.symmetric_masked_logsumexps if problem.symmetric
                  else reductions.masked_logsumexps)
    (lse,), _ = logsumexps(logits, [valid[:, None] & valid[None, :]])
  else:
    # Large batches: the log-sum-exps over column tiles (small buffers).
    lse = _streamed_lse(x, valid, gamma, distance, tile)
  picked = gamma * distances_lib.paired(x, x[target], distance)
  terms = jnp.where(valid, lse - picked, 0.0)
  # A NaN logit makes its row's lse NaN: keep it visible in every reduction.
  return reductions.keep_nan(reductions.reduce(terms, valid, reduction), lse, valid)


def _streamed_lse(x, valid, gamma, distance, tile):
  """[B] ``LSE_j gamma s_ij`` over the valid columns of ``x`` [B, D]
  (invalid rows zeroed), streamed over tiles of ``tile`` columns, each pair
  evaluated by the dense loss's metric."""

  def fn(rows, cols):
    logits = gamma * streaming_engine.tile_matrix(rows, cols, distance)
    members = rows["valid"][:, None] & cols["valid"][None, :]
    return {}, (streaming_engine.Lse(logits, members),)

  # The batch against itself: symmetric logits (one product per tile in
  # the backward pass) unless the metric is a user's callable.
  _, (lse,) = streaming_engine.stream(fn, {"x": x, "valid": valid}, {"y": x, "valid": valid},
                                      tile, symmetric=isinstance(distance, str))
  return lse
