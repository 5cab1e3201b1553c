"""Manifold loss (Aziere & Todorovic, CVPR 2019): an N-pair-style loss on
random-walk (manifold) similarities between embeddings and learned proxies."""

from __future__ import annotations

__all__ = ["manifold_loss", "init_manifold"]

import math

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions
from metric_jax.losses import large_margin as _cls

_REDUCTIONS = ("mean", "sum", "none")
_NUMBERS = (int, float, np.number)  # concrete hyper-parameters (not traced)


def init_manifold(key: jax.Array, num_proxies: int, embedding_dim: int, *,
                  dtype=jnp.float32) -> dict:
  """Proxies for :func:`manifold_loss`: standard normal ``[K, D]`` (PML's
  ``torch.randn(K, l)``).

  The proxies are meta-classes, not classes: their number ``K`` is a free
  hyper-parameter (PML's ``K``, default 50); the loss's ``labels`` assign
  each embedding to one of them. With class labels as the assignment
  (e.g. in :func:`metric_jax.losses.make_objective`, which passes
  ``num_classes`` here), there is one proxy per class.

  Args:
    key: a ``jax.random`` key.
    num_proxies: K >= 1, the number of proxies.
    embedding_dim: D >= 1, the embedding size (PML's ``l``).
    dtype: dtype of the proxies (default float32; sampled in float32).

  Returns:
    ``{"proxies": [num_proxies, embedding_dim]}``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_manifold(jax.random.key(0), 4, 3)
    >>> params["proxies"].shape, params["proxies"].dtype
    ((4, 3), dtype('float32'))
    >>> emb = jax.random.normal(jax.random.key(1), (6, 3))
    >>> loss = mj.losses.manifold_loss(emb, jnp.array([0, 1, 2, 3, 0, 1]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
  """
  _checks.positive_int(num_proxies, "num_proxies")
  _checks.positive_int(embedding_dim, "embedding_dim")
  return {"proxies": _cls._normal_init(key, (num_proxies, embedding_dim), dtype)}


def _random_assignment(key: jax.Array, num_embeddings: int, num_proxies: int) -> jax.Array:
  """PML's draw when no assignment is given: every proxy once, the other
  ``num_embeddings - num_proxies`` rows uniformly at random, in random
  order. [num_embeddings] int32."""
  key_extra, key_order = jax.random.split(key)
  extra = jax.random.randint(key_extra, (num_embeddings - num_proxies,), 0, num_proxies)
  every = jnp.concatenate([jnp.arange(num_proxies, dtype=jnp.int32), extra.astype(jnp.int32)])
  return jax.random.permutation(key_order, every)


def _check_hyper_parameters(alpha, lambda_c, margin, temperature, distance) -> None:
  _checks.scalar(alpha, "alpha", positive=True)
  if isinstance(alpha, _NUMBERS) and not alpha < 1:
    raise ValueError(f"`alpha` must lie in (0, 1) (the random walk's propagation weight; "
                     f"I - alpha S is singular at 1), got {alpha}.")
  _checks.scalar(lambda_c, "lambda_c", non_negative=True)
  _checks.scalar(margin, "margin")
  _checks.scalar(temperature, "temperature", positive=True)
  if not distances_lib.is_similarity(distance):
    raise ValueError(
        "manifold_loss builds its affinity graph from a similarity: `distance` must be "
        "\"cosine\", \"dot\" or a callable with is_similarity=True, got the distance "
        f"{distance!r}.")


def _assignment(labels, key, num_embeddings: int, num_proxies: int):
  """The [B] proxy index of every embedding: ``labels``, or PML's random
  draw from ``key`` when ``labels`` is None."""
  if (labels is None) == (key is None):
    raise ValueError(
        "manifold_loss needs exactly one of `labels` (the proxy index of every embedding) "
        f"and `key` (to draw it as PML does), got labels={'None' if labels is None else 'array'}"
        f" and key={'None' if key is None else 'a key'}.")
  if labels is not None:
    _checks.labels(labels, num_embeddings, "labels")
    return labels
  if num_embeddings < num_proxies:
    raise ValueError(
        f"A random assignment (`labels=None`) gives every proxy at least one embedding: "
        f"`embeddings` must have at least as many rows as `proxies` ({num_proxies}), got "
        f"{num_embeddings}.")
  return _random_assignment(key, num_embeddings, num_proxies)


