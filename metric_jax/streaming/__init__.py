"""Streaming losses: huge batches in bounded memory, and sharded batches.

Every dense pair loss of :mod:`metric_jax.losses` builds the [B, M] matrix
of distances and several [B, M] masks and intermediates, and its backward
pass stores them: at B = 32,768 one such matrix is 4 GiB. The losses here
compute the **same values and gradients** in O(B T + (B + M) D) memory by
walking over tiles of T reference columns:

* per-anchor statistics that decompose over tiles are accumulated as the
  tiles go by: sums, counts of valid and of non-zero terms (``mean``,
  ``mean_nonzero``), running max/min with the arg index (batch-hard),
  and log-sum-exps with an online running max and rescaled sum;
* a ``jax.custom_vjp`` keeps only the inputs and the final per-anchor
  statistics, and the backward pass recomputes each tile and pulls the
  cotangents through it (``d LSE / d z = exp(z - LSE)`` needs only the
  final log-sum-exp);
* selections (hardest positive / negative, first positives) are found by
  a non-differentiated pass, then the chosen pairs' distances are
  recomputed directly from the gathered rows, which gives exact gradients
  in O(B D).

Names are the dense names with a ``streaming_`` prefix, with the DESIGN.md
signature, the dense defaults, and these extra keyword arguments:

* ``tile_size``: reference columns per tile (static; default: about 16M
  float32 elements per [B, T] block, i.e. the whole matrix for B <= 4096);
* ``ids`` / ``ref_ids``: sample identities for a reference set (a pair with
  equal ids is the same sample and never a positive);
* ``axis_name``: see below;
* ``max_positives`` (triplet ``"all"`` / ``"semihard"``): static bound on the
  positives of any anchor (K - 1 for PK batches); NaN if exceeded.

``reduction="none"`` is available where it is a [B] vector (per-anchor
losses); per-pair or per-triplet terms would be the matrix these losses
avoid.

Losses: :func:`streaming_contrastive_loss`,
:func:`streaming_triplet_margin_loss` (hard, easy, all, semi-hard),
:func:`streaming_lifted_structure_loss`,
:func:`streaming_generalized_lifted_structure_loss`,
:func:`streaming_multi_similarity_loss`, :func:`streaming_circle_loss`,
:func:`streaming_ntxent_loss`, :func:`streaming_supcon_loss`,
:func:`streaming_nca_loss`, :func:`streaming_npair_loss`,
:func:`streaming_ranked_list_loss`.

Several devices: which to use when
----------------------------------

1. **jit on the global batch** (simplest; what
   :mod:`metric_jax.training` does): put the [B, D] embeddings on a mesh
   with ``NamedSharding(mesh, P("data"))`` and call any loss, dense or
   streaming, inside ``jax.jit``. The loss sees one logical array, negatives
   come from every device, and the value and gradient are those of the
   single-device computation; XLA decides the collectives (typically an
   all-gather of the embeddings) and may place the [B, B] intermediates of
   a dense loss on one device or partition them.
2. **shard_map** (:func:`sharded_loss`, or ``axis_name=`` inside your own
   ``jax.shard_map``): each device streams its B/n local anchors against the
   all-gathered [B, D] references, excluding self-pairs by global index;
   sums and counts are ``psum``-ed, so means are global means, and the
   reference gradients come back through the transpose of ``all_gather``
   (``psum_scatter``). The global B x B matrix never exists on any device:
   each holds at most a [B/n, T] tile. Use it when B is large enough that
   even a partitioned [B, B] matrix, or XLA's choice of where to put it, is
   a problem, or to control the communication (one all-gather of B x D).

Example:
  >>> import jax.numpy as jnp
  >>> import metric_jax as mj
  >>> from metric_jax import streaming
  >>> emb = jnp.array([[0., 0.], [0., 0.5], [3., 0.], [3., 0.5]])
  >>> labels = jnp.array([0, 0, 1, 1])
  >>> s = streaming.streaming_contrastive_loss(emb, labels, tile_size=3)
  >>> d = mj.losses.contrastive_loss(emb, labels)
  >>> round(float(s), 4), round(float(d), 4)
  (0.5, 0.5)
"""

from metric_jax.streaming.contrastive import streaming_contrastive_loss
from metric_jax.streaming.ranked_list import streaming_ranked_list_loss
from metric_jax.streaming.sharded import sharded_loss
from metric_jax.streaming.softmax import (streaming_circle_loss,
                                          streaming_generalized_lifted_structure_loss,
                                          streaming_lifted_structure_loss,
                                          streaming_multi_similarity_loss,
                                          streaming_nca_loss, streaming_npair_loss,
                                          streaming_ntxent_loss,
                                          streaming_supcon_loss)
from metric_jax.streaming.triplet import streaming_triplet_margin_loss

__all__ = [
    "sharded_loss",
    "streaming_circle_loss",
    "streaming_contrastive_loss",
    "streaming_generalized_lifted_structure_loss",
    "streaming_lifted_structure_loss",
    "streaming_multi_similarity_loss",
    "streaming_nca_loss",
    "streaming_npair_loss",
    "streaming_ntxent_loss",
    "streaming_ranked_list_loss",
    "streaming_supcon_loss",
    "streaming_triplet_margin_loss",
]
