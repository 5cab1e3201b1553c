"""SoftTriple loss (Qian et al., ICCV 2019): a softmax loss with K learned
centres per class."""

from __future__ import annotations

__all__ = ["soft_triple_loss", "soft_triple_logits", "init_soft_triple"]

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax.losses import large_margin as _cls


def _centers_3d(centers, centers_per_class):
  """[C, K, D] view of centres given as [C, K, D] or [C*K, D]."""
  return _cls._grouped_params(centers, centers_per_class, name="centers",
                              per_class_name="centers_per_class", default=10)


@jax.custom_jvp
def _soft_average(sim: jax.Array, inv_gamma: jax.Array) -> jax.Array:
  """``sum_k softmax_k(sim / gamma) sim_k`` over axis 1 of [B, K, C]."""
  prob = jax.nn.softmax(sim * inv_gamma, axis=1)
  return jnp.sum(prob * sim, axis=1)


@_soft_average.defjvp
def _soft_average_jvp(primals, tangents):
  # dS = sum_k p_k (1 + (sim_k - S) / gamma) dsim_k + Var_p(sim) d(1/gamma):
  # one fused pass in the backward instead of the softmax's several.
  sim, inv_gamma = primals
  dsim, dinv = tangents
  prob = jax.nn.softmax(sim * inv_gamma, axis=1)
  out = jnp.sum(prob * sim, axis=1)
  centred = sim - out[:, None, :]
  weight = prob * (1.0 + inv_gamma * centred)
  tangent = jnp.sum(weight * dsim, axis=1) + dinv * jnp.sum(prob * sim * centred, axis=1)
  return out, tangent


def init_soft_triple(key: jax.Array, num_classes: int, embedding_dim: int, *,
                     centers_per_class: int = 10, dtype=jnp.float32) -> dict:
  """Centres for :func:`soft_triple_loss`.

  ``U(-1/sqrt(C K), 1/sqrt(C K))``, which is PML's
  ``kaiming_uniform_(a=sqrt(5))`` of its ``[D, C*K]`` matrix. Returned as
  ``[C, K, D]`` so the number of centres per class travels with the array.

  Args:
    key: a ``jax.random`` key.
    num_classes: C >= 1, the number of classes.
    embedding_dim: D >= 1, the embedding size.
    centers_per_class: K >= 1, centres per class (default 10, PML's).
    dtype: dtype of the centres (default float32; sampled in float32).

  Returns:
    ``{"centers": [num_classes, centers_per_class, embedding_dim]}``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_soft_triple(jax.random.key(0), 3, 4, centers_per_class=2)
    >>> params["centers"].shape, params["centers"].dtype
    ((3, 2, 4), dtype('float32'))
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> loss = mj.losses.soft_triple_loss(emb, jnp.array([0, 0, 1, 1, 2, 2]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
    >>> bool(jnp.abs(params["centers"]).max() <= 1 / 6 ** 0.5)  # U(-1/sqrt(C K), 1/sqrt(C K))
    True
  """
  _checks.positive_int(num_classes, "num_classes")
  _checks.positive_int(embedding_dim, "embedding_dim")
  _checks.positive_int(centers_per_class, "centers_per_class")
  bound = 1.0 / np.sqrt(num_classes * centers_per_class)
  c = jax.random.uniform(key, (num_classes, centers_per_class, embedding_dim), jnp.float32,
                         -bound, bound)
  return {"centers": c.astype(dtype)}


