"""Embedding and class-weight regularisers vs loop references, the loss
contract (embedding regularisers), gradients, bad inputs and PML parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import metric_jax as mj
from tests.helpers import HAS_PML, check_loss_contract, label_layouts, random_embeddings


def lp_np(emb, p=2.0, power=1.0, where=None, reduction="mean"):
  terms = []
  for i, x in enumerate(np.asarray(emb, np.float64)):
    if where is not None and not where[i]:
      continue
    norm = max(abs(v) for v in x) if p == math.inf else sum(abs(v) ** p for v in x) ** (1 / p)
    terms.append(norm ** power)
  return sum(terms) if reduction == "sum" else sum(terms) / max(len(terms), 1)


def zero_mean_np(emb, where=None):
  terms = [abs(sum(x)) for i, x in enumerate(np.asarray(emb, np.float64))
           if where is None or where[i]]
  return sum(terms) / max(len(terms), 1)


def center_invariant_np(w):
  w = np.asarray(w, np.float64)
  sq = [sum(v * v for v in row) for row in w]
  mean = sum(sq) / len(sq)
  return sum((s - mean) ** 2 / 4 for s in sq) / len(sq)


def regular_face_np(w):
  w = np.asarray(w, np.float64)
  terms = []
  for c in range(len(w)):
    cos = [w[c] @ w[j] / (np.linalg.norm(w[c]) * np.linalg.norm(w[j]))
           for j in range(len(w)) if j != c]
    terms.append(max(cos) if cos else 0.0)
  return sum(terms) / len(terms)


@pytest.mark.parametrize("p,power", [(2.0, 1.0), (2.0, 2.0), (1.0, 1.0), (3.0, 0.5),
                                     (math.inf, 1.0)])
def test_lp_matches_loop_reference(p, power):
  emb = random_embeddings(1, 12, 5)
  where = np.arange(12) % 3 != 0
  np.testing.assert_allclose(mj.losses.lp_regularizer(emb, p=p, power=power),
                             lp_np(emb, p, power), rtol=1e-5)
  np.testing.assert_allclose(
      mj.losses.lp_regularizer(emb, p=p, power=power, where=where, reduction="sum"),
      lp_np(emb, p, power, where, "sum"), rtol=1e-5)


def test_zero_mean_and_none_reduction():
  emb = random_embeddings(2, 12, 5)
  where = np.arange(12) < 9
  np.testing.assert_allclose(mj.losses.zero_mean_regularizer(emb), zero_mean_np(emb),
                             rtol=1e-5)
  np.testing.assert_allclose(mj.losses.zero_mean_regularizer(emb, where=where),
                             zero_mean_np(emb, where), rtol=1e-5)
  terms = mj.losses.lp_regularizer(emb, where=where, reduction="none")
  assert terms.shape == (12,) and np.all(np.asarray(terms)[9:] == 0)


@pytest.mark.parametrize("name", ["lp_regularizer", "zero_mean_regularizer"])
def test_embedding_regularizer_contract_and_composition(name):
  reg = getattr(mj.losses, name)
  check_loss_contract(jax.jit(lambda e, l, where=None: reg(e, l, where=where)),
                      zero_without_positives=False)
  # Same signature as a loss: labels and a reference set are accepted (unused).
  emb = random_embeddings(3, 12, 5)
  labels = label_layouts()["m_per_class"]
  np.testing.assert_allclose(reg(emb, labels, emb[:4], labels[:4]), reg(emb), rtol=1e-6)
  total = mj.losses.contrastive_loss(emb, labels) + 0.1 * reg(emb, labels)
  assert np.isfinite(total)


def test_lp_gradient_at_zero_is_finite():
  emb = jnp.zeros((12, 5)).at[0].set(1.0)
  for p, power in ((2.0, 1.0), (3.0, 0.5), (1.5, 2.0)):
    g = jax.grad(lambda e: mj.losses.lp_regularizer(e, p=p, power=power))(emb)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g[1:]).max()) == 0.0


@pytest.mark.parametrize("c", [7, 1])
def test_weight_regularizers_match_loop_reference(c):
  w = random_embeddings(4, c, 5)
  np.testing.assert_allclose(mj.losses.center_invariant_regularizer(w),
                             center_invariant_np(w), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(mj.losses.regular_face_regularizer(w), regular_face_np(w),
                             rtol=1e-5, atol=1e-7)
  assert mj.losses.regular_face_regularizer(w, reduction="none").shape == (c,)


def test_weight_regularizer_gradients_and_half_precision():
  w = jnp.asarray(random_embeddings(5, 7, 5))
  for name in ("center_invariant_regularizer", "regular_face_regularizer"):
    reg = getattr(mj.losses, name)
    check_grads(jax.jit(reg), (w,), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-3)
    g = jax.grad(reg)(w.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
    val = reg(w.astype(jnp.float16))
    assert val.dtype == jnp.float32
    np.testing.assert_allclose(val, reg(w), rtol=2e-2)
  # RegularFace: only the most similar other class gets a gradient from row c.
  w2 = jnp.array([[1., 0.], [0.9, 0.1], [-1., 0.2]])
  g = jax.grad(lambda v: mj.losses.regular_face_regularizer(v, reduction="none")[2])(w2)
  assert float(jnp.abs(g[0]).max()) == 0.0 and float(jnp.abs(g[1]).max()) > 0


def test_bad_inputs():
  emb = random_embeddings(6, 12, 5)
  with pytest.raises(ValueError, match="embeddings"):
    mj.losses.lp_regularizer(emb[0])
  with pytest.raises(ValueError, match="p"):
    mj.losses.lp_regularizer(emb, p=0.0)
  with pytest.raises(ValueError, match="where"):
    mj.losses.zero_mean_regularizer(emb, where=np.ones(3, bool))
  with pytest.raises(ValueError, match="labels"):
    mj.losses.lp_regularizer(emb, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="reduction"):
    mj.losses.lp_regularizer(emb, reduction="mean_nonzero")
  with pytest.raises(ValueError, match="weights"):
    mj.losses.center_invariant_regularizer(emb[0])
  with pytest.raises(TypeError, match="weights"):
    mj.losses.regular_face_regularizer(emb.astype(np.int32))


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_parity():
  import torch
  from pytorch_metric_learning import regularizers as pml_reg
  emb = random_embeddings(7, 12, 5)
  w = random_embeddings(8, 9, 5)
  cases = [
      (pml_reg.LpRegularizer(), emb, lambda x: mj.losses.lp_regularizer(x)),
      (pml_reg.LpRegularizer(p=1, power=2), emb,
       lambda x: mj.losses.lp_regularizer(x, p=1.0, power=2.0)),
      (pml_reg.ZeroMeanRegularizer(), emb, lambda x: mj.losses.zero_mean_regularizer(x)),
      (pml_reg.CenterInvariantRegularizer(), w, mj.losses.center_invariant_regularizer),
      (pml_reg.RegularFaceRegularizer(), w, mj.losses.regular_face_regularizer),
  ]
  for module, x, ours in cases:
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = module(t)
    out.backward()
    val, g = jax.value_and_grad(ours)(jnp.asarray(x))
    np.testing.assert_allclose(val, out.item(), rtol=1e-5, err_msg=type(module).__name__)
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-4, atol=1e-6,
                               err_msg=type(module).__name__)
