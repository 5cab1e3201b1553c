"""ranked_list_loss vs a loop reference, the loss contract and PML."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings, reference_case)


def rll_np(emb, labels, ref=None, ref_labels=None, margin=0.2, Tn=10.0, Tp=0.0,
           imbalance=0.5, alpha=None, pml_compat=False, reduction="mean", where=None,
           ref_where=None, pair_mask=None):
  if alpha is None:
    alpha = 1 + margin / 2
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  d = np_pairwise(emb, ref, "euclidean")
  n_cols = len(ref) if ref_where is None else int(np.sum(ref_where))
  terms = []
  for i in range(len(emb)):
    if where is not None and not where[i]:
      continue
    lp, xp, ln, xn = [], [], [], []     # log-weights and violations
    for j in range(len(ref)):
      if (ref_where is not None and not ref_where[j]) or (same and i == j):
        continue
      if pair_mask is not None and not pair_mask[i, j]:
        continue
      if pml_compat and d[i, j] == 0:
        continue
      if labels[i] == ref_labels[j] and d[i, j] > alpha - margin:
        lp.append(Tp * (d[i, j] - (alpha - margin)))
        xp.append(d[i, j] - (alpha - margin))
      elif labels[i] != ref_labels[j] and d[i, j] < alpha:
        ln.append(Tn * (alpha - d[i, j]))
        xn.append(alpha - d[i, j])

    def wmean(logw, x):
      if pml_compat:       # PML: raw weights plus 1e-5 per reference column
        w = [math.exp(v) for v in logw]
        return sum(a * b for a, b in zip(w, x)) / (sum(w) + 1e-5 * n_cols)
      if not logw:
        return 0.0
      w = [math.exp(v - max(logw)) for v in logw]   # the ratio is shift-invariant
      return sum(a * b for a, b in zip(w, x)) / sum(w)

    terms.append((1 - imbalance) * wmean(lp, xp) + imbalance * wmean(ln, xn))
  terms = np.array(terms)
  if reduction == "sum":
    return terms.sum()
  return terms.sum() / max(len(terms), 1)


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout):
  emb = np_normalize(random_embeddings(1, 12, 5)).astype(np.float32)
  labels = label_layouts()[layout]
  for kw in ({}, dict(margin=0.4, Tn=2.0, Tp=1.0, imbalance=0.3, alpha=1.4),
             dict(pml_compat=True)):
    for reduction in ("mean", "sum"):
      got = mj.losses.ranked_list_loss(emb, labels, reduction=reduction, **kw)
      want = rll_np(emb, labels, reduction=reduction, **kw)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case(scale=0.4)
  for compat in (False, True):
    got = mj.losses.ranked_list_loss(emb, labels, ref, ref_labels, where=where,
                                     ref_where=ref_where, pair_mask=jnp.asarray(mask),
                                     pml_compat=compat)
    want = rll_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                  pair_mask=mask, pml_compat=compat)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_large_temperature_does_not_overflow():
  emb = jnp.asarray(np_normalize(random_embeddings(4, 12, 5)).astype(np.float32))
  labels = jnp.asarray(label_layouts()["m_per_class"])
  val, grad = jax.value_and_grad(
      lambda e: mj.losses.ranked_list_loss(e, labels, Tn=500.0, Tp=500.0, margin=2.0))(emb)
  assert np.isfinite(float(val)) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(val, rll_np(np.asarray(emb), np.asarray(labels), Tn=500.0,
                                         Tp=500.0, margin=2.0), rtol=1e-4)


def test_collapsed_embeddings_cost_alpha_on_negatives():
  emb = jnp.ones((6, 3))
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  np.testing.assert_allclose(mj.losses.ranked_list_loss(emb, labels), 0.5 * 1.1, rtol=1e-6)
  # PML ignores pairs at distance exactly 0.
  assert float(mj.losses.ranked_list_loss(emb, labels, pml_compat=True)) == 0.0


def test_contract():
  # Anchors pay for violating negatives even without positives.
  check_loss_contract(lambda e, l, **kw: mj.losses.ranked_list_loss(e, l, Tn=2.0, **kw),
                      zero_without_positives=False)


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`imbalance` must be in \\[0, 1\\]"):
    mj.losses.ranked_list_loss(emb, lab, imbalance=1.5)
  with pytest.raises(ValueError, match="needs a distance"):
    mj.losses.ranked_list_loss(emb, lab, distance="cosine")
  with pytest.raises(ValueError, match="`Tn` must be a scalar"):
    mj.losses.ranked_list_loss(emb, lab, Tn=jnp.ones(2))


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  for kw in (dict(margin=0.2, Tn=10.0), dict(margin=0.4, Tn=1.0, Tp=2.0, imbalance=0.3,
                                              alpha=1.3)):
    want = pml_losses.RankedListLoss(**kw)(torch.tensor(emb), torch.tensor(labels)).item()
    # PML's 1e-5-per-column denominators: reproduced by pml_compat=True.
    got = mj.losses.ranked_list_loss(emb_n, labels, pml_compat=True, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The exact weighted means differ from PML by about 1e-5 M / sum(w).
    exact = mj.losses.ranked_list_loss(emb_n, labels, **kw)
    np.testing.assert_allclose(exact, want, rtol=1e-2)
