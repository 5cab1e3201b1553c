"""ntxent_loss and supcon_loss vs loop references, the loss contract and PML."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings, reference_case)


def _pairs(n, m, i, j, same, where, ref_where, pair_mask):
  if where is not None and not where[i]:
    return False
  if (ref_where is not None and not ref_where[j]) or (same and i == j):
    return False
  return pair_mask is None or bool(pair_mask[i, j])


def _reduce(terms, reduction):
  terms = np.array(terms, np.float64)
  if reduction == "sum":
    return terms.sum()
  if reduction == "mean":
    return terms.sum() / max(len(terms), 1)
  return terms.sum() / max(int(np.sum(terms > 0)), 1)


def ntxent_np(emb, labels, ref=None, ref_labels=None, temperature=0.07, metric="cosine",
              reduction="mean", where=None, ref_where=None, pair_mask=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  s = np_pairwise(emb, ref, metric)
  z = (s if metric in ("cosine", "dot") else -s) / temperature
  terms = []
  for i in range(len(emb)):
    for p in range(len(ref)):
      if not _pairs(len(emb), len(ref), i, p, same, where, ref_where, pair_mask):
        continue
      if labels[i] != ref_labels[p]:
        continue
      negs = [z[i, n] for n in range(len(ref))
              if _pairs(len(emb), len(ref), i, n, same, where, ref_where, pair_mask)
              and labels[i] != ref_labels[n]]
      logits = np.array([z[i, p]] + negs)
      top = logits.max()
      terms.append(-(z[i, p] - top - math.log(np.exp(logits - top).sum())))
  return _reduce(terms, reduction)


def supcon_np(emb, labels, ref=None, ref_labels=None, temperature=0.1, metric="cosine",
              reduction="mean_nonzero", where=None, ref_where=None, pair_mask=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  s = np_pairwise(emb, ref, metric)
  z = (s if metric in ("cosine", "dot") else -s) / temperature
  any_pos = any_neg = False
  per_anchor = []
  for i in range(len(emb)):
    others = [j for j in range(len(ref))
              if _pairs(len(emb), len(ref), i, j, same, where, ref_where, pair_mask)]
    pos = [j for j in others if labels[i] == ref_labels[j]]
    any_pos |= bool(pos)
    any_neg |= len(pos) < len(others)
    if not pos:
      continue
    top = max(z[i, j] for j in others)
    log_den = top + math.log(sum(math.exp(z[i, j] - top) for j in others))
    per_anchor.append(-sum(z[i, p] - log_den for p in pos) / len(pos))
  if not (any_pos and any_neg):
    return 0.0
  return _reduce(per_anchor, reduction)


# --------------------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ntxent_matches_loop_reference(layout, metric):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for reduction in ("mean", "sum"):
    got = mj.losses.ntxent_loss(emb, labels, temperature=0.2, distance=metric,
                                reduction=reduction)
    want = ntxent_np(emb, labels, temperature=0.2, metric=metric, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ntxent_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  got = mj.losses.ntxent_loss(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                              pair_mask=jnp.asarray(mask))
  want = ntxent_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                   pair_mask=mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ntxent_simclr_views():
  # Two views of 4 instances: each row's positive is the other view.
  x = random_embeddings(4, 8, 6)
  labels = np.concatenate([np.arange(4), np.arange(4)])
  got = mj.losses.ntxent_loss(x, labels, temperature=0.5)
  xn = np_normalize(x)
  s = xn @ xn.T / 0.5
  want = []
  for i in range(8):
    p = (i + 4) % 8
    row = np.delete(s[i], i)
    want.append(-(s[i, p] - np.log(np.exp(row).sum())))
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def test_ntxent_contract():
  check_loss_contract(lambda e, l, **kw: mj.losses.ntxent_loss(e, l, temperature=0.5, **kw))


def test_ntxent_small_temperature_half_precision_is_finite():
  emb = jnp.asarray(random_embeddings(5, 16, 8))
  labels = jnp.asarray(np.repeat(np.arange(4), 4))
  for dt in (jnp.float16, jnp.bfloat16):
    val, grad = jax.jit(jax.value_and_grad(
        lambda e: mj.losses.ntxent_loss(e, labels, temperature=0.005)))(emb.astype(dt))
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad, np.float32)))


# --------------------------------------------------------------------------- SupCon


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("metric", ["cosine", "squared_euclidean"])
def test_supcon_matches_loop_reference(layout, metric):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for reduction in ("mean_nonzero", "mean", "sum"):
    got = mj.losses.supcon_loss(emb, labels, distance=metric, reduction=reduction)
    want = supcon_np(emb, labels, metric=metric, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_supcon_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  got = mj.losses.supcon_loss(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                              pair_mask=jnp.asarray(mask))
  want = supcon_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                   pair_mask=mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_supcon_one_class_batch_is_zero():
  # No negative pair anywhere: 0 (PML, issue #744), zero gradient.
  emb = jnp.asarray(random_embeddings(6, 6, 3))
  val, grad = jax.value_and_grad(lambda e: mj.losses.supcon_loss(e, jnp.zeros(6, jnp.int32)))(emb)
  assert float(val) == 0.0 and float(jnp.abs(grad).max()) == 0.0


def test_supcon_contract():
  check_loss_contract(lambda e, l, **kw: mj.losses.supcon_loss(e, l, temperature=0.5, **kw))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  for fn in (mj.losses.ntxent_loss, mj.losses.supcon_loss):
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
      fn(emb, lab, temperature=0.0)
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
      fn(emb, lab, temperature=-0.1)
    with pytest.raises(ValueError, match="`ref_embeddings` and `ref_labels` must be given"):
      fn(emb, lab, ref_embeddings=emb)
    with pytest.raises(ValueError, match="`reduction` must be one of"):
      fn(emb, lab, reduction="batchmean")


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "one_class"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  t_emb, t_lab = torch.tensor(emb), torch.tensor(labels)
  for t in (0.07, 0.5):
    want = pml_losses.NTXentLoss(temperature=t)(t_emb, t_lab).item()
    np.testing.assert_allclose(mj.losses.ntxent_loss(emb_n, labels, temperature=t), want,
                               rtol=1e-5, atol=1e-7)
  for t in (0.1, 0.5):
    want = pml_losses.SupConLoss(temperature=t)(t_emb, t_lab).item()
    np.testing.assert_allclose(mj.losses.supcon_loss(emb_n, labels, temperature=t), want,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_parity_reference_set():
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(8, 10, 6)
  ref = random_embeddings(9, 8, 6)
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 3, 0, 1])
  ref_labels = np.array([0, 0, 1, 2, 3, 4, 1, 2])
  kw = dict(ref_emb=torch.tensor(ref), ref_labels=torch.tensor(ref_labels))
  args = (np_normalize(emb).astype(np.float32), labels, np_normalize(ref).astype(np.float32),
          ref_labels)
  want = pml_losses.NTXentLoss()(torch.tensor(emb), torch.tensor(labels), **kw).item()
  np.testing.assert_allclose(mj.losses.ntxent_loss(*args), want, rtol=1e-5)
  want = pml_losses.SupConLoss()(torch.tensor(emb), torch.tensor(labels), **kw).item()
  np.testing.assert_allclose(mj.losses.supcon_loss(*args), want, rtol=1e-5)
