"""Magnet loss (Rippel, Paluri, Dollar, Bourdev, ICLR 2016).

The cluster index (per-class k-means, running cluster losses, eq. 6
prediction) lives in :mod:`metric_jax.magnet_index`, the neighbourhood
sampler in :mod:`metric_jax.data.magnet_sampler`; this module is the jitted
mini-batch objective (eq. 5) only.
"""

from __future__ import annotations

__all__ = ["magnet_loss"]

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions

# Floor of the batch variance: a batch whose examples all sit on their own
# cluster means (every cluster a singleton, or collapsed) has sigma^2 = 0.
_MIN_VARIANCE = 1e-12


def _check_cluster_ids(cluster_ids, b: int) -> None:
  if cluster_ids is None:
    raise ValueError(f"`cluster_ids` must be a [{b}] integer array, got None.")
  shape = tuple(np.shape(cluster_ids))
  if shape != (b,):
    raise ValueError(
        f"`cluster_ids` must have shape ({b},) to match the embeddings, got {shape}.")
  dtype = jnp.result_type(cluster_ids)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"`cluster_ids` must be an integer array, got dtype {dtype}.")


def _check_cluster_range(cluster_ids, where, num_clusters: int) -> None:
  """Raises on ids outside [0, num_clusters) of valid rows when concrete."""
  try:
    ids = np.asarray(cluster_ids)
    valid = np.ones(ids.shape, bool) if where is None else np.asarray(where)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  bad = valid & ((ids < 0) | (ids >= num_clusters))
  if bad.any():
    raise ValueError(
        f"`cluster_ids` must lie in [0, {num_clusters}) (`num_clusters`="
        f"{num_clusters}), got {ids[bad][:5].tolist()}.")


