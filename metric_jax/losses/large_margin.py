"""Classification losses on normalised class weights: normalised softmax,
ArcFace, sub-centre ArcFace, CosFace, SphereFace and large-margin softmax.

Each loss is cross-entropy over ``[B, C]`` logits built from the cosines
``cos(theta_ij) = <x_i, w_j> / (||x_i|| ||w_j||)`` between the embeddings and
learned class weights, with a margin on the target class. The class weights
are an explicit argument ``weights`` of shape ``[C, D]`` (one row per class;
PML stores the transpose ``[D, C]``), initialised by ``init_<name>(key,
num_classes, embedding_dim)``, which returns the keyword arguments of the loss.
Each loss has a ``<name>_logits(embeddings, weights, labels=None, ...)``
companion returning the logits: with ``labels`` the margin is applied to the
target class (training logits), without it they are the plain scaled cosines
(inference; ``argmax`` gives the predicted class).

These losses compare samples with classes, not with other samples:
``ref_embeddings`` / ``ref_labels`` / ``ref_where`` are not supported and
raise a ``ValueError`` (as PML does). Labels must lie in ``[0, C)``: concrete
labels outside it raise a ``ValueError``; under ``jax.jit`` (traced labels)
such a row's loss is NaN, so the error stays visible.

Numerics: cosines, logits and the cross-entropy are computed in float32 for
every input dtype (scale 64 overflows float16 at once), the result is float32,
and the gradients have the dtype of the inputs. ArcFace never calls
``arccos``: ``cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m)`` with a
guarded ``sin(theta) = sqrt(1 - cos^2(theta))`` whose gradient is 0 (not
infinite) at ``cos = +-1``.
"""

from __future__ import annotations

__all__ = [
    "normalized_softmax_loss", "normalized_softmax_logits", "init_normalized_softmax",
    "arcface_loss", "arcface_logits", "init_arcface",
    "subcenter_arcface_loss", "subcenter_arcface_logits", "init_subcenter_arcface",
    "cosface_loss", "cosface_logits", "init_cosface",
    "sphereface_loss", "sphereface_logits", "init_sphereface",
    "large_margin_softmax_loss", "large_margin_softmax_logits",
    "init_large_margin_softmax",
]

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import distances as distances_lib
from metric_jax import pairs
from metric_jax import reductions

_CLS_REDUCTIONS = ("mean", "sum", "none")

# ---------------------------------------------------------------------------
# Shared helpers of the classification / proxy losses (also used by
# proxy.py and soft_triple.py).
# ---------------------------------------------------------------------------


def _check_no_ref(ref_embeddings, ref_labels, ref_where, loss: str) -> None:
  """Classification losses compare samples with classes: no reference set."""
  for name, value in (("ref_embeddings", ref_embeddings), ("ref_labels", ref_labels),
                      ("ref_where", ref_where)):
    if value is not None:
      raise ValueError(
          f"`{name}` is not supported by {loss}: it compares embeddings with learned "
          f"class parameters, not with a reference set; got an array of shape "
          f"{tuple(np.shape(value))}. Concatenate extra samples into `embeddings` instead.")


def _check_params(params, name: str, embeddings, *, ndim=(2,)) -> None:
  """Checks a float parameter array whose last axis is the embedding size."""
  if params is None:
    raise ValueError(f"`{name}` is required (a float array of class parameters), got None. "
                     f"Create it with the matching init_* function.")
  shape = tuple(np.shape(params))
  if len(shape) not in ndim:
    want = " or ".join(f"rank {n}" for n in ndim)
    raise ValueError(f"`{name}` must have {want} ([C, D]{', [C, K, D]' if 3 in ndim else ''}), "
                     f"got shape {shape}.")
  dtype = jnp.result_type(params)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`{name}` must be a floating-point array, got dtype {dtype}.")
  if shape[0] < 1:
    raise ValueError(f"`{name}` must hold at least one class, got shape {shape}.")
  d = np.shape(embeddings)[-1]
  if shape[-1] != d:
    raise ValueError(f"`{name}` must have embedding size {d} (last axis) to match "
                     f"`embeddings`, got shape {shape}.")


def _is_concrete(x) -> bool:
  return x is not None and not isinstance(x, jax.core.Tracer)


def _label_out_of_range(labels, num_classes: int, where=None) -> jax.Array:
  """Validates class labels against ``[0, num_classes)``.

  Concrete labels (and a concrete ``where``) outside the range raise a
  ValueError naming ``labels``. Returns a [B] bool array flagging the valid
  rows whose (traced) label is out of range, so the caller can poison them.
  """
  if _is_concrete(labels) and (where is None or _is_concrete(where)):
    lab = np.asarray(labels).astype(np.int64)
    valid = np.ones(lab.shape, bool) if where is None else np.asarray(where, bool)
    bad = valid & ((lab < 0) | (lab >= num_classes))
    if bad.any():
      raise ValueError(
          f"`labels` must lie in [0, {num_classes}) (number of classes of the learned "
          f"parameters), got {sorted(set(lab[bad].tolist()))[:8]} at rows "
          f"{np.flatnonzero(bad)[:8].tolist()}.")
  lab = jnp.asarray(labels).astype(jnp.int32)
  bad = (lab < 0) | (lab >= num_classes)
  if where is not None:
    bad = bad & where
  return bad


def _masked_labels(labels, where):
  """Concrete labels with masked rows set to 0 (padding may hold -1)."""
  if where is None:
    return labels
  return jnp.where(jnp.asarray(where), jnp.asarray(labels), 0)


