"""Proxy losses: Proxy-NCA and Proxy-Anchor.

One learned proxy per class, passed explicitly as ``proxies`` [C, D] and
created by ``init_proxy_nca`` / ``init_proxy_anchor`` (which return the
keyword arguments of the loss). The proxies supply the negatives, so plain
random batches work and a batch without positive pairs still has a loss.

These losses compare samples with proxies: ``ref_embeddings`` /
``ref_labels`` / ``ref_where`` are not supported and raise a ``ValueError``
(as in PML). Labels must lie in ``[0, C)``: concrete labels outside it raise
a ``ValueError``; traced ones (under ``jax.jit``) make the loss NaN.
Everything is computed in float32.
"""

from __future__ import annotations

__all__ = ["proxy_nca_loss", "init_proxy_nca", "proxy_anchor_loss", "init_proxy_anchor"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.losses import large_margin as _cls


def init_proxy_nca(key: jax.Array, num_classes: int, embedding_dim: int, *,
                   dtype=jnp.float32) -> dict:
  """Proxies for :func:`proxy_nca_loss`: standard normal ``[C, D]`` (PML's
  default ``normal_`` init).

  Args:
    key: a ``jax.random`` key.
    num_classes: C >= 1, the number of classes.
    embedding_dim: D >= 1, the embedding size.
    dtype: dtype of the proxies (default float32; sampled in float32).

  Returns:
    ``{"proxies": [num_classes, embedding_dim]}``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_proxy_nca(jax.random.key(0), 3, 4)
    >>> params["proxies"].shape, params["proxies"].dtype
    ((3, 4), dtype('float32'))
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> loss = mj.losses.proxy_nca_loss(emb, jnp.array([0, 0, 1, 1, 2, 2]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
  """
  _checks.positive_int(num_classes, "num_classes")
  _checks.positive_int(embedding_dim, "embedding_dim")
  return {"proxies": _cls._normal_init(key, (num_classes, embedding_dim), dtype)}


def proxy_nca_loss(embeddings: jax.Array, labels: jax.Array,
                   ref_embeddings: jax.Array | None = None,
                   ref_labels: jax.Array | None = None, *,
                   proxies: jax.Array, softmax_scale: float = 1.0,
                   exclude_positive: bool = False, normalize: bool = True,
                   distance="squared_euclidean", reduction: str = "mean",
                   where: jax.Array | None = None,
                   ref_where: jax.Array | None = None) -> jax.Array:
  r"""Proxy-NCA: softmax over the (scaled, negated) distances to the proxies.

  With ``d`` the distance between the (normalised) embedding and proxies and
  ``z_ij = -softmax_scale * d(x_i, p_j)`` (``+softmax_scale * s`` for a
  similarity)::

    l_i = -z_{i y_i} + log sum_{j in J_i} e^{z_ij}

  where ``J_i`` is all proxies (``exclude_positive=False``, PML's
  ``ProxyNCALoss``: the positive proxy stays in the denominator) or all but
  ``y_i`` (``exclude_positive=True``, the paper's form; with a single class
  the denominator is empty and the row contributes 0).

  Defaults reproduce PML's ``ProxyNCALoss(num_classes, embedding_size)``:
  squared Euclidean distance between L2-normalised embeddings and
  L2-normalised proxies, ``softmax_scale=1``, mean over samples. The Reality
  Check tuned ``softmax_scale`` to about 8-14. One deviation: PML drops rows
  whose softmax probability underflows to exactly 0; this loss works in log
  space and keeps them (never reached at ``softmax_scale`` ~ 1 on unit
  vectors, where logits lie in [-4 s, 0]).

  Args:
    embeddings: [B, D] float (f32, bf16, f16; computed in f32).
    labels: [B] integer class labels in ``[0, C)``.
    ref_embeddings: not supported (raises).
    ref_labels: not supported (raises).
    proxies: [C, D] float proxies (see :func:`init_proxy_nca`).
    softmax_scale: inverse temperature, > 0.
    exclude_positive: drop the positive proxy from the denominator (paper).
    normalize: L2-normalise embeddings and proxies first (PML default).
    distance: metric name or callable (see :mod:`metric_jax.distances`).
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Movshovitz-Attias, Toshev, Leung, Ioffe, Singh, "No Fuss Distance Metric
    Learning using Proxies", ICCV 2017, arXiv 1703.07464.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0., 2.]])
    >>> proxies = jnp.array([[1., 0.], [0., 1.]])
    >>> round(float(mj.losses.proxy_nca_loss(emb, jnp.array([0, 1]), proxies=proxies)), 4)
    0.1269
  """
  x = _cls._prepare_classification(embeddings, labels, where, ref_embeddings, ref_labels,
                                   ref_where, reduction, "proxy_nca_loss")
  _cls._check_params(proxies, "proxies", embeddings)
  _checks.scalar(softmax_scale, "softmax_scale", positive=True)
  is_sim = distances_lib.is_similarity(distance)
  num_classes = proxies.shape[0]
  bad = _cls._label_out_of_range(labels, num_classes, where)
  x = x.astype(jnp.float32)
  p = proxies.astype(jnp.float32)
  if normalize:
    x = distances_lib.l2_normalize(x)
    p = distances_lib.l2_normalize(p)
  mat = distances_lib.pairwise(x, p, distance)
  logits = softmax_scale * (mat if is_sim else -mat)
  labels = _cls._masked_labels(labels, where)
  if not exclude_positive:
    # PML's form: the plain cross-entropy (NaN logits stay NaN in it; the
    # target logit is gathered, not summed out of a masked [B, C] matrix).
    return _cls._finish(_cls._cross_entropy(logits, labels), where, bad, reduction)
  target = _cls._one_hot(labels, num_classes)
  denom, nonempty = reductions.masked_logsumexp(logits, ~target, axis=1)
  pos_logit = jnp.sum(jnp.where(target, logits, 0.0), axis=1)
  terms = jnp.where(nonempty, denom - pos_logit, 0.0)
  # masked_logsumexp maps a NaN sum to 0; keep NaN inputs visible.
  terms = jnp.where(jnp.any(jnp.isnan(logits), axis=1), jnp.nan, terms)
  return _cls._finish(terms, where, bad, reduction)


def init_proxy_anchor(key: jax.Array, num_classes: int, embedding_dim: int, *,
                      dtype=jnp.float32) -> dict:
  """Proxies for :func:`proxy_anchor_loss`: Kaiming-normal, fan_out mode.

  ``N(0, 2 / C)`` for the ``[C, D]`` proxy matrix (PyTorch's fan_out of a
  ``[C, D]`` tensor is C), as PML and the authors' code initialise them.

  Args:
    key: a ``jax.random`` key.
    num_classes: C >= 1, the number of classes.
    embedding_dim: D >= 1, the embedding size.
    dtype: dtype of the proxies (default float32; sampled in float32).

  Returns:
    ``{"proxies": [num_classes, embedding_dim]}``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_proxy_anchor(jax.random.key(0), 3, 4)
    >>> params["proxies"].shape, params["proxies"].dtype
    ((3, 4), dtype('float32'))
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> loss = mj.losses.proxy_anchor_loss(emb, jnp.array([0, 0, 1, 1, 2, 2]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
  """
  _checks.positive_int(num_classes, "num_classes")
  _checks.positive_int(embedding_dim, "embedding_dim")
  std = (2.0 / num_classes) ** 0.5
  return {"proxies": _cls._normal_init(key, (num_classes, embedding_dim), dtype, std)}


_ANCHOR_REDUCTIONS = ("mean", "sum", "none")


def proxy_anchor_loss(embeddings: jax.Array, labels: jax.Array,
                      ref_embeddings: jax.Array | None = None,
                      ref_labels: jax.Array | None = None, *,
                      proxies: jax.Array, margin: float = 0.1, alpha: float = 32.0,
                      distance="cosine", reduction: str = "mean",
                      where: jax.Array | None = None,
                      ref_where: jax.Array | None = None) -> jax.Array:
  r"""Proxy-Anchor loss: each proxy is an anchor over the whole batch.

  With cosine similarity ``s(x, p)``, ``X_p^+`` the batch samples of the
  proxy's class, ``X_p^-`` the others, ``P^+`` the proxies with at least one
  sample in the batch and ``P`` all C proxies::

    l = 1/|P^+| sum_{p in P^+} log(1 + sum_{x in X_p^+} e^{-alpha (s(x,p) - delta)})
      + 1/|P|   sum_{p in P}   log(1 + sum_{x in X_p^-} e^{ alpha (s(x,p) + delta)})

  (``delta`` is ``margin``). For a distance metric the exponents follow
  PML's sign convention: ``alpha (d - delta)`` and ``alpha (-delta - d)``.
  Defaults reproduce PML's ``ProxyAnchorLoss(num_classes, embedding_size)``
  (margin 0.1, alpha 32, its divisors). Each log-sum-exp is a masked,
  shifted LSE with the appended zero: empty sets give 0, never NaN.

  Args:
    embeddings: [B, D] float (f32, bf16, f16; computed in f32).
    labels: [B] integer class labels in ``[0, C)``.
    ref_embeddings: not supported (raises).
    ref_labels: not supported (raises).
    proxies: [C, D] float proxies (see :func:`init_proxy_anchor`).
    margin: delta.
    alpha: scale, > 0.
    distance: metric name or callable (default ``"cosine"``).
    reduction: ``"mean"`` (default: the divisors above), ``"sum"`` (both
      sums, undivided) or ``"none"`` ([C] per-proxy positive + negative
      terms; their sum is the ``"sum"`` value).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [C] terms for ``reduction="none"``.

  References:
    Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR
    2020, arXiv 2003.13911.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0., 2.]])
    >>> proxies = jnp.array([[1., 0.], [0., 1.]])
    >>> loss = mj.losses.proxy_anchor_loss(emb, jnp.array([0, 1]), proxies=proxies,
    ...                                    alpha=4.0)
    >>> round(float(loss), 4)
    0.94
  """
  _cls._check_no_ref(ref_embeddings, ref_labels, ref_where, "proxy_anchor_loss")
  pairs.check_inputs(embeddings, labels, where=where)
  reductions.check(reduction, _ANCHOR_REDUCTIONS)
  _cls._check_params(proxies, "proxies", embeddings)
  _checks.scalar(margin, "margin")
  _checks.scalar(alpha, "alpha", positive=True)
  is_sim = distances_lib.is_similarity(distance)
  x = pairs.zero_invalid_rows(embeddings, where).astype(jnp.float32)
  num_classes = proxies.shape[0]
  bad = _cls._label_out_of_range(labels, num_classes, where)
  mat = distances_lib.pairwise(x, proxies.astype(jnp.float32), distance)  # [B, C]
  if is_sim:
    pos_exp, neg_exp = margin - mat, mat + margin
  else:
    pos_exp, neg_exp = mat - margin, -margin - mat
  valid = jnp.ones(x.shape[0], bool) if where is None else where
  target = _cls._one_hot(_cls._masked_labels(labels, where), num_classes)
  pos_mask = target & valid[:, None]
  neg_mask = ~target & valid[:, None]
  (pos_term, neg_term), (has_pos, _) = reductions.masked_logsumexps(
      [alpha * pos_exp, alpha * neg_exp], [pos_mask, neg_mask], axis=0, include_zero=True)
  if reduction == "none":
    out = pos_term + neg_term
  elif reduction == "sum":
    out = jnp.sum(pos_term) + jnp.sum(neg_term)
  else:
    n_pos = jnp.maximum(jnp.sum(has_pos), 1).astype(jnp.float32)
    out = jnp.sum(pos_term) / n_pos + jnp.sum(neg_term) / num_classes
  out = jnp.where(jnp.any(bad), jnp.nan, out)
  # masked_logsumexp drops NaN sums: keep NaN inputs visible.
  return reductions.keep_nan(out, mat, jnp.broadcast_to(valid[:, None], mat.shape))
