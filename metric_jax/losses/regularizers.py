"""Regularisers of embeddings and of class weights.

Embedding regularisers (:func:`lp_regularizer`, :func:`zero_mean_regularizer`)
have the loss signature ``(embeddings, labels=None, ref_embeddings=None,
ref_labels=None, *, ..., reduction="mean", where=None, ref_where=None)`` so
they compose with any loss (``loss(...) + w * reg(...)`` with the same
arguments); they act on ``embeddings`` only: labels and the reference set are
accepted and validated but unused (as PML's ``embedding_regularizer``, which
sees the raw, unnormalised embeddings).

Weight regularisers (:func:`center_invariant_regularizer`,
:func:`regular_face_regularizer`) take the class weights ``[C, D]`` (e.g.
``weights`` of :func:`metric_jax.losses.arcface_loss`, ``proxies``) as their
first argument. Everything is computed in float32.
"""

from __future__ import annotations

__all__ = ["lp_regularizer", "zero_mean_regularizer", "center_invariant_regularizer",
           "regular_face_regularizer"]

import math

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions

_REDUCTIONS = ("mean", "sum", "none")


def _embedding_inputs(embeddings, labels, ref_embeddings, ref_labels, where, ref_where,
                      reduction):
  _checks.embeddings(embeddings, "embeddings")
  if labels is not None or ref_embeddings is not None:
    lab = labels if labels is not None else jnp.zeros(embeddings.shape[0], jnp.int32)
    pairs.check_inputs(embeddings, lab, ref_embeddings, ref_labels, where, ref_where)
  else:
    _checks.mask(where, (embeddings.shape[0],), "where")
  reductions.check(reduction, _REDUCTIONS)
  return pairs.zero_invalid_rows(embeddings, where).astype(jnp.float32)


def _lp_norm(x: jax.Array, p: float) -> jax.Array:
  """Row Lp norms with finite gradients at 0 (zero there)."""
  ax = jnp.abs(x)
  if p == math.inf:
    return jnp.max(ax, axis=-1)
  if p == 2:
    return distances_lib.safe_sqrt(jnp.sum(x * x, axis=-1))
  if p == 1:
    return jnp.sum(ax, axis=-1)
  # (sum |x|^p)^(1/p) with both powers guarded at 0.
  nz = ax > 0
  powered = jnp.where(nz, jnp.where(nz, ax, 1.0) ** p, 0.0)
  total = jnp.sum(powered, axis=-1)
  pos = total > 0
  return jnp.where(pos, jnp.where(pos, total, 1.0) ** (1.0 / p), total * 0.0)


def lp_regularizer(embeddings: jax.Array, labels: jax.Array | None = None,
                   ref_embeddings: jax.Array | None = None,
                   ref_labels: jax.Array | None = None, *,
                   p: float = 2.0, power: float = 1.0, reduction: str = "mean",
                   where: jax.Array | None = None,
                   ref_where: jax.Array | None = None) -> jax.Array:
  r"""Lp norm of each embedding raised to ``power``: ``r_i = ||x_i||_p^power``.

  PML's ``LpRegularizer(p=2, power=1)`` (mean over the batch). The N-pair
  L2 penalty of tf.contrib (``0.25 lambda (mean ||f||^2 + mean ||f+||^2)``)
  is ``0.5 * lambda * lp_regularizer(emb, power=2)`` over both halves.

  Args:
    embeddings: [B, D] float (raw, unnormalised).
    labels: optional [B] labels; unused.
    ref_embeddings: optional [M, D]; unused (signature compatibility).
    ref_labels: optional [M]; unused.
    p: the norm, > 0 (``math.inf`` for the max norm).
    power: exponent applied to the norm.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: unused.

  Returns:
    Scalar float32, or [B] terms for ``reduction="none"``.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> round(float(mj.losses.lp_regularizer(jnp.array([[3., 4.], [0., 1.]]))), 4)
    3.0
  """
  x = _embedding_inputs(embeddings, labels, ref_embeddings, ref_labels, where, ref_where,
                        reduction)
  _checks.scalar(p, "p", positive=True)
  _checks.scalar(power, "power")
  norms = _lp_norm(x, p)
  if not (isinstance(power, (int, float)) and power == 1):
    pos = norms > 0
    norms = jnp.where(pos, jnp.where(pos, norms, 1.0) ** power, norms * 0.0)
  return reductions.reduce(norms, where, reduction)


