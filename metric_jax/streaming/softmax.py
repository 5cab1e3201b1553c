"""Streaming log-sum-exp losses: lifted structure, generalized lifted
structure, multi-similarity, circle, NT-Xent, SupCon, NCA and N-pair.

Each per-anchor log-sum-exp is reduced over the reference tiles with an
online log-sum-exp (running max and rescaled sum); losses whose terms are
per *pair* functions of a per-anchor log-sum-exp (lifted structure, NT-Xent)
take a second streamed pass that receives the first pass's log-sum-exps as
differentiable inputs (or, when all references fit in one tile, compute the
dense loss in one pass).
"""

from __future__ import annotations

__all__ = [
    "streaming_lifted_structure_loss",
    "streaming_generalized_lifted_structure_loss",
    "streaming_multi_similarity_loss",
    "streaming_circle_loss",
    "streaming_ntxent_loss",
    "streaming_supcon_loss",
    "streaming_nca_loss",
    "streaming_npair_loss",
]

import jax
import jax.numpy as jnp

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import reductions
from metric_jax.losses import lifted as dense_lifted
from metric_jax.losses import npair as dense_npair
from metric_jax.losses import ntxent as dense_ntxent
from metric_jax.streaming import _engine as eng

_COMMON_ARGS = """
    where: [B] bool validity of anchors.
    ref_where: [M] bool validity of references.
    pair_mask: optional [B, M] bool restriction of the pairs (read one tile
      at a time, but itself a [B, M] input).
    ids, ref_ids: optional [B] / [M] integer sample identities (with a
      reference set): equal ids are the same sample, never a positive pair.
    tile_size: reference columns per tile (static; default about 16M
      elements per [B, T] block).
    axis_name: inside ``jax.shard_map``: ``embeddings`` is this device's
      shard of the global batch, the references its all-gather, and the
      reduction global (see :mod:`metric_jax.streaming`)."""


def _doc(fn):
  fn.__doc__ = fn.__doc__.replace("    {common}", _COMMON_ARGS.strip("\n"))
  return fn


def _nan_rows(mat, masks):
  """Per-anchor count of NaN entries over the real columns (the dense
  losses turn a row with any NaN entry into NaN)."""
  return eng.count(jnp.isnan(mat) & masks.real)


def _setup(embeddings, labels, ref_embeddings, ref_labels, distance, where, ref_where,
           pair_mask, ids, ref_ids, tile_size, axis_name):
  eng.check_tile(tile_size)
  inp = eng.prepare(embeddings, labels, ref_embeddings, ref_labels, distance=distance,
                    where=where, ref_where=ref_where, pair_mask=pair_mask, ids=ids,
                    ref_ids=ref_ids, axis_name=axis_name)
  b, m = inp.rows["x"].shape[0], inp.cols["y"].shape[0]
  return inp, tile_size or eng.default_tile(b, m)


def _one_tile(inp, tile: int, ids) -> bool:
  """Whether all references fit in one tile of a single-device call
  without sample ids: the two-pass losses (lifted structure, NT-Xent) then
  compute the dense loss, which evaluates the [B, M] matrix once instead of
  once per pass (same values; its memory is a few tile-sized blocks)."""
  return inp.ctx.axis_name is None and ids is None and tile >= inp.cols["y"].shape[0]


def _margins(mat, sim, pos_margin, neg_margin):
  if sim:
    return pos_margin - mat, mat - neg_margin
  return mat - pos_margin, neg_margin - mat


