"""triplet_margin_loss vs loop references for every mining mode, the loss
contract, memory at B = 2048 and PML parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from benchmarks.common import compiled_peak_bytes
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings)


def _h(x, margin, soft):
  x = x + margin
  return np.log1p(np.exp(x)) if soft else max(0.0, x)


def _reduce(vals, reduction):
  vals = np.asarray(vals, np.float64)
  if reduction == "sum":
    return vals.sum()
  if reduction == "mean":
    return vals.sum() / max(len(vals), 1)
  return vals.sum() / max(int(np.sum(vals > 0)), 1)


def triplet_np(emb, labels, ref=None, ref_labels=None, *, margin=0.2, mining="all",
               semihard="facenet", band_select="all", soft=False, swap=False,
               metric="euclidean", reduction="mean_nonzero", where=None, ref_where=None):
  """Loops over anchors, positives and negatives, written from the formulas."""
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  sign = -1.0 if metric in ("cosine", "dot") else 1.0
  d = sign * np_pairwise(emb, ref, metric)
  rr = sign * np_pairwise(ref, ref, metric)
  b, m = d.shape
  ok_a = lambda a: where is None or where[a]
  ok_r = lambda j: ref_where is None or ref_where[j]
  pos = lambda a: [p for p in range(m) if ok_r(p) and ref_labels[p] == labels[a]
                   and not (same and p == a)]
  neg = lambda a: [n for n in range(m) if ok_r(n) and ref_labels[n] != labels[a]]
  dan = lambda a, p, n: min(d[a, n], rr[p, n]) if swap else d[a, n]
  terms = []
  for a in range(b):
    if not ok_a(a):
      continue
    P, N = pos(a), neg(a)
    if mining in ("hard", "easy"):
      if not P or not N:
        continue
      p = max(P, key=lambda j: d[a, j]) if mining == "hard" else min(P, key=lambda j: d[a, j])
      n = min(N, key=lambda j: d[a, j])
      terms.append(_h(d[a, p] - dan(a, p, n), margin, soft))
      continue
    for p in P:
      if mining == "all":
        for n in N:
          terms.append(_h(d[a, p] - dan(a, p, n), margin, soft))
      elif semihard == "tf":
        if not N:
          continue
        farther = [n for n in N if d[a, n] > d[a, p]]
        n = min(farther, key=lambda j: d[a, j]) if farther else max(N, key=lambda j: d[a, j])
        terms.append(_h(d[a, p] - dan(a, p, n), margin, soft))
      else:
        band = [n for n in N if d[a, p] < d[a, n] < d[a, p] + margin]
        if band_select == "hardest" and band:
          band = [min(band, key=lambda j: d[a, j])]
        for n in band:
          terms.append(_h(d[a, p] - dan(a, p, n), margin, soft))
  return _reduce(terms, reduction)


MODES = [
    dict(mining="all"),
    dict(mining="hard"),
    dict(mining="easy"),
    dict(mining="semihard"),
    dict(mining="semihard", band_select="hardest"),
    dict(mining="semihard", semihard="tf"),
]


def _uses_grid(mode) -> bool:
  """Batch-all and the FaceNet band with every member: the modes that have
  two implementations (the [B, P, M] grid and the sorted / streamed one)."""
  return mode["mining"] == "all" or (
      mode["mining"] == "semihard" and mode.get("semihard", "facenet") == "facenet"
      and mode.get("band_select", "all") == "all")


# (mode, grid sizes): both implementations of the modes that have two.
MODE_PATHS = [pytest.param(mode, sizes, id="-".join(map(str, mode.values()))
                           + ("" if sizes else "-sorted_or_streamed"))
              for mode in MODES for sizes in ((4, 8, 16), ())
              if sizes or _uses_grid(mode)]


@pytest.fixture
def use_grid(monkeypatch):
  """``use_grid(sizes)`` sets the batch-all grid sizes (``()``: the sorted /
  streamed fallback only) for the rest of the test."""
  from metric_jax.losses import triplet
  return lambda sizes: monkeypatch.setattr(triplet, "_FAST_POSITIVES", sizes)


@pytest.mark.parametrize("mode,sizes", MODE_PATHS)
@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
def test_matches_loop_reference(mode, sizes, layout, reduction, use_grid):
  use_grid(sizes)
  emb = random_embeddings(11, 12, 4, scale=0.6)
  labels = label_layouts()[layout]
  got = mj.losses.triplet_margin_loss(emb, labels, margin=0.5, reduction=reduction, **mode)
  want = triplet_np(emb, labels, margin=0.5, reduction=reduction, **mode)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,sizes", MODE_PATHS)
@pytest.mark.parametrize("soft,swap", [(True, False), (False, True), (True, True)])
def test_soft_and_swap(mode, sizes, soft, swap, use_grid):
  use_grid(sizes)
  emb = random_embeddings(12, 12, 4, scale=0.6)
  labels = label_layouts()["with_singletons"]
  got = mj.losses.triplet_margin_loss(emb, labels, margin=0.3, soft=soft, swap=swap,
                                      anchor_tile=5, **mode)
  want = triplet_np(emb, labels, margin=0.3, soft=soft, swap=swap, **mode)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,sizes", MODE_PATHS)
@pytest.mark.parametrize("metric", ["squared_euclidean", "cosine"])
def test_reference_set_where_and_metrics(mode, sizes, metric, use_grid):
  use_grid(sizes)
  emb = random_embeddings(13, 9, 4, scale=0.5)
  ref = random_embeddings(14, 11, 4, scale=0.5)
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 3, 5])
  ref_labels = np.array([0, 0, 1, 2, 3, 4, 1, 2, 3, 0, 4])
  where = np.array([True] * 7 + [False] * 2)
  ref_where = np.array([True] * 9 + [False] * 2)
  kw = dict(margin=0.4, distance=metric, where=where, ref_where=ref_where)
  got = mj.losses.triplet_margin_loss(emb, labels, ref, ref_labels, **kw, **mode)
  kw.pop("distance")
  want = triplet_np(emb, labels, ref, ref_labels, metric=metric, **kw, **mode)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  got_swap = mj.losses.triplet_margin_loss(emb, labels, ref, ref_labels, swap=True,
                                           distance=metric, **{k: v for k, v in kw.items()}, **mode)
  want_swap = triplet_np(emb, labels, ref, ref_labels, swap=True, metric=metric, **kw, **mode)
  np.testing.assert_allclose(got_swap, want_swap, rtol=1e-5, atol=1e-6)


def test_sorted_batch_all_equals_streamed_path(use_grid):
  use_grid(())
  emb = jnp.asarray(random_embeddings(15, 40, 8))
  labels = jnp.asarray(np.repeat(np.arange(10), 4))
  for mining in ("all", "semihard"):
    for reduction in ("mean", "mean_nonzero", "sum"):
      fast = lambda e: mj.losses.triplet_margin_loss(e, labels, mining=mining, reduction=reduction)
      # swap with a huge reference distance never changes d_an: same loss, streamed path.
      slow = lambda e: mj.losses.triplet_margin_loss(
          e, labels, jnp.concatenate([e]), labels, mining=mining, reduction=reduction,
          pair_mask=~jnp.eye(40, dtype=bool), anchor_tile=7)
      np.testing.assert_allclose(fast(emb), slow(emb), rtol=1e-5)
      np.testing.assert_allclose(jax.grad(fast)(emb), jax.grad(slow)(emb), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("per_class", [3, 6, 12, 20], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("mode", [dict(mining="all"), dict(mining="all", soft=True),
                                  dict(mining="semihard")],
                         ids=["all", "all-soft", "semihard"])
def test_grid_size_is_chosen_by_the_most_positives(per_class, mode, use_grid):
  """B = 40 (more than the largest grid): K - 1 positives select the grid of
  4, 8 or 16 positives, or the fallback (K = 20); every branch matches the
  loop reference, values and gradients equal the fallback's."""
  emb = jnp.asarray(random_embeddings(17, 40, 5, scale=0.5))
  labels = jnp.asarray(np.arange(40) // per_class)
  loss = lambda e: mj.losses.triplet_margin_loss(e, labels, margin=0.4, reduction="mean",
                                                 **mode)
  got = jax.jit(jax.value_and_grad(loss))(emb)
  np.testing.assert_allclose(got[0], triplet_np(np.asarray(emb), np.asarray(labels),
                                                margin=0.4, reduction="mean", **mode),
                             rtol=1e-5)
  use_grid(())
  want = jax.jit(jax.value_and_grad(loss))(emb)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", [{"mining": "all"}, {"mining": "semihard"},
                                  {"mining": "all", "soft": True, "swap": True}])
