"""The pure train step, the embedding forward pass, and their jitted,
sharded forms.

``train_step(state, batch, rng) -> (state, metrics)`` is one pure function:
preprocessing and augmentation (on device), the forward pass, the objective
on the *global* batch, gradients, the optimiser update. Jitted with
:func:`jit_train_step` it follows big_vision: ``jax.eval_shape`` of the
initial state gives the shardings, then ``jax.jit(..., in_shardings,
out_shardings, donate_argnums=0)`` over the data mesh. Parameters are
replicated and the batch is split over the ``"data"`` axis; because the
loss is computed on the global array, negatives come from every device and
the gradient is that of the single-device computation.

Mixed precision: with ``compute_dtype=bfloat16`` the float parameters and
images are cast to bf16 for the forward pass (master weights, optimiser
state and BatchNorm statistics stay float32) and the embeddings are cast
back to float32 before the loss.
"""

from __future__ import annotations

__all__ = [
    "make_train_step",
    "make_embed_fn",
    "jit_train_step",
    "jit_embed_fn",
    "embed_source",
    "prefetch",
]

import concurrent.futures
import collections
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metric_jax import distances
from metric_jax import sharding
from metric_jax.training import state as state_lib

# ``preprocess(images_uint8 [B, H, W, C], rng, train: bool) -> float32``.
Preprocess = Callable[[jax.Array, jax.Array, bool], jax.Array]


def _cast_floats(tree: Any, dtype) -> Any:
  def cast(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, tree)


