"""Normalised softmax, ArcFace, sub-centre ArcFace, CosFace, SphereFace and
L-Softmax vs loop references, the loss contract, gradients w.r.t. the class
weights, half precision at scale 64, bad inputs and PML parity."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import metric_jax as mj
from tests.helpers import HAS_PML, check_loss_contract, label_layouts, random_embeddings

C, D, K = 13, 5, 3
NAMES = ["normalized_softmax", "arcface", "subcenter_arcface", "cosface", "sphereface",
         "large_margin_softmax"]


def _weights(seed, name, scale=1.0):
  rng = np.random.default_rng(seed)
  shape = (C, K, D) if name == "subcenter_arcface" else (C, D)
  return (rng.normal(size=shape) * scale).astype(np.float32)


# ------------------------------------------------------------ loop references


def _cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def _ce(logits, y):
  m = max(logits)
  return -logits[y] + m + np.log(sum(np.exp(z - m) for z in logits))


def _arc(c, m):
  theta = math.acos(min(1.0, max(-1.0, c)))
  return math.cos(theta + m) if theta <= math.pi - m else math.cos(theta) - m * math.sin(m)


def _psi(c, m):
  """(-1)^k cos(m theta) - 2k with theta in [k pi/m, (k+1) pi/m]."""
  theta = math.acos(min(1.0, max(-1.0, c)))
  k = math.floor(theta * m / math.pi)
  return (-1) ** k * math.cos(m * theta) - 2 * k


def logits_np(name, x, w, y=None, **kw):
  """Logits of one sample x against all classes, from the papers' formulas."""
  x = np.asarray(x, np.float64)
  out = []
  for j in range(len(w)):
    if name == "subcenter_arcface":
      c = max(_cos(x, w[j][k]) for k in range(len(w[j])))
    else:
      c = _cos(x, w[j])
    target = y is not None and j == y
    if name == "normalized_softmax":
      out.append(c / kw.get("temperature", 0.05))
    elif name in ("arcface", "subcenter_arcface"):
      m, s = kw.get("margin", 0.5), kw.get("scale", 64.0)
      out.append(s * (_arc(c, m) if target else c))
    elif name == "cosface":
      m, s = kw.get("margin", 0.35), kw.get("scale", 64.0)
      out.append(s * (c - m if target else c))
    else:
      m, s = kw.get("margin", 4), kw.get("scale", 1.0)
      mag = np.linalg.norm(x)
      if name == "large_margin_softmax":
        mag *= np.linalg.norm(np.asarray(w[j], np.float64))
      out.append(s * mag * (_psi(c, m) if target else c))
  return out


def loss_np(name, emb, labels, w, *, where=None, reduction="mean", **kw):
  terms = [_ce(logits_np(name, emb[i], w, labels[i], **kw), labels[i])
           for i in range(len(emb)) if where is None or where[i]]
  if reduction == "sum":
    return float(np.sum(terms))
  return float(np.sum(terms) / max(len(terms), 1))


def _loss(name):
  return getattr(mj.losses, f"{name}_loss")


def _logits_fn(name):
  return getattr(mj.losses, f"{name}_logits")


SMALL = {  # hyper-parameters giving moderate logits (finite-difference friendly)
    "normalized_softmax": {"temperature": 0.5},
    "arcface": {"scale": 8.0, "margin": 0.3},
    "subcenter_arcface": {"scale": 8.0, "margin": 0.3},
    "cosface": {"scale": 8.0, "margin": 0.2},
    "sphereface": {"margin": 2},
    "large_margin_softmax": {"margin": 3, "scale": 0.5},
}


# ----------------------------------------------------------------- references


