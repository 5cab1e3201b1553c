"""Tests of the magnet loss against a NumPy loop reference written from
eq. 5 of Rippel et al. (arXiv 1511.05939)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from metric_jax.losses.magnet import magnet_loss
from tests.helpers import check_loss_contract, random_embeddings


def np_magnet(emb, labels, cids, alpha=1.0, where=None):
  """Slow reference with explicit loops (float64). Returns (loss, terms, var)."""
  emb = np.asarray(emb, np.float64)
  b = len(emb)
  valid = np.ones(b, bool) if where is None else np.asarray(where)
  idx = [i for i in range(b) if valid[i]]
  clusters = sorted({int(cids[i]) for i in idx})
  means, cls = {}, {}
  for k in clusters:
    members = [i for i in idx if cids[i] == k]
    means[k] = sum(emb[i] for i in members) / len(members)
    cls[k] = {int(labels[i]) for i in members}
  if len(idx) < 2:
    return 0.0, np.zeros(b), 0.0
  var = 0.0
  for i in idx:
    var += float(np.sum((emb[i] - means[int(cids[i])]) ** 2))
  var = max(var / (len(idx) - 1), 1e-12)
  terms = np.zeros(b)
  kept = []
  for i in idx:
    others = [k for k in clusters if int(labels[i]) not in cls[k]]
    if not others:
      continue
    kept.append(i)
    d_own = float(np.sum((emb[i] - means[int(cids[i])]) ** 2))
    # -log(exp(-d_own/(2 var) - alpha) / sum_k exp(-d_k/(2 var))), with the
    # log of the sum taken by np.logaddexp so that it cannot underflow.
    logits = [-float(np.sum((emb[i] - means[k]) ** 2)) / (2 * var) for k in others]
    log_den = np.logaddexp.reduce(logits)
    terms[i] = max(d_own / (2 * var) + alpha + log_den, 0.0)
  loss = sum(terms[i] for i in kept) / max(len(kept), 1)
  return loss, terms, var


def _batch(seed, m=4, d=3, k_per_class=2, dim=5, scale=0.4):
  """M clusters x D examples; cluster c belongs to class c // k_per_class."""
  rng = np.random.default_rng(seed)
  cids = np.repeat(np.arange(m), d).astype(np.int32)
  labels = (cids // k_per_class).astype(np.int32)
  centres = rng.normal(size=(m, dim))
  emb = (centres[cids] + scale * rng.normal(size=(m * d, dim))).astype(np.float32)
  return emb, labels, cids


@pytest.mark.parametrize("seed,scale,alpha", [(0, 0.4, 1.0), (1, 1.0, 1.0), (2, 0.7, 0.3),
                                              (3, 2.0, 2.0)])
def test_matches_reference(seed, scale, alpha):
  emb, labels, cids = _batch(seed, scale=scale)
  ref, ref_terms, ref_var = np_magnet(emb, labels, cids, alpha)
  got, var = magnet_loss(emb, labels, cids, num_clusters=6, alpha=alpha, return_variance=True)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, ref_var, rtol=1e-5)
  terms = magnet_loss(emb, labels, cids, num_clusters=6, alpha=alpha, reduction="none")
  np.testing.assert_allclose(terms, ref_terms, rtol=1e-5, atol=1e-5)


def test_hinge_is_active_and_inactive():
  # Far apart clusters: every term clipped to 0; close: positive terms.
  emb, labels, cids = _batch(0, scale=0.01)
  terms = magnet_loss(emb * 10, labels, cids, num_clusters=4, reduction="none")
  assert float(jnp.max(terms)) == 0.0
  _, ref_terms, _ = np_magnet(emb * 10, labels, cids)
  assert np.all(ref_terms == 0)
  emb, labels, cids = _batch(1, scale=3.0)
  _, ref_terms, _ = np_magnet(emb, labels, cids)
  assert (ref_terms > 0).any()
  terms = magnet_loss(emb, labels, cids, num_clusters=4, reduction="none")
  np.testing.assert_allclose(terms, ref_terms, rtol=1e-5, atol=1e-5)


def test_variance_not_squared_twice():
  # Hand-computed: means (0,1),(1,1); d_own = 1, sigma^2 = 4/3, d_other = 2:
  # 1 * 3/8 + 1 - 2 * 3/8 = 0.625 (the 1/(2 sigma^4) bug gives another value).
  emb = jnp.array([[0., 0.], [0., 2.], [1., 0.], [1., 2.]])
  y = jnp.array([0, 0, 1, 1])
  loss, var = magnet_loss(emb, y, y, num_clusters=2, return_variance=True)
  np.testing.assert_allclose(loss, 0.625, rtol=1e-6)
  np.testing.assert_allclose(var, 4 / 3, rtol=1e-6)


def test_where_and_reductions():
  emb, labels, cids = _batch(4, m=6, d=2, scale=1.5)
  where = np.arange(12) < 9
  ref, ref_terms, _ = np_magnet(emb, labels, cids, where=where)
  padded = jnp.asarray(emb).at[9:].set(jnp.nan)
  np.testing.assert_allclose(magnet_loss(padded, labels, cids, num_clusters=6, where=where),
                             ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      magnet_loss(emb, labels, cids, num_clusters=6, where=where, reduction="sum"),
      ref_terms.sum(), rtol=1e-5, atol=1e-6)
  nz = ref_terms[ref_terms > 0]
  np.testing.assert_allclose(
      magnet_loss(emb, labels, cids, num_clusters=6, where=where, reduction="mean_nonzero"),
      nz.mean() if len(nz) else 0.0, rtol=1e-5, atol=1e-6)


