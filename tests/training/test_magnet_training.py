"""Magnet loss in the training pipeline (configs/digits_magnet.py).

The loop builds the cluster index from the embeddings of the whole training
set, passes each batch's cluster ids to the loss, folds the per-example
losses and the batch variance back into the sampler, refreshes the index,
saves it next to the checkpoints (exact resume) and reports the eq. 6
nearest-cluster accuracy next to the kNN metrics. The sharded step (8 fake
devices) with the cluster ids on the data axis matches the 1-device step.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from configs import digits_magnet
from metric_jax import data, magnet_index as mi, sharding
from metric_jax.data.magnet_sampler import MagnetSampler
from metric_jax.training import config as config_lib
from metric_jax.training import loop, optim, state as state_lib, steps
from metric_jax.training import objective as objective_lib
from tests.training import common


def _config(steps, **overrides):
  c = digits_magnet.get_config("runlocal")
  for key, value in {**common.TINY, "num_train_steps": steps, "checkpoint_every": 3,
                     "sampler__refresh_every": 3, **overrides}.items():
    node, parts = c, key.split("__")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


def _index(workdir, step):
  with np.load(workdir / loop.SAMPLER_DIR / f"step_{step}.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 6-step run, and the same run stopped at step 3 and resumed."""
  a = tmp_path_factory.mktemp("magnet_a")
  b = tmp_path_factory.mktemp("magnet_b")
  metrics = loop.train_and_evaluate(_config(6), a)
  loop.train_and_evaluate(_config(3), b)
  loop.train_and_evaluate(_config(6), b)
  return a, b, metrics


def test_run_trains_refreshes_and_reports_nearest_cluster_accuracy(runs):
  a, _, metrics = runs
  assert np.isfinite(metrics["train_loss"])
  for key in ("nearest_cluster_accuracy", "train_nearest_cluster_accuracy"):
    assert 0.0 < metrics[key] <= 1.0
  assert 0.0 < metrics["precision_at_1"] <= 1.0
  exp = loop.setup(_config(6), a)
  init = exp.init_state()
  final = common.read_state(_config(6), a, 6)
  changed = [not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(jax.tree.leaves(init.params), jax.tree.leaves(final.params))]
  assert all(changed)
  i3, i6 = _index(a, 3), _index(a, 6)
  # One batch variance and M*D = 40 per-example losses folded in per step.
  assert int(i3["variance_count"]) == 3 and int(i6["variance_count"]) == 6
  assert int(i6["cluster_loss_count"].sum()) == 6 * 40
  assert float(i6["variance"]) > 0
  # The refresh at step 3 re-clustered moved embeddings.
  assert not np.allclose(i3["centers"], i6["centers"])
  assert i6["centers"].shape == (5 * 2, 64)
  np.testing.assert_array_equal(i6["labels"], exp.splits.train.labels)


def test_resumed_run_equals_uninterrupted_run(runs):
  a, b, _ = runs
  common.assert_states_equal(common.read_state(_config(6), a, 6),
                             common.read_state(_config(6), b, 6))
  ia, ib = _index(a, 6), _index(b, 6)
  assert set(ia) == set(ib)
  for k in ia:
    np.testing.assert_array_equal(ia[k], ib[k], err_msg=k)


def test_evaluate_checkpoint_uses_the_saved_index(runs):
  a, _, metrics = runs
  out = loop.evaluate_checkpoint(_config(6), a)
  assert out["nearest_cluster_accuracy"] == pytest.approx(metrics["nearest_cluster_accuracy"])
  assert out["precision_at_1"] == pytest.approx(metrics["precision_at_1"])


def test_bad_magnet_configs_raise():
  c = _config(6)
  with c.unlocked():
    c.sampler.name = "m_per_class"
    c.sampler.kwargs = {"m": 8}
  with pytest.raises(ValueError, match="sampler.name"):
    config_lib.validate(c)
  c = _config(6, sampler__refresh_every=0)
  with pytest.raises(ValueError, match="refresh_every"):
    config_lib.validate(c)
  c = _config(6)
  with c.unlocked():
    c.loss.kwargs = {"alpha": 1.0, "num_clusters": 10}
  with pytest.raises(ValueError, match="num_clusters"):
    config_lib.validate(c)
  with pytest.raises(ValueError, match="num_clusters"):
    objective_lib.TrainObjective(_config(6))


