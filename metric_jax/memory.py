"""Cross-batch memory (XBM, Wang et al., CVPR 2020) as a pure (init, update)
pair.

A ring buffer of the last ``size`` embeddings and labels lets every anchor of
the current batch meet far more negatives (and positives) than the batch
holds. The buffer is a pytree (:class:`MemoryState`) with static shapes, so
it lives in the train state and goes through ``jax.jit`` like optimiser
state::

  xbm = mj.memory.cross_batch_memory(size=4096, embedding_dim=128)
  mem = xbm.init()

  def loss_fn(params, mem, images, labels):
    emb = model.apply(params, images)
    loss, mem = mj.memory.with_memory(mj.losses.contrastive_loss, mem, emb, labels)
    return loss, mem

Semantics (PML's ``CrossBatchMemory``): the current batch is enqueued
**before** the loss is computed, the stored embeddings are detached
(``stop_gradient``), anchors come from the current batch (with gradients),
references are the whole memory, and each anchor's pair with its own stored
copy is removed. The hand-written equivalent of :func:`with_memory` is::

  new = xbm.update(mem, emb, labels)
  slots = mj.memory.enqueue_slots(mem, labels.shape[0])
  self_pair = slots[:, None] == jnp.arange(new.labels.shape[0])[None, :]
  loss = loss_fn(emb, labels, new.embeddings, new.labels,
                 ref_where=new.valid, pair_mask=~self_pair)

which equals the loss over ``concat(stop_gradient(emb), older memory)``
with the self-pairs excluded (the tests check values and gradients).

References:
  Wang, Zhang, Huang, Scott, "Cross-Batch Memory for Embedding Learning",
  CVPR 2020, arXiv 1912.06798.
"""

__all__ = ["MemoryState", "CrossBatchMemory", "cross_batch_memory", "update",
           "enqueue_slots", "with_memory"]

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from metric_jax import _checks


class MemoryState(NamedTuple):
  """State of a cross-batch memory (a pytree of static shapes).

  Attributes:
    embeddings: [S, D] stored (detached) embeddings.
    labels: [S] int32 stored labels (-1 in never-written slots).
    valid: [S] bool, True for slots that hold a sample.
    ptr: int32 scalar, the next slot to write.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> mem = mj.memory.cross_batch_memory(size=4, embedding_dim=2).init()
    >>> mem.labels.tolist(), mem.valid.tolist(), int(mem.ptr)
    ([-1, -1, -1, -1], [False, False, False, False], 0)
    >>> jax.tree.map(jnp.shape, mem)  # a pytree: goes through jit like optimiser state
    MemoryState(embeddings=(4, 2), labels=(4,), valid=(4,), ptr=())
  """
  embeddings: jax.Array
  labels: jax.Array
  valid: jax.Array
  ptr: jax.Array


class CrossBatchMemory(NamedTuple):
  """An optax-style pair of pure functions (see :func:`cross_batch_memory`).

  Attributes:
    init: ``init() -> MemoryState`` (an empty memory).
    update: ``update(state, embeddings [B, D], labels [B], where=None) ->
      MemoryState``.
    size: S, the number of slots.
    embedding_dim: D.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> xbm = mj.memory.cross_batch_memory(size=4, embedding_dim=2)
    >>> xbm.size, xbm.embedding_dim
    (4, 2)
    >>> mem = jax.jit(xbm.update)(xbm.init(), jnp.ones((3, 2)), jnp.array([1, 2, 3]))
    >>> mem.labels.tolist(), mem.valid.tolist(), int(mem.ptr)
    ([1, 2, 3, -1], [True, True, True, False], 3)
  """
  init: Callable[[], MemoryState]
  update: Callable[..., MemoryState]
  size: int
  embedding_dim: int


def _check_state(state: Any) -> None:
  if not isinstance(state, MemoryState):
    raise TypeError(f"`state` must be a MemoryState (from cross_batch_memory(...).init()), "
                    f"got {type(state).__name__}.")


def _check_batch(state: MemoryState, embeddings, labels, where) -> None:
  _check_state(state)
  _checks.embeddings(embeddings, "embeddings")
  b = embeddings.shape[0]
  _checks.labels(labels, b, "labels")
  _checks.mask(where, (b,), "where")
  d = state.embeddings.shape[1]
  if embeddings.shape[1] != d:
    raise ValueError(f"`embeddings` must have embedding size {d} to match the memory, "
                     f"got shape {embeddings.shape}.")


