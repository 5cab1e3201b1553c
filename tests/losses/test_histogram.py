"""histogram_loss vs a loop reference, the loss contract and PML."""

import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings, reference_case)


def histogram_np(emb, labels, ref=None, ref_labels=None, num_bins=100, where=None,
                 ref_where=None, pair_mask=None):
  """Ustinova & Lempitsky with PML's pair selection, explicit loops."""
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  s = np_pairwise(emb, ref, "cosine")

  def ok(i, j):
    if (where is not None and not where[i]) or (ref_where is not None and not ref_where[j]):
      return False
    return not (same and i == j) and (pair_mask is None or bool(pair_mask[i, j]))

  pos, neg = set(), set()
  for a in range(len(emb)):
    ps = [j for j in range(len(ref)) if ok(a, j) and labels[a] == ref_labels[j]]
    ns = [j for j in range(len(ref)) if ok(a, j) and labels[a] != ref_labels[j]]
    if not ps or not ns:          # no triplet with this anchor
      continue
    for p in ps:
      pos.add(tuple(sorted((a, p))) if same else (a, p))
    for n in ns:
      neg.add(tuple(sorted((a, n))) if same else (a, n))
  if not pos or not neg:
    return 0.0
  delta = 2.0 / num_bins
  nodes = [-1.0 + r * delta for r in range(num_bins + 1)]

  def density(pairs_):
    h = np.zeros(num_bins + 1)
    for i, j in pairs_:
      v = min(1.0, max(-1.0, s[i, j]))
      for r, t in enumerate(nodes):
        h[r] += max(0.0, 1.0 - abs(v - t) / delta)
    return h / len(pairs_)

  h_pos, h_neg = density(pos), density(neg)
  return sum(h_neg[r] * sum(h_pos[:r + 1]) for r in range(num_bins + 1))


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for bins in (100, 7):
    got = mj.losses.histogram_loss(emb, labels, num_bins=bins)
    want = histogram_np(emb, labels, num_bins=bins)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  got = mj.losses.histogram_loss(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                                 pair_mask=jnp.asarray(mask), num_bins=20)
  want = histogram_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                      pair_mask=mask, num_bins=20)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The self-batch case with an asymmetric pair mask de-duplicates pairs.
  mask = np.random.default_rng(1).random((10, 10)) < 0.6
  got = mj.losses.histogram_loss(emb, labels, where=where, pair_mask=jnp.asarray(mask),
                                 num_bins=20)
  want = histogram_np(emb, labels, where=where, pair_mask=mask, num_bins=20)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_none_gives_node_terms_and_duplicates_are_in_range():
  emb = np.array([[1, 0], [1, 0], [0, 1], [0.1, 1]], np.float32)   # s = 1 exactly
  labels = np.array([0, 0, 1, 1])
  terms = mj.losses.histogram_loss(emb, labels, num_bins=10, reduction="none")
  assert terms.shape == (11,)
  np.testing.assert_allclose(terms.sum(), histogram_np(emb, labels, num_bins=10), rtol=1e-5)


def test_contract():
  # Piecewise-linear in the similarities; the seeds of the contract keep the
  # finite differences away from the nodes.
  check_loss_contract(lambda e, l, **kw: mj.losses.histogram_loss(e, l, num_bins=10, **kw))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`num_bins` must be >= 1"):
    mj.losses.histogram_loss(emb, lab, num_bins=0)
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    mj.losses.histogram_loss(emb, lab, reduction="mean")
  with pytest.raises(ValueError, match="needs a similarity"):
    mj.losses.histogram_loss(emb, lab, distance="euclidean")


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  want = pml_losses.HistogramLoss()(torch.tensor(emb), torch.tensor(labels)).item()
  np.testing.assert_allclose(mj.losses.histogram_loss(emb_n, labels), want, rtol=1e-5)
  want = pml_losses.HistogramLoss(n_bins=8)(torch.tensor(emb), torch.tensor(labels)).item()
  np.testing.assert_allclose(mj.losses.histogram_loss(emb_n, labels, num_bins=8), want,
                             rtol=1e-5)
