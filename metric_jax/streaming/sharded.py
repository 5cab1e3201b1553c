"""``sharded_loss``: a streamed loss under ``jax.shard_map``, local anchors
against the all-gathered global batch."""

from __future__ import annotations

__all__ = ["sharded_loss"]

import inspect
from typing import Callable

import jax
import jax.numpy as jnp


def sharded_loss(loss_fn: Callable, mesh: jax.sharding.Mesh, axis_name: str = "data",
                 **loss_kwargs) -> Callable:
  """Wraps a streaming loss so that it runs under ``jax.shard_map``.

  Each device takes its shard of the global batch as anchors, all-gathers
  the embeddings, labels and validity over ``axis_name`` as references,
  excludes self-pairs by global index, and streams its anchors against the
  gathered references. Sums and counts are ``psum``-ed before dividing, so
  every reduction is the global one: the value and the gradient equal
  those of the loss on the whole batch on one device. The reference
  gradients flow back through the transpose of ``all_gather`` (a
  ``psum_scatter``): each device receives the sum over all devices of the
  cotangents of its own rows.

  Args:
    loss_fn: a loss of :mod:`metric_jax.streaming` (anything accepting
      ``axis_name=`` with that meaning).
    mesh: the device mesh; the batch is split along ``axis_name``.
    axis_name: the mesh axis of the batch.
    **loss_kwargs: fixed keyword arguments of ``loss_fn`` (hyper-parameters,
      ``tile_size``, ...). Use ``functools.partial`` on the result for
      traced hyper-parameters.

  Returns:
    ``fn(embeddings [B, D], labels [B], where=None) -> scalar`` (or the [B]
    per-anchor terms, sharded like the batch, for ``reduction="none"``),
    callable inside or outside ``jax.jit``; B must be divisible by the
    size of ``axis_name``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metric_jax import streaming
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> fn = streaming.sharded_loss(streaming.streaming_contrastive_loss, mesh)
    >>> emb = jnp.array([[0., 0.], [0., 0.5], [3., 0.], [3., 0.5]])
    >>> round(float(fn(emb, jnp.array([0, 0, 1, 1]))), 4)
    0.5
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
  try:
    params = inspect.signature(loss_fn).parameters
  except (TypeError, ValueError):
    params = {}
  if params and "axis_name" not in params:
    raise ValueError(
        "`loss_fn` must accept `axis_name` (a loss of metric_jax.streaming), got "
        f"{getattr(loss_fn, '__name__', loss_fn)!r}.")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"`axis_name` must be one of the mesh axes {mesh.axis_names}, "
                     f"got {axis_name!r}.")
  for bad in ("ref_embeddings", "ref_labels", "ref_where", "pair_mask", "axis_name"):
    if bad in loss_kwargs:
      raise ValueError(f"`{bad}` cannot be fixed in sharded_loss: the references are "
                       "the all-gathered batch.")
  spec = jax.P(axis_name)
  per_anchor = loss_kwargs.get("reduction") == "none"
  explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)

  def body(emb, labels, where):
    return loss_fn(emb, labels, where=where, axis_name=axis_name, **loss_kwargs)

  mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec),
                         out_specs=spec if per_anchor else jax.P())

  def fn(embeddings, labels, where=None):
    n = mesh.shape[axis_name]
    if embeddings.shape[0] % n:
      raise ValueError(
          f"`embeddings` must have a batch size divisible by the {n} devices of axis "
          f"{axis_name!r}, got {embeddings.shape[0]}.")
    if where is None:
      where = jnp.ones(labels.shape, bool)
    if explicit:
      # A mesh with Explicit axes (jax.make_mesh's default) needs the inputs
      # laid out as the specs say; Auto meshes let shard_map reshard them.
      batch = jax.sharding.NamedSharding(mesh, spec)
      embeddings, labels, where = (jax.reshard(x, batch) for x in (embeddings, labels, where))
    return mapped(embeddings, labels, where)

  return fn
