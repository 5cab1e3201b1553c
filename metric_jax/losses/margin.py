"""Margin loss (Wu, Manmatha, Smola, Krahenbuhl, ICCV 2017) with an optional
learnable boundary ``beta`` (global or per class).

The boundary is an explicit argument (``beta=`` a scalar or a ``[C]`` array);
:func:`init_margin` returns ``{"beta": [C]}`` for per-class learning, so a
train step can do ``margin_loss(emb, labels, **params)`` and differentiate
with respect to ``params``.
"""

from __future__ import annotations

__all__ = ["margin_loss", "init_margin"]

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import pairs
from metric_jax import reductions

FORMS = ("triplets", "pairs")


def init_margin(key: jax.Array, num_classes: int, embedding_dim: int, *,
                beta: float = 1.2) -> dict:
  """Initial learnable parameters of :func:`margin_loss`: one ``beta`` per class.

  Args:
    key: PRNG key (unused: the initialisation is deterministic; kept for the
      uniform ``init_<name>(key, num_classes, embedding_dim)`` interface).
    num_classes: C, the number of classes (labels must lie in ``[0, C)``).
    embedding_dim: D (unused).
    beta: initial value (the paper and PML use 1.2).

  Returns:
    ``{"beta": [C] float32}``, the keyword arguments of :func:`margin_loss`.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_margin(jax.random.key(0), 3, 4)
    >>> params["beta"].shape, [round(float(b), 4) for b in params["beta"]]
    ((3,), [1.2, 1.2, 1.2])
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> loss = mj.losses.margin_loss(emb, jnp.array([0, 0, 1, 1, 2, 2]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
  """
  del key, embedding_dim
  _checks.positive_int(num_classes, "num_classes")
  _checks.scalar(beta, "beta")
  return {"beta": jnp.full((num_classes,), beta, jnp.float32)}


def _check_beta(beta) -> None:
  shape = np.shape(beta)
  if len(shape) > 1:
    raise ValueError(
        f"`beta` must be a scalar or a [num_classes] array, got shape {tuple(shape)}.")
  if not jnp.issubdtype(jnp.result_type(beta), jnp.floating) and not isinstance(beta, (int, float)):
    raise TypeError(f"`beta` must be a float scalar or array, got dtype {jnp.result_type(beta)}.")


