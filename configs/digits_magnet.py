r"""Digits with the magnet loss (Rippel et al., ICLR 2016): the pipeline's
magnet run, to compare with the semi-hard triplet run of ``configs/digits.py``.

Same backbone, batch size, optimiser and steps as ``configs/digits.py``
(ConvNet, 64-d, batch 40, AdamW 1e-4 cosine, 600 steps). The batch is M = 5
clusters x D = 8 examples from the neighbourhood sampler (a seed cluster
drawn by its running loss and its 4 nearest other-class clusters), with K = 2
k-means clusters per class; the cluster index is rebuilt from the
embeddings of the whole training set every 50 steps (warm-started k-means),
the per-cluster losses and the batch variance are folded in after every
step. Embeddings are not L2-normalised for the loss (as in the paper);
evaluation reports the kNN retrieval metrics (normalised, as for triplet)
and ``nearest_cluster_accuracy`` (eq. 6 on the unseen digits 5-9: a
per-class index on half of each class, the other half classified with the
running training variance).

Launch:
  python -m experiments.train --config=configs/digits_magnet.py --workdir=/tmp/digits_magnet
  python -m experiments.train --config=configs/digits_magnet.py:runlocal --workdir=/tmp/dbg

Options: ``runlocal`` (a few steps of a tiny ConvNet, for tests).
Results: experiments/magnet/README.md.
"""

from configs import _magnet
from configs import digits


def get_config(arg: str | None = None):
  c = digits.get_config(arg)
  runlocal = "runlocal" in (arg or "")
  with c.unlocked():
    _magnet.use_magnet(c, clusters_per_batch=5, examples_per_cluster=8, clusters_per_class=2,
                       refresh_every=3 if runlocal else 50)
    c.eval.nearest_cluster_L = 8
  return c
