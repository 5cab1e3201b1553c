"""Pair and triplet losses with a learned (ICNN) Bregman divergence.

The generator's parameters are the case's learned parameters, so the timed
step differentiates with respect to both the embeddings and the ICNN.
PML has no Bregman divergence: no PML equivalent.

    python benchmarks/losses.py --only bregman --batch 128 512 --dim 128
"""

from __future__ import annotations

import metric_jax as mj
from benchmarks.loss_cases import Case
from metric_jax import bregman

_ICNN = dict(generator="icnn", hidden_features=(64, 64))


def _make_params(key, num_classes, dim):
  return bregman.init_bregman(key, num_classes, dim, **_ICNN)


def _distance(params):
  return bregman.bregman_distance_from_params(params["phi_params"], **_ICNN)


def _triplet_all(emb, labels, params):
  return mj.losses.triplet_margin_loss(emb, labels, margin=0.2, mining="all",
                                       distance=_distance(params))


def _contrastive(emb, labels, params):
  return mj.losses.contrastive_loss(emb, labels, pos_margin=0.0, neg_margin=1.0,
                                    distance=_distance(params))


CASES = [
    Case("bregman icnn triplet (batch-all)", _triplet_all, make_params=_make_params),
    Case("bregman icnn contrastive", _contrastive, make_params=_make_params),
]
