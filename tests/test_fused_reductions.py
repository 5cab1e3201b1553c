"""The one-pass reductions (``reductions.fused_sums``, ``fused_maxima``,
``masked_logsumexps``) and every loss that reduces through them.

Operands below ``reductions.FUSE_MIN_SIZE`` entries take the plain
per-array path, so the small batches of the loss tests never reach the
variadic reductions. Here the threshold is set to 0 (``fused`` fixture) and
each result is compared with the plain path, which the loss tests check
against their loop references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from metric_jax import reductions
from tests.helpers import label_layouts, random_embeddings


@pytest.fixture
def fused(monkeypatch):
  monkeypatch.setattr(reductions, "FUSE_MIN_SIZE", 0)


def _plain(monkeypatch):
  monkeypatch.setattr(reductions, "FUSE_MIN_SIZE", 1 << 62)


def _arrays(seed=0, shape=(6, 7), n=3):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape).astype(np.float32)) for _ in range(n)]


# --- fused_sums ------------------------------------------------------------

@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("shape", [(6, 7), (3, 4, 5)])
def test_fused_sums_equal_separate_sums(fused, axis, shape):
  del fused
  arrays = _arrays(shape=shape)
  got = reductions.fused_sums(arrays, axis=axis)
  for g, a in zip(got, arrays):
    np.testing.assert_allclose(g, np.sum(np.asarray(a, np.float64), axis=axis),
                               rtol=1e-5, atol=1e-5)


def test_fused_sums_gradients_jvp_vmap_jit(fused):
  del fused
  a, b = _arrays(n=2)

  def f(a, b):
    s1, s2 = reductions.fused_sums([a * a, jnp.sin(b) * a], axis=-1)
    return jnp.sum(s1 * s2)

  def ref(a, b):
    return jnp.sum(jnp.sum(a * a, -1) * jnp.sum(jnp.sin(b) * a, -1))

  for got, want in zip(jax.grad(f, (0, 1))(a, b), jax.grad(ref, (0, 1))(a, b)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  _, tangent = jax.jvp(f, (a, b), (b, a))
  _, tangent_ref = jax.jvp(ref, (a, b), (b, a))
  np.testing.assert_allclose(tangent, tangent_ref, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(f)(a, b), ref(a, b), rtol=1e-5)
  stacked = jnp.stack([a, b])
  np.testing.assert_allclose(jax.vmap(lambda x: f(x, b))(stacked),
                             jnp.stack([ref(a, b), ref(b, b)]), rtol=1e-5)
  hessian_vector = jax.jvp(jax.grad(f), (a, b), (b, jnp.zeros_like(b)))[1]
  hessian_vector_ref = jax.jvp(jax.grad(ref), (a, b), (b, jnp.zeros_like(b)))[1]
  np.testing.assert_allclose(hessian_vector, hessian_vector_ref, rtol=1e-4, atol=1e-5)


def test_fused_sums_compiles_one_reduction(fused):
  del fused
  a, b, c = _arrays()
  hlo = jax.jit(lambda a, b, c: reductions.fused_sums([a, b * 2, jnp.exp(c)], axis=-1)
                ).lower(a, b, c).as_text()
  assert hlo.count("stablehlo.reduce") == 1


def test_fused_sums_nan_and_dtypes(fused):
  del fused
  a, b = _arrays(n=2)
  a = a.at[2, 3].set(jnp.nan)
  s_a, s_b = reductions.fused_sums([a, b], axis=1)
  assert np.isnan(s_a[2]) and np.isfinite(np.delete(np.asarray(s_a), 2)).all()
  assert np.isfinite(s_b).all()
  half, mask = reductions.fused_sums([b.astype(jnp.bfloat16), b > 0])
  assert half.dtype == jnp.bfloat16
  assert mask.dtype == jnp.bfloat16 and float(mask) == float(np.sum(np.asarray(b) > 0))
  (count,) = reductions.fused_sums([b > 0])
  assert count.dtype == jnp.float32


def test_fused_sums_small_operands_take_plain_sums():
  a, b = _arrays(n=2)
  hlo = jax.jit(lambda a, b: reductions.fused_sums([a, b])).lower(a, b).as_text()
  assert hlo.count("stablehlo.reduce") == 2


@pytest.mark.parametrize("axis,want", [(-1, 1), (1, 1), (None, 2), (0, 3)])
def test_fused_sums_fuse_along_rows_only(fused, axis, want):
  # Rows (or all axes: rows, then the rest) in one variadic pass; column
  # reductions stay separate sums, which XLA:CPU vectorises.
  del fused
  a, b, c = _arrays()
  hlo = jax.jit(lambda a, b, c: reductions.fused_sums([a, b, c], axis=axis)
                ).lower(a, b, c).as_text()
  assert hlo.count("stablehlo.reduce") == want
  hlo = jax.jit(lambda a, b, c: reductions.fused_maxima([a, b, c], axis=axis)
                ).lower(a, b, c).as_text()
  assert hlo.count("stablehlo.reduce") == (3 if axis == 0 else 1)


def test_fused_sums_bad_input():
  with pytest.raises(ValueError, match="arrays"):
    reductions.fused_sums([])
  with pytest.raises(ValueError, match="one shape"):
    reductions.fused_sums([jnp.ones((2, 3)), jnp.ones((3, 2))])


# --- fused_maxima and masked_logsumexps ------------------------------------

@pytest.mark.parametrize("axis", [None, 0, -1])
def test_fused_maxima_equal_separate_maxima(fused, axis):
  del fused
  arrays = _arrays()
  arrays[1] = arrays[1].at[1, 1].set(jnp.nan)
  for got, a in zip(reductions.fused_maxima(arrays, axis=axis), arrays):
    np.testing.assert_array_equal(got, jnp.max(a, axis=axis))


def _masks(seed, shape):
  rng = np.random.default_rng(seed)
  masks = [rng.random(shape) < p for p in (0.5, 0.2)]
  masks[0][0] = False                    # an empty row
  masks[1][:, 0] = False                 # an empty column
  return [jnp.asarray(m) for m in masks]


@pytest.mark.parametrize("include_zero", [False, True])
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("shared_x", [True, False])
def test_masked_logsumexps_equal_one_by_one(monkeypatch, include_zero, axis, shared_x):
  xs = [3.0 * a for a in _arrays(n=2)]
  masks = _masks(1, xs[0].shape)
  x_arg = xs[0] if shared_x else xs
  per_mask = [xs[0]] * 2 if shared_x else xs

  def fused_total(*xs_in):
    lses, _ = reductions.masked_logsumexps(list(xs_in) if not shared_x else xs_in[0], masks,
                                           axis=axis, include_zero=include_zero)
    return sum(jnp.sum(jnp.sin(l)) for l in lses)

  def plain_total(*xs_in):
    xs_in = [xs_in[0]] * 2 if shared_x else xs_in
    return sum(jnp.sum(jnp.sin(reductions.masked_logsumexp(
        x, m, axis=axis, include_zero=include_zero)[0])) for x, m in zip(xs_in, masks))

  args = (xs[0],) if shared_x else tuple(xs)
  _plain(monkeypatch)
  want_lses = [reductions.masked_logsumexp(x, m, axis=axis, include_zero=include_zero)
               for x, m in zip(per_mask, masks)]
  want_grad = jax.grad(plain_total, range(len(args)))(*args)
  monkeypatch.setattr(reductions, "FUSE_MIN_SIZE", 0)
  lses, nonempty = reductions.masked_logsumexps(x_arg, masks, axis=axis,
                                                include_zero=include_zero)
  for got, got_any, (want, want_any) in zip(lses, nonempty, want_lses):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_any, want_any)
  for got, want in zip(jax.grad(fused_total, range(len(args)))(*args), want_grad):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all()


def test_masked_logsumexps_nan_and_bad_input(fused):
  del fused
  x = _arrays(n=1)[0].at[2, 2].set(jnp.nan)
  masks = _masks(2, x.shape)
  masks[0] = masks[0].at[2, 2].set(True)
  masks[1] = masks[1].at[2, 2].set(False)
  (lse_a, lse_b), _ = reductions.masked_logsumexps(x, masks)
  assert np.isnan(lse_a[2])
  assert np.isfinite(np.asarray(lse_b)).all()
  with pytest.raises(ValueError, match="one array per mask"):
    reductions.masked_logsumexps([x], masks)


# --- every loss that reduces through them ----------------------------------

_C = 5


def _proxy(init, **kwargs):
  params = init(jax.random.key(3), _C, 5)
  (name, value), = params.items()
  return lambda e, y, **kw: kwargs["loss"](e, y % _C, **{name: value}, **kw)


LOSSES = {
    "contrastive": mj.losses.contrastive_loss,
    "contrastive_mean": lambda e, y, **kw: mj.losses.contrastive_loss(e, y, reduction="mean",
                                                                       **kw),
    "nca": mj.losses.nca_loss,
    "circle": lambda e, y, **kw: mj.losses.circle_loss(e, y, distance="cosine", **kw),
    "multi_similarity": lambda e, y, **kw: mj.losses.multi_similarity_loss(
        e, y, distance="cosine", **kw),
    "supcon": mj.losses.supcon_loss,
    "ntxent": mj.losses.ntxent_loss,
    "intra_pair_variance": mj.losses.intra_pair_variance_loss,
    "tuplet_margin": mj.losses.tuplet_margin_loss,
    "generalized_lifted": mj.losses.generalized_lifted_structure_loss,
    "triplet_batch_all": mj.losses.triplet_margin_loss,
    "snr_contrastive": mj.losses.snr_contrastive_loss,
    "margin": mj.losses.margin_loss,
    "ranked_list": mj.losses.ranked_list_loss,
    "ranked_list_pml": lambda e, y, **kw: mj.losses.ranked_list_loss(e, y, pml_compat=True,
                                                                      **kw),
    "instance": lambda e, y, **kw: mj.losses.instance_loss(e, y, distance="cosine", **kw),
    "proxy_anchor": _proxy(mj.losses.init_proxy_anchor, loss=mj.losses.proxy_anchor_loss),
    "proxy_nca": _proxy(mj.losses.init_proxy_nca, loss=mj.losses.proxy_nca_loss),
    "normalized_softmax": _proxy(mj.losses.init_normalized_softmax,
                                 loss=mj.losses.normalized_softmax_loss),
    "cosface": _proxy(mj.losses.init_cosface, loss=mj.losses.cosface_loss),
}


@pytest.mark.parametrize("layout", sorted(label_layouts()))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_is_unchanged_by_the_fused_path(monkeypatch, name, layout):
  loss = LOSSES[name]
  emb = jnp.asarray(random_embeddings(7, b=12))
  labels = jnp.asarray(label_layouts()[layout])
  where = jnp.ones(12, bool).at[5].set(False)

  def value_and_grad():
    results = []
    for kwargs in ({}, {"where": where}):
      fn = lambda e: loss(e, labels, **kwargs)  # noqa: E731  fresh trace each call
      results.append(jax.value_and_grad(fn)(emb))
    return results

  _plain(monkeypatch)
  want = value_and_grad()
  monkeypatch.setattr(reductions, "FUSE_MIN_SIZE", 0)
  got = value_and_grad()
  for (value, grad), (want_value, want_grad) in zip(got, want):
    np.testing.assert_allclose(value, want_value, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-4, atol=1e-6)
    assert np.isfinite(value) and np.isfinite(grad).all()


@pytest.mark.parametrize("name", ["contrastive", "nca", "circle", "multi_similarity", "supcon"])
def test_fused_path_keeps_nan_visible(fused, name):
  del fused
  emb = jnp.asarray(random_embeddings(8, b=12)).at[4, 1].set(jnp.nan)
  labels = jnp.asarray(label_layouts()["m_per_class"])
  assert np.isnan(LOSSES[name](emb, labels))
