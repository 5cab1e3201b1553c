"""On-device preprocessing and augmentation, jittable and deterministic given the key.

Images arrive as uint8 [B, H, W, C] (fixed host size) and leave as float32
[B, H', W', C] ready for the model. Each image gets its own key:
``image_keys = jax.random.split(rng, B)`` and, for image ``i``,
``crop_key, flip_key = jax.random.split(image_keys[i])``.

Training (``train=True``):
  1. random resized crop (if ``random_resized_crop``): a box of area
     ``U(crop_scale) * H * W`` and aspect ratio ``exp(U(log crop_ratio))``,
     at a uniform position; resized to ``output_size`` (bilinear,
     antialiased). Otherwise the centre crop below.
  2. horizontal flip with probability 1/2 (if ``flip``).
Evaluation (``train=False``) and training without random crop: centre crop
keeping the fraction ``center_crop`` of each side (e.g. 0.875 = 224/256),
resized to ``output_size``.
Finally ``(x / 255 - mean) / std`` (``mean``/``std`` in the [0, 1] scale,
e.g. ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)).

The random box follows the Inception-style crop (Szegedy et al., "Going
Deeper with Convolutions", arXiv 1409.4842) as popularised by torchvision's
``RandomResizedCrop``: up to 10 attempts, integer box sides, and a fallback
to the largest centred box whose aspect ratio lies within ``crop_ratio``.
The resize reads pixels of the box only (crop, then resize).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["crop_and_resize", "preprocess", "sample_crop_box"]

_ATTEMPTS = 10


def _pair(value, name: str, *, low: float, high: float | None) -> tuple[float, float]:
  try:
    a, b = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"`{name}` must be a pair (min, max), got {value!r}.") from None
  if not (low < a <= b and (high is None or b <= high)):
    bound = f"{low} < min <= max" + (f" <= {high}" if high is not None else "")
    raise ValueError(f"`{name}` must satisfy {bound}, got {value!r}.")
  return a, b


def sample_crop_box(key: jax.Array, height: int, width: int,
                    scale: Sequence[float] = (0.16, 1.0),
                    ratio: Sequence[float] = (0.75, 1.333)) -> jax.Array:
  """Samples a random resized crop box inside a ``height`` x ``width`` image.

  Ten candidates ``(area, aspect)`` are drawn at once; the first whose
  integer sides ``w = round(sqrt(area * aspect))``,
  ``h = round(sqrt(area / aspect))`` fit in the image is taken, at a uniform
  integer position. If none fits, the box is the largest centred one with
  aspect ratio clipped to ``ratio``.

  Args:
    key: a PRNG key.
    height: static image height H (int).
    width: static image width W (int).
    scale: (min, max) fraction of the image area, ``0 < min <= max <= 1``;
      default (0.16, 1.0).
    ratio: (min, max) aspect ratio width / height, ``0 < min <= max``;
      default (0.75, 1.333).

  Returns:
    int32 [4] ``(top, left, h, w)`` with ``0 <= top``, ``top + h <= height``,
    ``0 <= left``, ``left + w <= width``, ``h, w >= 1``.

  Raises:
    ValueError: if ``scale`` or ``ratio`` is not a valid (min, max) pair.

  References:
    Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, arXiv
    1409.4842 (the random-sized crop); torchvision ``RandomResizedCrop``
    (the 10 attempts and the fallback box).

  Example:
    >>> import jax
    >>> box = sample_crop_box(jax.random.key(0), 32, 32)
    >>> box.shape, box.dtype
    ((4,), dtype('int32'))
    >>> top, left, h, w = box.tolist()
    >>> 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32
    True
    >>> sample_crop_box(jax.random.key(0), 32, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0)).tolist()
    [0, 0, 32, 32]
  """
  s0, s1 = _pair(scale, "crop_scale", low=0.0, high=1.0)
  r0, r1 = _pair(ratio, "crop_ratio", low=0.0, high=None)
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (_ATTEMPTS,), minval=s0, maxval=s1)
  aspect = jnp.exp(jax.random.uniform(k_ratio, (_ATTEMPTS,), minval=math.log(r0),
                                      maxval=math.log(r1)))
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(ok)
  # Fallback: the whole image, narrowed to the nearest allowed aspect ratio.
  in_ratio = width / height
  if in_ratio < r0:
    fb_w, fb_h = width, min(height, max(1, int(round(width / r0))))
  elif in_ratio > r1:
    fb_w, fb_h = min(width, max(1, int(round(height * r1)))), height
  else:
    fb_w, fb_h = width, height
  found = ok[first]
  h = jnp.where(found, h[first], fb_h)
  w = jnp.where(found, w[first], fb_w)
  u_top, u_left = jax.random.uniform(k_top), jax.random.uniform(k_left)
  top_rand = jnp.minimum(jnp.floor(u_top * (height - h + 1)), height - h).astype(jnp.int32)
  left_rand = jnp.minimum(jnp.floor(u_left * (width - w + 1)), width - w).astype(jnp.int32)
  top = jnp.where(found, top_rand, (height - h) // 2)
  left = jnp.where(found, left_rand, (width - w) // 2)
  return jnp.stack([top, left, h, w]).astype(jnp.int32)


def crop_and_resize(image: jax.Array, box: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """Crops ``box`` out of ``image`` and resizes it (bilinear, antialiased).

  Only pixels inside the box contribute: the box indicator is resized with
  the image and divides it out, which equals cropping first and resizing the
  crop with ``jax.image.resize(..., "linear", antialias=True)`` while
  keeping every shape static (the box may be traced).

  Output pixel ``(r, c)`` samples the box at
  ``(top + (r + 1/2) h / H' - 1/2, left + (c + 1/2) w / W' - 1/2)`` with a
  triangle (bilinear) kernel, widened by the scale factor when downsampling
  (antialiasing), normalised over the pixels inside the box.

  Args:
    image: [H, W, C] float (or integer, cast to float32).
    box: [4] ``(top, left, h, w)`` (int or float, may be traced).
    output_size: static (H', W').

  Returns:
    [H', W', C] float32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> image = jnp.zeros((4, 4, 1)).at[:2, :2].set(8.0)
    >>> resize = jax.jit(crop_and_resize, static_argnums=2)  # box may be traced
    >>> out = resize(image, jnp.array([0, 0, 2, 2]), (3, 3))
    >>> out.shape, out.min().item(), out.max().item()
    ((3, 3, 1), 8.0, 8.0)
  """
  height, width, channels = image.shape
  oh, ow = output_size
  box = jnp.asarray(box, jnp.float32)
  top, left, h, w = box[0], box[1], box[2], box[3]
  rows = jnp.arange(height, dtype=jnp.float32)[:, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, :]
  inside = ((rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w))
  inside = inside.astype(jnp.float32)[..., None]
  stacked = jnp.concatenate([image.astype(jnp.float32) * inside, inside], axis=-1)
  scale = jnp.stack([oh / h, ow / w])
  out = jax.image.scale_and_translate(
      stacked, (oh, ow, channels + 1), (0, 1), scale, -jnp.stack([top, left]) * scale,
      method="linear", antialias=True)
  weight = out[..., channels:]
  # Every output pixel's centre maps inside the box, so weight > 0.
  return out[..., :channels] / jnp.where(weight > 0, weight, 1.0)


def _static_size(output_size, height: int, width: int) -> tuple[int, int]:
  if output_size is None:
    return height, width
  try:
    oh, ow = (int(v) for v in output_size)
  except (TypeError, ValueError):
    raise ValueError(f"`output_size` must be an (H, W) pair or None, got {output_size!r}.") from None
  if oh < 1 or ow < 1:
    raise ValueError(f"`output_size` must be positive, got {output_size!r}.")
  return oh, ow


def _channel_vector(value, channels: int, name: str) -> jax.Array | None:
  if value is None:
    return None
  v = jnp.asarray(value, jnp.float32).reshape(-1)
  if v.shape[0] not in (1, channels):
    raise ValueError(f"`{name}` must be a scalar or have {channels} entries (one per "
                     f"channel), got {v.shape[0]}.")
  return v


def preprocess(images: jax.Array, rng: jax.Array | None, *, train: bool,
               output_size: tuple[int, int] | None = None,
               random_resized_crop: bool = False,
               crop_scale: Sequence[float] = (0.16, 1.0),
               crop_ratio: Sequence[float] = (0.75, 1.333),
               flip: bool = False, mean=None, std=None,
               center_crop: float = 1.0) -> jax.Array:
  """Turns a uint8 batch into float32 model inputs (see the module docstring).

  Args:
    images: [B, H, W, C] uint8.
    rng: PRNG key; only used when ``train`` and an augmentation is on (may be
      None otherwise).
    train: apply the random augmentations.
    output_size: static (H', W'); None (default) keeps (H, W).
    random_resized_crop: take a random box (training only); default False.
    crop_scale: (min, max) area fraction of the random box; default
      (0.16, 1.0).
    crop_ratio: (min, max) aspect ratio (width / height) of the random box;
      default (0.75, 1.333).
    flip: random horizontal flip with probability 1/2 (training only);
      default False.
    mean: scalar or [C] per-channel mean in the [0, 1] scale; None (default)
      subtracts nothing.
    std: scalar or [C] per-channel standard deviation in the [0, 1] scale;
      None (default) divides by nothing.
    center_crop: fraction of each side kept by the deterministic centre crop
      (used at evaluation and when ``random_resized_crop`` is off); default
      1.0 (no crop).

  Returns:
    [B, H', W', C] float32 ``(crop(x) / 255 - mean) / std``.

  Raises:
    ValueError / TypeError: on images that are not uint8 [B, H, W, C], a bad
      ``output_size``, ``center_crop``, ``crop_scale``, ``crop_ratio``,
      ``mean`` or ``std``, or a missing ``rng`` when one is needed.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.zeros((2, 8, 8, 3), jnp.uint8)
    >>> y = preprocess(x, jax.random.key(0), train=True, output_size=(6, 6),
    ...                random_resized_crop=True, flip=True, mean=0.5, std=0.5)
    >>> y.shape, y.dtype, float(y.min())
    ((2, 6, 6, 3), dtype('float32'), -1.0)
  """
  shape = tuple(images.shape)
  if len(shape) != 4:
    raise ValueError(f"`images` must have shape [B, H, W, C], got {shape}.")
  if jnp.result_type(images) != jnp.uint8:
    raise TypeError(f"`images` must be uint8, got dtype {jnp.result_type(images)}.")
  batch, height, width, channels = shape
  oh, ow = _static_size(output_size, height, width)
  if not 0.0 < float(center_crop) <= 1.0:
    raise ValueError(f"`center_crop` must be in (0, 1], got {center_crop!r}.")
  mean_v = _channel_vector(mean, channels, "mean")
  std_v = _channel_vector(std, channels, "std")
  use_crop = bool(train and random_resized_crop)
  use_flip = bool(train and flip)
  if use_crop:
    _pair(crop_scale, "crop_scale", low=0.0, high=1.0)
    _pair(crop_ratio, "crop_ratio", low=0.0, high=None)
  if (use_crop or use_flip) and rng is None:
    raise ValueError("`rng` is required when train=True with random_resized_crop or flip.")

  # Deterministic centre box (static).
  ch = max(1, int(round(height * float(center_crop))))
  cw = max(1, int(round(width * float(center_crop))))
  center_box = (int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0)), ch, cw)
  identity = (not use_crop and float(center_crop) == 1.0 and (oh, ow) == (height, width))

  def one(image, key):
    x = image.astype(jnp.float32)
    if key is not None:
      crop_key, flip_key = jax.random.split(key)
    if use_crop:
      box = sample_crop_box(crop_key, height, width, crop_scale, crop_ratio)
      x = crop_and_resize(x, box, (oh, ow))
    elif not identity:
      x = crop_and_resize(x, jnp.asarray(center_box, jnp.float32), (oh, ow))
    if use_flip:
      x = jnp.where(jax.random.bernoulli(flip_key), x[:, ::-1], x)
    return x

  if use_crop or use_flip:
    keys = jax.random.split(rng, batch)
    x = jax.vmap(one)(images, keys)
  else:
    x = jax.vmap(lambda im: one(im, None))(images)
  x = x * (1.0 / 255.0)
  if mean_v is not None:
    x = x - mean_v
  if std_v is not None:
    x = x / std_v
  return x.astype(jnp.float32)