def test_tiled_grid_equals_one_piece(monkeypatch, mode):
  """Grids above _grid.GRID_ELEMENTS are reduced in tiles of anchors (7
  per tile, which does not divide B = 40): values and gradients equal the
  one-piece grid, for every reduction, with NaN padding; the 4- and
  16-positive grids both."""
  from metric_jax.losses import _grid
  emb = jnp.asarray(random_embeddings(18, 40, 5, scale=0.5))
  emb = emb.at[37:].set(jnp.nan)
  where = jnp.arange(40) < 37
  reductions = ("mean_nonzero", "mean", "sum")
  for per_class, p in ((4, 4), (12, 16)):
    labels = jnp.asarray(np.arange(40) // per_class)

    def all_reductions(e, labels=labels):   # a new function per call: traced anew
      return [jax.value_and_grad(lambda e, r=r: mj.losses.triplet_margin_loss(
          e, labels, margin=0.4, reduction=r, where=where, **mode))(e) for r in reductions]

    monkeypatch.setattr(_grid, "GRID_ELEMENTS", 1 << 62)
    want = jax.jit(functools.partial(all_reductions))(emb)
    monkeypatch.setattr(_grid, "GRID_ELEMENTS", 7 * p * 40)
    got = jax.jit(functools.partial(all_reductions))(emb)
    for reduction, (value, grad), (want_value, want_grad) in zip(reductions, got, want):
      what = f"{mode} K={per_class} {reduction}"
      np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=what)
      np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6, err_msg=what)
      assert np.all(np.isfinite(grad)), what


