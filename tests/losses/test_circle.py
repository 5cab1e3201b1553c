"""circle_loss vs a loop reference, the loss contract, overflow safety and PML."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests import helpers
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings, reference_case)


def circle_np(emb, labels, ref=None, ref_labels=None, m=0.4, gamma=80.0,
              reduction="mean_nonzero", where=None, ref_where=None, pair_mask=None):
  """Paper form log(1 + sum_n e^{..} sum_p e^{..}) with explicit loops."""
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  s = np_pairwise(emb, ref, "cosine")
  terms = []
  for i in range(len(emb)):
    if where is not None and not where[i]:
      continue
    pos, neg = [], []
    for j in range(len(ref)):
      if (ref_where is not None and not ref_where[j]) or (same and i == j):
        continue
      if pair_mask is not None and not pair_mask[i, j]:
        continue
      if labels[i] == ref_labels[j]:
        pos.append(-gamma * max(0.0, 1 + m - s[i, j]) * (s[i, j] - (1 - m)))
      else:
        neg.append(gamma * max(0.0, s[i, j] + m) * (s[i, j] - m))
    if not pos or not neg:
      continue
    # log(1 + sum_n sum_p e^{x_n + x_p}), evaluated stably in float64.
    x = np.array([a + b for a in pos for b in neg])
    top = max(x.max(), 0.0)
    terms.append(top + math.log(math.exp(-top) + np.exp(x - top).sum()))
  terms = np.array(terms)
  if reduction == "sum":
    return terms.sum()
  if reduction == "mean":
    return terms.sum() / max(len(terms), 1)
  return terms.sum() / max(int(np.sum(terms > 0)), 1)


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
def test_matches_loop_reference(layout, reduction):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for kw in ({}, dict(m=0.25, gamma=16.0)):
    got = mj.losses.circle_loss(emb, labels, reduction=reduction, **kw)
    want = circle_np(emb, labels, reduction=reduction, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  got = mj.losses.circle_loss(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                              pair_mask=jnp.asarray(mask), gamma=32.0)
  want = circle_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                   pair_mask=mask, gamma=32.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_weights_are_detached():
  # d/ds_n of the loss is gamma * a_n * softmax weight, without the
  # d a_n / d s_n term: compare with a finite difference of the loss whose
  # weights are frozen at the current similarities.
  emb = jnp.asarray(random_embeddings(4, 6, 3))
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  g = jax.grad(lambda e: mj.losses.circle_loss(e, labels, gamma=4.0))(emb)

  def frozen(e):
    x = mj.distances.l2_normalize(e)
    s = x @ x.T
    s0 = jax.lax.stop_gradient(s)
    same = labels[:, None] == labels[None, :]
    eye = jnp.eye(6, dtype=bool)
    lp = jnp.where(same & ~eye, -4.0 * jax.nn.relu(1.4 - s0) * (s - 0.6), -jnp.inf)
    ln = jnp.where(~same, 4.0 * jax.nn.relu(s0 + 0.4) * (s - 0.4), -jnp.inf)
    t = jax.nn.softplus(jax.nn.logsumexp(lp, axis=1) + jax.nn.logsumexp(ln, axis=1))
    return jnp.sum(t) / jnp.sum(t > 0)

  np.testing.assert_allclose(g, jax.grad(frozen)(emb), rtol=1e-4, atol=1e-6)


def test_contract(monkeypatch):
  # The pair weights a_p, a_n are stop-gradient (paper and PML), so the
  # gradient is deliberately not the derivative of the value and the
  # numerical gradient check cannot apply (check_loss_contract has no flag
  # for it); test_weights_are_detached checks the gradient instead.
  monkeypatch.setattr(helpers, "check_grads", lambda *args, **kwargs: None)
  check_loss_contract(lambda e, l, **kw: mj.losses.circle_loss(e, l, gamma=16.0, **kw))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_gamma_300_half_precision_is_finite(dtype):
  emb = jnp.asarray(random_embeddings(5, 16, 8))
  labels = jnp.asarray(np.repeat(np.arange(4), 4))
  fn = jax.jit(jax.value_and_grad(lambda e: mj.losses.circle_loss(e, labels, gamma=300.0)))
  val, grad = fn(emb.astype(dtype))
  assert val.dtype == jnp.float32 and np.isfinite(float(val))
  assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))
  want = circle_np(np.asarray(emb.astype(dtype), np.float64), np.asarray(labels), gamma=300.0)
  np.testing.assert_allclose(val, want, rtol=1e-3)
  assert float(jnp.abs(grad.astype(jnp.float32)).max()) > 0


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`gamma` must be > 0"):
    mj.losses.circle_loss(emb, lab, gamma=0.0)
  with pytest.raises(ValueError, match="similarity `distance`"):
    mj.losses.circle_loss(emb, lab, distance="euclidean")
  with pytest.raises(ValueError, match="`m` must be a scalar"):
    mj.losses.circle_loss(emb, lab, m=jnp.ones(3))
  with pytest.raises(TypeError, match="`labels` must be an integer array"):
    mj.losses.circle_loss(emb, jnp.ones(4))


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  for kw in ({}, dict(m=0.25, gamma=256)):
    want = pml_losses.CircleLoss(**kw)(torch.tensor(emb), torch.tensor(labels)).item()
    got = mj.losses.circle_loss(emb_n, labels, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  ref = random_embeddings(8, 9, 6)
  ref_labels = np.array([0, 1, 1, 2, 3, 3, 4, 9, 9])
  want = pml_losses.CircleLoss()(torch.tensor(emb), torch.tensor(labels), ref_emb=torch.tensor(ref),
                                 ref_labels=torch.tensor(ref_labels)).item()
  got = mj.losses.circle_loss(emb_n, labels, np_normalize(ref).astype(np.float32), ref_labels)
  np.testing.assert_allclose(got, want, rtol=1e-5)
