r"""Omniglot with a learned Bregman divergence: ``configs/omniglot.py``
(conv-4, 64-d, batch 128, semi-hard triplet margin 0.2, 2,000 steps) with
``D_phi`` of an ICNN generator (hidden 64-64) in the loss and at retrieval.

Launch:
  python -m experiments.train --config=configs/omniglot_bregman.py --workdir=/tmp/omni_bregman
  python -m experiments.train --config=configs/omniglot_bregman.py:contrastive --workdir=DIR
  python -m experiments.train --config=configs/omniglot_bregman.py:runlocal --workdir=/tmp/dbg

Results: experiments/bregman/README.md.
"""

from configs import omniglot
from metric_jax.training import config as config_lib


def get_config(arg: str | None = None):
  opts = config_lib.parse_config_arg(arg, ("runlocal", "contrastive"))
  c = omniglot.get_config(",".join(sorted(opts)))
  with c.unlocked():
    c.loss.distance = "bregman"
    c.loss.bregman.generator = "icnn"
    c.loss.bregman.kwargs = {"hidden_features": (64, 64), "eps": 1e-3}
    c.eval.metric = "bregman"
    if "runlocal" in opts:
      c.loss.bregman.kwargs = {"hidden_features": (8,), "eps": 1e-3}
  return c