@_doc
def streaming_generalized_lifted_structure_loss(
    embeddings: jax.Array, labels: jax.Array,
    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None, *,
    neg_margin: float = 1.0, pos_margin: float = 0.0, empty_lse: str = "-inf",
    distance="euclidean", reduction: str = "mean",
    where: jax.Array | None = None, ref_where: jax.Array | None = None,
    pair_mask: jax.Array | None = None, ids: jax.Array | None = None,
    ref_ids: jax.Array | None = None, tile_size: int | None = None,
    axis_name: str | None = None) -> jax.Array:
  r"""Generalized lifted structure loss over column tiles (same values and
  gradients as :func:`metric_jax.losses.generalized_lifted_structure_loss`).

  Per anchor a::

    l_a = [ log sum_{p in P(a)} exp(D_ap - pos_margin)
          + log sum_{n in N(a)} exp(neg_margin - D_an) ]_+

  Both log-sum-exps are reduced tile by tile with an online log-sum-exp.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    neg_margin, pos_margin, empty_lse, distance: as the dense loss.
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"``, ``"none"``
      ([B] terms).
    {common}

  Returns:
    Scalar float32 loss ([B] terms for ``reduction="none"``).

  References:
    Hermans, Beyer, Leibe, arXiv 1703.07737; Oh Song et al., CVPR 2016,
    arXiv 1511.06452.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_generalized_lifted_structure_loss as gl
    >>> emb = jnp.array([[0., 0.], [0., 1.], [1., 0.], [2., 2.]])
    >>> round(float(gl(emb, jnp.array([0, 0, 1, 1]), tile_size=3)), 4)
    1.5707
  """
  reductions.check(reduction)
  _checks.scalar(pos_margin, "pos_margin")
  _checks.scalar(neg_margin, "neg_margin")
  _checks.choice(empty_lse, dense_lifted.EMPTY_LSE, "empty_lse")
  inp, tile = _setup(embeddings, labels, ref_embeddings, ref_labels, distance, where,
                     ref_where, pair_mask, ids, ref_ids, tile_size, axis_name)
  sim = inp.is_similarity

  def fn(rows, cols):
    mat = eng.tile_matrix(rows, cols, distance)
    masks = eng.tile_masks(rows, cols)
    pos_logits, neg_logits = _margins(mat, sim, pos_margin, neg_margin)
    sums = {"n_pos": eng.count(masks.pos), "n_neg": eng.count(masks.neg)}
    return sums, (eng.Lse(pos_logits, masks.pos), eng.Lse(neg_logits, masks.neg))

  sums, (pos_lse, neg_lse) = eng.stream(fn, inp.rows, inp.cols, tile,
                                       symmetric=eng.symmetric_ok(inp, distance))
  terms = jax.nn.relu(pos_lse + neg_lse)
  if empty_lse == "zero":
    valid = inp.rows["valid"]
  else:
    valid = (sums["n_pos"] > 0) & (sums["n_neg"] > 0)
  return eng.reduce_terms(terms, valid, reduction, inp.ctx)


