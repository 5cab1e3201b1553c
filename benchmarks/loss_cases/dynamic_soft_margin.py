"""Benchmark case: the dynamic soft margin loss next to PML's
``DynamicSoftMarginLoss()`` (every triplet of the labelled batch).

Both sides time one call from the empty running histogram: the JAX case
passes no ``histogram`` (the initial, all-zero state) and the PML builder
returns a callable that constructs a fresh module for every call. A reused
PML module would keep its histogram's autograd graph from the previous call
and fail in the next ``backward`` (PML issue #731)."""

from benchmarks.loss_cases import Case
import metric_jax as mj


def _pml_fresh_each_call(num_classes, dim):
  del num_classes, dim
  from pytorch_metric_learning import losses  # pylint: disable=import-outside-toplevel
  return lambda emb, labels: losses.DynamicSoftMarginLoss()(emb, labels)


CASES = [
    Case("dynamic_soft_margin",
         lambda e, l, p: mj.losses.dynamic_soft_margin_loss(e, l),
         _pml_fresh_each_call),
]
