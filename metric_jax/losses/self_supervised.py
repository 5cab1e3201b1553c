"""Self-supervised losses: a two-view wrapper for any embedding loss, and
VICReg."""

from __future__ import annotations

__all__ = ["selfsupervised", "vicreg_loss"]

from typing import Callable

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib


def _check_views(view_a, view_b, where) -> None:
  _checks.embeddings(view_a, "view_a")
  _checks.embeddings(view_b, "view_b")
  if view_a.shape != view_b.shape:
    raise ValueError(f"`view_a` and `view_b` must have the same shape [N, D] (row i of "
                     f"both is the same instance), got {view_a.shape} and {view_b.shape}.")
  _checks.mask(where, (view_a.shape[0],), "where")


def selfsupervised(loss_fn: Callable[..., jax.Array], *,
                   symmetric: bool = True) -> Callable[..., jax.Array]:
  r"""Turns an embedding loss into a two-view (SimCLR-style) loss.

  Row i of ``view_a`` and row i of ``view_b`` are two augmentations of the
  same instance, so both get label i (``labels = arange(N)``):

  * ``symmetric=True``: ``loss_fn(concat(view_a, view_b), concat(l, l))``;
    every one of the 2N rows is an anchor whose only positive is its other
    view (with NT-Xent this is SimCLR's symmetric loss).
  * ``symmetric=False``: ``loss_fn(view_a, l, ref_embeddings=view_b,
    ref_labels=l)``: anchors from ``view_a``, positives and negatives from
    ``view_b``.

  This is PML's ``SelfSupervisedLoss(loss, symmetric)`` (e.g. with
  ``NTXentLoss``). The wrapped loss must accept labels and, for
  ``symmetric=False``, a reference set.

  Args:
    loss_fn: an embedding loss ``loss_fn(embeddings, labels, ref_embeddings,
      ref_labels, **kw)``.
    symmetric: see above.

  Returns:
    ``fn(view_a [N, D], view_b [N, D], *, where=None, **kw) -> loss``;
    ``where`` [N] bool masks instances (both views), ``kw`` goes to
    ``loss_fn``.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> two_view = mj.losses.selfsupervised(mj.losses.contrastive_loss)
    >>> a = jnp.array([[1., 0.], [0., 1.]])
    >>> round(float(two_view(a, a + 0.1, neg_margin=2.0)), 4)
    0.7237
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")

  def two_view_loss(view_a: jax.Array, view_b: jax.Array, *,
                    where: jax.Array | None = None, **kw) -> jax.Array:
    _check_views(view_a, view_b, where)
    for name in ("labels", "ref_embeddings", "ref_labels", "ref_where"):
      if name in kw:
        raise ValueError(f"`{name}` is set by the self-supervised wrapper (labels = "
                         f"arange(N)); do not pass it.")
    n = view_a.shape[0]
    labels = jnp.arange(n, dtype=jnp.int32)
    if symmetric:
      emb = jnp.concatenate([view_a, view_b.astype(view_a.dtype)], axis=0)
      both = None if where is None else jnp.concatenate([where, where])
      return loss_fn(emb, jnp.concatenate([labels, labels]), where=both, **kw)
    return loss_fn(view_a, labels, view_b, labels, where=where, ref_where=where, **kw)

  inner = getattr(loss_fn, "__name__", type(loss_fn).__name__)
  two_view_loss.__name__ = two_view_loss.__qualname__ = f"selfsupervised_{inner}"
  two_view_loss.__doc__ = (f"Two-view ({'symmetric' if symmetric else 'asymmetric'}) "
                           f"version of {inner}: fn(view_a, view_b, *, where=None, **kw).")
  return two_view_loss


def vicreg_loss(view_a: jax.Array, view_b: jax.Array, *,
                invariance_weight: float = 25.0, variance_weight: float = 25.0,
                covariance_weight: float = 1.0, eps: float = 1e-4,
                where: jax.Array | None = None) -> jax.Array:
  r"""VICReg: variance-invariance-covariance regularisation of two views.

  For views ``Z, Z'`` ([N, D]) with unbiased per-dimension variances and
  covariances (divisor N - 1)::

    s(Z, Z') = 1/(N D) sum_i ||z_i - z'_i||^2
    v(Z)     = 1/D sum_d [1 - sqrt(Var(z_{.d}) + eps)]_+
    c(Z)     = 1/D sum_{d != e} Cov(Z)_{de}^2
    L = lambda s(Z, Z') + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z'))

  As in the authors' code and PML's ``VICRegLoss`` the variance term is the
  **average** of the two views' terms (the paper writes their sum). Defaults
  lambda = mu = 25, nu = 1, eps = 1e-4 reproduce PML's
  ``VICRegLoss()(view_a, ref_emb=view_b)``.

  Args:
    view_a: [N, D] float, first view (f32, bf16, f16; computed in f32).
    view_b: [N, D] float, second view (row i = same instance as in ``view_a``).
    invariance_weight: lambda.
    variance_weight: mu.
    covariance_weight: nu.
    eps: added to the variance inside the square root, > 0.
    where: [N] bool validity of the instances; statistics use the valid rows
      only (N becomes their count; fewer than two valid rows use divisor 1).

  Returns:
    Scalar float32 loss.

  References:
    Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance
    Regularization for Self-Supervised Learning", ICLR 2022, arXiv 2105.04906.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> a = jnp.array([[1., 0.], [0., 1.], [-1., -1.]])
    >>> round(float(mj.losses.vicreg_loss(a, a * 1.1)), 4)
    0.7827
  """
  _check_views(view_a, view_b, where)
  _checks.scalar(invariance_weight, "invariance_weight")
  _checks.scalar(variance_weight, "variance_weight")
  _checks.scalar(covariance_weight, "covariance_weight")
  _checks.scalar(eps, "eps", positive=True)
  n, d = view_a.shape
  a = view_a.astype(jnp.float32)
  b = view_b.astype(jnp.float32)
  if where is None:
    valid = jnp.ones((n,), bool)
  else:
    valid = where
    a = jnp.where(valid[:, None], a, 0.0)
    b = jnp.where(valid[:, None], b, 0.0)
  count = jnp.sum(valid).astype(jnp.float32)
  w = valid.astype(jnp.float32)[:, None]

  invariance = jnp.sum(w * jnp.square(a - b)) / (jnp.maximum(count, 1.0) * d)

  def centred(z):
    mean = jnp.sum(w * z, axis=0) / jnp.maximum(count, 1.0)
    return w * (z - mean)

  def variance_term(zc):
    var = jnp.sum(zc * zc, axis=0) / jnp.maximum(count - 1.0, 1.0)
    return jnp.mean(jax.nn.relu(1.0 - jnp.sqrt(var + eps)))

  def covariance_term(zc):
    cov = jnp.matmul(zc.T, zc, precision=distances_lib._PRECISION)  # pylint: disable=protected-access
    cov = cov / jnp.maximum(count - 1.0, 1.0)
    off = jnp.where(jnp.eye(d, dtype=bool), 0.0, cov)
    return jnp.sum(off * off) / d

  ac, bc = centred(a), centred(b)
  variance = 0.5 * (variance_term(ac) + variance_term(bc))
  covariance = covariance_term(ac) + covariance_term(bc)
  total = (invariance_weight * invariance + variance_weight * variance
           + covariance_weight * covariance)
  return jnp.where(count > 0, total, 0.0)
