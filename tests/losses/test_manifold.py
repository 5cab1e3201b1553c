"""manifold_loss vs a loop reference, the loss contract, the random
assignment, gradients w.r.t. the proxies, bad inputs and PML parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from metric_jax.losses import manifold as manifold_lib
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_gradient,
                           np_pairwise, random_embeddings)

K, D = 12, 5


def _proxies(seed, k=K, d=D):
  return np.random.default_rng(seed).normal(size=(k, d)).astype(np.float32)


def manifold_np(emb, labels, proxies, *, alpha=0.8, lambda_c=1.0, margin=5e-4,
                temperature=0.5, violating_only=True, distance="cosine", where=None,
                reduction="mean"):
  """The formula with explicit loops in float64; masked rows leave the graph."""
  rows = [i for i in range(len(emb)) if where is None or where[i]]
  b = len(rows)
  nodes = np.concatenate([np.asarray(emb, np.float64)[rows].reshape(b, -1),
                          np.asarray(proxies, np.float64)])
  n, k = len(nodes), len(proxies)
  sim = np_pairwise(nodes, nodes, distance)
  s = np.zeros((n, n))
  for a in range(n):
    for c in range(n):
      if a != c:
        s[a, c] = math.exp(max(sim[a, c], 0.0) / temperature)
  degree = s.sum(axis=1)
  s_bar = np.zeros((n, n))
  for a in range(n):
    for c in range(n):
      s_bar[a, c] = s[a, c] / math.sqrt(degree[a] * degree[c])
  f = (1 - alpha) * np.linalg.inv(np.eye(n) - alpha * s_bar)

  def softplus_term(values, own):
    total = 0.0
    for j in range(k):
      x = values[j] - values[own] + margin
      if j != own and (x >= 0 or not violating_only):
        total += math.exp(x)
    return math.log(1.0 + total)

  terms = np.zeros(len(emb))
  for r, i in enumerate(rows):
    own = int(labels[i])
    cos = [f[r] @ f[b + j] / (np.linalg.norm(f[r]) * np.linalg.norm(f[b + j]))
           for j in range(k)]
    ctx = softplus_term(cos, own)
    if math.isinf(lambda_c):
      terms[i] = ctx
    else:
      terms[i] = softplus_term([f[r, b + j] for j in range(k)], own) + lambda_c * ctx
  if reduction == "none":
    return terms
  if reduction == "sum":
    return terms.sum()
  return terms.sum() / max(b, 1)


SETTINGS = [
    {},
    {"alpha": 0.5, "lambda_c": 0.3, "margin": 0.01, "temperature": 1.0},
    {"lambda_c": 0.0, "margin": -0.002},
    {"lambda_c": float("inf")},
    {"violating_only": False, "alpha": 0.95},
]


@pytest.mark.parametrize("layout", list(label_layouts()))
def test_matches_loop_reference(layout):
  emb = random_embeddings(1, 12, D)
  labels = label_layouts()[layout]
  proxies = _proxies(2)
  for kw in SETTINGS:
    got = mj.losses.manifold_loss(emb, labels, proxies=proxies, **kw)
    np.testing.assert_allclose(got, manifold_np(emb, labels, proxies, **kw), rtol=1e-5,
                               err_msg=str(kw))


def test_dot_similarity_and_reductions():
  emb = random_embeddings(3, 12, D, scale=0.4)
  labels = label_layouts()["with_singletons"]
  proxies = 0.4 * _proxies(4)
  for red in ("mean", "sum", "none"):
    for kw in ({"distance": "dot"}, {"distance": mj.distances.custom(
        lambda a, b: a @ b.T, is_similarity=True)}):
      got = mj.losses.manifold_loss(emb, labels, proxies=proxies, reduction=red, **kw)
      want = manifold_np(emb, labels, proxies, distance="dot", reduction=red)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_where_removes_rows_from_the_graph():
  emb = random_embeddings(5, 12, D)
  labels = label_layouts()["m_per_class"]
  where = np.arange(12) % 5 != 2
  padded = np.where(where[:, None], emb, np.nan).astype(np.float32)
  proxies = _proxies(6)
  for red in ("mean", "sum", "none"):
    got = mj.losses.manifold_loss(padded, np.where(where, labels, 99), proxies=proxies,
                                  where=where, reduction=red)
    want = manifold_np(emb, labels, proxies, where=where, reduction=red)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  g = jax.grad(lambda e: mj.losses.manifold_loss(e, labels, proxies=proxies, where=where))(
      jnp.asarray(padded))
  assert np.all(np.isfinite(g)) and float(jnp.abs(g[~where]).max()) == 0.0
  assert float(jnp.abs(g[where]).max()) > 0.0


def test_contract():
  proxies = jnp.asarray(_proxies(7))
  loss = jax.jit(lambda e, l, where=None: mj.losses.manifold_loss(
      e, l, proxies=proxies, where=where))
  # The kept terms (x >= 0) jump at the threshold: finite differences use
  # the smooth form with every term kept.
  smooth = jax.jit(lambda e, l: mj.losses.manifold_loss(e, l, proxies=proxies,
                                                         violating_only=False))
  check_loss_contract(loss, zero_without_positives=False, grad_loss_fn=smooth)


def test_gradients_wrt_embeddings_and_proxies_and_half_precision():
  emb = jnp.asarray(random_embeddings(8, 12, D))
  labels = jnp.asarray(label_layouts()["with_singletons"])
  proxies = jnp.asarray(_proxies(9))
  # The smooth form (every term kept) against the float64 loop reference.
  kw = {"alpha": 0.6, "violating_only": False}
  g_e, g_p = jax.grad(lambda e, p: mj.losses.manifold_loss(e, labels, proxies=p, **kw),
                      argnums=(0, 1))(emb, proxies)
  want_e = np_gradient(lambda e: manifold_np(e, labels, proxies, **kw), emb)
  want_p = np_gradient(lambda p: manifold_np(emb, labels, p, **kw), proxies)
  top = max(np.abs(want_e).max(), np.abs(want_p).max())
  np.testing.assert_allclose(g_e, want_e, rtol=1e-3, atol=1e-4 * top)
  np.testing.assert_allclose(g_p, want_p, rtol=1e-3, atol=1e-4 * top)
  vg = jax.jit(jax.value_and_grad(
      lambda e, p: mj.losses.manifold_loss(e, labels, proxies=p), argnums=(0, 1)))
  for dt in (jnp.bfloat16, jnp.float16):
    e16, p16 = emb.astype(dt), proxies.astype(dt)
    val, (g_e, g_p) = vg(e16, p16)
    assert val.dtype == jnp.float32 and g_e.dtype == dt and g_p.dtype == dt
    assert np.all(np.isfinite(np.asarray(g_e, np.float32)))
    assert np.all(np.isfinite(np.asarray(g_p, np.float32)))
    # The same rounded inputs in float32: the computation itself is float32.
    np.testing.assert_allclose(val, vg(e16.astype(jnp.float32), p16.astype(jnp.float32))[0],
                               rtol=1e-5)


def test_duplicates_and_an_embedding_on_a_proxy():
  proxies = _proxies(10)
  emb = random_embeddings(11, 12, D)
  emb[1] = emb[0]
  emb[2] = emb[0]
  emb[3] = 2.0 * proxies[5]
  labels = label_layouts()["with_singletons"]
  f = jax.jit(jax.value_and_grad(lambda e, p: mj.losses.manifold_loss(e, labels, proxies=p),
                                 argnums=(0, 1)))
  val, (g_e, g_p) = f(jnp.asarray(emb), jnp.asarray(proxies))
  np.testing.assert_allclose(val, manifold_np(emb, labels, proxies), rtol=1e-5)
  assert np.all(np.isfinite(g_e)) and np.all(np.isfinite(g_p))
  # Two identical proxies: the rows assigned to either tie on the other's terms.
  twin = proxies.copy()
  twin[1] = twin[0]
  np.testing.assert_allclose(mj.losses.manifold_loss(emb, labels, proxies=twin),
                             manifold_np(emb, labels, twin), rtol=1e-5)


def test_random_assignment():
  emb = random_embeddings(12, 20, D)
  proxies = _proxies(13, k=6)
  key = jax.random.key(3)
  draw = np.asarray(manifold_lib._random_assignment(key, 20, 6))
  assert draw.shape == (20,) and set(draw.tolist()) == set(range(6))
  assert not np.array_equal(draw, np.asarray(manifold_lib._random_assignment(
      jax.random.key(4), 20, 6)))
  drawn = mj.losses.manifold_loss(emb, None, proxies=proxies, key=key)
  np.testing.assert_allclose(drawn, manifold_np(emb, draw, proxies), rtol=1e-5)
  # Exactly one of each proxy when B == K.
  square = np.asarray(manifold_lib._random_assignment(key, 6, 6))
  assert sorted(square.tolist()) == list(range(6))
  jitted = jax.jit(lambda e, kk: mj.losses.manifold_loss(e, None, proxies=proxies, key=kk))
  np.testing.assert_allclose(jitted(emb, key), drawn, rtol=1e-6)


def test_traced_hyper_parameters():
  emb = jnp.asarray(random_embeddings(14, 12, D))
  labels = label_layouts()["m_per_class"]
  proxies = jnp.asarray(_proxies(15))
  alphas = jnp.array([0.3, 0.8])
  got = jax.vmap(lambda a: mj.losses.manifold_loss(emb, labels, proxies=proxies, alpha=a,
                                                   lambda_c=2 * a))(alphas)
  for a, v in zip((0.3, 0.8), got):
    np.testing.assert_allclose(v, manifold_np(emb, labels, proxies, alpha=a, lambda_c=2 * a),
                               rtol=1e-5)


def test_init():
  params = mj.losses.init_manifold(jax.random.key(0), 50, 128)
  p = np.asarray(params["proxies"])
  assert set(params) == {"proxies"} and p.shape == (50, 128) and p.dtype == np.float32
  np.testing.assert_allclose(p.std(), 1.0, rtol=0.03)
  assert abs(p.mean()) < 0.03
  half = mj.losses.init_manifold(jax.random.key(0), 3, 4, dtype=jnp.bfloat16)["proxies"]
  assert half.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="num_proxies"):
    mj.losses.init_manifold(jax.random.key(0), 0, 4)


def test_bad_inputs():
  emb = random_embeddings(16, 12, D)
  labels = label_layouts()["all_singletons"]
  proxies = _proxies(17)
  loss = mj.losses.manifold_loss
  with pytest.raises(ValueError, match="ref_embeddings"):
    loss(emb, labels, emb, labels, proxies=proxies)
  with pytest.raises(ValueError, match="ref_where"):
    loss(emb, labels, proxies=proxies, ref_where=np.ones(12, bool))
  with pytest.raises(ValueError, match="labels"):
    loss(emb, labels + 1, proxies=proxies)
  with pytest.raises(ValueError, match="labels"):
    loss(emb, labels[:5], proxies=proxies)
  with pytest.raises(ValueError, match="where"):
    loss(emb, labels, proxies=proxies, where=np.ones(5, bool))
  with pytest.raises(ValueError, match="proxies"):
    loss(emb, labels, proxies=proxies[:, :3])
  with pytest.raises(ValueError, match="proxies"):
    loss(emb, labels, proxies=None)
  for alpha in (0.0, 1.0):
    with pytest.raises(ValueError, match="alpha"):
      loss(emb, labels, proxies=proxies, alpha=alpha)
  with pytest.raises(ValueError, match="lambda_c"):
    loss(emb, labels, proxies=proxies, lambda_c=-1.0)
  with pytest.raises(ValueError, match="temperature"):
    loss(emb, labels, proxies=proxies, temperature=0.0)
  with pytest.raises(ValueError, match="distance"):
    loss(emb, labels, proxies=proxies, distance="euclidean")
  with pytest.raises(ValueError, match="reduction"):
    loss(emb, labels, proxies=proxies, reduction="mean_nonzero")
  with pytest.raises(ValueError, match="exactly one of `labels`"):
    loss(emb, None, proxies=proxies)
  with pytest.raises(ValueError, match="exactly one of `labels`"):
    loss(emb, labels, proxies=proxies, key=jax.random.key(0))
  with pytest.raises(ValueError, match="at least as many rows as `proxies`"):
    loss(emb[:5], None, proxies=proxies, key=jax.random.key(0))
  val = jax.jit(lambda l: loss(emb, l, proxies=proxies))(jnp.asarray(labels + 1))
  assert np.isnan(float(val))


def _pml_module(k, d, kw, distance=None):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  names = {"alpha": "alpha", "lambda_c": "lambdaC", "margin": "margin"}
  extra = {} if distance is None else {"distance": distance}
  module = pml_losses.ManifoldLoss(d, K=k, **{names[n]: v for n, v in kw.items()}, **extra)
  proxies = module.proxies.detach().numpy().copy()
  return module, proxies, torch


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("kw", [{}, {"alpha": 0.5, "lambda_c": 0.3, "margin": 0.01},
                                {"lambda_c": 0.0}, {"dot": True}])
def test_pml_parity(kw):
  kw = dict(kw)
  dot = kw.pop("dot", False)
  distance = None
  if dot:
    from pytorch_metric_learning import distances as pml_distances
    # PML's distances normalise the embeddings unless told otherwise.
    distance = pml_distances.DotProductSimilarity(normalize_embeddings=False)
  module, proxies, torch = _pml_module(6, D, kw, distance)
  scale = 0.4 if dot else 1.0
  emb = random_embeddings(18, 16, D, scale=scale)
  proxies = proxies * np.float32(scale)
  module.proxies.data = torch.tensor(proxies)
  assign = np.random.default_rng(19).integers(0, 6, 16)
  e = torch.tensor(emb, requires_grad=True)
  out = module(e, None, torch.tensor(assign))
  out.backward()
  f = lambda a, p: mj.losses.manifold_loss(a, assign, proxies=p,
                                           distance="dot" if dot else "cosine", **kw)
  got, (g_e, g_p) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(emb),
                                                          jnp.asarray(proxies))
  np.testing.assert_allclose(got, out.item(), rtol=1e-5)
  top = max(np.abs(e.grad.numpy()).max(), np.abs(module.proxies.grad.numpy()).max())
  assert top > 0
  np.testing.assert_allclose(g_e, e.grad.numpy(), rtol=1e-3, atol=1e-4 * top)
  np.testing.assert_allclose(g_p, module.proxies.grad.numpy(), rtol=1e-3, atol=1e-4 * top)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_parity_random_assignment_and_lambda_inf():
  module, proxies, torch = _pml_module(5, D, {})
  emb = random_embeddings(20, 14, D)
  torch.manual_seed(123)
  out = module(torch.tensor(emb)).item()
  # Replay PML's draw: B - K uniform proxies after arange(K), then a permutation.
  torch.manual_seed(123)
  extra = torch.randint(0, 5, (14 - 5,))
  assign = torch.cat((torch.arange(5), extra))[torch.randperm(14)].numpy()
  got = mj.losses.manifold_loss(emb, assign, proxies=proxies)
  np.testing.assert_allclose(got, out, rtol=1e-5)
  # lambdaC = inf: PML multiplies the context term by inf; ours is the
  # context term alone (PML's documented intent).
  inf_module, inf_proxies, _ = _pml_module(5, D, {"lambda_c": float("inf")})
  pml_inf = inf_module(torch.tensor(emb), None, torch.tensor(assign)).item()
  ours = mj.losses.manifold_loss(emb, assign, proxies=inf_proxies, lambda_c=float("inf"))
  assert math.isinf(pml_inf) and np.isfinite(float(ours)) and float(ours) > 0
  np.testing.assert_allclose(ours, manifold_np(emb, assign, inf_proxies,
                                               lambda_c=float("inf")), rtol=1e-5)
