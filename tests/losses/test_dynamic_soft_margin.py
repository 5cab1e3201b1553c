"""dynamic_soft_margin_loss vs a loop reference, its running histogram, the
loss contract and PML."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import metric_jax as mj
from tests import helpers
from tests.helpers import (HAS_PML, check_loss_contract, label_layouts, np_normalize,
                           np_pairwise, random_embeddings, reference_case)

LOSS = mj.losses.dynamic_soft_margin_loss


def dsm_np(emb, labels, ref=None, ref_labels=None, *, histogram=None, min_val=-2.0,
           num_bins=10, momentum=0.01, mining="all", batch_histogram="normalized",
           distance="euclidean", reduction="mean", where=None, ref_where=None,
           pair_mask=None):
  """The formula with explicit loops over triplets / positive pairs (float64).
  Returns ``(loss, new_histogram)``."""
  same = ref is None
  if same:
    ref, ref_labels, ref_where = emb, labels, where
  d = np_pairwise(emb, ref, distance)
  if distance in ("cosine", "dot"):
    d = -d

  def ok(i, j):
    if (where is not None and not where[i]) or (ref_where is not None and not ref_where[j]):
      return False
    return pair_mask is None or bool(pair_mask[i, j])

  def is_pos(i, j):
    return ok(i, j) and labels[i] == ref_labels[j] and not (same and i == j)

  def is_neg(i, j):
    return ok(i, j) and labels[i] != ref_labels[j]

  terms = []   # (anchor, delta)
  for a in range(len(emb)):
    for p in range(len(ref)):
      if not is_pos(a, p):
        continue
      if mining == "all":
        for n in range(len(ref)):
          if is_neg(a, n):
            terms.append((a, d[a, p] - d[a, n]))
      else:
        cands = ([d[a, n] for n in range(len(ref)) if is_neg(a, n)]
                 + [d[k, p] for k in range(len(emb)) if is_neg(k, p)])
        if cands:
          terms.append((a, d[a, p] - min(cands)))
  width = 2 * abs(min_val) / num_bins

  def position(delta):
    return min(max((delta - min_val) / width, 0.0), num_bins - 1.0)

  h = np.zeros(num_bins)
  for _, delta in terms:    # 1 - frac to the node below, frac to the node above
    t = position(delta)
    lo = int(np.floor(t))
    h[lo] += 1 - (t - lo)
    if lo + 1 < num_bins:
      h[lo + 1] += t - lo
  old = np.zeros(num_bins) if histogram is None else np.asarray(histogram, np.float64)
  if not terms:
    new = old
  else:
    batch = h / len(terms) if batch_histogram == "normalized" else h
    mixed = (1 - momentum) * old + momentum * batch if old.sum() != 0 else batch
    new = mixed / mixed.sum()
  cdf = np.cumsum(new)
  per_anchor = np.zeros(len(emb))
  for a, delta in terms:
    per_anchor[a] += cdf[int(np.floor(position(delta)))] * delta
  if reduction == "none":
    return per_anchor, new
  total = per_anchor.sum()
  if reduction == "mean":
    total /= max(len(terms), 1)
  return total, new


def _check(emb, labels, *args, rtol=1e-5, **kw):
  got, got_hist = LOSS(emb, labels, *args, return_histogram=True, **kw)
  want, want_hist = dsm_np(emb, labels, *args, **kw)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5)
  np.testing.assert_allclose(got_hist, want_hist, rtol=rtol, atol=1e-7)
  assert got_hist.dtype == jnp.float32 and got.dtype == jnp.float32


SETTINGS = [
    {},
    dict(min_val=-1.0, num_bins=7, momentum=0.3, batch_histogram="counts",
         histogram=np.array([0.1, 0.3, 0.0, 0.2, 0.1, 0.2, 0.1])),
    dict(min_val=-3.0, num_bins=4, momentum=0.5, histogram=np.array([0.5, 0.0, 0.25, 0.25])),
]


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("mining", ["all", "hardest"])
def test_matches_loop_reference(layout, mining):
  # Unnormalised Gaussian embeddings: deltas beyond the nodes exercise the
  # clamping; unit vectors stay inside them.
  emb = random_embeddings(1, 12, 5)
  labels = label_layouts()[layout]
  for x in (emb, np_normalize(emb).astype(np.float32)):
    for reduction in ("mean", "sum", "none"):
      _check(x, labels, mining=mining, reduction=reduction)
    for kw in SETTINGS[1:]:
      _check(x, labels, mining=mining, **kw)
  for kw in SETTINGS[1:]:
    _check(emb, labels, mining=mining, reduction="none", **kw)


@pytest.mark.parametrize("mining", ["all", "hardest"])
def test_reference_set_where_pair_mask_and_cosine(mining):
  emb, ref, labels, ref_labels, where, ref_where, mask = reference_case()
  for kw in SETTINGS[:2]:
    _check(emb, labels, ref, ref_labels, where=where, ref_where=ref_where,
           pair_mask=jnp.asarray(mask), mining=mining, **kw)
  self_mask = np.random.default_rng(1).random((10, 10)) < 0.7
  _check(emb, labels, where=where, pair_mask=jnp.asarray(self_mask), mining=mining)
  _check(emb, labels, distance="cosine", mining=mining)
  _check(emb, labels, ref, ref_labels, distance="dot", mining=mining, min_val=-8.0)


def test_state_threads_through_a_sequence_under_jit():
  labels = jnp.asarray(label_layouts(12)["with_singletons"])
  traces = []

  @jax.jit
  def step(e, hist):
    traces.append(1)
    return LOSS(e, labels, histogram=hist, momentum=0.2, return_histogram=True)

  for batch_histogram in ("normalized", "counts"):
    hist, want_hist = mj.losses.init_dynamic_soft_margin_histogram(), None
    for seed in range(4):
      emb = np_normalize(random_embeddings(seed, 12, 8)).astype(np.float32)
      if batch_histogram == "normalized":
        loss, hist = step(emb, hist)
      else:
        loss, hist = LOSS(emb, labels, histogram=hist, momentum=0.2, return_histogram=True,
                          batch_histogram="counts")
      want, want_hist = dsm_np(emb, np.asarray(labels), histogram=want_hist, momentum=0.2,
                               batch_histogram=batch_histogram)
      np.testing.assert_allclose(loss, want, rtol=1e-5)
      np.testing.assert_allclose(hist, want_hist, rtol=1e-5, atol=1e-7)
  assert len(traces) == 1
  # The two mixing rules really differ after the first step.
  assert not np.allclose(dsm_np(emb, np.asarray(labels), histogram=want_hist)[1],
                         dsm_np(emb, np.asarray(labels), histogram=want_hist,
                                batch_histogram="counts")[1])


def test_empty_state_and_empty_batch():
  emb = jnp.asarray(random_embeddings(4, 6, 3))
  hist = jnp.array([0.0, 0.2, 0.5, 0.3])
  for labels in (jnp.arange(6), jnp.zeros(6, jnp.int32)):
    for mining in ("all", "hardest"):
      fn = jax.value_and_grad(lambda e: LOSS(e, labels, histogram=hist, num_bins=4,
                                             mining=mining, return_histogram=True),
                              has_aux=True)
      (loss, new), grad = fn(emb)
      assert float(loss) == 0.0 and float(jnp.abs(grad).max()) == 0.0
      np.testing.assert_array_equal(new, hist)
  # From the empty state, too.
  _, new = LOSS(emb, jnp.arange(6), return_histogram=True)
  np.testing.assert_array_equal(new, np.zeros(10))
  # The empty state takes the batch alone, whatever the momentum (PML).
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  _check(emb, labels, momentum=0.0)
  np.testing.assert_allclose(LOSS(emb, labels, momentum=0.0), LOSS(emb, labels, momentum=1.0),
                             rtol=1e-6)


def test_gradient_treats_the_histogram_as_a_constant():
  emb = jnp.asarray(np_normalize(random_embeddings(33, 8, 4)).astype(np.float32))
  labels = jnp.array([0, 0, 1, 1, 2, 2, 2, 3])
  for mining in ("all", "hardest"):
    kw = dict(mining=mining, min_val=-1.0, num_bins=6)
    g = jax.grad(lambda e: LOSS(e, labels, **kw))(emb)
    # The updated histogram carries no gradient.
    _, pullback = jax.vjp(lambda e: LOSS(e, labels, return_histogram=True, **kw)[1], emb)
    assert float(jnp.abs(pullback(jnp.arange(1.0, 7.0))[0]).max()) == 0.0
    # The gradient is that of the loss whose CDF weights are frozen at this
    # batch's updated histogram (momentum 0 keeps it as is) ...
    _, hist = LOSS(emb, labels, return_histogram=True, **kw)
    frozen = jax.jit(lambda e: LOSS(e, labels, histogram=hist, momentum=0.0, **kw))
    np.testing.assert_allclose(g, jax.grad(frozen)(emb), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g).max()) > 0
    # ... a piecewise-linear function of the distances whose numerical
    # gradient is meaningful where no delta is near a bin edge (checked).
    u = np_pairwise(emb, emb)[np.triu_indices(8, 1)]
    deltas = (u[:, None] - u[None, :])[~np.eye(len(u), dtype=bool)]   # d_ij - d_kl
    edges = (deltas + 1.0) / (2.0 / 6)
    assert np.min(np.abs(edges - np.round(edges))) > 1e-3
    check_grads(frozen, (emb,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-4)


@pytest.mark.parametrize("mining", ["all", "hardest"])
def test_contract(monkeypatch, mining):
  # The CDF weights are stop-gradient (paper), while finite differences of
  # the value also move the histogram: the numerical gradient check cannot
  # apply here (check_loss_contract has no flag for it).
  # test_gradient_treats_the_histogram_as_a_constant checks the gradient.
  monkeypatch.setattr(helpers, "check_grads", lambda *args, **kwargs: None)
  check_loss_contract(lambda e, l, **kw: LOSS(e, l, mining=mining, **kw))


def test_duplicates_and_half_precision():
  emb = random_embeddings(6, 12, 6)
  emb[1] = emb[0]
  emb[4] = emb[0]               # delta = 0 exactly: on the node num_bins / 2
  labels = label_layouts(12)["m_per_class"]
  for mining in ("all", "hardest"):
    _check(emb, labels, mining=mining)
    for dt in (jnp.bfloat16, jnp.float16):
      low = jnp.asarray(emb).astype(dt)
      val, grad = jax.value_and_grad(lambda e: LOSS(e, labels, mining=mining))(low)
      want, _ = dsm_np(np.asarray(low, np.float64), labels, mining=mining)
      assert val.dtype == jnp.float32 and grad.dtype == dt
      np.testing.assert_allclose(val, want, rtol=2e-2, atol=2e-3)
      assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  collapsed = jnp.ones((12, 6))
  val, grad = jax.value_and_grad(lambda e: LOSS(e, labels))(collapsed)
  assert float(val) == 0.0 and np.all(np.isfinite(grad))


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="`mining` must be one of"):
    LOSS(emb, lab, mining="semihard")
  with pytest.raises(ValueError, match="`batch_histogram` must be one of"):
    LOSS(emb, lab, batch_histogram="pml")
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    LOSS(emb, lab, reduction="mean_nonzero")
  with pytest.raises(ValueError, match="`min_val` must be < 0, got 2.0"):
    LOSS(emb, lab, min_val=2.0)
  with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\], got 1.5"):
    LOSS(emb, lab, momentum=1.5)
  with pytest.raises(ValueError, match="`momentum` must be >= 0"):
    LOSS(emb, lab, momentum=-0.1)
  with pytest.raises(TypeError, match="`num_bins` must be a Python int"):
    LOSS(emb, lab, num_bins=10.0)
  with pytest.raises(ValueError, match=r"`histogram` must have shape \(10,\) .*got \(8,\)"):
    LOSS(emb, lab, histogram=jnp.zeros(8))
  with pytest.raises(TypeError, match="`histogram` must be a floating-point array"):
    LOSS(emb, lab, histogram=jnp.zeros(10, jnp.int32))
  with pytest.raises(ValueError, match="`num_bins` must be >= 1"):
    mj.losses.init_dynamic_soft_margin_histogram(0)
  with pytest.raises(TypeError, match="`labels` must be an integer array"):
    LOSS(emb, jnp.ones(4))


def _pml(**kw):
  from pytorch_metric_learning import losses as pml_losses
  return pml_losses.DynamicSoftMarginLoss(**kw)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_parity_first_call_and_reference_set():
  import torch
  for layout in ("m_per_class", "with_singletons", "all_singletons"):
    emb = random_embeddings(7, 12, 16)
    labels = label_layouts()[layout]
    want = _pml()(torch.tensor(emb), torch.tensor(labels)).item()
    got = LOSS(np_normalize(emb).astype(np.float32), labels)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  ref = random_embeddings(8, 9, 16)
  ref_labels = np.array([0, 1, 1, 2, 3, 3, 4, 9, 9])
  kw = dict(min_val=-1.0, num_bins=20, momentum=0.3)
  want = _pml(**kw)(torch.tensor(emb), torch.tensor(labels), ref_emb=torch.tensor(ref),
                    ref_labels=torch.tensor(ref_labels)).item()
  got = LOSS(np_normalize(emb).astype(np.float32), labels,
             np_normalize(ref).astype(np.float32), ref_labels, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
@pytest.mark.parametrize("kw", [{}, dict(min_val=-1.0, num_bins=20, momentum=0.3)])
def test_pml_parity_over_a_sequence(kw):
  import torch
  pml = _pml(**kw)
  hist = mj.losses.init_dynamic_soft_margin_histogram(kw.get("num_bins", 10))
  layouts = ["m_per_class", "with_singletons", "all_singletons", "one_class", "m_per_class"]
  for step, layout in enumerate(layouts):
    emb = random_embeddings(10 + step, 12, 16)
    labels = label_layouts()[layout]
    with torch.no_grad():   # PML's histogram keeps a graph (its issue #731)
      want = float(pml(torch.tensor(emb), torch.tensor(labels)))
    got, hist = LOSS(np_normalize(emb).astype(np.float32), labels, histogram=hist,
                     batch_histogram="counts", return_histogram=True, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"step {step}")
    np.testing.assert_allclose(hist, pml.hist_.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_parity_label_free_pairs():
  # PML without labels: embeddings[i] <-> ref_emb[i] are the positive pairs,
  # negatives the hardest of row and column (HardNet).
  import torch
  anchors = random_embeddings(11, 10, 16)
  positives = anchors + 0.5 * random_embeddings(12, 10, 16)
  for kw in ({}, dict(min_val=-1.0, num_bins=5)):
    want = _pml(**kw)(torch.tensor(anchors), None, ref_emb=torch.tensor(positives)).item()
    ids = np.arange(10)
    got = LOSS(np_normalize(anchors).astype(np.float32), ids,
               np_normalize(positives).astype(np.float32), ids, mining="hardest", **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5)