def zero_mean_regularizer(embeddings: jax.Array, labels: jax.Array | None = None,
                          ref_embeddings: jax.Array | None = None,
                          ref_labels: jax.Array | None = None, *,
                          reduction: str = "mean", where: jax.Array | None = None,
                          ref_where: jax.Array | None = None) -> jax.Array:
  r"""Absolute sum of each embedding's components: ``r_i = |sum_d x_id|``.

  PML's ``ZeroMeanRegularizer`` (mean over the batch), which keeps the
  embeddings' components centred as the SNR paper's zero-mean constraint.

  Args:
    embeddings: [B, D] float.
    labels: optional [B] labels; unused.
    ref_embeddings: optional [M, D]; unused.
    ref_labels: optional [M]; unused.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: unused.

  Returns:
    Scalar float32, or [B] terms for ``reduction="none"``.

  References:
    Yuan, Chen, Wang, Yu, Shi, Jiang, "Signal-To-Noise Ratio: A Robust
    Distance Metric for Deep Metric Learning", CVPR 2019, arXiv 1904.02616.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> round(float(mj.losses.zero_mean_regularizer(jnp.array([[3., -4.], [1., 1.]]))), 4)
    1.5
  """
  x = _embedding_inputs(embeddings, labels, ref_embeddings, ref_labels, where, ref_where,
                        reduction)
  return reductions.reduce(jnp.abs(jnp.sum(x, axis=-1)), where, reduction)


def _check_weights(weights, reduction) -> jax.Array:
  if weights is None:
    raise ValueError("`weights` must be a [C, D] float array, got None.")
  shape = tuple(np.shape(weights))
  if len(shape) != 2:
    raise ValueError(f"`weights` must have rank 2 [C, D], got shape {shape}.")
  dtype = jnp.result_type(weights)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`weights` must be a floating-point array, got dtype {dtype}.")
  reductions.check(reduction, _REDUCTIONS)
  return weights.astype(jnp.float32)


def center_invariant_regularizer(weights: jax.Array, *,
                                 reduction: str = "mean") -> jax.Array:
  r"""Center-invariant loss on class weights: equal squared norms.

  With ``r_c = ||w_c||^2`` and ``rbar`` their mean over the C classes::

    l_c = (r_c - rbar)^2 / 4

  PML's ``CenterInvariantRegularizer`` (mean over classes); pass it the
  class weights ``[C, D]`` (PML's ``W.T``).

  Args:
    weights: [C, D] float class weights or centres.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([C] terms).

  Returns:
    Scalar float32, or [C] terms for ``reduction="none"``.

  References:
    Wu, Liu, Li, Fu, "Deep Face Recognition with Center Invariant Loss",
    ACM MM Thematic Workshops 2017.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> w = jnp.array([[1., 0.], [0., 3.]])
    >>> round(float(mj.losses.center_invariant_regularizer(w)), 4)
    4.0
  """
  w = _check_weights(weights, reduction)
  sq = jnp.sum(w * w, axis=-1)
  dev = sq - jnp.mean(sq)
  return reductions.reduce(dev * dev / 4.0, None, reduction)


def regular_face_regularizer(weights: jax.Array, *,
                             reduction: str = "mean") -> jax.Array:
  r"""RegularFace: penalises each class's most similar other class.

  ::

    l_c = max_{j != c} cos(w_c, w_j)

  The gradient flows through the selected (most similar) pair, as in the
  paper's exclusive regularisation. A single class gives 0. PML's
  ``RegularFaceRegularizer`` (mean over classes); pass the class weights
  ``[C, D]``.

  Args:
    weights: [C, D] float class weights.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([C] terms).

  Returns:
    Scalar float32, or [C] terms for ``reduction="none"``.

  References:
    Zhao, Xu, Cheng, "RegularFace: Deep Face Recognition via Exclusive
    Regularization", CVPR 2019.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> w = jnp.array([[1., 0.], [0., 2.], [1., 1.]])
    >>> round(float(mj.losses.regular_face_regularizer(w)), 4)
    0.7071
  """
  w = _check_weights(weights, reduction)
  c = w.shape[0]
  cos = distances_lib.pairwise(w, w, "cosine")
  off = ~jnp.eye(c, dtype=bool)
  best, nonempty = reductions.masked_max(cos, off, axis=1)
  return reductions.reduce(best, nonempty, reduction)
