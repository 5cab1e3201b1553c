"""Reductions and masked statistics: the one place every loss reduces.

Reductions (``reduction=`` argument of every loss):

================== ==========================================================
``"mean"``         ``sum(valid terms) / max(#valid, 1)`` (PML MeanReducer)
``"mean_nonzero"`` ``sum(valid terms) / max(#{valid terms > 0}, 1)``
                   (PML AvgNonZeroReducer; Hermans et al. "BA != 0")
``"sum"``          ``sum(valid terms)``
``"none"``         the terms with invalid entries set to 0, unreduced
================== ==========================================================

An empty selection gives exactly 0 with a zero (finite) gradient. Terms are
accumulated in float32.

Masked statistics (:func:`masked_logsumexp`, :func:`masked_max`,
:func:`masked_min`) return a finite value and an ``any`` flag so callers can
drop empty rows instead of letting ``inf`` reach a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metric_jax import _checks

__all__ = ["REDUCTIONS", "check", "keep_nan", "masked_logsumexp", "masked_max", "masked_min",
           "per_anchor_mean", "reduce", "reduce_parts"]

REDUCTIONS = ("mean", "mean_nonzero", "sum", "none")
"""The ``reduction=`` values every loss accepts (see the module docstring)."""


def check(reduction: str, allowed=REDUCTIONS) -> None:
  """Raises a ValueError naming ``reduction`` if it is not allowed.

  Args:
    reduction: the requested reduction name.
    allowed: the accepted names; default :data:`REDUCTIONS`.

  Returns:
    None.

  Raises:
    ValueError: if ``reduction`` is not in ``allowed``.

  Example:
    >>> check("mean")
    >>> try:
    ...   check("max")
    ... except ValueError:
    ...   print("rejected")
    rejected
  """
  _checks.choice(reduction, allowed, "reduction")


def _valid(terms: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.ones(terms.shape, bool)
  return jnp.broadcast_to(mask, terms.shape)


def reduce(terms: jax.Array, mask: jax.Array | None = None,
           reduction: str = "mean") -> jax.Array:
  """Reduces loss terms over the entries where ``mask`` is True.

  With ``V`` the valid entries (``mask`` True)::

    mean:          sum_{k in V} t_k / max(|V|, 1)
    mean_nonzero:  sum_{k in V} t_k / max(|{k in V: t_k > 0}|, 1)
    sum:           sum_{k in V} t_k

  Args:
    terms: array of per-term losses, any shape.
    mask: bool array broadcastable to ``terms``; None (default) means all
      valid.
    reduction: one of :data:`REDUCTIONS`; default ``"mean"``.

  Returns:
    A float32 scalar, or for ``"none"`` the float32 terms with invalid
    entries zeroed.

  Example:
    >>> import jax.numpy as jnp
    >>> t, m = jnp.array([0., 2., 4., 6.]), jnp.array([True, True, True, False])
    >>> [reduce(t, m, r).item() for r in ("mean", "mean_nonzero", "sum")]
    [2.0, 3.0, 6.0]
    >>> reduce(t, m, "none").tolist()
    [0.0, 2.0, 4.0, 0.0]
  """
  check(reduction)
  terms = terms.astype(jnp.float32)
  valid = _valid(terms, mask)
  masked = jnp.where(valid, terms, 0.0)
  if reduction == "none":
    return masked
  total = jnp.sum(masked)
  if reduction == "sum":
    return total
  # Counted in float32: XLA:CPU reduces floats several times faster than
  # integers, and float32 counts are exact up to 2^24 terms.
  if reduction == "mean":
    count = jnp.sum(valid, dtype=jnp.float32)
  else:  # mean_nonzero
    count = jnp.sum(valid & (terms > 0), dtype=jnp.float32)
  return total / jnp.maximum(count, 1.0)


def keep_nan(result: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
  """Makes ``result`` NaN if any ``values`` under ``mask`` is NaN.

  For losses whose selection step (comparisons, argmin) would otherwise
  silently drop NaN entries. Adds ``0 * sum(masked values)``, which leaves
  finite results and all gradients unchanged.

  Args:
    result: the loss value (any shape broadcastable with a scalar).
    values: array whose masked entries are probed for NaN.
    mask: bool array broadcastable to ``values``.

  Returns:
    ``result`` (same shape), NaN where a masked value is NaN.

  Example:
    >>> import jax.numpy as jnp
    >>> v = jnp.array([1., jnp.nan])
    >>> keep_nan(jnp.float32(3.), v, jnp.array([True, False])).item()
    3.0
    >>> bool(jnp.isnan(keep_nan(jnp.float32(3.), v, jnp.array([True, True]))))
    True
  """
  probe = jnp.sum(jnp.where(mask, values, 0.0))
  return result + 0.0 * jax.lax.stop_gradient(probe)


def reduce_parts(parts, reduction: str) -> jax.Array:
  """Reduces several sub-losses separately and adds them (PML's
  MultipleReducers).

  ``reduce_parts(parts, r) = sum_p reduce(terms_p, mask_p, r)``.

  Args:
    parts: sequence of ``(terms, mask)`` pairs (``mask`` may be None); all of
      one shape for ``"none"``.
    reduction: one of :data:`REDUCTIONS`.

  Returns:
    Scalar sum of the reduced parts, or for ``"none"`` the sum of the
    zero-filled term arrays.

  Example:
    >>> import jax.numpy as jnp
    >>> pos = (jnp.array([1., 3.]), None)
    >>> neg = (jnp.array([0., 4.]), jnp.array([True, True]))
    >>> reduce_parts([pos, neg], "mean").item()
    4.0
  """
  return sum(reduce(t, m, reduction) for t, m in parts)


def per_anchor_mean(terms: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean over valid columns of each row:
  ``row_means_i = sum_j mask_ij t_ij / max(sum_j mask_ij, 1)``.

  Args:
    terms: [B, M] terms.
    mask: [B, M] bool.

  Returns:
    ``(row_means [B] float32, row_has_any [B] bool)``; empty rows give 0.

  Example:
    >>> import jax.numpy as jnp
    >>> means, has_any = per_anchor_mean(jnp.array([[1., 3.], [5., 7.]]),
    ...                                  jnp.array([[True, True], [False, False]]))
    >>> means.tolist(), has_any.tolist()
    ([2.0, 0.0], [True, False])
  """
  terms = terms.astype(jnp.float32)
  count = jnp.sum(mask, axis=-1, dtype=jnp.float32)
  total = jnp.sum(jnp.where(mask, terms, 0.0), axis=-1)
  return total / jnp.maximum(count, 1.0), count > 0


def masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int = -1,
                     include_zero: bool = False) -> tuple[jax.Array, jax.Array]:
  """Stable ``log sum_{k: mask} exp(x_k)`` along ``axis``.

  The shift is ``stop_gradient(max)`` over the masked entries, and no ``inf``
  enters any arithmetic, so the gradient is finite everywhere.

  With ``m = stop_gradient(max_{k: mask} x_k)`` (and ``max(m, 0)`` with
  ``include_zero``)::

    lse = m + log(sum_{k: mask} exp(x_k - m) [+ exp(-m)])

  Args:
    x: float array, any shape.
    mask: bool array of the same shape.
    axis: reduction axis; default -1.
    include_zero: add a zero logit, i.e. ``log(1 + sum exp(x_k))``
      (softplus-type losses); then an empty set gives exactly 0. Default
      False.

  Returns:
    ``(lse, nonempty)``: ``lse`` has ``axis`` removed; for an empty set it is
    0 (its mathematical value is -inf with ``include_zero=False``: use
    ``nonempty`` to drop such rows). ``nonempty`` is True where the mask
    selects at least one entry.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0., 0., 5.], [1., 2., 3.]])
    >>> mask = jnp.array([[True, True, False], [False, False, False]])
    >>> lse, nonempty = masked_logsumexp(x, mask)
    >>> [round(v, 4) for v in lse.tolist()], nonempty.tolist()
    ([0.6931, 0.0], [True, False])
    >>> [round(v, 4) for v in masked_logsumexp(x, mask, include_zero=True)[0].tolist()]
    [1.0986, 0.0]
  """
  x = x.astype(jnp.float32)
  nonempty = jnp.any(mask, axis=axis)
  shift = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
  if include_zero:
    shift = jnp.maximum(shift, 0.0)
  shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
  total = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, x - shift, 0.0)), 0.0),
                  axis=axis, keepdims=True)
  if include_zero:
    total = total + jnp.exp(-shift)
  # Empty sets (total 0) get log(1) = 0; NaN inputs stay NaN.
  safe_total = jnp.where((total > 0) | jnp.isnan(total), total, 1.0)
  lse = jnp.squeeze(jnp.log(safe_total) + shift, axis=axis)
  if include_zero:
    return lse, nonempty
  return jnp.where(nonempty, lse, 0.0), nonempty


def masked_max(x: jax.Array, mask: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """Maximum over masked entries; 0 and ``nonempty=False`` for empty sets.

  ``max = max_{k: mask_k} x_k`` along ``axis``, computed in float32.

  Args:
    x: float array, any shape.
    mask: bool array of the same shape.
    axis: reduction axis; default -1.

  Returns:
    ``(max, nonempty)`` with ``axis`` removed (float32 and bool).

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1., 9., 3.], [4., 5., 6.]])
    >>> mask = jnp.array([[True, False, True], [False, False, False]])
    >>> value, nonempty = masked_max(x, mask)
    >>> value.tolist(), nonempty.tolist()
    ([3.0, 0.0], [True, False])
  """
  x = x.astype(jnp.float32)
  nonempty = jnp.any(mask, axis=axis)
  fill = jnp.finfo(jnp.float32).min
  value = jnp.max(jnp.where(mask, x, fill), axis=axis)
  return jnp.where(nonempty, value, 0.0), nonempty


def masked_min(x: jax.Array, mask: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """Minimum over masked entries; 0 and ``nonempty=False`` for empty sets.

  ``min = min_{k: mask_k} x_k = -masked_max(-x)`` along ``axis``, in float32.

  Args:
    x: float array, any shape.
    mask: bool array of the same shape.
    axis: reduction axis; default -1.

  Returns:
    ``(min, nonempty)`` with ``axis`` removed (float32 and bool).

  Example:
    >>> import jax.numpy as jnp
    >>> value, nonempty = masked_min(jnp.array([[1., 9., 3.]]), jnp.array([[False, True, True]]))
    >>> value.tolist(), nonempty.tolist()
    ([3.0], [True])
  """
  value, nonempty = masked_max(-x, mask, axis)
  return -value, nonempty
