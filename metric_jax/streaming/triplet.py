"""Streaming triplet margin loss: batch-hard, easy-positive, batch-all and
semi-hard mining over column tiles."""

from __future__ import annotations

__all__ = ["streaming_triplet_margin_loss"]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import reductions
from metric_jax.losses import triplet as dense_triplet
from metric_jax.streaming import _engine as eng


def _softplus(x):
  return jax.nn.relu(x) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _hinge(x, margin, soft):
  return _softplus(x + margin) if soft else jax.nn.relu(x + margin)


def streaming_triplet_margin_loss(embeddings: jax.Array, labels: jax.Array,
                                  ref_embeddings: jax.Array | None = None,
                                  ref_labels: jax.Array | None = None, *,
                                  margin: float = 0.2, mining: str = "all",
                                  semihard: str = "facenet", band_select: str = "all",
                                  soft: bool = False, swap: bool = False,
                                  distance="euclidean", reduction: str = "mean_nonzero",
                                  where: jax.Array | None = None,
                                  ref_where: jax.Array | None = None,
                                  pair_mask: jax.Array | None = None,
                                  max_positives: int | None = None,
                                  ids: jax.Array | None = None,
                                  ref_ids: jax.Array | None = None,
                                  tile_size: int | None = None,
                                  axis_name: str | None = None) -> jax.Array:
  r"""Triplet margin loss in O(B T) memory: :func:`metric_jax.losses.triplet_margin_loss`
  computed over tiles of T reference columns.

  ``h(d_ap - d_an + margin)`` with the hinge (or softplus with ``soft``),
  ``d = -s`` for similarities and ``d_an -> min(d_an, d_pn)`` with ``swap``.
  Same values and gradients as the dense loss, by mining mode:

  * ``"hard"`` / ``"easy"``: one non-differentiated pass over the tiles keeps,
    per anchor, the running maximum (minimum) positive distance and the
    minimum negative distance with their column indices (ties: lowest
    index, as ``argmax``); the chosen pairs' distances are then recomputed
    from the gathered rows ([B, D]), so the gradient is exact and O(B D).
  * ``"all"`` and ``"semihard"``: a first pass gathers each anchor's first
    ``max_positives`` positive columns (PK batches: K - 1); their distances
    ``d_ap`` [B, P] are computed directly. Batch-all and the FaceNet band
    with ``band_select="all"`` then stream over the negative tiles,
    accumulating per anchor the sum of the [B, P, T] hinge terms and the
    numbers of valid and non-zero terms (custom VJP, tiles recomputed in the
    backward pass). ``band_select="hardest"`` and ``semihard="tf"`` keep,
    per (anchor, positive), the nearest negative farther than the positive
    (and for ``"tf"`` the farthest negative) by a non-differentiated pass.
    If an anchor has more than ``max_positives`` positives the loss is NaN
    (loud, never silently truncated), as the dense loss with
    ``max_positives``.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    margin, mining, semihard, band_select, soft, swap, distance: as the
      dense loss.
    reduction: ``"mean_nonzero"`` (default), ``"mean"``, ``"sum"``; ``"none"``
      ([B] terms) only for ``"hard"`` / ``"easy"``.
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: optional [B, M] bool restriction of the (a, p) and (a, n)
      pairs.
    max_positives: static bound on the positives of any anchor; required
      for ``"all"`` and ``"semihard"``.
    ids, ref_ids: optional [B] / [M] sample identities with a reference set
      (equal ids are the same sample: never a positive pair).
    tile_size: reference columns per tile (static; default about 16M
      elements per [B, P, T] block).
    axis_name: shard_map axis (see :mod:`metric_jax.streaming`).

  Returns:
    Scalar float32 loss ([B] terms for ``reduction="none"``).

  References:
    Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015, arXiv 1503.03832.
    Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification", arXiv 1703.07737.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_triplet_margin_loss
    >>> emb = jnp.array([[0., 0.], [0., 1.], [0.5, 0.]])
    >>> round(float(streaming_triplet_margin_loss(
    ...     emb, jnp.array([0, 0, 1]), margin=1.0, max_positives=1, tile_size=2)), 4)
    1.191
  """
  _checks.choice(mining, dense_triplet.MINING, "mining")
  _checks.choice(semihard, dense_triplet.SEMIHARD, "semihard")
  _checks.choice(band_select, dense_triplet.BAND_SELECT, "band_select")
  _checks.scalar(margin, "margin")
  reductions.check(reduction)
  eng.check_tile(tile_size)
  if mining in ("all", "semihard"):
    eng.no_none(reduction, f"streaming_triplet_margin_loss(mining={mining!r})")
    if max_positives is None:
      raise ValueError(
          f"`max_positives` must be a static int for mining={mining!r} (the largest "
          "number of positives of any anchor, K - 1 for a PK batch), got None.")
  if max_positives is not None:
    _checks.positive_int(max_positives, "max_positives")
  inp = eng.prepare(embeddings, labels, ref_embeddings, ref_labels, distance=distance,
                    where=where, ref_where=ref_where, pair_mask=pair_mask, ids=ids,
                    ref_ids=ref_ids, axis_name=axis_name)
  if mining in ("hard", "easy"):
    result, probe = _hard(inp, margin, mining, soft, swap, distance, reduction, tile_size)
  else:
    result, probe = _with_positives(inp, margin, mining, semihard, band_select, soft,
                                    swap, distance, reduction, max_positives, tile_size)
  # As the dense loss: NaN distances dropped by a comparison stay visible.
  return result + 0.0 * jax.lax.stop_gradient(probe)


