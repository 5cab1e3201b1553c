"""triplet_center_loss vs a loop reference, its parameters and the loss
contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import metric_jax as mj
from tests.helpers import check_loss_contract, label_layouts, np_pairwise, random_embeddings

NUM_CLASSES = 12


def triplet_center_np(emb, labels, centers, margin=5.0, squared=False, metric="euclidean",
                      where=None, pair_mask=None, reduction="mean"):
  b, c = len(emb), len(centers)
  w = np.ones(b, bool) if where is None else np.asarray(where)
  pm = np.ones((b, c), bool) if pair_mask is None else np.asarray(pair_mask)
  if squared:
    dist = 0.5 * np_pairwise(emb, centers, "squared_euclidean")
  else:
    dist = np_pairwise(emb, centers, metric)
  if metric in ("cosine", "dot"):
    dist = -dist
  terms = []
  for i in range(b):
    if not w[i] or not pm[i, labels[i]]:
      continue
    others = [dist[i, j] for j in range(c) if j != labels[i] and pm[i, j]]
    if not others:
      continue
    terms.append(max(0.0, dist[i, labels[i]] + margin - min(others)))
  terms = np.asarray(terms)
  if reduction == "sum":
    return terms.sum()
  if reduction == "mean":
    return terms.sum() / max(len(terms), 1)
  return terms.sum() / max(int((terms > 0).sum()), 1)


def centers_for(d, seed=1, c=NUM_CLASSES):
  return mj.losses.init_triplet_center(jax.random.key(seed), c, d)["centers"]


@pytest.mark.parametrize("layout", list(label_layouts()))
@pytest.mark.parametrize("metric,squared,margin", [("euclidean", False, 1.0),
                                                   ("euclidean", True, 2.0),
                                                   ("cosine", False, 0.3)])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
def test_matches_loop_reference(layout, metric, squared, margin, reduction):
  emb = random_embeddings(0, 12, 4)
  labels = label_layouts()[layout]
  centers = centers_for(4)
  got = mj.losses.triplet_center_loss(emb, labels, centers=centers, margin=margin,
                                      squared=squared, distance=metric, reduction=reduction)
  want = triplet_center_np(emb, labels, np.asarray(centers), margin, squared, metric,
                           reduction=reduction)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_nearest_other_centre_runs_over_all_classes():
  # Class 2 is not in the batch but its centre is the nearest impostor.
  centers = jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 1.5]])
  emb = jnp.array([[0.0, 0.5], [10.0, 0.1]])
  labels = jnp.array([0, 1])
  got = mj.losses.triplet_center_loss(emb, labels, centers=centers, margin=1.0,
                                      reduction="none")
  np.testing.assert_allclose(got, [0.5 + 1.0 - 1.0, 0.0], rtol=1e-6)


def test_where_and_pair_mask():
  emb = random_embeddings(2, 12, 4)
  labels = label_layouts()["with_singletons"]
  centers = centers_for(4)
  where = np.arange(12) % 4 != 1
  mask = np.random.default_rng(0).random((12, NUM_CLASSES)) < 0.6
  got = mj.losses.triplet_center_loss(emb, labels, centers=centers, margin=3.0, where=where,
                                      pair_mask=mask)
  want = triplet_center_np(emb, labels, np.asarray(centers), 3.0, where=where, pair_mask=mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gradient_with_respect_to_centers():
  emb = jnp.asarray(random_embeddings(3, 12, 4))
  labels = jnp.asarray(label_layouts()["m_per_class"])
  centers = centers_for(4)
  fn = lambda c: mj.losses.triplet_center_loss(emb, labels, centers=c, margin=3.0)
  check_grads(fn, (centers,), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-3)
  g = jax.grad(fn)(centers)
  # Centres of classes absent from the batch move only as nearest impostors.
  assert g.shape == centers.shape and np.all(np.isfinite(g))


def test_init():
  params = mj.losses.init_triplet_center(jax.random.key(0), 50, 200)
  c = np.asarray(params["centers"])
  assert set(params) == {"centers"} and c.shape == (50, 200) and c.dtype == np.float32
  assert abs(c.mean()) < 0.03 and abs(c.std() - 1.0) < 0.03       # standard normal
  with pytest.raises(ValueError, match="`num_classes` must be >= 1"):
    mj.losses.init_triplet_center(jax.random.key(0), 0, 4)
  with pytest.raises(TypeError, match="`embedding_dim` must be a Python int"):
    mj.losses.init_triplet_center(jax.random.key(0), 3, 4.0)


def test_contract():
  centers = centers_for(5)
  # Each sample is compared with centres, not with other samples: singleton
  # classes still cost, so a batch without positive pairs is not zero.
  check_loss_contract(
      lambda e, l, **k: mj.losses.triplet_center_loss(e, l, centers=centers, margin=3.0, **k),
      zero_without_positives=False)


def test_bad_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match=r"`centers` must have the embedding size of `embeddings` \(3\).*size 5"):
    mj.losses.triplet_center_loss(emb, lab, centers=jnp.ones((4, 5)))
  with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 2\)"):
    mj.losses.triplet_center_loss(emb, jnp.array([0, 1, 2, 1]), centers=jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
    mj.losses.triplet_center_loss(emb, jnp.array([0, -1, 2, 1]), centers=jnp.ones((3, 3)))
  with pytest.raises(ValueError, match="`ref_embeddings` is not supported"):
    mj.losses.triplet_center_loss(emb, lab, emb, lab, centers=jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="`centers` needs at least 2 classes"):
    mj.losses.triplet_center_loss(emb, lab * 0, centers=jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="`squared=True`"):
    mj.losses.triplet_center_loss(emb, lab, centers=jnp.ones((2, 3)), squared=True,
                                  distance="cosine")
  with pytest.raises(ValueError, match="`pair_mask` must have shape"):
    mj.losses.triplet_center_loss(emb, lab, centers=jnp.ones((2, 3)),
                                  pair_mask=jnp.ones((4, 4), bool))
  with pytest.raises(ValueError, match="`centers` must be a"):
    mj.losses.triplet_center_loss(emb, lab, centers=None)


def test_out_of_range_labels_under_jit_give_nan_unless_masked():
  centers = jnp.ones((3, 3))
  emb = jnp.zeros((4, 3))
  fn = jax.jit(lambda l, w: mj.losses.triplet_center_loss(emb, l, centers=centers, where=w))
  assert np.isnan(float(fn(jnp.array([0, 1, 7, 1]), jnp.ones(4, bool))))
  # Padding rows may carry any label.
  assert np.isfinite(float(fn(jnp.array([0, 1, -1, 1]), jnp.array([True, True, False, True]))))
  # Also when concrete: masked rows are not checked.
  val = mj.losses.triplet_center_loss(emb, jnp.array([0, 1, -1, 1]), centers=centers,
                                      where=jnp.array([True, True, False, True]))
  assert np.isfinite(float(val))
