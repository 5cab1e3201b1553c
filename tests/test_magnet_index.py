"""Tests of the magnet-loss cluster index (per-class k-means, running
statistics, eq. 6 prediction)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metric_jax import magnet_index as mi


def _planted(seed=0, classes=3, k=2, per=6, dim=2, spread=0.05):
  """Class c has k well separated blobs; returns (x, labels, blob id)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes * k, dim)) * 10
  blob = np.repeat(np.arange(classes * k), per)
  x = centres[blob] + spread * rng.normal(size=(len(blob), dim))
  perm = rng.permutation(len(blob))
  return x[perm].astype(np.float32), (blob[perm] // k).astype(np.int32), blob[perm]


def _same_partition(a, b):
  # Two labelings define the same partition iff pairs agree everywhere.
  return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_finds_planted_partition_and_is_deterministic():
  x, y, blob = _planted()
  idx = mi.build_index(x, y, clusters_per_class=2, key=jax.random.key(0))
  assert idx.centers.shape == (6, 2)
  assert _same_partition(idx.assignments, blob)
  # Each cluster holds one class, and that is its center_class.
  for c in range(6):
    assert set(y[idx.assignments == c]) == {idx.center_classes[c]}
  np.testing.assert_array_equal(idx.cluster_sizes, np.full(6, 6))
  again = mi.build_index(x, y, clusters_per_class=2, key=jax.random.key(0))
  np.testing.assert_array_equal(again.assignments, idx.assignments)
  np.testing.assert_array_equal(again.centers, idx.centers)


def test_k_larger_than_class_gives_empty_clusters():
  x = np.array([[0.], [1.], [5.], [6.], [7.]], np.float32)
  y = np.array([0, 0, 1, 1, 1])
  idx = mi.build_index(x, y, clusters_per_class=3, key=jax.random.key(1))
  assert np.all(np.isfinite(idx.centers))
  assert idx.cluster_sizes[:3].sum() == 2 and (idx.cluster_sizes[:3] == 0).sum() == 1
  assert idx.cluster_sizes[3:].tolist() == [1, 1, 1]


def test_refresh_follows_moved_embeddings():
  x, y, blob = _planted(1)
  idx = mi.build_index(x, y, clusters_per_class=2, key=jax.random.key(0))
  idx = mi.update_losses(idx, np.array([0, 1]), np.array([2.0, 4.0]))
  # Move: regroup each class into two new groups (even / odd positions of
  # its members), placed at the old centres of that class.
  rng = np.random.default_rng(3)
  x2 = np.empty_like(x)
  new_blob = np.empty_like(blob)
  for c in range(3):
    members = np.flatnonzero(y == c)
    half = np.arange(len(members)) % 2
    x2[members] = idx.centers[2 * c + half] + 0.05 * rng.normal(size=(len(members), 2))
    new_blob[members] = 2 * c + half
  new = mi.refresh(idx, x2, jax.random.key(1))
  assert not _same_partition(new.assignments, idx.assignments)
  np.testing.assert_array_equal(new.assignments, new_blob)  # ids kept (warm start)
  np.testing.assert_array_equal(new.cluster_loss, idx.cluster_loss)  # kept
  np.testing.assert_array_equal(new.center_classes, idx.center_classes)


def test_running_statistics():
  x, y, _ = _planted()
  idx = mi.build_index(x, y, clusters_per_class=2, key=jax.random.key(0))
  np.testing.assert_array_equal(idx.cluster_loss, np.ones(6))
  idx = mi.update_losses(idx, np.array([0, 0, 3]), np.array([1.0, 2.0, 5.0]))
  idx = mi.update_losses(idx, np.array([0, 5]), np.array([4.5, 0.25]))
  expected = np.ones(6)
  expected[0] = (1 + 2 + 4.5) / 3
  expected[3] = 5.0
  expected[5] = 0.25
  np.testing.assert_allclose(idx.cluster_loss, expected, rtol=1e-6)
  np.testing.assert_array_equal(idx.cluster_loss_count, [3, 0, 0, 1, 0, 1])
  v = idx
  for s in (2.0, 4.0, 9.0):
    v = mi.update_variance(v, s)
  assert v.variance == pytest.approx(5.0) and v.variance_count == 3
  e = mi.update_variance(mi.update_variance(idx, 2.0), 4.0, momentum=0.9)
  assert e.variance == pytest.approx(0.9 * 2 + 0.1 * 4)
  with pytest.raises(ValueError, match="cluster_ids"):
    mi.update_losses(idx, np.array([6]), np.array([1.0]))


def np_predict(idx, q, L, var):
  """Loop reference of eq. 6 over the L nearest non-empty centres."""
  out = []
  usable = np.flatnonzero(idx.cluster_sizes > 0)
  for r in q:
    d = {m: float(np.sum((r - idx.centers[m]) ** 2)) for m in usable}
    near = sorted(d, key=d.get)[:L]
    scores = {}
    for m in near:
      c = int(idx.center_classes[m])
      scores[c] = scores.get(c, 0.0) + np.exp(-(d[m] - d[near[0]]) / (2 * var))
    out.append(max(scores, key=scores.get))
  return np.array(out)


def test_prediction_toy_problem():
  x, y, _ = _planted(2, classes=4, k=2, spread=1.5)
  y = y * 10 + 3  # non-contiguous labels come back as themselves
  idx = mi.build_index(x, y, clusters_per_class=2, key=jax.random.key(0))
  idx = mi.update_variance(idx, 4.0)
  rng = np.random.default_rng(0)
  q = (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
  pred = mi.nearest_cluster_predict(idx, q, L=3)
  np.testing.assert_array_equal(pred, np_predict(idx, q, 3, 4.0))
  assert (pred == y).mean() > 0.8
  # L = 1 is the nearest centre's class.
  pred1 = mi.nearest_cluster_predict(idx, q, L=1)
  nearest = np.argmin(((q[:, None] - idx.centers[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(pred1, idx.center_classes[nearest])
  # Soft vote differs from hard 1-NN when two close same-class centres
  # outweigh one slightly nearer other-class centre.
  toy = mi.MagnetIndex(
      centers=np.array([[0.0], [1.1], [1.2]], np.float32), center_classes=np.array([0, 1, 1]),
      assignments=np.array([0, 1, 2]), cluster_loss=np.ones(3, np.float32),
      cluster_loss_count=np.zeros(3, np.int64), cluster_sizes=np.array([1, 1, 1]),
      labels=np.array([0, 1, 1]), variance=1.0, variance_count=1, clusters_per_class=1)
  qq = np.array([[0.5]], np.float32)
  assert mi.nearest_cluster_predict(toy, qq, L=1).tolist() == [0]
  assert mi.nearest_cluster_predict(toy, qq, L=3).tolist() == [1]


def test_bad_input():
  x, y, _ = _planted()
  with pytest.raises(ValueError, match="labels"):
    mi.build_index(x, y[:-1], clusters_per_class=2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="clusters_per_class"):
    mi.build_index(x, y, clusters_per_class=0, key=jax.random.key(0))
  idx = mi.build_index(x, y, clusters_per_class=2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="query"):
    mi.nearest_cluster_predict(idx, np.zeros((2, 3), np.float32))
