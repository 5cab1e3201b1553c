"""Benchmark cases: the founding papers' losses (lifted structure,
generalized lifted structure, N-pair, quadruplet, triplet-center).

Where PML has the loss, the JAX side uses the settings that reproduce PML's
numbers (``empty_lse="zero"``, no N-pair regulariser; both libraries see
L2-normalised inputs). PML has no quadruplet or triplet-center loss.

    python benchmarks/losses.py --compare-pml --only lifted --batch 512 2048 --dim 128
"""

from __future__ import annotations

import metric_jax as mj
from benchmarks.loss_cases import Case
from benchmarks.loss_cases import pml_loss


def _triplet_center(emb, labels, params):
  return mj.losses.triplet_center_loss(emb, labels, margin=1.0, **params)


CASES = [
    Case("lifted structure",
         lambda e, l, p: mj.losses.lifted_structure_loss(e, l, empty_lse="zero"),
         pml_loss("LiftedStructureLoss")),
    Case("generalized lifted structure",
         lambda e, l, p: mj.losses.generalized_lifted_structure_loss(e, l, empty_lse="zero"),
         pml_loss("GeneralizedLiftedStructureLoss")),
    Case("npair",
         lambda e, l, p: mj.losses.npair_loss(e, l, l2_reg=0.0),
         pml_loss("NPairsLoss")),
    Case("quadruplet",
         lambda e, l, p: mj.losses.quadruplet_loss(e, l, margin1=0.2, margin2=0.1)),
    Case("triplet-center", _triplet_center, make_params=mj.losses.init_triplet_center),
]
