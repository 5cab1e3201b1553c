r"""Learned convex generators ``phi: R^D -> R`` for Bregman divergences.

Each module maps ``x [..., D] -> [...]`` (one scalar per input vector), is
convex in ``x`` for **every** value of its parameters (convexity is built
into the parameterisation, not enforced by clipping after optimiser steps),
and is smooth where the divergence's gradient needs it. Use them through
:mod:`metric_jax.bregman`::

  icnn = ICNN(hidden_features=(64, 64))
  params = icnn.init(key, jnp.zeros((dim,)))
  dist = bregman.as_distance(lambda z: icnn.apply(params, z))

Their parameters train jointly with the embedding network (see
``bregman.init_bregman`` / ``bregman.bregman_distance_from_params``).

Modules:

* :class:`ICNN`: input-convex neural network (Amos, Xu, Kolter 2017), the
  generator of Neural Bregman Divergences (Lu, Raff, Ferraro, ICLR 2023).
* :class:`MaxAffine`: ``max_k a_k.x + b_k`` (PBDL, Siahkamari et al. 2020;
  Deep Divergence Learning, Cilingir et al. 2020). Piecewise linear: its
  Hessian is 0, so only the ``eps`` term is strictly convex and two points
  in one piece are ``eps/2 ||x - y||^2`` apart.
* :class:`SoftMaxAffine`: the smooth ``T * logsumexp((a_k.x + b_k) / T)``.

Every module adds ``eps/2 ||x||^2`` (strict convexity, so ``D_phi(x, y) >
0`` for ``x != y``). Computation is float32 (float64 under ``jax_enable_x64``
when the input is float64).

References:
  Amos, Xu, Kolter, "Input Convex Neural Networks", ICML 2017,
  arXiv 1609.07152.
  Lu, Raff, Ferraro, "Neural Bregman Divergences for Distance Learning",
  ICLR 2023, arXiv 2206.04763.
  Siahkamari, Xia, Saligrama, Castanon, Kulis, "Learning to Approximate a
  Bregman Divergence", NeurIPS 2020, arXiv 1905.11545.
  Cilingir, Manzelli, Kulis, "Deep Divergence Learning", ICML 2020,
  arXiv 2005.02612.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ICNN", "MaxAffine", "SoftMaxAffine", "NonNegativeDense"]


def _compute_dtype(x: jax.Array):
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`x` must be a floating-point array, got dtype {dtype}.")
  return jnp.promote_types(dtype, jnp.float32)


def _check_input(x) -> jax.Array:
  shape = tuple(np.shape(x))
  if len(shape) < 1:
    raise ValueError(f"`x` must have shape [..., D], got shape {shape}.")
  return jnp.asarray(x).astype(_compute_dtype(x))


def _check_eps(eps) -> None:
  if isinstance(eps, (int, float)) and not eps >= 0:
    raise ValueError(f"`eps` must be >= 0, got {eps}.")


def _inverse_softplus(v: float) -> float:
  return float(np.log(np.expm1(v)))


def _nonneg_init(noise: float = 0.5):
  """Raw kernel init: ``softplus(raw)`` has median ``1 / fan_in``."""

  def init(key, shape, dtype=jnp.float32):
    center = _inverse_softplus(1.0 / shape[0])
    return center + noise * jax.random.normal(key, shape, dtype)

  return init


class NonNegativeDense(nn.Module):
  """``z @ softplus(V)``: a linear map with non-negative weights, no bias.

  The weight ``W = softplus(V)`` is a reparameterisation, so every value of
  the raw parameter ``V`` gives ``W > 0`` and plain optimisers keep the
  network convex (no projection after each step).

  Attributes:
    features: output size.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metric_jax.models.convex import NonNegativeDense
    >>> layer = NonNegativeDense(features=3)
    >>> params = layer.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> params["params"]["raw_kernel"].shape
    (4, 3)
    >>> w = jax.nn.softplus(params["params"]["raw_kernel"])
    >>> bool((w > 0).all())
    True
    >>> bool(jnp.allclose(layer.apply(params, jnp.eye(4)), w))
    True
  """
  features: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    raw = self.param("raw_kernel", _nonneg_init(), (z.shape[-1], self.features),
                     jnp.float32)
    w = jax.nn.softplus(raw.astype(z.dtype))
    return jnp.matmul(z, w, precision=jax.lax.Precision.HIGHEST)


class ICNN(nn.Module):
  r"""Fully input-convex network, ``phi(x) [..., D] -> [...]``.

  ::

    z_1     = softplus(W^x_0 x + b_0)
    z_{k+1} = softplus(W^z_k z_k + W^x_k x + b_k),       W^z_k >= 0
    phi(x)  = w^z . z_L + w^x . x + b + eps/2 ||x||^2,   w^z >= 0

  ``softplus`` is convex and non-decreasing, a non-negative combination of
  convex functions is convex and the input skip connections ``W^x_k x`` are
  affine, so ``phi`` is convex in ``x`` for all parameters; ``eps > 0``
  makes it strictly convex. The non-negative weights are ``softplus`` of
  free parameters (:class:`NonNegativeDense`). softplus (not ReLU) gives
  the second derivatives the Bregman loss gradient needs.

  Attributes:
    hidden_features: widths of the hidden layers (at least one).
    eps: weight of the strongly convex term ``eps/2 ||x||^2`` (>= 0).

  References:
    Amos, Xu, Kolter, "Input Convex Neural Networks", ICML 2017,
    arXiv 1609.07152; Lu, Raff, Ferraro, "Neural Bregman Divergences for
    Distance Learning", ICLR 2023, arXiv 2206.04763.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metric_jax.models.convex import ICNN
    >>> icnn = ICNN(hidden_features=(8, 8))
    >>> params = icnn.init(jax.random.key(0), jnp.zeros(3))
    >>> icnn.apply(params, jnp.ones((5, 3))).shape
    (5,)
  """
  hidden_features: Sequence[int] = (64, 64)
  eps: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    widths = tuple(self.hidden_features)
    if not widths or not all(isinstance(w, (int, np.integer)) and w >= 1 for w in widths):
      raise ValueError(
          f"`hidden_features` must be a non-empty sequence of positive ints, got {self.hidden_features!r}.")
    _check_eps(self.eps)
    x = _check_input(x)
    z = None
    for k, width in enumerate(widths):
      h = nn.Dense(width, name=f"x_{k}")(x)
      if z is not None:
        h = h + NonNegativeDense(width, name=f"z_{k}")(z)
      z = jax.nn.softplus(h)
    out = nn.Dense(1, name="x_out")(x)[..., 0]
    out = out + NonNegativeDense(1, name="z_out")(z)[..., 0]
    return out + 0.5 * self.eps * jnp.sum(x * x, axis=-1)


class MaxAffine(nn.Module):
  r"""Max-affine generator ``phi(x) = max_k (a_k . x + b_k) + eps/2 ||x||^2``.

  A maximum of affine functions is convex. Its gradient is the slope of the
  active piece, ``a_{k*(x)}`` (ties: the average of the tied slopes, a
  valid subgradient), so ``D_phi(x, y) = phi(x) - a_{k*(y)} . x -
  b_{k*(y)}``. Pitfalls: the Hessian is 0, so the loss gradient does not
  flow through ``grad phi(y)``; points in the same piece are only
  ``eps/2 ||x - y||^2`` apart. Biases start slightly random so that the
  pieces do not all tie at the origin.

  Attributes:
    num_pieces: number of affine pieces K.
    eps: weight of ``eps/2 ||x||^2`` (>= 0).

  References:
    Siahkamari, Xia, Saligrama, Castanon, Kulis, "Learning to Approximate a
    Bregman Divergence", NeurIPS 2020, arXiv 1905.11545.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metric_jax.models.convex import MaxAffine
    >>> phi = MaxAffine(num_pieces=4)
    >>> params = phi.init(jax.random.key(0), jnp.zeros(3))
    >>> phi.apply(params, jnp.ones((2, 5, 3))).shape
    (2, 5)
  """
  num_pieces: int = 16
  eps: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not isinstance(self.num_pieces, (int, np.integer)) or self.num_pieces < 1:
      raise ValueError(f"`num_pieces` must be a positive int, got {self.num_pieces!r}.")
    _check_eps(self.eps)
    x = _check_input(x)
    pieces = nn.Dense(self.num_pieces, bias_init=nn.initializers.normal(0.01),
                      name="pieces")(x)
    return jnp.max(pieces, axis=-1) + 0.5 * self.eps * jnp.sum(x * x, axis=-1)


class SoftMaxAffine(nn.Module):
  r"""Smoothed max-affine ``phi(x) = T log sum_k exp((a_k . x + b_k) / T) + eps/2 ||x||^2``.

  Log-sum-exp of affine functions is convex and smooth (non-zero Hessian),
  and ``max_k(.) <= phi - eps/2 ||x||^2 <= max_k(.) + T log K``; as
  ``T -> 0`` it tends to :class:`MaxAffine`.

  Attributes:
    num_pieces: number of affine pieces K.
    temperature: T > 0 (fixed).
    eps: weight of ``eps/2 ||x||^2`` (>= 0).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metric_jax.models.convex import SoftMaxAffine
    >>> phi = SoftMaxAffine(num_pieces=4, temperature=0.5)
    >>> params = phi.init(jax.random.key(0), jnp.zeros(3))
    >>> phi.apply(params, jnp.ones(3)).shape
    ()
  """
  num_pieces: int = 16
  temperature: float = 1.0
  eps: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not isinstance(self.num_pieces, (int, np.integer)) or self.num_pieces < 1:
      raise ValueError(f"`num_pieces` must be a positive int, got {self.num_pieces!r}.")
    if isinstance(self.temperature, (int, float)) and not self.temperature > 0:
      raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
    _check_eps(self.eps)
    x = _check_input(x)
    pieces = nn.Dense(self.num_pieces, bias_init=nn.initializers.normal(0.01),
                      name="pieces")(x)
    t = self.temperature
    return (t * jax.nn.logsumexp(pieces / t, axis=-1)
            + 0.5 * self.eps * jnp.sum(x * x, axis=-1))
