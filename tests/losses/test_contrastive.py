"""contrastive_loss vs a loop reference, the loss contract and PML."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, check_symmetric_gradient_path,
                           label_layouts, np_normalize, np_pairwise, random_embeddings,
                           reference_case)


def reduce_np(vals, reduction):
  vals = np.asarray(vals, np.float64)
  if reduction == "sum":
    return vals.sum()
  if reduction == "mean":
    return vals.sum() / max(len(vals), 1)
  return vals.sum() / max(int(np.sum(vals > 0)), 1)


def contrastive_np(emb, labels, ref=None, ref_labels=None, pos_margin=0.0, neg_margin=1.0,
                   squared=False, metric="euclidean", reduction="mean_nonzero",
                   where=None, ref_where=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  d = np_pairwise(emb, ref, metric)
  sim = metric in ("cosine", "dot")
  pos_terms, neg_terms = [], []
  for i in range(len(emb)):
    for j in range(len(ref)):
      if where is not None and not where[i]:
        continue
      if ref_where is not None and not ref_where[j]:
        continue
      if labels[i] == ref_labels[j]:
        if same and i == j:
          continue
        t = max(0.0, pos_margin - d[i, j]) if sim else max(0.0, d[i, j] - pos_margin)
        pos_terms.append(0.5 * t * t if squared else t)
      else:
        t = max(0.0, d[i, j] - neg_margin) if sim else max(0.0, neg_margin - d[i, j])
        neg_terms.append(0.5 * t * t if squared else t)
  return reduce_np(pos_terms, reduction) + reduce_np(neg_terms, reduction)


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
def test_matches_loop_reference(layout, reduction, metric):
  emb = random_embeddings(1, 12, 4, scale=0.5)
  labels = label_layouts()[layout]
  kw = dict(pos_margin=0.1, neg_margin=0.8 if metric != "cosine" else 0.3)
  got = mj.losses.contrastive_loss(emb, labels, distance=metric, reduction=reduction, **kw)
  want = contrastive_np(emb, labels, metric=metric, reduction=reduction, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("squared", [False, True])
def test_reference_set_and_where(squared):
  emb, ref, labels, ref_labels, where, ref_where, _ = reference_case(scale=0.4)
  got = mj.losses.contrastive_loss(emb, labels, ref, ref_labels, squared=squared,
                                   where=where, ref_where=ref_where)
  want = contrastive_np(emb, labels, ref, ref_labels, squared=squared, where=where,
                        ref_where=ref_where)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_none_reduction_gives_pair_terms():
  emb = random_embeddings(4, 6, 3)
  labels = np.array([0, 0, 1, 1, 2, 2])
  terms = mj.losses.contrastive_loss(emb, labels, reduction="none")
  assert terms.shape == (6, 6)
  np.testing.assert_allclose(terms.sum(), contrastive_np(emb, labels, reduction="sum"), rtol=1e-5)


def test_contract():
  # Negative pairs cost even when a batch has no positive pair (the loss is a
  # sum over pairs), so that batch is checked for finiteness, not for zero.
  check_loss_contract(lambda e, l, **kw: mj.losses.contrastive_loss(e, l, neg_margin=2.0, **kw),
                      zero_without_positives=False)


def test_no_pairs_at_all_gives_zero_and_zero_gradient():
  emb = jnp.asarray(random_embeddings(0, 4, 3))
  val, grad = jax.value_and_grad(
      lambda e: mj.losses.contrastive_loss(e[:1], jnp.array([0])))(emb)
  assert float(val) == 0.0 and float(jnp.abs(grad).max()) == 0.0


def test_collapsed_embeddings_give_neg_margin():
  emb = jnp.ones((8, 4))
  labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_allclose(mj.losses.contrastive_loss(emb, labels), 1.0)


def test_pair_mask_restricts_pairs():
  emb = random_embeddings(5, 6, 3)
  labels = np.array([0, 0, 1, 1, 2, 2])
  mask = np.zeros((6, 6), bool)
  mask[0, 1] = mask[0, 2] = True
  got = mj.losses.contrastive_loss(emb, labels, pair_mask=jnp.asarray(mask), reduction="sum")
  d = np_pairwise(emb, emb)
  np.testing.assert_allclose(got, d[0, 1] + max(0.0, 1.0 - d[0, 2]), rtol=1e-5)


def test_vmap_over_margins():
  emb = jnp.asarray(random_embeddings(6, 8, 3))
  labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  margins = jnp.array([0.5, 1.0, 1.5])
  got = jax.vmap(lambda m: mj.losses.contrastive_loss(emb, labels, neg_margin=m))(margins)
  for k, m in enumerate([0.5, 1.0, 1.5]):
    np.testing.assert_allclose(got[k], contrastive_np(np.asarray(emb), np.asarray(labels), neg_margin=m), rtol=1e-5)


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    mj.losses.contrastive_loss(emb, lab, reduction="avg")
  with pytest.raises(ValueError, match="`neg_margin` must be a scalar"):
    mj.losses.contrastive_loss(emb, lab, neg_margin=jnp.ones(2))
  with pytest.raises(ValueError, match="`embeddings` must have rank 2"):
    mj.losses.contrastive_loss(jnp.ones((2, 2, 2)), lab)
  with pytest.raises(ValueError, match="`distance` must be one of"):
    mj.losses.contrastive_loss(emb, lab, distance="l1")


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  want = pml_losses.ContrastiveLoss()(torch.tensor(emb), torch.tensor(labels)).item()
  got = mj.losses.contrastive_loss(np_normalize(emb).astype(np.float32), labels)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  want = pml_losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.6)(
      torch.tensor(emb), torch.tensor(labels)).item()
  got = mj.losses.contrastive_loss(np_normalize(emb).astype(np.float32), labels,
                                   pos_margin=0.2, neg_margin=0.6)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_symmetric_gradient_path_equals_general_path():
  check_symmetric_gradient_path(mj.losses.contrastive_loss)
  check_symmetric_gradient_path(
      lambda e, l, **kw: mj.losses.contrastive_loss(e, l, squared=True, pos_margin=0.1, **kw),
      metrics=("euclidean", "cosine"), reductions=("mean_nonzero",))
