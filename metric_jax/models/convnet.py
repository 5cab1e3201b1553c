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

__all__ = ["ConvNet"]


class ConvNet(nn.Module):
  """Conv-BN-ReLU-pool stages, then global average pooling.

  Stage ``i`` computes ``x = maxpool2x2(relu(BN_i(conv3x3_i(x))))`` (the
  pool is skipped once the map is 1x1); the output is the spatial mean
  ``[B, H', W', F] -> [B, F]`` with ``F = features[-1]``. Call it as
  ``module.apply(variables, images [B, H, W, C], train)``; BN statistics
  live in ``batch_stats``.

  Attributes:
    features: channels of each stage; default (32, 64, 128).
    dtype: compute dtype (parameters stay float32); default float32.
    freeze_bn: use the running statistics even when ``train=True``;
      default False.

  References:
    Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra, "Matching Networks
    for One Shot Learning", NeurIPS 2016, arXiv 1606.04080 (the conv-4
    embedding: ``features=(64, 64, 64, 64)``).

  Example:
    Shapes only (``jax.eval_shape`` traces without computing):

    >>> import jax, jax.numpy as jnp
    >>> net = ConvNet(features=(4, 8))
    >>> x = jnp.ones((2, 28, 28, 1))
    >>> variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))
    >>> variables["params"]["conv2"]["kernel"].shape
    (3, 3, 4, 8)
    >>> jax.eval_shape(lambda v: net.apply(v, x, train=False), variables).shape
    (2, 8)
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
