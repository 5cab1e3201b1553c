r"""Stanford Online Products (TFDS ``stanford_online_products``): train on 11,318
products (59,551 images), retrieve among the 60,502 images of 11,316 others.

Same protocol as ``configs/cub200.py`` (see
:func:`metric_jax.training.config.image_retrieval_config`) with ~55 epochs
(25,000 steps of 128 images). SOP has 2-12 images per product: PK batches of
32 products x 4 images draw with replacement for products with fewer than 4.
Recall@K on SOP is usually reported at K = 1, 10, 100, 1000.

Launch (after ``tfds build stanford_online_products``):
  python -m experiments.train --config=configs/sop.py --workdir=/tmp/sop \
      --config.model.pretrained=/path/to/resnet50-11ad3fa6.pth \
      --config.data.options.data_dir=/path/to/tensorflow_datasets
  python -m experiments.train --config=configs/sop.py:runlocal --workdir=/tmp/sop_dbg

Expected: published Recall@1/10/100/1000 with a GoogLeNet backbone (Oh Song et
al. 2016, ALGORITHMS.md section 12): contrastive 42.0/58.2/73.8/89.1, triplet
42.1/63.5/82.5/94.8. Not run on these machines (no dataset download).
"""

from metric_jax.training import config as config_lib


def get_config(arg: str | None = None):
  opts = config_lib.parse_config_arg(arg, ("runlocal", "embedding128"))
  runlocal = "runlocal" in opts
  c = config_lib.image_retrieval_config(
      "stanford_online_products", num_train_steps=25000,
      embedding_dim=128 if "embedding128" in opts else 512, runlocal=runlocal)
  if not runlocal:
    c.eval.k_values = (1, 10, 100, 1000)
    c.eval.every = 5000
    c.checkpoint_every = 5000
    # 120k-image clustering is slow; NMI is not part of the SOP protocol.
    c.eval.clustering = False
  c.lock()
  return c