def _one_hot(labels, num_classes: int) -> jax.Array:
  """[B, C] bool; an all-False row for an out-of-range label."""
  lab = jnp.asarray(labels).astype(jnp.int32)
  return lab[:, None] == jnp.arange(num_classes, dtype=jnp.int32)[None, :]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _elementwise_with_kept_slope(fn, x: jax.Array, params: tuple) -> jax.Array:
  """``fn(x, *params)`` for ``fn`` elementwise in ``x``, with its slope in
  ``x`` computed once per entry: XLA:CPU otherwise fuses the slope's chain
  of [B] operations into the [B, C] gradient that consumes it and
  re-evaluates it for every class (sub-centre ArcFace at B = 2048: about
  10 ms of 40)."""
  return fn(x, *params)


@_elementwise_with_kept_slope.defjvp
def _elementwise_with_kept_slope_jvp(fn, primals, tangents):
  (x, params), (x_dot, params_dot) = primals, tangents
  y, linear = jax.linearize(fn, x, *params)       # fn evaluated once
  slope = linear(jnp.ones_like(x), *map(jnp.zeros_like, params))
  via_params = linear(jnp.zeros_like(x), *params_dot)
  return y, jax.lax.optimization_barrier(slope) * x_dot + via_params


def _with_target_margin(cos: jax.Array, labels, margin_fn, *params) -> jax.Array:
  """``cos`` with ``margin_fn(target_cos, *params)`` (elementwise in the
  cosines; ``params`` differentiable) applied at each row's target class
  only.

  The margin is evaluated on the [B] target cosines, not on all [B, C]
  entries (arccos, square roots and polynomials are the costly part of
  these losses otherwise). Rows with an out-of-range label keep ``cos``.
  """
  target = _one_hot(labels, cos.shape[1])
  target_cos = jnp.sum(jnp.where(target, cos, 0.0), axis=1)
  margined = _elementwise_with_kept_slope(margin_fn, target_cos, params)
  return jnp.where(target, margined[:, None], cos)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-row ``logsumexp(logits) - logits[label]`` in float32 ([B])."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[1]
  idx = jnp.clip(jnp.asarray(labels).astype(jnp.int32), 0, num_classes - 1)
  target = jnp.take_along_axis(logits, idx[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=1) - target


def _finish(terms: jax.Array, where, bad: jax.Array, reduction: str) -> jax.Array:
  """NaN for out-of-range traced labels, then the masked reduction."""
  terms = jnp.where(bad, jnp.nan, terms)
  return reductions.reduce(terms, where, reduction)


def _prepare_classification(embeddings, labels, where, ref_embeddings, ref_labels,
                            ref_where, reduction, loss: str):
  """Validates the standard inputs; returns the embeddings with masked rows
  zeroed (NaN padding cannot leak)."""
  _check_no_ref(ref_embeddings, ref_labels, ref_where, loss)
  pairs.check_inputs(embeddings, labels, where=where)
  reductions.check(reduction, _CLS_REDUCTIONS)
  return pairs.zero_invalid_rows(embeddings, where)


def _classification_loss(loss: str, logits_fn, embeddings, labels, weights, *, where,
                         ref_embeddings, ref_labels, ref_where, reduction, ndim=(2,),
                         num_classes=lambda w: w.shape[0]):
  """The body every margin-softmax loss shares: validate the inputs, flag
  out-of-range labels, ``logits_fn(x, labels_with_padding_zeroed)``, then
  the per-row cross-entropy and the masked reduction."""
  x = _prepare_classification(embeddings, labels, where, ref_embeddings, ref_labels,
                              ref_where, reduction, loss)
  _check_params(weights, "weights", embeddings, ndim=ndim)
  bad = _label_out_of_range(labels, num_classes(weights), where)
  logits = logits_fn(x, _masked_labels(labels, where))
  return _finish(_cross_entropy(logits, labels), where, bad, reduction)


def _check_logits_inputs(embeddings, weights, labels, name="weights", ndim=(2,)):
  _checks.embeddings(embeddings, "embeddings")
  _check_params(weights, name, embeddings, ndim=ndim)
  if labels is not None:
    _checks.labels(labels, embeddings.shape[0], "labels")


def _cosine(embeddings: jax.Array, weights: jax.Array) -> jax.Array:
  """[B, C] float32 cosines between rows of ``embeddings`` and ``weights``."""
  return distances_lib.pairwise(embeddings.astype(jnp.float32),
                                weights.astype(jnp.float32), "cosine")


def _norms(x: jax.Array) -> jax.Array:
  """Row L2 norms in float32 with a zero (finite) gradient at 0."""
  x = x.astype(jnp.float32)
  return distances_lib.safe_sqrt(jnp.sum(x * x, axis=-1))


def _normal_init(key, shape, dtype, std=1.0):
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# ---------------------------------------------------------------------------
# Normalised softmax (NormFace)
# ---------------------------------------------------------------------------


def init_normalized_softmax(key: jax.Array, num_classes: int, embedding_dim: int, *,
                            dtype=jnp.float32) -> dict:
  """Class weights for :func:`normalized_softmax_loss`.

  Standard normal ``[C, D]`` (PML's default ``normal_`` init of its ``[D, C]``
  weight).

  Args:
    key: a ``jax.random`` key.
    num_classes: C >= 1, the number of classes.
    embedding_dim: D >= 1, the embedding size.
    dtype: dtype of the weights (default float32; sampled in float32).

  Returns:
    ``{"weights": [num_classes, embedding_dim]}``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_normalized_softmax(jax.random.key(0), 10, 4)
    >>> params["weights"].shape, params["weights"].dtype
    ((10, 4), dtype('float32'))
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> loss = mj.losses.normalized_softmax_loss(emb, jnp.array([0, 1, 2, 3, 4, 5]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
  """
  _checks.positive_int(num_classes, "num_classes")
  _checks.positive_int(embedding_dim, "embedding_dim")
  return {"weights": _normal_init(key, (num_classes, embedding_dim), dtype)}


def normalized_softmax_logits(embeddings: jax.Array, weights: jax.Array,
                              labels: jax.Array | None = None, *,
                              temperature: float = 0.05) -> jax.Array:
  """Logits ``cos(theta_ij) / temperature`` of :func:`normalized_softmax_loss`.

  Args:
    embeddings: [B, D] float.
    weights: [C, D] float class weights.
    labels: optional [B] labels, validated but unused (no margin); accepted
      for a uniform interface.
    temperature: > 0.

  Returns:
    [B, C] float32 logits.

  References:
    See :func:`normalized_softmax_loss`.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0., 2.]])
    >>> w = jnp.array([[1., 0.], [0., 1.]])
    >>> logits = mj.losses.normalized_softmax_logits(emb, w, temperature=0.5)
    >>> logits.tolist(), logits.argmax(axis=1).tolist()
    ([[2.0, 0.0], [0.0, 2.0]], [0, 1])
  """
  _check_logits_inputs(embeddings, weights, labels)
  _checks.scalar(temperature, "temperature", positive=True)
  if labels is not None:
    _label_out_of_range(labels, weights.shape[0])
  return _cosine(embeddings, weights) / temperature


def normalized_softmax_loss(embeddings: jax.Array, labels: jax.Array,
                            ref_embeddings: jax.Array | None = None,
                            ref_labels: jax.Array | None = None, *,
                            weights: jax.Array, temperature: float = 0.05,
                            reduction: str = "mean", where: jax.Array | None = None,
                            ref_where: jax.Array | None = None) -> jax.Array:
  r"""Normalised softmax (NormFace) cross-entropy.

  Both the embeddings and the class weights are L2-normalised::

    l_i = -log( exp(cos(theta_{i y_i}) / T) / sum_j exp(cos(theta_ij) / T) )

  Defaults reproduce PML's ``NormalizedSoftmaxLoss()`` (temperature 0.05,
  mean over samples), with ``weights = W.T`` of PML's ``[D, C]`` weight.

  Args:
    embeddings: [B, D] float (f32, bf16, f16).
    labels: [B] integer class labels in ``[0, C)``.
    ref_embeddings: not supported (raises).
    ref_labels: not supported (raises).
    weights: [C, D] float class weights (see :func:`init_normalized_softmax`).
    temperature: softmax temperature, > 0.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face
    Verification", ACM MM 2017, arXiv 1704.06369. Zhai, Wu, "Classification is
    a Strong Baseline for Deep Metric Learning", BMVC 2019, arXiv 1811.12649.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0., 2.]])
    >>> w = jnp.array([[1., 0.], [0., 1.]])
    >>> loss = mj.losses.normalized_softmax_loss(emb, jnp.array([0, 1]), weights=w,
    ...                                          temperature=0.5)
    >>> round(float(loss), 4)
    0.1269
  """
  return _classification_loss(
      "normalized_softmax_loss",
      lambda x, _: normalized_softmax_logits(x, weights, temperature=temperature),
      embeddings, labels, weights, where=where, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
      ref_where=ref_where, reduction=reduction)


# ---------------------------------------------------------------------------
# ArcFace and sub-centre ArcFace
# ---------------------------------------------------------------------------


def _arc_margin(cos: jax.Array, margin) -> jax.Array:
  """ArcFace target logit ``cos(theta + m)``, or ``cos(theta) - m sin(m)``
  beyond ``theta > pi - m`` (keeps the logit decreasing in theta).

  ``cos`` is clipped to [-1, 1]; ``sin(theta)`` uses the guarded sqrt.
  """
  c = jnp.clip(cos, -1.0, 1.0)
  cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
  sin_t = distances_lib.safe_sqrt(1.0 - c * c)
  # theta <= pi - m  <=>  cos(theta) >= cos(pi - m) = -cos(m)
  return jnp.where(c >= -cos_m, c * cos_m - sin_t * sin_m, c - margin * sin_m)


def _check_angular(margin, scale) -> None:
  _checks.scalar(margin, "margin", non_negative=True)
  if isinstance(margin, (int, float, np.number)) and margin >= math.pi:
    raise ValueError(f"`margin` is in radians and must be < pi, got {margin} "
                     f"(for PML's degrees use math.radians(...)).")
  _checks.scalar(scale, "scale", positive=True)


def init_arcface(key: jax.Array, num_classes: int, embedding_dim: int, *,
                 dtype=jnp.float32) -> dict:
  """Class weights for :func:`arcface_loss`: standard normal ``[C, D]``.

  Args:
    key: a ``jax.random`` key.
    num_classes: C >= 1, the number of classes.
    embedding_dim: D >= 1, the embedding size.
    dtype: dtype of the weights (default float32; sampled in float32).

  Returns:
    ``{"weights": [num_classes, embedding_dim]}``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_arcface(jax.random.key(0), 10, 4)
    >>> params["weights"].shape, params["weights"].dtype
    ((10, 4), dtype('float32'))
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> loss = mj.losses.arcface_loss(emb, jnp.array([0, 1, 2, 3, 4, 5]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
  """
  return init_normalized_softmax(key, num_classes, embedding_dim, dtype=dtype)


def arcface_logits(embeddings: jax.Array, weights: jax.Array,
                   labels: jax.Array | None = None, *, margin: float = 0.5,
                   scale: float = 64.0) -> jax.Array:
  """ArcFace logits ``s cos(theta_ij)``, target ``s cos(theta_iy + m)``.

  Args:
    embeddings: [B, D] float.
    weights: [C, D] float class weights.
    labels: optional [B] integer labels; None gives the margin-free
      inference logits ``s cos(theta)``.
    margin: additive angular margin in radians, in [0, pi).
    scale: s > 0.

  Returns:
    [B, C] float32 logits.

  References:
    See :func:`arcface_loss`.

  Example:
    The margin lowers only the target logit, ``cos(0 + 0.5) = 0.8776``:

    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb, w = jnp.array([[2., 0.]]), jnp.array([[1., 0.], [0., 1.]])
    >>> mj.losses.arcface_logits(emb, w, scale=1.0).tolist()
    [[1.0, 0.0]]
    >>> logits = mj.losses.arcface_logits(emb, w, jnp.array([0]), margin=0.5, scale=1.0)
    >>> [round(float(v), 4) for v in logits[0]]
    [0.8776, 0.0]
  """
  _check_logits_inputs(embeddings, weights, labels)
  _check_angular(margin, scale)
  cos = _cosine(embeddings, weights)
  if labels is None:
    return scale * cos
  _label_out_of_range(labels, weights.shape[0])
  return scale * _with_target_margin(cos, labels, _arc_margin, margin)


def arcface_loss(embeddings: jax.Array, labels: jax.Array,
                 ref_embeddings: jax.Array | None = None,
                 ref_labels: jax.Array | None = None, *,
                 weights: jax.Array, margin: float = 0.5, scale: float = 64.0,
                 reduction: str = "mean", where: jax.Array | None = None,
                 ref_where: jax.Array | None = None) -> jax.Array:
  r"""ArcFace: additive angular margin softmax.

  With ``cos(theta_ij)`` the cosine between ``x_i`` and class weight ``w_j``::

    l_i = -log( e^{s psi(theta_{i y_i})} /
                (e^{s psi(theta_{i y_i})} + sum_{j != y_i} e^{s cos(theta_ij)}) )
    psi(theta) = cos(theta + m)            if theta <= pi - m
               = cos(theta) - m sin(m)     otherwise

  ``cos(theta + m)`` is expanded as ``cos(theta) cos(m) - sin(theta) sin(m)``
  with a guarded ``sin(theta) = sqrt(1 - cos^2)``: no ``arccos`` and no
  infinite gradient at ``cos = +-1``.

  The margin is in **radians**. PML's ``ArcFaceLoss(margin=28.6)`` is in
  degrees: ``margin=math.radians(28.6)`` (0.4992) with ``scale=64`` and
  ``weights = W.T`` reproduces it (mean over samples). The default 0.5 is
  the paper's value.

  Args:
    embeddings: [B, D] float (f32, bf16, f16; computed in f32).
    labels: [B] integer class labels in ``[0, C)``.
    ref_embeddings: not supported (raises).
    ref_labels: not supported (raises).
    weights: [C, D] float class weights (see :func:`init_arcface`).
    margin: additive angular margin m in radians, in [0, pi).
    scale: logit scale s > 0.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep
    Face Recognition", CVPR 2019, arXiv 1801.07698.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0., 2.]])
    >>> w = jnp.array([[1., 0.], [0., 1.]])
    >>> loss = mj.losses.arcface_loss(emb, jnp.array([0, 1]), weights=w, scale=4.0)
    >>> round(float(loss), 4)
    0.0294
  """
  return _classification_loss(
      "arcface_loss",
      lambda x, lab: arcface_logits(x, weights, lab, margin=margin, scale=scale),
      embeddings, labels, weights, where=where, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
      ref_where=ref_where, reduction=reduction)


def _grouped_params(params, per_class, *, name: str, per_class_name: str,
                    default: int) -> jax.Array:
  """[C, k, D] view of per-class parameter groups (sub-centres, SoftTriple
  centres) given as [C, k, D] or in PML's flat [C*k, D] layout (row
  ``c*k + j`` = member j of class c); ``per_class`` None means ``default``
  for the flat layout and "as given" for the 3-D one."""
  shape = np.shape(params)
  if len(shape) == 3:
    if per_class is not None and per_class != shape[1]:
      raise ValueError(f"`{per_class_name}`={per_class} does not match `{name}` of shape "
                       f"{tuple(shape)} ([C, k, D] with k={shape[1]}).")
    return params
  k = default if per_class is None else per_class
  _checks.positive_int(k, per_class_name)
  if shape[0] % k:
    raise ValueError(f"`{name}` of shape {tuple(shape)} ([C*k, D]) must have a first axis "
                     f"divisible by `{per_class_name}`={k}.")
  return jnp.reshape(params, (shape[0] // k, k, shape[1]))


def _subcenter_weights(weights, sub_centers, name="weights"):
  """[C, k, D] view of sub-centre weights given as [C, k, D] or [C*k, D]."""
  return _grouped_params(weights, sub_centers, name=name, per_class_name="sub_centers",
                         default=3)


def init_subcenter_arcface(key: jax.Array, num_classes: int, embedding_dim: int, *,
                           sub_centers: int = 3, dtype=jnp.float32) -> dict:
  """Sub-centre weights for :func:`subcenter_arcface_loss`.

  Standard normal, returned as ``[C, k, D]`` so that the number of
  sub-centres travels with the array (the loss also accepts the flat
  ``[C*k, D]`` layout of PML, row ``c*k + j`` = sub-centre j of class c).

  Args:
    key: a ``jax.random`` key.
    num_classes: C >= 1, the number of classes.
    embedding_dim: D >= 1, the embedding size.
    sub_centers: k >= 1, sub-centres per class (default 3, PML's).
    dtype: dtype of the weights (default float32; sampled in float32).

  Returns:
    ``{"weights": [num_classes, sub_centers, embedding_dim]}``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_subcenter_arcface(jax.random.key(0), 10, 4, sub_centers=2)
    >>> params["weights"].shape, params["weights"].dtype
    ((10, 2, 4), dtype('float32'))
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> loss = mj.losses.subcenter_arcface_loss(emb, jnp.array([0, 1, 2, 3, 4, 5]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
  """
  _checks.positive_int(num_classes, "num_classes")
  _checks.positive_int(embedding_dim, "embedding_dim")
  _checks.positive_int(sub_centers, "sub_centers")
  return {"weights": _normal_init(key, (num_classes, sub_centers, embedding_dim), dtype)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _max_of_blocks(k: int, *blocks: jax.Array) -> jax.Array:
  """Elementwise maximum of ``k`` arrays; the gradient goes to the first
  block holding the maximum. The backward pass keeps only which block that
  is (int8), not the k blocks (smaller buffers than ``jnp.maximum``'s
  rule)."""
  del k
  return functools.reduce(jnp.maximum, blocks)


def _max_of_blocks_fwd(k, *blocks):
  del k
  best, which = blocks[0], jnp.zeros(blocks[0].shape, jnp.int8)
  for i, block in enumerate(blocks[1:], start=1):
    which = jnp.where(block > best, jnp.int8(i), which)
    best = jnp.maximum(best, block)
  return best, which


def _max_of_blocks_bwd(k, which, g):
  return tuple(jnp.where(which == i, g, jnp.zeros_like(g)) for i in range(k))


_max_of_blocks.defvjp(_max_of_blocks_fwd, _max_of_blocks_bwd)


def subcenter_arcface_logits(embeddings: jax.Array, weights: jax.Array,
                             labels: jax.Array | None = None, *,
                             sub_centers: int | None = None, margin: float = 0.5,
                             scale: float = 64.0) -> jax.Array:
  """Sub-centre ArcFace logits: ArcFace on ``max_k cos(x_i, w_{jk})``.

  Args:
    embeddings: [B, D] float.
    weights: [C, k, D] or [C*k, D] float sub-centre weights.
    labels: optional [B] integer labels (None: no margin).
    sub_centers: k for the flat layout (default 3, PML's); inferred from a
      3-D ``weights``.
    margin: angular margin in radians; scale: s > 0.

  Returns:
    [B, C] float32 logits.

  References:
    See :func:`subcenter_arcface_loss`.

  Example:
    Each class logit uses its closest sub-centre:

    >>> import jax.numpy as jnp, metric_jax as mj
    >>> w = jnp.array([[[1., 0.], [0., -1.]], [[0., 1.], [-1., 0.]]])  # [C=2, k=2, D=2]
    >>> emb = jnp.array([[0., 3.]])
    >>> mj.losses.subcenter_arcface_logits(emb, w, scale=1.0).tolist()
    [[0.0, 1.0]]
    >>> logits = mj.losses.subcenter_arcface_logits(emb, w, jnp.array([1]), scale=1.0)
    >>> [round(float(v), 4) for v in logits[0]]
    [0.0, 0.8776]
  """
  _check_logits_inputs(embeddings, weights, labels, ndim=(2, 3))
  _check_angular(margin, scale)
  w = _subcenter_weights(weights, sub_centers)
  c, k, d = w.shape
  # One [B, C] product per sub-centre and a chain of elementwise maxima,
  # whose gradient is one select per block (a reduction over a minor axis of
  # size k, or jnp.max with its tie counting, is slower on CPU; k separate
  # products keep the buffers at [B, C]: 35 -> 30 ms at B = 2048, k = 3).
  cos = _max_of_blocks(k, *[_cosine(embeddings, w[:, i]) for i in range(k)])
  if labels is None:
    return scale * cos
  _label_out_of_range(labels, c)
  return scale * _with_target_margin(cos, labels, _arc_margin, margin)


def subcenter_arcface_loss(embeddings: jax.Array, labels: jax.Array,
                           ref_embeddings: jax.Array | None = None,
                           ref_labels: jax.Array | None = None, *,
                           weights: jax.Array, sub_centers: int | None = None,
                           margin: float = 0.5, scale: float = 64.0,
                           reduction: str = "mean", where: jax.Array | None = None,
                           ref_where: jax.Array | None = None) -> jax.Array:
  r"""Sub-centre ArcFace: ArcFace with k sub-centres per class.

  The class cosine is the best sub-centre's,
  ``cos(theta_ij) = max_k cos(x_i, w_{jk})``, then the ArcFace margin and
  cross-entropy of :func:`arcface_loss` apply. Noisy samples can attach to
  a non-dominant sub-centre instead of pulling the main one.

  PML's ``SubCenterArcFaceLoss(num_classes=C, embedding_size=D,
  sub_centers=k)`` (margin 28.6 degrees, scale 64) equals this loss with
  ``weights = W.T`` (``[C*k, D]``, row ``c*k + j``), ``sub_centers=k`` and
  ``margin=math.radians(28.6)``.

  Args:
    embeddings: [B, D] float.
    labels: [B] integer class labels in ``[0, C)``.
    ref_embeddings: not supported (raises).
    ref_labels: not supported (raises).
    weights: [C, k, D] (inferred k) or [C*k, D] float sub-centre weights.
    sub_centers: k for the flat layout (default 3).
    margin: angular margin in radians, in [0, pi).
    scale: logit scale s > 0.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Deng, Guo, Liu, Gong, Zafeiriou, "Sub-center ArcFace: Boosting Face
    Recognition by Large-scale Noisy Web Faces", ECCV 2020.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0., 2.]])
    >>> w = jnp.array([[[1., 0.], [0., -1.]], [[0., 1.], [-1., 0.]]])  # [C=2, k=2, D=2]
    >>> loss = mj.losses.subcenter_arcface_loss(emb, jnp.array([0, 1]), weights=w,
    ...                                         scale=4.0)
    >>> round(float(loss), 4)
    0.0294
  """
  return _classification_loss(
      "subcenter_arcface_loss",
      lambda x, lab: subcenter_arcface_logits(x, weights, lab, sub_centers=sub_centers,
                                              margin=margin, scale=scale),
      embeddings, labels, weights, where=where, ref_embeddings=ref_embeddings,
      ref_labels=ref_labels, ref_where=ref_where, reduction=reduction, ndim=(2, 3),
      num_classes=lambda w: _subcenter_weights(w, sub_centers).shape[0])


# ---------------------------------------------------------------------------
# CosFace
# ---------------------------------------------------------------------------


def init_cosface(key: jax.Array, num_classes: int, embedding_dim: int, *,
                 dtype=jnp.float32) -> dict:
  """Class weights for :func:`cosface_loss`: standard normal ``[C, D]``.

  Args:
    key: a ``jax.random`` key.
    num_classes: C >= 1, the number of classes.
    embedding_dim: D >= 1, the embedding size.
    dtype: dtype of the weights (default float32; sampled in float32).

  Returns:
    ``{"weights": [num_classes, embedding_dim]}``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_cosface(jax.random.key(0), 10, 4)
    >>> params["weights"].shape, params["weights"].dtype
    ((10, 4), dtype('float32'))
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> loss = mj.losses.cosface_loss(emb, jnp.array([0, 1, 2, 3, 4, 5]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
  """
  return init_normalized_softmax(key, num_classes, embedding_dim, dtype=dtype)


def cosface_logits(embeddings: jax.Array, weights: jax.Array,
                   labels: jax.Array | None = None, *, margin: float = 0.35,
                   scale: float = 64.0) -> jax.Array:
  """CosFace logits ``s cos(theta_ij)``, target ``s (cos(theta_iy) - m)``.

  Args:
    embeddings: [B, D] float.
    weights: [C, D] float class weights.
    labels: optional [B] integer labels (None: no margin).
    margin: additive cosine margin m; scale: s > 0.

  Returns:
    [B, C] float32 logits.

  References:
    See :func:`cosface_loss`.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb, w = jnp.array([[2., 0.]]), jnp.array([[1., 0.], [0., 1.]])
    >>> logits = mj.losses.cosface_logits(emb, w, jnp.array([0]), margin=0.35, scale=4.0)
    >>> [round(float(v), 4) for v in logits[0]]
    [2.6, 0.0]
  """
  _check_logits_inputs(embeddings, weights, labels)
  _checks.scalar(margin, "margin")
  _checks.scalar(scale, "scale", positive=True)
  cos = _cosine(embeddings, weights)
  if labels is None:
    return scale * cos
  _label_out_of_range(labels, weights.shape[0])
  return scale * jnp.where(_one_hot(labels, weights.shape[0]), cos - margin, cos)


def cosface_loss(embeddings: jax.Array, labels: jax.Array,
                 ref_embeddings: jax.Array | None = None,
                 ref_labels: jax.Array | None = None, *,
                 weights: jax.Array, margin: float = 0.35, scale: float = 64.0,
                 reduction: str = "mean", where: jax.Array | None = None,
                 ref_where: jax.Array | None = None) -> jax.Array:
  r"""CosFace (large margin cosine loss).

  ::

    l_i = -log( e^{s (cos(theta_{i y_i}) - m)} /
                (e^{s (cos(theta_{i y_i}) - m)} + sum_{j != y_i} e^{s cos(theta_ij)}) )

  Defaults (m = 0.35, s = 64, mean over samples) reproduce PML's
  ``CosFaceLoss()`` with ``weights = W.T``.

  Args:
    embeddings: [B, D] float.
    labels: [B] integer class labels in ``[0, C)``.
    ref_embeddings: not supported (raises).
    ref_labels: not supported (raises).
    weights: [C, D] float class weights (see :func:`init_cosface`).
    margin: cosine margin m.
    scale: logit scale s > 0.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Wang, Wang, Zhou, Ji, Gong, Zhou, Li, Liu, "CosFace: Large Margin Cosine
    Loss for Deep Face Recognition", CVPR 2018, arXiv 1801.09414.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.], [0., 2.]])
    >>> w = jnp.array([[1., 0.], [0., 1.]])
    >>> loss = mj.losses.cosface_loss(emb, jnp.array([0, 1]), weights=w, scale=4.0)
    >>> round(float(loss), 4)
    0.0716
  """
  return _classification_loss(
      "cosface_loss",
      lambda x, lab: cosface_logits(x, weights, lab, margin=margin, scale=scale),
      embeddings, labels, weights, where=where, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
      ref_where=ref_where, reduction=reduction)


# ---------------------------------------------------------------------------
# Large-margin softmax (L-Softmax) and SphereFace (A-Softmax)
# ---------------------------------------------------------------------------


def _multiplicative_margin(cos: jax.Array, margin: int) -> jax.Array:
  """``psi(theta) = (-1)^k cos(m theta) - 2k`` for theta in [k pi/m, (k+1) pi/m].

  ``cos(m theta)`` is the Chebyshev expansion
  ``sum_n (-1)^n C(m, 2n) cos^{m-2n}(theta) (1 - cos^2(theta))^n`` (a
  polynomial in cos: smooth, no arccos in the gradient); ``k`` is piecewise
  constant and carries no gradient.
  """
  sin2 = 1.0 - cos * cos
  cos_m = jnp.zeros_like(cos)
  for n in range(margin // 2 + 1):
    cos_m = cos_m + ((-1) ** n) * math.comb(margin, 2 * n) * cos ** (margin - 2 * n) * sin2 ** n
  theta = jnp.arccos(jnp.clip(jax.lax.stop_gradient(cos), -1.0, 1.0))
  k = jnp.floor(theta / (math.pi / margin))
  sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
  return sign * cos_m - 2.0 * k


def _large_margin_common(embeddings, weights, labels, margin, scale, weight_norms: bool):
  _check_logits_inputs(embeddings, weights, labels)
  _checks.positive_int(margin, "margin")
  _checks.scalar(scale, "scale", positive=True)
  cos = _cosine(embeddings, weights)
  if labels is not None:
    _label_out_of_range(labels, weights.shape[0])
    cos = _with_target_margin(cos, labels, lambda t: _multiplicative_margin(t, margin))
  mag = _norms(embeddings)[:, None]
  if weight_norms:
    mag = mag * _norms(weights)[None, :]
  return scale * mag * cos


def init_large_margin_softmax(key: jax.Array, num_classes: int, embedding_dim: int, *,
                              dtype=jnp.float32) -> dict:
  """Class weights for :func:`large_margin_softmax_loss`: standard normal
  ``[C, D]``.

  Args:
    key: a ``jax.random`` key.
    num_classes: C >= 1, the number of classes.
    embedding_dim: D >= 1, the embedding size.
    dtype: dtype of the weights (default float32; sampled in float32).

  Returns:
    ``{"weights": [num_classes, embedding_dim]}``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_large_margin_softmax(jax.random.key(0), 10, 4)
    >>> params["weights"].shape, params["weights"].dtype
    ((10, 4), dtype('float32'))
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> loss = mj.losses.large_margin_softmax_loss(emb, jnp.array([0, 1, 2, 3, 4, 5]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
  """
  return init_normalized_softmax(key, num_classes, embedding_dim, dtype=dtype)


def large_margin_softmax_logits(embeddings: jax.Array, weights: jax.Array,
                                labels: jax.Array | None = None, *, margin: int = 4,
                                scale: float = 1.0) -> jax.Array:
  """L-Softmax logits ``s ||w_j|| ||x_i|| cos(theta_ij)``, target
  ``s ||w_y|| ||x_i|| psi(theta_iy)``.

  Args:
    embeddings: [B, D] float (not normalised: the norm is part of the logit).
    weights: [C, D] float class weights.
    labels: optional [B] integer labels (None: no margin).
    margin: integer angular multiplier m >= 1.
    scale: s > 0.

  Returns:
    [B, C] float32 logits.

  References:
    See :func:`large_margin_softmax_loss`.

  Example:
    Unlike :func:`sphereface_logits`, the class weight norms scale the
    logits (``||w_0|| = 2``):

    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb, w = jnp.array([[1., 1.]]), jnp.array([[2., 0.], [0., 1.]])
    >>> [round(float(v), 4) for v in mj.losses.large_margin_softmax_logits(emb, w)[0]]
    [2.0, 1.0]
    >>> logits = mj.losses.large_margin_softmax_logits(emb, w, jnp.array([1]), margin=3)
    >>> [round(float(v), 4) for v in logits[0]]
    [2.0, -1.0]
  """
  return _large_margin_common(embeddings, weights, labels, margin, scale, True)


def large_margin_softmax_loss(embeddings: jax.Array, labels: jax.Array,
                              ref_embeddings: jax.Array | None = None,
                              ref_labels: jax.Array | None = None, *,
                              weights: jax.Array, margin: int = 4, scale: float = 1.0,
                              reduction: str = "mean", where: jax.Array | None = None,
                              ref_where: jax.Array | None = None) -> jax.Array:
  r"""Large-margin softmax (L-Softmax): multiplicative angular margin.

  ::

    f_ij = s ||w_j|| ||x_i|| cos(theta_ij)              (j != y_i)
    f_iy = s ||w_y|| ||x_i|| psi(theta_iy)
    psi(theta) = (-1)^k cos(m theta) - 2k,  theta in [k pi/m, (k+1) pi/m]
    l_i = cross_entropy(f_i, y_i)

  ``cos(m theta)`` uses the multiple-angle (Chebyshev) formula of the paper
  (eq. 7). Defaults (m = 4, s = 1, unnormalised embeddings and weights, mean
  over samples) reproduce PML's ``LargeMarginSoftmaxLoss()`` with
  ``weights = W.T``. The paper's annealing of the target logit with the
  plain softmax is not included (PML has none either).

  Args:
    embeddings: [B, D] float.
    labels: [B] integer class labels in ``[0, C)``.
    ref_embeddings: not supported (raises).
    ref_labels: not supported (raises).
    weights: [C, D] float class weights.
    margin: integer multiplier m >= 1 (1 = plain softmax on ``W x``).
    scale: s > 0.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional Neural
    Networks", ICML 2016, arXiv 1612.02295.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.2], [0.1, 1.]])
    >>> w = jnp.array([[1., 0.], [0., 1.]])
    >>> loss = mj.losses.large_margin_softmax_loss(emb, jnp.array([0, 1]), weights=w,
    ...                                            margin=2)
    >>> round(float(loss), 4)
    0.3676
  """
  return _classification_loss(
      "large_margin_softmax_loss",
      lambda x, lab: large_margin_softmax_logits(x, weights, lab, margin=margin, scale=scale),
      embeddings, labels, weights, where=where, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
      ref_where=ref_where, reduction=reduction)


def init_sphereface(key: jax.Array, num_classes: int, embedding_dim: int, *,
                    dtype=jnp.float32) -> dict:
  """Class weights for :func:`sphereface_loss`: standard normal ``[C, D]``.

  Args:
    key: a ``jax.random`` key.
    num_classes: C >= 1, the number of classes.
    embedding_dim: D >= 1, the embedding size.
    dtype: dtype of the weights (default float32; sampled in float32).

  Returns:
    ``{"weights": [num_classes, embedding_dim]}``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> params = mj.losses.init_sphereface(jax.random.key(0), 10, 4)
    >>> params["weights"].shape, params["weights"].dtype
    ((10, 4), dtype('float32'))
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> loss = mj.losses.sphereface_loss(emb, jnp.array([0, 1, 2, 3, 4, 5]), **params)
    >>> loss.shape, bool(jnp.isfinite(loss))
    ((), True)
  """
  return init_normalized_softmax(key, num_classes, embedding_dim, dtype=dtype)


def sphereface_logits(embeddings: jax.Array, weights: jax.Array,
                      labels: jax.Array | None = None, *, margin: int = 4,
                      scale: float = 1.0) -> jax.Array:
  """SphereFace logits ``s ||x_i|| cos(theta_ij)``, target
  ``s ||x_i|| psi(theta_iy)`` (class weights normalised).

  Args:
    embeddings: [B, D] float (the norm is part of the logit).
    weights: [C, D] float class weights (only their direction matters).
    labels: optional [B] integer labels (None: no margin).
    margin: integer angular multiplier m >= 1.
    scale: s > 0.

  Returns:
    [B, C] float32 logits.

  References:
    See :func:`sphereface_loss`.

  Example:
    ``x = (1, 1)`` is at 45 degrees from both classes and ``||x|| cos 45 = 1``;
    with m = 3 the target logit becomes ``||x|| cos 135 = -1``:

    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb, w = jnp.array([[1., 1.]]), jnp.array([[2., 0.], [0., 1.]])
    >>> [round(float(v), 4) for v in mj.losses.sphereface_logits(emb, w)[0]]
    [1.0, 1.0]
    >>> logits = mj.losses.sphereface_logits(emb, w, jnp.array([0]), margin=3)
    >>> [round(float(v), 4) for v in logits[0]]
    [-1.0, 1.0]
  """
  return _large_margin_common(embeddings, weights, labels, margin, scale, False)


def sphereface_loss(embeddings: jax.Array, labels: jax.Array,
                    ref_embeddings: jax.Array | None = None,
                    ref_labels: jax.Array | None = None, *,
                    weights: jax.Array, margin: int = 4, scale: float = 1.0,
                    reduction: str = "mean", where: jax.Array | None = None,
                    ref_where: jax.Array | None = None) -> jax.Array:
  r"""SphereFace (A-Softmax): L-Softmax with normalised class weights.

  ::

    f_ij = s ||x_i|| cos(theta_ij)  (j != y_i),   f_iy = s ||x_i|| psi(theta_iy)

  with ``psi`` of :func:`large_margin_softmax_loss`. Defaults (m = 4,
  s = 1, mean over samples) reproduce PML's ``SphereFaceLoss()`` with
  ``weights = W.T``; the paper's annealing schedule is not included.

  Args:
    embeddings: [B, D] float.
    labels: [B] integer class labels in ``[0, C)``.
    ref_embeddings: not supported (raises).
    ref_labels: not supported (raises).
    weights: [C, D] float class weights.
    margin: integer multiplier m >= 1.
    scale: s > 0.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ([B] terms).
    where: [B] bool validity of the rows.
    ref_where: not supported (raises).

  Returns:
    Scalar float32 loss, or [B] terms for ``reduction="none"``.

  References:
    Liu, Wen, Yu, Li, Raj, Song, "SphereFace: Deep Hypersphere Embedding for
    Face Recognition", CVPR 2017, arXiv 1704.08063.

  Example:
    >>> import jax.numpy as jnp, metric_jax as mj
    >>> emb = jnp.array([[1., 0.2], [0.1, 1.]])
    >>> w = jnp.array([[2., 0.], [0., 1.]])
    >>> loss = mj.losses.sphereface_loss(emb, jnp.array([0, 1]), weights=w, margin=2)
    >>> round(float(loss), 4)
    0.3676
  """
  return _classification_loss(
      "sphereface_loss",
      lambda x, lab: sphereface_logits(x, weights, lab, margin=margin, scale=scale),
      embeddings, labels, weights, where=where, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
      ref_where=ref_where, reduction=reduction)
