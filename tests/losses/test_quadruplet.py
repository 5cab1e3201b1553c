"""quadruplet_loss vs explicit loops over triplets and quadruplets, a dense
JAX version for gradients, the loss contract and the memory bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from benchmarks import common
from metric_jax.losses import quadruplet as quadruplet_lib
from tests.helpers import check_loss_contract, label_layouts, np_pairwise, random_embeddings


def reduce_np(vals, reduction):
  vals = np.asarray(vals, np.float64)
  if reduction == "sum":
    return vals.sum()
  if reduction == "mean":
    return vals.sum() / max(len(vals), 1)
  return vals.sum() / max(int(np.sum(vals > 0)), 1)


def quadruplet_np(emb, labels, ref=None, ref_labels=None, *, margin1=0.2, margin2=0.1,
                  adaptive=False, weights=(1.0, 0.5), squared=False, metric="euclidean",
                  where=None, ref_where=None, pair_mask=None, reduction="mean"):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  b, m = len(emb), len(ref)
  w = np.ones(b, bool) if where is None else np.asarray(where)
  rw = np.ones(m, bool) if ref_where is None else np.asarray(ref_where)
  pm = np.ones((b, m), bool) if pair_mask is None else np.asarray(pair_mask)
  d = np_pairwise(emb, ref, metric)
  if metric in ("cosine", "dot"):
    d = -d
  if squared:
    d = d ** 2

  def is_pos(i, j):
    return w[i] and rw[j] and pm[i, j] and labels[i] == ref_labels[j] and not (same and i == j)

  def is_neg(i, k):
    return w[i] and rw[k] and pm[i, k] and labels[i] != ref_labels[k]

  pos = [(i, j) for i in range(b) for j in range(m) if is_pos(i, j)]
  neg = [(l, k) for l in range(b) for k in range(m) if is_neg(l, k)]
  if adaptive:
    gap = (np.mean([d[p] for p in neg]) if neg else 0.0) - (np.mean([d[p] for p in pos]) if pos else 0.0)
    margin1, margin2 = weights[0] * gap, weights[1] * gap
  t1, t2 = [], []
  for i, j in pos:
    for k in range(m):
      if is_neg(i, k):
        t1.append(max(0.0, d[i, j] - d[i, k] + margin1))
    for l, k in neg:
      if labels[l] != labels[i] and ref_labels[k] != labels[i]:
        t2.append(max(0.0, d[i, j] - d[l, k] + margin2))
  return reduce_np(t1, reduction) + reduce_np(t2, reduction)


def quadruplet_dense_jax(emb, labels, margin1=0.2, margin2=0.1):
  """B^4 version (small B only), for gradients."""
  d = mj.distances.pairwise(emb)
  b = emb.shape[0]
  same = labels[:, None] == labels[None, :]
  pos = same & ~jnp.eye(b, dtype=bool)
  neg = ~same
  t1 = jax.nn.relu(d[:, :, None] - d[:, None, :] + margin1)
  m1 = pos[:, :, None] & neg[:, None, :]
  # [i, j, l, k]
  t2 = jax.nn.relu(d[:, :, None, None] - d[None, None, :, :] + margin2)
  m2 = (pos[:, :, None, None] & neg[None, None, :, :] & neg[:, None, :, None]
        & neg[:, None, None, :])
  mean = lambda t, msk: jnp.sum(jnp.where(msk, t, 0)) / jnp.maximum(jnp.sum(msk), 1)
  return mean(t1, m1) + mean(t2, m2)


@pytest.mark.parametrize("layout", list(label_layouts(12)))
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
def test_matches_loop_reference(layout, reduction):
  emb = random_embeddings(0, 12, 5, scale=0.5)
  labels = label_layouts(12)[layout]
  got = mj.losses.quadruplet_loss(emb, labels, margin1=0.4, margin2=0.3, reduction=reduction)
  want = quadruplet_np(emb, labels, margin1=0.4, margin2=0.3, reduction=reduction)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("metric,squared", [("euclidean", True), ("cosine", False),
                                            ("squared_euclidean", False)])
@pytest.mark.parametrize("adaptive", [False, True])
def test_metrics_and_adaptive_margins(metric, squared, adaptive):
  emb = random_embeddings(1, 12, 5, scale=0.5)
  labels = label_layouts(12)["with_singletons"]
  kw = dict(margin1=0.3, margin2=0.2, squared=squared, adaptive=adaptive)
  got = mj.losses.quadruplet_loss(emb, labels, distance=metric, **kw)
  want = quadruplet_np(emb, labels, metric=metric, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
def test_reference_set_where_and_pair_mask(reduction):
  emb = random_embeddings(2, 8, 5, scale=0.5)
  ref = random_embeddings(3, 9, 5, scale=0.5)
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 5])
  ref_labels = np.array([0, 0, 1, 2, 3, 4, 1, 2, 4])
  where = np.array([True] * 7 + [False])
  ref_where = np.array([True] * 7 + [False, True])
  mask = np.random.default_rng(0).random((8, 9)) < 0.8
  kw = dict(margin1=0.5, margin2=0.4, where=where, ref_where=ref_where, reduction=reduction)
  got = mj.losses.quadruplet_loss(emb, labels, ref, ref_labels, **kw)
  np.testing.assert_allclose(got, quadruplet_np(emb, labels, ref, ref_labels, **kw), rtol=1e-5)
  # An asymmetric pair mask on the batch itself.
  emb10 = random_embeddings(4, 12, 5, scale=0.5)
  lab10 = label_layouts(12)["m_per_class"]
  mask = np.random.default_rng(1).random((12, 12)) < 0.7
  got = mj.losses.quadruplet_loss(emb10, lab10, margin1=0.5, margin2=0.4, pair_mask=mask,
                                  reduction=reduction)
  want = quadruplet_np(emb10, lab10, margin1=0.5, margin2=0.4, pair_mask=mask,
                       reduction=reduction)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gradient_matches_dense_version():
  emb = jnp.asarray(random_embeddings(5, 12, 5, scale=0.5))
  labels = jnp.asarray(label_layouts()["with_singletons"])
  fn = lambda e: mj.losses.quadruplet_loss(e, labels, margin1=0.5, margin2=0.3)
  dense = lambda e: quadruplet_dense_jax(e, labels, 0.5, 0.3)
  v, g = jax.jit(jax.value_and_grad(fn))(emb)
  v_dense, g_dense = jax.jit(jax.value_and_grad(dense))(emb)
  np.testing.assert_allclose(v, v_dense, rtol=1e-5)
  np.testing.assert_allclose(g, g_dense, rtol=1e-4, atol=1e-6)


def test_ties_are_strict():
  # d_lk == d_ij + margin2 is an inactive (zero) term: excluded from mean_nonzero.
  # Integer coordinates: every distance is exact in float32, so
  # d_lk = d_ij + margin2 happens exactly (d_01 = 1, d_{3,4} = 1.5).
  x = np.array([0.0, 1.0, 3.0, 4.5, 6.0, 7.0, 20.0, 21.5, 30.0, 31.0, 40.0, 42.0])
  emb = np.zeros((12, 5), np.float32)
  emb[:, 0] = x
  labels = np.repeat(np.arange(6), 2)
  kw = dict(margin1=0.5, margin2=0.5, reduction="mean_nonzero")
  got = mj.losses.quadruplet_loss(emb, labels, **kw)
  np.testing.assert_allclose(got, quadruplet_np(emb, labels, **kw), rtol=1e-5)


def test_segmented_count_sum():
  rng = np.random.default_rng(0)
  n, q = 200, 50
  seg = rng.integers(0, 5, (2, n))
  val = rng.integers(0, 10, n).astype(np.float32)   # many ties
  valid = rng.random(n) < 0.8
  qseg = rng.integers(0, 6, (2, q))
  qval = rng.integers(0, 11, q).astype(np.float32)
  cnt, tot = quadruplet_lib.segmented_count_sum(
      jnp.asarray(val), jnp.asarray(valid), jnp.asarray(qval),
      tuple((jnp.asarray(seg[p]), jnp.asarray(qseg[p])) for p in range(2)), num_segments=6)
  cnt, tot = np.asarray(cnt), np.asarray(tot)
  assert cnt.shape == tot.shape == (3, q)
  for t in range(q):
    for p in range(3):
      same = np.ones(n, bool) if p == 0 else seg[p - 1] == qseg[p - 1, t]
      sel = valid & same & (val < qval[t])
      assert cnt[p, t] == sel.sum()
      np.testing.assert_allclose(tot[p, t], val[sel].sum(), rtol=1e-6)


def test_radix_argsort_is_a_stable_float_sort():
  rng = np.random.default_rng(2)
  x = np.concatenate([rng.normal(size=300) * 10, [0.0, -0.0, 0.0, -1e-30, 1e30, -np.inf],
                      rng.integers(-3, 3, 200)]).astype(np.float32)    # many ties
  key = quadruplet_lib._orderable_bits(jnp.asarray(x))
  order = quadruplet_lib._stable_argsort_bits(key, 32, jnp.arange(len(x), dtype=jnp.int32))
  # -0.0 and 0.0 compare equal, so they keep their input order.
  np.testing.assert_array_equal(order, np.argsort(x + np.float32(0.0), kind="stable"))
  seg = rng.integers(0, 37, len(x)).astype(np.uint32)
  by_seg = quadruplet_lib._stable_argsort_bits(jnp.asarray(seg), 6, order)
  np.testing.assert_array_equal(by_seg, np.asarray(order)[np.argsort(seg[order], kind="stable")])


def test_segmented_sums_keep_precision_after_large_segments():
  # A small segment sorted after a huge one: a plain float32 prefix sum
  # would lose its sum to the rounding of the first segment's 1e7 total.
  n_big = 10000
  val = np.concatenate([np.full(n_big, 1000.0), [0.001, 0.002, 0.004]]).astype(np.float32)
  seg = np.concatenate([np.zeros(n_big, np.int32), np.ones(3, np.int32)])
  cnt, tot = quadruplet_lib.segmented_count_sum(
      jnp.asarray(val), jnp.ones(n_big + 3, bool), jnp.array([0.003, 1.0], jnp.float32),
      ((jnp.asarray(seg), jnp.array([1, 1])),), num_segments=2)
  assert np.asarray(cnt)[1].tolist() == [2, 3]
  # float32 rounding of the 1e7 prefix alone is ~0.5; the split sum is exact
  # to ~1e-7.
  np.testing.assert_allclose(np.asarray(tot)[1], [0.003, 0.007], rtol=0, atol=1e-6)


def test_contract():
  check_loss_contract(lambda e, l, **k: mj.losses.quadruplet_loss(e, l, margin1=0.6,
                                                                  margin2=0.4, **k))


def test_adaptive_margin_has_no_gradient_path():
  emb = jnp.asarray(random_embeddings(6, 12, 5))
  labels = jnp.asarray(label_layouts()["m_per_class"])
  fn = lambda e: mj.losses.quadruplet_loss(e, labels, adaptive=True)
  g = jax.jit(jax.grad(fn))(emb)
  # Same gradient as fixed margins equal to the (constant) adaptive values.
  d = np_pairwise(emb, emb)
  same = np.asarray(labels)[:, None] == np.asarray(labels)[None, :]
  gap = d[~same].mean() - d[same & ~np.eye(12, dtype=bool)].mean()
  fixed = lambda e: mj.losses.quadruplet_loss(e, labels, margin1=gap, margin2=0.5 * gap)
  np.testing.assert_allclose(g, jax.jit(jax.grad(fixed))(emb), rtol=1e-4, atol=1e-6)


def test_memory_under_two_gib_at_1024():
  b, d = 1024, 128
  emb = jnp.zeros((b, d))
  labels = jnp.repeat(jnp.arange(b // 4), 4)
  for loss in (lambda e: mj.losses.quadruplet_loss(e, labels),
               lambda e: mj.losses.triplet_margin_loss(e, labels, mining="all")):
    peak = common.compiled_peak_bytes(jax.jit(jax.value_and_grad(loss)), emb)
    assert peak is not None and peak < 2 * 2**30, common.fmt_bytes(peak)


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    mj.losses.quadruplet_loss(emb, lab, reduction="none")
  with pytest.raises(ValueError, match="`squared=True` needs a distance"):
    mj.losses.quadruplet_loss(emb, lab, squared=True, distance="cosine")
  with pytest.raises(ValueError, match="`adaptive_weights` must be a pair"):
    mj.losses.quadruplet_loss(emb, lab, adaptive=True, adaptive_weights=(1.0,))
  with pytest.raises(ValueError, match="`margin2` must be a scalar"):
    mj.losses.quadruplet_loss(emb, lab, margin2=jnp.ones(2))
  with pytest.raises(ValueError, match="`ref_labels`"):
    mj.losses.quadruplet_loss(emb, lab, emb, None)
