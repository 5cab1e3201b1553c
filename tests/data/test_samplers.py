"""Stateless samplers: batch composition, determinism, epochs, errors."""

from __future__ import annotations

import numpy as np
import pytest

from metric_jax import data
from metric_jax.data import samplers

# 7 classes of sizes 5, 1, 3, 8, 2, 4, 6 with non-contiguous ids, shuffled.
_SIZES = {10: 5, 11: 1, 13: 3, 20: 8, 21: 2, 30: 4, 31: 6}
LABELS = np.random.default_rng(0).permutation(
    np.concatenate([np.full(n, c) for c, n in _SIZES.items()]))


# ----------------------------------------------------------------- random


def test_random_sampler_shape_and_determinism():
  s = data.RandomSampler(10, 4, seed=3)
  b = s.batch_indices(5)
  assert b.shape == (4,) and b.dtype == np.int64
  np.testing.assert_array_equal(b, data.RandomSampler(10, 4, seed=3).batch_indices(5))
  assert not all(np.array_equal(s.batch_indices(t), data.RandomSampler(10, 4, seed=4)
                                .batch_indices(t)) for t in range(3))
  # Stateless: the order of the calls does not matter.
  later_first = [s.batch_indices(t) for t in (7, 2, 0)]
  again = [s.batch_indices(t) for t in (7, 2, 0)]
  for u, v in zip(later_first, again):
    np.testing.assert_array_equal(u, v)


def test_random_sampler_epochs():
  n, b = 10, 4
  s = data.RandomSampler(n, b, seed=1)
  stream = np.concatenate([s.batch_indices(t) for t in range(10)])  # 40 = 4 epochs
  for e in range(4):
    window = stream[e * n:(e + 1) * n]
    np.testing.assert_array_equal(np.sort(window), np.arange(n))
  assert not np.array_equal(stream[:n], stream[n:2 * n])  # reshuffled each epoch
  assert s.steps_per_epoch == 2.5


def test_random_sampler_batch_larger_than_dataset():
  s = data.RandomSampler(3, 8, seed=0)
  b = s.batch_indices(0)
  assert b.shape == (8,)
  np.testing.assert_array_equal(np.sort(b[:3]), np.arange(3))
  np.testing.assert_array_equal(np.sort(b[3:6]), np.arange(3))


# ----------------------------------------------------------------- m per class


def _groups(batch, labels, m):
  return [labels[batch[i:i + m]] for i in range(0, len(batch), m)]


@pytest.mark.parametrize("batch_size,m", [(6, 2), (12, 4), (21, 3)])
def test_m_per_class_composition(batch_size, m):
  s = data.MPerClassSampler(LABELS, batch_size, m, seed=0)
  p = batch_size // m
  for step in range(25):
    batch = s.batch_indices(step)
    assert batch.shape == (batch_size,) and batch.dtype == np.int64
    assert batch.min() >= 0 and batch.max() < len(LABELS)
    groups = _groups(batch, LABELS, m)
    classes = [g[0] for g in groups]
    # P distinct classes, each exactly m times, laid out class by class.
    assert len(set(classes)) == p
    assert all((g == g[0]).all() for g in groups)
    np.testing.assert_array_equal(classes, s.classes[s.batch_classes(step)])
    for k in range(p):
      members = batch[k * m:(k + 1) * m]
      if _SIZES[classes[k]] >= m:
        assert len(set(members.tolist())) == m  # without replacement
      else:
        assert len(set(members.tolist())) <= _SIZES[classes[k]]


def test_m_per_class_exact_small_case():
  labels = np.repeat([0, 1, 2, 3], 3)  # examples 3k..3k+2 are class k
  s = data.MPerClassSampler(labels, batch_size=4, m=2, seed=5)
  assert s.steps_per_epoch == 2
  seen = []
  for step in range(2):
    batch = s.batch_indices(step)
    classes = s.batch_classes(step)
    for row, k in enumerate(classes):
      pair = batch[2 * row:2 * row + 2]
      assert set(pair.tolist()) <= {3 * k, 3 * k + 1, 3 * k + 2} and pair[0] != pair[1]
    seen += classes.tolist()
  assert sorted(seen) == [0, 1, 2, 3]  # one epoch = every class exactly once


