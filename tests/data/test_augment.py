"""On-device preprocessing: determinism, shapes, flips, crops, normalisation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metric_jax import data
from metric_jax.data import augment

# RBG keys: XLA:CPU compiles the partitionable threefry generator very
# slowly; preprocess works with any key type.
KEY = jax.random.key(0, impl="rbg")


def _images(b=4, h=12, w=10, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, c), dtype=np.uint8)


def _per_image(fn, rng, b):
  """``fn(crop_key, flip_key)`` for each image, with the key derivation
  documented in metric_jax.data.augment. Vmapped like preprocess: RBG keys
  give other bits under vmap than in a Python loop."""
  return jax.vmap(lambda k: fn(*jax.random.split(k)))(jax.random.split(rng, b))


def _np_resize(img, oh, ow):
  """Slow reference: separable linear (triangle) resampling, antialiased when
  shrinking (the kernel is widened by 1 / scale), weights renormalised over
  the pixels that exist."""
  img = np.asarray(img, np.float64)

  def weights(n_in, n_out):
    scale = n_out / n_in
    k = min(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
      centre = (i + 0.5) / scale - 0.5
      for j in range(n_in):
        w[i, j] = max(0.0, 1.0 - abs((j - centre) * k))
      w[i] /= w[i].sum()
    return w

  wh, ww = weights(img.shape[0], oh), weights(img.shape[1], ow)
  return np.einsum("ih,jw,hwc->ijc", wh, ww, img)


# Jitted once per static configuration: much cheaper than eager dispatch.
preprocess = jax.jit(data.preprocess, static_argnames=(
    "train", "output_size", "random_resized_crop", "crop_scale", "crop_ratio", "flip",
    "mean", "std", "center_crop"))


TRAIN = dict(train=True, output_size=(8, 8), random_resized_crop=True, flip=True)


def test_deterministic_given_key_and_jittable():
  x = jnp.asarray(_images())
  fn = jax.jit(functools.partial(data.preprocess, **TRAIN))
  a = fn(x, KEY)
  np.testing.assert_array_equal(a, fn(x, jax.random.key(0, impl="rbg")))
  assert not np.allclose(a, fn(x, jax.random.key(1, impl="rbg")))
  assert a.shape == (4, 8, 8, 3) and a.dtype == jnp.float32
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_shapes_and_eval_path():
  x = jnp.asarray(_images(h=12, w=10, c=1))
  same = preprocess(x, None, train=False)
  assert same.shape == (4, 12, 10, 1) and same.dtype == jnp.float32
  np.testing.assert_allclose(same, np.asarray(x, np.float32) / 255.0, rtol=1e-6)
  # Evaluation ignores the augmentation flags and the key.
  ev = preprocess(x, KEY, train=False, output_size=(6, 5), random_resized_crop=True,
                       flip=True)
  np.testing.assert_array_equal(ev, preprocess(x, None, train=False, output_size=(6, 5)))
  assert ev.shape == (4, 6, 5, 1)
  for i in range(4):
    np.testing.assert_allclose(ev[i], _np_resize(x[i], 6, 5) / 255.0, rtol=1e-5, atol=1e-5)


def test_center_crop():
  x = jnp.asarray(_images(b=2, h=8, w=8))
  out = preprocess(x, None, train=False, center_crop=0.5)
  assert out.shape == (2, 8, 8, 3)
  crop = preprocess(x, None, train=False, center_crop=0.5, output_size=(4, 4))
  np.testing.assert_allclose(crop, np.asarray(x[:, 2:6, 2:6], np.float32) / 255.0,
                             rtol=1e-5, atol=1e-5)


def test_flip_correctness():
  # A hand-made asymmetric image: a ramp along the width, different per row.
  img = (np.arange(5)[None, :] * 40 + np.arange(3)[:, None] * 7).astype(np.uint8)
  x = jnp.asarray(np.broadcast_to(img[None, :, :, None], (16, 3, 5, 1)).copy())
  out = np.asarray(preprocess(x, KEY, train=True, flip=True))
  plain = img[:, :, None] / np.float32(255)
  flipped = img[:, ::-1, None] / np.float32(255)
  decisions = np.asarray(_per_image(lambda _, flip_key: jax.random.bernoulli(flip_key), KEY, 16))
  for o, d in zip(out, decisions):
    np.testing.assert_allclose(o, flipped if d else plain, rtol=1e-6)
  assert 0 < sum(decisions) < 16
  np.testing.assert_allclose(preprocess(x, KEY, train=True, flip=False)[0], plain, rtol=1e-6)


@pytest.mark.parametrize("h,w,scale,ratio", [
    (12, 10, (0.16, 1.0), (0.75, 1.333)),
    (5, 40, (0.9, 1.0), (0.9, 1.1)),  # no candidate fits: the fallback box
    (40, 5, (0.05, 0.3), (3.0, 4.0)),
    (1, 1, (0.16, 1.0), (0.75, 1.333)),
])
def test_crop_box_in_bounds(h, w, scale, ratio):
  keys = jax.random.split(KEY, 500)
  boxes = np.asarray(jax.vmap(lambda k: augment.sample_crop_box(k, h, w, scale, ratio))(keys))
  top, left, bh, bw = boxes.T
  assert boxes.dtype == np.int32
  assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
  assert (top + bh <= h).all() and (left + bw <= w).all()
  if (h, w) == (12, 10):
    area = bh * bw / (h * w)
    assert area.min() >= 0.16 * 0.75 and area.max() <= 1.0
    assert len(set(map(tuple, boxes))) > 100  # really random
    assert len(set(top.tolist())) > 3 and len(set(left.tolist())) > 3
  if (h, w) == (5, 40):  # fallback: full height, width at the max aspect ratio 1.1
    np.testing.assert_array_equal(boxes[0], [0, (40 - 6) // 2, 5, 6])


def test_random_crop_equals_crop_then_resize():
  x = _images(b=6, h=12, w=10)
  out = np.asarray(preprocess(jnp.asarray(x), KEY, train=True, output_size=(7, 6),
                                   random_resized_crop=True))
  boxes = np.asarray(_per_image(lambda crop_key, _: augment.sample_crop_box(crop_key, 12, 10),
                                KEY, 6))
  assert len(set(map(tuple, boxes))) >= 4
  for i, (t, l, h, w) in enumerate(boxes):
    ref = _np_resize(x[i, t:t + h, l:l + w], 7, 6) / 255.0
    np.testing.assert_allclose(out[i], ref, rtol=1e-4, atol=1e-4)


def test_crop_reads_only_the_box():
  img = np.full((10, 10, 1), 255.0, np.float32)
  img[3:7, 2:8] = 0.0  # the box is black, everything around it white
  out = augment.crop_and_resize(jnp.asarray(img), jnp.array([3, 2, 4, 6]), (9, 5))
  np.testing.assert_array_equal(out, np.zeros((9, 5, 1), np.float32))


def test_normalisation():
  x = jnp.asarray(_images(b=2, h=4, w=4))
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  out = preprocess(x, None, train=False, mean=mean, std=std)
  ref = (np.asarray(x, np.float64) / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  scalar = preprocess(x, None, train=False, mean=0.5, std=0.5)
  np.testing.assert_allclose(scalar, np.asarray(x) / 127.5 - 1.0, rtol=1e-5, atol=1e-5)


def test_errors():
  x = jnp.asarray(_images(b=2, h=4, w=4))
  with pytest.raises(TypeError, match=r"`images`.*uint8"):
    data.preprocess(x.astype(jnp.float32), None, train=False)
  with pytest.raises(ValueError, match=r"`images`.*\[B, H, W, C\]"):
    data.preprocess(x[0], None, train=False)
  with pytest.raises(ValueError, match="`output_size`"):
    data.preprocess(x, None, train=False, output_size=(0, 4))
  with pytest.raises(ValueError, match="`crop_scale`"):
    data.preprocess(x, KEY, train=True, random_resized_crop=True, crop_scale=(0.5, 1.5))
  with pytest.raises(ValueError, match="`crop_ratio`"):
    data.preprocess(x, KEY, train=True, random_resized_crop=True, crop_ratio=(2.0, 1.0))
  with pytest.raises(ValueError, match=r"`mean`.*3 entries"):
    data.preprocess(x, None, train=False, mean=(0.5, 0.5))
  with pytest.raises(ValueError, match="`rng`"):
    data.preprocess(x, None, train=True, flip=True)
  with pytest.raises(ValueError, match="`center_crop`"):
    data.preprocess(x, None, train=False, center_crop=0.0)
