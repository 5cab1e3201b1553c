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

REDUCTIONS = ("mean", "mean_nonzero", "sum", "none")


def check(reduction: str, allowed=REDUCTIONS) -> None:
  """Raises a ValueError naming ``reduction`` if it is not allowed."""
  _checks.choice(reduction, allowed, "reduction")


def _valid(terms: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.ones(terms.shape, bool)
  return jnp.broadcast_to(mask, terms.shape)


def reduce(terms: jax.Array, mask: jax.Array | None = None,
           reduction: str = "mean") -> jax.Array:
  """Reduces loss terms over the entries where ``mask`` is True.

  Args:
    terms: array of per-term losses, any shape.
    mask: bool array broadcastable to ``terms``; None means all valid.
    reduction: one of :data:`REDUCTIONS`.

  Returns:
    A float32 scalar, or for ``"none"`` the float32 terms with invalid
    entries zeroed.
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
  if reduction == "mean":
    count = jnp.sum(valid)
  else:  # mean_nonzero
    count = jnp.sum(valid & (terms > 0))
  return total / jnp.maximum(count, 1).astype(jnp.float32)


def keep_nan(result: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
  """Makes ``result`` NaN if any ``values`` under ``mask`` is NaN.

  For losses whose selection step (comparisons, argmin) would otherwise
  silently drop NaN entries. Adds ``0 * sum(masked values)``, which leaves
  finite results and all gradients unchanged.
  """
  probe = jnp.sum(jnp.where(mask, values, 0.0))
  return result + 0.0 * jax.lax.stop_gradient(probe)


def reduce_parts(parts, reduction: str) -> jax.Array:
  """Reduces several sub-losses separately and adds them (PML's
  MultipleReducers).

  Args:
    parts: sequence of ``(terms, mask)``; all of one shape for ``"none"``.
    reduction: one of :data:`REDUCTIONS`.

  Returns:
    Scalar sum of the reduced parts, or for ``"none"`` the sum of the
    zero-filled term arrays.
  """
  return sum(reduce(t, m, reduction) for t, m in parts)


def per_anchor_mean(terms: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean over valid columns of each row.

  Args:
    terms: [B, M] terms.
    mask: [B, M] bool.

  Returns:
    ``(row_means [B], row_has_any [B])``; empty rows give 0.
  """
  terms = terms.astype(jnp.float32)
  count = jnp.sum(mask, axis=-1)
  total = jnp.sum(jnp.where(mask, terms, 0.0), axis=-1)
  return total / jnp.maximum(count, 1).astype(jnp.float32), count > 0


def masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int = -1,
                     include_zero: bool = False) -> tuple[jax.Array, jax.Array]:
  """Stable ``log sum_{k: mask} exp(x_k)`` along ``axis``.

  The shift is ``stop_gradient(max)`` over the masked entries, and no ``inf``
  enters any arithmetic, so the gradient is finite everywhere.

  Args:
    x: float array.
    mask: bool array of the same shape.
    axis: reduction axis.
    include_zero: add a zero logit, i.e. ``log(1 + sum exp(x_k))``
      (softplus-type losses); then an empty set gives exactly 0.

  Returns:
    ``(lse, nonempty)``: ``lse`` has ``axis`` removed; for an empty set it is
    0 (its mathematical value is -inf with ``include_zero=False``: use
    ``nonempty`` to drop such rows). ``nonempty`` is True where the mask
    selects at least one entry.
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

  Returns:
    ``(max, nonempty)`` with ``axis`` removed.
  """
  x = x.astype(jnp.float32)
  nonempty = jnp.any(mask, axis=axis)
  fill = jnp.finfo(jnp.float32).min
  value = jnp.max(jnp.where(mask, x, fill), axis=axis)
  return jnp.where(nonempty, value, 0.0), nonempty


def masked_min(x: jax.Array, mask: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """Minimum over masked entries; 0 and ``nonempty=False`` for empty sets.

  Returns:
    ``(min, nonempty)`` with ``axis`` removed.
  """
  value, nonempty = masked_max(-x, mask, axis)
  return -value, nonempty
