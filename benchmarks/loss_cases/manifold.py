"""Manifold loss next to PML's ``ManifoldLoss``.

Both sides use K = 50 proxies (PML's default; the proxies are meta-classes,
not classes; fewer only for batches under 50 rows) from their own standard-normal
initialisation, and both draw the proxy assignment at random (PML's
``labels=None`` path; here ``labels=None`` with a fixed key). Both
differentiate the embeddings and the proxies. The cost is one solve of the
(B + K)-square random-walk system: O((B + K)^3).
"""

from __future__ import annotations

import jax

from benchmarks.loss_cases import Case
from metric_jax import losses

_NUM_PROXIES = 50


def _num_proxies(num_classes):
  """50, or fewer on tiny batches: the random assignment needs B >= K, and
  the harness's batches hold 4 samples per class."""
  return min(_NUM_PROXIES, max(4 * num_classes, 1))


def _jax_loss(emb, labels, params):
  del labels  # PML's ManifoldLoss takes no labels: both sides draw the assignment.
  return losses.manifold_loss(emb, None, key=jax.random.key(0), **params)


def _make_params(key, num_classes, dim):
  return losses.init_manifold(key, _num_proxies(num_classes), dim)


def _pml_loss(num_classes, dim):
  from pytorch_metric_learning import losses as pml  # pylint: disable=import-outside-toplevel
  module = pml.ManifoldLoss(dim, K=_num_proxies(num_classes))

  def run(emb, labels):
    del labels
    module.zero_grad()
    return module(emb)

  return run


CASES = [Case(name="manifold", jax_loss=_jax_loss, pml_loss=_pml_loss,
              make_params=_make_params)]
