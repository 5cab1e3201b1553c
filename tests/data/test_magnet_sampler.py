"""Tests of the magnet-loss neighbourhood sampler."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metric_jax import magnet_index as mi
from metric_jax.data import samplers
from metric_jax.data.magnet_sampler import MagnetSampler


def _index(seed=0, classes=5, k=2, per=6):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes * k, 3)) * 10
  blob = np.repeat(np.arange(classes * k), per)
  x = (centres[blob] + 0.05 * rng.normal(size=(len(blob), 3))).astype(np.float32)
  y = (blob // k).astype(np.int32)
  return mi.build_index(x, y, clusters_per_class=k, key=jax.random.key(0))


def test_shape_determinism_and_cluster_ids():
  idx = _index()
  s = MagnetSampler(idx, 4, 3, seed=7)
  assert s.batch_size == 12
  ids, cids = s.batch(5)
  assert ids.shape == (12,) and cids.shape == (12,) and ids.dtype == np.int64
  np.testing.assert_array_equal(idx.assignments[ids], cids)
  np.testing.assert_array_equal(s.batch_indices(5), ids)
  np.testing.assert_array_equal(s.batch_cluster_ids(5), cids)
  np.testing.assert_array_equal(MagnetSampler(idx, 4, 3, seed=7).batch_indices(5), ids)
  assert not np.array_equal(s.batch_indices(6), ids) or not np.array_equal(
      s.batch_indices(8), ids)
  # M distinct clusters, D examples each, D distinct examples when possible.
  for step in range(20):
    ids, cids = s.batch(step)
    blocks = cids.reshape(4, 3)
    assert np.all(blocks == blocks[:, :1]) and len(set(blocks[:, 0])) == 4
    for blk in ids.reshape(4, 3):
      assert len(set(blk)) == 3


def test_neighbourhood_property():
  idx = _index(1)
  s = MagnetSampler(idx, 3, 2, seed=0)
  for step in range(30):
    cids = s.batch_cluster_ids(step)[::2]
    seed_c, imps = cids[0], cids[1:]
    own = idx.center_classes[seed_c]
    assert np.all(idx.center_classes[imps] != own)
    d = ((idx.centers - idx.centers[seed_c]) ** 2).sum(-1)
    others = np.flatnonzero((idx.center_classes != own) & (idx.cluster_sizes > 0))
    nearest = others[np.argsort(d[others], kind="stable")[:2]]
    assert set(imps) == set(nearest)


def test_seed_proportional_to_loss():
  idx = _index(2)
  losses = np.zeros(len(idx.cluster_loss))
  losses[3], losses[6] = 3.0, 1.0
  idx = mi.update_losses(idx, np.arange(len(losses)), losses)
  s = MagnetSampler(idx, 2, 2, seed=0)
  n = 2000
  seeds = np.array([s.batch_cluster_ids(t)[0] for t in range(n)])
  assert set(np.unique(seeds)) <= {3, 6}
  frac = np.mean(seeds == 3)
  assert abs(frac - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)
  # update_index changes the distribution.
  idx2 = mi.update_losses(idx, np.array([9] * 50), np.full(50, 100.0))
  s.update_index(idx2)
  seeds = np.array([s.batch_cluster_ids(t)[0] for t in range(200)])
  assert np.mean(seeds == 9) > 0.9


def test_small_cluster_sampled_with_replacement():
  x = np.array([[0.], [0.1], [5.], [5.1], [5.2], [5.3]], np.float32)
  y = np.array([0, 0, 1, 1, 1, 1])
  idx = mi.build_index(x, y, clusters_per_class=1, key=jax.random.key(0))
  s = MagnetSampler(idx, 2, 3, seed=1)
  ids, cids = s.batch(0)
  np.testing.assert_array_equal(idx.assignments[ids], cids)
  assert set(ids[cids == 0]) <= {0, 1}


def test_errors_and_registry():
  idx = _index()
  with pytest.raises(ValueError, match="clusters_per_batch"):
    MagnetSampler(idx, 1, 4)
  with pytest.raises(ValueError, match="examples_per_cluster"):
    MagnetSampler(idx, 4, 1)
  with pytest.raises(ValueError, match="clusters_per_batch"):
    MagnetSampler(idx, 10, 2)  # only 8 other-class clusters
  s = samplers.build_sampler("magnet", idx.labels, 8, seed=3, index=idx, clusters_per_batch=4)
  assert isinstance(s, MagnetSampler) and s.examples_per_cluster == 2
  with pytest.raises(ValueError, match="batch_size"):
    samplers.build_sampler("magnet", idx.labels, 9, index=idx, clusters_per_batch=4,
                           examples_per_cluster=2)