@_doc
def streaming_lifted_structure_loss(
    embeddings: jax.Array, labels: jax.Array,
    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None, *,
    neg_margin: float = 1.0, pos_margin: float = 0.0, empty_lse: str = "-inf",
    ref_negatives: str = "reference", distance="euclidean", reduction: str = "mean",
    where: jax.Array | None = None, ref_where: jax.Array | None = None,
    pair_mask: jax.Array | None = None, ids: jax.Array | None = None,
    ref_ids: jax.Array | None = None, tile_size: int | None = None,
    axis_name: str | None = None) -> jax.Array:
  r"""Lifted structured loss over column tiles (same values and gradients as
  :func:`metric_jax.losses.lifted_structure_loss` with ``hard=False``).

  For each positive pair (i, j)::

    J_ij = logaddexp(LSE_{k in N(i)} (alpha - D_ik), LSE_{l in N(j)} (alpha - D_jl))
           + D_ij - pos_margin
    L    = mean over ordered positive pairs of [J_ij]_+^2 / 2

  Two streamed passes: the first reduces each anchor's (and, with a
  reference set and ``ref_negatives="reference"``, each reference's)
  negative log-sum-exp; the second walks the pairs with those log-sum-exps
  as differentiable per-row and per-column inputs. The non-smooth
  ``hard=True`` form is not streamed (use the dense loss). When every
  reference fits in one tile (one device, no ``ids``), the dense loss is
  computed instead: one evaluation of the [B, M] matrix, same values.

  Args:
    embeddings: [B, D] float anchors (not normalised in the paper).
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    neg_margin, pos_margin, empty_lse, ref_negatives, distance: as the
      dense loss.
    reduction: ``"mean"`` (default), ``"mean_nonzero"`` or ``"sum"``.
    {common}

  Returns:
    Scalar float32 loss.

  References:
    Oh Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted
    Structured Feature Embedding", CVPR 2016, arXiv 1511.06452.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_lifted_structure_loss
    >>> emb = jnp.array([[0., 0.], [0., 1.], [1., 0.], [2., 2.]])
    >>> round(float(streaming_lifted_structure_loss(emb, jnp.array([0, 0, 1, 1]),
    ...                                             tile_size=3)), 4)
    2.9892
  """
  reductions.check(reduction)
  eng.no_none(reduction, "streaming_lifted_structure_loss")
  _checks.scalar(pos_margin, "pos_margin")
  _checks.scalar(neg_margin, "neg_margin")
  _checks.choice(empty_lse, dense_lifted.EMPTY_LSE, "empty_lse")
  _checks.choice(ref_negatives, dense_lifted.REF_NEGATIVES, "ref_negatives")
  inp, tile = _setup(embeddings, labels, ref_embeddings, ref_labels, distance, where,
                     ref_where, pair_mask, ids, ref_ids, tile_size, axis_name)
  sim, ctx = inp.is_similarity, inp.ctx
  rows, cols = inp.rows, inp.cols
  b, m = rows["x"].shape[0], cols["y"].shape[0]
  ref_tile = eng.default_tile(m, m) if tile_size is None else tile
  needs_ref_pass = not inp.self_compare and ref_negatives == "reference"
  if _one_tile(inp, tile, ids) and (not needs_ref_pass or ref_tile >= m):
    return dense_lifted.lifted_structure_loss(
        embeddings, labels, ref_embeddings, ref_labels, neg_margin=neg_margin,
        pos_margin=pos_margin, empty_lse=empty_lse, ref_negatives=ref_negatives,
        distance=distance, reduction=reduction, where=where, ref_where=ref_where,
        pair_mask=pair_mask)

  def neg_lse_fn(r, c):
    mat = eng.tile_matrix(r, c, distance)
    masks = eng.tile_masks(r, c)
    _, neg_logits = _margins(mat, sim, pos_margin, neg_margin)
    return {"n_neg": eng.count(masks.neg)}, (eng.Lse(neg_logits, masks.neg),)

  s_row, (row_val,) = eng.stream(neg_lse_fn, rows, cols, tile)
  row_has = s_row["n_neg"] > 0
  any_neg = ctx.total(s_row["n_neg"]) > 0

  pml = False
  if inp.self_compare:
    col_val, col_has = ctx.gather(row_val), ctx.gather(row_has)
  elif ref_negatives == "reference":
    ref_rows = {"x": cols["y"], "label": cols["label"], "valid": cols["valid"],
                "id": cols["index"]}
    ref_cols = {k: cols[k] for k in ("y", "label", "valid", "real", "index")}
    ref_cols["id"] = cols["index"]
    s_ref, (col_val,) = eng.stream(neg_lse_fn, ref_rows, ref_cols, ref_tile)
    col_has = s_ref["n_neg"] > 0
  elif ref_negatives == "anchor_only":
    col_val, col_has = jnp.zeros((m,), jnp.float32), jnp.zeros((m,), bool)
  else:  # "pml": row j of the anchor matrix, none for j >= B.
    k = min(b, m)
    col_val = jnp.zeros((m,), jnp.float32).at[:k].set(row_val[:k])
    col_has = jnp.zeros((m,), bool).at[:k].set(row_has[:k])
    pml = True

  prow = dict(rows, lse=row_val, has=row_has, pos_index=inp.anchor_pos)
  pcol = dict(cols, lse=col_val, has=col_has)

  def pair_fn(r, c):
    mat = eng.tile_matrix(r, c, distance)
    masks = eng.tile_masks(r, c)
    pos_part, _ = _margins(mat, sim, pos_margin, neg_margin)
    has1, has2 = r["has"][:, None], c["has"][None, :]
    if pml:
      has2 = has2 & (r["pos_index"][:, None] != c["index"][None, :])
    v1, v2 = r["lse"][:, None], c["lse"][None, :]
    joint = jnp.logaddexp(v1, v2)
    soft_max = jnp.where(has1 & has2, joint, jnp.where(has1, v1, v2))
    has_neg = has1 | has2
    if empty_lse == "zero":
      j = jnp.where(has_neg, soft_max, 0.0) + pos_part
    else:
      j = jnp.where(has_neg, soft_max + pos_part, 0.0)
    terms = 0.5 * jnp.square(jax.nn.relu(j))
    return ((jnp.sum(jnp.where(masks.pos, terms, 0.0), axis=-1), eng.count(masks.pos),
             eng.count(masks.pos & (terms > 0))), ())

  sums, _ = eng.stream(pair_fn, prow, pcol, tile)
  result = eng.finish(*sums, reduction, ctx)
  if empty_lse == "zero":
    # PML returns 0 outright when the batch has no negative pair at all.
    result = jnp.where(any_neg, result, 0.0)
  return result


