"""Flax (linen) backbones and embedding heads: ``build_model(name, embedding_dim=...)``.

Every model maps preprocessed float32 images [B, H, W, C] to float32
embeddings [B, embedding_dim]: ``model.apply(variables, images, train=...)``;
batch-norm statistics live in the ``"batch_stats"`` collection (pass
``mutable=["batch_stats"]`` when ``train=True``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from metric_jax import models
  >>> model = models.build_model("convnet", embedding_dim=16, normalize=True)
  >>> x = jnp.zeros((2, 8, 8, 1))
  >>> variables = model.init(jax.random.key(0), x, train=False)
  >>> emb = model.apply(variables, x, train=False)
  >>> emb.shape, emb.dtype
  ((2, 16), dtype('float32'))
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from metric_jax.models.convnet import ConvNet
from metric_jax.models.heads import EmbeddingHead
from metric_jax.models.heads import EmbeddingModel
from metric_jax.models.resnet import ResNet
from metric_jax.models.resnet import STAGE_SIZES

MODEL_NAMES: tuple[str, ...] = ("convnet",) + tuple(STAGE_SIZES)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(dtype: Any):
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"`dtype` must be one of {tuple(_DTYPES)}, got {dtype!r}.")
    return _DTYPES[dtype]
  if dtype is None:
    return jnp.float32
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating dtype, got {dtype!r}.")
  return dtype


def build_model(name: str, *, embedding_dim: int, normalize: bool = False,
                bn_neck: bool = False, dtype: Any = jnp.float32, freeze_bn: bool = False,
                **kwargs) -> EmbeddingModel:
  """Builds a backbone + embedding head.

  Args:
    name: one of :data:`MODEL_NAMES`: ``"convnet"`` (small grey images),
      ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"``,
      ``"resnet152"`` (ImageNet layout, torchvision parameter names).
    embedding_dim: D, the embedding size.
    normalize: L2-normalise the embeddings.
    bn_neck: batch norm after the projection (see :class:`EmbeddingHead`).
    dtype: compute dtype (``jnp.float32``, ``jnp.bfloat16``, or their names);
      parameters, BN statistics and the embeddings stay float32.
    freeze_bn: the backbone's BN layers use running statistics even with
      ``train=True`` (the BN neck, trained from scratch, is not frozen).
    **kwargs: backbone options: ``features`` (convnet), ``width`` and
      ``zero_init_residual`` (resnets).

  Returns:
    An :class:`EmbeddingModel` (a ``flax.linen.Module``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metric_jax import models
    >>> model = models.build_model("convnet", embedding_dim=4, normalize=True, features=(8,))
    >>> x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    >>> variables = model.init(jax.random.key(1), x, train=False)
    >>> sorted(variables)
    ['batch_stats', 'params']
    >>> emb, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    >>> emb.shape, [round(float(n), 4) for n in jnp.linalg.norm(emb, axis=1)]
    ((3, 4), [1.0, 1.0, 1.0])
  """
  if name not in MODEL_NAMES:
    raise ValueError(f"`name` must be one of {MODEL_NAMES}, got {name!r}.")
  if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
    raise ValueError(f"`embedding_dim` must be a positive int, got {embedding_dim!r}.")
  dtype = _dtype(dtype)
  allowed = ("features",) if name == "convnet" else ("width", "zero_init_residual")
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise TypeError(f"Unknown option(s) {unknown} for model {name!r}; allowed: "
                    f"normalize, bn_neck, dtype, freeze_bn, {', '.join(allowed)}.")
  if name == "convnet":
    backbone = ConvNet(dtype=dtype, freeze_bn=freeze_bn, **kwargs)
  else:
    stages, block = STAGE_SIZES[name]
    backbone = ResNet(stage_sizes=stages, block=block, dtype=dtype, freeze_bn=freeze_bn,
                      **kwargs)
  return EmbeddingModel(backbone=backbone, embedding_dim=embedding_dim, normalize=normalize,
                        bn_neck=bn_neck, dtype=dtype)


__all__ = ["ConvNet", "EmbeddingHead", "EmbeddingModel", "MODEL_NAMES", "ResNet",
           "STAGE_SIZES", "build_model"]
