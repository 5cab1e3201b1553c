"""Benchmark cases for `benchmarks/losses.py`, one module per loss family.

Each module defines ``CASES``: a list of :class:`benchmarks.loss_cases.Case`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Case:
  """One loss to benchmark.

  Attributes:
    name: row label, e.g. "triplet (batch-all)".
    jax_loss: ``jax_loss(emb [B, D] f32, labels [B] int32, params) -> scalar``
      where ``params`` is what ``make_params(key, num_classes, dim)`` returned
      (None if the loss has no learned parameters). Differentiated w.r.t. emb
      (and params when not None).
    pml_loss: optional ``pml_loss(num_classes, dim) -> torch callable
      (emb, labels) -> scalar`` building PML's equivalent module, or None.
    make_params: optional ``make_params(key, num_classes, dim) -> pytree``.
    normalize: L2-normalise the inputs first (both sides), as PML does.
  """
  name: str
  jax_loss: Callable[..., Any]
  pml_loss: Callable[..., Any] | None = None
  make_params: Callable[..., Any] | None = None
  normalize: bool = True


def pml_loss(name: str, **kwargs) -> Callable[[int, int], Any]:
  """A ``Case.pml_loss`` that builds ``pytorch_metric_learning.losses.<name>(**kwargs)``
  (the class count and dimension unused); the import is deferred so the cases
  load without the compare extra."""
  def build(num_classes, dim):
    del num_classes, dim
    from pytorch_metric_learning import losses  # pylint: disable=import-outside-toplevel
    return getattr(losses, name)(**kwargs)
  return build
