"""Losses on a batch sharded over 8 (fake CPU) devices equal the
single-device losses: jit on the global batch, and the shard_map path of
:func:`metric_jax.streaming.sharded_loss` (local anchors against
all-gathered references, global reductions).

Cross-batch memory and the magnet loss with its cluster index in a jitted
step on the sharded batch equal the single-device step.

The jitted train step on 8 devices vs 1 is tested in
tests/training/test_steps.py (not duplicated here); dense contrastive and
triplet losses on a sharded global batch in tests/test_sharding.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from metric_jax import magnet_index
from metric_jax import memory
from metric_jax import streaming as st

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")

B, D = 16, 6
# Each device's two rows share one class: a per-device loss would have no
# negatives, so equality with the global loss shows they come from all
# devices.
LABELS = np.repeat(np.arange(4), 4).astype(np.int32)

# name -> (streaming loss, dense loss, kwargs shared by both)
CASES = {
    "contrastive": (st.streaming_contrastive_loss, mj.losses.contrastive_loss,
                    {"neg_margin": 4.0}),
    "triplet_hard": (st.streaming_triplet_margin_loss, mj.losses.triplet_margin_loss,
                     {"mining": "hard", "margin": 1.0}),
    "triplet_all": (st.streaming_triplet_margin_loss, mj.losses.triplet_margin_loss,
                    {"mining": "all", "margin": 1.0, "max_positives": 3}),
    "lifted": (st.streaming_lifted_structure_loss, mj.losses.lifted_structure_loss, {}),
    "generalized_lifted": (st.streaming_generalized_lifted_structure_loss,
                           mj.losses.generalized_lifted_structure_loss, {}),
    "multi_similarity": (st.streaming_multi_similarity_loss, mj.losses.multi_similarity_loss,
                         {"beta": 10.0}),
    "circle": (st.streaming_circle_loss, mj.losses.circle_loss, {"gamma": 8.0}),
    "ntxent": (st.streaming_ntxent_loss, mj.losses.ntxent_loss, {"temperature": 0.5}),
    "supcon": (st.streaming_supcon_loss, mj.losses.supcon_loss, {"temperature": 0.5}),
    "npair": (st.streaming_npair_loss, mj.losses.npair_loss, {}),
}


def _data(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, D)).astype(np.float32), LABELS


@functools.lru_cache(maxsize=None)
def _mesh():
  # Auto axes, as metric_jax.sharding.make_mesh: with JAX's default Explicit
  # axes, the [B, 1] x [1, B] broadcasts of every pair loss (dense or
  # streaming) are rejected as ambiguously sharded.
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _sharded(x):
  return jax.device_put(x, jax.NamedSharding(_mesh(), jax.P("data")))


def _single(fn, emb, labels, where):
  dev = jax.devices()[0]
  args = [jax.device_put(a, dev) for a in (emb, labels, where)]
  return jax.jit(jax.value_and_grad(lambda e, l, w: fn(e, l, where=w)))(*args)


@pytest.mark.parametrize("name", ["contrastive", "triplet_hard", "multi_similarity", "ntxent"])
def test_streaming_loss_under_jit_on_sharded_global_batch(name):
  """jit on the global batch: XLA partitions the tiled computation; value and
  gradient equal the single-device ones."""
  s_fn, _, kw = CASES[name]
  emb, labels = _data()
  where = np.ones(B, bool)
  fn = functools.partial(s_fn, tile_size=5, **kw)
  ref_v, ref_g = _single(fn, emb, labels, where)
  f = jax.jit(jax.value_and_grad(lambda e, l, w: fn(e, l, where=w)))
  v, g = f(_sharded(emb), _sharded(labels), _sharded(where))
  assert g.sharding.spec == jax.P("data")
  np.testing.assert_allclose(float(v), float(ref_v), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=1e-4, atol=1e-6)
  assert float(ref_v) > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_shard_map_equals_dense_global_loss(name):
  """shard_map: each device streams its 2 anchors against the all-gathered
  batch; psum of sums and counts gives the global mean; gradients reach the
  references through all_gather's transpose. Equal to the dense loss of the
  whole batch on one device, with padding rows (``where``) too."""
  s_fn, d_fn, kw = CASES[name]
  emb, labels = _data(1)
  where = np.ones(B, bool)
  where[[3, 10]] = False          # padding on two different devices
  emb[3] = np.nan                 # masked rows may hold anything
  ref_v, ref_g = _single(functools.partial(d_fn, **kw), emb, labels, where)
  fn = st.sharded_loss(s_fn, _mesh(), "data", tile_size=3, **kw)
  v, g = jax.jit(jax.value_and_grad(fn))(_sharded(emb), _sharded(labels), _sharded(where))
  np.testing.assert_allclose(float(v), float(ref_v), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(g)[[3, 10]] == 0)
  assert float(ref_v) > 0


def test_shard_map_global_normalisation_differs_from_mean_of_local_means():
  """mean_nonzero over all pairs is the global one: the average of the
  devices' own means would differ (unequal counts per device)."""
  emb, labels = _data(2)
  labels = labels.copy()
  labels[:6] = np.arange(6)                       # uneven positives per device
  kw = {"neg_margin": 4.0}
  fn = st.sharded_loss(st.streaming_contrastive_loss, _mesh(), **kw)
  v = float(jax.jit(fn)(_sharded(emb), _sharded(labels)))
  dense = float(mj.losses.contrastive_loss(jnp.asarray(emb), jnp.asarray(labels), **kw))
  np.testing.assert_allclose(v, dense, rtol=2e-5)
  local = []
  for k in range(8):
    rows = slice(2 * k, 2 * k + 2)
    ids = jnp.arange(2 * k, 2 * k + 2)
    local.append(float(st.streaming_contrastive_loss(
        jnp.asarray(emb[rows]), jnp.asarray(labels[rows]), jnp.asarray(emb),
        jnp.asarray(labels), ids=ids, ref_ids=jnp.arange(B), **kw)))
  assert abs(np.mean(local) - dense) > 1e-3