def _dist_tile(rows, cols, distance, sim):
  mat = eng.tile_matrix(rows, cols, distance)
  return -mat if sim else mat


def _probe(masks, dist):
  return jnp.sum(jnp.where(masks.pos | masks.neg, dist, 0.0), axis=-1)


def _pair_dist(a, b, distance, sim):
  d = distances_lib.paired(a, b, distance)
  return -d if sim else d


def _hard(inp, margin, mining, soft, swap, distance, reduction, tile_size):
  rows, cols, sim, ctx = inp.rows, inp.cols, inp.is_similarity, inp.ctx
  b, m = rows["x"].shape[0], cols["y"].shape[0]
  tile = tile_size or eng.default_tile(b, m)

  def body(carry, r, c):
    best_p, best_n, probe = carry
    dist = _dist_tile(r, c, distance, sim)
    masks = eng.tile_masks(r, c)
    p_val = dist if mining == "hard" else -dist
    best_p = eng.merge_best(best_p, eng.best_index(p_val, masks.pos, c["index"], True), True)
    best_n = eng.merge_best(best_n, eng.best_index(dist, masks.neg, c["index"], False), False)
    return best_p, best_n, probe + _probe(masks, dist)

  init = (eng.best_init((b,), True), eng.best_init((b,), False), jnp.zeros((b,), jnp.float32))
  (_, p_idx, has_p), (_, n_idx, has_n), probe = eng.scan_tiles(body, init, rows, cols, tile)
  y = cols["y"]
  d_ap = _pair_dist(rows["x"], y[p_idx], distance, sim)
  d_an = _pair_dist(rows["x"], y[n_idx], distance, sim)
  if swap:
    d_an = jnp.minimum(d_an, _pair_dist(y[p_idx], y[n_idx], distance, sim))
  terms = _hinge(d_ap - d_an, margin, soft)
  return eng.reduce_terms(terms, has_p & has_n, reduction, ctx), ctx.total(probe)


