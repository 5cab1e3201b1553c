"""Cross-batch memory: ring buffer, masks, jit, equivalence with the loss over
the concatenated (detached) batch, and PML's CrossBatchMemory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from metric_jax import memory
from tests.helpers import HAS_PML, np_normalize, random_embeddings

D = 4


def _batch(seed, b=6, classes=3):
  rng = np.random.default_rng(seed)
  emb = np_normalize(rng.normal(size=(b, D))).astype(np.float32)
  return jnp.asarray(emb), jnp.asarray(rng.integers(0, classes, size=b).astype(np.int32))


class RingReference:
  """Plain Python ring buffer (the obvious implementation)."""

  def __init__(self, size):
    self.size, self.ptr = size, 0
    self.emb = [None] * size
    self.lab = [-1] * size

  def add(self, emb, labels, where=None):
    slots = []
    for i in range(len(labels)):
      if where is not None and not where[i]:
        slots.append(None)
        continue
      self.emb[self.ptr], self.lab[self.ptr] = np.asarray(emb[i]), int(labels[i])
      slots.append(self.ptr)
      self.ptr = (self.ptr + 1) % self.size
    # A slot overwritten later in the same batch no longer holds its row.
    last = {}
    for i, s in enumerate(slots):
      if s is not None:
        last[s] = i
    return [s if s is not None and last[s] == i else self.size for i, s in enumerate(slots)]


def _assert_state(state, ref):
  valid = [e is not None for e in ref.emb]
  np.testing.assert_array_equal(state.valid, valid)
  np.testing.assert_array_equal(np.asarray(state.labels)[valid], np.array(ref.lab)[valid])
  for s in range(ref.size):
    if valid[s]:
      np.testing.assert_array_equal(state.embeddings[s], ref.emb[s])
  assert int(state.ptr) == ref.ptr


def test_ring_buffer_wraps_and_handles_big_batches_and_where():
  xbm = memory.cross_batch_memory(size=7, embedding_dim=D)
  state, ref = xbm.init(), RingReference(7)
  assert state.embeddings.shape == (7, D) and not bool(state.valid.any())
  update = jax.jit(xbm.update)
  for seed, b, where in ((0, 3, None), (1, 5, None),                  # wrap-around
                         (2, 4, np.array([True, False, True, False])),  # masked rows
                         (3, 17, None),                                 # B > S
                         (4, 9, np.arange(9) % 2 == 0)):                # B > S, masked
    emb, labels = _batch(seed, b)
    slots = memory.enqueue_slots(state, b, None if where is None else jnp.asarray(where))
    want_slots = ref.add(np.asarray(emb), np.asarray(labels), where)
    np.testing.assert_array_equal(slots, want_slots)
    state = update(state, emb, labels, None if where is None else jnp.asarray(where))
    _assert_state(state, ref)


def test_update_detaches_and_casts():
  xbm = memory.cross_batch_memory(size=4, embedding_dim=D, dtype=jnp.bfloat16)
  emb, labels = _batch(5, 3)
  g = jax.grad(lambda e: jnp.sum(xbm.update(xbm.init(), e, labels).embeddings
                                 .astype(jnp.float32)))(emb)
  assert float(jnp.abs(g).max()) == 0.0
  assert xbm.update(xbm.init(), emb, labels).embeddings.dtype == jnp.bfloat16


def _reference_loss(loss_fn, emb, labels, old_emb, old_labels, **kw):
  """The loss over concat(stop_gradient(batch), older memory), self-pairs out."""
  b = emb.shape[0]
  refs = jnp.concatenate([jax.lax.stop_gradient(emb), old_emb])
  ref_labels = jnp.concatenate([labels, old_labels])
  mask = ~jnp.eye(b, refs.shape[0], dtype=bool)
  return loss_fn(emb, labels, refs, ref_labels, pair_mask=mask, **kw)


@pytest.mark.parametrize("loss_name,kw", [("contrastive_loss", {}),
                                          ("triplet_margin_loss", {"margin": 0.5})])
def test_with_memory_equals_loss_over_concatenated_batch(loss_name, kw):
  loss_fn = getattr(mj.losses, loss_name)
  xbm = memory.cross_batch_memory(size=10, embedding_dim=D)
  state = xbm.init()
  old = [_batch(s) for s in (6, 7)]
  for e, l in old:
    state = xbm.update(state, e, l)
  # After 12 writes into 10 slots the memory holds old[0][2:] and old[1].
  old_emb = jnp.concatenate([old[0][0][2:], old[1][0]])
  old_labels = jnp.concatenate([old[0][1][2:], old[1][1]])
  emb, labels = _batch(8)
  # The batch overwrites 6 more of them: the survivors are the 4 newest.
  old_emb, old_labels = old_emb[-4:], old_labels[-4:]

  f = jax.jit(lambda e, s: memory.with_memory(loss_fn, s, e, labels, **kw))
  (val, new_state), grad = jax.value_and_grad(lambda e: f(e, state), has_aux=True)(emb)
  want, want_grad = jax.value_and_grad(
      lambda e: _reference_loss(loss_fn, e, labels, old_emb, old_labels, **kw))(emb)
  np.testing.assert_allclose(val, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  assert int(new_state.ptr) == (12 + 6) % 10
  assert float(val) > 0 and float(jnp.abs(grad).max()) > 0


def test_empty_memory_with_batch_gradients_equals_plain_loss():
  """With grad_through_batch_refs the memory of one batch reproduces the
  ordinary in-batch loss and its gradient exactly (self-pairs excluded)."""
  emb, labels = _batch(9, 8, classes=3)
  xbm = memory.cross_batch_memory(size=12, embedding_dim=D)
  for name in ("contrastive_loss",):
    loss_fn = getattr(mj.losses, name)
    f = lambda e: memory.with_memory(loss_fn, xbm.init(), e, labels,
                                     grad_through_batch_refs=True)[0]
    val, g = jax.jit(jax.value_and_grad(f))(emb)
    want, want_g = jax.jit(jax.value_and_grad(lambda e: loss_fn(e, labels)))(emb)
    np.testing.assert_allclose(val, want, rtol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
  # Detached references (default): same value, gradient only through anchors.
  val = memory.with_memory(mj.losses.contrastive_loss, xbm.init(), emb, labels)[0]
  np.testing.assert_allclose(val, mj.losses.contrastive_loss(emb, labels), rtol=1e-5)


def test_where_enqueue_false_and_pair_mask():
  xbm = memory.cross_batch_memory(size=8, embedding_dim=D)
  e0, l0 = _batch(10, 5)
  state = xbm.update(xbm.init(), e0, l0)
  emb, labels = _batch(11, 6)
  where = jnp.array([True, True, False, True, True, True])
  padded = emb.at[2].set(jnp.nan)
  loss_fn = mj.losses.contrastive_loss
  val, new = memory.with_memory(loss_fn, state, padded, labels, where=where)
  assert int(new.ptr) == (5 + 5) % 8 and np.isfinite(float(val))
  keep = np.asarray(where)
  want = _reference_loss(loss_fn, emb[keep], labels[keep], e0[2:], l0[2:])
  np.testing.assert_allclose(val, want, rtol=1e-5)
  g = jax.grad(lambda e: memory.with_memory(loss_fn, state, e, labels, where=where)[0])(padded)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g[2]).max()) == 0.0
  # enqueue=False: the batch against the memory as it was, state unchanged.
  val, same = memory.with_memory(loss_fn, state, emb, labels, enqueue=False)
  assert same is state
  refs, ref_labels = e0, l0
  np.testing.assert_allclose(val, loss_fn(emb, labels, refs, ref_labels), rtol=1e-5)
  # A user pair_mask over memory slots is combined with the self-pair mask.
  # The 6 rows go to slots 5, 6, 7, 0, 1, 2: only e0[3:] survive, in slots 3, 4.
  pm = jnp.zeros((6, 8), bool).at[:, 3:5].set(True)
  val = memory.with_memory(loss_fn, state, emb, labels, pair_mask=pm)[0]
  np.testing.assert_allclose(val, loss_fn(emb, labels, e0[3:], l0[3:]), rtol=1e-5)


def test_jitted_train_step_carries_the_state():
  xbm = memory.cross_batch_memory(size=16, embedding_dim=D)
  w0 = jnp.eye(D)

  traces = []

  @jax.jit
  def step(w, state, x, labels):
    traces.append(1)   # runs once per trace
    def loss(w):
      return memory.with_memory(mj.losses.contrastive_loss, state, x @ w, labels)
    (val, state), g = jax.value_and_grad(loss, has_aux=True)(w)
    return w - 0.1 * g, state, val

  w, state = w0, xbm.init()
  for seed in range(5):
    x, labels = _batch(20 + seed)
    w, state, val = step(w, state, x, labels)
    assert np.isfinite(float(val))
  # Counted in the traced body: jit's C++ dispatch cache (``_cache_size``)
  # is a global LRU that the rest of a long test session can evict.
  assert len(traces) == 1, "the step retraced"
  assert int(state.ptr) == 30 % 16 and bool(state.valid.all())


def test_bad_inputs():
  xbm = memory.cross_batch_memory(size=4, embedding_dim=D)
  emb, labels = _batch(12, 3)
  with pytest.raises(ValueError, match="size"):
    memory.cross_batch_memory(size=0, embedding_dim=D)
  with pytest.raises(TypeError, match="dtype"):
    memory.cross_batch_memory(size=4, embedding_dim=D, dtype=jnp.int32)
  with pytest.raises(ValueError, match="embeddings"):
    xbm.update(xbm.init(), emb[:, :2], labels)
  with pytest.raises(ValueError, match="labels"):
    xbm.update(xbm.init(), emb, labels[:2])
  with pytest.raises(TypeError, match="state"):
    xbm.update((1, 2), emb, labels)
  with pytest.raises(ValueError, match="state"):
    xbm.update(memory.cross_batch_memory(size=5, embedding_dim=D).init(), emb, labels)
  with pytest.raises(ValueError, match="ref_embeddings"):
    memory.with_memory(mj.losses.contrastive_loss, xbm.init(), emb, labels,
                       ref_embeddings=emb)
  with pytest.raises(ValueError, match="pair_mask"):
    memory.with_memory(mj.losses.contrastive_loss, xbm.init(), emb, labels,
                       pair_mask=jnp.ones((3, 3), bool))


@pytest.mark.skipif(not HAS_PML, reason="needs torch and pytorch-metric-learning")
def test_pml_parity_over_several_batches():
  import torch
  from pytorch_metric_learning import losses as pml_losses
  pml = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), D, memory_size=10)
  xbm = memory.cross_batch_memory(size=10, embedding_dim=D)
  state = xbm.init()
  step = jax.jit(lambda s, e, l: memory.with_memory(mj.losses.contrastive_loss, s, e, l))
  for seed in range(4):  # fills, then wraps around
    raw = random_embeddings(30 + seed, 4, D)
    labels = np.random.default_rng(seed).integers(0, 3, size=4)
    t = torch.tensor(raw, requires_grad=True)
    want = pml(t, torch.tensor(labels))
    want.backward()
    # PML normalises inside its distance; the memory then holds raw vectors,
    # whose normalised versions are what we store.
    (val, state), g = jax.value_and_grad(
        lambda e: step(state, mj.distances.l2_normalize(e), jnp.asarray(labels)),
        has_aux=True)(jnp.asarray(raw))
    np.testing.assert_allclose(val, want.item(), rtol=1e-5)
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-4, atol=1e-6)
