"""Embedding heads and the backbone + head model.

The head maps pooled backbone features to the embedding:

  e = W f + b                      (linear, ``embedding_dim`` outputs)
  e = BN(e)                        (optional "BN neck", Luo et al. 2019)
  e = e / max(||e||_2, eps)        (optional L2 normalisation)

The head always computes and returns float32, whatever the backbone's
compute dtype, so that losses see full-precision embeddings.

References:
  Luo, Gu, Liao, Lai, Jiang, "Bag of Tricks and A Strong Baseline for Deep
  Person Re-identification", CVPRW 2019, arXiv 1903.07071 (BN neck: a batch
  normalisation between the features and the metric; its shift is not
  learned).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from metric_jax import distances

__all__ = ["BN_EPSILON", "BN_MOMENTUM", "EmbeddingHead", "EmbeddingModel"]

# torch.nn.BatchNorm momentum 0.1 == flax momentum 0.9 (weight of the old value).
BN_MOMENTUM = 0.9
"""Flax batch-norm momentum of every model (torch's ``momentum=0.1``):
``running = 0.9 * running + 0.1 * batch``."""
BN_EPSILON = 1e-5
"""Batch-norm epsilon of every model (torch's default)."""


class EmbeddingHead(nn.Module):
  """Linear projection, optional BN neck, optional L2 normalisation.

  ``module.apply(variables, features [B, F], train)`` returns [B, D]
  float32: ``e = W f + b``, then ``BN(e)`` if ``bn_neck``, then
  ``e / max(||e||_2, 1e-12)`` if ``normalize`` (see the module docstring).

  Attributes:
    embedding_dim: D, the embedding size.
    normalize: L2-normalise the output; default False.
    bn_neck: batch-normalise the projection (scale learned, no shift);
      default False.
    dtype: compute dtype of the projection (the output is float32); default
      float32.

  References:
    Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person
    Re-identification", CVPRW 2019, arXiv 1903.07071 (BN neck).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> head = EmbeddingHead(embedding_dim=3, normalize=True, bn_neck=True)
    >>> f = jax.random.normal(jax.random.key(0), (4, 5))
    >>> variables = head.init(jax.random.key(1), f, train=False)
    >>> e = head.apply(variables, f, train=False)
    >>> e.shape, e.dtype, [round(float(n), 4) for n in jnp.linalg.norm(e, axis=1)]
    ((4, 3), dtype('float32'), [1.0, 1.0, 1.0, 1.0])
  """

  embedding_dim: int
  normalize: bool = False
  bn_neck: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool) -> jax.Array:
    """[B, F] features -> [B, embedding_dim] float32 embeddings."""
    x = nn.Dense(self.embedding_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 name="projection")(features)
    x = x.astype(jnp.float32)
    if self.bn_neck:
      x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                       epsilon=BN_EPSILON, use_bias=False, dtype=jnp.float32,
                       name="neck")(x)
    if self.normalize:
      x = distances.l2_normalize(x, axis=-1)
    return x


class EmbeddingModel(nn.Module):
  """``images -> backbone -> pooled features -> EmbeddingHead -> embeddings``.

  Parameters live under ``params/backbone`` and ``params/head``; batch-norm
  statistics under ``batch_stats`` (same sub-trees).

  Usually made by :func:`metric_jax.models.build_model`.

  Attributes:
    backbone: a module ``(images [B, H, W, C], train) -> [B, F]`` features
      (e.g. :class:`~metric_jax.models.ConvNet`,
      :class:`~metric_jax.models.ResNet`).
    embedding_dim: D.
    normalize: L2-normalise the embeddings; default False.
    bn_neck: BN neck in the head; default False.
    dtype: compute dtype of the head's projection; default float32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metric_jax.models import ConvNet
    >>> model = EmbeddingModel(backbone=ConvNet(features=(4,)), embedding_dim=2)
    >>> x = jnp.ones((3, 8, 8, 1))
    >>> variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    >>> sorted(variables["params"]), sorted(variables["batch_stats"])
    (['backbone', 'head'], ['backbone'])
    >>> jax.eval_shape(lambda v: model.apply(v, x, train=False), variables).shape
    (3, 2)
    >>> jax.eval_shape(lambda v: model.apply(v, x, train=False, method=model.features),
    ...                variables).shape
    (3, 4)
  """

  backbone: nn.Module
  embedding_dim: int
  normalize: bool = False
  bn_neck: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.head = EmbeddingHead(self.embedding_dim, normalize=self.normalize,
                              bn_neck=self.bn_neck, dtype=self.dtype)

  def features(self, images: jax.Array, train: bool) -> jax.Array:
    """[B, H, W, C] -> [B, F] pooled backbone features (compute dtype)."""
    return self.backbone(images, train=train)

  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    """Embeds a batch.

    Args:
      images: [B, H, W, C] float32 preprocessed images.
      train: batch statistics (and their update, with
        ``mutable=["batch_stats"]``) instead of running averages.

    Returns:
      [B, embedding_dim] float32.
    """
    shape = tuple(images.shape)
    if len(shape) != 4:
      raise ValueError(f"`images` must have shape [B, H, W, C], got {shape}.")
    if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
      raise TypeError(f"`images` must be floating point (preprocessed), got dtype "
                      f"{jnp.result_type(images)}.")
    return self.head(self.backbone(images, train=train), train=train)