_Flat = common.FlatModel


def _preprocess(x, rng, train):
  return data.preprocess(x, rng, train=train)


@functools.lru_cache(maxsize=None)
def _flat_run(num_devices, num_steps=2):
  """Steps of the magnet objective with a small model; the batches carry the
  sampler's cluster ids."""
  splits = data.load("digits")
  x = splits.train.images(np.arange(len(splits.train))).reshape(len(splits.train), -1)
  sampler = MagnetSampler(None, 4, 4, seed=0, labels=splits.train.labels,
                          clusters_per_class=2)
  sampler.update_embeddings(x.astype(np.float32) / 255.0)
  objective = objective_lib.TrainObjective(_config(6), num_clusters=sampler.num_clusters)
  # SGD, not Adam: the magnet loss is translation invariant, so some biases
  # get gradients at rounding level, which Adam would scale to full steps.
  tx, _ = optim.make_optimizer({"name": "sgd", "learning_rate": 0.1, "weight_decay": 0.0,
                                "schedule": "constant"}, total_steps=10)
  init = functools.partial(state_lib.init_train_state, model=_Flat(), objective=objective,
                           tx=tx, input_shape=(8, 8, 1), num_classes=5, embedding_dim=8)
  mesh = sharding.make_mesh(num_devices)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state = jax.jit(init, out_shardings=sharding.state_shardings(abstract, mesh))(
      jax.random.key(0))
  step = steps.jit_train_step(
      steps.make_train_step(_Flat(), objective, tx, preprocess=_preprocess,
                            normalize_embeddings=False), abstract, mesh)
  history = []
  for s in range(num_steps):
    idx = sampler.batch_indices(s)
    batch = {"images": splits.train.images(idx),
             "labels": splits.train.labels[idx].astype(np.int32),
             "extras": sampler.batch_extras(s)}
    state, metrics = step(state, sharding.shard_batch(batch, mesh), jax.random.key(1))
    history.append(jax.device_get(metrics))
  return state, history, sampler


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_sharded_step_with_cluster_ids_equals_one_device():
  s1, h1, sampler = _flat_run(1)
  s8, h8, _ = _flat_run(8)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  for m1, m8 in zip(h1, h8):
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=2e-4)
    np.testing.assert_allclose(m1["feedback"]["losses"], m8["feedback"]["losses"],
                               rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(m1["feedback"]["variance"], m8["feedback"]["variance"],
                               rtol=2e-4)
    assert np.isfinite(m1["loss"]) and m1["feedback"]["losses"].shape == (16,)
  # The feedback is the per-example magnet loss: its mean is the step's loss.
  np.testing.assert_allclose(np.mean(h1[0]["feedback"]["losses"]), h1[0]["loss"], rtol=1e-5)
  # Feeding it back changes the seed distribution of the sampler.
  before = sampler.seed_probabilities()
  sampler.update_from_step(sampler.batch_cluster_ids(0), h1[0]["feedback"]["losses"],
                           h1[0]["feedback"]["variance"])
  assert not np.allclose(before, sampler.seed_probabilities())
  assert sampler.index.variance == pytest.approx(float(h1[0]["feedback"]["variance"]))


def test_nearest_cluster_accuracy_against_a_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 3)).astype(np.float32)
  y = np.repeat(np.arange(4), 10)
  x[:, 0] += 3.0 * y            # separable classes along the first axis
  acc = mi.nearest_cluster_accuracy(x, y, clusters_per_class=1, variance=1.0, L=4)
  # K = 1: the centre of a class is the mean of its even-position examples;
  # eq. 6 with L = all 4 centres and sigma^2 = 1 is a softmax over classes.
  centers = np.stack([x[y == c][0::2].mean(0) for c in range(4)])
  q = np.concatenate([x[y == c][1::2] for c in range(4)])
  qy = np.repeat(np.arange(4), 5)
  pred = np.argmin(((q[:, None] - centers[None]) ** 2).sum(-1), axis=1)
  assert acc == pytest.approx(np.mean(pred == qy))
  with pytest.raises(ValueError, match="variance"):
    mi.nearest_cluster_accuracy(x, y, clusters_per_class=1, variance=0.0)
  with pytest.raises(ValueError, match="2 classes"):
    mi.nearest_cluster_accuracy(x[:10], y[:10], clusters_per_class=1, variance=1.0)
