"""The validation split of the training classes: ``load(name, validation=True)``."""

from __future__ import annotations

import numpy as np
import pytest

from metric_jax import data
from metric_jax.data import datasets as datasets_lib


def _dataset_ids(source) -> np.ndarray:
  """Dataset class id of every example."""
  return np.asarray(source.class_ids)[source.labels]


def test_digits_validation_uses_only_training_classes():
  full = data.load("digits")
  val = data.load("digits", validation=True)
  train_ids, val_ids = _dataset_ids(val.train), _dataset_ids(val.test)
  # Default fraction 0.4 of the 5 training digits: 0-2 train, 3-4 held out.
  assert np.unique(train_ids).tolist() == [0, 1, 2]
  assert np.unique(val_ids).tolist() == [3, 4]
  # Together they are exactly the training examples; no test digit is read.
  full_ids = _dataset_ids(full.train)
  assert len(val.train) + len(val.test) == len(full.train)
  assert sorted(np.concatenate([train_ids, val_ids]).tolist()) == sorted(full_ids.tolist())
  assert not np.isin(np.concatenate([train_ids, val_ids]), _dataset_ids(full.test)).any()
  # Labels are contiguous per split and the images are the training images.
  assert val.num_classes_train == 3 and val.num_classes_test == 2
  assert set(val.train.labels.tolist()) == {0, 1, 2}
  assert set(val.test.labels.tolist()) == {0, 1}
  assert val.image_shape == full.image_shape
  first_val = val.test.images(np.array([0]))[0]
  positions = np.flatnonzero(full_ids == val_ids[0])
  assert any(np.array_equal(first_val, full.train.images(np.array([p]))[0]) for p in positions)


def test_validation_is_deterministic_and_respects_fraction_and_loader_options():
  a = data.load("digits", validation=True, validation_fraction=0.2,
                train_classes=(1, 3, 5, 7, 9))
  b = data.load("digits", validation=True, validation_fraction=0.2,
                train_classes=(1, 3, 5, 7, 9))
  # round(5 * 0.2) = 1 held-out class: the last training class in id order.
  assert a.train.class_ids.tolist() == [1, 3, 5, 7]
  assert a.test.class_ids.tolist() == [9]
  for split in ("train", "test"):
    x, y = getattr(a, split), getattr(b, split)
    np.testing.assert_array_equal(x.labels, y.labels)
    np.testing.assert_array_equal(x.images(np.arange(len(x))), y.images(np.arange(len(y))))


def test_fraction_is_clipped_to_leave_a_class_on_each_side():
  tiny = data.load("digits", validation=True, validation_fraction=0.01)
  assert tiny.test.class_ids.tolist() == [4]
  big = data.load("digits", validation=True, validation_fraction=0.99)
  assert big.train.class_ids.tolist() == [0]


def test_npz_validation(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10) * 3, 4)          # class ids 0, 3, ..., 27
  images = rng.integers(0, 256, (labels.size, 5, 5), dtype=np.uint8)
  path = tmp_path / "toy.npz"
  np.savez(path, images=images, labels=labels)
  val = data.load("npz", path=path, validation=True, validation_fraction=0.4)
  # npz default: the first half of the classes train (0..12), of which the
  # last round(5 * 0.4) = 2 are held out.
  assert val.train.class_ids.tolist() == [0, 3, 6]
  assert val.test.class_ids.tolist() == [9, 12]
  idx = np.flatnonzero(labels == 9)
  np.testing.assert_array_equal(val.test.images(np.flatnonzero(val.test.labels == 0)),
                                images[idx][..., None])


@pytest.mark.skipif(not datasets_lib.default_omniglot_path().is_file(),
                    reason="omniglot.npz not found")
def test_omniglot_npz_validation_stays_in_the_background_set():
  val = data.load("omniglot_npz", validation=True)
  assert (val.num_classes_train, val.num_classes_test) == (578, 386)
  assert (len(val.train), len(val.test)) == (578 * 20, 386 * 20)
  ids = np.concatenate([val.train.class_ids, val.test.class_ids])
  # Background characters are labels 0..963 of the npz; evaluation ones follow.
  assert sorted(ids.tolist()) == list(range(964))
  assert val.test.class_ids.min() > val.train.class_ids.max()


def test_bad_options_are_rejected():
  with pytest.raises(ValueError, match=r"`validation_fraction`.*\(0, 1\).*1\.5"):
    data.load("digits", validation=True, validation_fraction=1.5)
  with pytest.raises(TypeError, match=r"`validation` must be a bool.*'yes'"):
    data.load("digits", validation="yes")
  with pytest.raises(ValueError, match=r"at least 2 training classes, got 1"):
    datasets_lib.validation_split(data.load("digits", train_classes=(0,)))


def test_sweep_protocol_switches_to_the_validation_split_and_covers_every_loss():
  """experiments/sweep.py: the run configs it builds, and its loss list."""
  from configs import sweep_digits
  from experiments import sweep
  from metric_jax import losses
  from metric_jax.training import config as config_lib
  base = sweep_digits.get_config()
  assert base.data.options.validation is False
  cfg = sweep.run_config(base, "contrastive_loss", {"neg_margin": 0.5}, validation=True)
  assert cfg.is_locked and cfg.data.options.validation is True
  assert cfg.loss.name == "contrastive_loss" and cfg.loss.kwargs.to_dict() == {"neg_margin": 0.5}
  assert base.data.options.validation is False and base.loss.name == "triplet_margin_loss"
  config_lib.validate(cfg)
  splits = data.load(cfg.data.name, **cfg.data.options.to_dict())
  assert splits.train.class_ids.tolist() == [0, 1, 2]
  assert splits.test.class_ids.tolist() == [3, 4]
  # The protocol's PK batches fit the validation split's 3 classes.
  assert cfg.batch_size // cfg.sampler.kwargs.m <= splits.num_classes_train
  # Every loss of the library is swept or skipped with a stated reason.
  available = set(losses.available_losses())
  assert available == set(sweep.LOSS_GRIDS) | set(sweep.SKIPPED)
  assert not set(sweep.LOSS_GRIDS) & set(sweep.SKIPPED)
  # Every grid value builds an objective, and no fixed hyper-parameter is
  # also a learned parameter of the loss (the objective would reject it).
  import jax
  for name, (param, grid, fixed) in sweep.LOSS_GRIDS.items():
    assert grid and param not in fixed, name
    obj = config_lib.objective_from_config(
        sweep.run_config(base, name, {**fixed, param: grid[0]}, validation=False))
    learned = jax.eval_shape(lambda k, o=obj: o.init_params(k, num_classes=3, embedding_dim=4),
                             jax.random.key(0))[name]
    assert not set(learned) & (set(fixed) | {param}), (name, sorted(learned))
