"""Pretrained torchvision / timm ResNet weights -> Flax variables.

torchvision and timm name ResNet parameters identically (``conv1.weight``,
``bn1.running_mean``, ``layer3.1.conv2.weight``,
``layer2.0.downsample.0.weight``, ``fc.weight``, ...). The Flax
:class:`~metric_jax.models.ResNet` uses the same names with ``.<index>``
folded into the module name (``layer3_1``, ``downsample_0``), so conversion
is a rename plus layout changes:

==========================  ===================================  ===========
torch                       Flax                                 layout
==========================  ===================================  ===========
conv ``weight`` [O,I,kh,kw]  ``params/.../kernel`` [kh,kw,I,O]   transpose
BN ``weight`` / ``bias``     ``params/.../scale`` / ``bias``      as is
BN ``running_mean`` / _var   ``batch_stats/.../mean`` / ``var``   as is
``num_batches_tracked``      (dropped)
``fc.*``                     (dropped: the embedding head is new)
==========================  ===================================  ===========

The conversion is strict: every backbone variable must be filled, with the
right shape, and every torch tensor other than ``fc.*`` and
``num_batches_tracked`` must be used.

Example (needs a downloaded checkpoint, e.g. torchvision's
``resnet50-11ad3fa6.pth``)::

    model = models.build_model("resnet50", embedding_dim=512, freeze_bn=True)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    variables = load_torch_resnet("resnet50-11ad3fa6.pth", variables)
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import numpy as np

__all__ = ["load_torch_resnet", "normalize_state_dict", "read_state_dict",
           "torch_resnet_to_flax"]

_IGNORED = re.compile(r"(^fc\.|\.num_batches_tracked$|^num_batches_tracked$)")
_PREFIXES = ("module.", "model.", "backbone.")


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` (safetensors, no torch needed) or a torch
  ``.pth``/``.pt``/``.bin`` file (``torch.load(..., weights_only=True)``).

  A checkpoint that wraps the weights (``{"state_dict": ...}``,
  ``{"model": ...}``) is unwrapped; ``module.`` / ``model.`` / ``backbone.``
  prefixes are removed (see :func:`normalize_state_dict`).

  Args:
    path: the checkpoint file (str or path-like).

  Returns:
    dict of torch parameter name -> NumPy array (bfloat16 / float16 torch
    tensors come back as float32).

  Raises:
    FileNotFoundError: if ``path`` is not a file.
    ImportError: for a torch file when torch is not installed.

  Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> with tempfile.TemporaryDirectory() as d:
    ...   path = os.path.join(d, "w.safetensors")
    ...   save_file({"module.bn1.running_mean": np.zeros(4, np.float32)}, path)
    ...   state = read_state_dict(path)
    >>> {k: v.shape for k, v in state.items()}
    {'bn1.running_mean': (4,)}
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"`path`: no checkpoint file at {path!r}.")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    state = load_file(path)
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"Reading {path!r} needs torch; install torch or convert the "
                        "checkpoint to .safetensors.") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
  return normalize_state_dict(state)


def normalize_state_dict(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Unwraps a checkpoint dict, strips wrapper prefixes, converts to NumPy.

  The first of the keys ``"state_dict"``, ``"model"``,
  ``"model_state_dict"``, ``"module"`` whose value is a mapping is taken as
  the weights; then one leading ``module.`` / ``model.`` / ``backbone.`` is
  removed from each name (as left by ``DataParallel`` or timm wrappers).

  Args:
    state: a mapping of names to torch tensors or arrays, possibly wrapped.

  Returns:
    dict of name -> NumPy array (half-precision torch tensors as float32).

  Example:
    >>> import numpy as np
    >>> out = normalize_state_dict({"state_dict": {"module.conv1.weight": np.ones((2, 3, 1, 1))},
    ...                             "epoch": 3})
    >>> list(out), out["conv1.weight"].shape
    (['conv1.weight'], (2, 3, 1, 1))
  """
  for key in ("state_dict", "model", "model_state_dict", "module"):
    if key in state and isinstance(state[key], Mapping):
      state = state[key]
      break
  out = {}
  for name, value in state.items():
    for prefix in _PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix):]
        break
    out[name] = _to_numpy(value)
  return out


def _flax_path(torch_key: str) -> tuple[str, tuple[str, ...], str]:
  """``layer2.0.downsample.1.running_mean`` -> (collection, module path, leaf)."""
  parts = torch_key.split(".")
  modules: list[str] = []
  for part in parts[:-1]:
    if part.isdigit() and modules:
      modules[-1] = f"{modules[-1]}_{part}"
    else:
      modules.append(part)
  leaf = parts[-1]
  if leaf == "running_mean":
    return "batch_stats", tuple(modules), "mean"
  if leaf == "running_var":
    return "batch_stats", tuple(modules), "var"
  if leaf == "weight":
    return "params", tuple(modules), "weight"  # kernel or scale, decided by rank
  if leaf == "bias":
    return "params", tuple(modules), "bias"
  return "params", tuple(modules), leaf


def _backbone_subtrees(variables) -> tuple[dict, dict, bool]:
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  if "backbone" in params:
    return params["backbone"], stats.get("backbone", {}), True
  return params, stats, False


