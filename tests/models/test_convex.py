"""metric_jax.models.convex: forward passes vs NumPy, convexity (midpoint and
Hessian) after random initialisation and after optax training on a
non-convex target, shapes, jit/vmap/grad and bad attributes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metric_jax.models.convex import ICNN, MaxAffine, SoftMaxAffine

D = 3


def _np_softplus(x):
  return np.logaddexp(0.0, x)


MODULES = {
    "icnn": ICNN(hidden_features=(16, 16, 8), eps=1e-3),
    "max_affine": MaxAffine(num_pieces=8, eps=1e-3),
    "soft_max_affine": SoftMaxAffine(num_pieces=8, temperature=0.3, eps=1e-3),
}


class _UnconstrainedMLP(nn.Module):
  """Control: a softplus MLP with signed weights (not convex)."""

  @nn.compact
  def __call__(self, x):
    h = jax.nn.softplus(nn.Dense(16)(x))
    h = jax.nn.softplus(nn.Dense(16)(h))
    return nn.Dense(1)(h)[..., 0]


def _pairs(seed, n=256, scale=2.0):
  rng = np.random.default_rng(seed)
  a = (rng.normal(size=(n, D)) * scale).astype(np.float32)
  b = (rng.normal(size=(n, D)) * scale).astype(np.float32)
  return a, b


def midpoint_gap(module, params, a, b, eps):
  """(phi(a) + phi(b))/2 - eps/8 ||a - b||^2 - phi((a + b)/2): >= 0 for an
  eps-strongly convex phi."""
  phi = jax.jit(lambda z: module.apply(params, z))
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  m = ((a64 + b64) / 2).astype(np.float32)
  fa, fb, fm = (np.asarray(phi(v), np.float64) for v in (a, b, m))
  return (fa + fb) / 2 - eps / 8 * np.sum((a64 - b64) ** 2, -1) - fm, np.abs(fa) + np.abs(fb)


def assert_convex(module, params, seed, eps):
  a, b = _pairs(seed)
  gap, size = midpoint_gap(module, params, a, b, eps)
  tol = 1e-5 * (1 + size)
  assert np.all(gap >= -tol), f"midpoint inequality violated by {(-gap / (1 + size)).max()}"


# ----------------------------------------------------------------------------
# Forward passes vs NumPy.


def test_icnn_matches_numpy_forward():
  module = MODULES["icnn"]
  params = module.init(jax.random.key(0), jnp.zeros(D))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["params"]
  x = np.random.default_rng(1).normal(size=(5, D))
  want = []
  for v in x:
    z = _np_softplus(v @ p["x_0"]["kernel"] + p["x_0"]["bias"])
    for k in (1, 2):
      w = _np_softplus(p[f"z_{k}"]["raw_kernel"])
      assert np.all(w > 0)
      z = _np_softplus(z @ w + v @ p[f"x_{k}"]["kernel"] + p[f"x_{k}"]["bias"])
    out = (z @ _np_softplus(p["z_out"]["raw_kernel"]))[0]
    out += (v @ p["x_out"]["kernel"] + p["x_out"]["bias"])[0]
    want.append(out + 0.5 * 1e-3 * v @ v)
  got = module.apply(params, x.astype(np.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["max_affine", "soft_max_affine"])
def test_max_affine_matches_numpy_forward(kind):
  module = MODULES[kind]
  params = module.init(jax.random.key(2), jnp.zeros(D))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["params"]["pieces"]
  x = np.random.default_rng(3).normal(size=(6, D))
  aff = x @ p["kernel"] + p["bias"]
  if kind == "max_affine":
    want = aff.max(-1)
  else:
    t = module.temperature
    want = t * np.log(np.sum(np.exp(aff / t), -1))
  want = want + 0.5 * 1e-3 * np.sum(x * x, -1)
  np.testing.assert_allclose(module.apply(params, x.astype(np.float32)), want, rtol=1e-5,
                             atol=1e-6)


def test_soft_max_affine_bounds_and_limit():
  soft = SoftMaxAffine(num_pieces=8, temperature=0.3, eps=0.0)
  hard = MaxAffine(num_pieces=8, eps=0.0)
  params = soft.init(jax.random.key(4), jnp.zeros(D))   # same parameter tree
  x = np.random.default_rng(5).normal(size=(20, D)).astype(np.float32)
  fs, fh = np.asarray(soft.apply(params, x)), np.asarray(hard.apply(params, x))
  assert np.all(fs >= fh - 1e-6) and np.all(fs <= fh + 0.3 * np.log(8) + 1e-6)
  colder = SoftMaxAffine(num_pieces=8, temperature=1e-3, eps=0.0).apply(params, x)
  np.testing.assert_allclose(colder, fh, atol=1e-3 * np.log(8) + 1e-6)


@pytest.mark.parametrize("kind", list(MODULES))
def test_shapes_and_dtypes(kind):
  module = MODULES[kind]
  params = module.init(jax.random.key(0), jnp.zeros(D))
  assert module.apply(params, jnp.ones(D)).shape == ()
  assert module.apply(params, jnp.ones((5, D))).shape == (5,)
  assert module.apply(params, jnp.ones((2, 5, D))).shape == (2, 5)
  for dt in (jnp.bfloat16, jnp.float16):
    out = module.apply(params, jnp.ones((4, D), dt))
    assert out.dtype == jnp.float32
  # Parameters are float32 and the batched call equals per-row calls.
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  x = np.random.default_rng(0).normal(size=(4, D)).astype(np.float32)
  np.testing.assert_allclose(module.apply(params, x),
                             [module.apply(params, v) for v in x], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Convexity.


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_convex_after_random_initialisation(kind, seed):
  module = MODULES[kind]
  params = module.init(jax.random.key(seed), jnp.zeros(D))
  # Random (not only default-initialised) parameters: perturb every leaf.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
  params = jax.tree.unflatten(tree, [l + jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  assert_convex(module, params, seed, module.eps)


@pytest.mark.parametrize("kind", ["icnn", "soft_max_affine"])
def test_hessian_positive_definite(kind):
  module = MODULES[kind]
  params = module.init(jax.random.key(7), jnp.zeros(D))
  x = np.random.default_rng(8).normal(size=(16, D)).astype(np.float32)
  hess = jax.jit(jax.vmap(jax.hessian(lambda z: module.apply(params, z))))(x)
  eig = np.linalg.eigvalsh(np.asarray(hess, np.float64))
  assert eig.min() >= module.eps - 1e-5
  # Genuine curvature beyond the eps term (second derivatives exist: softplus).
  assert eig.max() > 10 * module.eps


def _train_on_nonconvex_target(module, seed, steps=40):
  """Fits phi to sum(sin(3 x)) + a saddle, a non-convex target, with Adam."""
  params = module.init(jax.random.key(seed), jnp.zeros(D))
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(128, D)) * 1.5, jnp.float32)
  target = jnp.sum(jnp.sin(3 * x), -1) + x[:, 0] * x[:, 1]
  opt = optax.adam(5e-2)

  def loss(p):
    return jnp.mean((module.apply(p, x) - target) ** 2)

  @jax.jit
  def step(p, s):
    val, g = jax.value_and_grad(loss)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, val

  state = opt.init(params)
  first = float(loss(params))
  for _ in range(steps):
    params, state, _ = step(params, state)
  return params, first, float(loss(params))


@pytest.mark.parametrize("kind", list(MODULES))
def test_convex_after_optimisation_steps(kind):
  module = MODULES[kind]
  params, before, after = _train_on_nonconvex_target(module, seed=3)
  assert after < before   # the optimiser did move the parameters usefully
  assert_convex(module, params, seed=11, eps=module.eps)
  if kind == "icnn":
    raw = [v["raw_kernel"] for k, v in params["params"].items() if k.startswith("z_")]
    assert raw and all(np.all(np.asarray(jax.nn.softplus(r)) > 0) for r in raw)


def test_midpoint_check_detects_a_nonconvex_network():
  """The convexity check can fail: an unconstrained MLP trained on the same
  target violates the midpoint inequality."""
  module = _UnconstrainedMLP()
  params, _, _ = _train_on_nonconvex_target(module, seed=3)
  a, b = _pairs(11)
  gap, size = midpoint_gap(module, params, a, b, eps=0.0)
  assert np.any(gap < -1e-3 * (1 + size))


# ----------------------------------------------------------------------------
# jit / vmap / grad, bad attributes.


@pytest.mark.parametrize("kind", list(MODULES))
def test_jit_vmap_grad(kind):
  module = MODULES[kind]
  params = module.init(jax.random.key(0), jnp.zeros(D))
  x = np.random.default_rng(9).normal(size=(6, D)).astype(np.float32)
  eager = module.apply(params, x)
  np.testing.assert_allclose(jax.jit(module.apply)(params, x), eager, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(module.apply, in_axes=(None, 0))(params, x), eager,
                             rtol=1e-6, atol=1e-6)
  g = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x))))(params)
  leaves = jax.tree.leaves(g)
  assert all(np.all(np.isfinite(l)) for l in leaves)
  assert all(float(jnp.abs(l).max()) > 0 for l in leaves)


def test_bad_attributes_and_inputs():
  x = jnp.zeros(D)
  with pytest.raises(ValueError, match="hidden_features"):
    ICNN(hidden_features=()).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="hidden_features"):
    ICNN(hidden_features=(4, 0)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="eps"):
    ICNN(eps=-1.0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="num_pieces"):
    MaxAffine(num_pieces=0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="num_pieces"):
    SoftMaxAffine(num_pieces=-2).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="temperature"):
    SoftMaxAffine(temperature=0.0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="eps"):
    MaxAffine(eps=-0.1).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="`x`"):
    ICNN().init(jax.random.key(0), jnp.float32(1.0))
  with pytest.raises(TypeError, match="`x`"):
    MaxAffine().init(jax.random.key(0), jnp.zeros(D, jnp.int32))