def magnet_loss(embeddings: jax.Array, labels: jax.Array, cluster_ids: jax.Array, *,
                num_clusters: int, alpha: float = 1.0,
                stop_gradient_variance: bool = False, reduction: str = "mean",
                where: jax.Array | None = None, return_variance: bool = False):
  r"""Magnet loss: each example near its own cluster mean, far from the
  cluster means of the other classes (mini-batch objective, eq. 5).

  The batch holds M clusters x D examples. With ``mu_m`` the mean of the
  batch examples of cluster m (not the k-means centre), ``d_k(r) =
  ||r - mu_k||^2`` and one variance for the whole batch::

    sigma^2 = 1 / (N - 1) * sum_n d_{c(n)}(r_n)                (N valid examples)
    l_n     = [ d_{c(n)}(r_n) / (2 sigma^2) + alpha
                + log sum_{k: C(mu_k) != y_n} exp(-d_k(r_n) / (2 sigma^2)) ]_+
    L       = mean_n l_n

  i.e. ``[-log(exp(-d_own/(2 sigma^2) - alpha) / sum_other exp(-d_k/(2
  sigma^2)))]_+`` in a stable log-sum-exp form. The sum runs over the
  clusters present in the batch whose examples are of another class than
  ``y_n``. The variance is ``1 / (2 sigma^2)`` (not the
  ``1 / (2 sigma^4)`` of the public TensorFlow port).

  Degenerate batches: an example with no cluster of another class in the
  batch has no term (dropped from the mean); fewer than 2 valid examples
  give 0 with a zero gradient. ``sigma^2`` is floored at 1e-12 (all
  examples on their own means), so no NaN or inf arises. Gradients flow
  through the means and, unless ``stop_gradient_variance``, the variance
  (as in the public TensorFlow port; the paper does not say).

  Cost: O(B^2 K + B K E) time, O(B^2 + B K) memory (K = ``num_clusters``).

  Args:
    embeddings: [B, E] float embeddings (computed in float32).
    labels: [B] integer class labels.
    cluster_ids: [B] integer cluster ids in ``[0, num_clusters)`` (global
      ids from :func:`metric_jax.magnet_index.build_index`; checked when
      concrete; under ``jit`` a valid row with an id out of range is
      treated as masked). A cluster is assumed to hold one class; the
      "other class" test is per cluster: no member has the label ``y_n``.
    num_clusters: static number of possible cluster ids (one-hot width).
    alpha: the margin alpha.
    stop_gradient_variance: treat ``sigma^2`` as a constant in the gradient.
    reduction: ``"mean"`` (paper), ``"mean_nonzero"``, ``"sum"`` or
      ``"none"`` ([B] terms, 0 for dropped rows).
    where: [B] bool validity of the rows (padding; may hold NaN).
    return_variance: also return the batch ``sigma^2`` (float32 scalar,
      for :func:`metric_jax.magnet_index.update_variance`).

  Returns:
    Scalar float32 loss ([B] for ``"none"``), or ``(loss, sigma^2)`` with
    ``return_variance=True``.

  References:
    Rippel, Paluri, Dollar, Bourdev, "Metric Learning with Adaptive Density
    Discrimination", ICLR 2016, arXiv 1511.05939.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[0., 0.], [0., 1.], [3., 0.], [3., 1.]])
    >>> y = jnp.array([0, 0, 1, 1])
    >>> round(float(mj.losses.magnet_loss(emb, y, y, num_clusters=2)), 4)
    0.0
    >>> near = jnp.array([[0., 0.], [0., 2.], [1., 0.], [1., 2.]])
    >>> round(float(mj.losses.magnet_loss(near, y, y, num_clusters=2)), 4)
    0.625
  """
  reductions.check(reduction)
  _checks.scalar(alpha, "alpha")
  _checks.positive_int(num_clusters, "num_clusters")
  _checks.embeddings(embeddings, "embeddings")
  b = embeddings.shape[0]
  _checks.labels(labels, b, "labels")
  _check_cluster_ids(cluster_ids, b)
  _checks.mask(where, (b,), "where")
  _check_cluster_range(cluster_ids, where, num_clusters)

  labels = jnp.asarray(labels)
  cluster_ids = jnp.asarray(cluster_ids)
  row_valid = jnp.ones((b,), bool) if where is None else jnp.asarray(where)
  row_valid = row_valid & (cluster_ids >= 0) & (cluster_ids < num_clusters)
  x = pairs.zero_invalid_rows(jnp.asarray(embeddings).astype(jnp.float32), row_valid)

  onehot = (cluster_ids[:, None] == jnp.arange(num_clusters)[None, :]) & row_valid[:, None]
  onehot_f = onehot.astype(jnp.float32)                               # [B, K]
  counts = jnp.sum(onehot_f, axis=0)                                  # [K]
  present = counts > 0
  means = (onehot_f.T @ x) / jnp.maximum(counts, 1.0)[:, None]        # [K, E]
  # [B, K] via the Gram expansion (memory O(B K), clamped at 0); the own
  # distance, which sets the variance, is computed exactly from differences.
  dist = distances_lib.pairwise(x, means, "squared_euclidean")
  own_mean = onehot_f @ means                                         # [B, E]
  d_own = jnp.sum((x - own_mean) ** 2, axis=-1)                       # [B]

  n_valid = jnp.sum(row_valid.astype(jnp.float32))
  enough = n_valid >= 2
  variance = jnp.sum(jnp.where(row_valid, d_own, 0.0)) / jnp.maximum(n_valid - 1.0, 1.0)
  # Every cluster a singleton: the batch says nothing about the spread
  # (sigma^2 = 0 by construction), so it contributes 0; a unit stand-in
  # keeps the masked terms and their gradients finite. (Collapsed members
  # of a larger cluster keep the floor below: the loss is then alpha.)
  singletons = ~jnp.any(counts >= 2) & jnp.isfinite(variance)  # NaN input stays NaN
  enough = enough & ~singletons
  variance = jnp.where(singletons, 1.0, jnp.maximum(variance, _MIN_VARIANCE))
  if stop_gradient_variance:
    variance = jax.lax.stop_gradient(variance)
  scale = 1.0 / (2.0 * variance)

  # Cluster k is of another class than row n when none of its members has y_n.
  same = (labels[:, None] == labels[None, :]).astype(jnp.float32)    # [B, B]
  same_members = same @ onehot_f                                      # [B, K]
  other = present[None, :] & (same_members == 0)
  lse, has_other = reductions.masked_logsumexp(-dist * scale, other)
  terms = jax.nn.relu(d_own * scale + alpha + lse)
  valid = row_valid & has_other & enough
  loss = reductions.reduce(terms, valid, reduction)
  if return_variance:
    return loss, jnp.where(enough, variance, 0.0)
  return loss
