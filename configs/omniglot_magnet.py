r"""Omniglot with the magnet loss: the setup of ``configs/omniglot.py``
(conv-4 ConvNet, 64-d, batch 128, AdamW 1e-3 cosine, 2,000 steps) with the
magnet loss instead of semi-hard triplet.

Batch = M = 16 clusters x D = 8 drawings from the neighbourhood sampler,
K = 1 cluster per character (20 drawings each; the paper's K > 1 matters
for classes with several modes, which Omniglot characters rarely have),
alpha = 1, the cluster index rebuilt from the 19,280 training embeddings
every 100 steps, cluster losses and variance folded in every step.
Evaluation: kNN metrics and the eq. 6 nearest-cluster accuracy on the 659
unseen characters.

Launch:
  python -m experiments.train --config=configs/omniglot_magnet.py --workdir=/tmp/omni_magnet
  python -m experiments.train --config=configs/omniglot_magnet.py:runlocal --workdir=/tmp/dbg

Results: experiments/magnet/README.md.
"""

from configs import _magnet
from configs import omniglot


def get_config(arg: str | None = None):
  c = omniglot.get_config(arg)
  runlocal = "runlocal" in (arg or "")
  with c.unlocked():
    _magnet.use_magnet(c, clusters_per_batch=4 if runlocal else 16, examples_per_cluster=8,
                       clusters_per_class=1, refresh_every=2 if runlocal else 100)
  return c
