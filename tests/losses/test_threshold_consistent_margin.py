"""threshold_consistent_margin_loss vs a loop reference, the loss contract,
ties at the margins, the symmetric gradient path, bad inputs and PML."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests import helpers
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_pairwise,
                           random_embeddings, reference_case)

LOSS = mj.losses.threshold_consistent_margin_loss
CUSTOM = dict(lambda_plus=0.5, lambda_minus=2.0, margin_plus=0.4, margin_minus=0.1)


def tcm_np(emb, labels, ref=None, ref_labels=None, *, lambda_plus=1.0, lambda_minus=1.0,
           margin_plus=0.9, margin_minus=0.5, metric="cosine", reduction="mean",
           where=None, ref_where=None, pair_mask=None):
  """Means of the hinges over the hard pairs, explicit loops (float64).
  Returns the scalar, or the [B, M] weighted pair terms for "none"."""
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  s = np_pairwise(emb, ref, metric)
  terms = np.zeros(s.shape)
  pos, neg = [], []
  for i in range(len(emb)):
    for j in range(len(ref)):
      if (where is not None and not where[i]) or (ref_where is not None and not ref_where[j]):
        continue
      if (same and i == j) or (pair_mask is not None and not pair_mask[i, j]):
        continue
      if labels[i] == ref_labels[j] and s[i, j] <= margin_plus:
        terms[i, j] = lambda_plus * (margin_plus - s[i, j])
        pos.append(terms[i, j])
      elif labels[i] != ref_labels[j] and s[i, j] >= margin_minus:
        terms[i, j] = lambda_minus * (s[i, j] - margin_minus)
        neg.append(terms[i, j])
  if reduction == "none":
    return terms
  if reduction == "sum":
    return sum(pos) + sum(neg)
  if reduction == "mean_nonzero":
    pos, neg = [t for t in pos if t > 0], [t for t in neg if t > 0]
  return sum(pos) / max(len(pos), 1) + sum(neg) / max(len(neg), 1)


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for reduction in ("mean", "mean_nonzero", "sum", "none"):
    for kw in ({}, CUSTOM):
      got = LOSS(emb, labels, reduction=reduction, **kw)
      want = tcm_np(emb, labels, reduction=reduction, **kw)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{reduction} {kw}")


def test_dot_similarity():
  emb = random_embeddings(2, 12, 5, scale=0.5)
  labels = label_layouts()["m_per_class"]
  got = LOSS(emb, labels, distance="dot", **CUSTOM)
  want = tcm_np(emb, labels, metric="dot", **CUSTOM)
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case(seed=3)
  for reduction in ("mean", "sum", "none"):
    kw = dict(where=where, ref_where=ref_where, pair_mask=mask, reduction=reduction, **CUSTOM)
    got = LOSS(emb, labels, ref, ref_labels, **kw)
    want = tcm_np(emb, labels, ref, ref_labels, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=reduction)
  # The batch against itself with where and a pair mask.
  self_mask = np.random.default_rng(1).random((10, 10)) < 0.7
  got = LOSS(emb, labels, where=where, pair_mask=self_mask, **CUSTOM)
  want = tcm_np(emb, labels, where=where, pair_mask=self_mask, **CUSTOM)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ties_count_in_the_mean():
  """Pairs exactly at a margin cost 0 but count in "mean" (PML's <= and >=),
  not in "mean_nonzero"."""
  emb = np.array([[1., 0.], [0., 1.], [-1., 0.]], np.float32)  # cosines 0, 0, -1
  labels = np.zeros(3, np.int32)
  # Positive pairs: four at s = 0 (cost 0), two at s = -1 (cost 1).
  assert float(LOSS(emb, labels, margin_plus=0.0)) == pytest.approx(2 / 6)
  assert float(LOSS(emb, labels, margin_plus=0.0, reduction="mean_nonzero")) == 1.0
  neg = np.array([0, 1, 2])
  assert float(LOSS(emb, neg, margin_minus=0.0)) == pytest.approx(0.0)
  assert float(LOSS(emb, neg, margin_minus=-1.0)) == pytest.approx(4 / 6)


def test_contract():
  # "mean" jumps where a pair crosses a margin (its set's count changes), so
  # the numerical gradient is checked on the continuous "sum".
  check_loss_contract(
      lambda e, l, **kw: LOSS(e, l, **CUSTOM, **kw), zero_without_positives=False,
      grad_loss_fn=lambda e, l: LOSS(e, l, reduction="sum", **CUSTOM))


def test_symmetric_gradient_path():
  helpers.check_symmetric_gradient_path(lambda e, l, **kw: LOSS(e, l, **CUSTOM, **kw),
                                        metrics=("cosine", "dot"))


def test_gradient_matches_closed_form():
  """d L / d s_ij = -lambda+ / |P| on hard positives, lambda- / |N| on hard
  negatives, 0 elsewhere (the selection carries no gradient)."""
  emb = jnp.asarray(random_embeddings(5, 12, 5))
  labels = label_layouts()["with_singletons"]
  s = np_pairwise(emb, emb, "cosine")
  same = labels[:, None] == labels[None, :]
  eye = np.eye(12, dtype=bool)
  kw = dict(CUSTOM, margin_plus=0.6)
  hp, hn = same & ~eye & (s <= 0.6), ~same & (s >= 0.1)
  assert 0 < hp.sum() < (same & ~eye).sum() and 0 < hn.sum() < (~same).sum()
  weights = -0.5 * hp / hp.sum() + 2.0 * hn / hn.sum()
  want = jax.grad(lambda e: jnp.sum(weights * mj.distances.pairwise(e, None, "cosine")))(emb)
  got = jax.grad(lambda e: LOSS(e, labels, **kw))(emb)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision(dtype):
  emb = jnp.asarray(random_embeddings(6, 16, 8)).astype(dtype)
  labels = jnp.asarray(np.repeat(np.arange(4), 4))
  val, grad = jax.jit(jax.value_and_grad(lambda e: LOSS(e, labels)))(emb)
  assert val.dtype == jnp.float32 and grad.dtype == dtype
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  want = tcm_np(np.asarray(emb, np.float64), np.asarray(labels))
  np.testing.assert_allclose(val, want, rtol=1e-4)


def test_duplicates_and_zero_rows():
  emb = jnp.asarray(random_embeddings(7, 12, 5))
  emb = emb.at[1].set(emb[0]).at[2].set(emb[0]).at[5].set(0.0)
  labels = jnp.asarray(label_layouts()["m_per_class"])
  val, grad = jax.value_and_grad(lambda e: LOSS(e, labels))(emb)
  np.testing.assert_allclose(val, tcm_np(np.asarray(emb), np.asarray(labels)), rtol=1e-5)
  assert np.all(np.isfinite(grad))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="needs a similarity `distance`"):
    LOSS(emb, lab, distance="euclidean")
  with pytest.raises(ValueError, match="`lambda_plus` must be >= 0, got -1"):
    LOSS(emb, lab, lambda_plus=-1.0)
  with pytest.raises(ValueError, match="`lambda_minus` must be >= 0"):
    LOSS(emb, lab, lambda_minus=-0.5)
  with pytest.raises(ValueError, match="`margin_plus` must be a scalar"):
    LOSS(emb, lab, margin_plus=jnp.ones(3))
  with pytest.raises(ValueError, match="`margin_minus` must be a scalar"):
    LOSS(emb, lab, margin_minus=np.ones(2))
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    LOSS(emb, lab, reduction="max")
  with pytest.raises(TypeError, match="`labels` must be an integer array"):
    LOSS(emb, jnp.ones(4))
  with pytest.raises(ValueError, match="`ref_embeddings` and `ref_labels` must be given"):
    LOSS(emb, lab, ref_embeddings=emb)
  with pytest.raises(ValueError, match=r"`pair_mask` must have shape \(4, 4\)"):
    LOSS(emb, lab, pair_mask=jnp.ones((4, 3), bool))
  with pytest.raises(ValueError, match="`distance` must be one of"):
    LOSS(emb, lab, distance="cosin")


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "one_class"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(8, 12, 6)  # PML normalises: no pre-normalisation needed
  labels = label_layouts()[layout]
  for kw in ({}, CUSTOM):
    module = pml_losses.ThresholdConsistentMarginLoss(**kw)
    e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
    out = module(e, torch.tensor(labels))
    got, grad = jax.value_and_grad(lambda x: LOSS(x, labels, **kw))(jnp.asarray(emb))
    np.testing.assert_allclose(got, out.item(), rtol=1e-5, atol=1e-7)
    if out.requires_grad:
      out.backward()
      np.testing.assert_allclose(grad, e.grad.numpy(), rtol=1e-4, atol=1e-6)
  # A miner's pairs (PML's indices_tuple) are our pair_mask.
  mask = np.random.default_rng(2).random((12, 12)) < 0.5
  same = labels[:, None] == labels[None, :]
  a1, p = np.nonzero(mask & same & ~np.eye(12, dtype=bool))
  a2, n = np.nonzero(mask & ~same)
  pml = pml_losses.ThresholdConsistentMarginLoss(**CUSTOM)(
      torch.tensor(emb), torch.tensor(labels),
      indices_tuple=tuple(torch.tensor(v) for v in (a1, p, a2, n))).item()
  np.testing.assert_allclose(LOSS(emb, labels, pair_mask=mask, **CUSTOM), pml, rtol=1e-5,
                             atol=1e-7)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_ties_and_ref_path():
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = np.array([[1., 0.], [0., 1.], [-1., 0.]], np.float32)
  zeros = np.zeros(3, np.int64)
  pml = pml_losses.ThresholdConsistentMarginLoss(margin_plus=0.0)(torch.tensor(emb),
                                                                  torch.tensor(zeros))
  np.testing.assert_allclose(LOSS(emb, zeros, margin_plus=0.0), pml.item(), rtol=1e-6)
  # The deviation the docstring names: PML's ref_emb path takes the pairs'
  # indices from the reference set but reads both ends from the batch, i.e.
  # it computes our loss against the batch's first M rows.
  batch = random_embeddings(9, 12, 5)
  labels = label_layouts()["m_per_class"]
  ref, ref_labels = random_embeddings(10, 7, 5), labels[[0, 3, 4, 6, 7, 9, 11]]
  pml = pml_losses.ThresholdConsistentMarginLoss(**CUSTOM)(
      torch.tensor(batch), torch.tensor(labels), ref_emb=torch.tensor(ref),
      ref_labels=torch.tensor(ref_labels)).item()
  ours = LOSS(batch, labels, ref, ref_labels, **CUSTOM)
  as_pml = LOSS(batch, labels, batch[:7], ref_labels, **CUSTOM)
  np.testing.assert_allclose(as_pml, pml, rtol=1e-5)
  assert abs(float(ours) - pml) > 1e-3
