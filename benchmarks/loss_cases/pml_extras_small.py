"""Benchmark cases: P2SGrad and the threshold-consistent margin (TCM) loss,
next to PML's ``P2SGradLoss`` and ``ThresholdConsistentMarginLoss``.

Both losses normalise internally (as PML does), so the inputs are passed
as drawn on both sides. P2SGrad's class weights come from ``init_p2sgrad``
on the JAX side and from PML's own initialiser on the PML side (the same
distribution; PML's ``[D, C]`` weight is the transpose of ours), and both
are differentiated.
"""

from benchmarks.loss_cases import Case, pml_loss
import metric_jax as mj


def _pml_p2sgrad(num_classes, dim):
  from pytorch_metric_learning import losses  # pylint: disable=import-outside-toplevel
  return losses.P2SGradLoss(descriptors_dim=dim, num_classes=num_classes)


CASES = [
    Case("p2sgrad",
         lambda e, l, p: mj.losses.p2sgrad_loss(e, l, detach_weight_norm=True, **p),
         _pml_p2sgrad, make_params=mj.losses.init_p2sgrad, normalize=False),
    Case("threshold_consistent_margin",
         lambda e, l, p: mj.losses.threshold_consistent_margin_loss(e, l),
         pml_loss("ThresholdConsistentMarginLoss"), normalize=False),
]
