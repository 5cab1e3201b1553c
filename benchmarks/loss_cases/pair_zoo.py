"""Benchmark cases: the pair/similarity losses (multi-similarity, circle,
NT-Xent, SupCon, margin, NCA, angular, tuplet, intra-pair variance, SNR,
FastAP, histogram, ranked list, instance), each next to PML's equivalent
with the settings under which the values agree (see the loss docstrings)."""

from benchmarks.loss_cases import Case
from benchmarks.loss_cases import pml_loss
import metric_jax as mj


def _pml_margin_per_class(num_classes, dim):
  del dim
  from pytorch_metric_learning import losses  # pylint: disable=import-outside-toplevel
  return losses.MarginLoss(learn_beta=True, nu=0.01, num_classes=num_classes)


CASES = [
    Case("multi_similarity", lambda e, l, p: mj.losses.multi_similarity_loss(e, l),
         pml_loss("MultiSimilarityLoss")),
    Case("circle", lambda e, l, p: mj.losses.circle_loss(e, l), pml_loss("CircleLoss")),
    Case("ntxent", lambda e, l, p: mj.losses.ntxent_loss(e, l), pml_loss("NTXentLoss")),
    Case("supcon", lambda e, l, p: mj.losses.supcon_loss(e, l), pml_loss("SupConLoss")),
    Case("margin", lambda e, l, p: mj.losses.margin_loss(e, l), pml_loss("MarginLoss")),
    Case("margin (per-class beta)",
         lambda e, l, p: mj.losses.margin_loss(e, l, nu=0.01, **p),
         _pml_margin_per_class,
         make_params=lambda key, c, d: mj.losses.init_margin(key, c, d)),
    Case("nca", lambda e, l, p: mj.losses.nca_loss(e, l), pml_loss("NCALoss")),
    Case("angular", lambda e, l, p: mj.losses.angular_loss(e, l), pml_loss("AngularLoss")),
    Case("tuplet_margin", lambda e, l, p: mj.losses.tuplet_margin_loss(e, l),
         pml_loss("TupletMarginLoss")),
    Case("intra_pair_variance", lambda e, l, p: mj.losses.intra_pair_variance_loss(e, l),
         pml_loss("IntraPairVarianceLoss")),
    Case("snr_contrastive", lambda e, l, p: mj.losses.snr_contrastive_loss(e, l),
         pml_loss("SignalToNoiseRatioContrastiveLoss")),
    Case("fastap", lambda e, l, p: mj.losses.fastap_loss(e, l), pml_loss("FastAPLoss")),
    Case("histogram", lambda e, l, p: mj.losses.histogram_loss(e, l), pml_loss("HistogramLoss")),
    Case("ranked_list",
         lambda e, l, p: mj.losses.ranked_list_loss(e, l, pml_compat=True),
         pml_loss("RankedListLoss", margin=0.2, Tn=10.0)),
    Case("instance", lambda e, l, p: mj.losses.instance_loss(e, l), pml_loss("InstanceLoss")),
]
