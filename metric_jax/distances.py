"""Pairwise distance and similarity matrices: [N, D] x [M, D] -> [N, M].

Every matrix is computed in float32 whatever the input dtype (bfloat16 and
float16 embeddings are upcast first), because distance differences near a
margin are too fine for an 8-bit mantissa and ``exp`` overflows float16.

Built-in metrics:

==================== ============ ==========================================
name                 kind         value
==================== ============ ==========================================
``"euclidean"``      distance     ``||x_i - y_j||_2`` (safe sqrt: gradient 0 at 0)
``"squared_euclidean"`` distance  ``||x_i - y_j||_2^2``
``"cosine"``         similarity   ``<x_i, y_j> / (||x_i|| ||y_j||)``
``"dot"``            similarity   ``<x_i, y_j>``
==================== ============ ==========================================

A callable ``fn(x, y) -> [N, M]`` is accepted wherever a metric name is; it
is treated as a distance unless it carries ``is_similarity = True``. Wrap a
function with :func:`custom` to say which it is (a learned Bregman divergence
from :mod:`metric_jax.bregman` is a distance, anchors first).

Example:
  >>> import jax.numpy as jnp, metric_jax as mj
  >>> x = jnp.array([[0., 0.], [3., 4.]])
  >>> mj.distances.pairwise(x)
  Array([[0., 5.],
         [5., 0.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Union

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from metric_jax import _checks

__all__ = ["METRIC_NAMES", "Metric", "MetricLike", "custom", "is_similarity", "l2_normalize",
           "paired", "pairwise", "safe_sqrt", "self_pairwise_for_symmetric_loss"]

_EPS = 1e-12
# Full f32 matmuls: accelerators otherwise default to reduced-precision
# passes (TF32 / bf16), which break distances near a margin.
_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Metric:
  """A callable pairwise metric that knows whether it is a similarity.

  Build one with :func:`custom`; calling it is calling ``fn``.

  Attributes:
    fn: ``fn(x [N, D], y [M, D]) -> [N, M]``.
    is_similarity: True if larger means more alike (cosine, dot), False
      (the default) for distances and divergences (larger means farther).
    name: a label for error messages and benchmarks (default ``"custom"``).

  Example:
    >>> import jax.numpy as jnp
    >>> m = Metric(lambda x, y: x @ y.T, is_similarity=True, name="dot")
    >>> m(jnp.array([[1., 2.]]), jnp.array([[3., 4.], [1., 0.]])).tolist()
    [[11.0, 1.0]]
  """
  fn: Callable[[jax.Array, jax.Array], jax.Array]
  is_similarity: bool = False
  name: str = "custom"

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    return self.fn(x, y)


MetricLike = Union[str, Callable[[jax.Array, jax.Array], jax.Array]]
"""A built-in metric name (:data:`METRIC_NAMES`) or a callable ``fn(x, y) -> [N, M]``."""


def custom(fn: Callable[[jax.Array, jax.Array], jax.Array], *,
           is_similarity: bool = False, name: str | None = None) -> Metric:
  """Wraps ``fn(x, y) -> [N, M]`` as a metric usable by every loss.

  Args:
    fn: pairwise function of ``x`` [N, D] (anchors) and ``y`` [M, D]
      (references), returning [N, M]; it receives float32 arrays.
    is_similarity: True if larger values mean more similar; default False
      (a distance or divergence).
    name: optional label; default ``fn.__name__`` (or ``"custom"``).

  Returns:
    A :class:`Metric`.

  Raises:
    TypeError: if ``fn`` is not callable.

  Example:
    >>> import jax.numpy as jnp
    >>> manhattan = custom(lambda x, y: jnp.abs(x[:, None] - y[None]).sum(-1),
    ...                    name="manhattan")
    >>> manhattan.name, is_similarity(manhattan)
    ('manhattan', False)
    >>> pairwise(jnp.array([[0., 0.], [1., 2.]]), metric=manhattan).tolist()
    [[0.0, 3.0], [3.0, 0.0]]
  """
  if not callable(fn):
    raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
  return Metric(fn, bool(is_similarity), name or getattr(fn, "__name__", "custom"))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = _EPS) -> jax.Array:
  """Divides by the L2 norm along ``axis``: ``x / max(||x||, eps)``.

  A zero vector stays zero (no NaN, finite gradient). The result has the
  input's dtype; the norm is accumulated in float32.

  Args:
    x: floating-point array of any shape.
    axis: the axis to normalise; default -1 (the last).
    eps: floor of the norm; default 1e-12.

  Returns:
    Array of the shape and dtype of ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> y = l2_normalize(jnp.array([[3., 4.], [0., 0.]]))
    >>> y.shape, jnp.linalg.norm(y, axis=-1).round(4).tolist()
    ((2, 2), [1.0, 0.0])
  """
  x32 = x.astype(jnp.float32)
  sq = jnp.sum(x32 * x32, axis=axis, keepdims=True)
  # rsqrt of a floored squared norm: finite value and gradient at zero.
  inv = jax.lax.rsqrt(jnp.maximum(sq, eps * eps))
  return (x32 * inv).astype(x.dtype)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(x)`` for ``x >= 0`` with a zero (not infinite) gradient at 0.

  Uses the double ``where`` so neither branch produces ``inf``; NaN inputs
  stay NaN. Non-positive entries give 0::

    safe_sqrt(x) = sqrt(x) if x > 0 else 0

  Args:
    x: floating-point array of any shape (squared distances).

  Returns:
    Array of the shape and dtype of ``x``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> safe_sqrt(jnp.array([0., 4.])).tolist()
    [0.0, 2.0]
    >>> float(jax.grad(safe_sqrt)(0.0))
    0.0
  """
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), x * 0.0)


