"""The streaming engine: column tiles, online statistics, a custom VJP that
recomputes tiles in the backward pass, and the sharded-axis context.

A streamed loss is written as a *tile function*
``fn(rows, cols) -> (sums, lses)`` that sees every anchor (``rows``, leading
axis B) against one tile of T references (``cols``, leading axis T):

* ``sums``: a pytree of per-anchor partial sums over the tile's columns
  (shape [B, ...]); the engine adds them over tiles.
* ``lses``: a tuple of :class:`Lse` ``(logits [B, ..., T], mask [B, ..., T])``;
  the engine reduces each to ``log sum_{mask} exp(logits)`` over all columns
  with an online log-sum-exp (running max, rescaled running sum); an empty
  set gives 0, like :func:`metric_jax.reductions.masked_logsumexp`.

:func:`stream` returns the totals. Its derivative is a ``jax.custom_vjp``:
the forward pass keeps only the inputs and the final log-sum-exps, and the
backward pass walks the tiles again, recomputing each tile and pulling the
cotangents back through it with ``jax.vjp``. Since
``d LSE_i / d z_ij = mask_ij exp(z_ij - LSE_i)``, the recomputed tile uses the
*final* LSE as a constant shift, so no running statistics are replayed. Peak
memory is O(B T) per tile plus O((B + M) D) for inputs and gradients; the
[B, M] matrix never exists.

Anything ``fn`` closes over (margins, temperatures, the parameters of a
learned metric) is hoisted with ``jax.closure_convert`` and differentiated
like the explicit inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import reductions

# Default budget of one tile, in [B, T] float32 elements (64 MiB): about 128
# columns at B = 32k, the whole matrix for B <= 2k.
TILE_ELEMENTS = 1 << 24
_MIN_TILE = 16


# On CPU, dense losses with a streamed twin hand problems of at least this
# many [B, M] entries to it, in tiles of about ROUTE_TILE_ELEMENTS (2 MiB per
# float32 block). XLA:CPU plans one scratch buffer per call; past 32 MiB
# (a few [2048, 2048] blocks) glibc maps it afresh on every call and each
# page touched faults: tiles keep it small (NCA at B = 2048: 51-57 -> 33 ms).
# Accelerators keep the dense path (small tiles would serialise them).
ROUTE_MIN_ELEMENTS = 1 << 21
ROUTE_TILE_ELEMENTS = 1 << 19


def routed_tile(embeddings, ref_embeddings=None) -> int | None:
  """Columns per tile when a dense loss of ``embeddings`` [B, D] against
  ``ref_embeddings`` [M, D] (or itself) should be streamed, or None to
  compute it densely (see :data:`ROUTE_MIN_ELEMENTS`; malformed inputs stay
  dense, whose checks name the problem; only on the CPU backend)."""
  if jax.default_backend() != "cpu":
    return None
  shapes = [np.shape(embeddings), np.shape(embeddings if ref_embeddings is None
                                          else ref_embeddings)]
  if any(len(shape) != 2 for shape in shapes):
    return None
  b, m = shapes[0][0], shapes[1][0]
  if b * m < ROUTE_MIN_ELEMENTS:
    return None
  tile = ROUTE_TILE_ELEMENTS // b
  # Past 2^19 / 16 = 32k anchors, the streaming default (64 MiB blocks).
  return min(m, tile) if tile >= _MIN_TILE else default_tile(b, m)


def routed_symmetric_tile(embeddings, ref_embeddings, pair_mask, distance) -> int | None:
  """:func:`routed_tile` for the dense losses that hand over only what their
  streamed twin computes with the symmetric backward pass (``stream(...,
  symmetric=True)``): the batch against itself, no pair mask, a built-in
  metric. Otherwise None (dense)."""
  if ref_embeddings is not None or pair_mask is not None or not isinstance(distance, str):
    return None
  return routed_tile(embeddings)


class Lse(NamedTuple):
  """A masked log-sum-exp over the columns of a tile.

  logits: [B, ..., T] float; mask: [B, ..., T] bool (True = member).
  """
  logits: jax.Array
  mask: jax.Array


def default_tile(b: int, m: int, per_column: int = 1) -> int:
  """Columns per tile so that a [b, per_column, T] float32 block stays
  within :data:`TILE_ELEMENTS`."""
  t = TILE_ELEMENTS // max(b * per_column, 1)
  return int(max(1, min(m, max(t, _MIN_TILE))))


def check_tile(tile_size: Any) -> None:
  if tile_size is not None:
    _checks.positive_int(tile_size, "tile_size")


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _pad_and_tile(cols: Any, tile: int) -> tuple[Any, int]:
  """Pads every leaf along axis 0 to a multiple of ``tile`` (zeros, False)
  and reshapes to [n_tiles, tile, ...]."""
  leaves = jax.tree.leaves(cols)
  m = leaves[0].shape[0]
  n_tiles = max(1, -(-m // tile))
  pad = n_tiles * tile - m

  def one(a):
    a = jnp.asarray(a)
    if pad:
      a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)
    return a.reshape((n_tiles, tile) + a.shape[1:])

  return jax.tree.map(one, cols), n_tiles


def _lse_final(m: jax.Array, s: jax.Array) -> jax.Array:
  """``m + log s``; 0 for an empty set (``m == -inf``); NaN stays NaN."""
  empty = m == -jnp.inf
  return jnp.where(empty, 0.0, jnp.where(empty, 0.0, m) + jnp.log(jnp.where(empty, 1.0, s)))


def _online_update(m, s, lse: Lse):
  x = lse.logits.astype(jnp.float32)
  mask = lse.mask
  t_max = jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1)
  new_m = jnp.maximum(m, t_max)              # NaN propagates
  shift = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
  scale = jnp.where(m == -jnp.inf, 0.0, jnp.exp(jnp.where(m == -jnp.inf, 0.0, m) - shift))
  add = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, x - shift[..., None], 0.0)), 0.0),
                axis=-1)
  return new_m, s * scale + add


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)             # JAX <= 0.8 naming
  if vma is None:
    vma = getattr(getattr(aval, "mat", None), "varying", None)
  return frozenset(vma or ())


def _vma(*trees) -> tuple:
  """Manual mesh axes along which any leaf varies (inside ``shard_map``)."""
  axes = set()
  for leaf in jax.tree.leaves(trees):
    axes |= _varying_axes(leaf)
  return tuple(sorted(axes))


def _vary(tree, axes: tuple):
  """Marks a scan's initial carry as varying along ``axes`` (its body output
  is, as soon as one input is)."""
  if not axes:
    return tree

  def one(a):
    missing = tuple(ax for ax in axes if ax not in _varying_axes(a))
    return jax.lax.pcast(a, missing, to="varying") if missing else a

  return jax.tree.map(one, tree)


def _as_f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a).astype(jnp.float32), tree)


def _forward(fn, rd, rn, cd, cn, consts):
  tile0 = jax.tree.map(lambda a: a[0], (cd, cn))
  shapes = jax.eval_shape(lambda a, b, c, d, k: fn(a, b, c, d, *k), rd, rn, *tile0, consts)
  sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes[0])
  stats0 = tuple((jnp.full(l.logits.shape[:-1], -jnp.inf, jnp.float32),
                  jnp.zeros(l.logits.shape[:-1], jnp.float32)) for l in shapes[1])

  def body(carry, tile):
    sums, stats = carry
    t_sums, t_lses = fn(rd, rn, tile[0], tile[1], *consts)
    sums = jax.tree.map(jnp.add, sums, _as_f32(t_sums))
    stats = tuple(_online_update(m, s, l) for (m, s), l in zip(stats, t_lses))
    return (sums, stats), None

  init = _vary((sums0, stats0), _vma(rd, rn, cd, cn, consts))
  (sums, stats), _ = jax.lax.scan(body, init, (cd, cn))
  return sums, tuple(_lse_final(m, s) for m, s in stats)


def _lse_direct(lse: Lse) -> jax.Array:
  """Masked log-sum-exp of one tile (a stop-gradient shift, 0 if empty)."""
  x = lse.logits.astype(jnp.float32)
  mask = lse.mask
  m = jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1)
  empty = m == -jnp.inf
  shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  total = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, x - shift[..., None], 0.0)), 0.0),
                  axis=-1)
  return jnp.where(empty, 0.0, shift + jnp.log(jnp.where(empty, 1.0, total)))


def _float_consts(consts):
  flags = [_is_float(k) for k in consts]
  return flags, [k for f, k in zip(flags, consts) if f]


def _with_float_consts(flags, consts, kd):
  it = iter(kd)
  return [next(it) if f else k for f, k in zip(flags, consts)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stream(fn, symmetric, rd, rn, cd, cn, consts):
  del symmetric
  return _forward(fn, rd, rn, cd, cn, consts)


def _stream_fwd(fn, symmetric, rd, rn, cd, cn, consts):
  del symmetric
  n_tiles = jax.tree.leaves((cd, cn))[0].shape[0]
  flags, kd0 = _float_consts(consts)
  if n_tiles == 1:
    # A single tile: its residuals are no bigger than the tile budget, so
    # keep them (plain autodiff) instead of recomputing the tile.
    def whole(rd_, cd_, kd_):
      sums, lses = fn(rd_, rn, [a[0] for a in cd_], [a[0] for a in cn],
                      *_with_float_consts(flags, consts, kd_))
      return _as_f32(sums), tuple(_lse_direct(l) for l in lses)

    out, vjp_fn = jax.vjp(whole, rd, cd, kd0)
    return out, (vjp_fn, (rn, cn, consts))
  out = _forward(fn, rd, rn, cd, cn, consts)
  return out, (None, (rd, rn, cd, cn, consts, out[1]))


def _none_like(tree):
  return jax.tree.map(lambda _: None, tree)


def _stream_bwd(fn, symmetric, res, g):
  vjp_fn, rest = res
  if vjp_fn is not None:
    rn, cn, consts = rest
    flags, _ = _float_consts(consts)
    r_bar, c_bar, k_bar = vjp_fn(g)
    it = iter(k_bar)
    return (r_bar, _none_like(rn), c_bar, _none_like(cn),
            [next(it) if f else None for f in flags])

  rd, rn, cd, cn, consts, lse_vals = rest
  g_sums, g_lse = g
  if symmetric:
    return _symmetric_bwd(fn, rd, rn, cd, cn, consts, lse_vals, g_sums, g_lse)
  flags, kd0 = _float_consts(consts)

  def recompute(rd_, cd_t, kd, cn_t):
    sums, lses = fn(rd_, rn, cd_t, cn_t, *_with_float_consts(flags, consts, kd))
    # d LSE / d z = mask exp(z - LSE): the derivative of this sum at the
    # final (constant) LSE.
    parts = tuple(
        jnp.sum(jnp.where(l.mask, jnp.exp(jnp.where(
            l.mask, l.logits.astype(jnp.float32) - v[..., None], 0.0)), 0.0), axis=-1)
        for l, v in zip(lses, lse_vals))
    return _as_f32(sums), parts

  def body(carry, tile):
    cd_t, cn_t = tile
    _, vjp = jax.vjp(lambda a, b, c: recompute(a, b, c, cn_t), rd, cd_t, kd0)
    r_bar, c_bar, k_bar = vjp((g_sums, g_lse))
    carry = jax.tree.map(jnp.add, carry, (r_bar, k_bar))
    return carry, c_bar

  # Each accumulated cotangent varies exactly as its primal does.
  zeros = jax.tree.map(lambda a: _vary(jnp.zeros_like(a), _vma(a)), (rd, kd0))
  (r_bar, k_bar), c_bar = jax.lax.scan(body, zeros, (cd, cn))
  it = iter(k_bar)
  consts_bar = [next(it) if f else None for f in flags]
  return r_bar, _none_like(rn), c_bar, _none_like(cn), consts_bar


def _symmetric_bwd(fn, rd, rn, cd, cn, consts, lse_vals, g_sums, g_lse):
  """The backward pass of a symmetric stream (see :func:`stream`).

  On the tile of columns T, row i's log-sum-exp k gives its logits the
  cotangent ``G_iT = c_i mask exp(z_iT - LSE_i)``; as ``z`` and the masks
  are symmetric, the transposed block ``G_Ti^T`` is
  ``c_T mask exp(z_iT - LSE_T)`` with the columns' own statistics: the sum
  ``G + G^T`` is formed element by element and pulled back through the rows
  alone, which is the whole embedding gradient (the columns' role mirrors
  the rows'). One product per tile instead of two; the constants' cotangent
  is half of that pull-back. The sums must reach the loss only through their
  totals over the anchors (one cotangent for every anchor), so that their
  own cotangent on the tile is symmetric.
  """
  flags, kd0 = _float_consts(consts)
  n_tiles, tile = jax.tree.leaves(cd)[0].shape[:2]

  def by_tile(v):  # [B] per anchor -> [n_tiles, T] per column (padding 0)
    v = v.astype(jnp.float32)
    return jnp.pad(v, (0, n_tiles * tile - v.shape[0])).reshape(n_tiles, tile)

  def tile_out(rd_, kd, cd_t, cn_t):
    sums, lses = fn(rd_, rn, cd_t, cn_t, *_with_float_consts(flags, consts, kd))
    logits = tuple(l.logits.astype(jnp.float32) for l in lses)
    return (_as_f32(sums), logits), tuple(l.mask for l in lses)

  # Sums whose cotangent is the same for every anchor have a symmetric
  # cotangent already: twice it, pulled back through the rows, is G + G^T.
  twice_g_sums = jax.tree.map(lambda g: 2.0 * g, g_sums)

  def body(carry, tile_in):
    cd_t, cn_t, col_lse, col_g = tile_in
    (_, zs), vjp, masks = jax.vjp(lambda a, k: tile_out(a, k, cd_t, cn_t), rd, kd0,
                                  has_aux=True)
    cts = tuple(reductions._lse_cotangent_plus_transpose(z, mask, v, c, vc, cc)  # pylint: disable=protected-access
                for z, mask, v, c, vc, cc in zip(zs, masks, lse_vals, g_lse, col_lse, col_g))
    r_bar, k_bar = vjp((twice_g_sums, cts))
    return jax.tree.map(jnp.add, carry, (r_bar, jax.tree.map(lambda a: 0.5 * a, k_bar))), None

  zeros = jax.tree.map(jnp.zeros_like, (rd, kd0))
  per_column = (tuple(by_tile(v) for v in lse_vals), tuple(by_tile(c) for c in g_lse))
  (r_bar, k_bar), _ = jax.lax.scan(body, zeros, (cd, cn) + per_column)
  it = iter(k_bar)
  consts_bar = [next(it) if f else None for f in flags]
  return r_bar, _none_like(rn), jax.tree.map(jnp.zeros_like, cd), _none_like(cn), consts_bar


_stream.defvjp(_stream_fwd, _stream_bwd)


def _split(tree):
  leaves, treedef = jax.tree.flatten(tree)
  is_f = [_is_float(x) for x in leaves]
  return ([x for x, f in zip(leaves, is_f) if f], [x for x, f in zip(leaves, is_f) if not f],
          treedef, is_f)


def _merge(d, n, treedef, is_f):
  di, ni = iter(d), iter(n)
  return jax.tree.unflatten(treedef, [next(di) if f else next(ni) for f in is_f])


def stream(fn: Callable, rows: Any, cols: Any, tile: int, symmetric: bool = False):
  """Streams ``fn`` over column tiles of ``cols``.

  Args:
    fn: ``fn(rows, cols_tile) -> (sums, lses)`` (see the module docstring).
      Padding columns (added to reach a multiple of ``tile``) hold zeros and
      False: ``fn`` must mask them, e.g. with a ``"valid"`` column leaf.
    rows: pytree of arrays with leading axis B (floating leaves are
      differentiated).
    cols: pytree of arrays with leading axis M.
    tile: columns per tile (static).
    symmetric: the columns are the rows themselves (a batch against itself,
      on one device, in the same order; see :func:`symmetric_ok`), every
      ``Lse`` is [B, T] with logits and mask symmetric in (anchor, column),
      and the per-anchor ``sums`` are symmetric in (anchor, column) and
      reach the loss only through their totals over the anchors (or are not
      differentiated, like counts). The backward pass then takes one
      product per tile instead of two (``_symmetric_bwd``). Default False.

  Returns:
    ``(sums, lses)``: ``sums`` the pytree of float32 totals over all
    columns, ``lses`` a tuple of [B, ...] float32 log-sum-exps (0 if empty).
  """
  tiled, _ = _pad_and_tile(cols, tile)
  rd, rn, r_def, r_f = _split(rows)
  cd, cn, c_def, c_f = _split(tiled)

  def flat_fn(rd_, rn_, cd_t, cn_t):
    return fn(_merge(rd_, rn_, r_def, r_f), _merge(cd_t, cn_t, c_def, c_f))

  tile0 = jax.tree.map(lambda a: a[0], (cd, cn))
  converted, consts = jax.closure_convert(flat_fn, rd, rn, *tile0)
  return _stream(converted, bool(symmetric), rd, rn, cd, cn, list(consts))


def symmetric_ok(inp: "Inputs", distance) -> bool:
  """Whether a loss over ``inp`` whose log-sum-exps read the metric
  matrix symmetrically may use ``stream(..., symmetric=True)``: the batch
  against itself on one device, no pair mask, a built-in (symmetric)
  metric."""
  return (inp.self_compare and inp.ctx.axis_name is None and "pm" not in inp.cols
          and isinstance(distance, str))


def scan_tiles(fn: Callable, init: Any, rows: Any, cols: Any, tile: int) -> Any:
  """Non-differentiated pass: ``carry = fn(carry, rows, cols_tile)`` over
  the column tiles (padding columns are zeros / False). Every floating
  input is put under ``stop_gradient``."""
  rows = jax.tree.map(jax.lax.stop_gradient, rows)
  tiled, _ = _pad_and_tile(jax.tree.map(jax.lax.stop_gradient, cols), tile)

  def body(carry, tile_cols):
    return fn(carry, rows, tile_cols), None

  out, _ = jax.lax.scan(body, _vary(init, _vma(rows, tiled)), tiled)
  return out


# --------------------------------------------------------------------------
# Shared per-tile helpers.


@dataclasses.dataclass(frozen=True)
class Context:
  """Where the anchors live: on one device (``axis_name=None``) or as this
  device's shard of a global batch along a named mesh axis."""
  axis_name: str | None = None

  def psum(self, x):
    return jax.lax.psum(x, self.axis_name) if self.axis_name else x

  def total(self, x):
    """Sum over every anchor of the global batch."""
    return self.psum(jnp.sum(x))

  def gather(self, x):
    """The global array of a per-anchor quantity (identity on one device)."""
    if self.axis_name is None:
      return x
    return jax.lax.all_gather(x, self.axis_name, axis=0, tiled=True)


class Inputs(NamedTuple):
  """Validated, prepared inputs of a streamed loss.

  rows: {"x" [B, D] f32, "label" [B], "valid" [B] bool, optional "id" [B]}
  cols: {"y" [M, D] f32, "label" [M], "valid" [M] bool, "real" [M] bool,
         "index" [M] int32, optional "id" [M], optional "pm" [M, B] bool}
  """
  rows: dict
  cols: dict
  is_similarity: bool
  ctx: Context
  self_compare: bool   # references are the (global) batch of anchors
  anchor_pos: jax.Array  # [B] global position of each anchor


def prepare(embeddings, labels, ref_embeddings, ref_labels, *, distance, where,
            ref_where, pair_mask, ids, ref_ids, axis_name) -> Inputs:
  """Validation and the rows/cols dictionaries every streamed loss uses."""
  from metric_jax import pairs  # pylint: disable=import-outside-toplevel
  pairs.check_inputs(embeddings, labels, ref_embeddings, ref_labels, where,
                     ref_where, pair_mask)
  is_sim = distances_lib.is_similarity(distance)
  b = embeddings.shape[0]
  if (ids is None) != (ref_ids is None):
    raise ValueError("`ids` and `ref_ids` must be given together, got "
                     f"ids={'None' if ids is None else 'array'} and "
                     f"ref_ids={'None' if ref_ids is None else 'array'}.")
  if ids is not None:
    if ref_embeddings is None:
      raise ValueError("`ids` / `ref_ids` identify samples across a reference set; "
                       "without `ref_embeddings` self-pairs are excluded already.")
    _checks.labels(ids, b, "ids")
    _checks.labels(ref_ids, ref_embeddings.shape[0], "ref_ids")
  if axis_name is not None and ref_embeddings is not None:
    raise ValueError(
        "`axis_name` makes the references the all-gathered global batch; it cannot be "
        "combined with `ref_embeddings` (got both).")
  if axis_name is not None and pair_mask is not None:
    raise ValueError("`pair_mask` is not supported with `axis_name` (its columns "
                     "would have to span the global batch).")
  ctx = Context(axis_name)
  row_valid = jnp.ones((b,), bool) if where is None else where
  x = embeddings.astype(jnp.float32)
  x = jnp.where(row_valid[:, None], x, 0.0)
  if axis_name is not None:
    shard = jax.lax.axis_index(axis_name)
    anchor_pos = shard * b + jnp.arange(b, dtype=jnp.int32)
  else:
    anchor_pos = jnp.arange(b, dtype=jnp.int32)
  rows = {"x": x, "label": labels, "valid": row_valid}
  self_compare = ref_embeddings is None
  if self_compare:
    y = ctx.gather(x)
    m = y.shape[0]
    cols = {"y": y, "label": ctx.gather(labels), "valid": ctx.gather(row_valid)}
    rows["id"] = anchor_pos
    cols["id"] = jnp.arange(m, dtype=jnp.int32)
  else:
    m = ref_embeddings.shape[0]
    col_valid = jnp.ones((m,), bool) if ref_where is None else ref_where
    y = jnp.where(col_valid[:, None], ref_embeddings.astype(jnp.float32), 0.0)
    cols = {"y": y, "label": ref_labels, "valid": col_valid}
    if ids is not None:
      rows["id"] = ids
      cols["id"] = ref_ids
  cols["real"] = jnp.ones((m,), bool)
  cols["index"] = jnp.arange(m, dtype=jnp.int32)
  if pair_mask is not None:
    cols["pm"] = pair_mask.T
  return Inputs(rows, cols, is_sim, ctx, self_compare, anchor_pos)


class TileMasks(NamedTuple):
  pos: jax.Array   # [B, T]
  neg: jax.Array   # [B, T]
  real: jax.Array  # [1, T] real (non-padding) columns


def tile_masks(rows: dict, cols: dict) -> TileMasks:
  """The positive / negative masks of :func:`metric_jax.pairs.label_masks`
  on one tile (self-pairs by id, padding columns excluded)."""
  valid = rows["valid"][:, None] & cols["valid"][None, :]
  if "pm" in cols:
    valid = valid & cols["pm"].T
  same = rows["label"][:, None] == cols["label"][None, :]
  pos = same & valid
  if "id" in rows:
    pos = pos & (rows["id"][:, None] != cols["id"][None, :])
  neg = ~same & valid
  return TileMasks(pos, neg, cols["real"][None, :])


def tile_matrix(rows: dict, cols: dict, distance) -> jax.Array:
  """[B, T] float32 metric matrix of the anchors against one tile."""
  return distances_lib.pairwise(rows["x"], cols["y"], distance)


def finish(total: jax.Array, n_valid: jax.Array, n_nonzero: jax.Array,
           reduction: str, ctx: Context) -> jax.Array:
  """``reductions.reduce`` from per-anchor sums and counts, global over
  ``ctx`` (psum of numerators and denominators)."""
  num = ctx.total(total)
  if reduction == "sum":
    return num
  count = ctx.total(n_valid if reduction == "mean" else n_nonzero)
  return num / jnp.maximum(count, 1.0)


def reduce_terms(terms: jax.Array, valid: jax.Array, reduction: str,
                 ctx: Context) -> jax.Array:
  """``reductions.reduce`` of per-anchor terms [B] with a global mean."""
  terms = terms.astype(jnp.float32)
  masked = jnp.where(valid, terms, 0.0)
  if reduction == "none":
    return masked
  return finish(masked, valid.astype(jnp.float32),
                (valid & (terms > 0)).astype(jnp.float32), reduction, ctx)


def count(mask: jax.Array, axis=-1) -> jax.Array:
  return jnp.sum(mask, axis=axis, dtype=jnp.float32)


def no_none(reduction: str, name: str) -> None:
  if reduction == "none":
    raise ValueError(
        f"`reduction` must be one of ('mean', 'mean_nonzero', 'sum') for {name}: "
        "'none' would materialise the per-pair terms the streaming version avoids "
        "(use the dense loss), got 'none'.")


def first_indices(rows: dict, cols: dict, select: Callable, p: int, tile: int,
                  accumulate: Callable | None = None):
  """The lowest column indices (up to ``p``) where ``select(rows, cols_tile)``
  ([B, T] bool) holds, and how many columns hold, per anchor, by a
  non-differentiated pass over the column tiles.

  Args:
    accumulate: optional ``fn(rows, cols_tile) -> [B] float`` summed over
      the tiles in the same pass.

  Returns:
    ``(index [B, p] int32, found [B, p] bool, total [B] int32, acc [B])``;
    ``index`` is ascending, unfound slots hold 0; ``acc`` is 0 without
    ``accumulate``.
  """
  b = jax.tree.leaves(rows)[0].shape[0]
  sentinel = jnp.iinfo(jnp.int32).min

  def body(carry, r, c):
    keys, total, acc = carry
    sel = select(r, c)
    t_keys = jnp.where(sel, -c["index"][None, :], sentinel)
    if p == 1:     # a max reduction; top_k is a sort on some backends
      merged = jnp.maximum(keys, jnp.max(t_keys, axis=1, keepdims=True))
    else:
      k = min(p, t_keys.shape[1])
      t_top, _ = jax.lax.top_k(t_keys, k)
      merged, _ = jax.lax.top_k(jnp.concatenate([keys, t_top], axis=1), p)
    if accumulate is not None:
      acc = acc + accumulate(r, c)
    return merged, total + jnp.sum(sel, axis=1, dtype=jnp.int32), acc

  init = (jnp.full((b, p), sentinel, jnp.int32), jnp.zeros((b,), jnp.int32),
          jnp.zeros((b,), jnp.float32))
  keys, total, acc = scan_tiles(body, init, rows, cols, tile)
  found = keys != sentinel
  return jnp.where(found, -keys, 0), found, total, acc


def best_index(values: jax.Array, mask: jax.Array, index: jax.Array, largest: bool,
               last: bool = False):
  """Per row of a tile: (best masked value, its column index, any).

  ``largest`` picks the maximum (else the minimum); ties go to the lowest
  column (``last=False``) or the highest (``last=True``).
  """
  fill = -jnp.inf if largest else jnp.inf
  v = jnp.where(mask, values, fill)
  if last:
    v = v[..., ::-1]
  pos = (reductions.first_argmax if largest else reductions.first_argmin)(v, axis=-1)
  best = jnp.take_along_axis(v, pos[..., None], axis=-1)[..., 0]
  if last:
    pos = v.shape[-1] - 1 - pos
  idx = jnp.take(index, pos)
  return best, idx, jnp.any(mask, axis=-1)


def merge_best(run, new, largest: bool, last: bool = False):
  """Merges (value, index, any) of earlier tiles with a later tile: a later
  tile wins only if strictly better (``last=False``) or at least as good."""
  rv, ri, ra = run
  nv, ni, na = new
  if largest:
    better = (nv >= rv) if last else (nv > rv)
  else:
    better = (nv <= rv) if last else (nv < rv)
  take = na & (better | ~ra)
  return jnp.where(take, nv, rv), jnp.where(take, ni, ri), ra | na


def best_init(shape, largest: bool):
  fill = -jnp.inf if largest else jnp.inf
  return (jnp.full(shape, fill, jnp.float32), jnp.zeros(shape, jnp.int32),
          jnp.zeros(shape, bool))


def np_int(x) -> int:
  return int(np.asarray(x))
