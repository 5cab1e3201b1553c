"""Benchmark cases: contrastive and triplet losses (the foundation)."""

from benchmarks.loss_cases import Case
import metric_jax as mj


def _pml(factory):
  """Defers the PML import so the cases load without the compare extra."""
  def build(num_classes, dim):
    del num_classes, dim
    return factory()
  return build


def _pml_contrastive():
  from pytorch_metric_learning import losses
  return losses.ContrastiveLoss()


def _pml_triplet(miner_name=None, **miner_kw):
  def factory():
    from pytorch_metric_learning import losses, miners
    loss = losses.TripletMarginLoss(margin=0.2)
    if miner_name is None:
      return loss
    miner = getattr(miners, miner_name)(**miner_kw)
    return lambda e, l: loss(e, l, miner(e, l))
  return factory


CASES = [
    Case("contrastive", lambda e, l, p: mj.losses.contrastive_loss(e, l),
         _pml(_pml_contrastive)),
    Case("triplet (batch-all)", lambda e, l, p: mj.losses.triplet_margin_loss(e, l, margin=0.2),
         _pml(_pml_triplet())),
    Case("triplet (batch-hard)",
         lambda e, l, p: mj.losses.triplet_margin_loss(e, l, margin=0.2, mining="hard"),
         _pml(_pml_triplet("BatchHardMiner"))),
    Case("triplet (semi-hard)",
         lambda e, l, p: mj.losses.triplet_margin_loss(e, l, margin=0.2, mining="semihard"),
         _pml(_pml_triplet("TripletMarginMiner", margin=0.2, type_of_triplets="semihard"))),
    Case("triplet (batch-all, max_positives=3)",
         lambda e, l, p: mj.losses.triplet_margin_loss(e, l, margin=0.2, max_positives=3),
         _pml(_pml_triplet())),
    Case("triplet (semi-hard, max_positives=3)",
         lambda e, l, p: mj.losses.triplet_margin_loss(e, l, margin=0.2, mining="semihard",
                                                      max_positives=3),
         _pml(_pml_triplet("TripletMarginMiner", margin=0.2, type_of_triplets="semihard"))),
    Case("triplet (batch-all, soft, max_positives=3)",
         lambda e, l, p: mj.losses.triplet_margin_loss(e, l, margin=0.2, soft=True, max_positives=3),
         _pml(lambda: __import__("pytorch_metric_learning.losses", fromlist=["x"])
              .TripletMarginLoss(margin=0.2, smooth_loss=True))),
    Case("triplet (batch-all, soft)",
         lambda e, l, p: mj.losses.triplet_margin_loss(e, l, margin=0.2, soft=True),
         _pml(lambda: __import__("pytorch_metric_learning.losses", fromlist=["x"])
              .TripletMarginLoss(margin=0.2, smooth_loss=True))),
]
