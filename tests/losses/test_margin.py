"""margin_loss (triplet and pair forms, learnable beta) vs loop references,
the loss contract and PML."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings, reference_case)


def margin_np(emb, labels, ref=None, ref_labels=None, margin=0.2, beta=1.2, nu=0.0,
              form="triplets", metric="euclidean", reduction="mean_nonzero", where=None,
              ref_where=None, pair_mask=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  d = np_pairwise(emb, ref, metric)
  sim = metric in ("cosine", "dot")
  beta_arr = np.asarray(beta, np.float64)

  def ok(i, j):
    if (where is not None and not where[i]) or (ref_where is not None and not ref_where[j]):
      return False
    if same and i == j:
      return False
    return pair_mask is None or bool(pair_mask[i, j])

  def b_of(i):
    return float(beta_arr[labels[i]]) if beta_arr.ndim else float(beta_arr)

  def lpos(i, j):
    x = (b_of(i) - d[i, j]) if sim else (d[i, j] - b_of(i))
    return max(0.0, x + margin)

  def lneg(i, j):
    x = (d[i, j] - b_of(i)) if sim else (b_of(i) - d[i, j])
    return max(0.0, x + margin)

  terms, betas = [], []          # one entry per triplet part / pair
  for i in range(len(emb)):
    pos = [j for j in range(len(ref)) if ok(i, j) and labels[i] == ref_labels[j]]
    neg = [j for j in range(len(ref)) if ok(i, j) and labels[i] != ref_labels[j]]
    if form == "triplets":
      for p in pos:
        for n in neg:
          terms += [lpos(i, p), lneg(i, n)]
          betas.append(b_of(i))
    else:
      terms += [lpos(i, p) for p in pos] + [lneg(i, n) for n in neg]
      betas += [b_of(i)] * (len(pos) + len(neg))
  terms = np.array(terms)
  if not len(terms):
    return 0.0
  if reduction == "sum":
    div = 1.0
  elif reduction == "mean":
    div = len(terms)
  else:
    div = float(np.sum(terms > 0))
  loss = terms.sum() / max(div, 1.0)
  if beta_arr.ndim:
    loss += nu * np.sum(betas) / div if div > 0 else 0.0
  else:
    loss += nu * float(beta_arr)
  return loss


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("form", ["triplets", "pairs"])
def test_matches_loop_reference(layout, form):
  emb = np_normalize(random_embeddings(1, 12, 5)).astype(np.float32)
  labels = label_layouts()[layout]
  for reduction in ("mean_nonzero", "mean", "sum"):
    for metric, kw in (("euclidean", {}), ("cosine", dict(beta=0.3, margin=0.1))):
      got = mj.losses.margin_loss(emb, labels, form=form, distance=metric, reduction=reduction,
                                  **kw)
      want = margin_np(emb, labels, form=form, metric=metric, reduction=reduction, **kw)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["triplets", "pairs"])
def test_per_class_beta_penalty_reference_set_and_where(form):
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case(scale=0.5)
  beta = np.array([0.9, 1.0, 1.1, 1.2, 1.3], np.float32)
  for reduction in ("mean_nonzero", "sum"):
    got = mj.losses.margin_loss(emb, labels, ref, ref_labels, beta=jnp.asarray(beta), nu=0.1,
                                form=form, where=where, ref_where=ref_where,
                                pair_mask=jnp.asarray(mask), reduction=reduction)
    want = margin_np(emb, labels, ref, ref_labels, beta=beta, nu=0.1, form=form, where=where,
                     ref_where=ref_where, pair_mask=mask, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_none_reduction_sums_to_total():
  emb = random_embeddings(4, 9, 3)
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
  for form in ("triplets", "pairs"):
    terms = mj.losses.margin_loss(emb, labels, form=form, reduction="none")
    assert terms.shape == (9, 9)
    np.testing.assert_allclose(terms.sum(), margin_np(emb, labels, form=form, reduction="sum"),
                               rtol=1e-5)


def test_beta_gradient_and_init():
  params = mj.losses.init_margin(jax.random.key(0), 4, 8)
  assert params["beta"].shape == (4,) and np.allclose(params["beta"], 1.2)
  emb = jnp.asarray(np_normalize(random_embeddings(5, 8, 8)).astype(np.float32))
  labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  g = jax.grad(lambda p: mj.losses.margin_loss(emb, labels, nu=0.01, **p))(params)
  assert g["beta"].shape == (4,) and np.all(np.isfinite(g["beta"]))
  # Finite difference on one class's beta.
  eps = 1e-3
  f = lambda b: float(mj.losses.margin_loss(emb, labels, nu=0.01, beta=b))
  up = params["beta"].at[1].add(eps)
  down = params["beta"].at[1].add(-eps)
  np.testing.assert_allclose(g["beta"][1], (f(up) - f(down)) / (2 * eps), rtol=2e-2, atol=1e-3)
  # Scalar beta: the penalty is nu * beta.
  gs = jax.grad(lambda b: mj.losses.margin_loss(emb, labels, beta=b, nu=0.5))(1.2)
  assert np.isfinite(float(gs))


def test_contract():
  check_loss_contract(lambda e, l, **kw: mj.losses.margin_loss(e, l, beta=0.8, **kw))
  check_loss_contract(lambda e, l, **kw: mj.losses.margin_loss(
      e, l, beta=jnp.linspace(0.6, 1.0, 12), nu=0.1, **kw))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`beta` must be a scalar or a \\[num_classes\\]"):
    mj.losses.margin_loss(emb, lab, beta=jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="`form` must be one of"):
    mj.losses.margin_loss(emb, lab, form="paper")
  with pytest.raises(ValueError, match="`margin` must be a scalar"):
    mj.losses.margin_loss(emb, lab, margin=jnp.ones(2))
  with pytest.raises(ValueError, match="`num_classes` must be >= 1"):
    mj.losses.init_margin(jax.random.key(0), 0, 3)
  with pytest.raises(TypeError, match="`beta` must be a float"):
    mj.losses.margin_loss(emb, lab, beta=jnp.ones(2, jnp.int32))


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = random_embeddings(7, 12, 6)
  labels = label_layouts()[layout]
  emb_n = np_normalize(emb).astype(np.float32)
  t_emb, t_lab = torch.tensor(emb), torch.tensor(labels)
  want = pml_losses.MarginLoss()(t_emb, t_lab).item()
  np.testing.assert_allclose(mj.losses.margin_loss(emb_n, labels), want, rtol=1e-5)
  want = pml_losses.MarginLoss(margin=0.1, beta=0.9)(t_emb, t_lab).item()
  np.testing.assert_allclose(mj.losses.margin_loss(emb_n, labels, margin=0.1, beta=0.9), want,
                             rtol=1e-5)
  # Learned scalar beta with its penalty.
  want = pml_losses.MarginLoss(learn_beta=True, nu=0.1)(t_emb, t_lab).item()
  np.testing.assert_allclose(mj.losses.margin_loss(emb_n, labels, nu=0.1), want, rtol=1e-5)
  # Per-class beta (PML indexes it by the anchor's label).
  num_classes = int(labels.max()) + 1
  pml = pml_losses.MarginLoss(learn_beta=True, nu=0.1, num_classes=num_classes)
  with torch.no_grad():
    pml.beta.copy_(torch.linspace(0.8, 1.4, num_classes))
  want = pml(t_emb, t_lab).item()
  got = mj.losses.margin_loss(emb_n, labels, nu=0.1,
                              beta=jnp.linspace(0.8, 1.4, num_classes))
  np.testing.assert_allclose(got, want, rtol=1e-5)
