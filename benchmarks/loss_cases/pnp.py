"""Benchmark case: PNP loss next to PML's ``PNPLoss()`` (default variant "O"),
with the setting under which the values agree (``include_self=True``)."""

from benchmarks.loss_cases import Case, pml_loss
import metric_jax as mj


CASES = [
    Case("pnp", lambda e, l, p: mj.losses.pnp_loss(e, l, include_self=True), pml_loss("PNPLoss")),
]
