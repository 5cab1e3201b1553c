"""proxy_nca_loss and proxy_anchor_loss vs loop references, the loss
contract, gradients w.r.t. the proxies, bad inputs and PML parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import metric_jax as mj
from tests.helpers import HAS_PML, check_loss_contract, label_layouts, random_embeddings

C, D = 13, 5


def _jit_loss(loss, **params):
  """The loss with its learned parameters closed over, jit-compiled once (eager
  op-by-op dispatch makes the contract checks several times slower)."""
  return jax.jit(lambda e, l, where=None: loss(e, l, where=where, **params))


def _proxies(seed, c=C, d=D, scale=1.0):
  return (np.random.default_rng(seed).normal(size=(c, d)) * scale).astype(np.float32)


def _unit(v):
  v = np.asarray(v, np.float64)
  return v / max(np.linalg.norm(v), 1e-12)


def proxy_nca_np(emb, labels, proxies, *, scale=1.0, exclude_positive=False,
                 normalize=True, where=None, reduction="mean"):
  """-log softmax over proxies of -scale * squared distance, loop form."""
  terms = []
  for i in range(len(emb)):
    if where is not None and not where[i]:
      continue
    x = _unit(emb[i]) if normalize else np.asarray(emb[i], np.float64)
    z = []
    for j in range(len(proxies)):
      p = _unit(proxies[j]) if normalize else np.asarray(proxies[j], np.float64)
      z.append(-scale * np.sum((x - p) ** 2))
    denom = [z[j] for j in range(len(proxies)) if not (exclude_positive and j == labels[i])]
    if not denom:
      terms.append(0.0)
      continue
    terms.append(-z[labels[i]] + np.log(np.sum(np.exp(denom))))
  if reduction == "sum":
    return float(np.sum(terms))
  return float(np.sum(terms) / max(len(terms), 1))


def proxy_anchor_np(emb, labels, proxies, *, margin=0.1, alpha=32.0, where=None,
                    reduction="mean"):
  """Kim et al. eq. (4) with PML's divisors, loop form."""
  rows = [i for i in range(len(emb)) if where is None or where[i]]
  pos_sum, neg_sum, n_pos = 0.0, 0.0, 0
  for c in range(len(proxies)):
    p = _unit(proxies[c])
    pos = [_unit(emb[i]) @ p for i in rows if labels[i] == c]
    neg = [_unit(emb[i]) @ p for i in rows if labels[i] != c]
    if pos:
      n_pos += 1
      pos_sum += np.log(1.0 + sum(np.exp(-alpha * (s - margin)) for s in pos))
    neg_sum += np.log(1.0 + sum(np.exp(alpha * (s + margin)) for s in neg))
  if reduction == "sum":
    return pos_sum + neg_sum
  return pos_sum / max(n_pos, 1) + neg_sum / len(proxies)


# --------------------------------------------------------------------------- NCA


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("exclude_positive", [False, True])
def test_proxy_nca_matches_loop_reference(layout, exclude_positive):
  emb = random_embeddings(1, 12, D)
  labels = label_layouts()[layout]
  proxies = _proxies(2)
  for scale in (1.0, 8.0):
    got = mj.losses.proxy_nca_loss(emb, labels, proxies=proxies, softmax_scale=scale,
                                   exclude_positive=exclude_positive)
    want = proxy_nca_np(emb, labels, proxies, scale=scale, exclude_positive=exclude_positive)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_proxy_nca_where_reductions_and_unnormalised():
  emb = random_embeddings(3, 12, D, scale=0.5)
  labels = np.array([0, 1, 2, 0, 5, 7, 7, 12, 3, 3, 4, 4])
  where = np.array([True] * 7 + [False] * 3 + [True] * 2)
  proxies = _proxies(4, scale=0.3)
  for red in ("mean", "sum"):
    got = mj.losses.proxy_nca_loss(emb, labels, proxies=proxies, where=where, reduction=red)
    np.testing.assert_allclose(got, proxy_nca_np(emb, labels, proxies, where=where,
                                                 reduction=red), rtol=1e-5)
  got = mj.losses.proxy_nca_loss(emb, labels, proxies=proxies, normalize=False)
  np.testing.assert_allclose(got, proxy_nca_np(emb, labels, proxies, normalize=False),
                             rtol=1e-5)
  terms = mj.losses.proxy_nca_loss(emb, labels, proxies=proxies, where=where,
                                   reduction="none")
  assert terms.shape == (12,) and np.all(np.asarray(terms)[~where] == 0)


