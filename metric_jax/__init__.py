"""metric_jax: deep metric learning in JAX.

Pure-function losses over pairwise distance matrices, miners as masks,
jit-compiled evaluation, and a Flax/Optax training pipeline.

Example:
  >>> import jax, jax.numpy as jnp, metric_jax as mj
  >>> emb = jax.random.normal(jax.random.key(0), (8, 4))
  >>> labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  >>> loss = mj.losses.triplet_margin_loss(emb, labels, margin=0.2, mining="semihard")
"""

from metric_jax import distances
from metric_jax import losses
from metric_jax import pairs
from metric_jax import reductions

__version__ = "0.1.0"
