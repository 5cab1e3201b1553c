r"""Digits with a learned Bregman divergence (issue 7): the semi-hard triplet
run of ``configs/digits.py`` with ``D_phi`` in place of the Euclidean distance.

The generator ``phi`` is an input-convex network (ICNN, hidden 32-32,
eps 1e-3 quadratic term); its parameters live in ``loss_params["bregman"]``,
train with the ConvNet (same optimiser and learning rate), are checkpointed
with the state and define the retrieval metric at evaluation
(``eval.metric = "bregman"``: queries are the divergence's first argument).
The triplet margin is that of the Euclidean run (0.1); the ICNN starts near
an affine function plus ``eps/2 ||x||^2``, so the divergence starts small
and grows as the generator learns curvature.

Launch:
  python -m experiments.train --config=configs/digits_bregman.py --workdir=/tmp/digits_bregman
  python -m experiments.train --config=configs/digits_bregman.py:contrastive --workdir=DIR
  python -m experiments.train --config=configs/digits_bregman.py:max_affine --workdir=DIR
  python -m experiments.train --config=configs/digits_bregman.py:runlocal --workdir=/tmp/dbg

Options (comma-separated): ``contrastive`` (contrastive loss as in
``configs/digits.py``), ``max_affine`` / ``soft_max_affine`` (other learned
generators), ``squared_norm`` (fixed ``phi = ||x||^2``: the squared
Euclidean distance, a control), ``runlocal``.
Results: experiments/bregman/README.md.
"""

from configs import digits
from metric_jax.training import config as config_lib

GENERATORS = ("max_affine", "soft_max_affine", "squared_norm")


def get_config(arg: str | None = None):
  opts = config_lib.parse_config_arg(arg, ("runlocal", "contrastive", *GENERATORS))
  c = digits.get_config(",".join(sorted(opts & {"runlocal", "contrastive"})))
  with c.unlocked():
    c.loss.distance = "bregman"
    c.loss.bregman.generator = "icnn"
    c.loss.bregman.kwargs = {"hidden_features": (32, 32), "eps": 1e-3}
    for g in GENERATORS:
      if g in opts:
        c.loss.bregman.generator = g
        c.loss.bregman.kwargs = {"num_pieces": 16} if g != "squared_norm" else {}
    c.eval.metric = "bregman"
    if "runlocal" in opts and c.loss.bregman.generator == "icnn":
      c.loss.bregman.kwargs = {"hidden_features": (8,), "eps": 1e-3}
  return c