def _transpose_unfolded(a: jax.Array, block: int = 8) -> jax.Array:
  """``a.T`` for an [R, C] array, written so that XLA keeps it a separate
  (cheap) transpose instead of folding it into a neighbouring matrix product.

  Folded into ``G^T @ x``, the transpose makes XLA:CPU contract over the
  rows of the large [B, M] operand, a path about twice as slow as the plain
  product; transposing the small [M, D] / [D, B] operands instead keeps
  every product in the fast layout. Exactly ``a.T``.
  """
  r, c = a.shape
  if r % block:
    return a.T
  return a.reshape(r // block, block, c).transpose(2, 0, 1).reshape(c, r)


@jax.custom_jvp
def _dot(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x @ y.T`` at full precision ([N, D] x [M, D] -> [N, M])."""
  return jnp.matmul(x, y.T, precision=_PRECISION)


@functools.partial(_dot.defjvp, symbolic_zeros=True)
def _dot_jvp(primals, tangents):
  # The tangent through y is x @ dy^T with dy^T transposed on its own: its
  # transpose (the reverse-mode product) is then (x^T G)^T with both
  # transposes on [D, M]-sized arrays, and the [N, M] cotangent G is read in
  # its natural layout. The tangent through x is the plain product.
  (x, y), (dx, dy) = primals, tangents
  value = _dot(x, y)
  tangent = jnp.zeros_like(value)
  if not isinstance(dx, SymbolicZero):
    tangent = jnp.matmul(dx, y.T, precision=_PRECISION)
  if not isinstance(dy, SymbolicZero):
    tangent = tangent + jnp.matmul(x, _transpose_unfolded(dy), precision=_PRECISION)
  return value, tangent


def _squared_euclidean(x: jax.Array, y: jax.Array, same: bool) -> jax.Array:
  x_sq = jnp.sum(x * x, axis=-1)
  y_sq = x_sq if same else jnp.sum(y * y, axis=-1)
  # The factor 2 scales the smaller operand, not the [N, M] product (the
  # same numbers: doubling is exact): XLA:CPU otherwise may write a whole
  # [N, M] matrix of 2s for its matrix-product fusion to read.
  if x.shape[0] <= y.shape[0]:
    twice_dot = _dot(2.0 * x, y)
  else:
    twice_dot = _dot(x, 2.0 * y)
  d2 = x_sq[:, None] + y_sq[None, :] - twice_dot
  d2 = jnp.maximum(d2, 0.0)
  if same:
    d2 = jnp.where(jnp.eye(d2.shape[0], dtype=bool), 0.0, d2)
  return d2


def _cosine(x: jax.Array, y: jax.Array, same: bool) -> jax.Array:
  xn = l2_normalize(x)
  yn = xn if same else l2_normalize(y)
  return _dot(xn, yn)


_BUILTIN = {
    "euclidean": (lambda x, y, same: safe_sqrt(_squared_euclidean(x, y, same)), False),
    "squared_euclidean": (_squared_euclidean, False),
    "cosine": (_cosine, True),
    "dot": (lambda x, y, same: _dot(x, y), True),
}

METRIC_NAMES = tuple(_BUILTIN)
"""Names of the built-in metrics: ``("euclidean", "squared_euclidean", "cosine", "dot")``."""


def _one_sided(name: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """The built-in ``name`` between ``x`` and a reference copy ``y`` of it,
  with the self-comparison's exact-zero Euclidean diagonal."""
  fn = _BUILTIN[name][0]
  matrix = fn(x, y, False)
  if name in ("euclidean", "squared_euclidean"):
    matrix = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, matrix)
  return matrix


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _self_pairwise_symmetric(x: jax.Array, name: str) -> jax.Array:
  return _BUILTIN[name][0](x, x, True)


@_self_pairwise_symmetric.defjvp
def _self_pairwise_symmetric_jvp(name, primals, tangents):
  # For a symmetric metric, d(x_i, x_j) = d(x_j, x_i), the tangent of the
  # matrix is T + T^T with T the tangent through the rows only. A caller
  # whose weights on the tangent are symmetric (C_ij = C_ji) sees the same
  # number from 2 T: <C, T + T^T> = <C, 2 T>. Transposed, 2 T gives the
  # gradient 2 C' x: one matrix product instead of two.
  # The value is the rows-only evaluation's (the same numbers), made of
  # plain operations, so that a derivative of the gradient (whose consumer
  # of the matrix is no longer symmetric) is exact.
  (x,), (dx,) = primals, tangents
  value, rows_tangent = jax.jvp(lambda a: _one_sided(name, a, x), (x,), (dx,))
  return value, 2.0 * rows_tangent


def self_pairwise_for_symmetric_loss(x: jax.Array, metric: str = "euclidean") -> jax.Array:
  """``pairwise(x, None, metric)`` for a loss that treats pairs symmetrically.

  Same values as :func:`pairwise`; the derivative is specialised: it is
  exact only for a consumer whose sensitivity to entry ``(i, j)`` equals its
  sensitivity to ``(j, i)`` (``dL/dM`` symmetric), e.g. a mean over all
  positive pairs and a mean over all negative pairs. Then the gradient costs
  one [B, B] x [B, D] product instead of two. Per-anchor normalisations
  (softmax over a row, hardest per row, a ``pair_mask`` or per-anchor
  weights) break the symmetry: use :func:`pairwise` for those.

  Args:
    x: [B, D] float array.
    metric: a built-in name (:data:`METRIC_NAMES`; all are symmetric).

  Returns:
    [B, B] float32 matrix, equal to ``pairwise(x, None, metric)``.

  Raises:
    ValueError / TypeError: on a wrong rank, dtype or an unknown metric name.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[0., 0.], [3., 4.], [1., 1.]])
    >>> loss = lambda f: (lambda e: jnp.sum(f(e) ** 2))
    >>> fast = jax.grad(loss(self_pairwise_for_symmetric_loss))(x)
    >>> slow = jax.grad(loss(pairwise))(x)
    >>> bool(jnp.allclose(fast, slow))
    True
  """
  _checks.embeddings(x, "x")
  _checks.choice(metric, METRIC_NAMES, "metric")
  return _self_pairwise_symmetric(x.astype(jnp.float32), metric)


def is_similarity(metric: MetricLike) -> bool:
  """True if larger values of ``metric`` mean more similar.

  Args:
    metric: a built-in name (:data:`METRIC_NAMES`) or a callable (see
      :func:`custom`); a callable without an ``is_similarity`` attribute is
      a distance.

  Returns:
    bool: True for ``"cosine"``, ``"dot"`` and similarity callables.

  Raises:
    ValueError / TypeError: on an unknown name or a non-callable.

  Example:
    >>> is_similarity("cosine"), is_similarity("euclidean")
    (True, False)
  """
  if isinstance(metric, str):
    _checks.choice(metric, METRIC_NAMES, "distance")
    return _BUILTIN[metric][1]
  if callable(metric):
    return bool(getattr(metric, "is_similarity", False))
  raise TypeError(
      f"`distance` must be one of {METRIC_NAMES} or a callable, got {type(metric).__name__}.")


def pairwise(x: jax.Array, y: jax.Array | None = None,
             metric: MetricLike = "euclidean") -> jax.Array:
  """Pairwise metric matrix between the rows of ``x`` and ``y``.

  Entry ``(i, j)`` compares row ``x_i`` with row ``y_j``::

    euclidean:          sqrt(max(||x_i||^2 + ||y_j||^2 - 2 <x_i, y_j>, 0))
    squared_euclidean:  max(||x_i||^2 + ||y_j||^2 - 2 <x_i, y_j>, 0)
    cosine:             <x_i, y_j> / (max(||x_i||, eps) max(||y_j||, eps))
    dot:                <x_i, y_j>

  Matrix products run at full float32 precision (``Precision.HIGHEST``).

  Args:
    x: [N, D] float array (f32, bf16 or f16).
    y: [M, D] float array, or None to compare ``x`` with itself. With
      ``y=None`` the Euclidean diagonal is exactly 0.
    metric: ``"euclidean"`` (default), ``"squared_euclidean"``, ``"cosine"``,
      ``"dot"`` or a callable ``fn(x, y) -> [N, M]`` (see :func:`custom`).

  Returns:
    [N, M] float32 matrix (M = N when ``y`` is None).

  Raises:
    ValueError / TypeError: on a wrong rank, dtype, embedding size or an
      unknown metric name.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1., 0.], [0., 2.]])
    >>> pairwise(x, jnp.array([[0., 0.], [1., 1.]]), "squared_euclidean").tolist()
    [[1.0, 1.0], [4.0, 2.0]]
    >>> pairwise(x, metric="cosine").tolist()
    [[1.0, 0.0], [0.0, 1.0]]
  """
  _checks.embeddings(x, "x")
  if y is not None:
    _checks.embeddings(y, "y")
    _checks.same_dim(x, y, "x", "y")
  same = y is None
  x32 = x.astype(jnp.float32)
  y32 = x32 if same else y.astype(jnp.float32)
  if isinstance(metric, str):
    _checks.choice(metric, METRIC_NAMES, "metric")
    return _BUILTIN[metric][0](x32, y32, same)
  if callable(metric):
    out = jnp.asarray(metric(x32, y32)).astype(jnp.float32)
    expected = (x.shape[0], y32.shape[0])
    if out.shape != expected:
      raise ValueError(
          f"custom `metric` must return shape {expected} for inputs {x.shape} and "
          f"{y32.shape}, got {out.shape}.")
    return out
  raise TypeError(
      f"`metric` must be one of {METRIC_NAMES} or a callable, got {type(metric).__name__}.")


def paired(x: jax.Array, y: jax.Array, metric: MetricLike = "euclidean") -> jax.Array:
  """The metric between matching rows: entry ``k`` compares ``x_k`` with ``y_k``.

  The diagonal of ``pairwise(x, y, metric)`` in O(N D) instead of O(N^2 D),
  for losses that first choose one reference per anchor (batch-hard mining)
  and then need only those distances, with their gradient. Each pair is
  evaluated by :func:`pairwise` itself (under ``vmap``), so the values come
  from the same formula as the matrix entries the choice was made on (they
  can differ in the last bits: the matrix product sums in another order).

  Args:
    x: [N, D] float array.
    y: [N, D] float array.
    metric: a built-in name or a callable ``fn(x, y) -> [N, M]``.

  Returns:
    [N] float32.

  Raises:
    ValueError / TypeError: on wrong ranks, unequal shapes or an unknown
      metric name.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0., 0.], [1., 1.]])
    >>> paired(x, jnp.array([[3., 4.], [1., 1.]])).tolist()
    [5.0, 0.0]
    >>> paired(x, jnp.array([[3., 4.], [2., 0.]]), "dot").tolist()
    [0.0, 2.0]
  """
  _checks.embeddings(x, "x")
  _checks.embeddings(y, "y")
  if x.shape != y.shape:
    raise ValueError(f"`x` and `y` must have the same shape, got {x.shape} and {y.shape}.")
  if isinstance(metric, str) and metric == "cosine":
    # The same formula (the dot of the normalised rows), normalised outside
    # the vmap: XLA:CPU reduces the vmapped [N, 1, D] blocks slowly (a
    # forward and backward at N = 512, D = 128: 0.48 -> 0.20 ms).
    x, y = l2_normalize(x.astype(jnp.float32)), l2_normalize(y.astype(jnp.float32))
    metric = "dot"
  # pairwise checks the metric (while tracing, before any pair is computed).
  return jax.vmap(lambda a, b: pairwise(a[None], b[None], metric)[0, 0])(x, y)
