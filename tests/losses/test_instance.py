"""instance_loss vs a loop reference, the loss contract and PML."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_gradient,
                           np_normalize, np_pairwise, random_embeddings)


def instance_np(emb, labels, gamma=64.0, reduction="mean", where=None):
  """PML's definition on the valid samples, with explicit loops."""
  keep = [i for i in range(len(emb)) if where is None or where[i]]
  emb = np.asarray(emb)[keep]
  labels = np.asarray(labels)[keep]
  s = gamma * np_pairwise(emb, emb, "cosine")
  distinct = sorted(set(labels.tolist()))
  terms = []
  for i in range(len(emb)):
    target = distinct.index(labels[i])
    top = s[i].max()
    lse = top + math.log(sum(math.exp(v - top) for v in s[i]))
    terms.append(lse - s[i, target])
  terms = np.array(terms)
  if reduction == "sum":
    return terms.sum()
  return terms.sum() / max(len(terms), 1)


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for gamma in (4.0, 64.0):
    for reduction in ("mean", "sum"):
      got = mj.losses.instance_loss(emb, labels, gamma=gamma, reduction=reduction)
      want = instance_np(emb, labels, gamma=gamma, reduction=reduction)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_instance_labels_target_self_and_where():
  emb = random_embeddings(2, 10, 4)
  labels = np.array([7, 3, 9, 3, 0, 5, 7, 1, 8, 2])
  where = np.array([True, False, True, True, False, True, True, True, True, False])
  got = mj.losses.instance_loss(emb, labels, where=where, gamma=8.0)
  np.testing.assert_allclose(got, instance_np(emb, labels, gamma=8.0, where=where), rtol=1e-5)
  # Instance ids arange(B): the target is the sample itself.
  xn = np_normalize(emb) * 8.0
  s = xn @ np_normalize(emb).T
  want = np.mean([np.log(np.exp(s[i]).sum()) - s[i, i] for i in range(10)])
  np.testing.assert_allclose(mj.losses.instance_loss(emb, np.arange(10), gamma=8.0), want,
                             rtol=1e-5)


@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "all_singletons"])
def test_gradient_matches_loop_reference(layout):
  # Dense path: symmetric logits, one product in the backward pass.
  emb = random_embeddings(4, 12, 5)
  labels = label_layouts()[layout]
  where = np.array([True] * 9 + [False] * 3)
  for kw in ({"gamma": 4.0}, {"gamma": 16.0, "reduction": "sum"}, {"gamma": 8.0, "where": where}):
    got = jax.jit(jax.grad(lambda e: mj.losses.instance_loss(e, labels, **kw)))(emb)
    want = np_gradient(lambda e: instance_np(e, labels, **kw), emb)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * np.abs(want).max(),
                               err_msg=str(kw))


def routed(monkeypatch):
  """Every batch takes the streamed path, in 3-column tiles."""
  from metric_jax.streaming import _engine  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(_engine, "ROUTE_MIN_ELEMENTS", 1)
  monkeypatch.setattr(_engine, "_MIN_TILE", 1)
  monkeypatch.setattr(_engine, "ROUTE_TILE_ELEMENTS", 3 * 12)


def test_streamed_path_matches_reference_and_dense(monkeypatch):
  emb = jnp.asarray(random_embeddings(3, 12, 5))
  emb_nan_pad = emb.at[10:].set(jnp.nan)
  where = jnp.arange(12) < 10

  def run():
    out = {}
    for layout, labels in label_layouts().items():
      for reduction in ("mean", "none"):
        f = lambda e, labels=labels, reduction=reduction: jnp.sum(mj.losses.instance_loss(
            e, labels, gamma=16.0, where=where, reduction=reduction))
        step = jax.jit(jax.value_and_grad(f))
        out[layout, reduction] = step(emb_nan_pad), "while" in step.lower(emb).as_text()
    return out

  dense = run()
  routed(monkeypatch)
  streamed = run()
  for key, ((value, grad), loops) in streamed.items():
    (want_value, want_grad), dense_loops = dense[key]
    assert loops and not dense_loops, key
    np.testing.assert_allclose(value, want_value, rtol=2e-5, err_msg=str(key))
    # Both paths sum cancelling float32 terms in different orders (each is
    # within ~1e-5 of the largest entry of the float64 gradient).
    np.testing.assert_allclose(grad, want_grad, rtol=2e-4, atol=2e-5 * np.abs(want_grad).max(),
                               err_msg=str(key))
    assert np.all(np.isfinite(grad)), key
  labels = label_layouts()["m_per_class"]
  np.testing.assert_allclose(
      mj.losses.instance_loss(emb_nan_pad, labels, gamma=16.0, where=where),
      instance_np(np.asarray(emb), labels, gamma=16.0, where=np.asarray(where)), rtol=1e-5)
  assert np.isnan(float(mj.losses.instance_loss(emb.at[0, 1].set(jnp.nan), labels)))


def test_contract():
  # With all-singleton labels every sample is its own target: the loss is an
  # instance-discrimination softmax, not zero.
  check_loss_contract(lambda e, l, **kw: mj.losses.instance_loss(e, l, gamma=4.0, **kw),
                      zero_without_positives=False)


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`gamma` must be > 0"):
    mj.losses.instance_loss(emb, lab, gamma=0.0)
  with pytest.raises(ValueError, match="does not support `ref_embeddings`"):
    mj.losses.instance_loss(emb, lab, emb, lab)
  with pytest.raises(ValueError, match="does not support `pair_mask`"):
    mj.losses.instance_loss(emb, lab, pair_mask=jnp.ones((4, 4), bool))
  with pytest.raises(ValueError, match="needs a similarity"):
    mj.losses.instance_loss(emb, lab, distance="euclidean")


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "all_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  for gamma in (64, 8):
    want = pml_losses.InstanceLoss(gamma=gamma)(torch.tensor(emb), torch.tensor(labels)).item()
    # atol: at gamma = 64 an instance loss can be ~1e-4, the float32 rounding
    # of LSE - logit (both ~64) in either library.
    np.testing.assert_allclose(mj.losses.instance_loss(emb_n, labels, gamma=gamma), want,
                               rtol=1e-5, atol=2e-6)
