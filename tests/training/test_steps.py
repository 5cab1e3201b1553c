"""The jitted, sharded train step and the embedding pass.

Uses the 8 fake CPU devices of tests/conftest.py: the step on an 8-device
data mesh must match the single-device step. Compilations dominate the
cost, so the compiled steps are shared between tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.training import common
from metric_jax import data, models, sharding
from metric_jax.training import optim, state as state_lib, steps

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")

B = 16


def _preprocess(x, rng, train):
  return data.preprocess(x, rng, train=train)


_Flat = common.FlatModel


def _flat_state(objective, tx):
  return jax.jit(functools.partial(
      state_lib.init_train_state, model=_Flat(), objective=objective, tx=tx,
      input_shape=(8, 8, 1), num_classes=5, embedding_dim=8))(jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _setup():
  splits = data.load("digits")
  model = models.build_model("convnet", embedding_dim=8, features=(8,))
  objective = mj.losses.make_objective([
      mj.losses.LossTerm("contrastive_loss"),
      mj.losses.LossTerm("proxy_anchor_loss", weight=0.1),
  ])
  tx, schedules = optim.make_optimizer(
      {"name": "adamw", "learning_rate": 1e-2, "weight_decay": 1e-4,
       "schedule": "constant", "loss_learning_rate": 1e-1}, total_steps=100)
  init = functools.partial(state_lib.init_train_state, model=model, objective=objective,
                           tx=tx, input_shape=(8, 8, 1),
                           num_classes=splits.num_classes_train, embedding_dim=8)
  state0 = jax.jit(init)(jax.random.key(0))
  step_fn = steps.make_train_step(model, objective, tx, preprocess=_preprocess,
                                  schedule=schedules["model"])
  sampler = data.build_sampler("m_per_class", splits.train.labels, B, m=4)
  batches = []
  for s in range(3):
    idx = sampler.batch_indices(s)
    batches.append({"images": splits.train.images(idx),
                    "labels": splits.train.labels[idx].astype(np.int32)})
  return splits, model, objective, tx, init, state0, step_fn, batches


def _run(num_devices, num_steps=3):
  _, _, _, _, init, _, step_fn, batches = _setup()
  mesh = sharding.make_mesh(num_devices)
  key = jax.random.key(0)
  abstract = jax.eval_shape(init, key)
  state = jax.jit(init, out_shardings=sharding.state_shardings(abstract, mesh))(key)
  train_step = steps.jit_train_step(step_fn, abstract, mesh)
  history = []
  for s in range(num_steps):
    state, metrics = train_step(state, sharding.shard_batch(batches[s % len(batches)], mesh),
                                jax.random.key(1))
    history.append(jax.device_get(metrics))
  return state, history, train_step, mesh


@functools.lru_cache(maxsize=None)
def _runs():
  return _run(1), _run(8)


def test_eight_devices_equal_one_device():
  (s1, h1, _, _), (s8, h8, _, _) = _runs()
  flat1 = jax.tree_util.tree_flatten_with_path(s1)[0]
  flat8 = jax.tree_util.tree_flatten_with_path(s8)[0]
  assert [p for p, _ in flat1] == [p for p, _ in flat8]
  for (path, a), (_, b) in zip(flat1, flat8):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5,
                               err_msg=jax.tree_util.keystr(path))
  for m1, m8 in zip(h1, h8):
    assert set(m1) == set(m8)
    for k in m1:
      np.testing.assert_allclose(m1[k], m8[k], rtol=2e-4, atol=1e-5, err_msg=k)
  assert int(s8.step) == 3


def test_state_is_replicated_and_everything_trains():
  (s1, h1, _, _), (s8, _, _, _) = _runs()
  for leaf in jax.tree.leaves(s8):
    assert leaf.sharding.spec == jax.P()
    assert leaf.sharding.mesh.devices.size == 8
  s0 = _setup()[5]
  for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s8.params)):
    assert not np.allclose(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(s0.batch_stats), jax.tree.leaves(s8.batch_stats)):
    assert not np.allclose(np.asarray(a), np.asarray(b))
  # Learned loss parameters (proxies) are trained too.
  assert not np.allclose(np.asarray(s0.loss_params["proxy_anchor_loss"]["proxies"]),
                         np.asarray(s8.loss_params["proxy_anchor_loss"]["proxies"]))
  assert set(h1[0]) == {"loss", "loss/contrastive_loss", "loss/proxy_anchor_loss",
                        "grad_norm", "learning_rate", "embedding_norm",
                        "embedding_spread"}
  np.testing.assert_allclose(h1[0]["learning_rate"], 1e-2)
  np.testing.assert_allclose(
      h1[0]["loss"], h1[0]["loss/contrastive_loss"] + 0.1 * h1[0]["loss/proxy_anchor_loss"],
      rtol=1e-6)


def test_first_step_matches_a_hand_computed_update():
  """Step 0 by hand: forward, objective on normalised embeddings, AdamW's
  first update (lr * sign-like m/sqrt(v) ...) through optax directly."""
  splits, model, objective, tx, _, s0, _, batches = _setup()
  (_, history, _, _), _ = _runs()
  batch = jax.tree.map(jnp.asarray, batches[0])

  @jax.jit
  def by_hand(state):
    def loss_fn(tree):
      x = data.preprocess(batch["images"], None, train=False)
      emb, upd = model.apply({"params": tree["model"], "batch_stats": state.batch_stats},
                             x, train=True, mutable=["batch_stats"])
      total, _ = objective(mj.distances.l2_normalize(emb), batch["labels"], tree["loss"])
      return total, upd
    tree = {"model": state.params, "loss": state.loss_params}
    (total, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(tree)
    updates, _ = tx.update(g, state.opt_state, tree)
    return total, jax.tree.map(lambda p, u: p + u, tree, updates), upd

  total, tree, upd = by_hand(s0)
  one_step, _, _, _ = _run(1, num_steps=1)
  np.testing.assert_allclose(float(total), history[0]["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(tree["model"]), jax.tree.leaves(one_step.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(upd["batch_stats"]), jax.tree.leaves(one_step.batch_stats)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_state_is_donated():
  _, _, _, _, init, _, _, batches = _setup()
  (_, _, train_step, mesh), _ = _runs()
  key = jax.random.key(0)
  state = jax.jit(init, out_shardings=sharding.state_shardings(
      jax.eval_shape(init, key), mesh))(key)
  old_leaf = jax.tree.leaves(state.params)[0]
  new_state, _ = train_step(state, sharding.shard_batch(batches[0], mesh), jax.random.key(1))
  jax.block_until_ready(new_state)
  assert old_leaf.is_deleted()


def test_loss_decreases_on_a_fixed_batch():
  _, _, _, _, _, s0, _, batches = _setup()
  (_, _, train_step, mesh), _ = _runs()
  state = jax.device_put(jax.tree.map(jnp.copy, s0), sharding.replicated(mesh))
  batch = sharding.shard_batch(batches[0], mesh)
  losses = []
  for _ in range(30):
    state, m = train_step(state, batch, jax.random.key(1))
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.7 * losses[0]
  assert all(np.isfinite(losses))


def test_rng_is_folded_with_the_step():
  """A user preprocess adding noise from its key: the step must hand it
  ``split(fold_in(rng, state.step))[0]``; the same inputs give the same
  result, another step another one."""
  _, _, _, _, _, _, _, batches = _setup()
  model = _Flat()

  def noisy(x, rng, train):
    x = data.preprocess(x, None, train=False)
    return x + 0.5 * jax.random.normal(rng, x.shape) if train else x

  objective = mj.losses.make_objective(["contrastive_loss"])
  tx = optim.make_optimizer({"name": "sgd", "learning_rate": 0.0, "momentum": 0.0}, 10)[0]
  state = _flat_state(objective, tx)
  fn = jax.jit(steps.make_train_step(model, objective, tx, preprocess=noisy))
  batch = jax.tree.map(jnp.asarray, batches[0])
  rng = jax.random.key(7)

  @jax.jit
  def expected(step):
    aug_key = jax.random.split(jax.random.fold_in(rng, step))[0]
    emb, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         noisy(batch["images"], aug_key, True), train=True,
                         mutable=["batch_stats"])
    return mj.losses.contrastive_loss(mj.distances.l2_normalize(emb), batch["labels"])

  losses = {}
  for s in (0, 5):
    st = state.replace(step=jnp.asarray(s, jnp.int32))
    losses[s] = float(fn(st, batch, rng)[1]["loss"])
    assert float(fn(st, batch, rng)[1]["loss"]) == losses[s]
    np.testing.assert_allclose(losses[s], float(expected(s)), rtol=1e-5)
  assert losses[0] != losses[5]


def test_bfloat16_compute_is_finite_and_close():
  _, _, _, _, _, _, _, batches = _setup()
  objective = mj.losses.make_objective(["contrastive_loss", "triplet_margin_loss"])
  tx = optim.make_optimizer({"name": "adamw", "learning_rate": 1e-2}, 10)[0]
  state = _flat_state(objective, tx)
  batch = jax.tree.map(jnp.asarray, batches[0])
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    fn = jax.jit(steps.make_train_step(_Flat(), objective, tx, preprocess=_preprocess,
                                       compute_dtype=dtype))
    out[dtype] = fn(state, batch, jax.random.key(1))
  new, m = out[jnp.bfloat16]
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new))
  # Master weights stay float32; the loss is that of the float32 step, roughly.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
  np.testing.assert_allclose(float(m["loss"]), float(out[jnp.float32][1]["loss"]), rtol=5e-2)
  assert float(m["loss"]) != float(out[jnp.float32][1]["loss"])   # it did run in bf16


def test_embed_source_pads_the_last_batch():
  splits, model, _, _, _, s0, _, _ = _setup()
  mesh = sharding.make_mesh(8)
  embed = steps.jit_embed_fn(steps.make_embed_fn(model, preprocess=_preprocess), mesh)
  idx = np.arange(5, 25)          # 20 rows: one full batch of 16, one padded
  out = steps.embed_source(embed, s0.params, s0.batch_stats, splits.test, mesh, 16,
                           indices=idx)
  assert out.shape == (20, 8) and out.dtype == np.float32
  ref = jax.jit(lambda x: model.apply({"params": s0.params, "batch_stats": s0.batch_stats},
                                      _preprocess(x, None, False), train=False))(
      jnp.asarray(splits.test.images(idx)))
  np.testing.assert_allclose(out, np.asarray(ref), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="eval batch_size"):
    steps.embed_source(embed, s0.params, s0.batch_stats, splits.test, mesh, 12)


def test_prefetch_preserves_order_and_exhausts():
  assert list(steps.prefetch(iter(range(7)), size=3)) == list(range(7))
  assert list(steps.prefetch(iter([]))) == []
