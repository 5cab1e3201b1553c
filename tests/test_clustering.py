"""Tests of metric_jax.clustering: k-means(++) against scikit-learn and plain
NumPy, masked / vmapped use (magnet loss), NMI / AMI against scikit-learn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.cluster import KMeans

from metric_jax import clustering as cl


def blobs(seed, n_per=20, k=4, d=3, spread=0.05, sep=4.0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(k, d)) * sep
  y = np.repeat(np.arange(k), n_per)
  x = centers[y] + spread * rng.normal(size=(len(y), d))
  perm = rng.permutation(len(y))
  return x[perm].astype(np.float32), y[perm]


def np_inertia(x, centers):
  """Sum of squared distances to the nearest centre (loops, float64)."""
  x = np.asarray(x, np.float64)
  c = np.asarray(centers, np.float64)
  return sum(min(np.sum((xi - ck) ** 2) for ck in c) for xi in x)


def np_lloyd_step(x, centers):
  """One Lloyd step from the definition (empty clusters keep their centre)."""
  x = np.asarray(x, np.float64)
  c = np.asarray(centers, np.float64)
  assign = np.array([np.argmin([np.sum((xi - ck) ** 2) for ck in c]) for xi in x])
  new = c.copy()
  for k in range(len(c)):
    if np.any(assign == k):
      new[k] = x[assign == k].mean(0)
  return new


def test_finds_planted_partition():
  x, y = blobs(0)
  res = cl.kmeans(x, 4, key=jax.random.key(0))
  pred = np.asarray(res.assignments)
  assert skm.adjusted_rand_score(y, pred) == 1.0
  assert res.centers.shape == (4, 3) and res.centers.dtype == jnp.float32
  assert res.assignments.dtype == jnp.int32
  assert float(res.inertia) == pytest.approx(np_inertia(x, res.centers), rel=1e-5)
  # Converged centres are the cluster means.
  for k in range(4):
    np.testing.assert_allclose(res.centers[k], x[pred == k].mean(0), rtol=1e-5, atol=1e-5)
  assert int(res.num_iters_run) < 50  # early stop by tolerance


def test_inertia_matches_sklearn():
  # Touching blobs: a single k-means++ run lands in a worse local optimum about one time in
  # five (for scikit-learn too), so both keep the best of 8 restarts.
  x, _ = blobs(9, spread=0.7, sep=2.0)
  ours = cl.kmeans(x, 4, key=jax.random.key(3), num_restarts=8, num_iters=100)
  sk = KMeans(4, init="k-means++", n_init=8, max_iter=100, random_state=0).fit(x.astype(np.float64))
  assert float(ours.inertia) <= sk.inertia_ * 1.01
  assert float(ours.inertia) == pytest.approx(np_inertia(x, ours.centers), rel=1e-5)


def test_lloyd_step_matches_numpy():
  x, _ = blobs(2, spread=1.0, sep=1.0)
  init = x[:4] + 0.1
  one = cl.kmeans(x, 4, key=jax.random.key(0), num_iters=1, tol=0.0, init_centers=init)
  np.testing.assert_allclose(one.centers, np_lloyd_step(x, init), rtol=1e-5, atol=1e-6)
  assert int(one.num_iters_run) == 1
  zero = cl.kmeans(x, 4, key=jax.random.key(0), num_iters=0, init_centers=init)
  np.testing.assert_allclose(zero.centers, init, atol=1e-6)  # (centred internally)


def test_deterministic_given_key_and_seeding_picks_points():
  x, _ = blobs(3, spread=0.5, sep=1.0)
  a = cl.kmeans(x, 4, key=jax.random.key(7), num_iters=0)  # k-means++ seeding only
  b = cl.kmeans(x, 4, key=jax.random.key(7), num_iters=0)
  np.testing.assert_array_equal(a.centers, b.centers)
  # Every seed is a data point (up to the rounding of internal centring), all distinct.
  for c in np.asarray(a.centers):
    assert np.any(np.all(np.isclose(x, c, rtol=0, atol=1e-6), axis=1))
  assert len({tuple(c) for c in np.asarray(a.centers)}) == 4
  c = cl.kmeans(x, 4, key=jax.random.key(8), num_iters=0)
  assert not np.array_equal(a.centers, c.centers)


def test_restarts_keep_lowest_inertia():
  x, _ = blobs(4, spread=1.5, sep=1.0)
  key = jax.random.key(1)
  single = cl.kmeans(x, 4, key=key, num_restarts=1)
  multi = cl.kmeans(x, 4, key=key, num_restarts=8)
  assert float(multi.inertia) <= float(single.inertia)  # restart 0 is the single run


def test_warm_start():
  x, y = blobs(5)
  res = cl.kmeans(x, 4, key=jax.random.key(0))
  warm = cl.kmeans(x, 4, key=jax.random.key(123), init_centers=res.centers)
  np.testing.assert_allclose(warm.centers, res.centers, rtol=1e-6, atol=1e-6)
  assert int(warm.num_iters_run) == 1
  np.testing.assert_array_equal(warm.assignments, res.assignments)


def test_masked_points_are_ignored():
  x, y = blobs(6, n_per=18)  # 72 points + 8 NaN padding rows = the shared 80 x 3 shape
  xp = np.concatenate([x, np.full((8, 3), np.nan, np.float32)])
  w = np.arange(len(xp)) < len(x)
  res = cl.kmeans(xp, 4, key=jax.random.key(2), where=w)
  assert np.all(np.asarray(res.assignments)[~w] == -1)
  assert np.all(np.isfinite(res.centers)) and np.isfinite(float(res.inertia))
  assert skm.adjusted_rand_score(y, np.asarray(res.assignments)[w]) == 1.0
  assert float(res.inertia) == pytest.approx(np_inertia(x, res.centers), rel=1e-5)
  for k in range(4):  # centres are means of valid points only
    np.testing.assert_allclose(res.centers[k], x[np.asarray(res.assignments)[w] == k].mean(0),
                               rtol=1e-5, atol=1e-5)


def test_vmap_over_padded_classes():
  """Magnet-loss usage: per-class k-means over padded arrays with masks."""
  k, n_max, d = 3, 12, 2
  rng = np.random.default_rng(0)
  sizes = [12, 7, 2, 0]  # the third class has fewer valid points than K, the last none
  xs = rng.normal(size=(len(sizes), n_max, d)).astype(np.float32)
  ws = np.arange(n_max)[None, :] < np.array(sizes)[:, None]
  xs[~ws] = np.nan
  keys = jax.random.split(jax.random.key(0), len(sizes))
  fn = jax.jit(jax.vmap(lambda x, w, key: cl.kmeans(x, k, key=key, where=w)))
  res = fn(jnp.asarray(xs), jnp.asarray(ws), keys)
  assert res.centers.shape == (len(sizes), k, d)
  assert np.all(np.isfinite(res.centers)) and np.all(np.isfinite(res.inertia))
  for i, n in enumerate(sizes):
    one = cl.kmeans(xs[i], k, key=keys[i], where=ws[i])  # vmap == loop
    np.testing.assert_allclose(res.centers[i], one.centers, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.assignments[i], one.assignments)
    assert np.all(np.asarray(res.assignments[i])[n:] == -1)
  # Two valid points, three clusters: both points are centres (one duplicated), inertia 0.
  small = np.asarray(res.centers[2])
  valid = xs[2, :2]
  assert all(np.any(np.all(np.isclose(valid, c), axis=1)) for c in small)
  assert float(res.inertia[2]) == 0.0
  assert len(set(np.asarray(res.assignments[2])[:2].tolist()) - {-1}) == 2  # one centre each
  # No valid point: zero centres, zero inertia.
  assert np.all(np.asarray(res.centers[3]) == 0) and float(res.inertia[3]) == 0.0


def test_half_precision_input():
  x, y = blobs(7)
  res = cl.kmeans(jnp.asarray(x, jnp.bfloat16), 4, key=jax.random.key(0))
  assert res.centers.dtype == jnp.float32
  assert skm.adjusted_rand_score(y, np.asarray(res.assignments)) == 1.0


def test_kmeans_bad_input():
  x = np.zeros((5, 2), np.float32)
  with pytest.raises(TypeError, match="`num_clusters`"):
    cl.kmeans(x, 2.0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="`num_clusters`"):
    cl.kmeans(x, 0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="`where` must have shape"):
    cl.kmeans(x, 2, key=jax.random.key(0), where=np.ones(4, bool))
  with pytest.raises(TypeError, match="`where` must be a boolean"):
    cl.kmeans(x, 2, key=jax.random.key(0), where=np.ones(5, np.int32))
  with pytest.raises(ValueError, match="`init_centers`"):
    cl.kmeans(x, 2, key=jax.random.key(0), init_centers=np.zeros((3, 2)))
  with pytest.raises(ValueError, match="`x` must have rank 2"):
    cl.kmeans(x[:, 0], 2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="`key`"):
    cl.kmeans(x, 2, key=None)
  with pytest.raises(ValueError, match="`tol`"):
    cl.kmeans(x, 2, key=jax.random.key(0), tol=-1.0)


# --------------------------------------------------------------------------
# NMI / AMI.
# --------------------------------------------------------------------------


def np_nmi(a, b):
  """NMI (arithmetic) from the definition with explicit loops."""
  n = len(a)
  ua, ub = sorted(set(a)), sorted(set(b))
  if len(ua) == len(ub) == 1:
    return 1.0
  p = {(i, j): sum(1 for s, t in zip(a, b) if s == i and t == j) / n for i in ua for j in ub}
  pa = {i: sum(1 for s in a if s == i) / n for i in ua}
  pb = {j: sum(1 for t in b if t == j) / n for j in ub}
  mi = sum(v * np.log(v / (pa[i] * pb[j])) for (i, j), v in p.items() if v > 0)
  ha = -sum(v * np.log(v) for v in pa.values())
  hb = -sum(v * np.log(v) for v in pb.values())
  return 0.0 if mi <= 1e-15 else mi / ((ha + hb) / 2)


def label_pairs():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 6, size=60)
  return {
      "random": (y, rng.integers(0, 5, size=60)),
      "noisy": (y, np.where(rng.random(60) < 0.3, rng.integers(0, 6, size=60), y)),
      "permuted_identical": (y, (y * 7 + 3) % 11),
      "one_cluster": (y, np.zeros(60, int)),
      "both_one": (np.full(60, 4), np.zeros(60, int)),
      "singletons": (y, np.arange(60)),
      "large_values": (y * 1_000_003, rng.integers(-5, 5, size=60)),
  }


@pytest.mark.parametrize("name", list(label_pairs()))
def test_nmi_matches_reference_and_sklearn(name):
  a, b = label_pairs()[name]
  got = float(cl.nmi(a, b))
  assert got == pytest.approx(skm.normalized_mutual_info_score(a, b), abs=1e-5)
  assert got == pytest.approx(np_nmi(list(a), list(b)), abs=1e-5)


@pytest.mark.parametrize("name", list(label_pairs()))
def test_ami_matches_sklearn(name):
  a, b = label_pairs()[name]
  assert cl.ami(a, b) == pytest.approx(skm.adjusted_mutual_info_score(a, b), abs=1e-10)


def test_ami_larger_random():
  rng = np.random.default_rng(1)
  a = rng.integers(0, 40, size=3000)
  b = np.where(rng.random(3000) < 0.5, a, rng.integers(0, 35, size=3000))
  assert cl.ami(a, b) == pytest.approx(skm.adjusted_mutual_info_score(a, b), abs=1e-10)


def test_nmi_under_jit():
  a, b = label_pairs()["noisy"]
  f = jax.jit(lambda a, b: cl.nmi(a, b, num_classes=6, num_clusters=6))
  assert float(f(a, b)) == pytest.approx(skm.normalized_mutual_info_score(a, b), abs=1e-5)
  with pytest.raises(ValueError, match="num_classes"):
    jax.jit(lambda a, b: cl.nmi(a, b))(a, b)


def test_scores_bad_input():
  with pytest.raises(ValueError, match="`labels_pred` must have length 3"):
    cl.nmi([0, 1, 1], [0, 1])
  with pytest.raises(TypeError, match="`labels_true` must be an integer"):
    cl.ami(np.array([0.5, 1.0]), np.array([0, 1]))


def test_kmeans_nmi_planted():
  x, y = blobs(8)
  assert cl.kmeans_nmi(x, y, key=jax.random.key(0)) == 1.0