def test_none_reduction_shapes():
  emb = random_embeddings(16, 6, 3)
  labels = np.array([0, 0, 1, 1, 2, 2])
  assert mj.losses.triplet_margin_loss(emb, labels, reduction="none").shape == (6, 6, 6)
  assert mj.losses.triplet_margin_loss(emb, labels, mining="hard", reduction="none").shape == (6,)
  assert mj.losses.triplet_margin_loss(emb, labels, mining="semihard", semihard="tf",
                                       reduction="none").shape == (6, 6)
  cube = mj.losses.triplet_margin_loss(emb, labels, reduction="none")
  np.testing.assert_allclose(cube.sum(), triplet_np(emb, labels, reduction="sum"), rtol=1e-5)


@pytest.mark.parametrize("mode,sizes", MODE_PATHS)
def test_contract(mode, sizes, use_grid):
  use_grid(sizes)
  check_loss_contract(
      lambda e, l, **kw: mj.losses.triplet_margin_loss(e, l, margin=0.5, **mode, **kw),
      grad_loss_fn=lambda e, l: mj.losses.triplet_margin_loss(e, l, margin=0.5, reduction="mean",
                                                              **mode),
      grad_eps=1e-4 if mode["mining"] == "semihard" else 1e-3)


def test_contract_soft_swap():
  check_loss_contract(lambda e, l, **kw: mj.losses.triplet_margin_loss(
      e, l, margin=0.5, soft=True, swap=True, **kw),
      grad_loss_fn=lambda e, l: mj.losses.triplet_margin_loss(
          e, l, margin=0.5, soft=True, swap=True, reduction="mean"))


