r"""The loss-sweep protocol on digits (``experiments/sweep.py``).

One protocol for every loss: the digits ConvNet (3 conv-BN-ReLU-pool stages,
64-d, L2-normalised embeddings), PK batches of 3 classes x 16 images (48),
200 steps of AdamW (lr 1e-3, weight decay 1e-4, 20 warmup steps, cosine
decay), seed 0. Hyper-parameters are chosen on the validation split of the
training classes (``data.options.validation``: train digits 0-2, validate on
digits 3-4), then the loss is retrained on digits 0-4 and evaluated on the
unseen digits 5-9. Batches hold 3 classes because the validation split has
only 3 training classes; the final runs keep the same batch.

Launch:
  python -m experiments.sweep --config=configs/sweep_digits.py --outdir=/tmp/sweep_digits
  python -m experiments.sweep --config=configs/sweep_digits.py:runlocal --outdir=/tmp/sw_dbg \
      --losses=contrastive_loss,triplet_margin_loss

Options of the config string: ``runlocal`` (4 steps of a tiny ConvNet, for tests).
"""

from metric_jax.training import config as config_lib


def get_config(arg: str | None = None):
  opts = config_lib.parse_config_arg(arg, ("runlocal",))
  c = config_lib.base_config()
  c.seed = 0
  c.data.name = "digits"
  # Declared so that the sweep (or --config.data.options.validation=True)
  # can switch to the validation split of the training classes.
  c.data.options.validation = False
  c.data.options.validation_fraction = 0.4
  c.model.name = "convnet"
  c.model.embedding_dim = 64
  c.sampler.name = "m_per_class"
  c.sampler.kwargs.m = 16
  c.batch_size = 48
  c.num_train_steps = 200
  c.loss.name = "triplet_margin_loss"
  c.loss.kwargs = {"margin": 0.1, "mining": "semihard"}
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 20
  c.eval.batch_size = 256
  c.eval.every = 0
  c.eval.clustering = True
  c.log_every = 50
  c.checkpoint_every = 200
  c.keep_checkpoints = 1
  c.projection = "none"
  c.progress_bar = False
  if "runlocal" in opts:
    c.model.kwargs.features = (8, 16)
    c.num_train_steps = 4
    c.log_every = 2
    c.checkpoint_every = 4
    c.eval.clustering = False
    c.optimizer.warmup_steps = 0
  c.lock()
  return c