def make_train_step(model: nn.Module, objective: Any,
                    tx: optax.GradientTransformation, *,
                    preprocess: Preprocess,
                    schedule: Callable[[jax.Array], jax.Array] | None = None,
                    compute_dtype: Any = jnp.float32,
                    normalize_embeddings: bool = True) -> Callable:
  """Builds the pure ``train_step(state, batch, rng) -> (state, metrics)``.

  Args:
    model: Flax module ``(images, train) -> [B, E]``.
    objective: :class:`metric_jax.losses.Objective` or
      :class:`metric_jax.training.objective.TrainObjective` (which also
      takes the batch's ``extras`` and returns sampler ``feedback``).
    tx: optimiser of ``{"model": params, "loss": loss_params}``.
    preprocess: ``(images_uint8, rng, train) -> float32 images``, traced
      inside the step (augmentation runs on device).
    schedule: model learning-rate schedule, reported as ``learning_rate``.
    compute_dtype: dtype of the forward pass (``jnp.float32`` or
      ``jnp.bfloat16``).
    normalize_embeddings: L2-normalise embeddings before the objective.

  Returns:
    ``train_step(state, batch, rng)`` with ``batch = {"images": uint8 [B, H,
    W, C], "labels": int [B]}`` (optionally ``"where"``: bool [B], and
    ``"extras"``: ``{name: [B] array}`` keyword arguments of the main loss
    term from the sampler, e.g. ``cluster_ids``; needs a ``TrainObjective``)
    and ``rng`` the run's base key, folded with ``state.step`` inside.
    Metrics: ``loss``, ``loss/<term>`` (unweighted), ``grad_norm``,
    ``learning_rate``, ``embedding_norm`` (mean L2 norm of the raw
    embeddings) and ``embedding_spread`` (mean distance of the normalised
    embeddings to their centroid; near 0 means collapse); with a
    ``TrainObjective`` that gives feedback (magnet) also ``"feedback"``:
    ``{"losses": [B], "variance": scalar}`` for the sampler (not a log
    metric; the loop pops it).

  Raises:
    TypeError: (when called) if the batch has ``extras`` but the objective
      takes none.

  Example:
    The step's output structure, by ``jax.eval_shape`` (no compilation;
    :func:`jit_train_step` runs it):

    >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    >>> class Net(nn.Module):   # (images [B, 2, 2, 1], train) -> [B, 4]
    ...   @nn.compact
    ...   def __call__(self, images, train):
    ...     return nn.Dense(4)(images.reshape(images.shape[0], -1))
    >>> preprocess = lambda images, rng, train: images.astype(jnp.float32) / 255.0
    >>> from metric_jax.training import config as config_lib, objective, optim, state as state_lib
    >>> c = config_lib.base_config()    # AdamW, cosine decay
    >>> c.loss.name = "contrastive_loss"; c.loss.kwargs = {}
    >>> obj = objective.TrainObjective(c)
    >>> tx, schedules = optim.make_optimizer(c.optimizer, total_steps=10)
    >>> state = state_lib.init_train_state(jax.random.key(0), Net(), obj, tx, input_shape=(2, 2, 1),
    ...                                    num_classes=2, embedding_dim=4)
    >>> batch = {"images": np.arange(16, dtype=np.uint8).reshape(4, 2, 2, 1),
    ...          "labels": np.array([0, 0, 1, 1])}
    >>> train_step = make_train_step(Net(), obj, tx, preprocess=preprocess,
    ...                              schedule=schedules["model"])
    >>> new_state, metrics = jax.eval_shape(train_step, state, batch, jax.random.key(1))
    >>> sorted(metrics), new_state.params["Dense_0"]["kernel"].shape
    (['embedding_norm', 'embedding_spread', 'grad_norm', 'learning_rate', 'loss',
      'loss/contrastive_loss'], (4, 4))
  """
  compute_dtype = jnp.dtype(compute_dtype)

  def train_step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    aug_rng, dropout_rng = jax.random.split(step_rng)
    images = preprocess(batch["images"], aug_rng, True)
    labels = batch["labels"]
    where = batch.get("where")
    extras = batch.get("extras") or {}
    call_kw = {"extras": extras} if hasattr(objective, "feedback") else {}
    if extras and not call_kw:
      raise TypeError("`batch['extras']` needs an objective that takes extras "
                      "(metric_jax.training.objective.TrainObjective).")

    def loss_fn(tree):
      params = tree["model"]
      x = images
      if compute_dtype != jnp.float32:
        params = _cast_floats(params, compute_dtype)
        x = x.astype(compute_dtype)
      variables = {"params": params}
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
      emb, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": dropout_rng})
      emb = emb.astype(jnp.float32)
      raw_norm = jnp.linalg.norm(emb, axis=-1)
      if normalize_embeddings:
        emb = distances.l2_normalize(emb)
      total, terms = objective(emb, labels, tree["loss"], where=where, **call_kw)
      return total, (terms, updates, emb, raw_norm)

    tree = state_lib.trainable(state)
    (total, (terms, updates, emb, raw_norm)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(tree)
    opt_updates, opt_state = tx.update(grads, state.opt_state, tree)
    tree = optax.apply_updates(tree, opt_updates)
    batch_stats = updates.get("batch_stats", state.batch_stats)
    new_state = state.replace(step=state.step + 1, params=tree["model"],
                              batch_stats=batch_stats, loss_params=tree["loss"],
                              opt_state=opt_state)
    unit = distances.l2_normalize(emb)
    metrics = {
        "loss": total,
        **{f"loss/{k}": v for k, v in terms.items()},
        "grad_norm": optax.tree.norm(grads),
        "embedding_norm": jnp.mean(raw_norm),
        "embedding_spread": jnp.mean(
            jnp.linalg.norm(unit - jnp.mean(unit, axis=0, keepdims=True), axis=-1)),
    }
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    if call_kw:
      feedback = objective.feedback(emb, labels, state.loss_params, extras=extras,
                                    where=where)
      if feedback:
        metrics["feedback"] = feedback
    return new_state, metrics

  return train_step


def make_embed_fn(model: nn.Module, *, preprocess: Preprocess,
                  compute_dtype: Any = jnp.float32) -> Callable:
  """Builds ``embed(params, batch_stats, images_uint8) -> float32 [B, E]``
  (inference mode: BatchNorm running statistics, no augmentation).

  Args:
    model: Flax module ``(images, train) -> [B, E]``.
    preprocess: ``(images_uint8, rng, train) -> float32 images``; called
      with ``train=False`` and a fixed key.
    compute_dtype: dtype of the forward pass (default ``jnp.float32``;
      ``jnp.bfloat16`` casts the float parameters and images); the output
      is float32 either way.

  Returns:
    The pure ``embed(params, batch_stats, images [B, H, W, C] uint8) ->
    float32 [B, E]`` (``batch_stats`` may be ``{}``; raw, not normalised).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    >>> class Net(nn.Module):   # (images [B, 2, 2, 1], train) -> [B, 4]
    ...   @nn.compact
    ...   def __call__(self, images, train):
    ...     return nn.Dense(4)(images.reshape(images.shape[0], -1))
    >>> preprocess = lambda images, rng, train: images.astype(jnp.float32) / 255.0
    >>> params = Net().init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), train=False)["params"]
    >>> embed = make_embed_fn(Net(), preprocess=preprocess, compute_dtype=jnp.bfloat16)
    >>> e = embed(params, {}, np.zeros((3, 2, 2, 1), np.uint8))
    >>> e.shape, e.dtype
    ((3, 4), dtype('float32'))
  """
  compute_dtype = jnp.dtype(compute_dtype)

  def embed(params, batch_stats, images):
    x = preprocess(images, jax.random.key(0), False)
    if compute_dtype != jnp.float32:
      params = _cast_floats(params, compute_dtype)
      x = x.astype(compute_dtype)
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    return model.apply(variables, x, train=False).astype(jnp.float32)

  return embed


def jit_train_step(train_step: Callable, abstract_state: Any,
                   mesh: jax.sharding.Mesh) -> Callable:
  """``jax.jit`` with replicated state, ``P("data")`` batch, donated state.

  Args:
    train_step: the pure step of :func:`make_train_step`.
    abstract_state: ``jax.eval_shape`` of the initial
      :class:`~metric_jax.training.state.TrainState` (gives the shardings).
    mesh: the data mesh (:func:`metric_jax.sharding.make_mesh`).

  Returns:
    The jitted ``train_step(state, batch, rng) -> (state, metrics)``; the
    input state's buffers are donated (do not reuse it), the batch must be
    sharded over ``"data"`` (:func:`metric_jax.sharding.shard_batch`) and
    the metrics come back replicated.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    >>> class Net(nn.Module):   # (images [B, 2, 2, 1], train) -> [B, 4]
    ...   @nn.compact
    ...   def __call__(self, images, train):
    ...     return nn.Dense(4)(images.reshape(images.shape[0], -1))
    >>> preprocess = lambda images, rng, train: images.astype(jnp.float32) / 255.0
    >>> from metric_jax.training import config as config_lib, objective, optim, state as state_lib
    >>> c = config_lib.base_config()    # AdamW, cosine decay
    >>> c.loss.name = "contrastive_loss"; c.loss.kwargs = {}
    >>> obj = objective.TrainObjective(c)
    >>> tx, schedules = optim.make_optimizer(c.optimizer, total_steps=10)
    >>> state = state_lib.init_train_state(jax.random.key(0), Net(), obj, tx, input_shape=(2, 2, 1),
    ...                                    num_classes=2, embedding_dim=4)
    >>> batch = {"images": np.arange(16, dtype=np.uint8).reshape(4, 2, 2, 1),
    ...          "labels": np.array([0, 0, 1, 1])}
    >>> from metric_jax import sharding
    >>> mesh = sharding.make_mesh(num_devices=1)
    >>> step = jit_train_step(make_train_step(Net(), obj, tx, preprocess=preprocess),
    ...                       jax.eval_shape(lambda: state), mesh)
    >>> new_state, metrics = step(state, sharding.shard_batch(batch, mesh), jax.random.key(1))
    >>> int(new_state.step), bool(jnp.isfinite(metrics["loss"]))
    (1, True)
  """
  state_sh = sharding.state_shardings(abstract_state, mesh)
  rep = sharding.replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(state_sh, sharding.batch_sharding(mesh), rep),
                 out_shardings=(state_sh, rep),
                 donate_argnums=(0,))