def test_proxy_nca_exclude_positive_single_class_is_zero():
  emb = random_embeddings(5, 12, D)
  val, g = jax.value_and_grad(
      lambda e: mj.losses.proxy_nca_loss(e, np.zeros(12, np.int32), proxies=_proxies(1, c=1),
                                         exclude_positive=True))(jnp.asarray(emb))
  assert float(val) == 0.0 and np.all(np.isfinite(g))


def test_proxy_nca_contract():
  proxies = jnp.asarray(_proxies(6))
  check_loss_contract(_jit_loss(mj.losses.proxy_nca_loss, proxies=proxies,
                                softmax_scale=4.0), zero_without_positives=False)


# --------------------------------------------------------------------- anchor


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_proxy_anchor_matches_loop_reference(layout):
  emb = random_embeddings(7, 12, D)
  labels = label_layouts()[layout]
  proxies = _proxies(8)
  for kw in (dict(), dict(margin=0.3, alpha=8.0)):
    got = mj.losses.proxy_anchor_loss(emb, labels, proxies=proxies, **kw)
    np.testing.assert_allclose(got, proxy_anchor_np(emb, labels, proxies, **kw), rtol=1e-5)


def test_proxy_anchor_where_and_reductions():
  emb = random_embeddings(9, 12, D)
  labels = np.array([0, 1, 2, 0, 5, 7, 7, 12, 3, 3, 4, 4])
  where = np.array([True] * 7 + [False] * 3 + [True] * 2)
  proxies = _proxies(10)
  got = mj.losses.proxy_anchor_loss(emb, labels, proxies=proxies, where=where)
  np.testing.assert_allclose(got, proxy_anchor_np(emb, labels, proxies, where=where),
                             rtol=1e-5)
  total = mj.losses.proxy_anchor_loss(emb, labels, proxies=proxies, where=where,
                                      reduction="sum")
  np.testing.assert_allclose(total, proxy_anchor_np(emb, labels, proxies, where=where,
                                                    reduction="sum"), rtol=1e-5)
  terms = mj.losses.proxy_anchor_loss(emb, labels, proxies=proxies, where=where,
                                      reduction="none")
  assert terms.shape == (C,)
  np.testing.assert_allclose(jnp.sum(terms), total, rtol=1e-6)


def test_proxy_anchor_euclidean_sign_convention():
  """For a distance the exponents are alpha (d - delta) and alpha (-delta - d)."""
  emb = random_embeddings(11, 12, D, scale=0.3)
  labels = label_layouts()["with_singletons"]
  proxies = _proxies(12, c=C, scale=0.3)
  d = np.array([[np.linalg.norm(e - p) for p in proxies] for e in emb.astype(np.float64)])
  pos_sum, neg_sum, n_pos = 0.0, 0.0, 0
  for c in range(C):
    pos = [d[i, c] for i in range(12) if labels[i] == c]
    neg = [d[i, c] for i in range(12) if labels[i] != c]
    if pos:
      n_pos += 1
      pos_sum += np.log1p(sum(np.exp(2.0 * (x - 0.1)) for x in pos))
    neg_sum += np.log1p(sum(np.exp(2.0 * (-0.1 - x)) for x in neg))
  got = mj.losses.proxy_anchor_loss(emb, labels, proxies=proxies, alpha=2.0,
                                    distance="euclidean")
  np.testing.assert_allclose(got, pos_sum / n_pos + neg_sum / C, rtol=1e-5)


