r"""CUB-200-2011 (TFDS ``caltech_birds2011``): train on classes 1-100, retrieve among
the 5,924 images of classes 101-200 (Oh Song et al. 2016 protocol).

Backbone and schedule follow the common ResNet-50 protocol of
:func:`metric_jax.training.config.image_retrieval_config`: ImageNet-pretrained
ResNet-50 with frozen BatchNorm, 512-d L2-normalised embeddings, PK batches of
32 classes x 4 images, RandomResizedCrop 224 + flip, evaluation on the 224
centre crop of the 256-pixel image, semi-hard triplet loss (margin 0.2),
AdamW 1e-4 with cosine decay, ~110 epochs (5,000 steps of 128 images), bf16.

Launch (after ``tfds build caltech_birds2011``; ImageNet weights converted from
torchvision's ``resnet50-11ad3fa6.pth``):
  python -m experiments.train --config=configs/cub200.py --workdir=/tmp/cub200 \
      --config.model.pretrained=/path/to/resnet50-11ad3fa6.pth \
      --config.data.options.data_dir=/path/to/tensorflow_datasets
  python -m experiments.train --config=configs/cub200.py:embedding128 ...  # 128-d
  python -m experiments.train --config=configs/cub200.py:runlocal --workdir=/tmp/cub_dbg

Expected: published Recall@1 with a GoogLeNet backbone, as tabulated in
ALGORITHMS.md section 12 (Oh Song et al. 2016): contrastive 26.4, triplet
36.1, lifted structure 47.2. This config (ResNet-50, pretrained) has not
been run on these machines (no dataset download); without
``model.pretrained`` it trains from scratch and scores far lower.
"""

from metric_jax.training import config as config_lib


def get_config(arg: str | None = None):
  opts = config_lib.parse_config_arg(arg, ("runlocal", "embedding128"))
  c = config_lib.image_retrieval_config(
      "caltech_birds2011", num_train_steps=5000,
      embedding_dim=128 if "embedding128" in opts else 512, runlocal="runlocal" in opts)
  c.lock()
  return c