def _with_positives(inp, margin, mining, semihard, band_select, soft, swap, distance,
                    reduction, max_positives, tile_size):
  rows, cols, sim, ctx = inp.rows, inp.cols, inp.is_similarity, inp.ctx
  b, m = rows["x"].shape[0], cols["y"].shape[0]
  p = min(max_positives, m)
  tile = tile_size or eng.default_tile(b, m, per_column=p)

  def probe_fn(r, c):
    return _probe(eng.tile_masks(r, c), _dist_tile(r, c, distance, sim))

  p_idx, p_valid, n_pos, probe = eng.first_indices(
      rows, cols, lambda r, c: eng.tile_masks(r, c).pos, p, tile, accumulate=probe_fn)
  overflow = ctx.psum(jnp.any(n_pos > p).astype(jnp.int32)) > 0
  x, y = rows["x"], cols["y"]
  d = x.shape[1]
  yp = y[p_idx]                                                   # [B, P, D]
  xb = jnp.broadcast_to(x[:, None, :], yp.shape)
  d_ap = _pair_dist(xb.reshape(-1, d), yp.reshape(-1, d), distance, sim).reshape(b, p)

  band = mining == "semihard"
  single = band and (semihard == "tf" or band_select == "hardest")
  if single:
    result = _single_negative(inp, d_ap, p_valid, yp, margin, semihard, soft, swap,
                              distance, reduction, tile)
  else:
    srows = dict(rows, d_ap=d_ap, p_valid=p_valid)
    if swap:
      srows["yp"] = yp

    def fn(r, c):
      dist = _dist_tile(r, c, distance, sim)                      # [B, T]
      masks = eng.tile_masks(r, c)
      dap = r["d_ap"][:, :, None]                                 # [B, P, 1]
      d_an = dist[:, None, :]                                     # [B, 1, T]
      mask = r["p_valid"][:, :, None] & masks.neg[:, None, :]
      if band:
        mask = mask & (d_an > dap) & (d_an < dap + margin)
      if swap:
        yp_ = r["yp"]
        d_pn = distances_pair_tile(yp_, c["y"], distance, sim)    # [B, P, T]
        d_an = jnp.minimum(d_an, d_pn)
      terms = _hinge(dap - d_an, margin, soft)
      return ((jnp.sum(jnp.where(mask, terms, 0.0), axis=(1, 2)),
               eng.count(mask, axis=(1, 2)), eng.count(mask & (terms > 0), axis=(1, 2))), ())

    sums, _ = eng.stream(fn, srows, cols, tile)
    result = eng.finish(*sums, reduction, ctx)
  return jnp.where(overflow, jnp.nan, result), ctx.total(probe)


def distances_pair_tile(yp, y_tile, distance, sim):
  """[B, P, D] x [T, D] -> [B, P, T] metric (as distances)."""
  b, p, d = yp.shape
  mat = eng.tile_matrix({"x": yp.reshape(b * p, d)}, {"y": y_tile}, distance)
  mat = mat.reshape(b, p, -1)
  return -mat if sim else mat


def _single_negative(inp, d_ap, p_valid, yp, margin, semihard, soft, swap, distance,
                     reduction, tile):
  """One negative per (anchor, positive): the nearest negative farther than
  the positive (FaceNet band "hardest" / TF-Addons), found without gradient,
  then its distance recomputed directly."""
  rows, cols, sim, ctx = inp.rows, inp.cols, inp.is_similarity, inp.ctx
  b, p = d_ap.shape
  dap_ng = jax.lax.stop_gradient(d_ap)

  def body(carry, r, c):
    near, far, n_neg = carry
    dist = _dist_tile(r, c, distance, sim)
    neg = eng.tile_masks(r, c).neg
    d_an = jnp.broadcast_to(dist[:, None, :], (b, p, dist.shape[1]))
    negp = jnp.broadcast_to(neg[:, None, :], d_an.shape)
    farther = negp & (d_an > r["dap"][:, :, None])
    near = eng.merge_best(near, eng.best_index(d_an, farther, c["index"], False), False)
    far = eng.merge_best(far, eng.best_index(d_an, negp, c["index"], True, last=True),
                         True, last=True)
    return near, far, n_neg + jnp.sum(neg, axis=1, dtype=jnp.int32)

  init = (eng.best_init((b, p), False), eng.best_init((b, p), True),
          jnp.zeros((b,), jnp.int32))
  (near_v, near_i, has_farther), (_, far_i, _), n_neg = eng.scan_tiles(
      body, init, dict(rows, dap=dap_ng), cols, tile)
  if semihard == "tf":
    n_idx = jnp.where(has_farther, near_i, far_i)
    valid = p_valid & (n_neg[:, None] > 0)
  else:
    in_band = near_v < dap_ng + jax.lax.stop_gradient(margin)
    n_idx = near_i
    valid = p_valid & has_farther & in_band
  x, y = rows["x"], cols["y"]
  d = x.shape[1]
  yn = y[n_idx]                                                   # [B, P, D]
  xb = jnp.broadcast_to(x[:, None, :], yn.shape)
  d_an = _pair_dist(xb.reshape(-1, d), yn.reshape(-1, d), distance, sim).reshape(b, p)
  if swap:
    d_pn = _pair_dist(yp.reshape(-1, d), yn.reshape(-1, d), distance, sim).reshape(b, p)
    d_an = jnp.minimum(d_an, d_pn)
  terms = _hinge(d_ap - d_an, margin, soft)
  masked = jnp.where(valid, terms, 0.0)
  return eng.finish(jnp.sum(masked, axis=1), eng.count(valid, axis=1),
                    eng.count(valid & (terms > 0), axis=1), reduction, ctx)
