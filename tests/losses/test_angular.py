"""angular_loss (factorized and tiled paths) vs a loop reference, the loss
contract and PML."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           random_embeddings, reference_case)


def angular_np(emb, labels, ref=None, ref_labels=None, alpha=math.radians(40),
               reduction="mean", where=None, ref_where=None, pair_mask=None):
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  x, y = np_normalize(emb), np_normalize(ref)
  t2 = math.tan(alpha) ** 2

  def ok(i, j):
    if (where is not None and not where[i]) or (ref_where is not None and not ref_where[j]):
      return False
    return not (same and i == j) and (pair_mask is None or bool(pair_mask[i, j]))

  terms = []
  for a in range(len(emb)):
    for p in range(len(ref)):
      if not ok(a, p) or labels[a] != ref_labels[p]:
        continue
      f = [4 * t2 * (x[a] + y[p]) @ y[n] - 2 * (1 + t2) * x[a] @ y[p]
           for n in range(len(ref)) if ok(a, n) and labels[a] != ref_labels[n]]
      f = np.array([0.0] + f)
      top = f.max()
      terms.append(top + math.log(np.exp(f - top).sum()))
  terms = np.array(terms)
  if reduction == "sum":
    return terms.sum()
  return terms.sum() / max(len(terms), 1)


CASES = ([("auto", 40.0, layout) for layout in label_layouts()]
         + [(method, deg, layout) for method, deg in (("factorized", 55.0), ("tiled", 36.0))
            for layout in ("m_per_class", "one_class")])


@pytest.mark.parametrize("method,deg,layout", CASES)
def test_matches_loop_reference(method, deg, layout):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  got = mj.losses.angular_loss(emb, labels, alpha=math.radians(deg), method=method,
                               anchor_tile=5)
  want = angular_np(emb, labels, alpha=math.radians(deg))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gathered", "factorized", "tiled"])
def test_reference_set_where_and_pair_mask(method):
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  got = mj.losses.angular_loss(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                               pair_mask=jnp.asarray(mask), method=method, reduction="sum")
  want = angular_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                    pair_mask=mask, reduction="sum")
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_large_alpha_and_gradients_of_all_paths():
  # At 80 degrees the factorized product would underflow; "auto" streams.
  emb = random_embeddings(4, 12, 5)
  labels = label_layouts()["m_per_class"]
  got = mj.losses.angular_loss(emb, labels, alpha=math.radians(80))
  want = angular_np(emb, labels, alpha=math.radians(80))
  assert want > 10
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The three evaluations have the same gradient.
  labels = jnp.asarray(label_layouts()["with_singletons"])
  grads = [jax.grad(lambda e, m=m: mj.losses.angular_loss(e, labels, method=m))(jnp.asarray(emb))
           for m in ("gathered", "factorized", "tiled")]
  for g in grads[1:]:
    np.testing.assert_allclose(g, grads[0], rtol=1e-4, atol=1e-6)


def test_auto_dispatch_on_the_number_of_positives():
  # 40 samples: the 4-slot grid, the 16-slot grid, then the dense fallback,
  # all from one compilation.
  emb = random_embeddings(6, 40, 5)
  fn = jax.jit(lambda e, l: mj.losses.angular_loss(e, l))
  for labels in (np.repeat(np.arange(10), 4), np.repeat(np.arange(4), 10),
                 np.repeat(np.arange(2), 20)):
    np.testing.assert_allclose(fn(emb, labels), angular_np(emb, labels), rtol=1e-5)


@pytest.mark.parametrize("budget", [1, 600, 2400])
def test_tiled_grid_equals_one_piece(monkeypatch, budget):
  # Grids above the budget go in tiles of anchors (1, 3 or 12 anchors per
  # tile here: one tile size does not divide B = 14); the 16-slot grid and
  # reference sets and masks included.
  from metric_jax.losses import _grid  # pylint: disable=import-outside-toplevel
  emb = jnp.asarray(random_embeddings(8, 14, 5))
  ref = jnp.asarray(random_embeddings(9, 6, 5))
  labels = jnp.asarray(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 0, 1]))
  ref_labels = jnp.asarray(np.array([0, 1, 1, 2, 5, 0]))
  where = jnp.asarray(np.arange(14) != 3)
  cases = [(lambda e: mj.losses.angular_loss(e, labels, where=where), {}),
           (lambda e: mj.losses.angular_loss(e, labels, max_positives=16), {}),
           (lambda e: mj.losses.angular_loss(e, labels, ref, ref_labels,
                                             reduction="sum"), {})]
  untiled = [jax.value_and_grad(f)(emb) for f, _ in cases]
  monkeypatch.setattr(_grid, "GRID_ELEMENTS", budget)
  for (f, _), (value, grad) in zip(cases, untiled):
    got_value, got_grad = jax.jit(jax.value_and_grad(f))(emb)
    np.testing.assert_allclose(got_value, value, rtol=1e-5)
    np.testing.assert_allclose(got_grad, grad, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      mj.losses.angular_loss(emb, labels, where=where),
      angular_np(np.asarray(emb), np.asarray(labels), where=np.asarray(where)), rtol=1e-5)


def test_max_positives_overflow_is_nan_not_truncated():
  emb = random_embeddings(7, 12, 5)
  labels = label_layouts()["m_per_class"]                  # 2 positives per anchor
  np.testing.assert_allclose(mj.losses.angular_loss(emb, labels, max_positives=2),
                             angular_np(emb, labels), rtol=1e-5)
  assert np.isnan(float(mj.losses.angular_loss(emb, labels, max_positives=1)))


def test_contract():
  # One evaluation path (the one "auto" takes for PK batches) keeps the many
  # compilations of the contract cheap; the paths agree by the tests above.
  check_loss_contract(lambda e, l, **kw: mj.losses.angular_loss(e, l, method="gathered", **kw))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`alpha` is in radians"):
    mj.losses.angular_loss(emb, lab, alpha=40.0)
  with pytest.raises(ValueError, match="`alpha` is in radians"):
    mj.losses.angular_loss(emb, lab, alpha=0.0)
  with pytest.raises(ValueError, match="`distance` must be one of"):
    mj.losses.angular_loss(emb, lab, distance="cosine")
  with pytest.raises(ValueError, match="`method` must be one of"):
    mj.losses.angular_loss(emb, lab, method="cube")
  with pytest.raises(ValueError, match="`max_positives` must be >= 1"):
    mj.losses.angular_loss(emb, lab, max_positives=0)
  with pytest.raises(ValueError, match="`anchor_tile` must be >= 1"):
    mj.losses.angular_loss(emb, lab, anchor_tile=0)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  emb = np_normalize(random_embeddings(7, 12, 6)).astype(np.float32)
  labels = label_layouts()[layout]
  want = pml_losses.AngularLoss(alpha=50)(torch.tensor(emb), torch.tensor(labels)).item()
  got = mj.losses.angular_loss(emb, labels, alpha=math.radians(50))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  ref = np_normalize(random_embeddings(8, 9, 6)).astype(np.float32)
  ref_labels = np.array([0, 1, 1, 2, 3, 3, 4, 9, 9])
  want = pml_losses.AngularLoss()(torch.tensor(emb), torch.tensor(labels),
                                  ref_emb=torch.tensor(ref),
                                  ref_labels=torch.tensor(ref_labels)).item()
  got = mj.losses.angular_loss(emb, labels, ref, ref_labels)
  np.testing.assert_allclose(got, want, rtol=1e-5)
