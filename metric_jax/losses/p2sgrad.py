"""P2SGrad (Zhang et al., CVPR 2019): mean squared error between the cosine
logits and the one-hot targets.

A classification loss on learned class weights ``weights`` [C, D] (one row
per class; PML stores the transpose ``[D, C]``), created by
``init_p2sgrad(key, num_classes, embedding_dim)``. Like the other
classification losses (see :mod:`metric_jax.losses.large_margin`) it compares
samples with classes: ``ref_embeddings`` / ``ref_labels`` / ``ref_where``
raise a ``ValueError``, and labels must lie in ``[0, C)``.
"""

from __future__ import annotations

__all__ = ["p2sgrad_loss", "p2sgrad_logits", "init_p2sgrad"]

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax.losses import large_margin as _cls

_PRECISION = jax.lax.Precision.HIGHEST


def init_p2sgrad(key: jax.Array, num_classes: int, embedding_dim: int, *,
                 dtype=jnp.float32) -> dict:
  """Class weights for :func:`p2sgrad_loss`: unit rows of uniform draws.

  Each row of a ``U(-1, 1)`` ``[C, D]`` draw is scaled to unit L2 norm, as
  PML initialises (and keeps) each class column of its ``[D, C]`` weight.

  Args:
    key: a ``jax.random`` key.
    num_classes: C >= 1, the number of classes.
    embedding_dim: D >= 1, the embedding size.
    dtype: dtype of the weights (default float32; sampled in float32).

  Returns:
    ``{"weights": [num_classes, embedding_dim]}`` with unit-norm rows.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_p2sgrad(jax.random.key(0), 10, 4)
    >>> params["weights"].shape, params["weights"].dtype
    ((10, 4), dtype('float32'))
    >>> bool(jnp.allclose(jnp.linalg.norm(params["weights"], axis=1), 1.0))
    True
  """
  _checks.positive_int(num_classes, "num_classes")
  _checks.positive_int(embedding_dim, "embedding_dim")
  draw = jax.random.uniform(key, (num_classes, embedding_dim), jnp.float32, -1.0, 1.0)
  return {"weights": distances_lib.l2_normalize(draw).astype(dtype)}


def _unit_rows(embeddings: jax.Array, weights: jax.Array,
               detach_weight_norm: bool) -> tuple[jax.Array, jax.Array]:
  """The float32 L2-normalised embeddings and weights; with
  ``detach_weight_norm`` the weights' norms are constants for the gradient
  (PML re-projects its weight in place, outside autograd)."""
  x = distances_lib.l2_normalize(embeddings.astype(jnp.float32))
  w = weights.astype(jnp.float32)
  if not detach_weight_norm:
    return x, distances_lib.l2_normalize(w)
  norms = jax.lax.stop_gradient(_cls._norms(w))
  return x, w / jnp.maximum(norms, 1e-12)[:, None]


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_PRECISION)


def _rowdot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.sum(a * b, axis=-1)


def _uses_gram(b: int, c: int, d: int) -> bool:
  """Whether the [D, D] Gram route costs fewer multiply-adds (forward and
  backward) than the [B, C] cosine matrix: ``2 (B + C) D^2 < 3 B C D``."""
  return 2 * (b + c) * d < 3 * b * c


def _gram_parts(x: jax.Array, w: jax.Array, labels: jax.Array):
  """``(e, q, w_y)``: the errors ``e_i = x_i S x_i^T - 2 <x_i, w_{y_i}> + 1``
  with ``S = W^T W`` [D, D], ``q = X S`` and ``w_y = W[labels]``."""
  q = _matmul(x, _matmul(w.T, w))
  w_y = w[labels]
  return _rowdot(x, q) - 2.0 * _rowdot(x, w_y) + 1.0, q, w_y