def _grad_ref(emb, labels, cids, eps=1e-5):
  emb = np.asarray(emb, np.float64)
  g = np.zeros_like(emb)
  for i in range(emb.shape[0]):
    for j in range(emb.shape[1]):
      p, m = emb.copy(), emb.copy()
      p[i, j] += eps
      m[i, j] -= eps
      g[i, j] = (np_magnet(p, labels, cids)[0] - np_magnet(m, labels, cids)[0]) / (2 * eps)
  return g


def test_gradient_vs_reference_and_stop_gradient_variance():
  emb, labels, cids = _batch(5, scale=1.5)
  g = jax.grad(lambda e: magnet_loss(e, labels, cids, num_clusters=4))(jnp.asarray(emb))
  np.testing.assert_allclose(g, _grad_ref(emb, labels, cids), rtol=2e-3, atol=2e-4)

  # With the variance held constant: the gradient of the reference where
  # sigma^2 is frozen at its current value.
  _, _, var0 = np_magnet(emb, labels, cids)

  def frozen(e):
    e = jnp.asarray(e)
    x = e
    onehot = jax.nn.one_hot(cids, 4)
    means = (onehot.T @ x) / onehot.sum(0)[:, None]
    dist = jnp.sum((x[:, None] - means[None]) ** 2, -1)
    d_own = jnp.sum(dist * onehot, 1)
    other = jnp.asarray(labels)[:, None] != (jnp.arange(4) // 2)[None, :]
    lse = jax.nn.logsumexp(jnp.where(other, -dist / (2 * var0), -jnp.inf), axis=1)
    return jnp.mean(jax.nn.relu(d_own / (2 * var0) + 1.0 + lse))

  g_sg = jax.grad(lambda e: magnet_loss(e, labels, cids, num_clusters=4,
                                        stop_gradient_variance=True))(jnp.asarray(emb))
  np.testing.assert_allclose(g_sg, jax.grad(frozen)(jnp.asarray(emb)), rtol=1e-4, atol=1e-5)
  assert not np.allclose(g_sg, g, atol=1e-4)
  check_grads(lambda e: magnet_loss(e, labels, cids, num_clusters=4), (jnp.asarray(emb),),
              order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-3)


def test_contract():
  # One cluster per class (cluster id = label); ids < 12 in the contract.
  check_loss_contract(
      lambda e, l, **kw: magnet_loss(e, l, l, num_clusters=12, **kw),
      zero_without_positives=False)


def test_vmap_jit():
  emb, labels, cids = _batch(6)
  stack = jnp.stack([emb, emb * 2.0, -emb])
  fn = jax.jit(jax.vmap(lambda e: magnet_loss(e, labels, cids, num_clusters=4)))
  loop = [magnet_loss(e, labels, cids, num_clusters=4) for e in stack]
  np.testing.assert_allclose(fn(stack), np.stack(loop), rtol=1e-5, atol=1e-6)


def test_degenerate_batches():
  emb = jnp.asarray(random_embeddings(0, 6, 3))
  # One class only: no other-class cluster -> 0, zero gradient.
  y = jnp.zeros(6, jnp.int32)
  c = jnp.array([0, 0, 0, 1, 1, 1])
  val, g = jax.value_and_grad(lambda e: magnet_loss(e, y, c, num_clusters=2))(emb)
  assert float(val) == 0.0 and float(jnp.abs(g).max()) == 0.0
  # One valid example -> 0, zero finite gradient.
  w = jnp.arange(6) == 0
  val, g = jax.value_and_grad(
      lambda e: magnet_loss(e, jnp.arange(6), jnp.arange(6), num_clusters=6, where=w))(emb)
  assert float(val) == 0.0 and float(jnp.abs(g).max()) == 0.0
  # Collapsed batch (sigma^2 = 0): finite value and gradient, no NaN.
  y2 = jnp.array([0, 0, 0, 1, 1, 1])
  val, g = jax.value_and_grad(lambda e: magnet_loss(e, y2, y2, num_clusters=2))(
      jnp.zeros((6, 3)) + 0.5)
  assert np.isfinite(float(val)) and np.all(np.isfinite(g))
  np.testing.assert_allclose(val, 1.0, rtol=1e-6)  # alpha + log(1 other cluster)


def test_half_precision():
  emb, labels, cids = _batch(7, scale=1.5)
  ref = magnet_loss(emb, labels, cids, num_clusters=4)
  for dt in (jnp.bfloat16, jnp.float16):
    low = magnet_loss(jnp.asarray(emb, dt), labels, cids, num_clusters=4)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, rtol=5e-2, atol=5e-2)


def test_bad_input():
  emb, labels, cids = _batch(0)
  with pytest.raises(ValueError, match="cluster_ids"):
    magnet_loss(emb, labels, cids[:-1], num_clusters=4)
  with pytest.raises(TypeError, match="cluster_ids"):
    magnet_loss(emb, labels, cids.astype(np.float32), num_clusters=4)
  with pytest.raises(ValueError, match="cluster_ids"):
    magnet_loss(emb, labels, cids, num_clusters=3)
  with pytest.raises(ValueError, match="cluster_ids"):
    magnet_loss(emb, labels, None, num_clusters=4)
  with pytest.raises(TypeError, match="num_clusters"):
    magnet_loss(emb, labels, cids, num_clusters=4.0)
  with pytest.raises(ValueError, match="labels"):
    magnet_loss(emb, labels[:-1], cids, num_clusters=4)
  with pytest.raises(ValueError, match="reduction"):
    magnet_loss(emb, labels, cids, num_clusters=4, reduction="max")
  with pytest.raises(ValueError, match="embeddings"):
    magnet_loss(emb[0], labels, cids, num_clusters=4)
