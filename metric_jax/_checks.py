"""Trace-time input validation shared by every public function.

Every check raises ``ValueError`` or ``TypeError`` with a message that names
the argument, what was expected and what was received. The checks look only
at static properties (shapes, dtypes, Python values), so they run once at
trace time and cost nothing inside ``jax.jit``.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def embeddings(x: Any, name: str = "embeddings") -> None:
  """Checks a [N, D] floating-point array."""
  if x is None:
    raise ValueError(f"`{name}` must be a [N, D] float array, got None.")
  shape = _shape(x)
  if len(shape) != 2:
    raise ValueError(
        f"`{name}` must have rank 2 [N, D], got shape {shape} (rank {len(shape)}).")
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"`{name}` must be a floating-point array (float32, bfloat16, float16), got dtype {dtype}.")


def labels(y: Any, n: int, name: str = "labels") -> None:
  """Checks a [n] integer array."""
  if y is None:
    raise ValueError(f"`{name}` must be a [{n}] integer array, got None.")
  shape = _shape(y)
  if len(shape) != 1:
    raise ValueError(f"`{name}` must have rank 1 [N], got shape {shape}.")
  if shape[0] != n:
    raise ValueError(
        f"`{name}` must have length {n} to match the embeddings, got length {shape[0]}.")
  dtype = jnp.result_type(y)
  if not (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
    raise TypeError(f"`{name}` must be an integer array, got dtype {dtype}.")


def mask(m: Any, shape: tuple[int, ...], name: str) -> None:
  """Checks an optional boolean mask of an exact shape."""
  if m is None:
    return
  got = _shape(m)
  if got != tuple(shape):
    raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {got}.")
  dtype = jnp.result_type(m)
  if dtype != jnp.bool_:
    raise TypeError(f"`{name}` must be a boolean mask, got dtype {dtype}.")


def same_dim(x: Any, y: Any, x_name: str, y_name: str) -> None:
  """Checks that two [N, D] and [M, D] arrays share D."""
  dx, dy = _shape(x)[-1], _shape(y)[-1]
  if dx != dy:
    raise ValueError(
        f"`{x_name}` and `{y_name}` must have the same embedding size, got {dx} and {dy}.")


def choice(value: Any, choices: Iterable[Any], name: str) -> None:
  """Checks that ``value`` is one of ``choices``."""
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def scalar(value: Any, name: str, *, positive: bool = False,
           non_negative: bool = False) -> None:
  """Checks a scalar hyper-parameter (Python number or 0-d array).

  Sign constraints are checked only for concrete Python numbers, so traced
  hyper-parameters (e.g. under ``jax.vmap`` over margins) remain allowed.
  """
  shape = _shape(value)
  if shape != ():
    raise ValueError(f"`{name}` must be a scalar, got shape {shape}.")
  if isinstance(value, (int, float, np.number)):
    if positive and not value > 0:
      raise ValueError(f"`{name}` must be > 0, got {value}.")
    if non_negative and not value >= 0:
      raise ValueError(f"`{name}` must be >= 0, got {value}.")


def flag(value: Any, name: str, *, allow_none: bool = False) -> None:
  """Checks a static Python or NumPy bool (or None when ``allow_none``)."""
  if value is None and allow_none:
    return
  if not isinstance(value, (bool, np.bool_)):
    expected = "a bool or None" if allow_none else "a bool"
    raise TypeError(f"`{name}` must be {expected}, got {type(value).__name__} {value!r}.")


def positive_int(value: Any, name: str, *, minimum: int = 1) -> None:
  """Checks a static Python integer >= minimum."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"`{name}` must be a Python int, got {type(value).__name__} {value!r}.")
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
