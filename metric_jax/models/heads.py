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

# torch.nn.BatchNorm momentum 0.1 == flax momentum 0.9 (weight of the old value).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class EmbeddingHead(nn.Module):
  """Linear projection, optional BN neck, optional L2 normalisation.

  Attributes:
    embedding_dim: D, the embedding size.
    normalize: L2-normalise the output.
    bn_neck: batch-normalise the projection (scale learned, no shift).
    dtype: compute dtype of the projection (the output is float32).
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

  Attributes:
    backbone: a module ``(images, train) -> [B, F]`` features.
    embedding_dim: D.
    normalize: L2-normalise the embeddings.
    bn_neck: BN neck in the head.
    dtype: compute dtype of the head's projection.
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
