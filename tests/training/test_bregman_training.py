"""Learned Bregman divergences in the training pipeline
(configs/digits_bregman.py, ``config.loss.distance = "bregman"``).

The generator's parameters live in ``loss_params["bregman"]``, receive
gradients through the loss, are checkpointed with orbax and restored, and
define the retrieval metric at evaluation. (The sharded step
is covered generically by tests/training/test_steps.py and, with per-batch
extras, by test_magnet_training.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from configs import digits_bregman
from metric_jax import bregman, evaluation
from metric_jax.training import config as config_lib
from metric_jax.training import loop
from metric_jax.training import objective as objective_lib
from tests.training import common


def _config(arg="runlocal", **overrides):
  c = digits_bregman.get_config(arg)
  # The data mesh of all (8 fake) devices: the learned divergence inside the
  # sharded step.
  for key, value in {**common.TINY, "num_train_steps": 4, "checkpoint_every": 2,
                     "num_devices": min(8, len(jax.devices())), **overrides}.items():
    node, parts = c, key.split("__")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bregman")
  metrics = loop.train_and_evaluate(_config(), workdir)
  return workdir, metrics


def _phi_leaves(state):
  return jax.tree.leaves(state.loss_params["bregman"]["phi_params"])


def test_generator_trains_is_checkpointed_and_restored(run):
  workdir, metrics = run
  assert np.isfinite(metrics["train_loss"])
  exp = loop.setup(_config(), workdir)
  init = exp.init_state()
  s2 = common.read_state(_config(), workdir, 2)
  s4 = common.read_state(_config(), workdir, 4)
  assert [p.shape for p in _phi_leaves(init)] == [p.shape for p in _phi_leaves(s4)]
  # Every generator parameter moved, and kept moving after the restore point.
  for a, b, c in zip(_phi_leaves(init), _phi_leaves(s2), _phi_leaves(s4)):
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(b), np.asarray(c))
  # The trained generator is still convex (midpoint inequality).
  module = bregman.make_generator("icnn", hidden_features=(8,), eps=1e-3)
  x, y = jax.random.normal(jax.random.key(0), (2, 64, 64))
  phi = lambda z: module.apply(s4.loss_params["bregman"]["phi_params"], z)
  assert bool(jnp.all(phi((x + y) / 2) <= (phi(x) + phi(y)) / 2 + 1e-5))


def test_evaluation_retrieves_with_the_learned_divergence(run):
  workdir, metrics = run
  state = common.read_state(_config(), workdir)
  exp = loop.setup(_config(), workdir)
  emb, labels = exp.embed_split(state, "test")
  dist = bregman.bregman_distance_from_params(
      jax.device_get(state.loss_params["bregman"]["phi_params"]), generator="icnn",
      hidden_features=(8,), eps=1e-3)
  ref = evaluation.evaluate(emb, labels, k_values=(1, 2, 4, 8), metric=dist, normalize=True,
                            clustering=False)
  for key in ("precision_at_1", "map_at_r"):
    assert metrics[key] == pytest.approx(float(ref[key]), abs=1e-6)
  assert loop.evaluate_checkpoint(_config(), workdir)["map_at_r"] == pytest.approx(
      metrics["map_at_r"], abs=1e-6)


def test_objective_equals_the_loss_with_the_divergence_and_grads_reach_phi():
  c = _config()
  obj = objective_lib.TrainObjective(c)
  params = obj.init_params(jax.random.key(0), 5, 6)
  emb = mj.distances.l2_normalize(jax.random.normal(jax.random.key(1), (12, 6)))
  labels = jnp.repeat(jnp.arange(4), 3)
  def reference(p):
    dist = bregman.bregman_distance_from_params(p["bregman"]["phi_params"], generator="icnn",
                                                hidden_features=(8,), eps=1e-3)
    return mj.losses.triplet_margin_loss(emb, labels, margin=0.1, mining="semihard",
                                         distance=dist)

  @jax.jit   # one compilation for the objective, its gradient and the reference
  def run(p):
    (total, terms), grads = jax.value_and_grad(lambda q: obj(emb, labels, q), has_aux=True)(p)
    return total, terms, grads, reference(p)

  total, terms, grads, ref = run(params)
  np.testing.assert_allclose(total, ref, rtol=1e-6)
  assert set(terms) == {"triplet_margin_loss"}
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["bregman"]))
  # The fixed squared-norm generator gives the squared Euclidean distance.
  sq = objective_lib.TrainObjective(_config("runlocal,squared_norm"))
  assert "bregman" not in sq.init_params(jax.random.key(0), 5, 6)
  ref_sq = mj.losses.triplet_margin_loss(emb, labels, margin=0.1, mining="semihard",
                                         distance="squared_euclidean")
  np.testing.assert_allclose(sq(emb, labels, {})[0], ref_sq, rtol=1e-5, atol=1e-6)


def test_bad_bregman_configs_raise():
  c = _config()
  with c.unlocked():
    c.loss.bregman.generator = "relu_net"
  with pytest.raises(ValueError, match="bregman.generator"):
    config_lib.validate(c)
  c = _config()
  with c.unlocked():
    c.loss.distance = "cosine"
  with pytest.raises(ValueError, match="loss.distance"):
    config_lib.validate(c)
  c = _config()
  with c.unlocked():
    c.loss.distance = "default"
  with pytest.raises(ValueError, match="eval.metric"):
    config_lib.validate(c)
  c = _config("runlocal,squared_norm")
  with c.unlocked():
    c.loss.bregman.kwargs = {"eps": 1.0}
  with pytest.raises(ValueError, match="fixed generator"):
    config_lib.validate(c)
