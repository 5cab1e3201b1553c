"""Streaming ranked list loss: the weighted means of the violating positives
and negatives reduced over column tiles."""

from __future__ import annotations

__all__ = ["streaming_ranked_list_loss"]

import jax
import jax.numpy as jnp

from metric_jax import reductions
from metric_jax.losses import ranked_list as dense
from metric_jax.streaming import _engine as eng
from metric_jax.streaming import softmax


@softmax._doc  # pylint: disable=protected-access
def streaming_ranked_list_loss(
    embeddings: jax.Array, labels: jax.Array,
    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None, *,
    margin: float = 0.2, Tn: float = 10.0, Tp: float = 0.0,  # pylint: disable=invalid-name
    imbalance: float = 0.5, alpha: float | None = None, pml_compat: bool = False,
    distance="euclidean", reduction: str = "mean",
    where: jax.Array | None = None, ref_where: jax.Array | None = None,
    pair_mask: jax.Array | None = None, ids: jax.Array | None = None,
    ref_ids: jax.Array | None = None, tile_size: int | None = None,
    axis_name: str | None = None) -> jax.Array:
  r"""Ranked list loss over column tiles (same values and gradients as
  :func:`metric_jax.losses.ranked_list_loss`).

  Per anchor, ``L_P`` and ``L_N`` are ratios of per-row sums over the
  violating pairs (``sum w x / sum w``), accumulated tile by tile. The
  weights are shifted by their row maximum (found by a first,
  non-differentiated pass; not with ``pml_compat=True``, whose weights are
  unshifted, as PML's).

  Args:
    embeddings: [B, D] float anchors.
    labels: [B] integer labels.
    ref_embeddings: optional [M, D] references.
    ref_labels: [M] labels of the references.
    margin, Tn, Tp, imbalance, alpha, pml_compat, distance: as the dense loss.
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"``, ``"none"``
      ([B] terms).
    {common}

  Returns:
    Scalar float32 loss ([B] terms for ``reduction="none"``).

  References:
    Wang, Hua, Kodirov, Hu, Garnier, Robertson, "Ranked List Loss for Deep
    Metric Learning", CVPR 2019, arXiv 1903.03238.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.streaming import streaming_ranked_list_loss
    >>> emb = jnp.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> round(float(streaming_ranked_list_loss(emb, jnp.array([0, 0, 1]), tile_size=2)), 4)
    0.0685
  """
  reductions.check(reduction)
  alpha = dense.check_args(margin, Tn, Tp, imbalance, alpha, distance)
  inp, tile = softmax._setup(  # pylint: disable=protected-access
      embeddings, labels, ref_embeddings, ref_labels, distance, where, ref_where, pair_mask,
      ids, ref_ids, tile_size, axis_name)
  params = dict(margin=margin, Tn=Tn, Tp=Tp, alpha=alpha, pml_compat=pml_compat)

  def tile_sets(rows, cols):
    masks = eng.tile_masks(rows, cols)
    return dense.weighted_sets(eng.tile_matrix(rows, cols, distance), masks.pos, masks.neg,
                               **params)

  b = inp.rows["x"].shape[0]
  if pml_compat:
    shifts = (0.0, 0.0)
  else:
    def running_max(carry, rows, cols):
      logws = dense.masked_log_weights(tile_sets(rows, cols))
      return tuple(jnp.maximum(c, jnp.max(logw, axis=1)) for c, logw in zip(carry, logws))

    maxima = eng.scan_tiles(running_max, (jnp.full((b,), -jnp.inf),) * 2, inp.rows,
                            inp.cols, tile)
    shifts = tuple(dense.finite_shift(m) for m in maxima)
  rows = dict(inp.rows, shift_p=shifts[0] + jnp.zeros((b,)),
              shift_n=shifts[1] + jnp.zeros((b,)))

  def fn(r, c):
    shift = [jax.lax.stop_gradient(r[k])[:, None] for k in ("shift_p", "shift_n")]
    den_p, num_p, den_n, num_n = dense.weighted_summands(tile_sets(r, c), shift)
    return ({"den_p": jnp.sum(den_p, axis=1), "num_p": jnp.sum(num_p, axis=1),
             "den_n": jnp.sum(den_n, axis=1), "num_n": jnp.sum(num_n, axis=1)}, ())

  sums, _ = eng.stream(fn, rows, inp.cols, tile)
  n_cols = jnp.sum(inp.cols["valid"].astype(jnp.float32))   # the global set with axis_name
  loss_p = dense.weighted_mean(sums["den_p"], sums["num_p"], pml_compat, n_cols)
  loss_n = dense.weighted_mean(sums["den_n"], sums["num_n"], pml_compat, n_cols)
  terms = dense.combine(loss_p, loss_n, imbalance)
  return eng.reduce_terms(terms, inp.rows["valid"], reduction, inp.ctx)
