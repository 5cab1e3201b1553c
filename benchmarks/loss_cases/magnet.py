"""Benchmark cases: magnet loss (Rippel et al., arXiv 1511.05939).

PML has no magnet loss. The benchmark batches hold 4 examples per class; one
cluster per class (cluster id = label, ``num_clusters`` = B / 4, the number
of classes of the benchmark batches), i.e. M = B / 4 clusters x D = 4 examples.

    python benchmarks/losses.py --only magnet --batch 512 2048 --dim 128
"""

from __future__ import annotations

import metric_jax as mj
from benchmarks.loss_cases import Case


def _magnet(emb, labels, params):
  del params
  return mj.losses.magnet_loss(emb, labels, labels, num_clusters=emb.shape[0] // 4)


CASES = [
    Case("magnet", _magnet, None, normalize=False),
]
