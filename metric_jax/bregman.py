r"""Bregman divergences, fixed and learned, as distances for every loss.

For a strictly convex, differentiable generator ``phi: R^D -> R``::

  D_phi(x, y) = phi(x) - phi(y) - <grad phi(y), x - y>   >= 0,

zero iff ``x = y``, **asymmetric** (``D_phi(x, y) != D_phi(y, x)`` in general)
and without a triangle inequality. Convention everywhere in metric_jax:
**anchor first**, ``D[i, j] = D_phi(x_i, y_j)`` with ``x`` the anchors
(``embeddings``) and ``y`` the references (``ref_embeddings`` or the batch).

Batch matrices never evaluate ``phi`` ``N * M`` times: with ``g_j = grad
phi(y_j)``::

  D_ij = phi(x_i) - phi(y_j) - <g_j, x_i> + <g_j, y_j>,

i.e. ``N + M`` evaluations of ``phi`` (and ``M`` of its gradient) plus one
``[N, D] x [D, M]`` matrix product. Tiny negative values from cancellation
are clipped at 0 and, when a batch is compared with itself, the diagonal is
exactly 0. Everything is computed in float32.

Generators:

======================== ============================ =========================
generator                ``phi(x)``                   divergence
======================== ============================ =========================
:func:`squared_norm`     ``||x||^2``                  ``||x - y||^2``
:func:`half_squared_norm` ``||x||^2 / 2``             ``||x - y||^2 / 2``
:func:`mahalanobis`      ``x^T L L^T x``              ``(x-y)^T L L^T (x-y)``
:func:`negative_entropy` ``sum x_k log x_k``          generalised KL
:func:`itakura_saito`    ``-sum log x_k`` (Burg)      Itakura-Saito
``models.convex.ICNN``   input-convex network         learned
``models.convex.MaxAffine`` ``max_k a_k.x + b_k``     learned (piecewise)
``models.convex.SoftMaxAffine`` ``T LSE((a_k.x+b_k)/T)`` learned (smooth)
======================== ============================ =========================

Any callable ``phi(z [D]) -> scalar`` works (a plain function is taken to
be defined on all of ``R^D``). The loss gradient needs second derivatives
of ``phi`` (``grad phi(y_j)`` enters ``D``), so use smooth generators
(softplus, not ReLU, inside a network).

Plugging into a loss. Every pair/triplet loss accepts
``distance=as_distance(phi)``; similarity losses (N-pair, NT-Xent) take
``distance=as_similarity(phi, scale)``, i.e. logits ``-scale * D``. A learned
generator must be wrapped **inside** the differentiated function so that
its parameters are traced::

  def loss_fn(params, emb, labels):
    dist = as_distance(lambda z: icnn.apply(params, z))
    return mj.losses.triplet_margin_loss(emb, labels, distance=dist)

Pipelines that keep loss parameters next to the model use
:func:`init_bregman` (returns ``{"phi_params": ...}``) and
:func:`bregman_distance_from_params`.

References:
  Li, Liu, Zou, Ralescu, "Learning Empirical Bregman Divergence for
  Uncertain Distance Representation", FUSION 2023, arXiv 2304.07689 (the
  motivating paper; its parameterisation is not public, metric_jax follows
  the related work below and is not a reproduction of it).
  Bregman, "The relaxation method of finding the common point of convex
  sets...", USSR Comp. Math. Math. Phys. 1967.
  Siahkamari, Xia, Saligrama, Castanon, Kulis, "Learning to Approximate a
  Bregman Divergence", NeurIPS 2020, arXiv 1905.11545 (max-affine phi).
  Cilingir, Manzelli, Kulis, "Deep Divergence Learning", ICML 2020,
  arXiv 2005.02612.
  Lu, Raff, Ferraro, "Neural Bregman Divergences for Distance Learning",
  ICLR 2023, arXiv 2206.04763 (input-convex phi).

Example:
  >>> import jax.numpy as jnp, metric_jax.bregman as bregman
  >>> x = jnp.array([[0., 0.], [3., 4.]])
  >>> bregman.pairwise(bregman.squared_norm, x)
  Array([[ 0., 25.],
         [25.,  0.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import _checks
from metric_jax import distances as distances_lib

__all__ = [
    "Generator", "divergence", "pairwise", "as_distance", "as_similarity",
    "squared_norm", "half_squared_norm", "mahalanobis", "negative_entropy",
    "itakura_saito", "burg_entropy", "GENERATORS", "make_generator",
    "init_bregman", "bregman_distance_from_params",
]

_F32 = jnp.float32
_PRECISION = jax.lax.Precision.HIGHEST
DOMAINS = ("real", "positive", "nonnegative", "simplex")
# Tolerance of the host-side simplex check (rows must sum to 1).
_SIMPLEX_ATOL = 1e-3


@dataclasses.dataclass(frozen=True, eq=False)
class Generator:
  """A convex generator with its domain.

  Calling a ``Generator`` evaluates ``phi`` as is. :func:`divergence`,
  :func:`pairwise` and :func:`as_distance` additionally:

  1. apply ``input_map`` to both points (if any) and compute the divergence
     between the mapped points, ``D_phi(map(x), map(y))``;
  2. for a restricted ``domain`` without a map, check the inputs on the host
     when they are concrete (eager calls) and raise ``ValueError`` if they
     lie outside it; under ``jax.jit`` / ``vmap`` that check cannot run;
  3. clamp the points at ``floor`` (``"positive"``, ``"nonnegative"``,
     ``"simplex"`` domains), so traced out-of-domain entries, zero padding
     rows and underflowed softmax entries give large but finite values and
     finite gradients instead of ``inf``/NaN. NaN stays NaN.

  Attributes:
    fn: ``phi(z [..., D]) -> [...]``, convex on ``domain``.
    domain: ``"real"``, ``"positive"`` (all entries > 0),
      ``"nonnegative"`` (>= 0) or ``"simplex"`` (>= 0, rows sum to 1).
    input_map: optional ``map(z [..., D]) -> [..., D]`` into the domain.
    floor: clamp for restricted domains (0 disables).
    dim: required input size D, or None for any.
    name: label for error messages and benchmarks.

  Example:
    >>> import jax.numpy as jnp, metric_jax.bregman as bregman
    >>> phi = bregman.Generator(lambda z: jnp.sum(z ** 4, axis=-1), name="quartic")
    >>> float(phi(jnp.array([1., 2.])))
    17.0
    >>> float(bregman.divergence(phi, jnp.array([1., 0.]), jnp.zeros(2)))
    1.0
    >>> ent = bregman.Generator(lambda z: jnp.sum(z * jnp.log(z), axis=-1),
    ...                         domain="positive", name="entropy")
    >>> round(float(bregman.divergence(ent, jnp.array([2., 1.]), jnp.ones(2))), 4)
    0.3863
    >>> bregman.divergence(ent, jnp.array([-1., 1.]), jnp.ones(2))
    Traceback (most recent call last):
    ...
    ValueError: `x` must have strictly positive entries for the entropy generator ...
  """
  fn: Callable[[jax.Array], jax.Array]
  domain: str = "real"
  input_map: Callable[[jax.Array], jax.Array] | None = None
  floor: float = 0.0
  dim: int | None = None
  name: str = "generator"

  def __post_init__(self):
    if not callable(self.fn):
      raise TypeError(f"`fn` must be callable, got {type(self.fn).__name__}.")
    _checks.choice(self.domain, DOMAINS, "domain")
    if self.input_map is not None and not callable(self.input_map):
      raise TypeError(f"`input_map` must be callable or None, got {type(self.input_map).__name__}.")
    _checks.scalar(self.floor, "floor", non_negative=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fn(x)


PhiLike = Union[Generator, Callable[[jax.Array], jax.Array]]


# ----------------------------------------------------------------------------
# Fixed generators.


def _sum_sq(x):
  x = jnp.asarray(x)
  return jnp.sum(x * x, axis=-1)


def squared_norm(x: jax.Array) -> jax.Array:
  r"""``phi(x) = ||x||^2`` on ``R^D``: ``D_phi(x, y) = ||x - y||^2``.

  Squared-Euclidean contrastive and triplet losses are the special case
  ``distance=as_distance(squared_norm)``.

  Args:
    x: [..., D] float.

  Returns:
    [...] squared norms.

  Example:
    >>> import jax.numpy as jnp, metric_jax.bregman as bregman
    >>> float(bregman.divergence(bregman.squared_norm, jnp.array([3., 4.]), jnp.zeros(2)))
    25.0
  """
  return _sum_sq(x)


def half_squared_norm(x: jax.Array) -> jax.Array:
  r"""``phi(x) = ||x||^2 / 2`` on ``R^D``: ``D_phi(x, y) = ||x - y||^2 / 2``.

  Args:
    x: [..., D] float.

  Returns:
    [...] half squared norms.

  Example:
    >>> import jax.numpy as jnp, metric_jax.bregman as bregman
    >>> float(bregman.divergence(bregman.half_squared_norm, jnp.array([3., 4.]), jnp.zeros(2)))
    12.5
  """
  return 0.5 * _sum_sq(x)


def mahalanobis(L: jax.Array) -> Generator:
  r"""``phi(x) = x^T A x`` with ``A = L L^T`` (PSD), on ``R^D``.

  ``D_phi(x, y) = (x - y)^T A (x - y)``, the squared Mahalanobis distance
  (symmetric). A rank-deficient ``L`` gives a pseudo-distance (zero along
  the null space of ``L^T``). ``L`` may be a traced, learned parameter.

  Args:
    L: [D, K] float factor (K = D for a full-rank metric).

  Returns:
    A :class:`Generator` for inputs of size D.

  Example:
    >>> import jax.numpy as jnp, metric_jax.bregman as bregman
    >>> phi = bregman.mahalanobis(jnp.array([[2., 0.], [0., 1.]]))
    >>> float(bregman.divergence(phi, jnp.array([1., 1.]), jnp.zeros(2)))
    5.0
  """
  shape = tuple(np.shape(L))
  if len(shape) != 2:
    raise ValueError(f"`L` must be a [D, K] matrix, got shape {shape}.")
  if not jnp.issubdtype(jnp.result_type(L), jnp.floating):
    raise TypeError(f"`L` must be a floating-point array, got dtype {jnp.result_type(L)}.")
  L = jnp.asarray(L, _F32)

  def phi(x):
    z = jnp.matmul(x, L, precision=_PRECISION)
    return jnp.sum(z * z, axis=-1)

  return Generator(phi, dim=shape[0], name="mahalanobis")


def _softplus_map(x):
  return jax.nn.softplus(x)


_ENTROPY_MAPS = {"softmax": (lambda x: jax.nn.softmax(x, axis=-1), "simplex"),
                 "softplus": (_softplus_map, "nonnegative")}
_BURG_MAPS = {"softplus": _softplus_map, "exp": jnp.exp}


def _resolve_map(input_map, table, name):
  if input_map is None or callable(input_map):
    return input_map
  _checks.choice(input_map, tuple(table), name)
  return table[input_map]


def negative_entropy(input_map: str | Callable | None = None, *,
                     domain: str = "simplex", floor: float = 1e-12) -> Generator:
  r"""Negative entropy ``phi(p) = sum_k p_k log p_k``: the generalised KL.

  ``D_phi(p, q) = sum_k p_k log(p_k / q_k) - p_k + q_k``, which on the
  simplex is ``KL(p || q)``.

  Domain. Without a map the inputs must lie in ``domain``: ``"simplex"``
  (entries >= 0, each row sums to 1 within 1e-3) or ``"nonnegative"``
  (entries >= 0; the generalised KL between positive measures). Concrete
  inputs outside it raise ``ValueError``; traced ones are clamped at
  ``floor``. Embedding networks output real vectors: use a map,

  * ``input_map="softmax"``: ``KL(softmax(x) || softmax(y))``;
  * ``input_map="softplus"``: generalised KL of ``softplus(x)``,
    ``softplus(y)``;
  * or any callable into the domain (not checked).

  Entries are clamped at ``floor`` (default 1e-12): a zero entry of ``q``
  against a positive one of ``p`` gives a large finite value instead of
  ``inf``.

  Args:
    input_map: None, ``"softmax"``, ``"softplus"`` or a callable.
    domain: ``"simplex"`` or ``"nonnegative"`` (checked without a map).
    floor: clamp of the entries, >= 0.

  Returns:
    A :class:`Generator`.

  Example:
    >>> import jax.numpy as jnp, metric_jax.bregman as bregman
    >>> p, q = jnp.array([0.5, 0.5]), jnp.array([0.25, 0.75])
    >>> round(float(bregman.divergence(bregman.negative_entropy(), p, q)), 4)
    0.1438
  """
  _checks.choice(domain, ("simplex", "nonnegative"), "domain")
  if isinstance(input_map, str):
    fn_map = _resolve_map(input_map, {k: v[0] for k, v in _ENTROPY_MAPS.items()}, "input_map")
    domain = _ENTROPY_MAPS[input_map][1]
  else:
    fn_map = _resolve_map(input_map, {}, "input_map")

  def phi(p):
    return jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1)

  return Generator(phi, domain=domain, input_map=fn_map, floor=floor,
                   name="negative_entropy")


def itakura_saito(input_map: str | Callable | None = None, *,
                  floor: float = 1e-12) -> Generator:
  r"""Burg entropy ``phi(x) = -sum_k log x_k``: the Itakura-Saito divergence.

  ``D_phi(x, y) = sum_k x_k / y_k - log(x_k / y_k) - 1`` (scale invariant:
  ``D(c x, c y) = D(x, y)``).

  Domain: strictly positive entries. Concrete inputs with an entry <= 0
  raise ``ValueError``; traced ones are clamped at ``floor`` (default
  1e-12). For real-valued embeddings use a map:

  * ``input_map="softplus"``: ``D_phi(softplus(x), softplus(y))``;
  * ``input_map="exp"``: ``sum_k e^{x_k - y_k} - (x_k - y_k) - 1``;
  * or any callable into the positive orthant (not checked).

  Args:
    input_map: None, ``"softplus"``, ``"exp"`` or a callable.
    floor: clamp of the entries, >= 0.

  Returns:
    A :class:`Generator`.

  Example:
    >>> import jax.numpy as jnp, metric_jax.bregman as bregman
    >>> x, y = jnp.array([2., 1.]), jnp.array([1., 1.])
    >>> round(float(bregman.divergence(bregman.itakura_saito(), x, y)), 4)
    0.3069
  """
  fn_map = _resolve_map(input_map, _BURG_MAPS, "input_map")

  def phi(x):
    return -jnp.sum(jnp.log(x), axis=-1)

  return Generator(phi, domain="positive", input_map=fn_map, floor=floor,
                   name="itakura_saito")


burg_entropy = itakura_saito
"""Alias of :func:`itakura_saito` (the generator is Burg's entropy)."""


# ----------------------------------------------------------------------------
# Divergences.


def _meta(phi, attr: str, default):
  """A :class:`Generator` attribute, or its default for a plain callable."""
  return getattr(phi, attr) if isinstance(phi, Generator) else default


def _raw_fn(phi):
  return phi.fn if isinstance(phi, Generator) else phi


def _label(phi) -> str:
  if isinstance(phi, Generator):
    return phi.name
  return getattr(phi, "__name__", "phi")


def _check_phi(phi: Any) -> None:
  if not callable(phi):
    raise TypeError(
        f"`phi` must be a callable generator R^D -> R (a function, a Generator or "
        f"`lambda z: module.apply(params, z)`), got {type(phi).__name__}.")


def _check_phi_scalar(phi, d: int) -> None:
  """Traces ``phi`` once on a [D] vector and checks it returns a scalar."""
  try:
    out = jax.eval_shape(phi, jax.ShapeDtypeStruct((d,), _F32))
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(
        f"`phi` must map a [{d}] float32 vector to a scalar; calling it failed: {err}") from err
  shape = getattr(out, "shape", None)
  if shape != ():
    raise ValueError(
        f"`phi` must map a [{d}] vector to a scalar, got output shape {shape}.")


def _concrete(x) -> np.ndarray | None:
  """The value of ``x`` on the host, or None while it is traced."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def _check_domain(phi, x, name: str, exempt_zero_rows: bool = False) -> None:
  """Host check of a restricted domain, for concrete inputs without a map.

  NaN entries are ignored (they propagate to the result instead). With
  ``exempt_zero_rows`` rows that are exactly zero (the padding that
  ``pairs.prepare`` writes for ``where=False``) are skipped.
  """
  domain = _meta(phi, "domain", "real")
  if domain == "real" or _meta(phi, "input_map", None) is not None:
    return
  value = _concrete(x)
  if value is None:
    return
  value = np.asarray(value, np.float64).reshape(-1, value.shape[-1])
  if exempt_zero_rows:
    value = value[np.any(value != 0, axis=-1)]
  gen = _label(phi)
  with np.errstate(invalid="ignore"):
    if domain == "positive":
      bad = value <= 0
      if np.any(bad):
        raise ValueError(
            f"`{name}` must have strictly positive entries for the {gen} generator "
            f"(domain 'positive'), got min {np.nanmin(value):.4g}; pass input_map="
            "'softplus' or 'exp' for real-valued embeddings.")
    else:
      if np.any(value < 0):
        raise ValueError(
            f"`{name}` must have non-negative entries for the {gen} generator "
            f"(domain {domain!r}), got min {np.nanmin(value):.4g}; pass input_map="
            "'softmax' or 'softplus' for real-valued embeddings.")
      if domain == "simplex":
        sums = np.sum(value, axis=-1)
        off = np.abs(sums - 1.0) > _SIMPLEX_ATOL
        if np.any(off):
          raise ValueError(
              f"`{name}` rows must lie on the probability simplex (sum to 1) for the "
              f"{gen} generator, got row sums in [{np.nanmin(sums):.4g}, "
              f"{np.nanmax(sums):.4g}]; pass input_map='softmax', or "
              "domain='nonnegative' for the generalised KL.")


def _check_dim(phi, d: int, name: str) -> None:
  dim = _meta(phi, "dim", None)
  if dim is not None and d != dim:
    raise ValueError(
        f"`{name}` must have size {dim} in its last axis for the "
        f"{_label(phi)} generator, got {d}.")


def _points(phi, x: jax.Array) -> jax.Array:
  """float32 points in the generator's domain: mapped, then clamped."""
  x = jnp.asarray(x).astype(_F32)
  input_map = _meta(phi, "input_map", None)
  if input_map is not None:
    x = jnp.asarray(input_map(x)).astype(_F32)
  floor = float(_meta(phi, "floor", 0.0))
  if _meta(phi, "domain", "real") != "real" and floor > 0:
    x = jnp.maximum(x, floor)   # NaN propagates
  return x


def _value_and_grad(phi, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """phi and grad phi of every row of [N, D] (one evaluation each)."""
  fn = _raw_fn(phi)
  scalar = lambda z: jnp.asarray(fn(z)).astype(_F32)
  return jax.vmap(jax.value_and_grad(scalar))(x)


def _check_points(x, name: str, min_rank: int = 1) -> None:
  if x is None:
    raise ValueError(f"`{name}` must be a float array, got None.")
  shape = tuple(np.shape(x))
  if len(shape) < min_rank:
    raise ValueError(f"`{name}` must have rank >= {min_rank} [..., D], got shape {shape}.")
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"`{name}` must be a floating-point array (float32, bfloat16, float16), got dtype {dtype}.")


def divergence(phi: PhiLike, x: jax.Array, y: jax.Array) -> jax.Array:
  r"""Bregman divergence of single points (or of matched rows).

  ``D_phi(x, y) = phi(x) - phi(y) - <grad phi(y), x - y>``, clipped at 0,
  computed in float32 with the direct difference ``x - y`` (no
  cancellation through a matrix product). Leading axes broadcast, so
  ``divergence(phi, x [N, D], y [N, D])`` gives the N matched divergences.

  Args:
    phi: convex generator, ``phi(z [D]) -> scalar`` (a function, a
      :class:`Generator`, or ``lambda z: module.apply(params, z)``).
    x: [..., D] float, the first (anchor) argument.
    y: [..., D] float, the second (reference) argument, where the
      linearisation is taken.

  Returns:
    float32 array of the broadcast leading shape (a scalar for [D] inputs).

  Raises:
    TypeError / ValueError: ``phi`` not callable or not scalar-valued,
      non-float or rank-0 inputs, mismatched D, concrete inputs outside the
      generator's domain.

  Example:
    >>> import jax.numpy as jnp, metric_jax.bregman as bregman
    >>> phi = bregman.itakura_saito()
    >>> x, y = jnp.array([1., 2.]), jnp.array([2., 2.])
    >>> round(float(bregman.divergence(phi, x, y)), 4), round(float(bregman.divergence(phi, y, x)), 4)
    (0.1931, 0.3069)
  """
  _check_phi(phi)
  _check_points(x, "x")
  _check_points(y, "y")
  _checks.same_dim(x, y, "x", "y")
  d = np.shape(x)[-1]
  _check_dim(phi, d, "x")
  _check_phi_scalar(_raw_fn(phi), d)
  _check_domain(phi, x, "x")
  _check_domain(phi, y, "y")
  xp, yp = _points(phi, x), _points(phi, y)
  lead = jnp.broadcast_shapes(xp.shape[:-1], yp.shape[:-1])
  xp = jnp.broadcast_to(xp, lead + (d,)).reshape(-1, d)
  yp = jnp.broadcast_to(yp, lead + (d,)).reshape(-1, d)
  phi_x, _ = _value_and_grad(phi, xp)
  phi_y, g_y = _value_and_grad(phi, yp)
  out = phi_x - phi_y - jnp.sum(g_y * (xp - yp), axis=-1)
  return jnp.maximum(out, 0.0).reshape(lead)


def _pairwise(phi, x: jax.Array, y: jax.Array | None, *, exempt_zero_rows: bool) -> jax.Array:
  same = y is None or y is x
  _check_phi(phi)
  _checks.embeddings(x, "x")
  if not same:
    _checks.embeddings(y, "y")
    _checks.same_dim(x, y, "x", "y")
  d = x.shape[-1]
  _check_dim(phi, d, "x")
  _check_phi_scalar(_raw_fn(phi), d)
  _check_domain(phi, x, "x", exempt_zero_rows)
  xp = _points(phi, x)
  if same:
    yp = xp
    phi_x, g_y = _value_and_grad(phi, xp)
    phi_y = phi_x
  else:
    _check_domain(phi, y, "y", exempt_zero_rows)
    yp = _points(phi, y)
    phi_x, _ = _value_and_grad(phi, xp)
    phi_y, g_y = _value_and_grad(phi, yp)
  # c_j = <g_j, y_j> - phi(y_j): the linearisation's offset at y_j.
  offset = jnp.sum(g_y * yp, axis=-1) - phi_y
  cross = jnp.matmul(xp, g_y.T, precision=_PRECISION)
  out = (phi_x[:, None] - cross) + offset[None, :]
  out = jnp.maximum(out, 0.0)
  if same:
    out = jnp.where(jnp.eye(out.shape[0], dtype=bool), 0.0, out)
  return out


def pairwise(phi: PhiLike, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
  r"""Matrix of Bregman divergences, anchor first: ``D[i, j] = D_phi(x_i, y_j)``.

  ``D_ij = phi(x_i) - phi(y_j) - <g_j, x_i> + <g_j, y_j>``, ``g_j = grad
  phi(y_j)``: ``phi`` is evaluated once per row of ``x`` and of ``y`` (its
  gradient once per row of ``y``) and the cross term is one matrix product,
  O((N + M) cost(phi) + N M D). Clipped at 0; with ``y=None`` (or ``y is x``)
  the diagonal is exactly 0. float32 throughout.

  Args:
    phi: convex generator ``phi(z [D]) -> scalar`` (see :func:`divergence`).
    x: [N, D] float anchors (f32, bf16 or f16).
    y: [M, D] float references, or None for ``x`` itself.

  Returns:
    [N, M] float32 matrix (M = N when ``y`` is None).

  Raises:
    TypeError / ValueError: as :func:`divergence`, plus rank != 2.

  Example:
    >>> import jax.numpy as jnp, metric_jax.bregman as bregman
    >>> x = jnp.array([[1., 2.], [2., 2.]])
    >>> d = bregman.pairwise(bregman.itakura_saito(), x)
    >>> [[round(float(v), 4) for v in row] for row in d]
    [[0.0, 0.1931], [0.3069, 0.0]]
  """
  return _pairwise(phi, x, y, exempt_zero_rows=False)


def as_distance(phi: PhiLike, *, name: str | None = None) -> distances_lib.Metric:
  r"""Wraps a generator as a distance metric for every loss.

  ``as_distance(phi)(x, y)`` is :func:`pairwise` ``(phi, x, y)``, anchors
  (``embeddings``) first and references second: ``D[i, j] = D_phi(x_i,
  y_j)``. The result is a :class:`metric_jax.distances.Metric` with
  ``is_similarity=False``, so margins keep their distance meaning (e.g.
  ``[D(a, p) - D(a, n) + m]_+``).

  The eager domain check skips rows that are exactly zero: that is the
  padding ``pairs.prepare`` writes for ``where=False`` rows.

  For a learned generator, build the metric inside the function that is
  differentiated, so the gradient reaches the generator's parameters.

  Args:
    phi: convex generator (function, :class:`Generator`, or ``lambda z:
      module.apply(params, z)``).
    name: optional label (default ``"bregman_<phi name>"``).

  Returns:
    A :class:`metric_jax.distances.Metric`.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> import metric_jax.bregman as bregman
    >>> from metric_jax.models.convex import ICNN
    >>> emb = jax.random.normal(jax.random.key(0), (6, 3))
    >>> labels = jnp.array([0, 0, 1, 1, 2, 2])
    >>> icnn = ICNN(hidden_features=(8, 8))
    >>> params = icnn.init(jax.random.key(1), emb[0])
    >>> def loss_fn(params, emb):
    ...   dist = bregman.as_distance(lambda z: icnn.apply(params, z))
    ...   return mj.losses.triplet_margin_loss(emb, labels, margin=0.5, distance=dist)
    >>> loss, grads = jax.value_and_grad(loss_fn)(params, emb)
    >>> bool(loss > 0), all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    (True, True)
  """
  _check_phi(phi)

  def fn(x, y):
    return _pairwise(phi, x, y, exempt_zero_rows=True)

  label = name or f"bregman_{_label(phi)}"
  return distances_lib.custom(fn, is_similarity=False, name=label)


def as_similarity(phi: PhiLike, scale: float = 1.0, *,
                  name: str | None = None) -> distances_lib.Metric:
  r"""Wraps a generator as a similarity ``S[i, j] = -scale * D_phi(x_i, y_j)``.

  For similarity-based losses (N-pair, NT-Xent, SupCon, ...), which then
  use logits ``-scale * D / temperature``. Equivalent to
  ``mj.distances.custom(lambda x, y: -scale * pairwise(phi, x, y),
  is_similarity=True)``. Anchors first, as :func:`as_distance`.

  Args:
    phi: convex generator.
    scale: positive multiplier of the divergence (may be traced).
    name: optional label.

  Returns:
    A :class:`metric_jax.distances.Metric` with ``is_similarity=True``.

  Example:
    >>> import jax.numpy as jnp, metric_jax.bregman as bregman
    >>> sim = bregman.as_similarity(bregman.squared_norm, scale=0.5)
    >>> sim(jnp.array([[0., 0.]]), jnp.array([[1., 1.]]))
    Array([[-1.]], dtype=float32)
  """
  _check_phi(phi)
  _checks.scalar(scale, "scale", positive=True)

  def fn(x, y):
    return -scale * _pairwise(phi, x, y, exempt_zero_rows=True)

  label = name or f"bregman_sim_{_label(phi)}"
  return distances_lib.custom(fn, is_similarity=True, name=label)


# ----------------------------------------------------------------------------
# Learned generators as loss parameters (for training pipelines).

GENERATORS = ("icnn", "max_affine", "soft_max_affine", "mahalanobis")


def make_generator(generator: str = "icnn", **kwargs):
  """The Flax module of a learned generator.

  Args:
    generator: ``"icnn"``, ``"max_affine"`` or ``"soft_max_affine"``.
    **kwargs: the module's attributes (e.g. ``hidden_features=(64, 64)``,
      ``eps``, ``num_pieces``, ``temperature``).

  Returns:
    An unbound ``flax.linen.Module`` with ``__call__(x [..., D]) -> [...]``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax.bregman as bregman
    >>> phi = bregman.make_generator("max_affine", num_pieces=4)
    >>> type(phi).__name__
    'MaxAffine'
    >>> x = jnp.ones((5, 3))
    >>> params = phi.init(jax.random.key(0), x)
    >>> phi.apply(params, x).shape
    (5,)
  """
  from metric_jax.models import convex  # pylint: disable=import-outside-toplevel
  modules = {"icnn": convex.ICNN, "max_affine": convex.MaxAffine,
             "soft_max_affine": convex.SoftMaxAffine}
  _checks.choice(generator, tuple(modules), "generator")
  try:
    return modules[generator](**kwargs)
  except TypeError as err:
    raise TypeError(f"bad keyword arguments for generator {generator!r}: {err}") from err


def init_bregman(key: jax.Array, num_classes: int | None, embedding_dim: int, *,
                 generator: str = "icnn", rank: int | None = None,
                 **kwargs) -> dict[str, Any]:
  r"""Initial parameters of a learned Bregman generator, as loss parameters.

  The returned pytree trains with the embedding network (same optimiser):
  keep it next to the model's parameters and rebuild the distance in every
  step with :func:`bregman_distance_from_params`.

  Args:
    key: PRNG key.
    num_classes: unused (accepted so every ``init_<loss>(key, num_classes,
      dim)`` has one signature); may be None.
    embedding_dim: D, the embedding size.
    generator: one of :data:`GENERATORS`. ``"mahalanobis"`` learns ``L``
      [D, rank] (initialised to the identity when ``rank`` is None, so the
      divergence starts as the squared Euclidean distance).
    rank: columns of ``L`` for ``"mahalanobis"`` (random N(0, 1/rank) init).
    **kwargs: attributes of the generator's module (:func:`make_generator`).

  Returns:
    ``{"phi_params": params}``: the Flax variables of the module, or
    ``{"L": [D, rank]}`` for ``"mahalanobis"``.

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj, metric_jax.bregman as bregman
    >>> loss_params = bregman.init_bregman(jax.random.key(0), 10, 4, generator="icnn",
    ...                                    hidden_features=(16, 16))
    >>> def loss_fn(loss_params, emb, labels):
    ...   dist = bregman.bregman_distance_from_params(
    ...       loss_params["phi_params"], generator="icnn", hidden_features=(16, 16))
    ...   return mj.losses.contrastive_loss(emb, labels, distance=dist)
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> grads = jax.grad(loss_fn)(loss_params, emb, jnp.array([0, 0, 1, 1, 2, 2]))
    >>> jax.tree.structure(grads) == jax.tree.structure(loss_params)
    True
  """
  _checks.positive_int(embedding_dim, "embedding_dim")
  _checks.choice(generator, GENERATORS, "generator")
  if generator == "mahalanobis":
    if kwargs:
      raise TypeError(f"generator 'mahalanobis' takes only `rank`, got {sorted(kwargs)}.")
    if rank is None:
      factor = jnp.eye(embedding_dim, dtype=_F32)
    else:
      _checks.positive_int(rank, "rank")
      factor = jax.random.normal(key, (embedding_dim, rank), _F32) / np.sqrt(rank)
    return {"phi_params": {"L": factor}}
  if rank is not None:
    raise TypeError(f"`rank` applies only to generator 'mahalanobis', got generator {generator!r}.")
  module = make_generator(generator, **kwargs)
  # One compiled init instead of op-by-op dispatch of every layer.
  return {"phi_params": jax.jit(module.init)(key, jnp.zeros((embedding_dim,), _F32))}


def bregman_distance_from_params(phi_params: Any, *, generator: str = "icnn",
                                 similarity: bool = False, scale: float = 1.0,
                                 **kwargs) -> distances_lib.Metric:
  r"""The metric of a learned generator from its parameters.

  Call it inside the differentiated loss function (with the traced
  ``phi_params``) so that gradients reach the generator. ``generator`` and
  ``**kwargs`` must match those given to :func:`init_bregman`.

  Args:
    phi_params: ``init_bregman(...)["phi_params"]`` (possibly updated).
    generator: one of :data:`GENERATORS`.
    similarity: return :func:`as_similarity` (``-scale * D``) instead of
      :func:`as_distance`, for N-pair / NT-Xent style losses.
    scale: the similarity's scale (ignored for distances).
    **kwargs: attributes of the generator's module.

  Returns:
    A :class:`metric_jax.distances.Metric` (anchors first).

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax.bregman as bregman
    >>> p = bregman.init_bregman(jax.random.key(0), None, 2, generator="mahalanobis")
    >>> dist = bregman.bregman_distance_from_params(p["phi_params"], generator="mahalanobis")
    >>> dist(jnp.array([[0., 0.]]), jnp.array([[3., 4.]]))
    Array([[25.]], dtype=float32)
  """
  _checks.choice(generator, GENERATORS, "generator")
  if generator == "mahalanobis":
    if not isinstance(phi_params, dict) or "L" not in phi_params:
      raise ValueError(
          "`phi_params` for generator 'mahalanobis' must be a dict with key 'L', got "
          f"{type(phi_params).__name__}"
          f"{' with keys ' + str(sorted(phi_params)) if isinstance(phi_params, dict) else ''}.")
    if kwargs:
      raise TypeError(f"generator 'mahalanobis' takes no module arguments, got {sorted(kwargs)}.")
    phi = mahalanobis(phi_params["L"])
  else:
    module = make_generator(generator, **kwargs)
    phi = Generator(lambda z: module.apply(phi_params, z), name=generator)
  if similarity:
    return as_similarity(phi, scale, name=f"bregman_sim_{generator}")
  return as_distance(phi, name=f"bregman_{generator}")
