r"""The loss-sweep protocol on Omniglot (``experiments/sweep.py``).

configs/omniglot.py (conv-4 ConvNet, 64-d, PK batches of 32 characters x 4
drawings, AdamW lr 1e-3, cosine, 2,000 steps) with the validation split of
the 964 background characters declared: hyper-parameters are chosen on the
last 40% of them (386 characters, ``data.options.validation``) after
training on the first 578; the chosen value is retrained on all background
characters and evaluated on the 659 evaluation characters.

Launch (one H100: about 35 s a run, ~90 runs):
  python -m experiments.sweep --config=configs/sweep_omniglot.py --outdir=/tmp/sweep_omniglot
"""

from ml_collections import config_dict

from configs import omniglot


def get_config(arg: str | None = None):
  c = omniglot.get_config(arg)
  with c.unlocked():
    c.data.options.validation = False
    c.data.options.validation_fraction = 0.4
    c.data.options.path = config_dict.placeholder(str)
    c.eval.every = 0
    c.projection = "none"
    c.progress_bar = False
    c.keep_checkpoints = 1
  c.lock()
  return c