def test_collapsed_embeddings_give_margin_and_zero_gradient():
  emb = jnp.ones((8, 4))
  labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  for mining in ("all", "hard"):
    val, grad = jax.value_and_grad(
        lambda e: mj.losses.triplet_margin_loss(e, labels, margin=0.2, mining=mining))(emb)
    np.testing.assert_allclose(val, 0.2, rtol=1e-6)
    assert np.all(np.isfinite(grad))


def test_pair_mask_composes_with_batch_hard():
  emb = random_embeddings(17, 12, 4)
  labels = label_layouts()["m_per_class"]
  d = np_pairwise(emb, emb)
  mask = np.zeros((12, 12), bool)
  for a in range(12):
    P = [p for p in range(12) if labels[p] == labels[a] and p != a]
    N = [n for n in range(12) if labels[n] != labels[a]]
    mask[a, max(P, key=lambda j: d[a, j])] = True
    mask[a, min(N, key=lambda j: d[a, j])] = True
  mined = mj.losses.triplet_margin_loss(emb, labels, mining="all", pair_mask=jnp.asarray(mask))
  hard = mj.losses.triplet_margin_loss(emb, labels, mining="hard")
  np.testing.assert_allclose(mined, hard, rtol=1e-5)


def test_vmap_over_margins_and_hyperparameters():
  emb = jnp.asarray(random_embeddings(18, 12, 4))
  labels = jnp.asarray(label_layouts()["m_per_class"])
  margins = jnp.array([0.1, 0.3, 0.9])
  got = jax.vmap(lambda m: mj.losses.triplet_margin_loss(emb, labels, margin=m, mining="semihard"))(margins)
  for k, m in enumerate([0.1, 0.3, 0.9]):
    np.testing.assert_allclose(got[k], triplet_np(np.asarray(emb), np.asarray(labels), margin=m,
                                                  mining="semihard"), rtol=1e-5)