@pytest.mark.parametrize("name", NAMES)
def test_matches_loop_reference(name):
  w = _weights(1, name)
  for layout in ("m_per_class", "with_singletons", "all_singletons"):
    emb = random_embeddings(2, 12, D)
    labels = label_layouts()[layout]
    for kw in ({}, SMALL[name]):
      got = _loss(name)(emb, labels, weights=w, **kw)
      np.testing.assert_allclose(got, loss_np(name, emb, labels, w, **kw), rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_where_reductions_and_logits(name):
  w = _weights(3, name)
  emb = random_embeddings(4, 12, D)
  labels = label_layouts()["with_singletons"]
  where = np.arange(12) % 4 != 1
  padded_labels = np.where(where, labels, -1)  # padding may carry any label
  for red in ("mean", "sum"):
    got = _loss(name)(emb, padded_labels, weights=w, where=where, reduction=red)
    np.testing.assert_allclose(got, loss_np(name, emb, labels, w, where=where,
                                            reduction=red), rtol=1e-5)
  terms = _loss(name)(emb, labels, weights=w, reduction="none")
  assert terms.shape == (12,)
  # The logits function: with labels it gives the training logits...
  logits = _logits_fn(name)(emb, w, labels)
  want = np.array([logits_np(name, emb[i], w, labels[i]) for i in range(12)])
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  ce = jax.nn.logsumexp(logits, axis=1) - logits[np.arange(12), labels]
  np.testing.assert_allclose(terms, ce, rtol=1e-5, atol=1e-6)
  # ...without, the margin-free inference logits.
  plain = _logits_fn(name)(emb, w)
  want = np.array([logits_np(name, emb[i], w) for i in range(12)])
  np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-5)


def test_arcface_fallback_branch_and_gradient_at_cos_pm1():
  """theta > pi - m uses cos(theta) - m sin(m); cos = +-1 has finite grads."""
  w = _weights(5, "arcface")
  labels = np.arange(12)
  rng = np.random.default_rng(6)
  emb = (-w[labels] + 0.05 * rng.normal(size=(12, D))).astype(np.float32)
  cos_y = [_cos(emb[i], w[labels[i]]) for i in range(12)]
  assert max(cos_y) < -math.cos(0.5)  # every row is past pi - m
  for m in (0.5, 0.2):
    got = mj.losses.arcface_loss(emb, labels, weights=w, margin=m)
    np.testing.assert_allclose(got, loss_np("arcface", emb, labels, w, margin=m), rtol=1e-5)
  for name in ("arcface", "large_margin_softmax"):  # the two distinct code paths
    ww = w
    grad = jax.jit(jax.grad(lambda a, b: _loss(name)(a, labels, weights=b), argnums=(0, 1)))
    for e in (2.0 * w[labels], -3.0 * w[labels]):  # cos exactly +1 / -1 (up to rounding)
      g_e, g_w = grad(jnp.asarray(e), jnp.asarray(ww))
      assert np.all(np.isfinite(g_e)) and np.all(np.isfinite(g_w)), name


def test_subcenter_max_routes_the_gradient_to_the_maximum():
  """The sub-centre maximum's custom rule (it keeps an int8 index, not the
  blocks): the gradient of jnp.maximum away from ties, all of it to the
  first maximal block at a tie; jit and vmap."""
  from metric_jax.losses import large_margin  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  blocks = [jnp.asarray(rng.normal(size=(6, 5)).astype(np.float32)) for _ in range(3)]
  weights = jnp.asarray(rng.normal(size=(6, 5)).astype(np.float32))
  custom = lambda *b: jnp.sum(weights * large_margin._max_of_blocks(3, *b))
  plain = lambda *b: jnp.sum(weights * functools.reduce(jnp.maximum, b))
  np.testing.assert_allclose(custom(*blocks), plain(*blocks))
  for got, want in zip(jax.jit(jax.grad(custom, argnums=(0, 1, 2)))(*blocks),
                       jax.grad(plain, argnums=(0, 1, 2))(*blocks)):
    np.testing.assert_array_equal(got, want)
  tied = jax.grad(custom, argnums=(0, 1, 2))(blocks[1], blocks[1], blocks[0])
  winner = blocks[1] >= blocks[0]
  np.testing.assert_array_equal(tied[0], np.where(winner, weights, 0.0))
  np.testing.assert_array_equal(tied[1], 0.0)
  per_row = jax.vmap(jax.grad(lambda a, b: jnp.sum(large_margin._max_of_blocks(2, a, b))))
  np.testing.assert_array_equal(per_row(blocks[0], blocks[1]), blocks[0] >= blocks[1])


def test_subcenter_layouts_agree():
  w3 = _weights(7, "subcenter_arcface")
  emb = random_embeddings(8, 12, D)
  labels = label_layouts()["m_per_class"]
  a = mj.losses.subcenter_arcface_loss(emb, labels, weights=w3)
  b = mj.losses.subcenter_arcface_loss(emb, labels, weights=w3.reshape(C * K, D),
                                       sub_centers=K)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # One sub-centre per class is plain ArcFace.
  w = _weights(9, "arcface")
  np.testing.assert_allclose(
      mj.losses.subcenter_arcface_loss(emb, labels, weights=w, sub_centers=1),
      mj.losses.arcface_loss(emb, labels, weights=w), rtol=1e-6)