def jit_embed_fn(embed: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """``jax.jit`` with replicated variables, ``P("data")`` images and a
  replicated output (every process gets all embeddings).

  Args:
    embed: the pure function of :func:`make_embed_fn`.
    mesh: the data mesh (:func:`metric_jax.sharding.make_mesh`).

  Returns:
    The jitted ``embed(params, batch_stats, images)``; ``images`` sharded
    over ``"data"`` (:func:`metric_jax.sharding.shard_batch`).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    >>> class Net(nn.Module):   # (images [B, 2, 2, 1], train) -> [B, 4]
    ...   @nn.compact
    ...   def __call__(self, images, train):
    ...     return nn.Dense(4)(images.reshape(images.shape[0], -1))
    >>> preprocess = lambda images, rng, train: images.astype(jnp.float32) / 255.0
    >>> from metric_jax import sharding
    >>> mesh = sharding.make_mesh(num_devices=1)
    >>> params = Net().init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), train=False)["params"]
    >>> images = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    >>> embed = make_embed_fn(Net(), preprocess=preprocess)
    >>> out = jit_embed_fn(embed, mesh)(params, {}, sharding.shard_batch(images, mesh))
    >>> out.shape, bool(np.allclose(out, embed(params, {}, images), atol=1e-6))
    ((2, 4), True)
  """
  rep = sharding.replicated(mesh)
  return jax.jit(embed, in_shardings=(rep, rep, sharding.batch_sharding(mesh)),
                 out_shardings=rep)


def prefetch(iterable: Iterable[Any], size: int = 2) -> Iterator[Any]:
  """Evaluates the items of ``iterable`` in a background thread, ``size``
  ahead (host data loading overlaps device compute). Order is preserved.

  Args:
    iterable: any iterable (its ``next`` runs in one worker thread, so
      items are produced in order).
    size: number of items requested ahead (default 2).

  Returns:
    An iterator over the same items; an exception of ``iterable`` is
    raised where its item would be.

  Example:
    >>> list(prefetch((i * i for i in range(5)), size=2))
    [0, 1, 4, 9, 16]
  """
  iterator = iter(iterable)
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    queue = collections.deque()
    sentinel = object()

    def nxt():
      return next(iterator, sentinel)

    for _ in range(size):
      queue.append(pool.submit(nxt))
    while True:
      item = queue.popleft().result()
      if item is sentinel:
        return
      queue.append(pool.submit(nxt))
      yield item


def embed_source(embed: Callable, params: Any, batch_stats: Any, source: Any,
                 mesh: jax.sharding.Mesh, batch_size: int,
                 indices: np.ndarray | None = None) -> np.ndarray:
  """Embeds ``source`` (or ``source[indices]``) in fixed-size batches.

  The last batch is padded by repeating its final index so that every call
  has the same shape (one compilation); the padded rows are masked out
  (dropped) on the host. BatchNorm runs in inference mode, so padding does
  not change the other rows.

  Args:
    embed: the jitted function of :func:`jit_embed_fn`.
    params: the model's ``"params"`` collection.
    batch_stats: the model's ``"batch_stats"`` collection (``{}`` if none).
    source: anything with ``len()`` and ``images(indices) -> uint8``.
    mesh: the data mesh.
    batch_size: global batch size (divisible by the device count).
    indices: optional [N] subset of rows (default None: all of
      ``source``).

  Returns:
    float32 [N, E] NumPy array in the order of ``indices``.

  Raises:
    ValueError: for a batch size the mesh cannot split, or no rows.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    >>> class Net(nn.Module):   # (images [B, 2, 2, 1], train) -> [B, 4]
    ...   @nn.compact
    ...   def __call__(self, images, train):
    ...     return nn.Dense(4)(images.reshape(images.shape[0], -1))
    >>> preprocess = lambda images, rng, train: images.astype(jnp.float32) / 255.0
    >>> from metric_jax import sharding
    >>> class Source:   # 5 images of 2 x 2 x 1
    ...   x = np.arange(20, dtype=np.uint8).reshape(5, 2, 2, 1)
    ...   def __len__(self): return 5
    ...   def images(self, idx): return self.x[idx]
    >>> mesh = sharding.make_mesh(num_devices=1)
    >>> params = Net().init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), train=False)["params"]
    >>> embed = make_embed_fn(Net(), preprocess=preprocess)
    >>> out = embed_source(jit_embed_fn(embed, mesh), params, {}, Source(), mesh, batch_size=2,
    ...                    indices=[4, 0, 2])
    >>> out.shape, bool(np.allclose(out, embed(params, {}, Source.x[[4, 0, 2]]), atol=1e-6))
    ((3, 4), True)
  """
  sharding.check_batch_size(batch_size, mesh, "eval batch_size")
  if indices is None:
    indices = np.arange(len(source))
  indices = np.asarray(indices)
  if indices.size == 0:
    raise ValueError("cannot embed an empty source.")
  local = sharding.local_batch_slice(batch_size)

  def batches():
    for start in range(0, len(indices), batch_size):
      idx = indices[start:start + batch_size]
      padded = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
      yield len(idx), np.asarray(source.images(padded[local]))

  outs = []
  for n_valid, images in prefetch(batches()):
    out = embed(params, batch_stats, sharding.shard_batch(images, mesh))
    outs.append((n_valid, out))
  return np.concatenate([np.asarray(o)[:n] for n, o in outs], axis=0)