@_doc
def streaming_multi_similarity_loss(
    embeddings: jax.Array, labels: jax.Array,
    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None, *,
    alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
    distance="cosine", reduction: str = "mean",
    where: jax.Array | None = None, ref_where: jax.Array | None = None,
    pair_mask: jax.Array | None = None, ids: jax.Array | None = None,
    ref_ids: jax.Array | None = None, tile_size: int | None = None,
    axis_name: str | None = None) -> jax.Array:
  r"""Multi-similarity loss over column tiles (same values and gradients as
  :func:`metric_jax.losses.multi_similarity_loss`).

  Per anchor i::

    l_i = 1/alpha log(1 + sum_{P_i} exp(-alpha (S_ik - base)))
        + 1/beta  log(1 + sum_{N_i} exp( beta (S_ik - base)))

  Each ``log(1 + sum exp)`` is ``logaddexp(LSE, 0)`` of a streamed online
  log-sum-exp (0 for an empty set).

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    alpha, beta, base, distance: as the dense loss.
    reduction: ``"mean"`` (default, over all valid anchors), ``"mean_nonzero"``,
      ``"sum"``, ``"none"`` ([B] terms).
    {common}

  Returns:
    Scalar float32 loss ([B] terms for ``reduction="none"``).

  References:
    Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General Pair
    Weighting for Deep Metric Learning", CVPR 2019, arXiv 1904.06627.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_multi_similarity_loss as ms
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(ms(emb, jnp.array([0, 0, 1]), tile_size=2)), 4)
    0.2126
  """
  reductions.check(reduction)
  _checks.scalar(alpha, "alpha", positive=True)
  _checks.scalar(beta, "beta", positive=True)
  _checks.scalar(base, "base")
  inp, tile = _setup(embeddings, labels, ref_embeddings, ref_labels, distance, where,
                     ref_where, pair_mask, ids, ref_ids, tile_size, axis_name)
  sim = inp.is_similarity

  def fn(rows, cols):
    mat = eng.tile_matrix(rows, cols, distance)
    masks = eng.tile_masks(rows, cols)
    shift = (base - mat) if sim else (mat - base)
    return ({"nan": _nan_rows(mat, masks), "n_pos": eng.count(masks.pos),
             "n_neg": eng.count(masks.neg)},
            (eng.Lse(alpha * shift, masks.pos), eng.Lse(-beta * shift, masks.neg)))

  sums, (pos_lse, neg_lse) = eng.stream(fn, inp.rows, inp.cols, tile,
                                       symmetric=eng.symmetric_ok(inp, distance))
  pos_term = jnp.where(sums["n_pos"] > 0, jnp.logaddexp(pos_lse, 0.0), 0.0)
  neg_term = jnp.where(sums["n_neg"] > 0, jnp.logaddexp(neg_lse, 0.0), 0.0)
  terms = pos_term / alpha + neg_term / beta
  terms = jnp.where(sums["nan"] > 0, jnp.nan, terms)
  return eng.reduce_terms(terms, inp.rows["valid"], reduction, inp.ctx)


