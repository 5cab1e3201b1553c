"""Backbones and embedding heads: shapes, dtypes, BN modes, normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metric_jax import models
from metric_jax.models import EmbeddingModel, ResNet


def _tiny_resnet(**kwargs):
  """A two-stage, width-4 ResNet: the ResNet code paths at a fraction of the cost."""
  return lambda **kw: EmbeddingModel(
      backbone=ResNet(stage_sizes=(1, 1), width=4, dtype=kw.pop("dtype", jnp.float32),
                      freeze_bn=kw.pop("freeze_bn", False), **kwargs),
      embedding_dim=8, **kw)


# RBG keys: XLA:CPU compiles the (default) partitionable threefry generator
# very slowly, and the tests do not depend on the generator.
KEY = jax.random.key(0, impl="rbg")


def _init(model, x):
  return jax.jit(lambda x: model.init(KEY, x, train=False))(x)


def _apply(model, variables, x, train=False, **kw):
  """Jitted apply; with train=True returns (embeddings, updated batch_stats)."""
  if train:
    fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], **kw)
  else:
    fn = lambda v, x: model.apply(v, x, train=False, **kw)
  return jax.jit(fn)(variables, x)


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _stats_equal(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ----------------------------------------------------------------- registry


def test_model_names():
  assert models.MODEL_NAMES[:1] == ("convnet",)
  assert {"resnet18", "resnet50"} <= set(models.MODEL_NAMES)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"`name`.*convnet.*resnet18.*resnet50.*'vgg'"):
    models.build_model("vgg", embedding_dim=8)


@pytest.mark.parametrize("dim", [0, -3, 2.0, True])
def test_bad_embedding_dim(dim):
  with pytest.raises(ValueError, match="embedding_dim"):
    models.build_model("convnet", embedding_dim=dim)


def test_unknown_option():
  with pytest.raises(TypeError, match="width"):
    models.build_model("convnet", embedding_dim=8, width=8)
  with pytest.raises(ValueError, match="dtype"):
    models.build_model("convnet", embedding_dim=8, dtype="float64x")


def test_bad_images():
  model = models.build_model("convnet", embedding_dim=4)
  with pytest.raises(ValueError, match=r"`images`.*\[B, H, W, C\]"):
    _init(model, jnp.zeros((8, 8, 1)))
  with pytest.raises(TypeError, match=r"`images`.*uint8"):
    _init(model, jnp.zeros((2, 8, 8, 1), jnp.uint8))


# ----------------------------------------------------------------- convnet


@pytest.mark.parametrize("hw", [8, 28])
def test_convnet_shapes_and_dtype(hw):
  model = models.build_model("convnet", embedding_dim=16)
  x = _images((3, hw, hw, 1))
  variables = _init(model, x)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "head"}
  emb = _apply(model, variables, x)
  assert emb.shape == (3, 16) and emb.dtype == jnp.float32
  assert np.isfinite(np.asarray(emb)).all()
  feats = _apply(model, variables, x, method=EmbeddingModel.features)
  assert feats.shape == (3, 128)


def test_convnet_parameter_count():
  model = models.build_model("convnet", embedding_dim=16)
  variables = _init(model, jnp.zeros((1, 8, 8, 1)))
  backbone = variables["params"]["backbone"]
  n_conv = sum(int(np.prod(backbone[f"conv{i}"]["kernel"].shape)) for i in (1, 2, 3))
  assert n_conv == 9 * (1 * 32 + 32 * 64 + 64 * 128)
  assert variables["params"]["head"]["projection"]["kernel"].shape == (128, 16)


def test_normalize():
  x = _images((4, 8, 8, 1))
  plain = models.build_model("convnet", embedding_dim=8)
  unit = models.build_model("convnet", embedding_dim=8, normalize=True)
  variables = _init(plain, x)  # same parameter tree for both
  e_plain = _apply(plain, variables, x)
  e_unit = _apply(unit, variables, x)
  np.testing.assert_allclose(np.linalg.norm(e_unit, axis=1), 1.0, rtol=1e-6)
  expected = np.asarray(e_plain) / np.linalg.norm(e_plain, axis=1, keepdims=True)
  np.testing.assert_allclose(e_unit, expected, rtol=1e-5, atol=1e-7)
  assert not np.allclose(np.linalg.norm(e_plain, axis=1), 1.0)


def test_train_mode_updates_batch_stats_and_eval_is_per_example():
  model = models.build_model("convnet", embedding_dim=8)
  x = _images((6, 8, 8, 1)) * 3.0 + 1.0
  variables = _init(model, x)
  _, updates = _apply(model, variables, x, train=True)
  assert not _stats_equal(updates["batch_stats"], variables["batch_stats"])
  # Running-average mode: an example's embedding does not depend on the batch.
  full = _apply(model, variables, x)
  single = _apply(model, variables, x[2:3])
  np.testing.assert_allclose(full[2:3], single, rtol=1e-5, atol=1e-6)
  # Batch-statistics mode: it does.
  full_t, _ = _apply(model, variables, x, train=True)
  half_t, _ = _apply(model, variables, x[:3], train=True)
  assert not np.allclose(full_t[:3], half_t, atol=1e-4)


def _builder(name):
  if name == "convnet":
    return lambda **kw: models.build_model("convnet", embedding_dim=8, **kw)
  return _tiny_resnet()


@pytest.mark.parametrize("name,shape", [("convnet", (4, 8, 8, 1)), ("resnet", (4, 16, 16, 3))])
def test_freeze_bn(name, shape):
  x = _images(shape) * 2.0 + 0.5
  frozen = _builder(name)(freeze_bn=True)
  free = _builder(name)()
  variables = _init(free, x)
  # Non-trivial running statistics, so that "running" differs from "batch".
  _, upd = _apply(free, variables, x, train=True)
  variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}

  e_frozen, upd_frozen = _apply(frozen, variables, x, train=True)
  e_eval = _apply(frozen, variables, x)
  np.testing.assert_allclose(e_frozen, e_eval, rtol=1e-5, atol=1e-6)
  assert _stats_equal(upd_frozen["batch_stats"], variables["batch_stats"])
  e_free, upd_free = _apply(free, variables, x, train=True)
  assert not np.allclose(e_free, e_eval, atol=1e-4)
  assert not _stats_equal(upd_free["batch_stats"], variables["batch_stats"])
  # build_model passes the option to the backbone.
  assert models.build_model("resnet18", embedding_dim=8, freeze_bn=True).backbone.freeze_bn


def test_bn_neck():
  x = _images((8, 8, 8, 1))
  model = models.build_model("convnet", embedding_dim=6, bn_neck=True, freeze_bn=True)
  variables = _init(model, x)
  neck = variables["params"]["head"]["neck"]
  assert set(neck) == {"scale"}  # no learned shift
  emb, upd = _apply(model, variables, x, train=True)
  np.testing.assert_allclose(emb.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(emb.var(0), 1.0, rtol=1e-3)
  # The neck's statistics update even when the backbone's BN is frozen.
  assert not _stats_equal(upd["batch_stats"]["head"], variables["batch_stats"]["head"])
  assert _stats_equal(upd["batch_stats"]["backbone"], variables["batch_stats"]["backbone"])


def _conv_output_dtypes(jaxpr_text):
  """dtypes of the outputs of every convolution in a printed jaxpr."""
  lines = [l for l in jaxpr_text.splitlines() if "= conv_general_dilated[" in l]
  return [l.split("=")[0].split(":")[-1].split("[")[0].strip() for l in lines]


@pytest.mark.parametrize("name,shape", [("convnet", (4, 8, 8, 1)), ("resnet", (2, 16, 16, 3))])
def test_bfloat16_compute(name, shape):
  x = _images(shape)
  f32 = _builder(name)()
  bf16 = _builder(name)(dtype=jnp.bfloat16)
  variables = _init(f32, x)
  v16 = _init(bf16, x)
  # Parameters and statistics stay float32; the tree is the same.
  assert jax.tree_util.tree_structure(v16) == jax.tree_util.tree_structure(variables)
  assert {a.dtype for a in jax.tree_util.tree_leaves(v16)} == {jnp.dtype(jnp.float32)}
  e32 = _apply(f32, variables, x)
  e16 = _apply(bf16, variables, x)
  assert e16.dtype == jnp.float32
  np.testing.assert_allclose(e16, e32, rtol=0.1, atol=0.05 * float(jnp.abs(e32).max()))
  assert not np.array_equal(e16, e32)  # really computed differently
  jaxpr = str(jax.make_jaxpr(lambda v, x: bf16.apply(v, x, train=False))(variables, x))
  conv_dtypes = _conv_output_dtypes(jaxpr)
  assert conv_dtypes and set(conv_dtypes) == {"bf16"}, conv_dtypes
  # build_model passes the dtype (names work too) to the backbone and the head.
  m = models.build_model("resnet50", embedding_dim=8, dtype="bfloat16")
  assert m.dtype == jnp.bfloat16 and m.backbone.dtype == jnp.bfloat16


# ----------------------------------------------------------------- resnets


def _param_count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,feature_dim,backbone_params", [
    # torchvision's totals (11,689,512 and 25,557,032) minus the 1000-way fc.
    ("resnet18", 512, 11_689_512 - 513_000),
    ("resnet50", 2048, 25_557_032 - 2_049_000),
])
def test_resnet_shapes(name, feature_dim, backbone_params):
  model = models.build_model(name, embedding_dim=128, bn_neck=True)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: _init(model, x), x)
  assert _param_count(variables["params"]["backbone"]) == backbone_params
  emb = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert emb.shape == (2, 128) and emb.dtype == jnp.float32
  emb_t, _ = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert emb_t.shape == (2, 128)
  feats = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, method=EmbeddingModel.features), variables, x)
  assert feats.shape == (2, feature_dim)
  bb = variables["params"]["backbone"]
  assert bb["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert "downsample_0" in bb["layer2_0"] and "downsample_0" not in bb["layer2_1"]
  if name == "resnet50":
    assert bb["layer1_0"]["conv3"]["kernel"].shape == (1, 1, 64, 256)
    assert bb["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)


def test_zero_init_residual():
  model = _tiny_resnet(zero_init_residual=True)()
  variables = _init(model, jnp.zeros((1, 16, 16, 3)))
  bb = variables["params"]["backbone"]
  assert float(jnp.abs(bb["layer1_0"]["bn2"]["scale"]).max()) == 0.0
  assert float(jnp.abs(bb["layer1_0"]["bn1"]["scale"]).min()) == 1.0
  assert models.build_model("resnet18", embedding_dim=8, zero_init_residual=True
                            ).backbone.zero_init_residual