def test_m_per_class_epoch_coverage():
  s = data.MPerClassSampler(LABELS, batch_size=6, m=2, seed=2)  # P = 3, C = 7
  assert s.steps_per_epoch == 3
  for epoch in range(4):
    steps = range(epoch * 3, epoch * 3 + 3)
    classes = np.concatenate([s.batch_classes(t) for t in steps])
    counts = np.bincount(classes, minlength=7)
    assert counts.min() >= 1  # every class covered within the epoch
    assert counts.sum() == 9 and (counts == 2).sum() == 2  # the 2 fill-ins of the last batch
    np.testing.assert_array_equal(classes[:7], s.epoch_classes(epoch))
  assert not np.array_equal(s.epoch_classes(0), s.epoch_classes(1))


def test_m_per_class_all_examples_eventually_drawn():
  s = data.MPerClassSampler(LABELS, batch_size=8, m=4, seed=0)
  drawn = np.concatenate([s.batch_indices(t) for t in range(60)])
  assert set(drawn.tolist()) == set(range(len(LABELS)))


def test_m_per_class_determinism():
  a = data.MPerClassSampler(LABELS, 6, 2, seed=9)
  b = data.MPerClassSampler(LABELS.copy(), 6, 2, seed=9)
  c = data.MPerClassSampler(LABELS, 6, 2, seed=10)
  for t in (0, 1, 17, 1000):
    np.testing.assert_array_equal(a.batch_indices(t), b.batch_indices(t))
  assert any(not np.array_equal(a.batch_indices(t), c.batch_indices(t)) for t in range(5))


def test_m_per_class_all_classes_in_one_batch():
  labels = np.repeat(np.arange(3), 2)
  s = data.MPerClassSampler(labels, batch_size=6, m=2)
  assert s.steps_per_epoch == 1
  for t in range(3):
    np.testing.assert_array_equal(np.sort(s.batch_indices(t)), np.arange(6))


def test_m_per_class_errors():
  with pytest.raises(ValueError, match=r"`batch_size` \(10\).*multiple of `m` \(4\)"):
    data.MPerClassSampler(LABELS, 10, 4)
  with pytest.raises(ValueError, match=r"7 classes.*fewer than.*8"):
    data.MPerClassSampler(LABELS, 16, 2)
  with pytest.raises(ValueError, match="`m`"):
    data.MPerClassSampler(LABELS, 4, 0)
  with pytest.raises(TypeError, match="`batch_size`"):
    data.MPerClassSampler(LABELS, 4.0, 2)
  with pytest.raises(ValueError, match="`labels`"):
    data.MPerClassSampler(LABELS.reshape(-1, 1), 4, 2)
  with pytest.raises(TypeError, match="`labels`"):
    data.MPerClassSampler(LABELS.astype(float), 4, 2)
  s = data.MPerClassSampler(LABELS, 4, 2)
  with pytest.raises(ValueError, match="`step`"):
    s.batch_indices(-1)
  with pytest.raises(TypeError, match="`step`"):
    s.batch_indices(1.0)
  with pytest.raises(ValueError, match="`seed`"):
    data.RandomSampler(5, 2, seed=-1)
  with pytest.raises(ValueError, match="`num_examples`"):
    data.RandomSampler(0, 2)


# ----------------------------------------------------------------- build


def test_build_sampler():
  s = data.build_sampler("m_per_class", LABELS, 6, seed=4, m=3)
  assert isinstance(s, data.MPerClassSampler) and s.m == 3 and s.seed == 4
  np.testing.assert_array_equal(s.batch_indices(2),
                                data.MPerClassSampler(LABELS, 6, 3, seed=4).batch_indices(2))
  r = data.build_sampler("random", LABELS, 5, seed=1)
  assert isinstance(r, data.RandomSampler) and r.num_examples == len(LABELS)
  assert set(data.SAMPLER_NAMES) <= set(data.sampler_names())


def test_build_sampler_errors():
  with pytest.raises(ValueError, match=r"`name`.*'m_per_class'.*'random'.*'magic'"):
    data.build_sampler("magic", LABELS, 4)
  with pytest.raises(ValueError, match="needs `m`"):
    data.build_sampler("m_per_class", LABELS, 4)


def test_register_sampler(monkeypatch):
  monkeypatch.setattr(samplers, "_SAMPLERS", dict(samplers._SAMPLERS))

  class Fixed:
    def __init__(self, labels, batch_size, seed=0, offset=0):
      self.batch_size, self.offset = batch_size, offset

    def batch_indices(self, step):
      return np.arange(self.batch_size, dtype=np.int64) + self.offset + step

  data.register_sampler("fixed", Fixed)
  s = data.build_sampler("fixed", LABELS, 3, offset=10)
  np.testing.assert_array_equal(s.batch_indices(1), [11, 12, 13])
  assert "fixed" in data.sampler_names()
