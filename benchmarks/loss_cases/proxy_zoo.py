"""Proxy / classification losses, self-supervised losses and cross-batch
memory, next to PML's equivalents.

Learned parameters are built by the matching ``init_*`` function on the JAX
side and by PML's own initialiser on the PML side; both have the same shapes
(PML's ``[D, C]`` weights are the transpose of ours) and both are
differentiated. The self-supervised cases split the batch into two views of
B/2 rows. The memory case uses a full memory of 4096 slots on both sides.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from benchmarks.loss_cases import Case
from metric_jax import losses
from metric_jax import memory

_XBM_SIZE = 4096


def _classification(stem: str, pml_cls: str, jax_kw=None, pml_kw=None, init_kw=None):
  loss_fn = getattr(losses, f"{stem}_loss")
  init_fn = getattr(losses, f"init_{stem}")
  jax_kw, pml_kw, init_kw = jax_kw or {}, pml_kw or {}, init_kw or {}

  def jax_loss(emb, labels, params):
    return loss_fn(emb, labels, **params, **jax_kw)

  def make_params(key, num_classes, dim):
    return init_fn(key, num_classes, dim, **init_kw)

  def pml_loss(num_classes, dim):
    from pytorch_metric_learning import losses as pml_losses  # pylint: disable=import-outside-toplevel
    return getattr(pml_losses, pml_cls)(num_classes=num_classes, embedding_size=dim,
                                        **pml_kw)

  return Case(name=stem, jax_loss=jax_loss, pml_loss=pml_loss, make_params=make_params)


def _two_views(emb):
  n = emb.shape[0] // 2
  return emb[:n], emb[n:2 * n]


def _pml_two_view(make):
  def build(num_classes, dim):
    del num_classes, dim
    module = make()

    def run(emb, labels):
      del labels
      n = emb.shape[0] // 2
      return module(emb[:n], emb[n:2 * n])

    return run
  return build


def _pml_vicreg():
  from pytorch_metric_learning import losses as pml_losses  # pylint: disable=import-outside-toplevel
  module = pml_losses.VICRegLoss()
  return lambda a, b: module(a, ref_emb=b)


def _pml_ntxent():
  from pytorch_metric_learning import losses as pml_losses  # pylint: disable=import-outside-toplevel
  return pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss())


@functools.lru_cache(maxsize=None)
def _xbm_memory(dim: int, num_classes: int):
  """A full memory of _XBM_SIZE unit vectors with random labels, made once
  on the host (so the timed step is the loss, not the random draws)."""
  rng = np.random.default_rng(1)
  stored = rng.normal(size=(_XBM_SIZE, dim)).astype(np.float32)
  stored /= np.linalg.norm(stored, axis=1, keepdims=True)
  return stored, rng.integers(0, num_classes, _XBM_SIZE).astype(np.int32)


def _xbm_jax(emb, labels, params):
  """Contrastive loss against a full memory of _XBM_SIZE detached samples."""
  del params
  stored, stored_labels = _xbm_memory(emb.shape[1], max(emb.shape[0] // 4, 1))
  state = memory.MemoryState(
      embeddings=jnp.asarray(stored), labels=jnp.asarray(stored_labels),
      valid=jnp.ones((_XBM_SIZE,), bool), ptr=jnp.zeros((), jnp.int32))
  loss, _ = memory.with_memory(losses.contrastive_loss, state, emb, labels)
  return loss


def _xbm_pml(num_classes, dim):
  """PML's CrossBatchMemory with its memory already full of the same
  _XBM_SIZE samples as the JAX side (an empty PML memory fills only after
  _XBM_SIZE / B calls, which would time a smaller problem)."""
  import torch  # pylint: disable=import-outside-toplevel
  from pytorch_metric_learning import losses as pml_losses  # pylint: disable=import-outside-toplevel
  module = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), dim,
                                       memory_size=_XBM_SIZE)
  stored, stored_labels = _xbm_memory(dim, num_classes)
  module.embedding_memory = torch.from_numpy(stored.copy())
  module.label_memory = torch.from_numpy(stored_labels.astype(np.int64))
  module.has_been_filled = True
  return module


CASES = [
    _classification("proxy_nca", "ProxyNCALoss"),
    _classification("proxy_anchor", "ProxyAnchorLoss"),
    _classification("soft_triple", "SoftTripleLoss"),
    _classification("normalized_softmax", "NormalizedSoftmaxLoss"),
    _classification("arcface", "ArcFaceLoss", jax_kw={"margin": math.radians(28.6)}),
    _classification("subcenter_arcface", "SubCenterArcFaceLoss",
                    jax_kw={"margin": math.radians(28.6)}),
    _classification("cosface", "CosFaceLoss"),
    _classification("sphereface", "SphereFaceLoss"),
    _classification("large_margin_softmax", "LargeMarginSoftmaxLoss"),
    Case(name="vicreg",
         jax_loss=lambda emb, labels, params: losses.vicreg_loss(*_two_views(emb)),
         pml_loss=_pml_two_view(_pml_vicreg)),
    Case(name="xbm contrastive (memory 4096)", jax_loss=_xbm_jax, pml_loss=_xbm_pml),
]

if hasattr(losses, "ntxent_loss"):
  _two_view_ntxent = losses.selfsupervised(losses.ntxent_loss)
  CASES.append(Case(
      name="selfsupervised ntxent",
      jax_loss=lambda emb, labels, params: _two_view_ntxent(*_two_views(emb)),
      pml_loss=_pml_two_view(_pml_ntxent)))