@_doc
def streaming_circle_loss(
    embeddings: jax.Array, labels: jax.Array,
    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None, *,
    m: float = 0.4, gamma: float = 80.0, distance="cosine",
    reduction: str = "mean_nonzero",
    where: jax.Array | None = None, ref_where: jax.Array | None = None,
    pair_mask: jax.Array | None = None, ids: jax.Array | None = None,
    ref_ids: jax.Array | None = None, tile_size: int | None = None,
    axis_name: str | None = None) -> jax.Array:
  r"""Circle loss over column tiles (same values and gradients as
  :func:`metric_jax.losses.circle_loss`).

  Per anchor, with the weights ``a`` held constant (stop-gradient)::

    a_p = [1 + m - s_p]_+      a_n = [s_n + m]_+
    l = softplus( LSE_p(-gamma a_p (s_p - (1 - m))) + LSE_n(gamma a_n (s_n - m)) )

  Anchors without a positive or a negative contribute 0 and are dropped.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    m, gamma: relaxation margin and scale.
    distance: a similarity (``"cosine"``, ``"dot"`` or a callable with
      ``is_similarity=True``).
    reduction: ``"mean_nonzero"`` (default), ``"mean"``, ``"sum"``, ``"none"``
      ([B] terms).
    {common}

  Returns:
    Scalar float32 loss ([B] terms for ``reduction="none"``).

  References:
    Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity
    Optimization", CVPR 2020, arXiv 2002.10857.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_circle_loss
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(streaming_circle_loss(emb, jnp.array([0, 0, 1]), tile_size=2)), 4)
    3.2008
  """
  reductions.check(reduction)
  _checks.scalar(m, "m")
  _checks.scalar(gamma, "gamma", positive=True)
  inp, tile = _setup(embeddings, labels, ref_embeddings, ref_labels, distance, where,
                     ref_where, pair_mask, ids, ref_ids, tile_size, axis_name)
  if not inp.is_similarity:
    raise ValueError(
        "streaming_circle_loss needs a similarity `distance` (\"cosine\", \"dot\" or a "
        f"callable with is_similarity=True), got the distance {distance!r}.")

  def fn(rows, cols):
    s = eng.tile_matrix(rows, cols, distance)
    masks = eng.tile_masks(rows, cols)
    s_c = jax.lax.stop_gradient(s)
    pos_logits = -gamma * jax.nn.relu(1.0 + m - s_c) * (s - (1.0 - m))
    neg_logits = gamma * jax.nn.relu(s_c + m) * (s - m)
    return ({"nan": _nan_rows(s, masks), "n_pos": eng.count(masks.pos),
             "n_neg": eng.count(masks.neg)},
            (eng.Lse(pos_logits, masks.pos), eng.Lse(neg_logits, masks.neg)))

  sums, (lse_p, lse_n) = eng.stream(fn, inp.rows, inp.cols, tile,
                                       symmetric=eng.symmetric_ok(inp, distance))
  valid = (sums["n_pos"] > 0) & (sums["n_neg"] > 0) & inp.rows["valid"]
  terms = jnp.where(valid, jax.nn.softplus(lse_p + lse_n), 0.0)
  terms = jnp.where(sums["nan"] > 0, jnp.nan, terms)
  return eng.reduce_terms(terms, valid, reduction, inp.ctx)


def _logits(mat, sim, temperature):
  return (mat if sim else -mat) / temperature


@_doc
def streaming_ntxent_loss(
    embeddings: jax.Array, labels: jax.Array,
    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None, *,
    temperature: float = 0.07, distance="cosine", reduction: str = "mean",
    where: jax.Array | None = None, ref_where: jax.Array | None = None,
    pair_mask: jax.Array | None = None, ids: jax.Array | None = None,
    ref_ids: jax.Array | None = None, tile_size: int | None = None,
    axis_name: str | None = None) -> jax.Array:
  r"""NT-Xent / InfoNCE over column tiles (same values and gradients as
  :func:`metric_jax.losses.ntxent_loss`).

  For every positive pair (i, p), with ``z = s / tau``::

    l_ip = softplus( LSE_{n in N_i} z_in - z_ip )

  A first streamed pass reduces each anchor's negative log-sum-exp, a
  second one walks the positive pairs with it as a differentiable input.
  When every reference fits in one tile (one device, no ``ids``), the
  dense loss is computed instead: one evaluation of the [B, M] matrix.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels (instance ids for self-supervised use).
    ref_embeddings: optional [M, D] references (e.g. a memory queue).
    ref_labels: [M] labels of the references.
    temperature, distance: as the dense loss.
    reduction: ``"mean"`` over positive pairs (default), ``"mean_nonzero"``
      or ``"sum"``.
    {common}

  Returns:
    Scalar float32 loss.

  References:
    Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive
    Learning of Visual Representations", ICML 2020, arXiv 2002.05709.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_ntxent_loss
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(streaming_ntxent_loss(emb, jnp.array([0, 0, 1]), temperature=0.5,
    ...                                   tile_size=2)), 4)
    0.3485
  """
  reductions.check(reduction)
  eng.no_none(reduction, "streaming_ntxent_loss")
  _checks.scalar(temperature, "temperature", positive=True)
  inp, tile = _setup(embeddings, labels, ref_embeddings, ref_labels, distance, where,
                     ref_where, pair_mask, ids, ref_ids, tile_size, axis_name)
  sim = inp.is_similarity
  if _one_tile(inp, tile, ids):
    return dense_ntxent.ntxent_loss(
        embeddings, labels, ref_embeddings, ref_labels, temperature=temperature,
        distance=distance, reduction=reduction, where=where, ref_where=ref_where,
        pair_mask=pair_mask)

  def neg_fn(rows, cols):
    z = _logits(eng.tile_matrix(rows, cols, distance), sim, temperature)
    masks = eng.tile_masks(rows, cols)
    return ({"nan": _nan_rows(z, masks), "n_neg": eng.count(masks.neg)},
            (eng.Lse(z, masks.neg),))

  s1, (lse_n,) = eng.stream(neg_fn, inp.rows, inp.cols, tile)
  prow = dict(inp.rows, lse=lse_n, has=s1["n_neg"] > 0, nan=s1["nan"] > 0)

  def pair_fn(rows, cols):
    z = _logits(eng.tile_matrix(rows, cols, distance), sim, temperature)
    masks = eng.tile_masks(rows, cols)
    terms = jnp.where(rows["has"][:, None], jax.nn.softplus(rows["lse"][:, None] - z), 0.0)
    terms = jnp.where(rows["nan"][:, None], jnp.nan, terms)
    return ((jnp.sum(jnp.where(masks.pos, terms, 0.0), axis=-1), eng.count(masks.pos),
             eng.count(masks.pos & (terms > 0))), ())

  sums, _ = eng.stream(pair_fn, prow, inp.cols, tile)
  return eng.finish(*sums, reduction, inp.ctx)


