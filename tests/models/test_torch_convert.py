"""torchvision/timm ResNet state dicts -> Flax: same outputs as torch.

torchvision itself is not installable next to the CPU build of torch here
(its PyPI wheel needs the CUDA build), so the reference is a small torch
ResNet written below with torchvision's architecture and exactly
torchvision's state-dict names (``conv1``, ``bn1``, ``layerN.i.convK``,
``layerN.i.downsample.{0,1}``, ``fc``).
"""

from __future__ import annotations

import importlib
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metric_jax import models
from metric_jax.models import EmbeddingModel, ResNet
from metric_jax.models import torch_convert

HAS_TORCH = importlib.util.find_spec("torch") is not None
pytestmark = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

if HAS_TORCH:
  import torch
  from torch import nn as tnn

  class TorchBasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.relu = tnn.ReLU(inplace=True)
      self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      identity = x if self.downsample is None else self.downsample(x)
      return self.relu(out + identity)

  class TorchBottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = tnn.BatchNorm2d(planes * 4)
      self.relu = tnn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      identity = x if self.downsample is None else self.downsample(x)
      return self.relu(out + identity)

  class TorchResNet(tnn.Module):
    """torchvision.models.ResNet's layout, with a configurable width."""

    def __init__(self, block, layers, width=64, num_classes=10):
      super().__init__()
      self.inplanes = width
      self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
      self.bn1 = tnn.BatchNorm2d(width)
      self.relu = tnn.ReLU(inplace=True)
      self.maxpool = tnn.MaxPool2d(3, 2, 1)
      for i, n in enumerate(layers):
        setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2 ** i, n, 1 if i == 0 else 2))
      self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
      self.fc = tnn.Linear(self.inplanes, num_classes)
      self.num_layers = len(layers)

    def _make_layer(self, block, planes, blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = tnn.Sequential(
            tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
            tnn.BatchNorm2d(planes * block.expansion))
      layers = [block(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * block.expansion
      layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
      return tnn.Sequential(*layers)

    def features(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      for i in range(self.num_layers):
        x = getattr(self, f"layer{i + 1}")(x)
      return torch.flatten(self.avgpool(x), 1)

  def _torch_resnet(block, layers, width=64, seed=0):
    torch.manual_seed(seed)
    net = TorchResNet(block, layers, width)
    # Random BN affine parameters and running statistics: identity BN layers
    # would hide a mis-mapped scale/bias/mean/var.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
      for mod in net.modules():
        if isinstance(mod, tnn.BatchNorm2d):
          n = mod.num_features
          mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
          mod.bias.copy_(torch.randn(n, generator=gen) * 0.1)
          mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
          mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
          mod.num_batches_tracked.fill_(7)
    return net.eval()


# Key names of torchvision's resnet18 (as listed by its state_dict), for the
# layout check of the reference model above.
_TORCHVISION_RESNET18_SAMPLE_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
    "layer1.0.conv2.weight", "layer1.1.bn2.running_var", "layer2.0.downsample.0.weight",
    "layer2.0.downsample.1.weight", "layer2.0.downsample.1.running_mean",
    "layer4.1.conv2.weight", "fc.weight", "fc.bias",
]


def _flax_features(model, variables, x_nchw):
  x = jnp.asarray(np.transpose(x_nchw, (0, 2, 3, 1)))
  return jax.jit(lambda v, x: model.apply(v, x, train=False, method=EmbeddingModel.features))(
      variables, x)


def _init(module, hw):
  """Variables of the right structure, filled with zeros: the conversion
  replaces every backbone leaf, so no (slow to compile) initialiser is run."""
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros((1, hw, hw, 3)), train=False))
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def test_reference_layout_is_torchvision():
  net = _torch_resnet(TorchBasicBlock, [2, 2, 2, 2], width=8)
  keys = list(net.state_dict().keys())
  assert set(_TORCHVISION_RESNET18_SAMPLE_KEYS) <= set(keys)
  assert len(keys) == 122  # torchvision resnet18: 122 state-dict entries


def test_resnet18_matches_torch(tmp_path):
  net = _torch_resnet(TorchBasicBlock, [2, 2, 2, 2])
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    expected = net.features(torch.from_numpy(x)).numpy()

  model = models.build_model("resnet18", embedding_dim=16, bn_neck=True)
  variables = _init(model, 64)
  path = tmp_path / "resnet18.pth"
  torch.save(net.state_dict(), path)
  loaded = torch_convert.load_torch_resnet(str(path), variables)
  got = np.asarray(_flax_features(model, loaded, x))
  assert got.shape == expected.shape == (2, 512)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

  # The head keeps its initialisation; structure and dtypes are unchanged.
  np.testing.assert_array_equal(loaded["params"]["head"]["projection"]["kernel"],
                                variables["params"]["head"]["projection"]["kernel"])
  assert (jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(variables))
  bb = loaded["params"]["backbone"]
  np.testing.assert_array_equal(
      bb["layer2_0"]["downsample_0"]["kernel"],
      net.layer2[0].downsample[0].weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["layer3_1"]["bn2"]["var"],
                                net.layer3[1].bn2.running_var.numpy())
  # The full model runs on the converted weights.
  emb = model.apply(loaded, jnp.zeros((1, 64, 64, 3)), train=False)
  assert emb.shape == (1, 16) and np.isfinite(np.asarray(emb)).all()


def test_bottleneck_and_safetensors_and_bare_backbone(tmp_path):
  from safetensors.numpy import save_file
  net = _torch_resnet(TorchBottleneck, [1, 2, 1, 1], width=8, seed=3)
  x = np.random.default_rng(1).normal(size=(2, 3, 40, 40)).astype(np.float32)
  with torch.no_grad():
    expected = net.features(torch.from_numpy(x)).numpy()
  # A checkpoint wrapped the way training scripts save it, as safetensors.
  state = {f"module.{k}": v.numpy() for k, v in net.state_dict().items()}
  path = tmp_path / "rn.safetensors"
  save_file(state, str(path))

  backbone = ResNet(stage_sizes=(1, 2, 1, 1), block="bottleneck", width=8)
  variables = _init(backbone, 40)
  loaded = torch_convert.load_torch_resnet(str(path), variables)
  got = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(
      loaded, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert got.shape == expected.shape == (2, 8 * 8 * 4)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_state_dict_mapping_and_wrapped_checkpoint():
  net = _torch_resnet(TorchBasicBlock, [1, 1, 1, 1], width=4)
  backbone = ResNet(stage_sizes=(1, 1, 1, 1), block="basic", width=4)
  variables = _init(backbone, 32)
  a = torch_convert.load_torch_resnet(net.state_dict(), variables)
  b = torch_convert.load_torch_resnet({"state_dict": net.state_dict()}, variables)
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(u, v)


def test_mismatched_architecture_is_an_error():
  net = _torch_resnet(TorchBasicBlock, [1, 1, 1, 1], width=4)
  state = net.state_dict()
  deeper = ResNet(stage_sizes=(2, 1, 1, 1), block="basic", width=4)
  v_deeper = _init(deeper, 32)
  with pytest.raises(ValueError, match=r"not in the checkpoint.*layer1_1"):
    torch_convert.load_torch_resnet(state, v_deeper)
  wider = ResNet(stage_sizes=(1, 1, 1, 1), block="basic", width=8)
  v_wider = _init(wider, 32)
  with pytest.raises(ValueError, match=r"shape mismatches.*conv1.weight"):
    torch_convert.load_torch_resnet(state, v_wider)
  same = ResNet(stage_sizes=(1, 1, 1, 1), block="basic", width=4)
  v_same = _init(same, 32)
  extra = dict(state)
  extra["layer5.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
  with pytest.raises(ValueError, match=r"unused checkpoint tensors.*layer5"):
    torch_convert.load_torch_resnet(extra, v_same)


def _import_or_none(name):
  """The module, or None when absent or broken (e.g. a torchvision wheel
  built for another torch fails at import with a RuntimeError)."""
  if importlib.util.find_spec(name) is None:
    return None
  try:
    return importlib.import_module(name)
  except Exception:  # pylint: disable=broad-except
    return None


def _randomize_bn(net, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in net.modules():
      if isinstance(mod, tnn.BatchNorm2d):
        n = mod.num_features
        mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        mod.bias.copy_(torch.randn(n, generator=gen) * 0.1)
        mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
        mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
  return net.eval()


@pytest.mark.parametrize("library", ["torchvision", "timm"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_real_library_resnets(library, name):
  """Against the real torchvision / timm models, where they import (they are
  not installable next to torch 2.13 CPU here; the GPU image has both)."""
  lib = _import_or_none(library)
  if lib is None:
    pytest.skip(f"{library} is not importable")
  torch.manual_seed(0)
  if library == "torchvision":
    net = getattr(lib.models, name)()
  else:
    net = lib.create_model(name, pretrained=False)
  net = _randomize_bn(net)
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    pre_fc = {}
    net.fc.register_forward_hook(lambda m, inp, out: pre_fc.setdefault("x", inp[0]))
    net(torch.from_numpy(x))
    expected = pre_fc["x"].numpy()
  model = models.build_model(name, embedding_dim=8)
  loaded = torch_convert.load_torch_resnet(net.state_dict(), _init(model, 64))
  got = np.asarray(_flax_features(model, loaded, x))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_missing_file():
  with pytest.raises(FileNotFoundError, match="path"):
    torch_convert.load_torch_resnet("/nonexistent/rn.pth", {"params": {}})