def test_large_margin_m1_is_plain_softmax():
  w = _weights(10, "large_margin_softmax")
  emb = random_embeddings(11, 12, D)
  labels = label_layouts()["m_per_class"]
  logits = emb.astype(np.float64) @ w.T.astype(np.float64)
  want = np.mean([_ce(list(logits[i]), labels[i]) for i in range(12)])
  got = mj.losses.large_margin_softmax_loss(emb, labels, weights=w, margin=1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------ contract and gradients


def test_contract():
  """check_loss_contract on the sum of the six losses: one compilation per
  scenario instead of six (compile time dominates on CPU). Every property of
  the contract holds for the sum iff it holds for each term, except NaN
  propagation (one NaN term suffices), checked per loss below."""
  ws = {name: jnp.asarray(_weights(12, name)) for name in NAMES}

  def total(e, l, where=None):
    return sum(_loss(name)(e, l, weights=ws[name], where=where, **SMALL[name])
               for name in NAMES)

  check_loss_contract(jax.jit(total), zero_without_positives=False)
  emb = jnp.asarray(random_embeddings(12, 12, D)).at[3, 1].set(jnp.nan)
  labels = jnp.asarray(label_layouts()["m_per_class"])
  for name in NAMES:
    terms = _loss(name)(emb, labels, weights=ws[name], reduction="none", **SMALL[name])
    assert np.isnan(terms[3]) and np.all(np.isfinite(np.delete(np.asarray(terms), 3))), name


def test_gradients_wrt_weights():
  """Numerical gradient check w.r.t. every loss's class weights at once: the
  summed losses have disjoint weights, so the check is exactly the six
  separate ones (the embeddings' gradients are checked by the contract)."""
  emb = jnp.asarray(random_embeddings(13, 12, D))
  labels = jnp.asarray(label_layouts()["with_singletons"])
  ws = tuple(jnp.asarray(_weights(14, name)) for name in NAMES)
  f = jax.jit(lambda ws: sum(_loss(name)(emb, labels, weights=w, **SMALL[name])
                             for name, w in zip(NAMES, ws)))
  check_grads(f, (ws,), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-3)


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_half_precision_scale_64(name):
  """f16/bf16 inputs and weights at s = 64: finite values and gradients, and
  the value of the same (rounded) inputs computed in float32."""
  emb = jnp.asarray(random_embeddings(15, 12, D))
  labels = jnp.asarray(label_layouts()["m_per_class"])
  w = jnp.asarray(_weights(16, name))
  f = jax.jit(jax.value_and_grad(lambda e, ww: _loss(name)(e, labels, weights=ww, scale=64.0),
                                 argnums=(0, 1)))
  for dt in (jnp.float16, jnp.bfloat16) if name == "arcface" else (jnp.float16,):
    e16, w16 = emb.astype(dt), w.astype(dt)
    val, (g_e, g_w) = f(e16, w16)
    assert val.dtype == jnp.float32 and g_e.dtype == dt and g_w.dtype == dt
    assert np.isfinite(float(val))
    assert np.all(np.isfinite(np.asarray(g_e, np.float32)))
    assert np.all(np.isfinite(np.asarray(g_w, np.float32)))
    val32, _ = f(e16.astype(jnp.float32), w16.astype(jnp.float32))
    np.testing.assert_allclose(val, val32, rtol=1e-5)


def test_init_functions():
  key = jax.random.key(0)
  for name in NAMES:
    init = getattr(mj.losses, f"init_{name}")
    params = jax.eval_shape(lambda: init(key, C, D))
    assert set(params) == {"weights"}
    want = (C, K, D) if name == "subcenter_arcface" else (C, D)
    assert params["weights"].shape == want and params["weights"].dtype == jnp.float32
  shape = jax.eval_shape(lambda: mj.losses.init_subcenter_arcface(key, 4, 3, sub_centers=5))
  assert shape["weights"].shape == (4, 5, 3)
  params = mj.losses.init_arcface(key, 100, 200)
  np.testing.assert_allclose(np.std(np.asarray(params["weights"])), 1.0, rtol=0.03)  # normal_
  emb = random_embeddings(17, 12, 200)
  assert np.isfinite(mj.losses.arcface_loss(emb, np.arange(12) * 8, **params))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
  loss = _loss(name)
  emb = random_embeddings(18, 12, D)
  labels = label_layouts()["all_singletons"]
  w = _weights(19, name)
  with pytest.raises(ValueError, match="ref_embeddings"):
    loss(emb, labels, emb, labels, weights=w)
  with pytest.raises(ValueError, match="ref_where"):
    loss(emb, labels, weights=w, ref_where=np.ones(12, bool))
  with pytest.raises(ValueError, match="labels"):
    loss(emb, labels + 2, weights=w)
  with pytest.raises(ValueError, match="labels"):
    loss(emb, labels - 1, weights=w)
  with pytest.raises(ValueError, match="weights"):
    loss(emb, labels, weights=w[..., :D - 1])
  with pytest.raises(ValueError, match="weights"):
    loss(emb, labels, weights=None)
  with pytest.raises(TypeError, match="weights"):
    loss(emb, labels, weights=w.astype(np.int32))
  with pytest.raises(ValueError, match="reduction"):
    loss(emb, labels, weights=w, reduction="mean_nonzero")
  with pytest.raises(TypeError, match="embeddings"):
    loss(emb.astype(np.int32), labels, weights=w)
  bad = {"normalized_softmax": {"temperature": 0.0}}.get(name, {"scale": -1.0})
  with pytest.raises(ValueError, match=next(iter(bad))):
    loss(emb, labels, weights=w, **bad)
  # Traced out-of-range labels cannot raise: the loss is NaN instead.
  val = jax.jit(lambda l: loss(emb, l, weights=w))(jnp.asarray(labels + 5))
  assert np.isnan(float(val))
  with pytest.raises(ValueError, match="labels"):
    _logits_fn(name)(emb, w, labels + 2)


def test_bad_margins_and_layouts():
  emb = random_embeddings(20, 12, D)
  labels = label_layouts()["m_per_class"]
  w = _weights(21, "arcface")
  with pytest.raises(ValueError, match="radians"):
    mj.losses.arcface_loss(emb, labels, weights=w, margin=28.6)
  with pytest.raises(ValueError, match="margin"):
    mj.losses.arcface_loss(emb, labels, weights=w, margin=-0.1)
  with pytest.raises(TypeError, match="margin"):
    mj.losses.large_margin_softmax_loss(emb, labels, weights=w, margin=2.5)
  with pytest.raises(ValueError, match="margin"):
    mj.losses.sphereface_loss(emb, labels, weights=w, margin=0)
  with pytest.raises(ValueError, match="sub_centers"):
    mj.losses.subcenter_arcface_loss(emb, labels, weights=w, sub_centers=2)  # 13 % 2
  with pytest.raises(ValueError, match="sub_centers"):
    mj.losses.subcenter_arcface_loss(emb, labels, weights=_weights(22, "subcenter_arcface"),
                                     sub_centers=2)


# ----------------------------------------------------------------------- PML


def _pml_module(name):
  from pytorch_metric_learning import losses as pml_losses
  if name == "normalized_softmax":
    return pml_losses.NormalizedSoftmaxLoss(C, D), {}
  if name == "arcface":
    return pml_losses.ArcFaceLoss(C, D), {"margin": math.radians(28.6)}
  if name == "subcenter_arcface":
    return (pml_losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, sub_centers=K),
            {"margin": math.radians(28.6), "sub_centers": K})
  if name == "cosface":
    return pml_losses.CosFaceLoss(C, D), {}
  if name == "sphereface":
    return pml_losses.SphereFaceLoss(C, D), {}
  return pml_losses.LargeMarginSoftmaxLoss(C, D), {}


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("name", NAMES)
def test_pml_parity(name):
  import torch
  module, kw = _pml_module(name)
  # PML's own initialisation of its [D, C] weight, transposed into ours.
  w = module.W.detach().numpy().T.astype(np.float32).copy()
  module.W.data = torch.tensor(w.T, dtype=torch.float64)
  emb = random_embeddings(23, 12, D)
  labels = label_layouts()["with_singletons"]
  e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
  out = module(e, torch.tensor(labels, dtype=torch.int64))
  out.backward()
  f = lambda a, b: _loss(name)(a, labels, weights=b, **kw)
  got, (g_e, g_w) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(emb), jnp.asarray(w))
  np.testing.assert_allclose(got, out.item(), rtol=1e-5)
  scale = max(np.abs(e.grad.numpy()).max(), np.abs(module.W.grad.numpy()).max())
  np.testing.assert_allclose(g_e, e.grad.numpy(), rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(g_w, module.W.grad.numpy().T, rtol=1e-4, atol=1e-5 * scale)
