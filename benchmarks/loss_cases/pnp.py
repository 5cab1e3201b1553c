"""Benchmark case: PNP loss next to PML's ``PNPLoss()`` (default variant "O"),
with the setting under which the values agree (``include_self=True``)."""

from benchmarks.loss_cases import Case
import metric_jax as mj


def _pml_pnp(num_classes, dim):
  del num_classes, dim
  from pytorch_metric_learning import losses  # pylint: disable=import-outside-toplevel
  return losses.PNPLoss()


CASES = [
    Case("pnp", lambda e, l, p: mj.losses.pnp_loss(e, l, include_self=True), _pml_pnp),
]
