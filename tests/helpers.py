"""Test helpers shared by every loss test: label layouts, random inputs and
the generic contract checks of DESIGN.md (jit, vmap, grad, degenerate
batches, masks, half precision, one compilation).

The per-loss tests supply the NumPy loop references; these helpers only
check the properties every loss must have.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

HAS_PML = (importlib.util.find_spec("torch") is not None
           and importlib.util.find_spec("pytorch_metric_learning") is not None)


def np_gradient(fn, x, eps: float = 1e-6) -> np.ndarray:
  """Central differences of a float64 function (a loop reference) of an
  array: the gradient a loss's ``jax.grad`` is checked against."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[idx] = eps
    grad[idx] = (fn(x + step) - fn(x - step)) / (2 * eps)
  return grad


def label_layouts(b: int = 12):
  """Named [b] label arrays: m-per-class, mixed with singletons, one class,
  all singletons (no positive pair)."""
  return {
      "m_per_class": np.repeat(np.arange(-(-b // 3)), 3)[:b],
      "with_singletons": np.array(([0, 0, 0, 1, 1, 2, 3, 4, 4, 4, 5, 6] * 4)[:b]),
      "one_class": np.zeros(b, np.int32),
      "all_singletons": np.arange(b),
  }


def random_embeddings(seed: int, b: int = 12, d: int = 5, scale: float = 1.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, d)) * scale).astype(np.float32)


class ReferenceCase(NamedTuple):
  """Inputs of the reference-set tests (see :func:`reference_case`)."""
  emb: np.ndarray          # [10, 4] anchors
  ref: np.ndarray          # [7, 4] references
  labels: np.ndarray       # [10]
  ref_labels: np.ndarray   # [7], classes shared with the anchors and not
  where: np.ndarray        # [10] bool, the last 2 anchors padded
  ref_where: np.ndarray    # [7] bool, the last reference padded
  pair_mask: np.ndarray    # [10, 7] bool, random


def reference_case(seed: int = 2, scale: float = 1.0, density: float = 0.8) -> ReferenceCase:
  """10 anchors against 7 references, with padding on both sides and a
  random pair mask keeping about ``density`` of the pairs: the inputs every
  loss's reference-set test compares with its loop reference."""
  return ReferenceCase(
      emb=random_embeddings(seed, 10, 4, scale=scale),
      ref=random_embeddings(seed + 1, 7, 4, scale=scale),
      labels=np.array([0, 1, 2, 0, 1, 2, 3, 3, 0, 1]),
      ref_labels=np.array([0, 0, 1, 2, 3, 4, 1]),
      where=np.array([True] * 8 + [False] * 2),
      ref_where=np.array([True] * 6 + [False]),
      pair_mask=np.random.default_rng(0).random((10, 7)) < density)


def np_pairwise(x, y, metric="euclidean"):
  """Slow, obviously correct pairwise metric with explicit loops (float64)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  out = np.zeros((len(x), len(y)))
  for i in range(len(x)):
    for j in range(len(y)):
      if metric == "euclidean":
        out[i, j] = np.sqrt(np.sum((x[i] - y[j]) ** 2))
      elif metric == "squared_euclidean":
        out[i, j] = np.sum((x[i] - y[j]) ** 2)
      elif metric == "cosine":
        out[i, j] = x[i] @ y[j] / max(np.linalg.norm(x[i]) * np.linalg.norm(y[j]), 1e-24)
      elif metric == "dot":
        out[i, j] = x[i] @ y[j]
      else:
        raise ValueError(metric)
  return out


def np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_loss_contract(loss_fn, *, b: int = 12, d: int = 5, seed: int = 0,
                        grad_order: int = 1, bf16_rtol: float = 5e-2,
                        duplicate_ok: bool = True, zero_without_positives: bool = True,
                        grad_loss_fn=None, grad_eps: float = 1e-3):
  """Checks the properties every embedding loss promises.

  Args:
    loss_fn: ``loss_fn(embeddings, labels, **kw) -> scalar``; extra
      parameters (proxies, centres) must be closed over.
    zero_without_positives: whether a batch without positive pairs must give
      exactly 0 (false for losses whose negatives alone cost, e.g. PML's
      generalized lifted structure or proxy losses).
    grad_loss_fn: the function whose gradient is checked numerically
      (default ``loss_fn``). ``"mean_nonzero"`` jumps where a term crosses 0
      (the count changes), so finite differences there are meaningless:
      pass the same loss with ``reduction="mean"``.
    grad_eps: finite-difference step. Losses whose selection itself jumps
      (semi-hard bands, nearest-farther negatives) need a step small enough
      not to cross a selection boundary at the test point.
  """
  emb = jnp.asarray(random_embeddings(seed, b, d))
  labels = jnp.asarray(label_layouts(b)["m_per_class"])

  # jit == eager, and a single compilation for repeated same-shape calls.
  eager = loss_fn(emb, labels)
  traces = []

  def traced(e, l):
    traces.append(1)
    return loss_fn(e, l)

  jitted = jax.jit(traced)
  np.testing.assert_allclose(jitted(emb, labels), eager, rtol=1e-5, atol=1e-6)
  jitted(emb + 1.0, labels)
  jitted(emb * 2.0, (labels + 1) % 7)
  assert len(traces) == 1, f"retraced {len(traces)} times"
  assert np.isfinite(eager)

  # The remaining checks run compiled: a handful of compilations instead of
  # hundreds of eager per-operation ones (test time is compile time here).
  loss_jit = jax.jit(loss_fn)
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  masked_value_and_grad = jax.jit(
      jax.value_and_grad(lambda e, l, w: loss_fn(e, l, where=w)))

  # vmap over a leading axis == Python loop.
  stack = jnp.stack([emb, emb * 0.5 + 0.1, -emb])
  lab_stack = jnp.stack([labels, labels[::-1], labels])
  vm = jax.jit(jax.vmap(loss_fn))(stack, lab_stack)
  loop = jnp.stack([loss_jit(e, l) for e, l in zip(stack, lab_stack)])
  np.testing.assert_allclose(vm, loop, rtol=1e-5, atol=1e-6)

  # Numerical gradient check (in float64 would be better; f32 with loose tol).
  grad_loss_jit = jax.jit(grad_loss_fn or loss_fn)
  check_grads(lambda e: grad_loss_jit(e, labels), (emb,), order=grad_order,
              modes=("rev",), atol=5e-2, rtol=5e-2, eps=grad_eps)

  # Duplicate embeddings: finite loss and gradient.
  if duplicate_ok:
    dup = emb.at[1].set(emb[0]).at[2].set(emb[0])
    val, grad = value_and_grad(dup, labels)
    assert np.isfinite(val) and np.all(np.isfinite(grad)), "non-finite at duplicates"
    collapsed = jnp.zeros_like(emb) + 0.3
    val, grad = value_and_grad(collapsed, labels)
    assert np.isfinite(val) and np.all(np.isfinite(grad)), "non-finite when collapsed"

  # No positive pair: 0 with zero, finite gradients.
  singles = jnp.arange(b)
  val, grad = value_and_grad(emb, singles)
  assert np.all(np.isfinite(grad))
  if zero_without_positives:
    assert float(val) == 0.0, f"expected 0 without positives, got {val}"
    assert float(jnp.abs(grad).max()) == 0.0

  # One class (no negatives): finite.
  val, grad = value_and_grad(emb, jnp.zeros(b, jnp.int32))
  assert np.isfinite(val) and np.all(np.isfinite(grad))

  # where: masked rows get zero gradient and do not change the loss,
  # even when they hold NaN.
  where = jnp.arange(b) < b - 3
  kept = loss_jit(emb[: b - 3], labels[: b - 3])
  padded = emb.at[b - 3:].set(jnp.nan)
  val, grad = masked_value_and_grad(padded, labels, where)
  np.testing.assert_allclose(val, kept, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(grad[b - 3:]).max()) == 0.0
  assert np.all(np.isfinite(grad))

  # All masked: 0.
  val, grad = masked_value_and_grad(emb, labels, jnp.zeros(b, bool))
  assert float(val) == 0.0 and np.all(np.isfinite(grad))

  # Half precision close to float32, result in float32.
  for dt in (jnp.bfloat16, jnp.float16):
    low, g = value_and_grad(emb.astype(dt), labels)
    assert low.dtype == jnp.float32, low.dtype
    np.testing.assert_allclose(low, eager, rtol=bf16_rtol, atol=bf16_rtol)
    assert g.dtype == dt and np.all(np.isfinite(np.asarray(g, np.float32)))

  # NaN in a valid embedding is not hidden.
  nan_emb = emb.at[0, 0].set(jnp.nan)
  assert not np.isfinite(float(loss_jit(nan_emb, labels))), "NaN input was hidden"


def check_symmetric_gradient_path(loss_fn, *, metrics=("euclidean", "squared_euclidean",
                                                        "cosine", "dot"),
                                  reductions=("mean_nonzero", "mean", "sum"), b: int = 12):
  """For a loss that compares the batch with itself through
  ``distances.self_pairwise_for_symmetric_loss`` (one matrix product in the
  gradient), checks its gradients against the general path, which an
  all-True ``pair_mask`` selects: with ``where``, NaN padding included,
  and for ``reduction="none"`` under row weights that break the symmetry
  (that reduction must take the general path)."""
  emb = jnp.asarray(random_embeddings(11, b, 5))
  labels = jnp.asarray(label_layouts(b)["with_singletons"])
  where = jnp.arange(b) < b - 2
  padded = emb.at[b - 2:].set(jnp.nan)
  everything = jnp.ones((b, b), bool)
  for metric in metrics:
    for reduction in reductions:
      kw = dict(distance=metric, reduction=reduction, where=where)
      fast = jax.grad(lambda e: loss_fn(e, labels, **kw))(padded)
      general = jax.grad(lambda e: loss_fn(e, labels, pair_mask=everything, **kw))(padded)
      assert np.all(np.isfinite(fast)), (metric, reduction)
      np.testing.assert_allclose(fast, general, rtol=1e-5, atol=1e-7,
                                 err_msg=f"{metric} {reduction}")
    row_weights = jnp.linspace(0.5, 2.0, b)[:, None]
    weighted = lambda mask: jax.grad(lambda e: jnp.sum(
        row_weights * loss_fn(e, labels, distance=metric, reduction="none",
                              pair_mask=mask)))(emb)
    np.testing.assert_allclose(weighted(None), weighted(everything), rtol=1e-5, atol=1e-7,
                               err_msg=f"{metric} none")
