"""metric_jax.bregman: closed forms, the fast pairwise form vs per-pair loops,
D >= 0 and D(x, x) = 0 for every generator, losses with a Bregman distance
vs NumPy loop references, gradients to learned generators, jit/vmap and bad
inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metric_jax as mj
from metric_jax import bregman
from metric_jax.models.convex import ICNN, MaxAffine, SoftMaxAffine
from tests.helpers import check_loss_contract, label_layouts, np_pairwise, random_embeddings

D = 3
_RNG = np.random.default_rng(0)
_L_FULL = _RNG.normal(size=(D, D)).astype(np.float32)
_L_LOW = _RNG.normal(size=(D, 2)).astype(np.float32)


def _learned(kind: str, seed: int = 0, d: int = D):
  module = {"icnn": ICNN(hidden_features=(8, 8), eps=1e-2),
            "max_affine": MaxAffine(num_pieces=6, eps=1e-2),
            "soft_max_affine": SoftMaxAffine(num_pieces=6, temperature=0.5, eps=1e-2)}[kind]
  params = jax.jit(module.init)(jax.random.key(seed), jnp.zeros(d))
  return module, params


_MODULES = {k: _learned(k) for k in ("icnn", "max_affine", "soft_max_affine")}


def _np_softplus(x):
  return np.logaddexp(0.0, x)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# name -> (phi, kind of raw input, map applied by the generator, NumPy divergence
# of mapped points or None for learned generators).
def _kl(p, q):
  return float(np.sum(p * np.log(p / q) - p + q))


def _is(x, y):
  r = x / y
  return float(np.sum(r - np.log(r) - 1.0))


GENERATORS = {
    "squared_norm": (bregman.squared_norm, "real", None,
                     lambda x, y: float(np.sum((x - y) ** 2))),
    "half_squared_norm": (bregman.half_squared_norm, "real", None,
                          lambda x, y: 0.5 * float(np.sum((x - y) ** 2))),
    "mahalanobis": (bregman.mahalanobis(_L_FULL), "real", None,
                    lambda x, y: float((x - y) @ _L_FULL.astype(np.float64)
                                       @ _L_FULL.T.astype(np.float64) @ (x - y))),
    "mahalanobis_low_rank": (bregman.mahalanobis(_L_LOW), "real", None,
                             lambda x, y: float(np.sum(((x - y) @ _L_LOW.astype(np.float64)) ** 2))),
    "kl_simplex": (bregman.negative_entropy(), "simplex", None, _kl),
    "kl_nonnegative": (bregman.negative_entropy(domain="nonnegative"), "positive", None, _kl),
    "kl_softmax": (bregman.negative_entropy("softmax"), "real", _np_softmax, _kl),
    "kl_softplus": (bregman.negative_entropy("softplus"), "real", _np_softplus, _kl),
    "itakura_saito": (bregman.itakura_saito(), "positive", None, _is),
    "itakura_saito_exp": (bregman.itakura_saito("exp"), "real", np.exp, _is),
    "itakura_saito_softplus": (bregman.itakura_saito("softplus"), "real", _np_softplus, _is),
}
for _k, (_m, _p) in _MODULES.items():
  GENERATORS[_k] = (bregman.Generator(lambda z, _m=_m, _p=_p: _m.apply(_p, z), name=_k),
                    "real", None, None)
FIXED = [k for k, v in GENERATORS.items() if v[3] is not None]
LEARNED = list(_MODULES)


def _inputs(kind: str, n: int, seed: int, scale: float = 1.0, d: int = D):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * scale
  if kind == "positive":
    x = np.exp(0.5 * x)
  elif kind == "simplex":
    x = _np_softmax(x)
  return x.astype(np.float32)


_F64_FNS = {}


def _learned_f64(name):
  """phi and grad phi of the learned generator in float64, per point."""
  module, params = _MODULES[name]
  if name not in _F64_FNS:
    with jax.enable_x64(True):
      p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

      @jax.jit
      def fn(z):
        phi = lambda v: module.apply(p64, v)
        return jax.vmap(jax.value_and_grad(phi))(z)
    _F64_FNS[name] = fn

  def values(points):
    with jax.enable_x64(True):
      vals, grads = _F64_FNS[name](np.asarray(points, np.float64))
    return np.asarray(vals, np.float64), np.asarray(grads, np.float64)

  return values


_PAIR_FNS = {}


def pair_fn(name):
  """Jitted ``pairwise`` of a generator (compiled once per input shape)."""
  if name not in _PAIR_FNS:
    phi = GENERATORS[name][0]
    _PAIR_FNS[name] = jax.jit(lambda x, y: bregman.pairwise(phi, x, y))
  return _PAIR_FNS[name]


def brute_force(name, x, y, clip=True):
  """[N, M] divergences, one pair at a time, in float64 (no matrix product)."""
  phi, _, fmap, closed = GENERATORS[name]
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  out = np.zeros((len(x), len(y)))
  if closed is not None:
    fx = fmap(x) if fmap else x
    fy = fmap(y) if fmap else y
    for i in range(len(x)):
      for j in range(len(y)):
        out[i, j] = closed(fx[i], fy[j])
  else:
    values = _learned_f64(name)
    px, _ = values(x)
    py, gy = values(y)
    for i in range(len(x)):
      for j in range(len(y)):
        out[i, j] = px[i] - py[j] - gy[j] @ (x[i] - y[j])
  return np.maximum(out, 0.0) if clip else out


# ----------------------------------------------------------------------------
# Closed forms and the fast pairwise form.


def test_squared_norm_gives_squared_euclidean_exactly():
  x = random_embeddings(0, 6, D)
  y = random_embeddings(1, 4, D)
  full = bregman.pairwise(bregman.squared_norm, x, y)
  half = bregman.pairwise(bregman.half_squared_norm, x, y)
  ref = mj.distances.pairwise(x, y, "squared_euclidean")
  np.testing.assert_allclose(full, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(half, 0.5 * np.asarray(ref), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(full, np_pairwise(x, y, "squared_euclidean"), rtol=1e-5, atol=1e-5)
  same = bregman.pairwise(bregman.half_squared_norm, x)
  np.testing.assert_allclose(same, 0.5 * np.asarray(mj.distances.pairwise(x, None, "squared_euclidean")),
                             rtol=1e-6, atol=1e-6)
  assert same.dtype == jnp.float32 and np.all(np.diag(same) == 0)


@pytest.mark.parametrize("name", FIXED)
def test_fixed_generators_equal_closed_forms(name):
  kind = GENERATORS[name][1]
  x = _inputs(kind, 6, 1)
  y = _inputs(kind, 5, 2)
  got = bregman.pairwise(GENERATORS[name][0], x, y)
  want = brute_force(name, x, y)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert got.shape == (6, 5) and got.dtype == jnp.float32


def test_named_closed_forms_by_hand():
  p, q = np.array([0.2, 0.3, 0.5]), np.array([0.4, 0.4, 0.2])
  kl = float(np.sum(p * np.log(p / q)))
  np.testing.assert_allclose(bregman.divergence(bregman.negative_entropy(), p.astype(np.float32),
                                                q.astype(np.float32)), kl, rtol=1e-5)
  x, y = np.array([1.0, 3.0]), np.array([2.0, 1.0])
  is_ = float(np.sum(x / y - np.log(x / y) - 1))
  np.testing.assert_allclose(bregman.divergence(bregman.itakura_saito(), x.astype(np.float32),
                                                y.astype(np.float32)), is_, rtol=1e-5)
  # KL with the softmax map is KL(softmax(x) || softmax(y)).
  a, b = np.array([0.5, -1.0, 2.0]), np.array([0.0, 1.0, -0.5])
  sa, sb = _np_softmax(a), _np_softmax(b)
  np.testing.assert_allclose(
      bregman.divergence(bregman.negative_entropy("softmax"), a.astype(np.float32), b.astype(np.float32)),
      np.sum(sa * np.log(sa / sb)), rtol=1e-5)
  # IS with exp map: sum e^{x-y} - (x-y) - 1.
  np.testing.assert_allclose(
      bregman.divergence(bregman.itakura_saito("exp"), a.astype(np.float32), b.astype(np.float32)),
      np.sum(np.exp(a - b) - (a - b) - 1), rtol=1e-5)
  # Mahalanobis: (x - y)^T A (x - y).
  L = _L_FULL.astype(np.float64)
  np.testing.assert_allclose(
      bregman.divergence(bregman.mahalanobis(_L_FULL), a.astype(np.float32), b.astype(np.float32)),
      (a - b) @ L @ L.T @ (a - b), rtol=1e-5)
  assert bregman.burg_entropy is bregman.itakura_saito


@pytest.mark.parametrize("name", list(GENERATORS))
def test_fast_pairwise_equals_per_pair_loops(name):
  kind = GENERATORS[name][1]
  x = _inputs(kind, 6, 3)
  y = _inputs(kind, 4, 4)
  phi = GENERATORS[name][0]
  got, single, matched, broadcast = jax.jit(lambda a, b: (
      bregman.pairwise(phi, a, b), bregman.divergence(phi, a[2], b[1]),
      bregman.divergence(phi, a[:4], b), bregman.divergence(phi, a[:, None, :], b[None])))(x, y)
  want = brute_force(name, x, y)   # float64, one pair at a time
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The direct per-pair JAX form agrees; the matrix is anchor-first.
  assert single.shape == () and matched.shape == (4,) and broadcast.shape == (6, 4)
  np.testing.assert_allclose(single, want[2, 1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(matched, np.diag(want[:4]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(broadcast, want, rtol=1e-4, atol=1e-5)


def test_asymmetry_and_anchor_first_convention():
  phi = bregman.itakura_saito()
  x = _inputs("positive", 3, 5)
  y = _inputs("positive", 4, 6)
  dxy = np.asarray(bregman.pairwise(phi, x, y))
  dyx = np.asarray(bregman.pairwise(phi, y, x))
  assert not np.allclose(dxy, dyx.T, rtol=1e-3)
  np.testing.assert_allclose(dxy[1, 2], _is(x[1].astype(np.float64), y[2].astype(np.float64)),
                             rtol=1e-5)
  dist = bregman.as_distance(phi)
  np.testing.assert_allclose(dist(x, y), dxy, rtol=1e-6)
  assert dist.is_similarity is False


# ----------------------------------------------------------------------------
# D >= 0 and D(x, x) = 0 on random inputs (hypothesis).

_JITTED = {name: jax.jit(lambda x, y, phi=v[0]: (bregman.pairwise(phi, x, y),
                                                  bregman.pairwise(phi, x),
                                                  bregman.divergence(phi, x, x)))
           for name, v in GENERATORS.items()}


@pytest.mark.parametrize("name", list(GENERATORS))
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.05, 3.0))
def test_nonnegative_and_zero_on_the_diagonal(name, seed, scale):
  kind = GENERATORS[name][1]
  x = _inputs(kind, 5, seed, scale)
  y = _inputs(kind, 5, seed + 1, scale)
  dxy, dxx, self_div = _JITTED[name](x, y)
  assert np.all(np.isfinite(dxy)) and np.all(np.asarray(dxy) >= 0)
  assert np.all(np.diag(dxx) == 0) and np.all(np.asarray(dxx) >= 0)
  assert np.all(np.asarray(self_div) == 0)
  # Unclipped float64 per-pair values: convexity alone makes them >= 0, and
  # strict convexity > 0 for distinct points (not a rank-deficient metric).
  raw = brute_force(name, x, y, clip=False)
  scale_ref = 1e-9 * (1 + np.abs(raw).max())
  assert raw.min() >= -scale_ref, raw.min()
  if name != "mahalanobis_low_rank":
    assert raw.min() > 0
  np.testing.assert_allclose(dxy, np.maximum(raw, 0), rtol=1e-3, atol=1e-4 * (1 + raw.max()))
  # D(x, copy of x) is ~0 (cancellation only).
  copy_diag = np.diag(np.asarray(_JITTED[name](x, x.copy())[0]))
  assert np.all(copy_diag <= 1e-4 * (1 + np.abs(dxy).max()))


# ----------------------------------------------------------------------------
# jit / vmap / grad.


@pytest.mark.parametrize("name", ["icnn"])
def test_jit_vmap_grad(name):
  phi = GENERATORS[name][0]
  x = _inputs("real", 6, 7)
  y = _inputs("real", 4, 8)
  eager = pair_fn(name)(x, y)   # eager calls are covered by the other tests
  np.testing.assert_allclose(eager, brute_force(name, x, y), rtol=1e-4, atol=1e-5)
  xs = np.stack([x, 0.5 * x, -x])
  ys = np.stack([y, y + 0.1, 2 * y])
  vm = jax.jit(jax.vmap(lambda a, b: bregman.pairwise(phi, a, b)))(xs, ys)
  jitted = pair_fn(name)
  for k in range(3):
    np.testing.assert_allclose(vm[k], jitted(xs[k], ys[k]), rtol=1e-5, atol=1e-6)
  gx, gy = jax.jit(jax.grad(lambda a, b: jnp.sum(bregman.pairwise(phi, a, b)),
                            argnums=(0, 1)))(x, y)
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
  # Gradient of the fast form = gradient of the per-pair form.
  gx2, gy2 = jax.jit(jax.grad(lambda a, b: jnp.sum(bregman.divergence(phi, a[:, None], b[None])),
                              argnums=(0, 1)))(x, y)
  np.testing.assert_allclose(gx, gx2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gy, gy2, rtol=1e-4, atol=1e-5)


def test_half_precision_inputs_compute_in_float32():
  x = random_embeddings(2, 6, D)
  phi = GENERATORS["icnn"][0]
  ref = bregman.pairwise(phi, x)
  for dt in (jnp.bfloat16, jnp.float16):
    low = bregman.pairwise(phi, jnp.asarray(x, dt))
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------
# Losses with a Bregman distance vs NumPy loop references.


def _reduce_np(vals, reduction):
  vals = np.asarray(vals, np.float64)
  if reduction == "sum":
    return vals.sum()
  if reduction == "mean":
    return vals.sum() / max(len(vals), 1)
  return vals.sum() / max(int(np.sum(vals > 0)), 1)


def _pair_sets(labels, ref_labels, same, where, ref_where):
  b, m = len(labels), len(ref_labels)
  if same:
    ref_where = where
  ok_a = lambda a: where is None or where[a]
  ok_r = lambda j: ref_where is None or ref_where[j]
  pos = {a: [j for j in range(m) if ok_r(j) and ref_labels[j] == labels[a]
             and not (same and j == a)] for a in range(b) if ok_a(a)}
  neg = {a: [j for j in range(m) if ok_r(j) and ref_labels[j] != labels[a]]
         for a in range(b) if ok_a(a)}
  return pos, neg


def contrastive_np(d, labels, ref_labels, same, *, pos_margin, neg_margin,
                   reduction="mean_nonzero", where=None, ref_where=None):
  """Two-margin contrastive loss from a [B, M] divergence matrix, by loops."""
  pos, neg = _pair_sets(labels, ref_labels, same, where, ref_where)
  pos_terms = [max(0.0, d[a, j] - pos_margin) for a in pos for j in pos[a]]
  neg_terms = [max(0.0, neg_margin - d[a, j]) for a in neg for j in neg[a]]
  return _reduce_np(pos_terms, reduction) + _reduce_np(neg_terms, reduction)


def triplet_np(d, labels, ref_labels, same, *, margin, mining, reduction="mean_nonzero",
               where=None, ref_where=None):
  """Triplet margin loss with the four minings from a divergence matrix."""
  pos, neg = _pair_sets(labels, ref_labels, same, where, ref_where)
  h = lambda x: max(0.0, x + margin)
  terms = []
  for a in pos:
    P, N = pos[a], neg[a]
    if mining in ("hard", "easy"):
      if P and N:
        p = max(P, key=lambda j: d[a, j]) if mining == "hard" else min(P, key=lambda j: d[a, j])
        n = min(N, key=lambda j: d[a, j])
        terms.append(h(d[a, p] - d[a, n]))
      continue
    for p in P:
      for n in N:
        if mining == "semihard" and not d[a, p] < d[a, n] < d[a, p] + margin:
          continue
        terms.append(h(d[a, p] - d[a, n]))
  return _reduce_np(terms, reduction)


LOSS_GENERATORS = ["icnn", "itakura_saito_exp"]


@pytest.mark.parametrize("name", LOSS_GENERATORS)
@pytest.mark.parametrize("with_ref", [False, True])
def test_contrastive_matches_loop_reference(name, with_ref):
  phi = GENERATORS[name][0]
  emb = random_embeddings(11, 12, D)
  labels = label_layouts(12)["with_singletons"]
  where = np.arange(12) < 10
  ref = random_embeddings(12, 9, D) if with_ref else None
  ref_labels = np.array([0, 1, 1, 2, 3, 4, 0, 7, 2]) if with_ref else None
  d = brute_force(name, emb, ref if with_ref else emb)
  # Moderate margins relative to the divergences' scale.
  neg_margin = float(np.median(d))
  pos_margin = 0.1 * neg_margin
  for reduction in ("mean_nonzero", "mean", "sum"):
    got = mj.losses.contrastive_loss(emb, labels, ref, ref_labels, pos_margin=pos_margin,
                                     neg_margin=neg_margin, distance=bregman.as_distance(phi),
                                     reduction=reduction, where=where)
    want = contrastive_np(d, labels, ref_labels if with_ref else labels, not with_ref,
                          pos_margin=pos_margin, neg_margin=neg_margin, reduction=reduction,
                          where=where)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOSS_GENERATORS)
@pytest.mark.parametrize("mining", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_triplet_matches_loop_reference(name, mining, with_ref):
  phi = GENERATORS[name][0]
  emb = random_embeddings(21, 12, D)
  labels = label_layouts(12)["m_per_class"]
  ref = random_embeddings(22, 9, D) if with_ref else None
  ref_labels = np.array([0, 0, 1, 1, 2, 3, 3, 3, 1]) if with_ref else None
  where = np.arange(12) != 4
  d = brute_force(name, emb, ref if with_ref else emb)
  margin = float(np.median(d))
  got = mj.losses.triplet_margin_loss(emb, labels, ref, ref_labels, margin=margin, mining=mining,
                                      distance=bregman.as_distance(phi), where=where)
  want = triplet_np(d, labels, ref_labels if with_ref else labels, not with_ref, margin=margin,
                    mining=mining, where=where)
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_loss_uses_anchor_first_divergence():
  """Swapping the divergence's arguments changes the loss: the loss must
  equal the anchor-first reference, not the transposed one."""
  name = "itakura_saito_exp"
  emb = random_embeddings(31, 12, D)
  ref = random_embeddings(32, 9, D)
  labels = label_layouts(12)["m_per_class"]
  ref_labels = np.array([0, 0, 1, 1, 2, 3, 3, 3, 1])
  d = brute_force(name, emb, ref)
  d_t = brute_force(name, ref, emb).T
  got = mj.losses.triplet_margin_loss(emb, labels, ref, ref_labels, margin=1.0,
                                      distance=bregman.as_distance(GENERATORS[name][0]))
  want = triplet_np(d, labels, ref_labels, False, margin=1.0, mining="all")
  wrong = triplet_np(d_t, labels, ref_labels, False, margin=1.0, mining="all")
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert abs(want - wrong) > 1e-3


def test_loss_contract_with_learned_bregman():
  """jit == eager, vmap, numerical gradients, duplicates, masks with NaN
  padding, half precision, with a one-layer input-convex generator (plain
  jnp, so the many eager calls of the contract stay cheap; the Flax
  generators are covered jitted above and below)."""
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=(D, 8)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
  a = jnp.asarray(np.abs(rng.normal(size=(8,))), jnp.float32)   # >= 0: convex

  def phi(z):
    return jnp.dot(jax.nn.softplus(z @ w + b), a) + 0.05 * jnp.sum(z * z)

  dist = bregman.as_distance(phi)
  fn = lambda e, l, **kw: mj.losses.contrastive_loss(e, l, neg_margin=0.3, distance=dist, **kw)
  check_loss_contract(fn, d=D, zero_without_positives=False)


def test_where_padding_with_unmapped_positive_domain():
  """Padded rows are zeroed by pairs.prepare: outside the IS domain, yet the
  eager check exempts them and the clamp keeps gradients finite."""
  emb = _inputs("positive", 12, 41)
  labels = label_layouts(12)["m_per_class"]
  where = np.arange(12) < 9
  dist = bregman.as_distance(bregman.itakura_saito())
  loss = lambda e: mj.losses.triplet_margin_loss(e, labels, margin=0.5, distance=dist, where=where)
  padded = emb.copy()
  padded[9:] = np.nan
  val = loss(padded)   # eager: the host domain check runs and skips the zero rows
  want = jax.jit(lambda e: mj.losses.triplet_margin_loss(e, labels[:9], margin=0.5,
                                                         distance=dist))(emb[:9])
  np.testing.assert_allclose(val, want, rtol=1e-5)
  val_j, grad_j = jax.jit(jax.value_and_grad(loss))(padded)
  np.testing.assert_allclose(val_j, want, rtol=1e-5)
  assert np.all(np.isfinite(grad_j)) and np.all(np.asarray(grad_j)[9:] == 0)
  assert float(jnp.abs(grad_j).max()) > 0


# ----------------------------------------------------------------------------
# Gradients reach the generator's parameters.


def _loss_grads(module, params, emb, labels, loss):
  def fn(p):
    dist = bregman.as_distance(lambda z: module.apply(p, z))
    if loss == "contrastive":
      return mj.losses.contrastive_loss(emb, labels, neg_margin=0.5, distance=dist)
    return mj.losses.triplet_margin_loss(emb, labels, margin=0.5, distance=dist)
  return jax.value_and_grad(fn)(params)


@pytest.mark.parametrize("kind", LEARNED)
@pytest.mark.parametrize("loss", ["contrastive", "triplet"])
def test_gradients_flow_to_generator_params(kind, loss):
  module, params = _MODULES[kind]
  emb = jnp.asarray(random_embeddings(51, 12, D))
  labels = jnp.asarray(label_layouts(12)["m_per_class"])
  val, grads = jax.jit(lambda p: _loss_grads(module, p, emb, labels, loss))(params)
  leaves = jax.tree.leaves(grads)
  assert float(val) > 0
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  # Each parameter array receives some gradient (the raw non-negative kernels too).
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, path


def test_mahalanobis_factor_gets_gradient():
  emb = jnp.asarray(random_embeddings(52, 12, D))
  labels = jnp.asarray(label_layouts(12)["m_per_class"])

  def fn(L):
    dist = bregman.as_distance(bregman.mahalanobis(L))
    return mj.losses.triplet_margin_loss(emb, labels, margin=1.0, distance=dist)
  g = jax.jit(jax.grad(fn))(jnp.eye(D))
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0


def test_init_and_distance_from_params_train_jointly():
  """The pipeline pattern: generator params as loss params, a few optax steps
  on embeddings + generator lower the loss and keep phi convex."""
  kw = dict(generator="icnn", hidden_features=(8, 8))
  loss_params = bregman.init_bregman(jax.random.key(0), 4, D, **kw)
  assert set(loss_params) == {"phi_params"}
  emb = jnp.asarray(random_embeddings(61, 12, D))
  labels = jnp.asarray(label_layouts(12)["m_per_class"])

  def loss_fn(params):
    dist = bregman.bregman_distance_from_params(params["loss"]["phi_params"], **kw)
    return mj.losses.triplet_margin_loss(params["emb"], labels, margin=0.5, distance=dist)

  params = {"emb": emb, "loss": loss_params}
  opt = optax.adam(3e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    val, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, val

  first = None
  for _ in range(15):
    params, state, val = step(params, state)
    first = val if first is None else first
  assert float(loss_fn(params)) < 0.8 * float(first)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params["loss"], loss_params)
  assert all(v > 0 for v in jax.tree.leaves(moved))
  # The trained divergence is still non-negative on fresh points.
  dist = bregman.bregman_distance_from_params(params["loss"]["phi_params"], **kw)
  x = random_embeddings(62, 8, D)
  raw_min = float(np.min(np.asarray(dist(x, random_embeddings(63, 6, D)))))
  assert raw_min >= 0


@pytest.mark.parametrize("generator", ["icnn", "max_affine", "soft_max_affine", "mahalanobis"])
def test_init_bregman_every_generator(generator):
  p = bregman.init_bregman(jax.random.key(1), None, D, generator=generator)
  dist = bregman.bregman_distance_from_params(p["phi_params"], generator=generator)
  x = random_embeddings(3, 4, D)
  sim = bregman.bregman_distance_from_params(p["phi_params"], generator=generator,
                                             similarity=True, scale=2.0)
  d, s = jax.jit(lambda a: (dist(a, a), sim(a, a)))(x)
  assert d.shape == (4, 4) and np.all(np.diag(d) == 0) and np.all(np.asarray(d) >= 0)
  assert np.asarray(d).max() > 0
  assert sim.is_similarity and not dist.is_similarity
  np.testing.assert_allclose(s, -2.0 * np.asarray(d), rtol=1e-6)
  if generator == "mahalanobis":  # identity init = squared Euclidean
    np.testing.assert_allclose(d, mj.distances.pairwise(x, None, "squared_euclidean"),
                               rtol=1e-5, atol=1e-5)
    low = bregman.init_bregman(jax.random.key(1), None, D, generator=generator, rank=2)
    assert low["phi_params"]["L"].shape == (D, 2)


# ----------------------------------------------------------------------------
# Other losses: a Bregman distance plugs into every distance / similarity loss.

DISTANCE_LOSSES = {
    "lifted_structure_loss": {},
    "generalized_lifted_structure_loss": {},
    "quadruplet_loss": {},
    "nca_loss": {},
}
SIMILARITY_LOSSES = {
    "npair_loss": {},
    "ntxent_loss": {"temperature": 0.5},
    "supcon_loss": {"temperature": 0.5},
    "multi_similarity_loss": {},
}


def _loss_or_skip(name):
  if not hasattr(mj.losses, name):
    pytest.skip(f"mj.losses.{name} does not exist (yet)")
  return getattr(mj.losses, name)


@pytest.mark.parametrize("name", list(DISTANCE_LOSSES))
def test_distance_losses_accept_bregman(name):
  loss = _loss_or_skip(name)
  kw = DISTANCE_LOSSES[name]
  emb = jnp.asarray(random_embeddings(71, 12, D, scale=0.5))
  labels = jnp.asarray(label_layouts(12)["m_per_class"])
  # ||x||^2 generates the squared Euclidean distance: same loss.
  got, want = jax.jit(lambda e: (
      loss(e, labels, distance=bregman.as_distance(bregman.squared_norm), **kw),
      loss(e, labels, distance="squared_euclidean", **kw)))(emb)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if name != "lifted_structure_loss":
    return   # gradients to a learned generator: one distance loss is enough
  module, params = _MODULES["icnn"]
  g = jax.jit(jax.grad(lambda p: loss(emb, labels, distance=bregman.as_distance(
      lambda z: module.apply(p, z)), **kw)))(params)
  leaves = jax.tree.leaves(g)
  assert all(np.all(np.isfinite(x)) for x in leaves)
  assert sum(float(jnp.abs(x).sum()) for x in leaves) > 0


@pytest.mark.parametrize("name", list(SIMILARITY_LOSSES))
def test_similarity_losses_accept_bregman(name):
  loss = _loss_or_skip(name)
  kw = SIMILARITY_LOSSES[name]
  emb = jnp.asarray(random_embeddings(72, 12, D, scale=0.5))
  labels = jnp.asarray(np.repeat(np.arange(6), 2))
  scale = 0.7
  manual = mj.distances.custom(
      lambda x, y: -scale * 0.5 * mj.distances.pairwise(x, y, "squared_euclidean"),
      is_similarity=True)
  got, want = jax.jit(lambda e: (
      loss(e, labels, distance=bregman.as_similarity(bregman.half_squared_norm, scale), **kw),
      loss(e, labels, distance=manual, **kw)))(emb)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if name != "ntxent_loss":
    return   # gradients to a learned generator: one similarity loss is enough
  module, params = _MODULES["icnn"]
  g = jax.jit(jax.grad(lambda p: loss(emb, labels, distance=bregman.as_similarity(
      lambda z: module.apply(p, z)), **kw)))(params)
  leaves = jax.tree.leaves(g)
  assert all(np.all(np.isfinite(x)) for x in leaves)
  assert sum(float(jnp.abs(x).sum()) for x in leaves) > 0


def test_as_similarity_is_negated_scaled_divergence():
  x = random_embeddings(81, 4, D)
  y = random_embeddings(82, 3, D)
  sim = bregman.as_similarity(bregman.squared_norm, scale=2.5)
  assert sim.is_similarity is True
  assert mj.distances.is_similarity(sim) and not mj.distances.is_similarity(
      bregman.as_distance(bregman.squared_norm))
  np.testing.assert_allclose(sim(x, y), -2.5 * np.asarray(bregman.pairwise(bregman.squared_norm, x, y)),
                             rtol=1e-6)


# ----------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs():
  x = random_embeddings(0, 4, D)
  with pytest.raises(TypeError, match="phi"):
    bregman.pairwise("squared_norm", x)
  with pytest.raises(TypeError, match="phi"):
    bregman.as_distance(None)
  with pytest.raises(ValueError, match="phi"):
    bregman.pairwise(lambda z: z * 2.0, x)          # not scalar-valued
  with pytest.raises(ValueError, match="`x`"):
    bregman.pairwise(bregman.squared_norm, x[0])     # rank 1
  with pytest.raises(TypeError, match="`x`"):
    bregman.pairwise(bregman.squared_norm, np.ones((3, D), np.int32))
  with pytest.raises(ValueError, match="embedding size"):
    bregman.pairwise(bregman.squared_norm, x, random_embeddings(1, 3, D + 1))
  with pytest.raises(ValueError, match="`x`"):
    bregman.divergence(bregman.squared_norm, np.float32(1.0), x[0])
  with pytest.raises(ValueError, match="embedding size"):
    bregman.divergence(bregman.squared_norm, x[0], np.ones(D + 1, np.float32))
  # Mahalanobis factor.
  with pytest.raises(ValueError, match="`L`"):
    bregman.mahalanobis(np.ones(D, np.float32))
  with pytest.raises(TypeError, match="`L`"):
    bregman.mahalanobis(np.ones((D, D), np.int32))
  with pytest.raises(ValueError, match=f"size {D}"):
    bregman.pairwise(bregman.mahalanobis(_L_FULL), random_embeddings(0, 4, D + 2))
  # Maps and domains.
  with pytest.raises(ValueError, match="input_map"):
    bregman.itakura_saito("softmax")
  with pytest.raises(ValueError, match="input_map"):
    bregman.negative_entropy("exp")
  with pytest.raises(ValueError, match="domain"):
    bregman.negative_entropy(domain="real")
  with pytest.raises(ValueError, match="floor"):
    bregman.itakura_saito(floor=-1.0)
  # Learned-generator helpers.
  with pytest.raises(ValueError, match="generator"):
    bregman.init_bregman(jax.random.key(0), 3, D, generator="relu_net")
  with pytest.raises(ValueError, match="embedding_dim"):
    bregman.init_bregman(jax.random.key(0), 3, 0)
  with pytest.raises(TypeError, match="rank"):
    bregman.init_bregman(jax.random.key(0), 3, D, generator="icnn", rank=2)
  with pytest.raises(TypeError, match="icnn"):
    bregman.init_bregman(jax.random.key(0), 3, D, generator="icnn", num_pieces=3)
  with pytest.raises(ValueError, match="phi_params"):
    bregman.bregman_distance_from_params({"W": 1.0}, generator="mahalanobis")
  with pytest.raises(ValueError, match="scale"):
    bregman.as_similarity(bregman.squared_norm, scale=0.0)


def test_domain_violations_raise_when_concrete_and_are_clamped_when_traced():
  pos = _inputs("positive", 4, 1)
  neg = pos.copy()
  neg[1, 2] = -0.5
  is_phi = bregman.itakura_saito()
  with pytest.raises(ValueError, match="`x`.*positive"):
    bregman.pairwise(is_phi, neg, pos)
  with pytest.raises(ValueError, match="`y`.*positive"):
    bregman.pairwise(is_phi, pos, neg)
  with pytest.raises(ValueError, match="`x`.*positive"):
    bregman.divergence(is_phi, neg[1], pos[0])
  zero = pos.copy()
  zero[0, 0] = 0.0
  with pytest.raises(ValueError, match="positive"):
    bregman.pairwise(is_phi, zero)
  with pytest.raises(ValueError, match="positive"):   # a loss in eager mode
    mj.losses.triplet_margin_loss(neg, np.array([0, 0, 1, 1]), distance=bregman.as_distance(is_phi))
  kl = bregman.negative_entropy()
  simplex = _inputs("simplex", 4, 2)
  with pytest.raises(ValueError, match="simplex"):
    bregman.pairwise(kl, simplex * 1.5)
  with pytest.raises(ValueError, match="non-negative"):
    bregman.pairwise(kl, simplex - 0.3)
  # The generalised-KL domain accepts any non-negative rows.
  assert np.all(np.isfinite(bregman.pairwise(bregman.negative_entropy(domain="nonnegative"),
                                             simplex * 1.5)))
  # With a map, real inputs are fine.
  assert np.all(np.isfinite(bregman.pairwise(bregman.itakura_saito("softplus"), neg)))
  # Traced: no check, entries clamped at the floor: finite values and gradients.
  d, g = jax.jit(jax.value_and_grad(lambda a: jnp.sum(bregman.pairwise(is_phi, a, pos))))(neg)
  assert np.isfinite(d) and np.all(np.isfinite(g))
  # NaN is not hidden (and not reported as a domain error).
  nan = pos.copy()
  nan[0, 0] = np.nan
  assert np.isnan(np.asarray(bregman.pairwise(is_phi, nan, pos))[0]).all()
