"""Tests of metric_jax.losses.composition: weighted sums of losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.test_util import check_grads

import metric_jax as mj
from metric_jax.losses import composition
from tests.helpers import label_layouts, np_pairwise, random_embeddings

LOSSES = mj.losses


def _inputs(seed=0, b=12, d=5):
  emb = jnp.asarray(random_embeddings(seed, b, d))
  labels = jnp.asarray(label_layouts(b)["m_per_class"])
  return emb, labels


def _np_contrastive(emb, labels, pos_margin=0.0, neg_margin=1.0):
  """PML two-margin contrastive, mean over non-zero terms of each part."""
  d = np_pairwise(emb, emb)
  pos, neg = [], []
  for i in range(len(emb)):
    for j in range(len(emb)):
      if i == j:
        continue
      if labels[i] == labels[j]:
        pos.append(max(d[i, j] - pos_margin, 0.0))
      else:
        neg.append(max(neg_margin - d[i, j], 0.0))

  def mean_nonzero(v):
    nz = [x for x in v if x > 0]
    return sum(nz) / max(len(nz), 1)

  return mean_nonzero(pos) + mean_nonzero(neg)


def _np_lp(emb):
  """Mean L2 norm of the rows."""
  return float(np.mean([np.sqrt(np.sum(np.asarray(e, np.float64) ** 2)) for e in emb]))


def test_numpy_reference_weighted_sum():
  emb, labels = _inputs(1)
  obj = LOSSES.make_objective([
      LOSSES.LossTerm("contrastive_loss", weight=2.0, kwargs={"neg_margin": 1.5}),
      LOSSES.LossTerm("lp_regularizer", weight=0.1),
  ])
  total, terms = obj(emb, labels)
  c = _np_contrastive(np.asarray(emb), np.asarray(labels), 0.0, 1.5)
  r = _np_lp(np.asarray(emb))
  np.testing.assert_allclose(float(terms["contrastive_loss"]), c, rtol=1e-5)
  np.testing.assert_allclose(float(terms["lp_regularizer"]), r, rtol=1e-5)
  np.testing.assert_allclose(float(total), 2.0 * c + 0.1 * r, rtol=1e-5)
  assert total.dtype == jnp.float32 and total.shape == ()


def test_terms_equal_direct_calls_and_total_is_weighted():
  emb, labels = _inputs(2)
  obj = LOSSES.make_objective([
      LOSSES.LossTerm("contrastive_loss"),
      LOSSES.LossTerm("triplet_margin_loss", weight=0.5,
                      kwargs={"margin": 0.3, "mining": "semihard"}),
      LOSSES.LossTerm("zero_mean_regularizer", weight=0.01),
  ])
  total, terms = obj(emb, labels)
  direct = {
      "contrastive_loss": LOSSES.contrastive_loss(emb, labels),
      "triplet_margin_loss": LOSSES.triplet_margin_loss(emb, labels, margin=0.3,
                                                        mining="semihard"),
      "zero_mean_regularizer": LOSSES.zero_mean_regularizer(emb, labels),
  }
  assert set(terms) == set(direct)
  for k, v in direct.items():
    np.testing.assert_allclose(float(terms[k]), float(v), rtol=1e-6)
  expected = (float(direct["contrastive_loss"]) + 0.5 * float(direct["triplet_margin_loss"])
              + 0.01 * float(direct["zero_mean_regularizer"]))
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  assert obj.weights == {"contrastive_loss": 1.0, "triplet_margin_loss": 0.5,
                         "zero_mean_regularizer": 0.01}


def test_gradient_is_weighted_sum_of_gradients():
  emb, labels = _inputs(3)
  obj = LOSSES.make_objective([
      LOSSES.LossTerm("contrastive_loss", weight=0.7),
      LOSSES.LossTerm("lp_regularizer", weight=0.2),
  ])
  g = jax.jit(jax.grad(lambda e: obj(e, labels)[0]))(emb)
  g_c = jax.jit(jax.grad(lambda e: LOSSES.contrastive_loss(e, labels)))(emb)
  g_r = jax.jit(jax.grad(lambda e: LOSSES.lp_regularizer(e, labels)))(emb)
  np.testing.assert_allclose(np.asarray(g), 0.7 * np.asarray(g_c) + 0.2 * np.asarray(g_r),
                             rtol=1e-5, atol=1e-7)
  check_grads(jax.jit(lambda e: obj(e, labels)[0]), (emb,), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2)


def test_jit_matches_eager():
  emb, labels = _inputs(4)
  obj = LOSSES.make_objective(["contrastive_loss", "triplet_margin_loss"])
  eager = obj(emb, labels)
  jitted = jax.jit(lambda e, l: obj(e, l))(emb, labels)
  np.testing.assert_allclose(float(eager[0]), float(jitted[0]), rtol=1e-6)
  for k in eager[1]:
    np.testing.assert_allclose(float(eager[1][k]), float(jitted[1][k]), rtol=1e-6)


def test_where_is_forwarded_to_every_term():
  emb, labels = _inputs(5)
  where = jnp.arange(12) < 9
  emb = emb.at[9:].set(jnp.nan)   # padding rows must not leak
  obj = LOSSES.make_objective(["contrastive_loss", "lp_regularizer"])
  total, terms = obj(emb, labels, where=where)
  assert np.isfinite(float(total))
  np.testing.assert_allclose(
      float(terms["contrastive_loss"]),
      float(LOSSES.contrastive_loss(emb, labels, where=where)), rtol=1e-6)
  np.testing.assert_allclose(
      float(terms["lp_regularizer"]),
      float(LOSSES.lp_regularizer(emb, labels, where=where)), rtol=1e-6)
  g = jax.grad(lambda e: obj(e, labels, where=where)[0])(emb)
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(g)[9:] == 0)


def test_ref_embeddings_forwarded():
  emb, labels = _inputs(6)
  ref, ref_labels = _inputs(7)
  obj = LOSSES.make_objective(["contrastive_loss"])
  total, _ = obj(emb, labels, ref_embeddings=ref, ref_labels=ref_labels)
  np.testing.assert_allclose(
      float(total), float(LOSSES.contrastive_loss(emb, labels, ref, ref_labels)), rtol=1e-6)


def test_learned_parameters_from_init_functions():
  emb, labels = _inputs(8, d=6)
  obj = LOSSES.make_objective([
      LOSSES.LossTerm("proxy_anchor_loss", kwargs={"alpha": 16.0}),
      LOSSES.LossTerm("margin_loss", weight=0.5, init_kwargs={"beta": 1.0}),
      LOSSES.LossTerm("contrastive_loss"),
  ])
  assert obj.has_params
  params = obj.init_params(jax.random.key(0), num_classes=4, embedding_dim=6)
  expected_pa = LOSSES.init_proxy_anchor(jax.random.fold_in(jax.random.key(0), 0), 4, 6)
  expected_m = LOSSES.init_margin(jax.random.fold_in(jax.random.key(0), 1), 4, 6, beta=1.0)
  assert set(params) == {"proxy_anchor_loss", "margin_loss", "contrastive_loss"}
  assert params["contrastive_loss"] == {}
  for k, v in expected_pa.items():
    np.testing.assert_array_equal(np.asarray(params["proxy_anchor_loss"][k]), np.asarray(v))
  for k, v in expected_m.items():
    np.testing.assert_array_equal(np.asarray(params["margin_loss"][k]), np.asarray(v))

  (total, terms), g = jax.jit(jax.value_and_grad(
      lambda p: obj(emb, labels, p), has_aux=True))(params)

  @jax.jit
  def direct(p):
    pa = LOSSES.proxy_anchor_loss(emb, labels, alpha=16.0, **p["proxy_anchor_loss"])
    m = LOSSES.margin_loss(emb, labels, **p["margin_loss"])
    c = LOSSES.contrastive_loss(emb, labels)
    return pa, m, c

  pa, m, c = direct(params)
  np.testing.assert_allclose(float(terms["proxy_anchor_loss"]), float(pa), rtol=1e-6)
  np.testing.assert_allclose(float(terms["margin_loss"]), float(m), rtol=1e-6)
  np.testing.assert_allclose(float(total), float(pa) + 0.5 * float(m) + float(c), rtol=1e-6)

  # Gradients reach the learned parameters, and equal the direct ones.
  g_direct = jax.jit(jax.grad(lambda p: LOSSES.proxy_anchor_loss(emb, labels, alpha=16.0, **p)))(
      params["proxy_anchor_loss"])
  np.testing.assert_allclose(np.asarray(g["proxy_anchor_loss"]["proxies"]),
                             np.asarray(g_direct["proxies"]), rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(g["proxy_anchor_loss"]["proxies"]) != 0)


def test_learned_false_uses_fixed_hyperparameters():
  emb, labels = _inputs(9)
  obj = LOSSES.make_objective([LOSSES.LossTerm("margin_loss", kwargs={"beta": 0.9},
                                               learned=False)])
  assert not obj.has_params
  assert obj.init_params(jax.random.key(0), 4, 5) == {"margin_loss": {}}
  total, _ = obj(emb, labels)
  np.testing.assert_allclose(float(total), float(LOSSES.margin_loss(emb, labels, beta=0.9)),
                             rtol=1e-6)


def test_same_loss_twice_with_distinct_keys():
  emb, labels = _inputs(10)
  obj = LOSSES.make_objective([
      LOSSES.LossTerm("triplet_margin_loss", kwargs={"mining": "hard"}, key="hard"),
      LOSSES.LossTerm("triplet_margin_loss", kwargs={"mining": "all"}, key="all"),
  ])
  _, terms = obj(emb, labels)
  np.testing.assert_allclose(float(terms["hard"]),
                             float(LOSSES.triplet_margin_loss(emb, labels, mining="hard")))
  np.testing.assert_allclose(float(terms["all"]),
                             float(LOSSES.triplet_margin_loss(emb, labels, mining="all")))


def test_mappings_configdicts_names_and_callables():
  emb, labels = _inputs(11)
  cfg = ml_collections.ConfigDict({"name": "contrastive_loss", "weight": 2.0,
                                   "kwargs": {"neg_margin": 0.5}})
  custom = lambda embeddings, labels, **kw: jnp.sum(embeddings ** 2)  # noqa: E731
  obj = LOSSES.make_objective([cfg, "lp_regularizer", LOSSES.LossTerm(custom, key="sq")])
  total, terms = obj(emb, labels)
  assert set(terms) == {"contrastive_loss", "lp_regularizer", "sq"}
  np.testing.assert_allclose(float(terms["sq"]), float(jnp.sum(emb ** 2)), rtol=1e-6)
  expected = (2 * float(LOSSES.contrastive_loss(emb, labels, neg_margin=0.5))
              + float(LOSSES.lp_regularizer(emb, labels)) + float(jnp.sum(emb ** 2)))
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  assert repr(LOSSES.make_objective("contrastive_loss")) == "Objective(1*contrastive_loss)"


def test_available_losses():
  names = composition.available_losses()
  assert "contrastive_loss" in names and "triplet_margin_loss" in names
  assert "lp_regularizer" in names
  assert not any(n.startswith("init_") for n in names)
  assert "make_objective" not in names and "LossTerm" not in names
  for n in names:
    assert callable(getattr(LOSSES, n))


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="valid names: .*contrastive_loss"):
    LOSSES.make_objective(["contrastive_los"])
  with pytest.raises(ValueError, match="name"):
    LOSSES.make_objective(["make_objective"])
  with pytest.raises(TypeError, match="name"):
    LOSSES.make_objective([LOSSES.LossTerm(3)])


def test_bad_hyperparameter_lists_accepted_ones():
  with pytest.raises(ValueError, match=r"does not accept \['margn'\].*margin"):
    LOSSES.make_objective([LOSSES.LossTerm("triplet_margin_loss", kwargs={"margn": 0.1})])
  with pytest.raises(ValueError, match="per-call"):
    LOSSES.make_objective([LOSSES.LossTerm("contrastive_loss",
                                           kwargs={"where": None})])
  with pytest.raises(ValueError, match="init_kwargs"):
    LOSSES.make_objective([LOSSES.LossTerm("contrastive_loss", init_kwargs={"a": 1})])
  with pytest.raises(ValueError, match="unknown fields"):
    LOSSES.make_objective([{"name": "contrastive_loss", "wieght": 1.0}])


def test_structural_errors():
  emb, labels = _inputs(12)
  with pytest.raises(ValueError, match="at least one"):
    LOSSES.make_objective([])
  with pytest.raises(ValueError, match="duplicate"):
    LOSSES.make_objective(["contrastive_loss", "contrastive_loss"])
  with pytest.raises(ValueError, match="weight"):
    LOSSES.make_objective([LOSSES.LossTerm("contrastive_loss", weight=float("nan"))])
  with pytest.raises(TypeError, match="weight"):
    LOSSES.make_objective([LOSSES.LossTerm("contrastive_loss", weight="big")])
  obj = LOSSES.make_objective(["proxy_anchor_loss"])
  with pytest.raises(ValueError, match="loss_params"):
    obj(emb, labels)
  with pytest.raises(TypeError, match="unexpected keyword"):
    LOSSES.make_objective(["contrastive_loss"])(emb, labels, mask=None)
  with pytest.raises(ValueError, match="scalar"):
    LOSSES.make_objective([LOSSES.LossTerm("contrastive_loss",
                                           kwargs={"reduction": "none"})])(emb, labels)
  clash = LOSSES.make_objective([LOSSES.LossTerm("margin_loss", kwargs={"beta": 1.0})])
  with pytest.raises(ValueError, match="both"):
    clash(emb, labels, clash.init_params(jax.random.key(0), 4, 5))


def test_collapsed_and_no_positive_batches_are_finite():
  emb = jnp.ones((8, 4))
  labels = jnp.arange(8)   # no positive pair
  obj = LOSSES.make_objective(["contrastive_loss", "triplet_margin_loss", "lp_regularizer"])
  (total, terms), g = jax.jit(jax.value_and_grad(lambda e: obj(e, labels), has_aux=True))(emb)
  assert np.isfinite(float(total)) and np.all(np.isfinite(np.asarray(g)))
  assert float(terms["triplet_margin_loss"]) == 0.0


def test_bfloat16_embeddings():
  emb, labels = _inputs(13)
  obj = LOSSES.make_objective(["contrastive_loss", "triplet_margin_loss"])
  t32, _ = obj(emb, labels)
  t16, _ = obj(emb.astype(jnp.bfloat16), labels)
  assert t16.dtype == jnp.float32
  np.testing.assert_allclose(float(t16), float(t32), rtol=5e-2)