def enqueue_slots(state: MemoryState, batch_size: int,
                  where: jax.Array | None = None) -> jax.Array:
  """The slot each row of a batch is written to by :func:`update`.

  Rows are written in order, skipping rows with ``where`` False; when more
  than S rows are valid only the last S are kept (the earlier ones would be
  overwritten within the same update).

  Args:
    state: the memory **before** the update.
    batch_size: B.
    where: optional [B] bool, rows to enqueue.

  Returns:
    [B] int32: the slot in ``[0, S)``, or S for rows that are not stored.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> xbm = mj.memory.cross_batch_memory(size=4, embedding_dim=2)
    >>> mem = xbm.update(xbm.init(), jnp.ones((3, 2)), jnp.array([0, 1, 2]))  # ptr = 3
    >>> mj.memory.enqueue_slots(mem, 3).tolist()
    [3, 0, 1]
    >>> mj.memory.enqueue_slots(mem, 3, where=jnp.array([True, False, True])).tolist()
    [3, 4, 0]
  """
  _check_state(state)
  size = state.embeddings.shape[0]
  valid = jnp.ones((batch_size,), bool) if where is None else jnp.asarray(where)
  rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
  n = jnp.sum(valid.astype(jnp.int32))
  keep = valid & (rank >= n - size)
  slot = jnp.mod(state.ptr + rank, size).astype(jnp.int32)
  return jnp.where(keep, slot, size)


def update(state: MemoryState, embeddings: jax.Array, labels: jax.Array,
           where: jax.Array | None = None) -> MemoryState:
  """Enqueues a batch into the ring buffer (oldest entries are overwritten).

  Args:
    state: current :class:`MemoryState`.
    embeddings: [B, D] float; stored with ``stop_gradient`` in the memory's
      dtype. B may exceed S (only the last S valid rows are kept).
    labels: [B] integer labels.
    where: optional [B] bool; rows with False are not stored.

  Returns:
    The new :class:`MemoryState`.

  Example:
    Masked rows are skipped; with B > S only the last S valid rows stay:

    >>> import jax.numpy as jnp, metric_jax as mj
    >>> mem = mj.memory.cross_batch_memory(size=4, embedding_dim=2).init()
    >>> mem = mj.memory.update(mem, jnp.ones((3, 2)), jnp.array([4, 5, 6]),
    ...                        where=jnp.array([True, False, True]))
    >>> mem.labels.tolist(), int(mem.ptr)
    ([4, 6, -1, -1], 2)
    >>> mem = mj.memory.update(mem, jnp.zeros((5, 2)), jnp.array([10, 11, 12, 13, 14]))
    >>> mem.labels.tolist(), int(mem.ptr)
    ([12, 13, 14, 11], 3)
  """
  _check_batch(state, embeddings, labels, where)
  size = state.embeddings.shape[0]
  slots = enqueue_slots(state, embeddings.shape[0], where)
  emb = jax.lax.stop_gradient(embeddings).astype(state.embeddings.dtype)
  lab = jax.lax.stop_gradient(jnp.asarray(labels)).astype(state.labels.dtype)
  n = embeddings.shape[0] if where is None else jnp.sum(jnp.asarray(where).astype(jnp.int32))
  return MemoryState(
      embeddings=state.embeddings.at[slots].set(emb, mode="drop"),
      labels=state.labels.at[slots].set(lab, mode="drop"),
      valid=state.valid.at[slots].set(True, mode="drop"),
      ptr=jnp.mod(state.ptr + n, size).astype(jnp.int32))


