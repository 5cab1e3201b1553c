"""multi_similarity_loss vs a loop reference, the loss contract and PML."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings, reference_case)


def ms_np(emb, labels, ref=None, ref_labels=None, alpha=2.0, beta=50.0, base=0.5,
          metric="cosine", reduction="mean", where=None, ref_where=None, pair_mask=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  s = np_pairwise(emb, ref, metric)
  sim = metric in ("cosine", "dot")
  terms = []
  for i in range(len(emb)):
    if where is not None and not where[i]:
      continue
    pos_sum, neg_sum = 0.0, 0.0
    for j in range(len(ref)):
      if (ref_where is not None and not ref_where[j]) or (same and i == j):
        continue
      if pair_mask is not None and not pair_mask[i, j]:
        continue
      x = (base - s[i, j]) if sim else (s[i, j] - base)
      if labels[i] == ref_labels[j]:
        pos_sum += math.exp(alpha * x)
      else:
        neg_sum += math.exp(-beta * x)
    terms.append(math.log1p(pos_sum) / alpha + math.log1p(neg_sum) / beta)
  terms = np.array(terms)
  if reduction == "sum":
    return terms.sum()
  if reduction == "mean_nonzero":
    return terms.sum() / max(int(np.sum(terms > 0)), 1)
  return terms.sum() / max(len(terms), 1)


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_loop_reference(layout, metric, reduction):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  kw = dict(alpha=2.0, beta=10.0, base=0.5 if metric == "cosine" else 1.5)
  got = mj.losses.multi_similarity_loss(emb, labels, distance=metric, reduction=reduction, **kw)
  want = ms_np(emb, labels, metric=metric, reduction=reduction, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case(density=0.7)
  got = mj.losses.multi_similarity_loss(emb, labels, ref, ref_labels, where=where,
                                        ref_where=ref_where, pair_mask=jnp.asarray(mask))
  want = ms_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where, pair_mask=mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_none_reduction_gives_anchor_terms():
  emb = random_embeddings(4, 6, 3)
  labels = np.array([0, 0, 1, 1, 2, 2])
  terms = mj.losses.multi_similarity_loss(emb, labels, reduction="none")
  assert terms.shape == (6,)
  np.testing.assert_allclose(terms.sum(), ms_np(emb, labels, reduction="sum"), rtol=1e-5)


def test_contract():
  # An anchor without positives still pays its negative term (PML counts every
  # anchor), so a batch without positive pairs is checked for finiteness only.
  check_loss_contract(lambda e, l, **kw: mj.losses.multi_similarity_loss(e, l, beta=10.0, **kw),
                      zero_without_positives=False)


def test_large_scales_half_precision_are_finite():
  emb = jnp.asarray(random_embeddings(5, 16, 8))
  labels = jnp.asarray(np.repeat(np.arange(4), 4))
  for dt in (jnp.float16, jnp.bfloat16):
    val, grad = jax.value_and_grad(
        lambda e: mj.losses.multi_similarity_loss(e, labels, alpha=200.0, beta=500.0))(emb.astype(dt))
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`alpha` must be > 0"):
    mj.losses.multi_similarity_loss(emb, lab, alpha=0.0)
  with pytest.raises(ValueError, match="`beta` must be > 0"):
    mj.losses.multi_similarity_loss(emb, lab, beta=-1.0)
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    mj.losses.multi_similarity_loss(emb, lab, reduction="avg")
  with pytest.raises(ValueError, match="`pair_mask` must have shape"):
    mj.losses.multi_similarity_loss(emb, lab, pair_mask=jnp.ones((4, 3), bool))
  with pytest.raises(ValueError, match="`labels` must have length 4"):
    mj.losses.multi_similarity_loss(emb, lab[:3])


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "one_class"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  for kw in ({}, dict(alpha=1.0, beta=20.0, base=0.3)):
    want = pml_losses.MultiSimilarityLoss(**kw)(torch.tensor(emb), torch.tensor(labels)).item()
    got = mj.losses.multi_similarity_loss(emb_n, labels, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_parity_reference_set_and_miner_pairs():
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(8, 10, 6)
  ref = random_embeddings(9, 8, 6)
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 3, 0, 1])
  ref_labels = np.array([0, 0, 1, 2, 3, 4, 1, 2])
  loss = pml_losses.MultiSimilarityLoss()
  want = loss(torch.tensor(emb), torch.tensor(labels), ref_emb=torch.tensor(ref),
              ref_labels=torch.tensor(ref_labels)).item()
  got = mj.losses.multi_similarity_loss(np_normalize(emb).astype(np.float32), labels,
                                        np_normalize(ref).astype(np.float32), ref_labels)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # A miner's pairs as a pair mask.
  mask = np.random.default_rng(1).random((10, 10)) < 0.5
  np.fill_diagonal(mask, False)
  same = labels[:, None] == labels[None, :]
  a1, p = np.nonzero(mask & same)
  a2, n = np.nonzero(mask & ~same)
  tup = tuple(torch.tensor(v) for v in (a1, p, a2, n))
  want = loss(torch.tensor(emb), torch.tensor(labels), tup).item()
  got = mj.losses.multi_similarity_loss(np_normalize(emb).astype(np.float32), labels,
                                        pair_mask=jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5)
