"""ResNet backbones in the ImageNet (torchvision) layout.

The module tree mirrors torchvision's ``state_dict`` names so that pretrained
weights convert mechanically (:mod:`metric_jax.models.torch_convert`):
torch ``layer2.0.downsample.1.running_mean`` is Flax
``batch_stats/layer2_0/downsample_1/mean``. Architecture (He et al. 2016,
"v1.5": the stride of a bottleneck block sits on its 3x3 convolution):

  conv1 7x7/2 (pad 3) -> bn1 -> ReLU -> max-pool 3x3/2 (pad 1)
  -> layer1..layer4 (blocks; stride 2 from layer2 on) -> global average pool

Output: [B, 512 * expansion * width / 64] features (512 for ResNet-18/34,
2048 for ResNet-50/101/152). Batch norm uses torch's epsilon 1e-5 and
momentum 0.1 (Flax momentum 0.9). ``freeze_bn=True`` keeps every BN layer in
inference mode (running statistics, never updated), as is customary when
fine-tuning ImageNet models with small metric-learning batches.

References:
  He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016, arXiv 1512.03385.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metric_jax.models.heads import BN_EPSILON, BN_MOMENTUM

__all__ = ["ResNet", "STAGE_SIZES"]

# torchvision's init: kaiming normal, fan_out, ReLU gain.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

STAGE_SIZES = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
    "resnet152": ((3, 8, 36, 3), "bottleneck"),
}
"""``name -> (blocks per stage, block type)`` of the standard ResNets
(He et al. 2016, Table 1): e.g. ``STAGE_SIZES["resnet50"] == ((3, 4, 6, 3),
"bottleneck")``."""


class _Block(nn.Module):
  """Basic (2 x 3x3) or bottleneck (1x1, 3x3, 1x1) residual block."""

  planes: int
  strides: int
  bottleneck: bool
  downsample: bool
  dtype: Any
  frozen_or_eval: bool
  zero_init_residual: bool

  def _conv(self, features, kernel, strides, name):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
                   kernel_init=_conv_init, name=name)

  def _bn(self, name, zero=False):
    return nn.BatchNorm(use_running_average=self.frozen_or_eval, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, dtype=self.dtype, name=name,
                        scale_init=nn.initializers.zeros if zero else nn.initializers.ones)

  @nn.compact
  def __call__(self, x):
    expansion = 4 if self.bottleneck else 1
    residual = x
    if self.bottleneck:
      y = nn.relu(self._bn("bn1")(self._conv(self.planes, 1, 1, "conv1")(x)))
      y = nn.relu(self._bn("bn2")(self._conv(self.planes, 3, self.strides, "conv2")(y)))
      y = self._bn("bn3", self.zero_init_residual)(
          self._conv(self.planes * expansion, 1, 1, "conv3")(y))
    else:
      y = nn.relu(self._bn("bn1")(self._conv(self.planes, 3, self.strides, "conv1")(x)))
      y = self._bn("bn2", self.zero_init_residual)(self._conv(self.planes, 3, 1, "conv2")(y))
    if self.downsample:
      residual = self._bn("downsample_1")(
          self._conv(self.planes * expansion, 1, self.strides, "downsample_0")(x))
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """ResNet feature extractor (no classifier).

  ``module.apply(variables, images [B, H, W, 3], train)`` returns
  [B, 8 * width * expansion] float features (expansion 1 for ``"basic"``
  blocks, 4 for ``"bottleneck"``): the stem, four stages whose channels
  double (``width * 2**stage``, stride 2 from the second stage on), and a
  global average pool. Each block computes ``relu(F(x) + shortcut(x))``.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) (the default) for
      ResNet-18; see :data:`STAGE_SIZES`.
    block: ``"basic"`` (default) or ``"bottleneck"``.
    width: channels of the first stage (64, the default, in the standard nets).
    dtype: compute dtype (parameters and BN statistics stay float32); default
      float32.
    freeze_bn: BN layers always use (and never update) running statistics;
      default False.
    zero_init_residual: initialise the last BN scale of each block to 0;
      default False.

  References:
    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
    CVPR 2016, arXiv 1512.03385.

  Example:
    Shapes only (``jax.eval_shape`` traces without computing):

    >>> import jax, jax.numpy as jnp
    >>> net = ResNet(stage_sizes=(1, 1, 1, 1), block="bottleneck", width=4)
    >>> x = jnp.ones((2, 32, 32, 3))
    >>> variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))
    >>> variables["batch_stats"]["layer2_0"]["downsample_1"]["mean"].shape
    (32,)
    >>> jax.eval_shape(lambda v: net.apply(v, x, train=False), variables).shape
    (2, 128)
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  width: int = 64
  dtype: Any = jnp.float32
  freeze_bn: bool = False
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """[B, H, W, 3] -> [B, 8 * width * expansion] pooled features."""
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"`block` must be 'basic' or 'bottleneck', got {self.block!r}.")
    bottleneck = self.block == "bottleneck"
    expansion = 4 if bottleneck else 1
    frozen_or_eval = (not train) or self.freeze_bn
    x = x.astype(self.dtype)
    x = nn.Conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, kernel_init=_conv_init, name="conv1")(x)
    x = nn.BatchNorm(use_running_average=frozen_or_eval, momentum=BN_MOMENTUM,
                     epsilon=BN_EPSILON, dtype=self.dtype, name="bn1")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_features = self.width
    for stage, blocks in enumerate(self.stage_sizes):
      planes = self.width * 2 ** stage
      for j in range(blocks):
        strides = 2 if (stage > 0 and j == 0) else 1
        downsample = j == 0 and (strides != 1 or in_features != planes * expansion)
        x = _Block(planes, strides, bottleneck, downsample, self.dtype, frozen_or_eval,
                   self.zero_init_residual, name=f"layer{stage + 1}_{j}")(x)
        in_features = planes * expansion
    return jnp.mean(x, axis=(1, 2))
