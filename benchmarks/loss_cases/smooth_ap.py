"""Benchmark case: Smooth-AP next to PML's ``SmoothAPLoss()``.

``include_self=True`` ranks each anchor in its own retrieval set, as PML
does. The values agree only where PML's blocks of C rows (C classes) are the
classes (K == C samples per class, sorted); on the benchmark's PK batches
(K = 4) PML ranks blocks of B / 4 rows instead, at the same O(B^3) cost, so
the timings compare like with like (see the loss docstring)."""

from benchmarks.loss_cases import Case, pml_loss
import metric_jax as mj


CASES = [
    Case("smooth_ap", lambda e, l, p: mj.losses.smooth_ap_loss(e, l, include_self=True),
         pml_loss("SmoothAPLoss")),
]