def soft_triple_logits(embeddings: jax.Array, centers: jax.Array,
                       labels: jax.Array | None = None, *,
                       centers_per_class: int | None = None, la: float = 20.0,
                       gamma: float = 0.1, margin: float = 0.01) -> jax.Array:
  """SoftTriple logits ``la (S_ic - margin [c = y_i])``.

  ``S_ic = sum_k softmax_k(cos(x_i, w_ck) / gamma) cos(x_i, w_ck)`` is the
  soft maximum of the class's centre similarities.

  Args:
    embeddings: [B, D] float.
    centers: [C, K, D] or [C*K, D] float centres.
    labels: optional [B] integer labels (None: no margin).
    centers_per_class: K for the flat layout (default 10); inferred from a
      3-D ``centers``.
    la: logit scale lambda > 0.
    gamma: softmax temperature over the centres of a class, > 0.
    margin: delta subtracted from the target class.

  Returns:
    [B, C] float32 logits.

  References:
    See :func:`soft_triple_loss`.

  Example:
    Class 0 has centres at 0 and 90 degrees from ``x``, class 1 at 90 and 180
    degrees; with ``gamma = 1`` the class similarities are
    ``softmax(1, 0) . (1, 0) = 0.7311`` and ``softmax(0, -1) . (0, -1) = -0.2689``:

    >>> import jax.numpy as jnp, metric_jax as mj
    >>> centers = jnp.array([[[1., 0.], [0., 1.]], [[0., -1.], [-1., 0.]]])  # [C=2, K=2, D=2]
    >>> emb = jnp.array([[2., 0.]])
    >>> logits = mj.losses.soft_triple_logits(emb, centers, la=1.0, gamma=1.0)
    >>> [round(float(v), 4) for v in logits[0]]
    [0.7311, -0.2689]
    >>> logits = mj.losses.soft_triple_logits(emb, centers, jnp.array([0]), la=1.0,
    ...                                       gamma=1.0, margin=0.01)
    >>> [round(float(v), 4) for v in logits[0]]
    [0.7211, -0.2689]
  """
  _cls._check_logits_inputs(embeddings, centers, labels, name="centers", ndim=(2, 3))
  _checks.scalar(la, "la", positive=True)
  _checks.scalar(gamma, "gamma", positive=True)
  _checks.scalar(margin, "margin")
  w = _centers_3d(centers, centers_per_class)
  c, k, d = w.shape
  # Centre-major [K, C] column order: the soft maximum then reduces over a
  # strided axis and vectorises along the C classes (faster on CPU).
  w_kc = jnp.reshape(jnp.transpose(w, (1, 0, 2)), (k * c, d))
  sim = _cls._cosine(embeddings, w_kc).reshape(-1, k, c)
  class_sim = _soft_average(sim, jnp.asarray(1.0 / gamma, jnp.float32))
  if labels is None:
    return la * class_sim
  _cls._label_out_of_range(labels, c)
  return la * (class_sim - margin * _cls._one_hot(labels, c))


def soft_triple_loss(embeddings: jax.Array, labels: jax.Array,
                     ref_embeddings: jax.Array | None = None,
                     ref_labels: jax.Array | None = None, *,
                     centers: jax.Array, centers_per_class: int | None = None,
                     la: float = 20.0, gamma: float = 0.1, margin: float = 0.01,
                     reduction: str = "mean", where: jax.Array | None = None,
                     ref_where: jax.Array | None = None) -> jax.Array:
  r"""SoftTriple loss: softmax over soft-max class similarities.

  With ``K`` centres ``w_ck`` per class and cosine similarities::

    S_ic = sum_k  e^{cos(x_i, w_ck)/gamma} / sum_k' e^{cos(x_i, w_ck')/gamma}  * cos(x_i, w_ck)
    l_i  = -log( e^{la (S_{i y_i} - delta)} /
                 (e^{la (S_{i y_i} - delta)} + sum_{c != y_i} e^{la S_ic}) )

  Defaults (K = 10, la = 20, gamma = 0.1, delta = 0.01, mean over samples)
  reproduce PML's ``SoftTripleLoss(num_classes, embedding_size)`` with
  ``centers = fc.T`` (``[C*K, D]``, row ``c*K + k``). The paper's optional
  regulariser merging similar centres (tau) is not part of this loss (PML's
  default has none either).

  Args:
    embeddings: [B, D] float (f32, bf16, f16; computed in f32).
    labels: [B] integer class labels in ``[0, C)``.
    ref_embeddings: not supported (raises).
    ref_labels: not supported (raises).
    centers: [C, K, D] (K inferred) or [C*K, D] float centres (see
      :func:`init_soft_triple`).
    centers_per_class: K for the flat layout (default 10).
    la: lambda, logit scale > 0.
    gamma: temperature of the soft maximum over a class's centres, > 0.
    margin: delta.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Qian, Shang, Sun, Hu, Li, Jin, "SoftTriple Loss: Deep Metric Learning
    Without Triplet Sampling", ICCV 2019, arXiv 1909.05235.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0., 2.]])
    >>> centers = jnp.array([[[1., 0.], [0.6, 0.8]], [[0., 1.], [-0.6, 0.8]]])
    >>> loss = mj.losses.soft_triple_loss(emb, jnp.array([0, 1]), centers=centers, la=4.0)
    >>> round(float(loss), 4)
    0.217
  """
  x = _cls._prepare_classification(embeddings, labels, where, ref_embeddings, ref_labels,
                                   ref_where, reduction, "soft_triple_loss")
  _cls._check_params(centers, "centers", embeddings, ndim=(2, 3))
  num_classes = _centers_3d(centers, centers_per_class).shape[0]
  bad = _cls._label_out_of_range(labels, num_classes, where)
  logits = soft_triple_logits(x, centers, _cls._masked_labels(labels, where),
                              centers_per_class=centers_per_class, la=la, gamma=gamma,
                              margin=margin)
  return _cls._finish(_cls._cross_entropy(logits, labels), where, bad, reduction)