def torch_resnet_to_flax(state_dict: Mapping[str, Any], variables):
  """Copies a torchvision/timm ResNet state dict into Flax variables.

  Args:
    state_dict: torch names -> tensors/arrays (see :func:`normalize_state_dict`).
    variables: variables of an :class:`~metric_jax.models.EmbeddingModel`
      with a ResNet backbone (only ``backbone`` is replaced) or of a bare
      :class:`~metric_jax.models.ResNet`.

  Returns:
    New variables with the same structure and dtypes.

  Raises:
    ValueError: missing, unused or mis-shaped tensors (the architecture does
      not match the checkpoint).

  Example:
    A torch-style state dict for a tiny ResNet, built from the Flax names
    (``layer2_0/downsample_0/kernel`` [kh, kw, I, O] is torch
    ``layer2.0.downsample.0.weight`` [O, I, kh, kw]); only the shapes of
    ``variables`` matter here, so ``jax.eval_shape`` stands in for ``init``:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from metric_jax.models import ResNet
    >>> net = ResNet(stage_sizes=(1, 1, 1, 1), width=4)
    >>> variables = jax.eval_shape(
    ...     lambda: net.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False))
    >>> torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias",
    ...               "mean": "running_mean", "var": "running_var"}
    >>> state = {"fc.weight": np.zeros((10, 32))}  # the classifier is dropped
    >>> for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]:
    ...   *modules, leaf = [p.key for p in path][1:]
    ...   name = ".".join([m.replace("_", ".") for m in modules] + [torch_leaf[leaf]])
    ...   shape = (v.shape[3], v.shape[2], v.shape[0], v.shape[1]) if leaf == "kernel" else v.shape
    ...   state[name] = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    >>> new = torch_resnet_to_flax(state, variables)
    >>> state["layer2.0.downsample.0.weight"].shape
    (8, 4, 1, 1)
    >>> kernel = new["params"]["layer2_0"]["downsample_0"]["kernel"]
    >>> torch_kernel = state["layer2.0.downsample.0.weight"]
    >>> kernel.shape, bool((kernel == torch_kernel.transpose(2, 3, 1, 0)).all())
    ((1, 1, 4, 8), True)
    >>> bool((new["batch_stats"]["bn1"]["var"] == state["bn1.running_var"]).all())
    True
  """
  state = normalize_state_dict(state_dict)
  params, stats, nested = _backbone_subtrees(variables)
  flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat_stats = dict(jax.tree_util.tree_flatten_with_path(stats)[0])

  def key_of(path):
    return tuple(p.key for p in path)

  new_params = {key_of(p): v for p, v in flat_params.items()}
  new_stats = {key_of(p): v for p, v in flat_stats.items()}
  filled: set[tuple[str, tuple[str, ...]]] = set()
  unused, bad_shape = [], []
  for name, value in state.items():
    if _IGNORED.search(name):
      continue
    collection, modules, leaf = _flax_path(name)
    if leaf == "weight":
      leaf = "kernel" if value.ndim == 4 else "scale"
      if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    target = new_params if collection == "params" else new_stats
    key = modules + (leaf,)
    if key not in target:
      unused.append(name)
      continue
    if tuple(target[key].shape) != value.shape:
      bad_shape.append(f"{name}: checkpoint {value.shape} vs model {tuple(target[key].shape)}")
      continue
    target[key] = np.asarray(value, dtype=target[key].dtype)
    filled.add((collection, key))
  missing = (["params/" + "/".join(k) for k in new_params if ("params", k) not in filled]
             + ["batch_stats/" + "/".join(k) for k in new_stats
                if ("batch_stats", k) not in filled])
  if unused or bad_shape or missing:
    raise ValueError(
        "The checkpoint does not match the model's ResNet backbone:"
        + (f"\n  unused checkpoint tensors: {unused[:10]}{' ...' if len(unused) > 10 else ''}"
           if unused else "")
        + (f"\n  shape mismatches: {bad_shape[:10]}" if bad_shape else "")
        + (f"\n  model variables not in the checkpoint: {missing[:10]}"
           f"{' ...' if len(missing) > 10 else ''}" if missing else ""))

  def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
      node = tree
      for part in key[:-1]:
        node = node.setdefault(part, {})
      node[key[-1]] = jax.numpy.asarray(value)
    return tree

  backbone_params, backbone_stats = unflatten(new_params), unflatten(new_stats)
  out = dict(variables)
  if nested:
    out["params"] = {**variables["params"], "backbone": backbone_params}
    out["batch_stats"] = {**variables.get("batch_stats", {}), "backbone": backbone_stats}
  else:
    out["params"] = backbone_params
    out["batch_stats"] = backbone_stats
  return out


def load_torch_resnet(path: str | os.PathLike | Mapping[str, Any], variables):
  """Loads torchvision/timm ResNet weights into Flax variables.

  Args:
    path: a ``.pth``/``.pt`` (torch) or ``.safetensors`` file, or an already
      loaded state dict.
    variables: the model's variables (``model.init(...)``), from
      ``build_model("resnet18" | "resnet50" | ..., ...)`` or a bare ResNet.

  Returns:
    Variables with the backbone's ``params`` and ``batch_stats`` replaced by
    the checkpoint's (the embedding head keeps its initialisation).

  Raises:
    FileNotFoundError / ValueError: see :func:`read_state_dict` and
      :func:`torch_resnet_to_flax`.

  Example:
    A checkpoint that does not fit the model is rejected, naming the
    tensors:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from metric_jax import models
    >>> model = models.build_model("resnet18", embedding_dim=8, width=4)
    >>> variables = jax.eval_shape(  # shapes suffice to check a checkpoint
    ...     lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False))
    >>> try:
    ...   load_torch_resnet({"conv1.weight": np.zeros((64, 3, 7, 7))}, variables)
    ... except ValueError as e:
    ...   print("conv1.weight: checkpoint (7, 7, 3, 64) vs model (7, 7, 3, 4)" in str(e))
    True

    With a real file: ``load_torch_resnet("resnet50-11ad3fa6.pth", variables)``
    (see the module docstring).
  """
  state = path if isinstance(path, Mapping) else read_state_dict(path)
  return torch_resnet_to_flax(state, variables)
