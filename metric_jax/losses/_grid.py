"""Per-anchor positive grids, shared by the losses whose terms range over
(anchor, positive, negative) triplets (triplet batch-all and semi-hard band,
angular).

Such a loss needs, per anchor, a [P, M] grid of its positives against every
reference. With P a static bound on the positives of any anchor (K - 1 in a
PK batch) the grid is [B, P, M] instead of [B, M, M]:

* :func:`first_positive_columns` finds each anchor's first P positive
  columns;
* :func:`smallest_fitting_grid` picks, at run time, the smallest P of a
  ladder of static sizes that holds every anchor's positives, and a
  fallback when none does;
* :func:`over_anchors` evaluates a grid larger than :data:`GRID_ELEMENTS`
  entries in tiles of anchors; :func:`over_every_anchor` picks it or the
  one-piece evaluation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

# Largest [B, P, M] grid evaluated in one piece on CPU (2 MiB per float32
# buffer). XLA:CPU plans one scratch buffer for every branch of the grid
# choice; past 32 MiB glibc maps it afresh on every call and each page
# touched faults, so larger grids go in tiles of anchors (angular at
# B = 512: 12 -> 4 ms). Accelerators evaluate every grid in one piece.
GRID_ELEMENTS = 1 << 19


def in_one_piece(grid_elements: int) -> bool:
  """Whether a grid of ``grid_elements`` entries is evaluated whole (else
  :func:`over_anchors`): always off CPU, up to :data:`GRID_ELEMENTS` on it."""
  return jax.default_backend() != "cpu" or grid_elements <= GRID_ELEMENTS


def positive_counts(pos: jax.Array) -> jax.Array:
  """[B] float32 number of positives of each row of the [B, M] bool ``pos``
  (exact up to 2^24 columns; XLA:CPU runs integer reductions as separate,
  much slower passes)."""
  return jnp.sum(pos, axis=1, dtype=jnp.float32)


def first_positive_columns(pos: jax.Array, p: int) -> tuple[jax.Array, jax.Array]:
  """The lowest ``p`` positive columns of each row.

  Found by ``p`` masked max-reductions (``top_k``, ``argsort``, ``cumsum``
  and ``argmax`` are much slower on CPU), in float32 (column numbers are
  exact below 2^24; integer reductions are slower on CPU): slot k holds the
  first positive column after slot k - 1.

  Args:
    pos: [B, M] bool positive mask.
    p: static number of slots (1 <= p <= M).

  Returns:
    ``(index, valid)``: [B, p] int32 ascending column indices and [B, p]
    bool, False for slots past the row's last positive (their index is
    M - 1, a valid column to gather from, to be masked out).
  """
  b, m = pos.shape
  if p == 0:
    return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)
  cols = jnp.arange(m, dtype=jnp.float32)[None, :]
  slots, last = [], jnp.full((b, 1), -1.0, jnp.float32)
  for _ in range(p):
    last = -jnp.max(jnp.where(pos & (cols > last), -cols, -float(m)), axis=1, keepdims=True)
    slots.append(jnp.minimum(last, m - 1))
  index = jnp.concatenate(slots, axis=1).astype(jnp.int32)
  valid = positive_counts(pos)[:, None] > jnp.arange(p, dtype=jnp.float32)[None, :]
  return index, valid


def smallest_fitting_grid(sizes: Sequence[int], m: int, most: jax.Array,
                          grid: Callable[[int], jax.Array],
                          fallback: Callable[[], jax.Array]) -> jax.Array:
  """``grid(p)`` for the smallest static ``p`` in ``sizes`` with
  ``most <= p``; ``fallback()`` when ``most`` exceeds them all.

  A chain of ``lax.cond``. The backward pass of a plain ``cond`` keeps
  zero-filled residuals of every branch, so every branch but the smallest
  grid is rematerialised (``jax.checkpoint``): the common case (a PK batch
  fits the smallest grid) keeps its residuals and is not recomputed, and
  the zero-filled residuals are never bigger than the smallest grid's.
  An anchor never has more than M positives: when
  M <= max(sizes), ``grid(M)`` is returned without a branch (a small grid).

  Args:
    sizes: static grid sizes, e.g. ``(4, 8, 16)``.
    m: number of reference columns M (static).
    most: scalar, the largest number of positives of any anchor.
    grid: ``grid(p) -> result`` on a [B, p, M] grid.
    fallback: ``fallback() -> result`` for anchors with more positives.

  Returns:
    The result of the chosen branch.
  """
  if m <= max(sizes):
    return grid(m)
  steps = sorted(sizes)

  def chain(i):
    if i == len(steps):
      return fallback()
    this = lambda: grid(steps[i])
    return jax.lax.cond(most <= steps[i], this if i == 0 else jax.checkpoint(this),
                        jax.checkpoint(lambda: chain(i + 1)))

  return chain(0)


def over_anchors(per_anchor: Callable, rows: Sequence[jax.Array], row_elements: int):
  """``per_anchor`` over the anchors in tiles of about :data:`GRID_ELEMENTS`
  grid entries, for grids too large to evaluate in one piece.

  Args:
    per_anchor: ``per_anchor(*row_slices)`` for one anchor, each argument
      its row of ``rows`` with a leading axis of 1; returns a pytree of
      arrays whose leading axis is 1.
    rows: arrays with leading axis B.
    row_elements: grid entries of one anchor (e.g. P M).

  Returns:
    The results with leading axis B. Tiles are ``jax.lax.map`` batches of
    checkpointed single-anchor calls: the backward pass recomputes each tile
    instead of storing the whole grid.
  """
  @jax.checkpoint
  def one(args):   # one anchor; lax.map vmaps it over a tile
    return jax.tree.map(lambda v: v[0], per_anchor(*(v[None] for v in args)))

  return jax.lax.map(one, tuple(rows), batch_size=max(1, GRID_ELEMENTS // max(row_elements, 1)))


def over_every_anchor(per_anchor: Callable, rows: Sequence[jax.Array], row_elements: int):
  """``per_anchor(*rows)`` for every anchor at once when the whole grid
  (B x ``row_elements`` entries) may be evaluated in one piece
  (:func:`in_one_piece`), else :func:`over_anchors` (same arguments, same
  result)."""
  if in_one_piece(rows[0].shape[0] * row_elements):
    return per_anchor(*rows)
  return over_anchors(per_anchor, rows, row_elements)
