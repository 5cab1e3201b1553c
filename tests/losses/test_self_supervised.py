"""selfsupervised (two-view wrapper) and vicreg_loss vs loop references,
jit/vmap/grad, masks, half precision, bad inputs and PML parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import metric_jax as mj
from tests.helpers import HAS_PML, np_normalize, random_embeddings

N, D = 6, 4


def _views(seed, n=N, d=D, noise=0.3):
  a = random_embeddings(seed, n, d)
  b = a + noise * random_embeddings(seed + 100, n, d)
  return a, b.astype(np.float32)


# -------------------------------------------------------------- two-view wrapper


def contrastive_views_np(a, b, symmetric, where=None, neg_margin=1.0):
  """PML-default contrastive loss (non-squared L2, [d]_+ and [m - d]_+, each
  averaged over its non-zero terms) on the two-view pairs, loop form: row i
  of either view is the same instance."""
  n = len(a)
  ok = lambda i: where is None or where[i % n]
  if symmetric:
    rows = cols = np.concatenate([a, b]).astype(np.float64)
  else:
    rows, cols = np.asarray(a, np.float64), np.asarray(b, np.float64)
  pos, neg = [], []
  for i in range(len(rows)):
    for j in range(len(cols)):
      if not (ok(i) and ok(j)) or (symmetric and i == j):
        continue
      d = np.linalg.norm(rows[i] - cols[j])
      if i % n == j % n:
        pos.append(d)
      else:
        neg.append(max(0.0, neg_margin - d))
  mean_nz = lambda v: sum(v) / max(sum(x > 0 for x in v), 1)
  return mean_nz(pos) + mean_nz(neg)


@pytest.mark.parametrize("symmetric", [True, False])
def test_wrapper_matches_loop_reference(symmetric):
  a, b = _views(1)
  loss = mj.losses.selfsupervised(mj.losses.contrastive_loss, symmetric=symmetric)
  for kw in ({}, {"neg_margin": 3.0}):
    np.testing.assert_allclose(loss(a, b, **kw),
                               contrastive_views_np(a, b, symmetric, **kw), rtol=1e-5)
  where = np.array([True, True, False, True, True, False])
  np.testing.assert_allclose(loss(a, b, where=where),
                             contrastive_views_np(a, b, symmetric, where=where), rtol=1e-5)


def test_wrapper_jit_grad_vmap():
  a, b = (jnp.asarray(v) for v in _views(2))
  loss = mj.losses.selfsupervised(mj.losses.contrastive_loss)
  f = jax.jit(lambda x, y: loss(x, y, neg_margin=3.0))
  np.testing.assert_allclose(f(a, b), loss(a, b, neg_margin=3.0), rtol=1e-6)
  check_grads(f, (a, b), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-3)
  stacked = jax.vmap(f)(jnp.stack([a, -a]), jnp.stack([b, -b]))
  np.testing.assert_allclose(stacked, [f(a, b), f(-a, -b)], rtol=1e-5)
  assert "contrastive_loss" in loss.__doc__
  assert loss.__name__ == "selfsupervised_contrastive_loss"


def test_wrapper_bad_inputs():
  a, b = _views(3)
  loss = mj.losses.selfsupervised(mj.losses.contrastive_loss)
  with pytest.raises(ValueError, match="view_b"):
    loss(a, b[:-1])
  with pytest.raises(ValueError, match="view_a"):
    loss(a[0], b)
  with pytest.raises(ValueError, match="labels"):
    loss(a, b, labels=np.arange(N))
  with pytest.raises(ValueError, match="ref_embeddings"):
    loss(a, b, ref_embeddings=a)
  with pytest.raises(ValueError, match="where"):
    loss(a, b, where=np.ones(N + 1, bool))
  with pytest.raises(TypeError, match="loss_fn"):
    mj.losses.selfsupervised("contrastive_loss")


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("symmetric", [True, False])
def test_wrapper_pml_parity(symmetric):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  a, b = _views(4)
  ta, tb = torch.tensor(a), torch.tensor(b)
  an, bn = np_normalize(a).astype(np.float32), np_normalize(b).astype(np.float32)
  want = pml_losses.SelfSupervisedLoss(pml_losses.ContrastiveLoss(),
                                       symmetric=symmetric)(ta, tb).item()
  got = mj.losses.selfsupervised(mj.losses.contrastive_loss, symmetric=symmetric)(an, bn)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if not hasattr(mj.losses, "ntxent_loss"):
    return
  for tau in (0.07, 0.5):
    want = pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(temperature=tau),
                                         symmetric=symmetric)(ta, tb).item()
    got = mj.losses.selfsupervised(mj.losses.ntxent_loss, symmetric=symmetric)(
        a, b, temperature=tau)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------- VICReg


def vicreg_np(a, b, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
  """Bardes et al. (authors' code: variance terms averaged), loop form."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n, d = a.shape
  inv = sum((a[i, k] - b[i, k]) ** 2 for i in range(n) for k in range(d)) / (n * d)

  def stats(z):
    mean = [sum(z[i, k] for i in range(n)) / n for k in range(d)]
    cov = [[sum((z[i, k] - mean[k]) * (z[i, l] - mean[l]) for i in range(n)) / (n - 1)
            for l in range(d)] for k in range(d)]
    var_term = sum(max(0.0, 1.0 - np.sqrt(cov[k][k] + eps)) for k in range(d)) / d
    cov_term = sum(cov[k][l] ** 2 for k in range(d) for l in range(d) if k != l) / d
    return var_term, cov_term

  va, ca = stats(a)
  vb, cb = stats(b)
  return lam * inv + mu * (va + vb) / 2 + nu * (ca + cb)


def test_vicreg_matches_loop_reference():
  for seed, scale in ((5, 1.0), (6, 0.2), (7, 3.0)):  # variance hinge on and off
    a, b = _views(seed)
    a, b = a * scale, b * scale
    np.testing.assert_allclose(mj.losses.vicreg_loss(a, b), vicreg_np(a, b), rtol=1e-5)
    kw = dict(invariance_weight=2.0, variance_weight=3.0, covariance_weight=0.5, eps=1e-2)
    np.testing.assert_allclose(
        mj.losses.vicreg_loss(a, b, **kw),
        vicreg_np(a, b, lam=2.0, mu=3.0, nu=0.5, eps=1e-2), rtol=1e-5)


def test_vicreg_where_jit_vmap_grad():
  a, b = (jnp.asarray(v) for v in _views(8, n=8))
  where = jnp.arange(8) < 6
  kept = mj.losses.vicreg_loss(a[:6], b[:6])
  f = jax.jit(jax.value_and_grad(lambda x, y: mj.losses.vicreg_loss(x, y, where=where),
                                 argnums=(0, 1)))
  val, (ga, gb) = f(a.at[6:].set(jnp.nan), b.at[7].set(jnp.inf))
  np.testing.assert_allclose(val, kept, rtol=1e-5)
  assert float(jnp.abs(ga[6:]).max()) == 0.0 and float(jnp.abs(gb[6:]).max()) == 0.0
  assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
  val, _ = f(a, b)
  np.testing.assert_allclose(val, kept, rtol=1e-5)
  assert float(mj.losses.vicreg_loss(a, b, where=jnp.zeros(8, bool))) == 0.0
  check_grads(jax.jit(mj.losses.vicreg_loss), (a, b), order=1, modes=("rev",), atol=5e-2,
              rtol=5e-2, eps=1e-3)
  vm = jax.vmap(mj.losses.vicreg_loss)(jnp.stack([a, b]), jnp.stack([b, a * 2]))
  np.testing.assert_allclose(vm, [mj.losses.vicreg_loss(a, b),
                                  mj.losses.vicreg_loss(b, a * 2)], rtol=1e-5)


def test_vicreg_collapse_half_precision_and_nan():
  a = jnp.ones((N, D)) * 0.3
  val, g = jax.value_and_grad(mj.losses.vicreg_loss)(a, a)
  np.testing.assert_allclose(val, 25.0 * (1 - np.sqrt(1e-4)), rtol=1e-5)
  assert np.all(np.isfinite(g))
  x, y = (jnp.asarray(v) for v in _views(9))
  ref = mj.losses.vicreg_loss(x, y)
  for dt in (jnp.bfloat16, jnp.float16):
    val = mj.losses.vicreg_loss(x.astype(dt), y.astype(dt))
    assert val.dtype == jnp.float32
    np.testing.assert_allclose(val, ref, rtol=5e-2)
    g = jax.grad(mj.losses.vicreg_loss)(x.astype(dt), y.astype(dt))
    assert g.dtype == dt and np.all(np.isfinite(np.asarray(g, np.float32)))
  assert np.isnan(float(mj.losses.vicreg_loss(x.at[0, 0].set(jnp.nan), y)))


def test_vicreg_bad_inputs():
  a, b = _views(10)
  with pytest.raises(ValueError, match="view_b"):
    mj.losses.vicreg_loss(a, b[:, :-1])
  with pytest.raises(TypeError, match="view_a"):
    mj.losses.vicreg_loss(a.astype(np.int32), b)
  with pytest.raises(ValueError, match="eps"):
    mj.losses.vicreg_loss(a, b, eps=0.0)
  with pytest.raises(ValueError, match="where"):
    mj.losses.vicreg_loss(a, b, where=np.ones(3, bool))


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("kw", [{}, {"invariance_lambda": 2.0, "variance_mu": 3.0,
                                     "covariance_v": 0.5, "eps": 1e-2}])
def test_vicreg_pml_parity(kw):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  a, b = _views(11, n=8)
  ta = torch.tensor(a, dtype=torch.float64, requires_grad=True)
  tb = torch.tensor(b, dtype=torch.float64, requires_grad=True)
  out = pml_losses.VICRegLoss(**kw)(ta, ref_emb=tb)
  out.backward()
  ours = {"invariance_lambda": "invariance_weight", "variance_mu": "variance_weight",
          "covariance_v": "covariance_weight", "eps": "eps"}
  okw = {ours[k]: v for k, v in kw.items()}
  val, (ga, gb) = jax.value_and_grad(
      lambda x, y: mj.losses.vicreg_loss(x, y, **okw), argnums=(0, 1))(jnp.asarray(a),
                                                                      jnp.asarray(b))
  np.testing.assert_allclose(val, out.item(), rtol=1e-5)
  np.testing.assert_allclose(ga, ta.grad.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-4, atol=1e-6)