def test_shard_map_reduction_none_returns_sharded_per_anchor_terms():
  emb, labels = _data(3)
  kw = {"beta": 10.0, "reduction": "none"}
  fn = st.sharded_loss(st.streaming_multi_similarity_loss, _mesh(), **kw)
  terms = jax.jit(fn)(_sharded(emb), _sharded(labels))
  assert terms.shape == (B,) and terms.sharding.spec == jax.P("data")
  dense = mj.losses.multi_similarity_loss(jnp.asarray(emb), jnp.asarray(labels), **kw)
  np.testing.assert_allclose(np.asarray(terms), np.asarray(dense), rtol=1e-5, atol=1e-7)


def test_shard_map_never_builds_the_global_matrix():
  """Per-device planned memory at B = 2048 (256 anchors per device) is far
  below one [256, 2048] block, let alone [2048, 2048]."""
  b, d, tile = 2048, 16, 64
  emb = jax.ShapeDtypeStruct((b, d), jnp.float32,
                             sharding=jax.NamedSharding(_mesh(), jax.P("data")))
  labels = jax.ShapeDtypeStruct((b,), jnp.int32,
                                sharding=jax.NamedSharding(_mesh(), jax.P("data")))
  fn = st.sharded_loss(st.streaming_multi_similarity_loss, _mesh(), tile_size=tile)
  compiled = jax.jit(jax.value_and_grad(fn)).lower(emb, labels).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip("backend without memory analysis")
  local_block = (b // 8) * b * 4
  assert stats.temp_size_in_bytes < local_block / 2, stats.temp_size_in_bytes


def test_sharded_loss_bad_inputs():
  with pytest.raises(ValueError, match="axis_name"):
    st.sharded_loss(st.streaming_contrastive_loss, _mesh(), "model")
  with pytest.raises(ValueError, match="loss_fn"):
    st.sharded_loss(mj.losses.contrastive_loss, _mesh())
  with pytest.raises(ValueError, match="ref_embeddings"):
    st.sharded_loss(st.streaming_contrastive_loss, _mesh(), ref_embeddings=jnp.ones((2, 2)))
  fn = st.sharded_loss(st.streaming_contrastive_loss, _mesh())
  with pytest.raises(ValueError, match="divisible"):
    fn(jnp.ones((12, 3)), jnp.zeros(12, jnp.int32))


def _replicated(tree):
  return jax.device_put(tree, jax.NamedSharding(_mesh(), jax.P()))


def _on_one_device(tree):
  return jax.device_put(tree, jax.devices()[0])


def _assert_trees_close(got, want, rtol=2e-5, atol=1e-6):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_cross_batch_memory_under_the_sharded_step():
  """A jitted SGD step whose loss reads and writes a cross-batch memory
  (dense contrastive + streaming multi-similarity against the memory, tiles
  not dividing its size): batch sharded over 8 devices, weights and memory
  replicated. After 3 steps (the memory wraps around) the losses, weights
  and memory equal those of one device."""
  rng = np.random.default_rng(4)
  xbm = memory.cross_batch_memory(size=24, embedding_dim=D)
  w0 = (np.eye(D) + 0.3 * rng.normal(size=(D, D))).astype(np.float32)
  batches = [(rng.normal(size=(B, D)).astype(np.float32), rng.permutation(LABELS))
             for _ in range(3)]

  @jax.jit
  def step(w, state, x, labels):
    def loss(w):
      e = mj.distances.l2_normalize(x @ w)
      dense, new_state = memory.with_memory(mj.losses.contrastive_loss, state, e, labels,
                                            neg_margin=0.8)
      streamed, same = memory.with_memory(st.streaming_multi_similarity_loss, state, e,
                                          labels, tile_size=5)
      return dense + streamed, (new_state, same)
    (val, (new_state, same)), g = jax.value_and_grad(loss, has_aux=True)(w)
    return w - 0.5 * g, new_state, val, same

  def run(put_batch, put_state):
    w, state, vals = put_state(w0), put_state(xbm.init()), []
    for x, labels in batches:
      w, state, val, same = step(w, state, put_batch(x), put_batch(labels))
      _assert_trees_close(same, state, rtol=0, atol=0)
      vals.append(float(val))
    return w, state, vals

  want = run(_on_one_device, _on_one_device)
  got = run(_sharded, _replicated)
  _assert_trees_close(got, want, rtol=1e-4, atol=1e-6)
  assert min(want[2]) > 0 and int(want[1].ptr) == (3 * B) % 24
  assert bool(want[1].valid.all())


def test_magnet_loss_and_cluster_index_under_the_sharded_step():
  """The magnet loss on a batch sharded over 8 devices, with cluster ids
  from the index: value, per-example losses, batch variance, gradient and
  updated weights equal one device's; the index updated from the sharded
  outputs (cluster losses and variance, the sampler's feedback) and its
  predictions for the training set embedded on the 8 devices equal the
  single-device ones. (The index itself is host-side NumPy: refresh and
  build read the embeddings once gathered to the host.)"""
  rng = np.random.default_rng(5)
  n = 48
  train = rng.normal(size=(n, D)).astype(np.float32)
  train_labels = np.repeat(np.arange(4), n // 4).astype(np.int32)
  index = magnet_index.build_index(train, train_labels, clusters_per_class=2,
                                   key=jax.random.key(0), num_iters=5)
  rows = rng.choice(n, B, replace=False)
  labels, cluster_ids = train_labels[rows], index.assignments[rows].astype(np.int32)
  w0 = (np.eye(D) + 0.3 * rng.normal(size=(D, D))).astype(np.float32)

  @jax.jit
  def step(w, x, labels, cluster_ids):
    def loss(w):
      terms, variance = mj.losses.magnet_loss(x @ w, labels, cluster_ids, num_clusters=8,
                                              reduction="none", return_variance=True)
      return jnp.sum(terms) / B, (terms, variance)
    (val, (terms, variance)), g = jax.value_and_grad(loss, has_aux=True)(w)
    return val, terms, variance, g, w - 0.5 * g

  embed = jax.jit(lambda w, x: x @ w)

  def run(put_batch, put_state):
    out = step(put_state(w0), *map(put_batch, (train[rows], labels, cluster_ids)))
    _, terms, variance, _, w = out
    idx = magnet_index.update_losses(index, cluster_ids, terms)
    idx = magnet_index.update_variance(idx, variance)
    new_train = embed(w, put_batch(train))
    return out, idx, magnet_index.nearest_cluster_predict(idx, new_train, L=4)

  want = run(_on_one_device, _on_one_device)
  got = run(_sharded, _replicated)
  _assert_trees_close(got[0], want[0], rtol=1e-4, atol=1e-6)
  _assert_trees_close(got[1], want[1], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got[2], want[2])
  assert float(want[0][0]) > 0 and float(jnp.abs(want[0][3]).max()) > 0
  assert int(want[1].cluster_loss_count.sum()) == B and want[1].variance_count == 1
