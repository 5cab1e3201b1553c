"""intra_pair_variance_loss vs a loop reference, the loss contract and PML."""

import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, check_symmetric_gradient_path,
                           label_layouts, np_normalize, np_pairwise, random_embeddings,
                           reference_case)


def ipv_np(emb, labels, ref=None, ref_labels=None, pos_eps=0.01, neg_eps=0.01,
           metric="cosine", reduction="mean", where=None, ref_where=None, pair_mask=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  s = np_pairwise(emb, ref, metric)
  sim = metric in ("cosine", "dot")
  pos, neg = [], []
  for i in range(len(emb)):
    for j in range(len(ref)):
      if (where is not None and not where[i]) or (ref_where is not None and not ref_where[j]):
        continue
      if (same and i == j) or (pair_mask is not None and not pair_mask[i, j]):
        continue
      (pos if labels[i] == ref_labels[j] else neg).append(s[i, j])
  total = 0.0
  for vals, eps, is_pos in ((pos, pos_eps, True), (neg, neg_eps, False)):
    if not vals:
      continue
    mu = sum(vals) / len(vals)
    pull_up = is_pos == sim       # positives of a similarity must increase
    terms = [max(0.0, (1 - eps) * mu - v) ** 2 if pull_up else max(0.0, v - (1 + eps) * mu) ** 2
             for v in vals]
    terms = np.array(terms)
    if reduction == "sum":
      total += terms.sum()
    elif reduction == "mean":
      total += terms.mean()
    else:
      total += terms.sum() / max(int(np.sum(terms > 0)), 1)
  return total


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_matches_loop_reference(layout, metric):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for kw in ({}, dict(pos_eps=0.1, neg_eps=0.2)):
    for reduction in ("mean", "mean_nonzero", "sum"):
      got = mj.losses.intra_pair_variance_loss(emb, labels, distance=metric,
                                               reduction=reduction, **kw)
      want = ipv_np(emb, labels, metric=metric, reduction=reduction, **kw)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  got = mj.losses.intra_pair_variance_loss(emb, labels, ref, ref_labels, where=where,
                                           ref_where=ref_where, pair_mask=jnp.asarray(mask))
  want = ipv_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where, pair_mask=mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_contract():
  # The negative-pair variance term is non-zero without any positive pair, so
  # that batch is checked for finiteness only.
  check_loss_contract(lambda e, l, **kw: mj.losses.intra_pair_variance_loss(e, l, **kw),
                      zero_without_positives=False)


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`pos_eps` must be a scalar"):
    mj.losses.intra_pair_variance_loss(emb, lab, pos_eps=jnp.ones(2))
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    mj.losses.intra_pair_variance_loss(emb, lab, reduction="max")
  with pytest.raises(TypeError, match="`embeddings` must be a floating-point"):
    mj.losses.intra_pair_variance_loss(jnp.ones((4, 3), jnp.int32), lab)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "all_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  for kw in ({}, dict(pos_eps=0.05, neg_eps=0.2)):
    want = pml_losses.IntraPairVarianceLoss(**kw)(torch.tensor(emb), torch.tensor(labels)).item()
    got = mj.losses.intra_pair_variance_loss(emb_n, labels, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_symmetric_gradient_path_equals_general_path():
  check_symmetric_gradient_path(mj.losses.intra_pair_variance_loss)