def test_proxy_anchor_contract():
  proxies = jnp.asarray(_proxies(13))
  check_loss_contract(_jit_loss(mj.losses.proxy_anchor_loss, proxies=proxies, alpha=8.0),
                      zero_without_positives=False)


# ------------------------------------------------------- shared: grads, jit, init


@pytest.mark.parametrize("name", ["proxy_nca_loss", "proxy_anchor_loss"])
def test_gradients_wrt_proxies_and_jit(name):
  loss = getattr(mj.losses, name)
  emb = jnp.asarray(random_embeddings(14, 12, D))
  labels = jnp.asarray(label_layouts()["with_singletons"])  # classes 7..12 unused
  proxies = jnp.asarray(_proxies(15))
  kw = {"alpha": 4.0} if name == "proxy_anchor_loss" else {"softmax_scale": 3.0}
  f = lambda e, p: loss(e, labels, proxies=p, **kw)
  check_grads(jax.jit(f), (emb, proxies), order=1, modes=("rev",), atol=5e-2, rtol=5e-2,
              eps=1e-3)
  g_e, g_p = jax.jit(jax.grad(f, argnums=(0, 1)))(emb, proxies)
  assert np.all(np.isfinite(g_e)) and np.all(np.isfinite(g_p))
  # Proxy 9 has no sample: it still gets a gradient through the negatives.
  assert float(jnp.abs(g_p[9]).max()) > 0


@pytest.mark.parametrize("name", ["proxy_nca_loss", "proxy_anchor_loss"])
def test_half_precision_inputs_and_proxies(name):
  loss = getattr(mj.losses, name)
  emb = jnp.asarray(random_embeddings(16, 12, D))
  labels = jnp.asarray(label_layouts()["m_per_class"])
  proxies = jnp.asarray(_proxies(17))
  ref = loss(emb, labels, proxies=proxies)
  for dt in (jnp.bfloat16, jnp.float16):
    val, (g_e, g_p) = jax.value_and_grad(
        lambda e, p: loss(e, labels, proxies=p), argnums=(0, 1))(emb.astype(dt),
                                                                 proxies.astype(dt))
    assert val.dtype == jnp.float32 and g_e.dtype == dt and g_p.dtype == dt
    assert np.all(np.isfinite(np.asarray(g_e, np.float32)))
    assert np.all(np.isfinite(np.asarray(g_p, np.float32)))
    np.testing.assert_allclose(val, ref, rtol=5e-2)


def test_init_functions():
  key = jax.random.key(0)
  nca = mj.losses.init_proxy_nca(key, 7, 3)
  assert set(nca) == {"proxies"} and nca["proxies"].shape == (7, 3)
  big = mj.losses.init_proxy_anchor(key, 200, 300)["proxies"]
  assert big.shape == (200, 300) and big.dtype == jnp.float32
  # Kaiming normal, fan_out = C: std sqrt(2 / C).
  np.testing.assert_allclose(np.std(np.asarray(big)), math.sqrt(2 / 200), rtol=0.02)
  np.testing.assert_allclose(np.std(np.asarray(mj.losses.init_proxy_nca(key, 200, 300)["proxies"])),
                             1.0, rtol=0.02)
  assert mj.losses.init_proxy_anchor(key, 4, 3, dtype=jnp.bfloat16)["proxies"].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="num_classes"):
    mj.losses.init_proxy_anchor(key, 0, 3)
  # The init dicts plug straight into the losses.
  emb = random_embeddings(18, 12, D)
  for stem in ("proxy_nca", "proxy_anchor"):
    params = getattr(mj.losses, f"init_{stem}")(key, C, D)
    assert np.isfinite(getattr(mj.losses, f"{stem}_loss")(
        emb, label_layouts()["all_singletons"], **params))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", ["proxy_nca_loss", "proxy_anchor_loss"])
