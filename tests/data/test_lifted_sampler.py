"""LiftedStructureSampler: batch layout, determinism, hard negatives from an
exact neighbour index, fallbacks and configuration errors."""

import numpy as np
import pytest

from metric_jax.data.lifted_sampler import LiftedStructureSampler, knn_other_label
from tests.helpers import np_pairwise


def knn_np(x, labels, k, metric="euclidean"):
  d = np_pairwise(x, x, metric)
  if metric in ("cosine", "dot"):
    d = -d
  out = np.full((len(x), k), -1)
  for i in range(len(x)):
    cand = [j for j in range(len(x)) if labels[j] != labels[i]]
    cand.sort(key=lambda j: (d[i, j], j))
    out[i, :min(k, len(cand))] = cand[:k]
  return out


def data(n_classes=12, per_class=5, dim=3, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(n_classes), per_class)
  emb = rng.normal(size=(len(labels), dim)).astype(np.float32)
  return labels, emb


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_matches_brute_force(metric):
  labels, emb = data()
  labels = labels.copy()
  labels[:3] = 99                        # a small class among large ones
  # chunk_size does not divide N: exercises the padded last chunk.
  got = knn_other_label(emb, labels, 6, distance=metric, chunk_size=16)
  np.testing.assert_array_equal(got, knn_np(emb, labels, 6, metric))


def test_knn_pads_with_minus_one():
  labels = np.array([0, 0, 0, 1])
  emb = np.arange(8, dtype=np.float32).reshape(4, 2)
  got = knn_other_label(emb, labels, 3)
  np.testing.assert_array_equal(got, [[3, -1, -1], [3, -1, -1], [3, -1, -1], [2, 1, 0]])


def check_layout(batch, labels, batch_size, num_pairs):
  assert batch.shape == (batch_size,) and batch.dtype == np.int64
  assert len(set(batch.tolist())) == batch_size
  pairs = batch[: 2 * num_pairs].reshape(num_pairs, 2)
  assert np.all(labels[pairs[:, 0]] == labels[pairs[:, 1]])
  assert len(set(labels[pairs[:, 0]].tolist())) == num_pairs     # distinct classes


def test_random_batches_before_the_first_update():
  labels, _ = data()
  sampler = LiftedStructureSampler(labels, 16, num_pairs=3, seed=1)
  assert not sampler.has_index
  seen = set()
  for step in range(20):
    batch = sampler.batch_indices(step)
    check_layout(batch, labels, 16, 3)
    pair_classes = set(labels[batch[:6]].tolist())
    # Enough samples outside the pair classes: negatives avoid them.
    assert not pair_classes & set(labels[batch[6:]].tolist())
    np.testing.assert_array_equal(batch, sampler.batch_indices(step))
    seen.add(tuple(batch.tolist()))
  assert len(seen) == 20
  other = LiftedStructureSampler(labels, 16, num_pairs=3, seed=2)
  assert not np.array_equal(other.batch_indices(0), sampler.batch_indices(0))


def test_hard_negatives_after_update():
  labels, emb = data(seed=3)
  sampler = LiftedStructureSampler(labels, 20, num_pairs=4, num_neighbors=5, seed=0)
  sampler.update_embeddings(emb)
  assert sampler.has_index
  neighbors = knn_np(emb, labels, 5)
  for step in range(10):
    batch = sampler.batch_indices(step)
    check_layout(batch, labels, 20, 4)
    members, negatives = batch[:8], batch[8:]
    # Every member's nearest other-class neighbour is in the batch, and
    # with 12 negative slots for 8 members nothing beyond rank 2 is needed
    # unless neighbour lists overlap; all negatives come from the lists.
    for s in members:
      assert neighbors[s, 0] in batch
    assert set(negatives.tolist()) <= set(neighbors[members].ravel().tolist())
    np.testing.assert_array_equal(batch, sampler.batch_indices(step))
  # New embeddings: same pairs (they depend on seed and step only), new
  # hard negatives.
  before = [sampler.batch_indices(s) for s in range(5)]
  sampler.update_embeddings(data(seed=9)[1])
  after = [sampler.batch_indices(s) for s in range(5)]
  for b0, b1 in zip(before, after):
    np.testing.assert_array_equal(b0[:8], b1[:8])
  assert any(set(b0[8:].tolist()) != set(b1[8:].tolist()) for b0, b1 in zip(before, after))


def test_exhausted_neighbour_lists_fall_back_to_random_negatives():
  labels, emb = data(seed=4)
  sampler = LiftedStructureSampler(labels, 30, num_pairs=2, num_neighbors=1, seed=0)
  sampler.update_embeddings(emb)
  neighbors = knn_np(emb, labels, 1)
  batch = sampler.batch_indices(7)
  check_layout(batch, labels, 30, 2)
  for s in batch[:4]:
    assert neighbors[s, 0] in batch


def test_batch_of_pairs_only():
  labels, emb = data()
  sampler = LiftedStructureSampler(labels, 8, num_pairs=4)
  sampler.update_embeddings(emb)
  check_layout(sampler.batch_indices(0), labels, 8, 4)


def test_bad_configurations():
  labels, emb = data(n_classes=3, per_class=2)
  with pytest.raises(ValueError, match="`batch_size` \\(10\\) exceeds the number of samples"):
    LiftedStructureSampler(labels, 10)
  with pytest.raises(ValueError, match="`batch_size` must be an int >= 2"):
    LiftedStructureSampler(labels, 1)
  with pytest.raises(ValueError, match=r"`num_pairs` must be an int in \[1, batch_size // 2 = 2\], got 3"):
    LiftedStructureSampler(labels, 5, num_pairs=3)
  with pytest.raises(ValueError, match="`num_pairs`=3 needs as many classes with >= 2 samples"):
    LiftedStructureSampler(np.array([0, 0, 1, 1, 2, 3]), 6, num_pairs=3)
  with pytest.raises(ValueError, match="single class"):
    LiftedStructureSampler(np.zeros(6, np.int64), 4, num_pairs=1)
  with pytest.raises(ValueError, match="`labels` must be a 1-D integer array"):
    LiftedStructureSampler(np.zeros(6, np.float32), 4)
  with pytest.raises(ValueError, match="`num_neighbors` must be an int >= 1"):
    LiftedStructureSampler(labels, 4, num_neighbors=0)
  sampler = LiftedStructureSampler(labels, 4)
  with pytest.raises(ValueError, match=r"`embeddings` must have shape \[6, D\]"):
    sampler.update_embeddings(emb[:5])
  bad = emb.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="`embeddings` contains NaN"):
    sampler.update_embeddings(bad)
  with pytest.raises(ValueError, match="`step` must be an int >= 0"):
    sampler.batch_indices(-1)


def test_registered_under_lifted_name():
  from metric_jax.data import samplers
  labels = np.repeat(np.arange(6), 3)
  sampler = samplers.build_sampler("lifted", labels, 8, seed=3, num_pairs=2)
  assert isinstance(sampler, LiftedStructureSampler)
  assert "lifted" in samplers.sampler_names()
  np.testing.assert_array_equal(
      sampler.batch_indices(4), LiftedStructureSampler(labels, 8, num_pairs=2, seed=3).batch_indices(4))
