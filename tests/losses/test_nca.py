"""nca_loss vs a loop reference, the loss contract and PML."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_gradient,
                           np_normalize, np_pairwise, random_embeddings, reference_case)


def nca_np(emb, labels, ref=None, ref_labels=None, softmax_scale=1.0,
           metric="squared_euclidean", reduction="mean", where=None, ref_where=None,
           pair_mask=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  d = np_pairwise(emb, ref, metric)
  z = softmax_scale * (d if metric in ("cosine", "dot") else -d)
  terms = []
  for i in range(len(emb)):
    if where is not None and not where[i]:
      continue
    cols = [j for j in range(len(ref))
            if not (ref_where is not None and not ref_where[j]) and not (same and i == j)
            and (pair_mask is None or pair_mask[i, j])]
    if not any(labels[i] == ref_labels[j] for j in cols):
      continue
    top = max(z[i, j] for j in cols)
    den = sum(math.exp(z[i, j] - top) for j in cols)
    num = sum(math.exp(z[i, j] - top) for j in cols if labels[i] == ref_labels[j])
    terms.append(-math.log(num / den))
  terms = np.array(terms)
  if reduction == "sum":
    return terms.sum()
  return terms.sum() / max(len(terms), 1)


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("metric", ["squared_euclidean", "cosine"])
def test_matches_loop_reference(layout, metric):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for scale in (1.0, 8.0):
    for reduction in ("mean", "sum"):
      got = mj.losses.nca_loss(emb, labels, softmax_scale=scale, distance=metric,
                               reduction=reduction)
      want = nca_np(emb, labels, softmax_scale=scale, metric=metric, reduction=reduction)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "one_class"])
@pytest.mark.parametrize("metric", ["squared_euclidean", "euclidean", "cosine", "dot"])
def test_gradient_matches_loop_reference(layout, metric):
  # A batch against itself takes the symmetric-cotangent path (one product
  # in the backward pass); the reference set, padding and a pair mask take
  # the plain one. Both against central differences of the float64 loop.
  emb = random_embeddings(3, 12, 5)
  labels = label_layouts()[layout]
  where = np.array([True] * 10 + [False] * 2)
  cases = [({}, {}), ({"where": where}, {"where": where}),
           ({"reduction": "sum", "softmax_scale": 3.0}, {"reduction": "sum", "softmax_scale": 3.0}),
           ({"pair_mask": jnp.asarray(_PAIR_MASK)}, {"pair_mask": _PAIR_MASK}),
           ({"ref_embeddings": emb[::-1] + 0.1, "ref_labels": labels[::-1]},
            {"ref": np.asarray(emb[::-1] + 0.1, np.float64), "ref_labels": labels[::-1]})]
  for kw, np_kw in cases:
    got = jax.jit(jax.grad(lambda e: mj.losses.nca_loss(e, labels, distance=metric, **kw)))(emb)
    want = np_gradient(lambda e: nca_np(e, labels, metric=metric, **np_kw), emb)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * np.abs(want).max(),
                               err_msg=str(sorted(kw)))


_PAIR_MASK = np.random.default_rng(5).random((12, 12)) < 0.7


def test_gradient_of_the_gradient():
  # Reverse over reverse through the symmetric-cotangent path equals the
  # plain path's (an all-True pair mask keeps the two-product backward).
  emb = random_embeddings(2, 12, 5)
  labels = label_layouts()["with_singletons"]
  everything = jnp.ones((12, 12), bool)

  def curvature(**kw):
    grad = jax.grad(lambda e: mj.losses.nca_loss(e, labels, **kw))
    return jax.jit(jax.grad(lambda e: jnp.sum(jnp.square(grad(e)))))(emb)

  fast, plain = curvature(), curvature(pair_mask=everything)
  np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())


@pytest.mark.parametrize("metric", ["squared_euclidean", "euclidean", "cosine", "dot"])
def test_far_neighbours_stay_finite(metric):
  # Scaled up, the neighbours' probabilities underflow float32 (e^-300 and
  # below): the difference of log-sum-exps must still match the loop.
  emb = 6.0 * random_embeddings(4, 12, 5)
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
  scale = 300.0 if metric == "cosine" else 1.0
  loss = lambda e: mj.losses.nca_loss(e, labels, softmax_scale=scale, distance=metric)
  want = nca_np(np.asarray(emb), labels, softmax_scale=scale, metric=metric)
  assert want > 1.0
  np.testing.assert_allclose(jax.jit(loss)(emb), want, rtol=1e-5)
  assert np.all(np.isfinite(jax.grad(loss)(emb)))


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  got = mj.losses.nca_loss(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                           pair_mask=jnp.asarray(mask))
  want = nca_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where, pair_mask=mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_no_underflow_at_large_scale():
  # p_i underflows in float32 at this scale; the two-LSE form stays exact.
  emb = np.array([[0.0, 0.0], [3.0, 0.0], [0.1, 0.0], [2.9, 0.0]], np.float32)
  labels = np.array([0, 0, 1, 1])
  got = mj.losses.nca_loss(emb, labels, softmax_scale=50.0)
  want = nca_np(emb, labels, softmax_scale=50.0)
  assert want > 100
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_contract():
  check_loss_contract(lambda e, l, **kw: mj.losses.nca_loss(e, l, **kw))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`softmax_scale` must be > 0"):
    mj.losses.nca_loss(emb, lab, softmax_scale=0.0)
  with pytest.raises(ValueError, match="`distance` must be one of"):
    mj.losses.nca_loss(emb, lab, distance="manhattan")
  with pytest.raises(ValueError, match="`where` must have shape"):
    mj.losses.nca_loss(emb, lab, where=jnp.ones(3, bool))


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  for scale in (1, 10):
    want = pml_losses.NCALoss(softmax_scale=scale)(torch.tensor(emb), torch.tensor(labels)).item()
    np.testing.assert_allclose(mj.losses.nca_loss(emb_n, labels, softmax_scale=scale), want,
                               rtol=1e-5)
  ref = random_embeddings(8, 9, 6)
  ref_labels = np.array([0, 1, 1, 2, 3, 3, 4, 9, 9])
  want = pml_losses.NCALoss()(torch.tensor(emb), torch.tensor(labels), ref_emb=torch.tensor(ref),
                              ref_labels=torch.tensor(ref_labels)).item()
  got = mj.losses.nca_loss(emb_n, labels, np_normalize(ref).astype(np.float32), ref_labels)
  np.testing.assert_allclose(got, want, rtol=1e-5)
