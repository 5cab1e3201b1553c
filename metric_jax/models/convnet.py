"""A small ConvNet for small grey images (8x8 digits, 28x28 Omniglot).

Each stage is ``conv 3x3 -> BatchNorm -> ReLU -> max-pool 2x2 (SAME)``;
global average pooling gives the [B, features[-1]] feature vector. With the
default (32, 64, 128) it has ~93k parameters and maps 28x28 to 4x4 (8x8 to
1x1) before pooling: fast on a CPU.

The four-block "conv-4" of the few-shot literature (Vinyals et al. 2016,
arXiv 1606.04080) is ``ConvNet(features=(64, 64, 64, 64))``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metric_jax.models.heads import BN_EPSILON, BN_MOMENTUM


class ConvNet(nn.Module):
  """Conv-BN-ReLU-pool stages, then global average pooling.

  Attributes:
    features: channels of each stage.
    dtype: compute dtype (parameters stay float32).
    freeze_bn: use the running statistics even when ``train=True``.
  """

  features: Sequence[int] = (32, 64, 128)
  dtype: Any = jnp.float32
  freeze_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """[B, H, W, C] -> [B, features[-1]]."""
    x = x.astype(self.dtype)
    for i, f in enumerate(self.features):
      x = nn.Conv(f, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                  name=f"conv{i + 1}")(x)
      x = nn.BatchNorm(use_running_average=(not train) or self.freeze_bn,
                       momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype,
                       name=f"bn{i + 1}")(x)
      x = nn.relu(x)
      if x.shape[1] > 1 or x.shape[2] > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return jnp.mean(x, axis=(1, 2))
