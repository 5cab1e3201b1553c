r"""Omniglot from the shared ``omniglot.npz``: 964 background alphabets' characters
for training, retrieval among the 659 characters of the evaluation alphabets.

28x28 grey images, 20 drawings per character (Lake et al., Science 2015,
background/evaluation split). The file is found through ``$METRIC_JAX_OMNIGLOT``
or ``../shared/data/omniglot/omniglot.npz`` next to the repository (set
``--config.data.options.path`` to override; users without the file can switch
to the TFDS dataset with ``--config.data.name=omniglot``).

Launch:
  python -m experiments.train --config=configs/omniglot.py --workdir=/tmp/omniglot_run
  python -m experiments.train --config=configs/omniglot.py:contrastive --workdir=DIR
  python -m experiments.train --config=configs/omniglot.py:runlocal --workdir=/tmp/omni_dbg

Options of the config string (comma-separated): ``contrastive`` (instead of
semi-hard triplet), ``runlocal`` (a few steps, for tests).

Expected (13,180 evaluation images, 659 unseen characters; batch 128 = 32
characters x 4 drawings, conv-4 ConvNet, 64-d, semi-hard triplet):
  2,000 steps on one H100: P@1 77.1, MAP@R 42.0, NMI 87.2; the whole job
    takes ~35 s (45-57k training images/s).
  300 steps on 2 shared CPU cores (--config.num_train_steps=300): P@1 60.8,
    MAP@R 26.8, NMI 79.4; ~55 training images/s, ~14 minutes in all.
"""

from ml_collections import config_dict

from metric_jax.training import config as config_lib


def get_config(arg: str | None = None):
  opts = config_lib.parse_config_arg(arg, ("runlocal", "contrastive", "triplet"))
  c = config_lib.base_config()
  c.data.name = "omniglot_npz"
  c.data.options.path = config_dict.placeholder(str)   # None: the default location
  c.model.name = "convnet"
  c.model.embedding_dim = 64
  c.model.kwargs.features = (64, 64, 64, 64)          # the "conv-4" of few-shot work
  c.sampler.name = "m_per_class"
  c.sampler.kwargs.m = 4
  c.batch_size = 128
  c.num_train_steps = 2000
  c.loss.name = "triplet_margin_loss"
  c.loss.kwargs = {"margin": 0.2, "mining": "semihard"}
  if "contrastive" in opts:
    c.loss.name = "contrastive_loss"
    c.loss.kwargs = {"pos_margin": 0.0, "neg_margin": 0.5}
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.eval.batch_size = 512
  c.eval.every = 1000
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.projection = "pca"
  if "runlocal" in opts:
    c.model.kwargs.features = (8, 16)
    c.batch_size = 32
    c.num_train_steps = 4
    c.log_every = 2
    c.checkpoint_every = 2
    c.eval.every = 0
    c.eval.clustering = False
    c.optimizer.warmup_steps = 0
    c.progress_bar = False
  c.lock()
  return c
