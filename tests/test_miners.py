"""Miners vs loop references, jit/vmap, composition with the losses, the
distance-weighted sampling distribution, and PML parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from metric_jax import miners
from tests.helpers import HAS_PML, label_layouts, np_normalize, np_pairwise, random_embeddings


def masks_np(labels, ref_labels=None, where=None, ref_where=None):
  same = ref_labels is None
  if same:
    ref_labels, ref_where = labels, where
  b, m = len(labels), len(ref_labels)
  w = np.ones(b, bool) if where is None else np.asarray(where)
  rw = np.ones(m, bool) if ref_where is None else np.asarray(ref_where)
  pos = np.zeros((b, m), bool)
  neg = np.zeros((b, m), bool)
  for i in range(b):
    for j in range(m):
      if not (w[i] and rw[j]):
        continue
      if labels[i] == ref_labels[j]:
        pos[i, j] = not (same and i == j)
      else:
        neg[i, j] = True
  return pos, neg


def dist_np(emb, ref, metric):
  d = np_pairwise(emb, emb if ref is None else ref, metric)
  return -d if metric in ("cosine", "dot") else d


def batch_hard_np(d, pos, neg):
  out = np.zeros_like(pos)
  for a in range(len(d)):
    ps, ns = np.flatnonzero(pos[a]), np.flatnonzero(neg[a])
    if len(ps) and len(ns):
      out[a, ps[np.argmax(d[a, ps])]] = True
      out[a, ns[np.argmin(d[a, ns])]] = True
  return out


def semihard_np(d, pos, neg, margin, kind):
  out = np.zeros_like(pos)
  for a in range(len(d)):
    ps, ns = np.flatnonzero(pos[a]), np.flatnonzero(neg[a])
    for p in ps:
      if kind == "facenet":
        band = [n for n in ns if d[a, p] < d[a, n] < d[a, p] + margin]
        if band:
          out[a, p] = True
          out[a, band] = True
      elif len(ns):
        farther = [n for n in ns if d[a, n] > d[a, p]]
        chosen = min(farther, key=lambda n: d[a, n]) if farther else max(ns, key=lambda n: d[a, n])
        out[a, p] = out[a, chosen] = True
  return out


def hardest_negative_pair_np(d, pos, neg):
  out = pos.copy()
  for a in range(len(d)):
    ns = np.flatnonzero(neg[a])
    if pos[a].any() and len(ns):
      out[a, ns[np.argmin(d[a, ns])]] = True
  return out


def multi_similarity_np(d, pos, neg, eps):
  out = np.zeros_like(pos)
  for a in range(len(d)):
    ps, ns = np.flatnonzero(pos[a]), np.flatnonzero(neg[a])
    if not len(ps) or not len(ns):
      continue
    for p in ps:
      out[a, p] = d[a, p] + eps > d[a, ns].min()
    for n in ns:
      out[a, n] = d[a, n] - eps < d[a, ps].max()
  return out


def pair_margin_np(raw, pos, neg, pos_margin, neg_margin, sim):
  out = np.zeros_like(pos)
  for a in range(len(raw)):
    for j in range(raw.shape[1]):
      if pos[a, j]:
        out[a, j] = raw[a, j] < pos_margin if sim else raw[a, j] > pos_margin
      elif neg[a, j]:
        out[a, j] = raw[a, j] > neg_margin if sim else raw[a, j] < neg_margin
  return out


CASES = {
    "batch_hard": (miners.batch_hard_miner, {}, lambda d, p, n, r, s: batch_hard_np(d, p, n)),
    "semihard_facenet": (miners.semihard_miner, {"margin": 0.4},
                         lambda d, p, n, r, s: semihard_np(d, p, n, 0.4, "facenet")),
    "semihard_tf": (miners.semihard_miner, {"semihard": "tf"},
                    lambda d, p, n, r, s: semihard_np(d, p, n, 0.0, "tf")),
    "hardest_negative_pair": (miners.hardest_negative_pair_miner, {},
                              lambda d, p, n, r, s: hardest_negative_pair_np(d, p, n)),
    "multi_similarity": (miners.multi_similarity_miner, {"epsilon": 0.2},
                         lambda d, p, n, r, s: multi_similarity_np(d, p, n, 0.2)),
    "pair_margin": (miners.pair_margin_miner, {"pos_margin": 1.0, "neg_margin": 1.6},
                    lambda d, p, n, r, s: pair_margin_np(r, p, n, 1.0, 1.6, s)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_matches_loop_reference(name, layout, metric):
  fn, kw, ref_fn = CASES[name]
  if name == "pair_margin" and metric == "cosine":
    kw = {"pos_margin": 0.3, "neg_margin": -0.1}
    ref_fn = lambda d, p, n, r, s: pair_margin_np(r, p, n, 0.3, -0.1, s)
  emb = random_embeddings(0, 12, 5)
  labels = label_layouts()[layout]
  got = np.asarray(fn(emb, labels, distance=metric, **kw))
  pos, neg = masks_np(labels)
  raw = np_pairwise(emb, emb, metric)
  want = ref_fn(dist_np(emb, None, metric), pos, neg, raw, metric == "cosine")
  assert got.dtype == bool and got.shape == (12, 12)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_set_and_where(name):
  fn, kw, ref_fn = CASES[name]
  emb = random_embeddings(1, 8, 5)
  ref = random_embeddings(2, 10, 5)
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 5])
  ref_labels = np.array([0, 0, 1, 2, 3, 4, 1, 2, 4, 4])
  where = np.array([True] * 6 + [False, True])
  ref_where = np.array([True] * 8 + [False, True])
  metric = "cosine" if name == "multi_similarity" else "euclidean"
  got = np.asarray(fn(emb, labels, ref, ref_labels, where=where, ref_where=ref_where, **kw))
  pos, neg = masks_np(labels, ref_labels, where, ref_where)
  want = ref_fn(dist_np(emb, ref, metric), pos, neg, np_pairwise(emb, ref, metric),
                metric == "cosine")
  assert got.shape == (8, 10)
  np.testing.assert_array_equal(got, want)
  assert not got[6].any() and not got[:, 8].any()


@pytest.mark.parametrize("name", list(CASES))
def test_jit_vmap_and_no_gradient(name):
  fn, kw, _ = CASES[name]
  emb = jnp.asarray(random_embeddings(3, 12, 5))
  labels = jnp.asarray(label_layouts()["m_per_class"])
  jitted = jax.jit(lambda e, l: fn(e, l, **kw))
  np.testing.assert_array_equal(jitted(emb, labels), fn(emb, labels, **kw))
  stack = jnp.stack([emb, -emb, emb * 2 + 1])
  vm = jax.vmap(lambda e: fn(e, labels, **kw))(stack)
  for k in range(3):
    np.testing.assert_array_equal(vm[k], fn(stack[k], labels, **kw))
  # Mining inside a differentiated loss: the mask is a constant.
  loss = lambda e: mj.losses.contrastive_loss(e, labels, pair_mask=fn(e, labels, **kw))
  fixed = fn(emb, labels, **kw)
  np.testing.assert_allclose(
      jax.grad(loss)(emb),
      jax.grad(lambda e: mj.losses.contrastive_loss(e, labels, pair_mask=fixed))(emb),
      rtol=1e-6)


def test_batch_hard_mask_gives_batch_hard_triplet_loss():
  emb = random_embeddings(4, 12, 5)
  labels = label_layouts()["with_singletons"]
  mask = miners.batch_hard_miner(emb, labels)
  for reduction in ("mean_nonzero", "mean"):
    got = mj.losses.triplet_margin_loss(emb, labels, margin=0.3, pair_mask=mask,
                                        reduction=reduction)
    want = mj.losses.triplet_margin_loss(emb, labels, margin=0.3, mining="hard",
                                         reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def dw_probabilities_np(emb, labels, cutoff=0.5, nz_cutoff=1.4, lam=None):
  x = np_normalize(emb)
  n = x.shape[1]
  d = np.maximum(np_pairwise(x, x), cutoff)
  logw = (2 - n) * np.log(d) - (n - 3) / 2 * np.log(1 - d ** 2 / 4)
  if lam is not None:
    from math import lgamma, log
    a = (n - 1) / 2
    logz = (n - 2) * log(2) + 2 * lgamma(a) - lgamma(2 * a)
    logw = np.minimum(logw + logz, np.log(lam))
  allowed = (labels[:, None] != labels[None, :]) & (d < nz_cutoff)
  w = np.where(allowed, np.exp(logw - logw[allowed].max()), 0.0)
  return w / np.maximum(w.sum(1, keepdims=True), 1e-300)


@pytest.mark.parametrize("lam", [None, 1e-3])
def test_distance_weighted_sampling_distribution(lam):
  emb = random_embeddings(5, 8, 4)
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  probs = dw_probabilities_np(emb, labels, cutoff=0.3, nz_cutoff=1.9, lam=lam)
  keys = jax.random.split(jax.random.key(0), 2000)
  draws = jax.jit(jax.vmap(lambda k: miners.distance_weighted_miner(
      k, emb, labels, cutoff=0.3, nonzero_loss_cutoff=1.9, lam=lam)))(keys)
  draws = np.asarray(draws)
  pos, neg = masks_np(labels)
  has_any = probs.sum(1) > 0
  # Positives of every sampling anchor are always kept; one negative each.
  assert np.all(draws[:, pos & has_any[:, None]])
  np.testing.assert_array_equal((draws & neg).sum(2), np.broadcast_to(has_any, (2000, 8)))
  freq = (draws & neg).mean(0)
  np.testing.assert_allclose(freq, probs, atol=0.04)
  if lam == 1e-3:
    # The clip binds everywhere: uniform over the allowed negatives.
    allowed = probs > 0
    np.testing.assert_allclose(probs[allowed], np.broadcast_to(
        1 / allowed.sum(1, keepdims=True), probs.shape)[allowed])


def test_distance_weighted_cutoffs_and_determinism():
  emb = random_embeddings(6, 8, 16)
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  key = jax.random.key(3)
  a = miners.distance_weighted_miner(key, emb, labels, num_negatives=3)
  b = miners.distance_weighted_miner(key, emb, labels, num_negatives=3)
  np.testing.assert_array_equal(a, b)
  pos, neg = masks_np(labels)
  d = np_pairwise(np_normalize(emb), np_normalize(emb))
  chosen = np.asarray(a) & neg
  assert np.all(d[chosen] < 1.4)
  assert np.all(chosen.sum(1) <= 3) and np.all(chosen.sum(1) >= 1)
  # Nothing below the cut-off: no sampling anchor, empty mask.
  none = miners.distance_weighted_miner(key, emb, labels, nonzero_loss_cutoff=0.1)
  assert not np.asarray(none).any()
  # where: padding anchors and references are never used.
  where = jnp.arange(8) < 6
  m = np.asarray(miners.distance_weighted_miner(key, emb, labels, where=where))
  assert not m[6:].any() and not m[:, 6:].any()


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`semihard` must be one of"):
    miners.semihard_miner(emb, lab, semihard="band")
  with pytest.raises(ValueError, match="`epsilon` must be a scalar"):
    miners.multi_similarity_miner(emb, lab, epsilon=jnp.ones(2))
  with pytest.raises(ValueError, match="`labels` must have length 4"):
    miners.batch_hard_miner(emb, lab[:3])
  with pytest.raises(ValueError, match="`distance` must be one of"):
    miners.pair_margin_miner(emb, lab, distance="l1")
  with pytest.raises(ValueError, match="`num_negatives` must be >= 1"):
    miners.distance_weighted_miner(jax.random.key(0), emb, lab, num_negatives=0)
  with pytest.raises(ValueError, match="`lam` must be > 0"):
    miners.distance_weighted_miner(jax.random.key(0), emb, lab, lam=0.0)
  with pytest.raises(ValueError, match="`ref_embeddings` and `ref_labels`"):
    miners.hardest_negative_pair_miner(emb, lab, emb)


# --- PML parity ---------------------------------------------------------------


def tuples_to_mask(tuples, b, m):
  mask = np.zeros((b, m), bool)
  if len(tuples) == 3:
    a, p, n = (t.numpy() for t in tuples)
    mask[a, p] = True
    mask[a, n] = True
  else:
    a1, p, a2, n = (t.numpy() for t in tuples)
    mask[a1, p] = True
    mask[a2, n] = True
  return mask


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_batch_hard_miner_and_triplet_loss(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  from pytorch_metric_learning import miners as pml_miners
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  t_emb, t_lab = torch.tensor(emb), torch.tensor(labels)
  tuples = pml_miners.BatchHardMiner()(t_emb, t_lab)
  want = pml_losses.TripletMarginLoss(margin=0.2)(t_emb, t_lab, tuples).item()
  norm = np_normalize(emb).astype(np.float32)
  mask = miners.batch_hard_miner(norm, labels)
  np.testing.assert_array_equal(mask, tuples_to_mask(tuples, 12, 12))
  got = mj.losses.triplet_margin_loss(norm, labels, margin=0.2, pair_mask=mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", list(label_layouts()))
def test_pml_multi_similarity_miner(layout):
  import torch
  from pytorch_metric_learning import distances as pml_distances
  from pytorch_metric_learning import miners as pml_miners
  emb = random_embeddings(8, 12, 6)
  labels = label_layouts()[layout]
  t_emb, t_lab = torch.tensor(emb), torch.tensor(labels)
  for eps in (0.1, 0.3):
    tuples = pml_miners.MultiSimilarityMiner(epsilon=eps)(t_emb, t_lab)
    got = miners.multi_similarity_miner(emb, labels, epsilon=eps)
    np.testing.assert_array_equal(got, tuples_to_mask(tuples, 12, 12))
  tuples = pml_miners.MultiSimilarityMiner(epsilon=0.2, distance=pml_distances.LpDistance())(
      t_emb, t_lab)
  got = miners.multi_similarity_miner(np_normalize(emb).astype(np.float32), labels,
                                      epsilon=0.2, distance="euclidean")
  np.testing.assert_array_equal(got, tuples_to_mask(tuples, 12, 12))


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_pair_margin_miner(layout):
  import torch
  from pytorch_metric_learning import distances as pml_distances
  from pytorch_metric_learning import miners as pml_miners
  emb = random_embeddings(9, 12, 6)
  ref = random_embeddings(10, 9, 6)
  labels = label_layouts()[layout]
  ref_labels = np.array([0, 1, 1, 2, 3, 4, 5, 0, 2])
  t_emb, t_lab = torch.tensor(emb), torch.tensor(labels)
  norm = np_normalize(emb).astype(np.float32)
  tuples = pml_miners.PairMarginMiner()(t_emb, t_lab)
  np.testing.assert_array_equal(miners.pair_margin_miner(norm, labels),
                                tuples_to_mask(tuples, 12, 12))
  tuples = pml_miners.PairMarginMiner(pos_margin=1.1, neg_margin=1.5)(
      t_emb, t_lab, ref_emb=torch.tensor(ref), ref_labels=torch.tensor(ref_labels))
  got = miners.pair_margin_miner(norm, labels, np_normalize(ref).astype(np.float32),
                                 ref_labels, pos_margin=1.1, neg_margin=1.5)
  np.testing.assert_array_equal(got, tuples_to_mask(tuples, 12, 9))
  tuples = pml_miners.PairMarginMiner(pos_margin=0.3, neg_margin=-0.1,
                                      distance=pml_distances.CosineSimilarity())(t_emb, t_lab)
  got = miners.pair_margin_miner(emb, labels, pos_margin=0.3, neg_margin=-0.1,
                                 distance="cosine")
  np.testing.assert_array_equal(got, tuples_to_mask(tuples, 12, 12))