@_doc
def streaming_supcon_loss(
    embeddings: jax.Array, labels: jax.Array,
    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None, *,
    temperature: float = 0.1, distance="cosine", reduction: str = "mean_nonzero",
    where: jax.Array | None = None, ref_where: jax.Array | None = None,
    pair_mask: jax.Array | None = None, ids: jax.Array | None = None,
    ref_ids: jax.Array | None = None, tile_size: int | None = None,
    axis_name: str | None = None) -> jax.Array:
  r"""Supervised contrastive loss over column tiles (same values and
  gradients as :func:`metric_jax.losses.supcon_loss`).

  Per anchor i with positives P(i) and ``z = s / tau``::

    l_i = LSE_{a in P(i) u N(i)} z_ia - 1/|P(i)| sum_{p in P(i)} z_ip

  One streamed pass: an online log-sum-exp over positives and negatives and
  the sum and count of the positive logits.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    temperature, distance: as the dense loss.
    reduction: ``"mean_nonzero"`` (default), ``"mean"``, ``"sum"``, ``"none"``
      ([B] terms).
    {common}

  Returns:
    Scalar float32 loss ([B] terms for ``reduction="none"``).

  References:
    Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020,
    arXiv 2004.11362.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_supcon_loss
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(streaming_supcon_loss(emb, jnp.array([0, 0, 1]), temperature=0.5,
    ...                                   tile_size=2)), 4)
    0.3485
  """
  reductions.check(reduction)
  _checks.scalar(temperature, "temperature", positive=True)
  inp, tile = _setup(embeddings, labels, ref_embeddings, ref_labels, distance, where,
                     ref_where, pair_mask, ids, ref_ids, tile_size, axis_name)
  sim, ctx = inp.is_similarity, inp.ctx

  def fn(rows, cols):
    z = _logits(eng.tile_matrix(rows, cols, distance), sim, temperature)
    masks = eng.tile_masks(rows, cols)
    return ({"nan": _nan_rows(z, masks), "n_pos": eng.count(masks.pos),
             "n_neg": eng.count(masks.neg),
             "pos_sum": jnp.sum(jnp.where(masks.pos, z, 0.0), axis=-1)},
            (eng.Lse(z, masks.pos | masks.neg),))

  sums, (lse_all,) = eng.stream(fn, inp.rows, inp.cols, tile)
  has_p = sums["n_pos"] > 0
  mean_pos = sums["pos_sum"] / jnp.maximum(sums["n_pos"], 1.0)
  terms = lse_all - mean_pos
  terms = jnp.where(sums["nan"] > 0, jnp.nan, terms)
  valid = has_p & (ctx.total(sums["n_pos"]) > 0) & (ctx.total(sums["n_neg"]) > 0)
  terms = jnp.where(valid, terms, 0.0)
  return eng.reduce_terms(terms, valid, reduction, ctx)


