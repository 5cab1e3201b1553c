"""npair_loss and npair_loss_from_pairs vs loop references (Sohn's formula,
tf.contrib's regulariser and soft targets), the loss contract and PML."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings)


def np_lse(xs):
  xs = np.asarray(xs, np.float64)
  m = xs.max()
  return m + np.log(np.sum(np.exp(xs - m)))


def reduce_np(vals, reduction):
  vals = np.asarray(vals, np.float64)
  if reduction == "sum":
    return vals.sum()
  if reduction == "mean":
    return vals.sum() / max(len(vals), 1)
  return vals.sum() / max(int(np.sum(vals > 0)), 1)


def npair_np(emb, labels, ref=None, ref_labels=None, *, l2_reg=0.002, pairs="first",
             metric="dot", where=None, ref_where=None, pair_mask=None, reduction="mean"):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  x = np.asarray(emb, np.float64)
  r = np.asarray(ref, np.float64)
  b, m = len(x), len(r)
  w = np.ones(b, bool) if where is None else np.asarray(where)
  rw = np.ones(m, bool) if ref_where is None else np.asarray(ref_where)
  pm = np.ones((b, m), bool) if pair_mask is None else np.asarray(pair_mask)
  first_pos = {}
  for i in range(b):
    if not w[i]:
      continue
    for j in range(m):
      if rw[j] and pm[i, j] and labels[i] == ref_labels[j] and not (same and i == j):
        first_pos[i] = j
        break
  chosen, seen = [], set()
  for i in range(b):
    if i in first_pos and (pairs == "all" or labels[i] not in seen):
      chosen.append(i)
      seen.add(labels[i])
  sim = metric in ("cosine", "dot")
  terms = []
  for a in chosen:
    logits = {}
    for c in chosen:
      if c != a and labels[c] == labels[a]:
        continue
      v = np_pairwise(x[a:a + 1], r[first_pos[c]:first_pos[c] + 1], metric)[0, 0]
      logits[c] = v if sim else -v
    ce = np_lse(list(logits.values())) - logits[a]
    reg = 0.25 * l2_reg * (x[a] @ x[a] + r[first_pos[a]] @ r[first_pos[a]])
    terms.append(ce + reg)
  return reduce_np(terms, reduction)


def npair_pairs_np(anchors, positives, labels=None, l2_reg=0.002, metric="dot", where=None):
  """tf.contrib npairs_loss: softmax cross-entropy with row-normalised
  label-equality targets, plus 0.25 * lambda * (mean |a|^2 + mean |p|^2)."""
  a = np.asarray(anchors, np.float64)
  p = np.asarray(positives, np.float64)
  n = len(a)
  w = np.ones(n, bool) if where is None else np.asarray(where)
  idx = [i for i in range(n) if w[i]]
  lab = np.arange(n) if labels is None else np.asarray(labels)
  sim = metric in ("cosine", "dot")
  ces, ra, rp = [], [], []
  for i in idx:
    logits = []
    for j in idx:
      v = np_pairwise(a[i:i + 1], p[j:j + 1], metric)[0, 0]
      logits.append(v if sim else -v)
    lse = np_lse(logits)
    targets = np.array([float(lab[i] == lab[j]) for j in idx])
    targets /= targets.sum()
    ces.append(-sum(t * (lg - lse) for t, lg in zip(targets, logits)))
    ra.append(a[i] @ a[i])
    rp.append(p[i] @ p[i])
  if not idx:
    return 0.0
  return np.mean(ces) + 0.25 * l2_reg * (np.mean(ra) + np.mean(rp))


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("pairs", ["first", "all"])
@pytest.mark.parametrize("metric", ["dot", "euclidean", "cosine"])
def test_matches_loop_reference(layout, pairs, metric):
  emb = random_embeddings(0, 12, 4)
  labels = label_layouts()[layout]
  got = mj.losses.npair_loss(emb, labels, pairs_per_class=pairs, distance=metric, l2_reg=0.01)
  want = npair_np(emb, labels, pairs=pairs, metric=metric, l2_reg=0.01)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
def test_reductions_and_none(reduction):
  emb = random_embeddings(1, 12, 4)
  labels = label_layouts()["with_singletons"]
  got = mj.losses.npair_loss(emb, labels, reduction=reduction)
  np.testing.assert_allclose(got, npair_np(emb, labels, reduction=reduction), rtol=1e-5)
  terms = mj.losses.npair_loss(emb, labels, reduction="none")
  assert terms.shape == (12,)
  # Chosen anchors: the first sample of each class with >= 2 samples.
  assert np.flatnonzero(np.asarray(terms)).tolist() == [0, 3, 7]


def test_reference_set_where_and_pair_mask():
  emb = random_embeddings(2, 8, 4)
  ref = random_embeddings(3, 10, 4)
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 5])
  ref_labels = np.array([1, 0, 0, 2, 3, 4, 1, 2, 4, 4])
  where = np.array([True] * 7 + [False])
  ref_where = np.array([True] * 8 + [False, True])
  mask = np.ones((8, 10), bool)
  mask[0, 1] = False                      # anchor 0 must take its next positive
  for pairs in ("first", "all"):
    got = mj.losses.npair_loss(emb, labels, ref, ref_labels, pairs_per_class=pairs,
                               where=where, ref_where=ref_where, pair_mask=mask)
    want = npair_np(emb, labels, ref, ref_labels, pairs=pairs, where=where,
                    ref_where=ref_where, pair_mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_equals_explicit_pair_layout():
  # A batch of exactly two samples per class is the paper's N-pair batch.
  a = random_embeddings(4, 5, 3)
  p = random_embeddings(5, 5, 3)
  emb = np.stack([a, p], 1).reshape(10, 3)
  labels = np.repeat(np.arange(5), 2)
  got = mj.losses.npair_loss(emb, labels)
  np.testing.assert_allclose(got, mj.losses.npair_loss_from_pairs(a, p), rtol=1e-5)
  np.testing.assert_allclose(got, npair_pairs_np(a, p), rtol=1e-5)


@pytest.mark.parametrize("per_class", [2, 4, 8])
def test_slot_count_follows_the_batch(per_class):
  # B = 16 gives 8 static slots; 2, 4 and 8 samples per class choose 8, 4
  # and 2 pairs, i.e. the full, the halved and the quartered softmax.
  b, d = 16, 3
  emb = jnp.asarray(random_embeddings(6, b, d))
  labels = np.repeat(np.arange(b // per_class), per_class)
  first = np.arange(0, b, per_class)
  explicit = lambda e: mj.losses.npair_loss_from_pairs(e[first], e[first + 1])
  loss = lambda e: mj.losses.npair_loss(e, labels)
  np.testing.assert_allclose(jax.jit(loss)(emb), explicit(emb), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(loss)(emb), jax.grad(explicit)(emb), rtol=1e-5, atol=1e-7)
  none = mj.losses.npair_loss(emb, labels, reduction="none")
  assert none.shape == (b,) and np.count_nonzero(np.asarray(none)) == len(first)


@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("metric", ["dot", "euclidean"])
def test_from_pairs_matches_tf_contrib_formula(with_labels, metric):
  a = random_embeddings(6, 7, 4)
  p = random_embeddings(7, 7, 4)
  labels = np.array([0, 1, 1, 2, 3, 3, 3]) if with_labels else None
  where = np.array([True] * 6 + [False])
  got = mj.losses.npair_loss_from_pairs(a, p, labels=labels, l2_reg=0.02, distance=metric)
  np.testing.assert_allclose(got, npair_pairs_np(a, p, labels, 0.02, metric), rtol=1e-5)
  got = mj.losses.npair_loss_from_pairs(a, p, labels=labels, l2_reg=0.02, distance=metric,
                                        where=where)
  np.testing.assert_allclose(got, npair_pairs_np(a, p, labels, 0.02, metric, where), rtol=1e-5)


def test_from_pairs_jit_grad_and_padding():
  a = jnp.asarray(random_embeddings(8, 6, 3))
  p = jnp.asarray(random_embeddings(9, 6, 3))
  where = jnp.arange(6) < 4
  fn = lambda a_, p_: mj.losses.npair_loss_from_pairs(a_, p_, where=where)
  np.testing.assert_allclose(jax.jit(fn)(a, p), fn(a, p), rtol=1e-6)
  padded_a = a.at[4:].set(jnp.nan)
  val, (ga, gp) = jax.value_and_grad(fn, argnums=(0, 1))(padded_a, p)
  np.testing.assert_allclose(val, mj.losses.npair_loss_from_pairs(a[:4], p[:4]), rtol=1e-6)
  assert float(jnp.abs(ga[4:]).max()) == 0.0 and float(jnp.abs(gp[4:]).max()) == 0.0
  assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gp))
  vm = jax.vmap(fn)(jnp.stack([a, -a]), jnp.stack([p, p]))
  np.testing.assert_allclose(vm, [fn(a, p), fn(-a, p)], rtol=1e-6)


def test_max_pairs():
  emb = random_embeddings(13, 12, 5)
  labels = label_layouts()["m_per_class"]            # 4 classes x 3
  full = mj.losses.npair_loss(emb, labels)
  np.testing.assert_allclose(mj.losses.npair_loss(emb, labels, max_pairs=4), full, rtol=1e-6)
  # A cap below the number of classes keeps the lowest-index anchors.
  got = mj.losses.npair_loss(emb, labels, max_pairs=2)
  keep = labels < 2
  np.testing.assert_allclose(got, npair_np(emb, labels, where=keep), rtol=1e-5)
  terms = mj.losses.npair_loss(emb, labels, max_pairs=2, reduction="none")
  assert np.flatnonzero(np.asarray(terms)).tolist() == [0, 3]
  with pytest.raises(ValueError, match="`max_pairs` must be >= 1"):
    mj.losses.npair_loss(emb, labels, max_pairs=0)


def test_regulariser_value_and_gradient():
  emb = jnp.asarray(random_embeddings(10, 4, 3))
  labels = jnp.array([0, 0, 1, 1])
  base = mj.losses.npair_loss(emb, labels, l2_reg=0.0)
  reg = mj.losses.npair_loss(emb, labels, l2_reg=0.5)
  e = np.asarray(emb, np.float64)
  want = 0.25 * 0.5 * ((e[0] @ e[0] + e[2] @ e[2]) / 2 + (e[1] @ e[1] + e[3] @ e[3]) / 2)
  np.testing.assert_allclose(reg - base, want, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"pairs_per_class": "all", "distance": "euclidean"}])
def test_contract(kw):
  check_loss_contract(lambda e, l, **k: mj.losses.npair_loss(e, l, **kw, **k))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`pairs_per_class` must be one of"):
    mj.losses.npair_loss(emb, lab, pairs_per_class="random")
  with pytest.raises(ValueError, match="`l2_reg` must be >= 0"):
    mj.losses.npair_loss(emb, lab, l2_reg=-1.0)
  with pytest.raises(ValueError, match="`labels` must have length 4"):
    mj.losses.npair_loss(emb, lab[:2])
  with pytest.raises(ValueError, match="`anchors` and `positives` must have the same shape"):
    mj.losses.npair_loss_from_pairs(emb, jnp.ones((3, 3)))
  with pytest.raises(ValueError, match="`positives` must have rank 2"):
    mj.losses.npair_loss_from_pairs(emb, jnp.ones(3))
  with pytest.raises(ValueError, match="`labels` must have length 4"):
    mj.losses.npair_loss_from_pairs(emb, emb, labels=lab[:3])
  with pytest.raises(ValueError, match="`where` must have shape"):
    mj.losses.npair_loss_from_pairs(emb, emb, where=jnp.ones(3, bool))


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "all_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import distances as pml_distances
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(11, 12, 6)
  labels = label_layouts()[layout]
  t_emb, t_lab = torch.tensor(emb), torch.tensor(labels)
  # PML default: cosine logits (normalised dot product), no regulariser.
  want = pml_losses.NPairsLoss()(t_emb, t_lab).item()
  got = mj.losses.npair_loss(np_normalize(emb).astype(np.float32), labels, l2_reg=0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Raw inner products.
  pml = pml_losses.NPairsLoss(
      distance=pml_distances.DotProductSimilarity(normalize_embeddings=False))
  want = pml(t_emb, t_lab).item()
  got = mj.losses.npair_loss(emb, labels, l2_reg=0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_parity_with_regulariser():
  import torch
  from pytorch_metric_learning import distances as pml_distances
  from pytorch_metric_learning import losses as pml_losses
  from pytorch_metric_learning import regularizers as pml_reg
  emb = random_embeddings(12, 10, 5)
  labels = np.repeat(np.arange(5), 2)          # exactly two per class
  lam = 0.02
  pml = pml_losses.NPairsLoss(
      distance=pml_distances.DotProductSimilarity(normalize_embeddings=False),
      embedding_regularizer=pml_reg.LpRegularizer(power=2), embedding_reg_weight=0.5 * lam)
  want = pml(torch.tensor(emb), torch.tensor(labels)).item()
  got = mj.losses.npair_loss(emb, labels, l2_reg=lam)
  np.testing.assert_allclose(got, want, rtol=1e-5)