def _affinities(nodes: jax.Array, valid: jax.Array, distance, temperature) -> jax.Array:
  """``S_ij = exp(max(s_ij, 0) / T)`` between distinct valid nodes, else 0."""
  n = nodes.shape[0]
  keep = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)
  sim = distances_lib.pairwise(nodes, None, distance)
  # Inner where: an excluded entry (a large dot-product diagonal) cannot
  # overflow and send 0 * inf into the gradient.
  return jnp.where(keep, jnp.exp(jnp.where(keep, jnp.maximum(sim, 0.0), 0.0) / temperature),
                   0.0)


def _random_walk(affinity: jax.Array, alpha) -> jax.Array:
  """``F = (1 - alpha) (I - alpha D^-1/2 S D^-1/2)^-1``, one linear solve.

  A node without neighbours (a masked row) keeps an identity row, so the
  valid nodes' block is the random walk on the valid graph alone.
  """
  degree = jnp.sum(affinity, axis=1)
  has = degree > 0
  scale = jnp.where(has, jax.lax.rsqrt(jnp.where(has, degree, 1.0)), 0.0)
  eye = jnp.eye(affinity.shape[0], dtype=jnp.float32)
  system = eye - alpha * (scale[:, None] * affinity * scale[None, :])
  return (1.0 - alpha) * jnp.linalg.solve(system, eye)


def _softplus_terms(sims, own: jax.Array, margin, violating_only: bool):
  """Per row ``log(1 + sum_{k in E_i} e^{x_ik})``, ``x_ik = sim_ik -
  sim_{i c_i} + margin``, for each [B, K] matrix of ``sims``. ``E_i`` is every
  ``k != c_i`` (with ``violating_only``: those with ``x_ik >= 0``; a NaN
  enters, so NaN inputs stay visible)."""
  logits, masks = [], []
  for sim in sims:
    target = jnp.sum(jnp.where(own, sim, 0.0), axis=1, keepdims=True)
    x = sim - target + margin
    enter = ~own & ~(x < 0) if violating_only else ~own
    logits.append(x)
    masks.append(enter)
  lses, _ = reductions.masked_logsumexps(logits, masks, axis=1, include_zero=True)
  return lses