@_doc
def streaming_nca_loss(
    embeddings: jax.Array, labels: jax.Array,
    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None, *,
    softmax_scale: float = 1.0, distance="squared_euclidean", reduction: str = "mean",
    where: jax.Array | None = None, ref_where: jax.Array | None = None,
    pair_mask: jax.Array | None = None, ids: jax.Array | None = None,
    ref_ids: jax.Array | None = None, tile_size: int | None = None,
    axis_name: str | None = None) -> jax.Array:
  r"""NCA over column tiles (same values and gradients as
  :func:`metric_jax.losses.nca_loss`).

  Per anchor i with ``z_ij = -scale d_ij`` (``+scale s_ij`` for a
  similarity)::

    l_i = LSE_{j in P(i) u N(i)} z_ij - LSE_{j in P(i)} z_ij

  One streamed pass: two online log-sum-exps. Anchors without a positive
  are dropped; a NaN logit of any anchor makes the loss NaN, as the dense
  loss does.

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    softmax_scale, distance: as the dense loss.
    reduction: ``"mean"`` (default, over anchors with a positive),
      ``"mean_nonzero"``, ``"sum"``, ``"none"`` ([B] terms).
    {common}

  Returns:
    Scalar float32 loss ([B] terms for ``reduction="none"``).

  References:
    Goldberger, Roweis, Hinton, Salakhutdinov, "Neighbourhood Components
    Analysis", NeurIPS 2004.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_nca_loss
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(streaming_nca_loss(emb, jnp.array([0, 0, 1]), tile_size=2)), 4)
    0.3485
  """
  reductions.check(reduction)
  _checks.scalar(softmax_scale, "softmax_scale", positive=True)
  inp, tile = _setup(embeddings, labels, ref_embeddings, ref_labels, distance, where,
                     ref_where, pair_mask, ids, ref_ids, tile_size, axis_name)
  sim, ctx = inp.is_similarity, inp.ctx

  def fn(rows, cols):
    mat = eng.tile_matrix(rows, cols, distance)
    z = softmax_scale * (mat if sim else -mat)
    masks = eng.tile_masks(rows, cols)
    members = masks.pos | masks.neg
    return ({"nan": eng.count(jnp.isnan(z) & members), "n_pos": eng.count(masks.pos)},
            (eng.Lse(z, members), eng.Lse(z, masks.pos)))

  sums, (lse_all, lse_pos) = eng.stream(fn, inp.rows, inp.cols, tile,
                                        symmetric=eng.symmetric_ok(inp, distance))
  has_p = sums["n_pos"] > 0
  terms = jnp.where(has_p, lse_all - lse_pos, 0.0)
  result = eng.reduce_terms(terms, has_p, reduction, ctx)
  return jnp.where(ctx.total(sums["nan"]) > 0, jnp.nan, result)


