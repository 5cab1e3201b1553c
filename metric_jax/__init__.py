"""metric_jax: deep metric learning in JAX.

Pure-function losses over pairwise distance matrices, miners as masks,
jit-compiled evaluation, and a Flax/Optax training pipeline.

Example:
  >>> import jax, jax.numpy as jnp, metric_jax as mj
  >>> emb = jax.random.normal(jax.random.key(0), (8, 4))
  >>> labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  >>> loss = mj.losses.triplet_margin_loss(emb, labels, margin=0.2, mining="semihard")
"""

import importlib as _importlib

from metric_jax import distances
from metric_jax import losses
from metric_jax import pairs
from metric_jax import reductions

__version__ = "0.1.0"

# Heavier subpackages load on first attribute access (``mj.evaluation``), so
# ``import metric_jax`` stays light and free of side effects.
_LAZY = ("bregman", "clustering", "data", "evaluation", "magnet_index", "memory",
         "miners", "models", "sharding", "streaming", "training")


def __getattr__(name):
  if name in _LAZY:
    module = _importlib.import_module(f"{__name__}.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'metric_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