@pytest.mark.parametrize("soft", [False, True])
def test_batch_all_b2048_fits_in_2gib(soft):
  # Both lax.cond branches (grid and sorted/streamed fallback) are compiled.
  b, d = 2048, 128
  labels = jnp.asarray(np.repeat(np.arange(b // 4), 4))
  step = jax.jit(jax.value_and_grad(
      lambda e: mj.losses.triplet_margin_loss(e, labels, soft=soft)))
  peak = compiled_peak_bytes(step, jax.ShapeDtypeStruct((b, d), jnp.float32))
  assert peak is not None and peak < 2 * 1024 ** 3, peak


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`mining` must be one of"):
    mj.losses.triplet_margin_loss(emb, lab, mining="hardest")
  with pytest.raises(ValueError, match="`semihard` must be one of"):
    mj.losses.triplet_margin_loss(emb, lab, semihard="pml")
  with pytest.raises(ValueError, match="`band_select` must be one of"):
    mj.losses.triplet_margin_loss(emb, lab, band_select="some")
  with pytest.raises(ValueError, match="`margin` must be a scalar"):
    mj.losses.triplet_margin_loss(emb, lab, margin=jnp.ones(4))
  with pytest.raises(TypeError, match="`labels` must be an integer array"):
    mj.losses.triplet_margin_loss(emb, lab.astype(jnp.float32))
  with pytest.raises(ValueError, match="`labels` must have length 4"):
    mj.losses.triplet_margin_loss(emb, lab[:3])
  with pytest.raises(ValueError, match="`anchor_tile` must be >= 1"):
    mj.losses.triplet_margin_loss(emb, lab, anchor_tile=0)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("layout", ["m_per_class", "with_singletons"])
def test_pml_parity(layout):
  import torch
  from pytorch_metric_learning import losses as pml_losses
  from pytorch_metric_learning import miners as pml_miners
  emb = random_embeddings(19, 12, 6)
  labels = label_layouts()[layout]
  te, tl = torch.tensor(emb), torch.tensor(labels)
  unit = np_normalize(emb).astype(np.float32)
  # TripletMarginLoss(margin) == batch-all, AvgNonZero.
  want = pml_losses.TripletMarginLoss(margin=0.1)(te, tl).item()
  np.testing.assert_allclose(mj.losses.triplet_margin_loss(unit, labels, margin=0.1), want, rtol=1e-5)
  # smooth_loss and swap.
  want = pml_losses.TripletMarginLoss(margin=0.1, smooth_loss=True, swap=True)(te, tl).item()
  got = mj.losses.triplet_margin_loss(unit, labels, margin=0.1, soft=True, swap=True)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # BatchHardMiner + TripletMarginLoss == mining="hard".
  loss = pml_losses.TripletMarginLoss(margin=0.2)
  want = loss(te, tl, pml_miners.BatchHardMiner()(te, tl)).item()
  got = mj.losses.triplet_margin_loss(unit, labels, margin=0.2, mining="hard")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # TripletMarginMiner(semihard) + TripletMarginLoss == FaceNet band, every member.
  miner = pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")
  want = pml_losses.TripletMarginLoss(margin=0.3)(te, tl, miner(te, tl)).item()
  got = mj.losses.triplet_margin_loss(unit, labels, margin=0.3, mining="semihard")
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("mode", [dict(mining="all"), dict(mining="semihard")])
@pytest.mark.parametrize("soft,swap", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
def test_max_positives_path_matches_reference(mode, soft, swap, reduction):
  emb = random_embeddings(20, 12, 4, scale=0.6)
  labels = label_layouts()["with_singletons"]  # at most 2 positives per anchor
  kw = dict(margin=0.4, soft=soft, swap=swap, reduction=reduction, **mode)
  got = mj.losses.triplet_margin_loss(emb, labels, max_positives=2, **kw)
  np.testing.assert_allclose(got, triplet_np(emb, labels, **kw), rtol=1e-5, atol=1e-6)
  grad_fast = jax.grad(lambda e: mj.losses.triplet_margin_loss(e, labels, max_positives=3, **kw))(emb)
  grad_slow = jax.grad(lambda e: mj.losses.triplet_margin_loss(e, labels, **kw))(emb)
  np.testing.assert_allclose(grad_fast, grad_slow, rtol=1e-4, atol=1e-6)


def test_max_positives_overflow_is_nan():
  emb = random_embeddings(21, 12, 4)
  labels = label_layouts()["with_singletons"]
  assert np.isnan(mj.losses.triplet_margin_loss(emb, labels, max_positives=1))
  with pytest.raises(ValueError, match="`max_positives` must be >= 1"):
    mj.losses.triplet_margin_loss(emb, labels, max_positives=0)


@pytest.mark.parametrize("labels_kind", ["pk", "big_class"])
@pytest.mark.parametrize("soft", [False, True])
def test_runtime_switch_between_paths(labels_kind, soft):
  """B > 16: lax.cond picks the grid (PK) or the fallback (a class of 20)."""
  emb = random_embeddings(22, 30, 4, scale=0.5)
  if labels_kind == "pk":
    labels = np.repeat(np.arange(10), 3)
  else:
    labels = np.array([0] * 20 + list(range(1, 11)))
  for mining in ("all", "semihard"):
    got = jax.jit(lambda e: mj.losses.triplet_margin_loss(e, labels, margin=0.3, soft=soft,
                                                          mining=mining))(emb)
    want = triplet_np(emb, labels, margin=0.3, soft=soft, mining=mining)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
