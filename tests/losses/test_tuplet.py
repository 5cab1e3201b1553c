"""tuplet_margin_loss vs a loop reference, the loss contract and PML."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings, reference_case)


def tuplet_np(emb, labels, ref=None, ref_labels=None, margin=math.radians(5.73), scale=64.0,
              reduction="mean", where=None, ref_where=None, pair_mask=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  s = np_pairwise(emb, ref, "cosine")

  def ok(i, j):
    if (where is not None and not where[i]) or (ref_where is not None and not ref_where[j]):
      return False
    return not (same and i == j) and (pair_mask is None or bool(pair_mask[i, j]))

  terms = []
  for a in range(len(emb)):
    for p in range(len(ref)):
      if not ok(a, p) or labels[a] != ref_labels[p]:
        continue
      shifted = math.cos(math.acos(min(1.0, s[a, p])) - margin)
      x = [scale * (s[a, n] - shifted) for n in range(len(ref))
           if ok(a, n) and labels[a] != ref_labels[n]]
      x = np.array([0.0] + x)
      top = x.max()
      terms.append(top + math.log(np.exp(x - top).sum()))
  terms = np.array(terms)
  if reduction == "sum":
    return terms.sum()
  return terms.sum() / max(len(terms), 1)


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for kw in ({}, dict(margin=0.3, scale=8.0), dict(margin=0.0, scale=16.0)):
    for reduction in ("mean", "sum"):
      got = mj.losses.tuplet_margin_loss(emb, labels, reduction=reduction, **kw)
      want = tuplet_np(emb, labels, reduction=reduction, **kw)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  got = mj.losses.tuplet_margin_loss(emb, labels, ref, ref_labels, where=where,
                                     ref_where=ref_where, pair_mask=jnp.asarray(mask))
  want = tuplet_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                   pair_mask=mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_identical_positive_pair_has_finite_gradient():
  # cos = 1: arccos has an infinite derivative there; the identity form does not.
  emb = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  g = jax.grad(lambda e: mj.losses.tuplet_margin_loss(e, jnp.array([0, 0, 1])))(emb)
  assert np.all(np.isfinite(g))


def test_contract():
  check_loss_contract(lambda e, l, **kw: mj.losses.tuplet_margin_loss(e, l, scale=8.0, **kw))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`margin` is in radians"):
    mj.losses.tuplet_margin_loss(emb, lab, margin=5.73)
  with pytest.raises(ValueError, match="`scale` must be > 0"):
    mj.losses.tuplet_margin_loss(emb, lab, scale=0.0)
  with pytest.raises(ValueError, match="cosine similarity `distance`"):
    mj.losses.tuplet_margin_loss(emb, lab, distance="euclidean")


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  for deg, scale in ((5.73, 64), (20.0, 16)):
    want = pml_losses.TupletMarginLoss(margin=deg, scale=scale)(
        torch.tensor(emb), torch.tensor(labels)).item()
    got = mj.losses.tuplet_margin_loss(emb_n, labels, margin=math.radians(deg), scale=scale)
    np.testing.assert_allclose(got, want, rtol=1e-5)
