"""smooth_ap_loss vs a loop reference, the loss contract, its evaluation paths
and PML."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from metric_jax.losses import _grid
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_pairwise,
                           random_embeddings, reference_case)


def smooth_ap_np(emb, labels, ref=None, ref_labels=None, temperature=0.01, include_self=False,
                 metric="cosine", reduction="mean", where=None, ref_where=None, pair_mask=None,
                 terms_only=False):
  """The paper's formula with explicit loops over anchors, positives and
  references (float64). Returns the reduced loss, or the [B] terms."""
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  s = np_pairwise(emb, ref, metric)
  if metric in ("euclidean", "squared_euclidean"):
    s = -s

  def above(x):   # sigmoid(x / t), overflow-free
    z = x / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))

  terms, kept = np.zeros(len(emb)), []
  for a in range(len(emb)):
    if where is not None and not where[a]:
      continue
    ranked = []
    for j in range(len(ref)):
      if ref_where is not None and not ref_where[j]:
        continue
      if pair_mask is not None and not pair_mask[a, j]:
        continue
      if same and a == j and not include_self:
        continue
      ranked.append(j)
    positives = [j for j in ranked if labels[a] == ref_labels[j]]
    if not positives:
      continue
    ap = 0.0
    for p in positives:
      rank_pos = 1.0 + sum(above(s[a, j] - s[a, p]) for j in positives if j != p)
      rank_all = 1.0 + sum(above(s[a, j] - s[a, p]) for j in ranked if j != p)
      ap += rank_pos / rank_all
    terms[a] = 1.0 - ap / len(positives)
    kept.append(a)
  if terms_only:
    return terms
  chosen = terms[kept]
  if reduction == "sum":
    return chosen.sum()
  if reduction == "mean":
    return chosen.sum() / max(len(chosen), 1)
  # 1 - AP below float32 resolution (an anchor ranking only itself above its
  # far negatives) is 0 in float32: it does not count as non-zero.
  return chosen.sum() / max(int(np.sum(chosen > 1e-6)), 1)


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
def test_matches_loop_reference(layout, reduction):
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for kw in ({}, dict(temperature=0.2), dict(include_self=True),
             dict(temperature=0.5, metric="euclidean"), dict(temperature=1.0, metric="dot")):
    metric = kw.pop("metric", "cosine")
    got = mj.losses.smooth_ap_loss(emb, labels, distance=metric, reduction=reduction, **kw)
    want = smooth_ap_np(emb, labels, metric=metric, reduction=reduction, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{kw} {metric}")


def test_per_anchor_terms():
  emb = random_embeddings(2, 12, 5)
  labels = label_layouts()["with_singletons"]
  for include_self in (False, True):
    got = mj.losses.smooth_ap_loss(emb, labels, temperature=0.1, include_self=include_self,
                                   reduction="none")
    want = smooth_ap_np(emb, labels, temperature=0.1, include_self=include_self,
                        terms_only=True)
    assert got.shape == (12,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reference_set_where_and_pair_mask():
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  for reduction in ("mean", "sum"):
    got = mj.losses.smooth_ap_loss(emb, labels, ref, ref_labels, where=where,
                                   ref_where=ref_where, pair_mask=jnp.asarray(mask),
                                   temperature=0.05, reduction=reduction)
    want = smooth_ap_np(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
                        pair_mask=mask, temperature=0.05, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_include_self_with_where_and_pair_mask():
  emb = random_embeddings(4, 12, 5)
  labels = label_layouts()["with_singletons"]
  where = np.arange(12) != 4
  mask = np.random.default_rng(1).random((12, 12)) < 0.7
  np.fill_diagonal(mask[:6, :6], False)            # some anchors may not rank themselves
  got = mj.losses.smooth_ap_loss(emb, labels, include_self=True, where=where,
                                 pair_mask=jnp.asarray(mask), temperature=0.1)
  want = smooth_ap_np(emb, labels, include_self=True, where=where, pair_mask=mask,
                      temperature=0.1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_perfect_and_reversed_ranking():
  # Two tight, far-apart classes: every positive ranks first, AP = 1.
  emb = np.array([[1, 0], [0.999, 0.04], [-1, 0], [-0.999, -0.04]], np.float32)
  labels = np.array([0, 0, 1, 1])
  assert float(mj.losses.smooth_ap_loss(emb, labels)) < 1e-6
  # Anchor 0's positive (60 degrees away) ranks below both negatives (25 and
  # 35 degrees): AP = 1/3; anchor 1's below one (35 degrees): AP = 1/2.
  angles = np.radians([0.0, 60.0, 25.0, -35.0])
  emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
  terms = mj.losses.smooth_ap_loss(emb, np.array([0, 0, 1, 2]), reduction="none")
  np.testing.assert_allclose(terms, [2 / 3, 1 / 2, 0, 0], atol=1e-6)


def test_ties_and_duplicates():
  # Duplicate references tie: each is "above" the other by sigmoid(0) = 1/2.
  emb = random_embeddings(5, 8, 4)
  emb[1] = emb[0]
  emb[2] = emb[0]
  emb[5] = emb[4]
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 0])
  value, grad = jax.jit(jax.value_and_grad(
      lambda e: mj.losses.smooth_ap_loss(e, labels, include_self=True)))(jnp.asarray(emb))
  np.testing.assert_allclose(value, smooth_ap_np(emb, labels, include_self=True), rtol=1e-5)
  assert np.all(np.isfinite(grad))


def test_nan_input_is_not_hidden_by_dropped_anchors():
  # No anchor has a positive, so every term is dropped: a NaN embedding
  # still makes the loss NaN (unless its row is masked out).
  emb = random_embeddings(3, 6, 4)
  emb[2, 1] = np.nan
  labels = np.arange(6)
  assert np.isnan(float(mj.losses.smooth_ap_loss(emb, labels)))
  assert float(mj.losses.smooth_ap_loss(emb, labels, where=np.arange(6) != 2)) == 0.0


def test_auto_dispatch_on_the_number_of_positives():
  # 40 samples: the 4-slot grid, the 16-slot grid, then the dense fallback,
  # all from one compilation; same values and gradients as max_positives.
  emb = random_embeddings(6, 40, 5)
  fn = jax.jit(jax.value_and_grad(lambda e, l: mj.losses.smooth_ap_loss(e, l, temperature=0.1)))
  forced = jax.jit(jax.value_and_grad(
      lambda e, l: mj.losses.smooth_ap_loss(e, l, temperature=0.1, max_positives=40)))
  for labels in (np.repeat(np.arange(10), 4), np.repeat(np.arange(4), 10),
                 np.repeat(np.arange(2), 20)):
    value, grad = fn(emb, labels)
    np.testing.assert_allclose(value, smooth_ap_np(emb, labels, temperature=0.1), rtol=1e-5)
    forced_value, forced_grad = forced(emb, labels)
    np.testing.assert_allclose(forced_value, value, rtol=1e-5)
    np.testing.assert_allclose(forced_grad, grad, rtol=1e-4, atol=1e-7)


def test_max_positives_overflow_is_nan_not_truncated():
  emb = random_embeddings(7, 12, 5)
  labels = label_layouts()["m_per_class"]                  # 2 positives per anchor
  np.testing.assert_allclose(mj.losses.smooth_ap_loss(emb, labels, max_positives=2),
                             smooth_ap_np(emb, labels), rtol=1e-5)
  assert np.isnan(float(mj.losses.smooth_ap_loss(emb, labels, max_positives=1)))
  assert np.isnan(float(mj.losses.smooth_ap_loss(emb, labels, max_positives=2,
                                                 include_self=True)))


def test_tiled_grid_equals_one_piece(monkeypatch):
  # Grids above the budget go in tiles of anchors: 1 per tile for the dense
  # path (20 x 40 entries per anchor), 7 or 9 per tile (not dividing B) for
  # the 4-slot grid and the reference set.
  emb = jnp.asarray(random_embeddings(8, 20, 5))
  ref = jnp.asarray(random_embeddings(9, 6, 5))
  labels = jnp.asarray(np.array([0] * 18 + [1, 1]))      # 17 positives: dense
  ref_labels = jnp.asarray(np.array([0, 1, 1, 2, 5, 0]))
  where = jnp.asarray(np.arange(20) != 3)
  cases = [lambda e: mj.losses.smooth_ap_loss(e, labels, where=where, temperature=0.1),
           lambda e: mj.losses.smooth_ap_loss(e, jnp.arange(20) % 5, max_positives=4,
                                              temperature=0.1),
           lambda e: mj.losses.smooth_ap_loss(e, labels, ref, ref_labels, reduction="sum")]
  untiled = [jax.jit(jax.value_and_grad(f))(emb) for f in cases]
  assert all(np.isfinite(float(value)) for value, _ in untiled)
  monkeypatch.setattr(_grid, "GRID_ELEMENTS", 700)
  for f, (value, grad) in zip(cases, untiled):
    got_value, got_grad = jax.jit(jax.value_and_grad(lambda e, f=f: f(e)))(emb)
    np.testing.assert_allclose(got_value, value, rtol=1e-5)
    np.testing.assert_allclose(got_grad, grad, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(
      mj.losses.smooth_ap_loss(emb, labels, where=where, temperature=0.1),
      smooth_ap_np(np.asarray(emb), np.asarray(labels), where=np.asarray(where),
                   temperature=0.1), rtol=1e-5)


def test_contract():
  check_loss_contract(lambda e, l, **kw: mj.losses.smooth_ap_loss(e, l, temperature=0.1, **kw))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_at_paper_temperature(dtype):
  emb = jnp.asarray(random_embeddings(5, 16, 8))
  labels = jnp.asarray(np.repeat(np.arange(4), 4))
  fn = jax.jit(jax.value_and_grad(
      lambda e: mj.losses.smooth_ap_loss(e, labels, include_self=True)))
  val, grad = fn(emb.astype(dtype))
  assert val.dtype == jnp.float32 and np.isfinite(float(val))
  assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))
  want = smooth_ap_np(np.asarray(emb.astype(dtype), np.float64), np.asarray(labels),
                      include_self=True)
  np.testing.assert_allclose(val, want, rtol=1e-3, atol=1e-4)
  assert float(jnp.abs(grad.astype(jnp.float32)).max()) > 0


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  loss = mj.losses.smooth_ap_loss
  with pytest.raises(ValueError, match="`temperature` must be > 0, got 0.0"):
    loss(emb, lab, temperature=0.0)
  with pytest.raises(ValueError, match=r"`temperature` must be a scalar, got shape \(2,\)"):
    loss(emb, lab, temperature=jnp.ones(2))
  with pytest.raises(ValueError, match="`include_self=True` .* needs ref_embeddings=None"):
    loss(emb, lab, emb, lab, include_self=True)
  with pytest.raises(TypeError, match="`include_self` must be a bool, got int 1"):
    loss(emb, lab, include_self=1)
  # A NumPy bool is a bool (as in pnp_loss and the evaluation's exclude_self).
  np.testing.assert_allclose(loss(emb, lab, include_self=np.bool_(True)),
                             loss(emb, lab, include_self=True))
  with pytest.raises(ValueError, match="`max_positives` must be >= 1, got 0"):
    loss(emb, lab, max_positives=0)
  with pytest.raises(TypeError, match="`max_positives` must be a Python int"):
    loss(emb, lab, max_positives=2.0)
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    loss(emb, lab, reduction="max")
  with pytest.raises(TypeError, match="`labels` must be an integer array"):
    loss(emb, jnp.ones(4))
  with pytest.raises(ValueError, match="`labels` must have length 4"):
    loss(emb, jnp.array([0, 1]))
  with pytest.raises(ValueError, match=r"`where` must have shape \(4,\)"):
    loss(emb, lab, where=jnp.ones(3, bool))


def _pml_value_and_grad(emb, labels, **kwargs):
  import torch  # pylint: disable=import-outside-toplevel
  from pytorch_metric_learning import (  # pylint: disable=import-outside-toplevel
      losses as pml_losses)
  x = torch.tensor(emb, requires_grad=True)
  out = pml_losses.SmoothAPLoss(**kwargs)(x, torch.tensor(labels))
  out.backward()
  return out.item(), x.grad.numpy()


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_parity_when_blocks_are_the_classes():
  # Sorted classes of K = C samples: PML's blocks of C rows are the classes,
  # so the true labels with include_self=True give PML's value and gradient.
  emb = random_embeddings(7, 16, 6)
  labels = np.repeat(np.arange(4), 4)
  fn = jax.jit(jax.value_and_grad(
      lambda e, t, s: mj.losses.smooth_ap_loss(e, labels, temperature=t, include_self=s)),
               static_argnums=2)
  for kw in ({}, dict(temperature=0.1)):
    want, want_grad = _pml_value_and_grad(emb, labels, **kw)
    got, grad = fn(jnp.asarray(emb), kw.get("temperature", 0.01), True)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=1e-5)
  # The paper's form (the anchor not in its own retrieval set) differs.
  assert abs(float(fn(jnp.asarray(emb), 0.1, False)[0]) - want) > 1e-3


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("labels", [np.repeat(np.arange(6), 2),
                                    np.array([3, 1, 0, 1, 2, 0, 3, 2, 1, 0, 3, 2])])
def test_pml_parity_with_block_labels(labels):
  # Any batch PML accepts (equal class sizes): PML ranks blocks of C rows,
  # C the number of classes, reproduced by the labels arange(B) // C.
  emb = random_embeddings(3, 12, 6)
  blocks = np.arange(12) // len(np.unique(labels))
  want, want_grad = _pml_value_and_grad(emb, labels, temperature=0.05)
  got, grad = jax.jit(jax.value_and_grad(lambda e: mj.losses.smooth_ap_loss(
      e, blocks, temperature=0.05, include_self=True)))(jnp.asarray(emb))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=1e-5)
  # With the true labels PML's value is not Smooth-AP's.
  true = mj.losses.smooth_ap_loss(emb, labels, temperature=0.05, include_self=True)
  assert abs(float(true) - want) > 1e-3
