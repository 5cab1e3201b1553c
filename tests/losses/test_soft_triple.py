"""soft_triple_loss vs a loop reference, the loss contract, gradients w.r.t.
the centres, bad inputs and PML parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import metric_jax as mj
from tests.helpers import HAS_PML, check_loss_contract, label_layouts, random_embeddings

C, K, D = 13, 4, 5


def _centers(seed, k=K):
  return np.random.default_rng(seed).normal(size=(C, k, D)).astype(np.float32)


def soft_triple_np(emb, labels, centers, *, la=20.0, gamma=0.1, margin=0.01, where=None,
                   reduction="mean"):
  """Qian et al. eqs. (5)-(8) (without the centre regulariser), loop form."""
  terms = []
  for i in range(len(emb)):
    if where is not None and not where[i]:
      continue
    x = np.asarray(emb[i], np.float64)
    x = x / np.linalg.norm(x)
    logits = []
    for c in range(len(centers)):
      sims = []
      for k in range(len(centers[c])):
        w = np.asarray(centers[c][k], np.float64)
        sims.append(x @ w / np.linalg.norm(w))
      weights = [math.exp(s / gamma) for s in sims]
      s_c = sum(wk * s for wk, s in zip(weights, sims)) / sum(weights)
      logits.append(la * (s_c - (margin if c == labels[i] else 0.0)))
    m = max(logits)
    terms.append(-logits[labels[i]] + m + math.log(sum(math.exp(z - m) for z in logits)))
  if reduction == "sum":
    return float(np.sum(terms))
  return float(np.sum(terms) / max(len(terms), 1))


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout):
  emb = random_embeddings(1, 12, D)
  labels = label_layouts()[layout]
  centers = _centers(2)
  for kw in ({}, {"la": 5.0, "gamma": 0.5, "margin": 0.2}):
    got = mj.losses.soft_triple_loss(emb, labels, centers=centers, **kw)
    np.testing.assert_allclose(got, soft_triple_np(emb, labels, centers, **kw), rtol=1e-5)


def test_where_reductions_layouts_and_logits():
  emb = random_embeddings(3, 12, D)
  labels = label_layouts()["with_singletons"]
  where = np.arange(12) % 5 != 2
  centers = _centers(4)
  for red in ("mean", "sum"):
    got = mj.losses.soft_triple_loss(emb, np.where(where, labels, 99), centers=centers,
                                     where=where, reduction=red)
    np.testing.assert_allclose(got, soft_triple_np(emb, labels, centers, where=where,
                                                   reduction=red), rtol=1e-5)
  flat = mj.losses.soft_triple_loss(emb, labels, centers=centers.reshape(C * K, D),
                                    centers_per_class=K)
  np.testing.assert_allclose(flat, mj.losses.soft_triple_loss(emb, labels, centers=centers),
                             rtol=1e-6)
  logits = mj.losses.soft_triple_logits(emb, centers, labels)
  terms = mj.losses.soft_triple_loss(emb, labels, centers=centers, reduction="none")
  np.testing.assert_allclose(jax.nn.logsumexp(logits, 1) - logits[np.arange(12), labels],
                             terms, rtol=1e-5, atol=1e-6)
  plain = mj.losses.soft_triple_logits(emb, centers)
  np.testing.assert_allclose(plain - logits, 20.0 * 0.01 * np.eye(C)[labels], atol=1e-5)


def test_one_center_per_class_is_normalized_softmax():
  """K = 1: S_ic is the plain cosine, so SoftTriple with margin 0 is the
  normalised softmax with temperature 1 / la."""
  emb = random_embeddings(5, 12, D)
  labels = label_layouts()["m_per_class"]
  w = _centers(6, k=1)
  got = mj.losses.soft_triple_loss(emb, labels, centers=w, la=10.0, margin=0.0)
  want = mj.losses.normalized_softmax_loss(emb, labels, weights=w[:, 0], temperature=0.1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_contract():
  centers = jnp.asarray(_centers(7))
  loss = jax.jit(lambda e, l, where=None: mj.losses.soft_triple_loss(
      e, l, centers=centers, la=5.0, where=where))
  check_loss_contract(loss, zero_without_positives=False)


def test_gradients_wrt_centers_and_half_precision():
  emb = jnp.asarray(random_embeddings(8, 12, D))
  labels = jnp.asarray(label_layouts()["with_singletons"])
  centers = jnp.asarray(_centers(9))
  f = jax.jit(lambda e, c: mj.losses.soft_triple_loss(e, labels, centers=c, la=5.0))
  check_grads(f, (emb, centers), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-3)
  vg = jax.jit(jax.value_and_grad(
      lambda e, c: mj.losses.soft_triple_loss(e, labels, centers=c), argnums=(0, 1)))
  e16, c16 = emb.astype(jnp.float16), centers.astype(jnp.float16)
  val, (g_e, g_c) = vg(e16, c16)
  assert val.dtype == jnp.float32 and g_c.dtype == jnp.float16
  assert np.all(np.isfinite(np.asarray(g_e, np.float32)))
  assert np.all(np.isfinite(np.asarray(g_c, np.float32)))
  # Same rounded inputs in float32: the computation itself is float32.
  np.testing.assert_allclose(val, vg(e16.astype(jnp.float32), c16.astype(jnp.float32))[0],
                             rtol=1e-5)


def test_init():
  params = mj.losses.init_soft_triple(jax.random.key(0), 50, 40, centers_per_class=10)
  c = np.asarray(params["centers"])
  assert set(params) == {"centers"} and c.shape == (50, 10, 40)
  bound = 1 / math.sqrt(500)  # PML's kaiming_uniform_(a=sqrt(5)) of [D, C*K]
  assert c.max() <= bound and c.min() >= -bound
  np.testing.assert_allclose(c.std(), bound / math.sqrt(3), rtol=0.03)


def test_bad_inputs():
  emb = random_embeddings(10, 12, D)
  labels = label_layouts()["all_singletons"]
  centers = _centers(11)
  loss = mj.losses.soft_triple_loss
  with pytest.raises(ValueError, match="ref_embeddings"):
    loss(emb, labels, emb, labels, centers=centers)
  with pytest.raises(ValueError, match="labels"):
    loss(emb, labels + 2, centers=centers)
  with pytest.raises(ValueError, match="centers"):
    loss(emb, labels, centers=centers[..., :3])
  with pytest.raises(ValueError, match="centers"):
    loss(emb, labels, centers=None)
  with pytest.raises(ValueError, match="centers_per_class"):
    loss(emb, labels, centers=centers, centers_per_class=3)
  with pytest.raises(ValueError, match="centers_per_class"):
    loss(emb, labels, centers=centers.reshape(C * K, D), centers_per_class=3)
  for name in ("la", "gamma"):
    with pytest.raises(ValueError, match=name):
      loss(emb, labels, centers=centers, **{name: 0.0})
  with pytest.raises(ValueError, match="reduction"):
    loss(emb, labels, centers=centers, reduction="mean_nonzero")
  val = jax.jit(lambda l: loss(emb, l, centers=centers))(jnp.asarray(labels + 5))
  assert np.isnan(float(val))


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("kw", [{}, {"la": 8.0, "gamma": 0.3, "margin": 0.1}])
def test_pml_parity(kw):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  module = pml_losses.SoftTripleLoss(C, D, centers_per_class=K, **kw)
  # PML's own initialisation of fc [D, C*K]; ours is its transpose.
  fc = module.fc.detach().numpy().astype(np.float32).copy()
  module.fc.data = torch.tensor(fc, dtype=torch.float64)
  emb = random_embeddings(12, 12, D)
  labels = label_layouts()["with_singletons"]
  e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
  out = module(e, torch.tensor(labels, dtype=torch.int64))
  out.backward()
  f = lambda a, c: mj.losses.soft_triple_loss(a, labels, centers=c, centers_per_class=K, **kw)
  got, (g_e, g_c) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(emb),
                                                          jnp.asarray(fc.T.copy()))
  np.testing.assert_allclose(got, out.item(), rtol=1e-5)
  scale = max(np.abs(e.grad.numpy()).max(), np.abs(module.fc.grad.numpy()).max())
  np.testing.assert_allclose(g_e, e.grad.numpy(), rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(g_c, module.fc.grad.numpy().T, rtol=1e-4, atol=1e-5 * scale)
