r"""Cars196 (TFDS ``cars196``): train on classes 1-98, retrieve among the 8,131
images of classes 99-196 (Oh Song et al. 2016 protocol).

Same protocol as ``configs/cub200.py`` (see
:func:`metric_jax.training.config.image_retrieval_config`): ImageNet-pretrained
ResNet-50, frozen BatchNorm, 512-d embeddings, 32 classes x 4 images per batch,
RandomResizedCrop 224 + flip, semi-hard triplet loss (margin 0.2), AdamW 1e-4
cosine, ~95 epochs (6,000 steps of 128 images), bf16.

Launch (after ``tfds build cars196``):
  python -m experiments.train --config=configs/cars196.py --workdir=/tmp/cars196 \
      --config.model.pretrained=/path/to/resnet50-11ad3fa6.pth \
      --config.data.options.data_dir=/path/to/tensorflow_datasets
  python -m experiments.train --config=configs/cars196.py:runlocal --workdir=/tmp/cars_dbg

Expected: published Recall@1 with a GoogLeNet backbone (Oh Song et al. 2016, as
attributed by the Reality Check authors, ALGORITHMS.md section 12):
contrastive 21.7, triplet 39.1. Not run on these machines (no dataset
download); stronger backbones score higher.
"""

from metric_jax.training import config as config_lib


def get_config(arg: str | None = None):
  opts = config_lib.parse_config_arg(arg, ("runlocal", "embedding128"))
  c = config_lib.image_retrieval_config(
      "cars196", num_train_steps=6000,
      embedding_dim=128 if "embedding128" in opts else 512, runlocal="runlocal" in opts)
  c.lock()
  return c