def test_bad_inputs(name):
  loss = getattr(mj.losses, name)
  emb = random_embeddings(19, 12, D)
  labels = label_layouts()["all_singletons"]
  proxies = _proxies(20)
  with pytest.raises(ValueError, match="ref_embeddings"):
    loss(emb, labels, emb, labels, proxies=proxies)
  with pytest.raises(ValueError, match="labels"):
    loss(emb, labels + 2, proxies=proxies)
  with pytest.raises(ValueError, match="labels"):
    loss(emb, labels - 1, proxies=proxies)
  # Out-of-range labels on masked (padding) rows are fine.
  pad = np.arange(12) < 11
  assert np.isfinite(loss(emb, np.where(pad, labels, -1), proxies=proxies, where=pad))
  with pytest.raises(ValueError, match="proxies"):
    loss(emb, labels, proxies=_proxies(20, d=D + 1))
  with pytest.raises(ValueError, match="proxies"):
    loss(emb, labels, proxies=None)
  with pytest.raises(TypeError, match="proxies"):
    loss(emb, labels, proxies=np.ones((C, D), np.int32))
  with pytest.raises(ValueError, match="reduction"):
    loss(emb, labels, proxies=proxies, reduction="mean_nonzero")
  with pytest.raises(ValueError, match="embeddings"):
    loss(emb[0], labels, proxies=proxies)
  scale_name = "alpha" if name == "proxy_anchor_loss" else "softmax_scale"
  with pytest.raises(ValueError, match=scale_name):
    loss(emb, labels, proxies=proxies, **{scale_name: 0.0})
  # Traced out-of-range labels cannot raise: the loss is NaN instead.
  val = jax.jit(lambda l: loss(emb, l, proxies=proxies))(jnp.asarray(labels + 5))
  assert np.isnan(float(val))


# ----------------------------------------------------------------------- PML


def _pml_run(module, emb, labels, param_name, params):
  import torch
  getattr(module, param_name).data = torch.tensor(params, dtype=torch.float64)
  e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
  out = module(e, torch.tensor(labels, dtype=torch.int64))
  out.backward()
  return out.item(), e.grad.numpy(), getattr(module, param_name).grad.numpy()


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "all_singletons"])
@pytest.mark.parametrize("kw", [{}, {"softmax_scale": 10.0}])
def test_proxy_nca_pml_parity(layout, kw):
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(21, 12, D)
  labels = label_layouts()[layout]
  proxies = _proxies(22)
  want, ge, gp = _pml_run(pml_losses.ProxyNCALoss(C, D, **kw), emb, labels, "proxies",
                          proxies)
  f = lambda e, p: mj.losses.proxy_nca_loss(e, labels, proxies=p, **kw)
  got, (ge2, gp2) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(emb),
                                                          jnp.asarray(proxies))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(ge2, ge, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gp2, gp, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons", "one_class"])
@pytest.mark.parametrize("kw", [{}, {"margin": 0.2, "alpha": 16.0}])
def test_proxy_anchor_pml_parity(layout, kw):
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(23, 12, D)
  labels = label_layouts()[layout]
  module = pml_losses.ProxyAnchorLoss(C, D, **kw)
  # Use PML's own Kaiming-normal initialisation, copied into our argument.
  proxies = module.proxies.detach().numpy().astype(np.float32)
  want, ge, gp = _pml_run(module, emb, labels, "proxies", proxies)
  f = lambda e, p: mj.losses.proxy_anchor_loss(e, labels, proxies=p, **kw)
  got, (ge2, gp2) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(emb),
                                                          jnp.asarray(proxies))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  scale = max(np.abs(ge).max(), np.abs(gp).max())
  np.testing.assert_allclose(ge2, ge, rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(gp2, gp, rtol=1e-4, atol=1e-5 * scale)