def manifold_loss(embeddings: jax.Array, labels: jax.Array | None,
                  ref_embeddings: jax.Array | None = None,
                  ref_labels: jax.Array | None = None, *,
                  proxies: jax.Array, key: jax.Array | None = None, alpha: float = 0.8,
                  lambda_c: float = 1.0, margin: float = 5e-4, temperature: float = 0.5,
                  violating_only: bool = True, distance="cosine", reduction: str = "mean",
                  where: jax.Array | None = None,
                  ref_where: jax.Array | None = None) -> jax.Array:
  r"""Manifold loss: N-pair-style loss on random-walk similarities to proxies.

  The B embeddings and the K proxies ``p_k`` are the nodes ``z`` of one
  affinity graph; its closed-form random walk gives manifold similarities
  ``F``. With ``s`` the similarity (cosine by default), ``T`` the
  temperature and ``c_i`` (``labels``) the proxy of embedding i::

    S_ab = exp(max(s(z_a, z_b), 0) / T)  (a != b),   S_aa = 0
    F    = (1 - alpha) (I - alpha D^-1/2 S D^-1/2)^-1,   D = diag(sum_b S_ab)
    l(x_i.) = log(1 + sum_{k != c_i, x_ik >= 0} e^{x_ik})
    int_i = l(F_{i,p_k} - F_{i,p_c_i} + m)
    ctx_i = l(cos(F_i, F_{p_k}) - cos(F_i, F_{p_c_i}) + m)   (rows of F, all B + K entries)
    loss  = mean_i (int_i + lambda_C ctx_i)

  ``F`` comes from one ``jnp.linalg.solve`` of the (B + K)-square system:
  O((B + K)^3) time and O((B + K)^2) memory.

  The labels are **proxy assignments** (meta-classes), integers in
  ``[0, K)``, not class labels; the paper partitions the data at random.
  PML 2.9's ``ManifoldLoss`` rejects labels and either takes the assignment
  as ``indices_tuple`` or, without one, draws it: every proxy once, the
  other B - K rows uniformly, in random order. ``labels=None`` with ``key``
  makes the same kind of draw here (it needs B >= K and ignores ``where``:
  masked rows may take some proxies' only slot).

  Defaults reproduce PML's ``ManifoldLoss(l=D, K, lambdaC=1.0, alpha=0.8,
  margin=5e-4)`` called as ``loss(embeddings, indices_tuple=labels)`` with
  ``proxies = loss.proxies``. Settings beyond PML: ``temperature`` (PML fixes
  0.5); ``violating_only=False`` keeps every ``k != c_i`` term, the smooth
  N-pair form the paper builds on (PML keeps only ``x_ik >= 0``, so a term
  jumps from 0 to ``e^0 = 1`` at the threshold and the selection has no
  gradient); ``lambda_c=inf`` gives the context term alone, as PML's
  docstring describes (PML itself then returns ``inf * ctx``). Masked rows
  (``where``) are removed from the graph, not only from the mean.

  Args:
    embeddings: [B, D] float (f32, bf16, f16; computed in f32).
    labels: [B] integer proxy index of every embedding, in ``[0, K)``; or
      None to draw it from ``key``.
    ref_embeddings: not supported (raises, as in PML).
    ref_labels: not supported (raises).
    proxies: [K, D] float proxies (see :func:`init_manifold`).
    key: a ``jax.random`` key for the random assignment; only with
      ``labels=None``.
    alpha: the random walk's propagation weight, in (0, 1).
    lambda_c: lambda_C >= 0, weight of the context term; ``float("inf")``
      for the context term alone.
    margin: m.
    temperature: T > 0 of the affinities (PML: 0.5).
    violating_only: keep only the terms with ``x_ik >= 0`` (PML, default).
    distance: a **similarity** metric: ``"cosine"`` (default, PML's
      ``CosineSimilarity``), ``"dot"`` or a callable marked
      ``is_similarity``.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Aziere, Todorovic, "Ensemble Deep Manifold Similarity Learning using Hard
    Proxies", CVPR 2019, pp. 7299-7307 (no arXiv version; CVF open access).

  Example:
    Every embedding is nearest its own proxy, then row 1 is assigned to the
    other one:

    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> proxies = jnp.array([[1., 0.1], [0.1, 1.]])
    >>> float(mj.losses.manifold_loss(emb, jnp.array([0, 0, 1]), proxies=proxies))
    0.0
    >>> terms = mj.losses.manifold_loss(emb, jnp.array([0, 1, 1]), proxies=proxies,
    ...                                 reduction="none")  # row 1 is nearer proxy 0
    >>> [round(float(t), 4) for t in terms]
    [0.0, 1.4175, 0.0]
  """
  _cls._check_no_ref(ref_embeddings, ref_labels, ref_where, "manifold_loss")
  _checks.embeddings(embeddings, "embeddings")
  _checks.mask(where, (embeddings.shape[0],), "where")
  reductions.check(reduction, _REDUCTIONS)
  _cls._check_params(proxies, "proxies", embeddings)
  _check_hyper_parameters(alpha, lambda_c, margin, temperature, distance)
  b, k = embeddings.shape[0], proxies.shape[0]
  labels = _assignment(labels, key, b, k)
  bad = _cls._label_out_of_range(labels, k, where)
  valid = jnp.ones((b,), bool) if where is None else where
  x = pairs.zero_invalid_rows(embeddings, where).astype(jnp.float32)
  nodes = jnp.concatenate([x, proxies.astype(jnp.float32)], axis=0)
  walk = _random_walk(_affinities(nodes, jnp.concatenate([valid, jnp.ones((k,), bool)]),
                                  distance, temperature), alpha)
  own = _cls._one_hot(_cls._masked_labels(labels, where), k)
  context_only = isinstance(lambda_c, _NUMBERS) and math.isinf(lambda_c)
  context = distances_lib.pairwise(walk[:b], walk[b:], "cosine")   # rows of F are non-zero
  if context_only:
    (terms,) = _softplus_terms([context], own, margin, violating_only)
  else:
    intrinsic, context = _softplus_terms([walk[:b, b:], context], own, margin, violating_only)
    terms = intrinsic + lambda_c * context
  return _cls._finish(terms, where, bad, reduction)
