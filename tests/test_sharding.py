"""Tests of metric_jax.sharding on the 8 fake CPU devices of conftest.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from metric_jax import sharding
from tests.helpers import random_embeddings

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")


def test_make_mesh_default_uses_all_devices():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.devices.size == len(jax.devices())
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


@pytest.mark.parametrize("n", [1, 2, 8])
def test_make_mesh_sizes(n):
  mesh = sharding.make_mesh(n)
  assert mesh.devices.size == n
  assert list(mesh.devices.flat) == jax.devices()[:n]


def test_make_mesh_bad_sizes():
  with pytest.raises(ValueError, match="num_devices"):
    sharding.make_mesh(0)
  with pytest.raises(ValueError, match="num_devices"):
    sharding.make_mesh(len(jax.devices()) + 1)
  with pytest.raises(TypeError, match="num_devices"):
    sharding.make_mesh(2.0)


def test_shardings_specs():
  mesh = sharding.make_mesh(8)
  assert sharding.batch_sharding(mesh).spec == jax.P("data")
  assert sharding.replicated(mesh).spec == jax.P()
  tree = {"a": jnp.zeros(3), "b": (jnp.zeros((2, 2)),)}
  sh = sharding.state_shardings(tree, mesh)
  assert jax.tree.structure(sh) == jax.tree.structure(tree)
  assert all(s.spec == jax.P() for s in jax.tree.leaves(sh))


def test_shard_batch_splits_rows_over_devices():
  mesh = sharding.make_mesh(8)
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  y = np.arange(16, dtype=np.int32)
  out = sharding.shard_batch({"x": x, "y": y}, mesh)
  assert out["x"].shape == (16, 3) and out["y"].shape == (16,)
  assert out["x"].sharding.spec == jax.P("data")
  np.testing.assert_array_equal(np.asarray(out["x"]), x)
  shards = sorted(out["x"].addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == 8
  for k, s in enumerate(shards):
    np.testing.assert_array_equal(np.asarray(s.data), x[2 * k:2 * k + 2])


def test_check_batch_size():
  mesh = sharding.make_mesh(8)
  sharding.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match="batch_size.*divisible by the number of devices"):
    sharding.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match="eval_bs"):
    sharding.check_batch_size(3, mesh, "eval_bs")


def test_local_batch_slice_single_process():
  assert sharding.local_batch_slice(32) == slice(0, 32)


def test_initialize_distributed_is_a_noop_without_arguments():
  assert sharding.initialize_distributed() is False


@pytest.mark.parametrize("loss_name", ["contrastive_loss", "triplet_margin_loss"])
def test_loss_on_sharded_global_batch_equals_unsharded(loss_name):
  """Negatives come from every device: the loss (and its gradient) of the
  8-way sharded batch is that of the whole batch on one device."""
  loss_fn = getattr(mj.losses, loss_name)
  emb = random_embeddings(0, b=16, d=6)
  labels = np.repeat(np.arange(4), 4).astype(np.int32)
  # Each device's local rows hold a single class: a per-device loss would
  # have no negatives at all.
  f = jax.jit(jax.value_and_grad(lambda e, l: loss_fn(e, l)))
  ref_v, ref_g = f(jnp.asarray(emb), jnp.asarray(labels))
  mesh = sharding.make_mesh(8)
  batch = sharding.shard_batch({"e": emb, "l": labels}, mesh)
  v, g = f(batch["e"], batch["l"])
  np.testing.assert_allclose(float(v), float(ref_v), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=1e-5, atol=1e-7)
  assert float(ref_v) > 0
  per_device = jax.jit(jax.vmap(loss_fn))(jnp.asarray(emb.reshape(8, 2, 6)),
                                           jnp.asarray(labels.reshape(8, 2)))
  assert float(jnp.mean(per_device)) != pytest.approx(float(ref_v))