def margin_loss(embeddings: jax.Array, labels: jax.Array,
                ref_embeddings: jax.Array | None = None,
                ref_labels: jax.Array | None = None, *,
                margin: float = 0.2, beta=1.2, nu: float = 0.0,
                form: str = "triplets",
                distance="euclidean", reduction: str = "mean_nonzero",
                where: jax.Array | None = None,
                ref_where: jax.Array | None = None,
                pair_mask: jax.Array | None = None) -> jax.Array:
  r"""Margin loss: positives inside ``beta - margin``, negatives beyond ``beta + margin``.

  Pair terms (distance ``d``, anchor ``a``, boundary ``beta_a``)::

    l_pos(a, p) = [d_ap - beta_a + margin]_+
    l_neg(a, n) = [beta_a - d_an + margin]_+

  The paper writes this as ``[margin + y_ij (D_ij - beta)]_+`` with
  ``y = +-1``. ``beta_a`` is ``beta`` itself (scalar) or ``beta[y_a]`` (a
  ``[C]`` array of per-class boundaries; labels must lie in ``[0, C)``).
  For a similarity metric the signs flip as in PML.

  ``form`` selects how pairs are weighted:

  * ``"triplets"`` (default, PML's ``MarginLoss``): every valid triplet
    ``(a, p, n)`` contributes ``l_pos(a, p) + l_neg(a, n)``, so a positive
    pair counts once per negative of its anchor and vice versa. The default
    ``"mean_nonzero"`` divides the sum by the number of non-zero positive
    plus non-zero negative triplet terms (PML's divisor); ``"mean"`` by twice
    the number of triplets. Computed in O(B M) without forming triplets.
  * ``"pairs"`` (the paper's form, to combine with distance-weighted
    sampling through ``pair_mask``): each positive and negative pair once,
    all terms reduced together with ``reduction``.

  Penalty: with ``nu != 0`` the paper's ``nu * beta`` term is added,
  following PML: ``+ nu * beta`` for a scalar ``beta``; for per-class
  ``beta`` the sum of ``nu * beta_a`` over the terms (triplets or pairs),
  divided like the loss. Nothing is added when there is no valid term.

  With L2-normalised inputs and ``distance="euclidean"`` the defaults
  reproduce PML's ``MarginLoss()``; ``MarginLoss(learn_beta=True,
  num_classes=C, nu=nu)`` is ``beta=init_margin(key, C, D)["beta"], nu=nu``.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    margin: half-width alpha of the band around ``beta``.
    beta: boundary; scalar or [C] float array (learnable: differentiate with
      respect to it).
    nu: weight of the ``beta`` penalty.
    form: ``"triplets"`` (PML) or ``"pairs"`` (paper).
    distance: metric name or callable.
    reduction: ``"mean_nonzero"`` (default), ``"mean"``, ``"sum"`` or
      ``"none"``: [B, M] per-pair terms (for ``"triplets"``, each pair's term
      multiplied by the number of triplets it is part of, so that they sum to
      the triplet sum; the penalty is not included).
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: [B, M] bool restriction of the pairs (miners).

  Returns:
    Scalar float32 loss, or [B, M] terms for ``reduction="none"``.

  References:
    Wu, Manmatha, Smola, Krahenbuhl, "Sampling Matters in Deep Embedding
    Learning", ICCV 2017, arXiv 1706.07567.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[0., 0.], [0., 1.], [0.5, 0.]])
    >>> round(float(mj.losses.margin_loss(emb, jnp.array([0, 0, 1]))), 4)
    0.591
  """
  reductions.check(reduction)
  _checks.choice(form, FORMS, "form")
  _checks.scalar(margin, "margin")
  _checks.scalar(nu, "nu")
  _check_beta(beta)
  problem = pairs.prepare(embeddings, labels, ref_embeddings, ref_labels,
                          distance=distance, where=where, ref_where=ref_where,
                          pair_mask=pair_mask)
  mat, masks = problem.matrix, problem.masks
  beta = jnp.asarray(beta, jnp.float32)
  per_class = beta.ndim == 1
  if per_class:
    # Padding rows may carry any label: their beta is never used.
    beta_a = jnp.where(masks.row_valid, beta[labels], 0.0)
  else:
    beta_a = jnp.broadcast_to(beta, labels.shape)
  b = beta_a[:, None]
  if problem.is_similarity:
    pos_terms = jax.nn.relu(b - mat + margin)
    neg_terms = jax.nn.relu(mat - b + margin)
  else:
    pos_terms = jax.nn.relu(mat - b + margin)
    neg_terms = jax.nn.relu(b - mat + margin)
  pos_terms = jnp.where(masks.pos, pos_terms, 0.0)
  neg_terms = jnp.where(masks.neg, neg_terms, 0.0)

  if form == "pairs":
    valid = masks.pos | masks.neg
    terms = pos_terms + neg_terms
    if reduction == "none":
      return reductions.reduce(terms, valid, "none")
    total = jnp.sum(terms)
    if reduction == "mean":
      count = jnp.sum(valid)
    else:
      count = jnp.sum(valid & (terms > 0))
    beta_sum = jnp.sum(jnp.where(valid, b, 0.0))
    has_terms = jnp.any(valid)
  else:
    n_pos = jnp.sum(masks.pos, axis=1).astype(jnp.float32)
    n_neg = jnp.sum(masks.neg, axis=1).astype(jnp.float32)
    weighted = pos_terms * n_neg[:, None] + neg_terms * n_pos[:, None]
    if reduction == "none":
      return weighted
    total = jnp.sum(weighted)
    triplets = n_pos * n_neg                       # [B] triplets per anchor
    if reduction == "mean":
      count = 2.0 * jnp.sum(triplets)
    else:
      count = (jnp.sum(jnp.where(pos_terms > 0, n_neg[:, None], 0.0))
               + jnp.sum(jnp.where(neg_terms > 0, n_pos[:, None], 0.0)))
    beta_sum = jnp.sum(beta_a * triplets)        # one beta_a per triplet
    has_terms = jnp.sum(triplets) > 0
  if reduction == "sum":
    loss = total
    penalty = nu * beta_sum
  else:
    count = jnp.asarray(count, jnp.float32)
    loss = total / jnp.maximum(count, 1.0)
    # PML's DivisorReducer: a zero divisor zeroes the per-class penalty too.
    penalty = jnp.where(count > 0, nu * beta_sum / jnp.maximum(count, 1.0), 0.0)
  if not per_class:
    penalty = nu * beta
  return loss + jnp.where(has_terms, penalty, 0.0)
