"""The train state: a pytree of arrays, nothing else.

``TrainState`` holds everything that changes during training and must be
checkpointed: the step, the model parameters, BatchNorm statistics, the
learned parameters of the loss terms (proxies, centres, class weights,
learnable beta) and the optimiser state. The model, the objective and the
optimiser are static and live in the closures of the step functions, so the
state is a plain pytree that ``jax.eval_shape``, ``jax.jit`` shardings and
orbax handle directly.

The randomness of a step is ``fold_in(base_key, step)`` with the run's
base key derived from ``config.seed`` (big_vision style), so a run resumed
from a checkpoint replays exactly the same random numbers.
"""

from __future__ import annotations

__all__ = ["TrainState", "init_train_state", "trainable", "describe"]

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, number of completed optimiser steps.
    params: the model's ``"params"`` collection.
    batch_stats: the model's ``"batch_stats"`` collection (``{}`` if none).
    loss_params: ``{term_key: {kwarg: array}}`` of the objective.
    opt_state: optimiser state over ``{"model": params, "loss": loss_params}``.

  Built by :func:`init_train_state`; a ``flax.struct`` dataclass, so
  ``state.replace(step=...)`` returns an updated copy.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> s = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones((2, 3))},
    ...                batch_stats={}, loss_params={}, opt_state=())
    >>> int(s.replace(step=s.step + 1).step), len(jax.tree.leaves(s))
    (1, 2)
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  loss_params: Any
  opt_state: Any


def trainable(state: TrainState) -> dict[str, Any]:
  """The tree the optimiser updates: ``{"model": ..., "loss": ...}``.

  Args:
    state: a :class:`TrainState`.

  Returns:
    ``{"model": state.params, "loss": state.loss_params}``.

  Example:
    >>> import jax.numpy as jnp
    >>> s = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(2)},
    ...                batch_stats={}, loss_params={"proxies": jnp.zeros((3, 2))}, opt_state=())
    >>> describe(trainable(s))
    {'loss/proxies': ((3, 2), 'float32'), 'model/w': ((2,), 'float32')}
  """
  return {"model": state.params, "loss": state.loss_params}


def init_train_state(key: jax.Array, model: nn.Module, objective: Any,
                     tx: optax.GradientTransformation, *, input_shape,
                     num_classes: int, embedding_dim: int) -> TrainState:
  """Initialises a :class:`TrainState` (pure: wrap it in ``jax.jit`` /
  ``jax.eval_shape``).

  Args:
    key: ``jax.random`` key.
    model: a Flax module ``(images [B, H, W, C], train) -> [B, E]``.
    objective: a :class:`metric_jax.losses.Objective`.
    tx: the optimiser of :func:`metric_jax.training.optim.make_optimizer`.
    input_shape: ``(H, W, C)`` of the preprocessed images.
    num_classes: number of training classes (for proxies, centres...).
    embedding_dim: E.

  Returns:
    The initial state with ``step == 0``.

  Example:
    >>> import jax, flax.linen as nn
    >>> from metric_jax.training import config as config_lib, objective, optim
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, images, train):
    ...     return nn.Dense(4)(images.reshape(images.shape[0], -1))
    >>> c = config_lib.base_config()
    >>> tx, _ = optim.make_optimizer(c.optimizer, total_steps=10)
    >>> s = init_train_state(jax.random.key(0), Net(), objective.TrainObjective(c), tx,
    ...                      input_shape=(2, 2, 1), num_classes=3, embedding_dim=4)
    >>> int(s.step), describe(s.params), s.loss_params
    (0, {'Dense_0/bias': ((4,), 'float32'), 'Dense_0/kernel': ((4, 4), 'float32')},
     {'triplet_margin_loss': {}})
  """
  model_key, loss_key = jax.random.split(key)
  dummy = jnp.zeros((1, *input_shape), jnp.float32)
  variables = model.init({"params": model_key, "dropout": model_key}, dummy, train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  loss_params = objective.init_params(loss_key, num_classes, embedding_dim)
  loss_params = jax.tree.map(jnp.asarray, loss_params)
  opt_state = tx.init({"model": params, "loss": loss_params})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, loss_params=loss_params,
                    opt_state=opt_state)


def describe(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{path: (shape, dtype)}`` of every leaf, for structure comparisons.

  Paths join the dict keys / attribute names / indices with ``/``; PRNG
  key arrays get the dtype ``"key"``.

  Args:
    tree: any pytree whose leaves are arrays, ``jax.ShapeDtypeStruct`` s,
      orbax metadata or scalars.

  Returns:
    ``{path: (shape tuple, dtype str)}``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> describe({"a": [jnp.zeros((2, 3)), jax.ShapeDtypeStruct((4,), jnp.int32)],
    ...           "k": jax.random.key(0)})
    {'a/0': ((2, 3), 'float32'), 'a/1': ((4,), 'int32'), 'k': ((), 'key')}
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(_key_str(k) for k in path)
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      dtype = "key"
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    out[key] = (tuple(int(n) for n in shape), str(dtype))
  return out


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)