@_doc
def streaming_npair_loss(
    embeddings: jax.Array, labels: jax.Array,
    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None, *,
    l2_reg: float = 0.002, pairs_per_class: str = "first", distance="dot",
    reduction: str = "mean",
    where: jax.Array | None = None, ref_where: jax.Array | None = None,
    pair_mask: jax.Array | None = None, ids: jax.Array | None = None,
    ref_ids: jax.Array | None = None, tile_size: int | None = None,
    axis_name: str | None = None) -> jax.Array:
  r"""Multi-class N-pair loss over column tiles (same values and gradients
  as :func:`metric_jax.losses.npair_loss`).

  Pairs ``(f_a, f_a^+)`` are chosen as in the dense loss (``"first"``: per
  class the lowest-index anchor with a positive, with its lowest-index
  positive; ``"all"``: every anchor with a positive); then::

    l_a = LSE_{b in A} s(f_a, f_b^+) - s(f_a, f_a^+)
          + 0.25 * l2_reg * (||f_a||^2 + ||f_a^+||^2)

  The choice of pairs is two non-differentiated passes (first positive of
  each anchor; earlier same-class anchors); the chosen anchors and their
  positives are then compacted into K static slots (K = B // 2 for
  ``"first"`` without a reference set, as in the dense loss), and the
  softmax over the chosen anchors' positives is an online log-sum-exp over
  tiles of those positives ([K, T] blocks).

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references holding the positives.
    ref_labels: [M] labels of the references.
    l2_reg, pairs_per_class, distance: as the dense loss.
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"``, ``"none"``
      ([B] terms).
    {common}

  Returns:
    Scalar float32 loss ([B] terms for ``reduction="none"``).

  References:
    Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
    Objective", NeurIPS 2016.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_npair_loss
    >>> emb = jnp.array([[1., 0.], [0.9, 0.1], [0., 1.], [0.2, 0.8], [0., 1.]])
    >>> round(float(streaming_npair_loss(emb, jnp.array([0, 0, 1, 1, 1]), tile_size=2)), 4)
    0.4041
  """
  reductions.check(reduction)
  _checks.scalar(l2_reg, "l2_reg", non_negative=True)
  _checks.choice(pairs_per_class, dense_npair.PAIRS, "pairs_per_class")
  inp, tile = _setup(embeddings, labels, ref_embeddings, ref_labels, distance, where,
                     ref_where, pair_mask, ids, ref_ids, tile_size, axis_name)
  rows, cols, ctx, sim = inp.rows, inp.cols, inp.ctx, inp.is_similarity
  b, m = rows["x"].shape[0], cols["y"].shape[0]

  first, has_pos, _, _ = eng.first_indices(rows, cols, lambda r, c: eng.tile_masks(r, c).pos,
                                        1, tile)
  first, has_pos = first[:, 0], has_pos[:, 0]
  # Columns indexed by anchors (global batch in a sharded run).
  a_cols = {"label": ctx.gather(labels), "has": ctx.gather(has_pos),
            "pos": ctx.gather(inp.anchor_pos)}
  n_anchors = a_cols["label"].shape[0]
  a_tile = tile_size or eng.default_tile(b, n_anchors)
  if pairs_per_class == "first":
    def taken_body(acc, r, c):
      hit = ((r["label"][:, None] == c["label"][None, :]) & c["has"][None, :]
             & (c["pos"][None, :] < r["pos"][:, None]))
      return acc | jnp.any(hit, axis=1)

    taken = eng.scan_tiles(taken_body, jnp.zeros((b,), bool),
                           {"label": labels, "pos": inp.anchor_pos}, a_cols, a_tile)
    chosen = has_pos & ~taken
  else:
    chosen = has_pos

  x = rows["x"]
  positives = cols["y"][first]                                     # [B, D]
  s_cols = {"y": ctx.gather(positives), "label": a_cols["label"],
            "chosen": ctx.gather(chosen), "pos": a_cols["pos"]}
  s_rows = {"x": x, "label": labels, "chosen": chosen, "pos": inp.anchor_pos}
  # Only chosen anchors are rows and columns of the softmax: compact them
  # into K static slots (O(B) gathers) so that the stream is [K, K], not
  # [B, B]. With "first" and no reference set every chosen class has >= 2
  # samples, so K = B // 2 slots hold them all. Rows are compacted on one
  # device only (under axis_name one device may hold all the chosen rows).
  k_cols = _npair_slots(n_anchors, pairs_per_class, ref_embeddings is None, m)
  if k_cols < n_anchors:
    s_cols = _compact(s_cols, k_cols)
  k_rows = _npair_slots(b, pairs_per_class, ref_embeddings is None, m)
  row_slot = None
  if axis_name is None and k_rows < b:
    row_slot = jnp.nonzero(chosen, size=k_rows, fill_value=0)[0]
    s_rows = _compact(s_rows, k_rows)
  a_tile = tile_size or eng.default_tile(s_rows["x"].shape[0], s_cols["y"].shape[0])

  def fn(r, c):
    mat = distances_tile(r["x"], c["y"], distance)
    logits = mat if sim else -mat
    same = r["label"][:, None] == c["label"][None, :]
    diag = r["pos"][:, None] == c["pos"][None, :]
    mask = c["chosen"][None, :] & (~same | diag) & r["chosen"][:, None]
    return {}, (eng.Lse(logits, mask),)

  _, (lse,) = eng.stream(fn, s_rows, s_cols, a_tile)
  if row_slot is not None:   # back to [B]; rows that are not chosen get no term
    # (unused slots point at row 0 and add 0 there)
    lse = jnp.zeros((b,), lse.dtype).at[row_slot].add(jnp.where(s_rows["chosen"], lse, 0.0))
  own = distances_lib.paired(x, positives, distance)
  own = own if sim else -own
  sq = lambda v: jnp.sum(v * v, axis=-1)
  terms = lse - own + 0.25 * l2_reg * (sq(x) + sq(positives))
  return eng.reduce_terms(terms, chosen, reduction, ctx)


def _npair_slots(n: int, pairs_per_class: str, self_compare: bool, m: int) -> int:
  """Static number of slots that holds every chosen N-pair anchor of n."""
  if pairs_per_class == "all":
    return n
  return max(n // 2, 1) if self_compare else min(n, m)


def _compact(tree: dict, k: int) -> dict:
  """The rows with ``tree["chosen"]`` moved to the first of k slots (in
  index order); unused slots are copies of row 0 marked not chosen."""
  chosen = tree["chosen"]
  slot = jnp.nonzero(chosen, size=k, fill_value=0)[0]
  used = jnp.arange(k) < jnp.sum(chosen)
  out = {name: v[slot] for name, v in tree.items()}
  out["chosen"] = out["chosen"] & used
  return out


def distances_tile(x, y, distance):
  return eng.tile_matrix({"x": x}, {"y": y}, distance)