def cross_batch_memory(size: int, embedding_dim: int,
                       dtype=jnp.float32) -> CrossBatchMemory:
  """A cross-batch memory of ``size`` embeddings of dimension ``embedding_dim``.

  Args:
    size: S, the number of stored samples (static).
    embedding_dim: D.
    dtype: dtype of the stored embeddings (float32 by default; bfloat16
      halves the memory).

  Returns:
    :class:`CrossBatchMemory` with ``init()`` and ``update(state,
    embeddings, labels, where=None)``.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> xbm = mj.memory.cross_batch_memory(size=3, embedding_dim=2)
    >>> mem = xbm.update(xbm.init(), jnp.ones((2, 2)), jnp.array([4, 5]))
    >>> mem = xbm.update(mem, jnp.zeros((2, 2)), jnp.array([6, 7]))
    >>> mem.labels.tolist(), int(mem.ptr)
    ([7, 5, 6], 1)
  """
  _checks.positive_int(size, "size")
  _checks.positive_int(embedding_dim, "embedding_dim")
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating-point dtype, got {dtype}.")

  def init() -> MemoryState:
    return MemoryState(embeddings=jnp.zeros((size, embedding_dim), dtype),
                       labels=jnp.full((size,), -1, jnp.int32),
                       valid=jnp.zeros((size,), bool),
                       ptr=jnp.zeros((), jnp.int32))

  def update_fn(state: MemoryState, embeddings: jax.Array, labels: jax.Array,
                where: jax.Array | None = None) -> MemoryState:
    _check_state(state)
    if state.embeddings.shape != (size, embedding_dim):
      raise ValueError(f"`state` holds embeddings of shape {state.embeddings.shape}, "
                       f"expected {(size, embedding_dim)} for this memory.")
    return update(state, embeddings, labels, where)

  return CrossBatchMemory(init=init, update=update_fn, size=size,
                          embedding_dim=embedding_dim)


def with_memory(loss_fn: Callable[..., jax.Array], state: MemoryState,
                embeddings: jax.Array, labels: jax.Array, *,
                where: jax.Array | None = None, enqueue: bool = True,
                grad_through_batch_refs: bool = False,
                pair_mask: jax.Array | None = None,
                **kw) -> tuple[jax.Array, MemoryState]:
  """Computes ``loss_fn`` with the memory as the reference set.

  With ``enqueue=True`` (PML/XBM semantics) the batch is first written to
  the memory, then ``loss_fn(embeddings, labels, memory.embeddings,
  memory.labels, where=where, ref_where=memory.valid, pair_mask=...)`` is
  evaluated with every anchor's pair with its own stored copy removed. With
  ``enqueue=False`` the batch is compared with the memory as it was and the
  memory is returned unchanged (no self-pairs can occur).

  Args:
    loss_fn: an embedding loss accepting ``ref_embeddings``, ``ref_labels``,
      ``where``, ``ref_where`` and ``pair_mask`` (every pair/triplet loss).
    state: :class:`MemoryState`.
    embeddings: [B, D] float anchors (with gradients).
    labels: [B] integer labels.
    where: optional [B] bool; masked rows are neither anchors nor stored.
    enqueue: enqueue before computing the loss (default, PML semantics).
    grad_through_batch_refs: the references of the current batch are the
      live embeddings instead of their detached stored copies, so the
      gradient also flows through them (then, with an empty memory, the loss
      and its gradient equal ``loss_fn(embeddings, labels)``). Default False:
      the whole memory is detached, as in XBM and PML.
    pair_mask: optional [B, S] bool restriction over (anchor, memory slot),
      combined with the self-pair exclusion.
    **kw: hyper-parameters for ``loss_fn``.

  Returns:
    ``(loss, new_state)``.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> xbm = mj.memory.cross_batch_memory(size=8, embedding_dim=2)
    >>> emb = jnp.array([[0., 0.], [0., 0.5], [3., 0.]])
    >>> loss, mem = mj.memory.with_memory(mj.losses.contrastive_loss, xbm.init(), emb,
    ...                                   jnp.array([0, 0, 1]))
    >>> round(float(loss), 4), int(mem.ptr)
    (0.5, 3)
  """
  _check_batch(state, embeddings, labels, where)
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
  for name in ("ref_embeddings", "ref_labels", "ref_where"):
    if name in kw:
      raise ValueError(f"`{name}` is set by with_memory (the memory is the reference set); "
                       f"do not pass it.")
  b = embeddings.shape[0]
  size = state.embeddings.shape[0]
  _checks.mask(pair_mask, (b, size), "pair_mask")
  if enqueue:
    slots = enqueue_slots(state, b, where)
    new_state = update(state, embeddings, labels, where)
    refs = new_state.embeddings
    if grad_through_batch_refs:
      refs = refs.at[slots].set(embeddings.astype(refs.dtype), mode="drop")
    mask = slots[:, None] != jnp.arange(size, dtype=jnp.int32)[None, :]
    if pair_mask is not None:
      mask = mask & pair_mask
  else:
    new_state = state
    refs = state.embeddings
    mask = pair_mask
  if mask is not None:
    kw["pair_mask"] = mask
  loss = loss_fn(embeddings, labels, refs, new_state.labels, where=where,
                 ref_where=new_state.valid, **kw)
  return loss, new_state

