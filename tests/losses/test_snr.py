"""snr_contrastive_loss vs a loop reference, the loss contract and PML."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           random_embeddings, reference_case)


def snr_np(x, y):
  """SNR distance var(y - x) / var(x) with explicit loops (float64)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  out = np.zeros((len(x), len(y)))
  for i in range(len(x)):
    for j in range(len(y)):
      out[i, j] = np.var(y[j] - x[i]) / np.var(x[i])
  return out


def snr_loss_np(emb, labels, ref=None, ref_labels=None, pos_margin=0.0, neg_margin=1.0,
                zero_mean_weight=0.0, reduction="mean_nonzero", where=None, ref_where=None,
                pair_mask=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  d = snr_np(emb, ref)
  pos, neg = [], []
  for i in range(len(emb)):
    for j in range(len(ref)):
      if (where is not None and not where[i]) or (ref_where is not None and not ref_where[j]):
        continue
      if (same and i == j) or (pair_mask is not None and not pair_mask[i, j]):
        continue
      if labels[i] == ref_labels[j]:
        pos.append(max(0.0, d[i, j] - pos_margin))
      else:
        neg.append(max(0.0, neg_margin - d[i, j]))
  total = 0.0
  for terms in (np.array(pos), np.array(neg)):
    if reduction == "sum":
      total += terms.sum()
    elif reduction == "mean":
      total += terms.sum() / max(len(terms), 1)
    else:
      total += terms.sum() / max(int(np.sum(terms > 0)), 1)
  rows = [abs(np.sum(np.asarray(emb[i], np.float64))) for i in range(len(emb))
          if where is None or where[i]]
  return total + zero_mean_weight * (np.mean(rows) if rows else 0.0)


def test_snr_distance_matches_loops():
  x = random_embeddings(0, 6, 5)
  y = random_embeddings(1, 4, 5)
  from metric_jax.losses import snr
  np.testing.assert_allclose(snr.SNR(jnp.asarray(x), jnp.asarray(y)), snr_np(x, y), rtol=1e-5)


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for kw in ({}, dict(pos_margin=0.3, neg_margin=1.5, zero_mean_weight=0.1)):
    for reduction in ("mean_nonzero", "mean", "sum"):
      got = mj.losses.snr_contrastive_loss(emb, labels, reduction=reduction, **kw)
      want = snr_loss_np(emb, labels, reduction=reduction, **kw)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  got = mj.losses.snr_contrastive_loss(emb, labels, ref, ref_labels, where=where,
                                       ref_where=ref_where, pair_mask=jnp.asarray(mask),
                                       zero_mean_weight=0.5)
  want = snr_loss_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                     pair_mask=mask, zero_mean_weight=0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_contract():
  # Negative pairs cost without any positive pair (contrastive form): that
  # batch is checked for finiteness only.
  check_loss_contract(lambda e, l, **kw: mj.losses.snr_contrastive_loss(e, l, **kw),
                      zero_without_positives=False)


def test_constant_anchor_is_finite():
  emb = jnp.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
  val, grad = jax.value_and_grad(
      lambda e: mj.losses.snr_contrastive_loss(e, jnp.array([0, 0, 1])))(emb)
  assert np.isfinite(float(val)) and np.all(np.isfinite(grad))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`distance` must be one of"):
    mj.losses.snr_contrastive_loss(emb, lab, distance="euclidean")
  with pytest.raises(ValueError, match="`zero_mean_weight` must be >= 0"):
    mj.losses.snr_contrastive_loss(emb, lab, zero_mean_weight=-1.0)
  with pytest.raises(ValueError, match="D >= 2"):
    mj.losses.snr_contrastive_loss(jnp.ones((4, 1)), lab)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  from pytorch_metric_learning import regularizers as pml_reg
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  want = pml_losses.SignalToNoiseRatioContrastiveLoss()(torch.tensor(emb),
                                                        torch.tensor(labels)).item()
  np.testing.assert_allclose(mj.losses.snr_contrastive_loss(emb_n, labels), want, rtol=1e-5)
  loss = pml_losses.SignalToNoiseRatioContrastiveLoss(
      pos_margin=0.2, neg_margin=0.8, embedding_regularizer=pml_reg.ZeroMeanRegularizer(),
      embedding_reg_weight=0.3)
  # PML's regulariser acts on the raw embeddings: pass normalised ones to both.
  want = loss(torch.tensor(emb_n), torch.tensor(labels)).item()
  got = mj.losses.snr_contrastive_loss(emb_n, labels, pos_margin=0.2, neg_margin=0.8,
                                       zero_mean_weight=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5)
