"""pnp_loss vs a loop reference (every variant, grid and dense paths), the
loss contract, half precision and PML."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from metric_jax.losses import _grid
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings, reference_case)

VARIANTS = ("O", "Ds", "Dq", "Iu", "Ib")


def _sigmoid(x):
  return 0.5 * (1.0 + math.tanh(0.5 * x))     # no overflow in float64


def pnp_np(emb, labels, ref=None, ref_labels=None, b=2.0, alpha=1.0, anneal=0.01,
           variant="O", include_self=False, metric="cosine", reduction="mean",
           where=None, ref_where=None, pair_mask=None):
  """The paper's per-anchor loss with explicit loops over anchors, positives
  and negatives (float64); ``include_self`` adds the anchor to its positives."""
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  sign = 1.0 if metric in ("cosine", "dot") else -1.0
  sim = sign * np_pairwise(emb, ref, metric)
  terms, valid = np.zeros(len(emb)), np.zeros(len(emb), bool)
  for i in range(len(emb)):
    if where is not None and not where[i]:
      continue
    cols = [j for j in range(len(ref))
            if not (ref_where is not None and not ref_where[j]) and not (same and i == j)
            and (pair_mask is None or pair_mask[i, j])]
    pos = [j for j in cols if labels[i] == ref_labels[j]]
    neg = [k for k in cols if labels[i] != ref_labels[k]]
    if not pos:
      continue
    values = [sim[i, j] for j in pos]
    if include_self:
      values.append(sign * np_pairwise(emb[i:i + 1], emb[i:i + 1], metric)[0, 0])
    ranks = [sum(_sigmoid((sim[i, k] - v) / anneal) for k in neg) for v in values]
    if variant == "O":
      f = ranks
    elif variant == "Ds":
      f = [math.log(1 + r) for r in ranks]
    elif variant == "Dq":
      f = [1 / (1 + r) ** alpha for r in ranks]
    elif variant == "Iu":
      f = [(1 + r) * math.log(1 + r) for r in ranks]
    else:
      f = [(b * r - math.log(1 + b * r)) / b ** 2 for r in ranks]
    terms[i] = np.mean(f)
    if variant == "Dq":
      terms[i] = 1 - terms[i]
    valid[i] = True
  if reduction == "none":
    return terms
  if reduction == "sum":
    return terms.sum()
  if reduction == "mean":
    return terms.sum() / max(valid.sum(), 1)
  return terms.sum() / max(int(np.sum(terms[valid] > 0)), 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout, variant):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for kw in (dict(), dict(anneal=0.1, include_self=True, b=3.0, alpha=2.0)):
    for reduction in ("mean", "sum", "mean_nonzero", "none"):
      got = mj.losses.pnp_loss(emb, labels, variant=variant, reduction=reduction, **kw)
      want = pnp_np(emb, labels, variant=variant, reduction=reduction, **kw)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{kw} {reduction}")


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_other_metrics(metric):
  # A distance ranks in increasing order (s = -d); dot is an unnormalised similarity.
  emb = random_embeddings(2, 12, 5, scale=0.5)
  labels = label_layouts()["with_singletons"]
  for include_self in (False, True):
    got = mj.losses.pnp_loss(emb, labels, distance=metric, anneal=0.2, variant="Ds",
                             include_self=include_self)
    want = pnp_np(emb, labels, metric=metric, anneal=0.2, variant="Ds",
                  include_self=include_self)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_include_self_with_reference_set_and_dot():
  # The anchor's own slot is its similarity to itself, |x|^2 for "dot".
  emb = random_embeddings(10, 8, 4, scale=0.5)
  ref = random_embeddings(11, 9, 4, scale=0.5)
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 7])
  ref_labels = np.array([0, 1, 2, 3, 0, 1, 2, 4, 4])
  got = mj.losses.pnp_loss(emb, labels, ref, ref_labels, distance="dot", anneal=0.3,
                           include_self=True, variant="Ib")
  want = pnp_np(emb, labels, ref, ref_labels, metric="dot", anneal=0.3, include_self=True,
                variant="Ib")
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_nan_in_an_anchor_without_positives_is_not_hidden():
  # Anchor 3 has no positive in the reference set (it is dropped), yet its
  # NaN embedding must show.
  emb = random_embeddings(12, 4, 3).copy()
  emb[3, 0] = np.nan
  ref = random_embeddings(13, 5, 3)
  value = mj.losses.pnp_loss(emb, np.array([0, 1, 1, 5]), ref, np.array([0, 0, 1, 2, 2]))
  assert np.isnan(float(value))


def _layouts_24():
  return {
      "pk4": np.repeat(np.arange(6), 4),           # 3 positives: smallest grid
      "pk8": np.repeat(np.arange(3), 8),           # 7 positives: second grid
      "big_class": np.array([0] * 20 + [1, 2, 2, 3]),   # 19 positives: dense
  }


@pytest.mark.parametrize("layout", list(_layouts_24()))
def test_grid_and_dense_paths(layout, monkeypatch):
  emb = jnp.asarray(random_embeddings(3, 24, 6))
  labels = jnp.asarray(_layouts_24()[layout])
  kw = dict(variant="Iu", anneal=0.1, include_self=True)
  want = pnp_np(np.asarray(emb), np.asarray(labels), **kw)
  # A fresh function object per setting: jit caches traces per function.
  value, grad = jax.jit(jax.value_and_grad(lambda e: mj.losses.pnp_loss(e, labels, **kw)))(emb)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  if layout == "pk4":
    # The grid in tiles of anchors (as for large batches on CPU).
    monkeypatch.setattr(_grid, "GRID_ELEMENTS", 64)
    other = jax.jit(jax.value_and_grad(lambda e: mj.losses.pnp_loss(e, labels, **kw)))(emb)
  else:
    # The run-time choice (a rematerialised branch, the dense path) against
    # one static grid holding every positive.
    bound = {"pk8": 7, "big_class": 23}[layout]
    other = jax.jit(jax.value_and_grad(
        lambda e: mj.losses.pnp_loss(e, labels, max_positives=bound, **kw)))(emb)
  np.testing.assert_allclose(other[0], want, rtol=1e-5)
  np.testing.assert_allclose(other[1], grad, rtol=1e-4, atol=1e-6)


def test_too_few_positive_slots_is_nan():
  labels = jnp.asarray(_layouts_24()["pk8"])
  emb = jnp.asarray(random_embeddings(4, 24, 6))
  assert np.isnan(float(mj.losses.pnp_loss(emb, labels, max_positives=6)))
  want = pnp_np(np.asarray(emb), np.asarray(labels))
  np.testing.assert_allclose(mj.losses.pnp_loss(emb, labels, max_positives=7), want, rtol=1e-5)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  for variant, include_self in (("O", False), ("Dq", True), ("Ib", True)):
    kw = dict(variant=variant, include_self=include_self, anneal=0.05, where=where,
              ref_where=ref_where, pair_mask=mask)
    got = mj.losses.pnp_loss(emb, labels, ref, ref_labels,
                             **dict(kw, pair_mask=jnp.asarray(mask)))
    want = pnp_np(emb, labels, ref, ref_labels, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=variant)
  # Without a reference set: a pair mask, and the self slot only for anchors
  # left with a positive.
  square = np.random.default_rng(1).random((10, 10)) < 0.7
  got = mj.losses.pnp_loss(emb, labels, where=where, pair_mask=jnp.asarray(square),
                           include_self=True)
  want = pnp_np(emb, labels, where=where, pair_mask=square, include_self=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_masked_references_get_zero_gradient():
  emb = jnp.asarray(random_embeddings(5, 8, 4))
  ref = jnp.asarray(random_embeddings(6, 9, 4))
  labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  ref_labels = jnp.array([0, 1, 2, 3, 0, 1, 2, 9, 9])
  ref_where = jnp.arange(9) < 7
  padded = ref.at[7:].set(jnp.nan)

  def loss(r, mask):
    return mj.losses.pnp_loss(emb, labels, r, ref_labels, ref_where=mask, anneal=0.1,
                              include_self=True, variant="Ds")

  value, grad = jax.jit(jax.value_and_grad(loss))(padded, ref_where)
  kept = mj.losses.pnp_loss(emb, labels, ref[:7], ref_labels[:7], anneal=0.1,
                            include_self=True, variant="Ds")
  np.testing.assert_allclose(value, kept, rtol=1e-6)
  assert np.all(np.isfinite(grad)) and float(jnp.abs(grad[7:]).max()) == 0.0
  assert float(jnp.abs(grad[:7]).max()) > 0.0


@pytest.mark.parametrize("variant,include_self", [("O", False), ("Dq", True)])
def test_contract(variant, include_self):
  # anneal = 0.1: the default 0.01 makes the sigmoids too sharp for finite
  # differences at the contract's step.
  check_loss_contract(lambda e, l, **kw: mj.losses.pnp_loss(
      e, l, variant=variant, include_self=include_self, anneal=0.1, **kw))


def test_traced_hyperparameters_under_vmap():
  emb = random_embeddings(7, 12, 5)
  labels = label_layouts()["m_per_class"]
  anneals = jnp.array([0.02, 0.1, 0.5])
  got = jax.vmap(lambda a: mj.losses.pnp_loss(emb, labels, anneal=a, alpha=2 * a,
                                              variant="Dq"))(anneals)
  want = [pnp_np(emb, labels, anneal=float(a), alpha=2 * float(a), variant="Dq")
          for a in anneals]
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("dtype,variant", [(jnp.bfloat16, "O"), (jnp.float16, "Iu")])
def test_half_precision_default_anneal(dtype, variant):
  emb = jnp.asarray(random_embeddings(8, 16, 8)).astype(dtype)
  labels = jnp.asarray(np.repeat(np.arange(4), 4))
  fn = jax.jit(jax.value_and_grad(lambda e: mj.losses.pnp_loss(
      e, labels, variant=variant, include_self=True)))
  value, grad = fn(emb)
  assert value.dtype == jnp.float32 and grad.dtype == dtype
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  assert float(jnp.abs(grad.astype(jnp.float32)).max()) > 0
  want = pnp_np(np.asarray(emb, np.float64), np.asarray(labels), variant=variant,
                include_self=True)
  np.testing.assert_allclose(value, want, rtol=1e-4)


def test_duplicate_embeddings():
  # Negatives identical to the anchor's positives: sigmoid(0) = 1/2 each.
  emb = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
  labels = np.array([0, 0, 1, 1])
  value, grad = jax.value_and_grad(lambda e: mj.losses.pnp_loss(e, labels))(jnp.asarray(emb))
  np.testing.assert_allclose(value, pnp_np(emb, labels), rtol=1e-6)
  # R = 1/2 for anchors 0 and 1 (one tied negative), 2 for anchor 2 (both
  # negatives ahead), 1 for anchor 3 (both tied).
  np.testing.assert_allclose(value, 1.0, rtol=1e-6)
  assert np.all(np.isfinite(grad))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match=r"`variant` must be one of \('O', 'Ds'.*got 'PNP-O'"):
    mj.losses.pnp_loss(emb, lab, variant="PNP-O")
  with pytest.raises(ValueError, match="`anneal` must be > 0, got 0.0"):
    mj.losses.pnp_loss(emb, lab, anneal=0.0)
  with pytest.raises(ValueError, match="`b` must be > 0, got -1"):
    mj.losses.pnp_loss(emb, lab, b=-1)
  with pytest.raises(ValueError, match="`alpha` must be a scalar, got shape"):
    mj.losses.pnp_loss(emb, lab, alpha=jnp.ones(2))
  with pytest.raises(TypeError, match="`include_self` must be a bool, got str"):
    mj.losses.pnp_loss(emb, lab, include_self="yes")
  with pytest.raises(ValueError, match="`max_positives` must be >= 1, got 0"):
    mj.losses.pnp_loss(emb, lab, max_positives=0)
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    mj.losses.pnp_loss(emb, lab, reduction="max")
  with pytest.raises(TypeError, match="`labels` must be an integer array"):
    mj.losses.pnp_loss(emb, jnp.ones(4))
  with pytest.raises(ValueError, match="`ref_embeddings` and `ref_labels` must be given"):
    mj.losses.pnp_loss(emb, lab, emb)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", list(label_layouts()))
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(9, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  settings = [({}, {})] + [({"variant": v}, {"variant": v}) for v in VARIANTS[1:]]
  settings += [({"variant": "Dq", "alpha": 2, "anneal": 0.05}, {"variant": "Dq", "alpha": 2.0,
                                                                 "anneal": 0.05}),
               ({"variant": "Ib", "b": 4, "anneal": 0.1}, {"variant": "Ib", "b": 4.0,
                                                          "anneal": 0.1})]
  for pml_kw, kw in settings:
    x = torch.tensor(emb, requires_grad=True)
    out = pml_losses.PNPLoss(**pml_kw)(x, torch.tensor(labels))
    out.backward()
    value, grad = jax.value_and_grad(lambda e: mj.losses.pnp_loss(
        e, labels, include_self=True, **kw))(jnp.asarray(emb))
    np.testing.assert_allclose(value, out.item(), rtol=1e-5, atol=1e-6, err_msg=str(kw))
    scale = float(np.abs(x.grad.numpy()).max()) + 1e-12
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-4, atol=1e-5 * scale,
                               err_msg=str(kw))
    got = mj.losses.pnp_loss(emb_n, labels, include_self=True, **kw)
    np.testing.assert_allclose(got, out.item(), rtol=1e-5, atol=1e-6, err_msg=str(kw))
  if layout in ("m_per_class", "with_singletons"):
    # The paper's default (the anchor is not its own positive) differs from PML.
    default = pml_losses.PNPLoss()(torch.tensor(emb), torch.tensor(labels)).item()
    assert abs(float(mj.losses.pnp_loss(emb_n, labels)) - default) > 1e-3 * abs(default)
