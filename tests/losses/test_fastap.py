"""fastap_loss vs a loop reference, the loss contract and PML."""

import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings, reference_case)


def fastap_np(emb, labels, ref=None, ref_labels=None, num_bins=10, histogram_max=4.0,
              metric="squared_euclidean", reduction="mean", where=None, ref_where=None,
              pair_mask=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  d = np_pairwise(emb, ref, metric)
  delta = histogram_max / num_bins
  terms = []
  for i in range(len(emb)):
    if where is not None and not where[i]:
      continue
    cols = [j for j in range(len(ref))
            if not (ref_where is not None and not ref_where[j]) and not (same and i == j)
            and (pair_mask is None or pair_mask[i, j])]
    pos = [j for j in cols if labels[i] == ref_labels[j]]
    if not pos:
      continue
    h_pos = np.zeros(num_bins + 1)
    h_all = np.zeros(num_bins + 1)
    for k in range(num_bins + 1):
      for j in cols:
        w = max(0.0, 1.0 - abs(d[i, j] - k * delta) / delta)
        h_all[k] += w
        if j in pos:
          h_pos[k] += w
    ap = 0.0
    for k in range(num_bins + 1):
      big_h_pos, big_h = h_pos[:k + 1].sum(), h_all[:k + 1].sum()
      if h_pos[k] * big_h_pos > 0 and big_h > 0:
        ap += h_pos[k] * big_h_pos / big_h
    terms.append(1.0 - ap / len(pos))
  terms = np.array(terms)
  if reduction == "sum":
    return terms.sum()
  return terms.sum() / max(len(terms), 1)


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout):
  emb = np_normalize(random_embeddings(1, 12, 5)).astype(np.float32)
  labels = label_layouts()[layout]
  for metric, hmax, bins in (("squared_euclidean", 4.0, 10), ("euclidean", 2.0, 7)):
    for reduction in ("mean", "sum"):
      got = mj.losses.fastap_loss(emb, labels, num_bins=bins, distance=metric,
                                  reduction=reduction)
      want = fastap_np(emb, labels, num_bins=bins, histogram_max=hmax, metric=metric,
                       reduction=reduction)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case(scale=0.4)
  got = mj.losses.fastap_loss(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                              pair_mask=jnp.asarray(mask), histogram_max=3.0)
  want = fastap_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                   pair_mask=mask, histogram_max=3.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_perfect_ranking_gives_near_zero_loss():
  # Two tight, far-apart classes: every positive ranks before every negative.
  emb = np.array([[1, 0], [0.999, 0.04], [-1, 0], [-0.999, -0.04]], np.float32)
  got = mj.losses.fastap_loss(emb, np.array([0, 0, 1, 1]))
  np.testing.assert_allclose(got, fastap_np(emb, np.array([0, 0, 1, 1])), rtol=1e-5)
  assert float(got) < 0.05


def test_contract():
  # Raw Gaussian inputs: Euclidean distances up to ~6, so a wider histogram.
  check_loss_contract(lambda e, l, **kw: mj.losses.fastap_loss(
      e, l, distance="euclidean", histogram_max=8.0, **kw))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`num_bins` must be >= 1"):
    mj.losses.fastap_loss(emb, lab, num_bins=0)
  with pytest.raises(TypeError, match="`num_bins` must be a Python int"):
    mj.losses.fastap_loss(emb, lab, num_bins=2.5)
  with pytest.raises(ValueError, match="`histogram_max` is required"):
    mj.losses.fastap_loss(emb, lab, distance=lambda x, y: x @ y.T)
  with pytest.raises(ValueError, match="needs a distance"):
    mj.losses.fastap_loss(emb, lab, distance="cosine", histogram_max=2.0)
  with pytest.raises(ValueError, match="`histogram_max` must be > 0"):
    mj.losses.fastap_loss(emb, lab, histogram_max=-1.0)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import distances as pml_dist
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  want = pml_losses.FastAPLoss()(torch.tensor(emb), torch.tensor(labels)).item()
  np.testing.assert_allclose(mj.losses.fastap_loss(emb_n, labels), want, rtol=1e-5)
  want = pml_losses.FastAPLoss(num_bins=5, distance=pml_dist.LpDistance(power=1))(
      torch.tensor(emb), torch.tensor(labels)).item()
  got = mj.losses.fastap_loss(emb_n, labels, num_bins=5, distance="euclidean")
  np.testing.assert_allclose(got, want, rtol=1e-5)