@jax.custom_jvp
def _gram_errors(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
  """``sum_j (<x_i, w_j> - [j == y_i])^2`` for unit rows, without the [B, C]
  matrix: ``sum_j <x_i, w_j>^2 = x_i S x_i^T`` with ``S = W^T W`` [D, D].
  Labels must be in range (the caller poisons other rows)."""
  return _gram_parts(x, w, labels)[0]


@functools.partial(_gram_errors.defjvp, symbolic_zeros=True)
def _gram_errors_jvp(primals, tangents):
  # de_i = 2 <dx_i, q_i - w_{y_i}> + x_i dS x_i^T - 2 <x_i, dw_{y_i}> with
  # dS = M + M^T, M = W^T dW. Reverse mode transposes x_i dS x_i^T into
  # X^T diag(g) X and then W (.): [D, D]-sized products, never [B, C].
  (x, w, labels), (dx, dw, _) = primals, tangents
  value, q, w_y = _gram_parts(x, w, labels)
  tangent = jnp.zeros_like(value)
  if not isinstance(dx, SymbolicZero):
    tangent = tangent + 2.0 * _rowdot(dx, q - w_y)
  if not isinstance(dw, SymbolicZero):
    m = _matmul(w.T, dw)
    tangent = tangent + _rowdot(x, _matmul(x, m + m.T)) - 2.0 * _rowdot(x, dw[labels])
  return value, tangent


def _squared_errors(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-row ``sum_j (<x_i, w_j> - [j == y_i])^2`` ([B] float32) for unit
  rows ``x`` [B, D] and ``w`` [C, D], by the cheaper of two routes (chosen
  from the static shapes): the [B, C] cosine matrix, or [D, D] Gram
  products when D is small next to B and C."""
  (b, d), c = x.shape, w.shape[0]
  if _uses_gram(b, c, d):
    return _gram_errors(x, w, jnp.clip(jnp.asarray(labels).astype(jnp.int32), 0, c - 1))
  target = _cls._one_hot(labels, c).astype(jnp.float32)
  return jnp.sum(jnp.square(distances_lib.pairwise(x, w, "dot") - target), axis=1)


def p2sgrad_logits(embeddings: jax.Array, weights: jax.Array,
                   labels: jax.Array | None = None) -> jax.Array:
  """The cosines ``cos(theta_ij)`` that :func:`p2sgrad_loss` regresses.

  Args:
    embeddings: [B, D] float.
    weights: [C, D] float class weights.
    labels: optional [B] labels, validated but unused (no margin); accepted
      for the interface of the other ``*_logits`` functions.

  Returns:
    [B, C] float32 cosines; ``argmax`` over classes gives the prediction.

  References:
    See :func:`p2sgrad_loss`.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[3., 4.]])
    >>> w = jnp.array([[1., 0.], [0., 2.]])
    >>> [round(float(v), 4) for v in mj.losses.p2sgrad_logits(emb, w)[0]]
    [0.6, 0.8]
  """
  _cls._check_logits_inputs(embeddings, weights, labels)
  if labels is not None:
    _cls._label_out_of_range(labels, weights.shape[0])
  return _cls._cosine(embeddings, weights)


def p2sgrad_loss(embeddings: jax.Array, labels: jax.Array,
                 ref_embeddings: jax.Array | None = None,
                 ref_labels: jax.Array | None = None, *,
                 weights: jax.Array, detach_weight_norm: bool = False,
                 reduction: str = "mean", where: jax.Array | None = None,
                 ref_where: jax.Array | None = None) -> jax.Array:
  r"""P2SGrad: squared error between the cosines to the classes and one-hot
  targets.

  With ``cos(theta_ij) = <x_i, w_j> / (||x_i|| ||w_j||)`` over the C
  classes::

    l_i = 1/C sum_j (cos(theta_ij) - [j == y_i])^2

  and the mean over the rows by default, i.e. the mean over all ``B x C``
  entries: with ``weights = W.T`` of PML's ``[D, C]`` weight, the defaults
  give the value of PML's ``P2SGradLoss(descriptors_dim, num_classes)`` (its
  ``MSELoss`` on the cosines).

  The paper defines P2SGrad by its gradient,
  ``sum_j (cos(theta_ij) - [j == y_i]) grad cos(theta_ij)`` for each
  sample, which is the gradient of ``C / 2`` times ``l_i``: the batch's
  paper gradient is that of ``C / 2 * p2sgrad_loss(..., reduction="sum")``
  (a constant factor, a learning-rate scale).

  PML re-normalises its weight in place before each call, outside autograd,
  so its weight gradient lacks the normalisation's Jacobian (the projection
  onto the tangent of the unit sphere in the paper's ``grad cos(theta_ij)``).
  ``detach_weight_norm=True`` treats the weights' norms as constants,
  reproducing PML's weight gradient for unit-norm weights (PML's always
  are); the embedding gradient and the value are the same either way.
  Cosines are not clipped to ``[-1, 1]`` (PML clamps; only rounding
  differs), and a zero embedding has cosine 0 (NaN in PML).

  Numerics and cost: everything is computed in float32 for every input
  dtype; the result is float32 and the gradients have the inputs' dtypes.
  When B and C are large next to D (``2 (B + C) D < 3 B C``), the
  ``[B, C]`` cosine matrix is never formed:
  ``sum_j cos^2(theta_ij) = x_i W^T W x_i^T`` for unit rows, so value and
  gradients take ``[D, D]`` Gram products (about ``2 (B + C) D^2``
  multiply-adds instead of ``3 B C D``); each term's float32 rounding
  error is then absolute (about ``1e-7 ||W^T W||``), not relative.

  Args:
    embeddings: [B, D] float (f32, bf16, f16).
    labels: [B] integer class labels in ``[0, C)``.
    ref_embeddings: not supported (raises).
    ref_labels: not supported (raises).
    weights: [C, D] float class weights (see :func:`init_p2sgrad`).
    detach_weight_norm: treat the weights' norms as constants for the
      gradient (PML's weight gradient); default False (the paper's).
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [B] terms ``l_i`` for ``reduction="none"``.

  References:
    Zhang, Zhao, Yan, Gao, Qiao, Wang, Li, "P2SGrad: Refined Gradients for
    Optimizing Deep Face Models", CVPR 2019, arXiv 1905.02479.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[3., 4.], [0., 2.]])
    >>> w = jnp.array([[1., 0.], [0., 1.]])
    >>> terms = mj.losses.p2sgrad_loss(emb, jnp.array([0, 1]), weights=w, reduction="none")
    >>> [round(float(t), 4) for t in terms]
    [0.4, 0.0]
    >>> round(float(mj.losses.p2sgrad_loss(emb, jnp.array([0, 1]), weights=w)), 4)
    0.2
  """
  x = _cls._prepare_classification(embeddings, labels, where, ref_embeddings, ref_labels,
                                   ref_where, reduction, "p2sgrad_loss")
  _cls._check_params(weights, "weights", embeddings)
  bad = _cls._label_out_of_range(labels, weights.shape[0], where)
  x, w = _unit_rows(x, weights, detach_weight_norm)
  terms = _squared_errors(x, w, labels) / weights.shape[0]
  return _cls._finish(terms, where, bad, reduction)
