"""lifted_structure_loss and generalized_lifted_structure_loss vs loop
references (the paper's Caffe layer and a general ordered-pair loop), the
loss contract, memory and PML."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from metric_jax import miners
from benchmarks import common
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings)

SIMILARITIES = ("cosine", "dot")


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


def lifted_caffe_np(emb, labels, alpha=1.0):
  """The paper's Caffe layer: loop over i < j positives, the negatives of i
  and of j in one stable soft max, loss = sum J_+^2 / num_constraints / 2."""
  x = np.asarray(emb, np.float64)
  b = len(x)
  dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
  total, num_constraints = 0.0, 0
  for i in range(b):
    for j in range(i + 1, b):
      if labels[i] != labels[j]:
        continue
      num_constraints += 1
      logits = [alpha - dist[i, k] for k in range(b) if labels[k] != labels[i]]
      logits += [alpha - dist[j, l] for l in range(b) if labels[l] != labels[j]]
      if not logits:
        continue                      # J = -inf: nothing to add
      mx = max(logits)
      j_ij = mx + np.log(sum(np.exp(v - mx) for v in logits)) + dist[i, j]
      total += max(j_ij, 0.0) ** 2
  return total / max(num_constraints, 1) / 2


def lifted_np(emb, labels, ref=None, ref_labels=None, *, neg_margin=1.0, pos_margin=0.0,
              hard=False, empty="-inf", mode="reference", metric="euclidean", where=None,
              ref_where=None, pair_mask=None, reduction="mean"):
  """General loop over ordered (anchor, reference) positive pairs."""
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  b, m = len(emb), len(ref)
  w = np.ones(b, bool) if where is None else np.asarray(where)
  rw = np.ones(m, bool) if ref_where is None else np.asarray(ref_where)
  pm = np.ones((b, m), bool) if pair_mask is None else np.asarray(pair_mask)
  d = np_pairwise(emb, ref, metric)
  dr = np_pairwise(ref, ref, metric)
  sim = metric in SIMILARITIES
  neg_logit = (lambda v: v - neg_margin) if sim else (lambda v: neg_margin - v)
  pos_part = (lambda v: pos_margin - v) if sim else (lambda v: v - pos_margin)

  def anchor_negs(r):
    if not w[r]:
      return []
    return [neg_logit(d[r, k]) for k in range(m)
            if rw[k] and pm[r, k] and ref_labels[k] != labels[r]]

  def ref_negs(i, j):
    if same:
      return anchor_negs(j)
    if mode == "anchor_only":
      return []
    if mode == "pml":   # negative pairs whose anchor row is i or j
      return anchor_negs(j) if j < b and j != i else []
    if not rw[j]:
      return []
    return [neg_logit(dr[j, l]) for l in range(m) if rw[l] and ref_labels[l] != ref_labels[j]]

  # PML returns 0 when the batch has no negative pair at all.
  any_negative = any(anchor_negs(i) for i in range(b))
  terms = []
  for i in range(b):
    for j in range(m):
      if not (w[i] and rw[j] and pm[i, j]) or labels[i] != ref_labels[j]:
        continue
      if same and i == j:
        continue
      negs = anchor_negs(i) + ref_negs(i, j)
      if negs:
        jij = (max(negs) if hard else np_lse(negs)) + pos_part(d[i, j])
      elif empty == "zero" and any_negative:
        jij = pos_part(d[i, j])
      else:
        jij = -np.inf
      terms.append(0.5 * max(jij, 0.0) ** 2)
  return reduce_np(terms, reduction)


def generalized_np(emb, labels, ref=None, ref_labels=None, *, neg_margin=1.0, pos_margin=0.0,
                   empty="-inf", metric="euclidean", where=None, ref_where=None,
                   reduction="mean"):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  b, m = len(emb), len(ref)
  w = np.ones(b, bool) if where is None else np.asarray(where)
  rw = np.ones(m, bool) if ref_where is None else np.asarray(ref_where)
  d = np_pairwise(emb, ref, metric)
  sim = metric in SIMILARITIES
  terms = []
  for a in range(b):
    if not w[a]:
      continue
    pos = [(pos_margin - d[a, k]) if sim else (d[a, k] - pos_margin) for k in range(m)
           if rw[k] and ref_labels[k] == labels[a] and not (same and k == a)]
    neg = [(d[a, k] - neg_margin) if sim else (neg_margin - d[a, k]) for k in range(m)
           if rw[k] and ref_labels[k] != labels[a]]
    if empty == "-inf":
      if not pos or not neg:
        continue
      terms.append(max(np_lse(pos) + np_lse(neg), 0.0))
    else:
      lp = np_lse(pos) if pos else 0.0
      ln = np_lse(neg) if neg else 0.0
      terms.append(max(lp + ln, 0.0))
  return reduce_np(terms, reduction)


# --- lifted structure --------------------------------------------------------


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_default_matches_caffe_layer(layout):
  emb = random_embeddings(0, 12, 4)            # raw, unnormalised, as in the paper
  labels = label_layouts()[layout]
  got = mj.losses.lifted_structure_loss(emb, labels)
  np.testing.assert_allclose(got, lifted_caffe_np(emb, labels), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "one_class"])
@pytest.mark.parametrize("metric,hard,empty", [
    ("euclidean", False, "-inf"), ("euclidean", True, "zero"),
    ("squared_euclidean", False, "zero"), ("cosine", False, "-inf"),
    ("cosine", True, "-inf")])
def test_matches_loop_reference(layout, metric, hard, empty):
  emb = random_embeddings(1, 12, 4, scale=0.6)
  labels = label_layouts()[layout]
  kw = dict(neg_margin=0.7 if metric == "cosine" else 1.3, pos_margin=0.1)
  got = mj.losses.lifted_structure_loss(emb, labels, distance=metric, hard=hard,
                                        empty_lse=empty, **kw)
  want = lifted_np(emb, labels, metric=metric, hard=hard, empty=empty, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
def test_reductions(reduction):
  emb = random_embeddings(2, 12, 3, scale=2.0)
  labels = label_layouts()["with_singletons"]
  got = mj.losses.lifted_structure_loss(emb, labels, neg_margin=0.5, reduction=reduction)
  want = lifted_np(emb, labels, neg_margin=0.5, reduction=reduction)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  terms = mj.losses.lifted_structure_loss(emb, labels, reduction="none")
  assert terms.shape == (12, 12)
  np.testing.assert_allclose(terms.sum(), lifted_np(emb, labels, reduction="sum"), rtol=1e-5)


def test_pairs_without_negatives():
  emb = random_embeddings(3, 6, 3)
  labels = np.zeros(6, np.int32)
  assert float(mj.losses.lifted_structure_loss(emb, labels)) == 0.0
  # PML's convention: 0 too when no negative pair exists at all ...
  assert float(mj.losses.lifted_structure_loss(emb, labels, empty_lse="zero")) == 0.0
  # ... but [d_ij - pos_margin]_+^2 / 2 for a pair whose rows have no
  # negative while the batch has some (here masked by pair_mask).
  labels = np.array([0, 0, 0, 0, 1, 1])
  mask = np.ones((6, 6), bool)
  mask[:4, 4:] = False
  d = np_pairwise(emb, emb)
  terms = [0.5 * max(d[i, j] - 0.1, 0) ** 2 for i in range(4) for j in range(4) if i != j]
  lse = np_lse([1 - d[4, k] for k in range(4)] + [1 - d[5, k] for k in range(4)])
  terms += [0.5 * max(lse + d[4, 5] - 0.1, 0) ** 2] * 2
  got = mj.losses.lifted_structure_loss(emb, labels, empty_lse="zero", pos_margin=0.1,
                                        pair_mask=mask)
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
  terms[:12] = [0.0] * 12
  got = mj.losses.lifted_structure_loss(emb, labels, pos_margin=0.1, pair_mask=mask)
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


@pytest.mark.parametrize("mode", ["reference", "anchor_only", "pml"])
@pytest.mark.parametrize("empty", ["-inf", "zero"])
def test_reference_set_and_where(mode, empty):
  emb = random_embeddings(4, 8, 4, scale=0.5)
  ref = random_embeddings(5, 10, 4, scale=0.5)
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 5])
  ref_labels = np.array([0, 0, 1, 2, 3, 4, 1, 2, 4, 4])
  where = np.array([True] * 7 + [False])
  ref_where = np.array([True] * 8 + [False, True])
  got = mj.losses.lifted_structure_loss(emb, labels, ref, ref_labels, ref_negatives=mode,
                                        empty_lse=empty, where=where, ref_where=ref_where)
  want = lifted_np(emb, labels, ref, ref_labels, mode=mode, empty=empty, where=where,
                   ref_where=ref_where)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_where_matches_loop():
  emb = random_embeddings(6, 12, 4)
  labels = label_layouts()["with_singletons"]
  where = np.arange(12) % 5 != 2
  got = mj.losses.lifted_structure_loss(emb, labels, where=where)
  np.testing.assert_allclose(got, lifted_np(emb, labels, where=where), rtol=1e-5)


def test_hardest_negative_pair_miner_mask():
  emb = random_embeddings(7, 12, 4)
  labels = label_layouts()["m_per_class"]
  mask = miners.hardest_negative_pair_miner(emb, labels)
  got = mj.losses.lifted_structure_loss(emb, labels, pair_mask=mask)
  want = lifted_np(emb, labels, pair_mask=np.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Each pair's soft max then runs over exactly two hard negatives.
  d = np_pairwise(emb, emb)
  neg = labels[:, None] != labels[None, :]
  hardest = np.where(neg, d, np.inf).min(1)
  i, j = 0, 1
  jij = np.logaddexp(1 - hardest[i], 1 - hardest[j]) + d[i, j]
  terms = mj.losses.lifted_structure_loss(emb, labels, pair_mask=mask, reduction="none")
  np.testing.assert_allclose(terms[i, j], 0.5 * max(jij, 0) ** 2, rtol=1e-5)


def test_large_distances_are_stable():
  # exp(alpha - D) underflows in float32 for D ~ 200: the shifted LSE must not.
  emb = np.array([[0.0, 0.0], [0.0, 1.0], [300.0, 0.0], [300.0, 1.0]], np.float32)
  labels = np.array([0, 0, 1, 1])
  got = mj.losses.lifted_structure_loss(emb, labels)
  assert float(got) == 0.0
  emb2 = emb.copy()
  emb2[1] = [0.0, 400.0]
  got = mj.losses.lifted_structure_loss(emb2, labels)
  np.testing.assert_allclose(got, lifted_caffe_np(emb2, labels), rtol=1e-5)
  g = jax.grad(mj.losses.lifted_structure_loss)(jnp.asarray(emb2), labels)
  assert np.all(np.isfinite(g))


def test_coincident_embeddings_have_finite_gradient():
  emb = jnp.zeros((6, 3))
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  val, grad = jax.value_and_grad(mj.losses.lifted_structure_loss)(emb, labels)
  # J = log(8 e^1) for every pair: [J]^2 / 2.
  np.testing.assert_allclose(val, 0.5 * (np.log(8.0) + 1.0) ** 2, rtol=1e-6)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("kw", [{}, {"hard": True, "empty_lse": "zero"},
                                {"distance": "cosine", "neg_margin": 0.5}])
def test_contract(kw):
  check_loss_contract(lambda e, l, **k: mj.losses.lifted_structure_loss(e, l, **kw, **k))


def test_memory_is_quadratic():
  # A [B, B, B] intermediate at B = 1024 would be 4 GiB.
  b, d = 1024, 64
  emb = jnp.zeros((b, d))
  labels = jnp.repeat(jnp.arange(b // 4), 4)
  step = jax.jit(jax.value_and_grad(lambda e: mj.losses.lifted_structure_loss(e, labels)))
  peak = common.compiled_peak_bytes(step, emb)
  assert peak is not None and peak < 256 * 2**20, common.fmt_bytes(peak)


def test_vmap_over_margin():
  emb = jnp.asarray(random_embeddings(8, 8, 3))
  labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  margins = jnp.array([0.5, 1.0, 2.0])
  got = jax.vmap(lambda a: mj.losses.lifted_structure_loss(emb, labels, neg_margin=a))(margins)
  for k, a in enumerate([0.5, 1.0, 2.0]):
    np.testing.assert_allclose(got[k], lifted_caffe_np(np.asarray(emb), np.asarray(labels), a),
                               rtol=1e-5)


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`empty_lse` must be one of"):
    mj.losses.lifted_structure_loss(emb, lab, empty_lse="nan")
  with pytest.raises(ValueError, match="`ref_negatives` must be one of"):
    mj.losses.lifted_structure_loss(emb, lab, emb, lab, ref_negatives="rows")
  with pytest.raises(ValueError, match="`neg_margin` must be a scalar"):
    mj.losses.lifted_structure_loss(emb, lab, neg_margin=jnp.ones(3))
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    mj.losses.lifted_structure_loss(emb, lab, reduction="avg")
  with pytest.raises(ValueError, match="`labels` must have length 4"):
    mj.losses.lifted_structure_loss(emb, lab[:3])
  with pytest.raises(ValueError, match="`pair_mask` must have shape"):
    mj.losses.lifted_structure_loss(emb, lab, pair_mask=jnp.ones((4, 3), bool))
  with pytest.raises(TypeError, match="`embeddings` must be a floating-point"):
    mj.losses.lifted_structure_loss(jnp.ones((4, 3), jnp.int32), lab)


# --- generalized lifted structure -------------------------------------------


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("empty", ["-inf", "zero"])
def test_generalized_matches_loop_reference(layout, metric, empty):
  emb = random_embeddings(9, 12, 4, scale=0.7)
  labels = label_layouts()[layout]
  kw = dict(neg_margin=0.6, pos_margin=0.1)
  got = mj.losses.generalized_lifted_structure_loss(emb, labels, distance=metric,
                                                    empty_lse=empty, **kw)
  want = generalized_np(emb, labels, metric=metric, empty=empty, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("empty", ["-inf", "zero"])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
def test_generalized_reference_set_and_where(empty, reduction):
  emb = random_embeddings(10, 8, 4, scale=0.5)
  ref = random_embeddings(11, 10, 4, scale=0.5)
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 5])
  ref_labels = np.array([0, 0, 1, 2, 3, 4, 1, 2, 4, 4])
  where = np.array([True] * 7 + [False])
  ref_where = np.array([True] * 8 + [False, True])
  got = mj.losses.generalized_lifted_structure_loss(
      emb, labels, ref, ref_labels, empty_lse=empty, where=where, ref_where=ref_where,
      reduction=reduction)
  want = generalized_np(emb, labels, ref, ref_labels, empty=empty, where=where,
                        ref_where=ref_where, reduction=reduction)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_generalized_contract():
  check_loss_contract(mj.losses.generalized_lifted_structure_loss)
  # PML's convention: an anchor without positives still pays its negatives.
  check_loss_contract(
      lambda e, l, **k: mj.losses.generalized_lifted_structure_loss(e, l, empty_lse="zero", **k),
      zero_without_positives=False)


def test_generalized_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`empty_lse` must be one of"):
    mj.losses.generalized_lifted_structure_loss(emb, lab, empty_lse="0")
  with pytest.raises(ValueError, match="`ref_embeddings` and `ref_labels` must be given together"):
    mj.losses.generalized_lifted_structure_loss(emb, lab, emb)


# --- PML parity ---------------------------------------------------------------


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "one_class"])
def test_pml_lifted_parity(layout):
  import torch
  from pytorch_metric_learning import distances as pml_distances
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(12, 12, 6)
  labels = label_layouts()[layout]
  t_emb, t_lab = torch.tensor(emb), torch.tensor(labels)
  # PML default: normalised embeddings, empty LSE = 0.
  want = pml_losses.LiftedStructureLoss()(t_emb, t_lab).item()
  got = mj.losses.lifted_structure_loss(np_normalize(emb).astype(np.float32), labels,
                                        empty_lse="zero")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # The paper's setting: raw embeddings, other margins.
  pml = pml_losses.LiftedStructureLoss(
      neg_margin=2.0, pos_margin=0.3,
      distance=pml_distances.LpDistance(normalize_embeddings=False))
  want = pml(t_emb, t_lab).item()
  got = mj.losses.lifted_structure_loss(emb, labels, neg_margin=2.0, pos_margin=0.3,
                                        empty_lse="zero")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_lifted_parity_with_reference_set():
  import torch
  from pytorch_metric_learning import distances as pml_distances
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(13, 8, 4)
  ref = random_embeddings(14, 10, 4)
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 5])
  ref_labels = np.array([0, 0, 1, 2, 3, 4, 1, 2, 4, 4])
  pml = pml_losses.LiftedStructureLoss(
      distance=pml_distances.LpDistance(normalize_embeddings=False))
  want = pml(torch.tensor(emb), torch.tensor(labels), ref_emb=torch.tensor(ref),
             ref_labels=torch.tensor(ref_labels)).item()
  got = mj.losses.lifted_structure_loss(emb, labels, ref, ref_labels, ref_negatives="pml",
                                        empty_lse="zero")
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", list(label_layouts()))
def test_pml_generalized_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(15, 12, 6)
  labels = label_layouts()[layout]
  t_emb, t_lab = torch.tensor(emb), torch.tensor(labels)
  want = pml_losses.GeneralizedLiftedStructureLoss()(t_emb, t_lab).item()
  got = mj.losses.generalized_lifted_structure_loss(np_normalize(emb).astype(np.float32),
                                                    labels, empty_lse="zero")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  want = pml_losses.GeneralizedLiftedStructureLoss(neg_margin=0.5, pos_margin=0.2)(
      t_emb, t_lab).item()
  got = mj.losses.generalized_lifted_structure_loss(np_normalize(emb).astype(np.float32),
                                                    labels, neg_margin=0.5, pos_margin=0.2,
                                                    empty_lse="zero")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
