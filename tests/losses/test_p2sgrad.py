"""p2sgrad_loss vs a loop reference, the loss contract, gradients w.r.t. the
class weights (paper and PML forms), half precision, bad inputs, the
initialisation and PML parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import metric_jax as mj
from metric_jax.losses import p2sgrad
from tests.helpers import HAS_PML, check_loss_contract, label_layouts, random_embeddings

C, D = 13, 5
# Embedding sizes that take each of the loss's two routes at B = 12, C = 13:
# [D, D] Gram products (small D) or the [B, C] cosine matrix (large D).
ROUTES = {"gram": 5, "cosine_matrix": 64}


def _weights(seed, scale=1.0, d=D):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(C, d)) * scale).astype(np.float32)


@pytest.mark.parametrize("route", list(ROUTES))
def test_routes_are_taken(route):
  assert p2sgrad._uses_gram(12, C, ROUTES[route]) == (route == "gram")


def p2sgrad_np(emb, labels, w, *, where=None, reduction="mean"):
  """mean_j (cos(x_i, w_j) - [j == y_i])^2 per row, explicit loops (float64)."""
  emb, w = np.asarray(emb, np.float64), np.asarray(w, np.float64)
  terms = np.zeros(len(emb))
  for i in range(len(emb)):
    if where is not None and not where[i]:
      continue
    total = 0.0
    for j in range(len(w)):
      cos = emb[i] @ w[j] / (np.linalg.norm(emb[i]) * np.linalg.norm(w[j]))
      total += (cos - (1.0 if j == labels[i] else 0.0)) ** 2
    terms[i] = total / len(w)
  if reduction == "none":
    return terms
  if reduction == "sum":
    return terms.sum()
  count = len(emb) if where is None else int(np.sum(where))
  return terms.sum() / max(count, 1)


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout, route):
  d = ROUTES[route]
  emb = random_embeddings(1, 12, d)
  labels = label_layouts()[layout]
  w = _weights(2, scale=3.0, d=d)  # not unit norm: the loss normalises the weights
  for reduction in ("mean", "sum", "none"):
    for detach in (False, True):  # the value does not depend on detach_weight_norm
      got = mj.losses.p2sgrad_loss(emb, labels, weights=w, reduction=reduction,
                                   detach_weight_norm=detach)
      want = p2sgrad_np(emb, labels, w, reduction=reduction)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_where_and_logits():
  emb = random_embeddings(3, 12, D)
  labels = label_layouts()["with_singletons"]
  where = np.arange(12) % 4 != 1
  padded_labels = np.where(where, labels, -1)  # padding may carry any label
  w = _weights(4)
  for reduction in ("mean", "sum", "none"):
    got = mj.losses.p2sgrad_loss(emb, padded_labels, weights=w, where=where,
                                 reduction=reduction)
    want = p2sgrad_np(emb, labels, w, where=where, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  cos = np.array([[e @ v / (np.linalg.norm(e) * np.linalg.norm(v)) for v in w.astype(np.float64)]
                  for e in emb.astype(np.float64)])
  for lab in (None, labels):
    logits = mj.losses.p2sgrad_logits(emb, w, lab)
    assert logits.shape == (12, C) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, cos, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("route", list(ROUTES))
def test_contract(route):
  d = ROUTES[route]
  w = jnp.asarray(_weights(5, d=d))
  check_loss_contract(lambda e, l, **kw: mj.losses.p2sgrad_loss(e, l, weights=w, **kw),
                      d=d, zero_without_positives=False)
  # A NaN row makes its own term NaN, and only its own.
  emb = jnp.asarray(random_embeddings(6, 12, d)).at[3, 1].set(jnp.nan)
  terms = mj.losses.p2sgrad_loss(emb, label_layouts()["m_per_class"], weights=w,
                                 reduction="none")
  assert np.isnan(terms[3]) and np.all(np.isfinite(np.delete(np.asarray(terms), 3)))


@pytest.mark.parametrize("route", list(ROUTES))
def test_weight_gradients(route):
  """Both forms against finite differences, and the paper's weight gradient
  is the tangential projection of the detached (PML) one."""
  d = ROUTES[route]
  emb = jnp.asarray(random_embeddings(7, 12, d))
  labels = jnp.asarray(label_layouts()["with_singletons"])
  w = jnp.asarray(_weights(8, scale=2.0, d=d))
  grads = {}
  for detach in (False, True):
    f = jax.jit(lambda ww, d=detach: mj.losses.p2sgrad_loss(emb, labels, weights=ww,
                                                            detach_weight_norm=d))
    grads[detach] = np.asarray(jax.grad(f)(w), np.float64)
    if not detach:
      check_grads(f, (w,), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-3)
  wn = np.asarray(w, np.float64) / np.linalg.norm(np.asarray(w, np.float64), axis=1,
                                                  keepdims=True)
  g = grads[True]
  np.testing.assert_allclose(grads[False], g - np.sum(g * wn, axis=1, keepdims=True) * wn,
                             rtol=1e-4, atol=1e-7)
  # The detached gradient is the raw one of sum_ij (<x^_i, w^_j> - t_ij)^2
  # / (B C) w.r.t. the unit weights, divided by the norms.
  x = np.asarray(emb, np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  resid = x @ wn.T - np.eye(C)[np.asarray(labels)]
  raw = 2.0 * resid.T @ x / resid.size
  norms = np.linalg.norm(np.asarray(w, np.float64), axis=1, keepdims=True)
  np.testing.assert_allclose(g, raw / norms, rtol=1e-4, atol=1e-7)
  assert np.abs(grads[False] - g).max() > 0.05 * np.abs(g).max()  # the forms really differ


def test_gram_route_derivatives_and_cancellation():
  """The Gram route's custom JVP against finite differences in both modes,
  and its values and gradients against the cosine-matrix formula, also on
  well-fitted rows (cos to the own class near 1) where its terms cancel."""
  rng = np.random.default_rng(20)
  w = mj.distances.l2_normalize(jnp.asarray(rng.normal(size=(C, D)), jnp.float32))
  labels = jnp.asarray(label_layouts()["with_singletons"])
  for noise in (1.0, 1e-3):
    x = mj.distances.l2_normalize(w[labels] + noise * jnp.asarray(
        rng.normal(size=(12, D)), jnp.float32))
    direct = lambda a, b: jnp.sum(jnp.square(a @ b.T - jax.nn.one_hot(labels, C)), axis=1)
    gram = lambda a, b: p2sgrad._gram_errors(a, b, labels)
    np.testing.assert_allclose(gram(x, w), direct(x, w), rtol=1e-5, atol=2e-6)
    row_weights = jnp.linspace(0.5, 2.0, 12)
    for f in (gram, direct):
      assert np.all(np.isfinite(f(x, w)))
    g_gram = jax.grad(lambda a, b: jnp.sum(row_weights * gram(a, b)), argnums=(0, 1))(x, w)
    g_direct = jax.grad(lambda a, b: jnp.sum(row_weights * direct(a, b)), argnums=(0, 1))(x, w)
    for got, want in zip(g_gram, g_direct):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  check_grads(lambda a, b: p2sgrad._gram_errors(a, b, labels), (x, w), order=1,
              modes=("fwd", "rev"), atol=5e-2, rtol=5e-2, eps=1e-3)
  # Only the embeddings differentiated (symbolic zero tangent for the weights).
  g_x = jax.grad(lambda a: jnp.sum(gram(a, w)))(x)
  np.testing.assert_allclose(g_x, jax.grad(lambda a: jnp.sum(direct(a, w)))(x), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_weights(dtype):
  emb = jnp.asarray(random_embeddings(9, 12, D)).astype(dtype)
  w = jnp.asarray(_weights(10)).astype(dtype)
  labels = jnp.asarray(label_layouts()["m_per_class"])
  f = jax.jit(jax.value_and_grad(lambda e, ww: mj.losses.p2sgrad_loss(e, labels, weights=ww),
                                 argnums=(0, 1)))
  val, (g_e, g_w) = f(emb, w)
  assert val.dtype == jnp.float32 and g_e.dtype == dtype and g_w.dtype == dtype
  assert np.all(np.isfinite(np.asarray(g_e, np.float32)))
  assert np.all(np.isfinite(np.asarray(g_w, np.float32)))
  want = p2sgrad_np(np.asarray(emb, np.float64), np.asarray(labels), np.asarray(w, np.float64))
  np.testing.assert_allclose(val, want, rtol=1e-5)


def test_init():
  params = mj.losses.init_p2sgrad(jax.random.key(0), C, D)
  assert set(params) == {"weights"}
  w = np.asarray(params["weights"])
  assert w.shape == (C, D) and w.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-6)
  half = mj.losses.init_p2sgrad(jax.random.key(0), C, D, dtype=jnp.bfloat16)["weights"]
  assert half.dtype == jnp.bfloat16
  # Unit rows of a uniform cube draw (PML), not of a Gaussian draw (uniform on
  # the sphere): in 3-D the mean largest |component| is 0.793, not 0.831.
  big = np.asarray(mj.losses.init_p2sgrad(jax.random.key(1), 20000, 3)["weights"])
  np.testing.assert_allclose(np.abs(big).max(axis=1).mean(), 0.793, atol=0.006)
  with pytest.raises(ValueError, match="num_classes"):
    mj.losses.init_p2sgrad(jax.random.key(0), 0, D)
  with pytest.raises(TypeError, match="embedding_dim"):
    mj.losses.init_p2sgrad(jax.random.key(0), C, 2.0)


def test_bad_inputs():
  emb = random_embeddings(11, 12, D)
  labels = label_layouts()["all_singletons"]
  w = _weights(12)
  loss = mj.losses.p2sgrad_loss
  with pytest.raises(ValueError, match="`ref_embeddings` is not supported"):
    loss(emb, labels, emb, labels, weights=w)
  with pytest.raises(ValueError, match="`ref_where` is not supported"):
    loss(emb, labels, weights=w, ref_where=np.ones(12, bool))
  with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 13\)"):
    loss(emb, labels + 2, weights=w)
  with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 13\)"):
    loss(emb, labels - 1, weights=w)
  with pytest.raises(ValueError, match="`weights` must have embedding size 5"):
    loss(emb, labels, weights=w[:, :D - 1])
  with pytest.raises(ValueError, match="`weights` must have rank 2"):
    loss(emb, labels, weights=w[None])
  with pytest.raises(ValueError, match="`weights` is required"):
    loss(emb, labels, weights=None)
  with pytest.raises(TypeError, match="`weights` must be a floating-point"):
    loss(emb, labels, weights=w.astype(np.int32))
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    loss(emb, labels, weights=w, reduction="mean_nonzero")
  with pytest.raises(TypeError, match="`embeddings` must be a floating-point"):
    loss(emb.astype(np.int32), labels, weights=w)
  with pytest.raises(ValueError, match="`labels` must have length 12"):
    loss(emb, labels[:5], weights=w)
  with pytest.raises(ValueError, match="`where` must have shape"):
    loss(emb, labels, weights=w, where=np.ones(5, bool))
  # Traced out-of-range labels cannot raise: the loss is NaN instead.
  val = jax.jit(lambda l: loss(emb, l, weights=w))(jnp.asarray(labels + 5))
  assert np.isnan(float(val))
  with pytest.raises(ValueError, match="`labels` must lie"):
    mj.losses.p2sgrad_logits(emb, w, labels + 2)
  with pytest.raises(ValueError, match="`weights` must have embedding size"):
    mj.losses.p2sgrad_logits(emb, w[:, :2])


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout,route", [("m_per_class", "gram"), ("with_singletons", "gram"),
                                          ("all_singletons", "cosine_matrix"),
                                          ("with_singletons", "cosine_matrix")])
def test_pml_parity(layout, route):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  d = ROUTES[route]
  module = pml_losses.P2SGradLoss(descriptors_dim=d, num_classes=C)  # PML's own init
  w = module.weight.detach().numpy().T.astype(np.float32).copy()
  module.weight.data = torch.tensor(w.T, dtype=torch.float64)
  emb = random_embeddings(13, 12, d)
  labels = label_layouts()[layout]
  e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
  out = module(e, torch.tensor(labels, dtype=torch.int64))
  out.backward()
  pml_ge, pml_gw = e.grad.numpy(), module.weight.grad.numpy().T
  scale = max(np.abs(pml_ge).max(), np.abs(pml_gw).max())
  for detach in (True, False):
    f = lambda a, b, d=detach: mj.losses.p2sgrad_loss(a, labels, weights=b,
                                                      detach_weight_norm=d)
    got, (g_e, g_w) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(emb), jnp.asarray(w))
    np.testing.assert_allclose(got, out.item(), rtol=1e-5)
    np.testing.assert_allclose(g_e, pml_ge, rtol=1e-4, atol=1e-5 * scale)
    if detach:
      np.testing.assert_allclose(g_w, pml_gw, rtol=1e-4, atol=1e-5 * scale)
    else:  # PML's gradient projected on the tangent of the unit sphere
      w64 = w.astype(np.float64)
      proj = pml_gw - np.sum(pml_gw * w64, axis=1, keepdims=True) * w64
      np.testing.assert_allclose(g_w, proj, rtol=1e-4, atol=1e-5 * scale)
