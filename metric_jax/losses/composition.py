"""Weighted sums of named losses and regularisers, with their parameters.

An :class:`Objective` combines any public losses of :mod:`metric_jax.losses`
(and regularisers with the embedding-loss signature)::

  total = sum_t  w_t * loss_t(embeddings, labels, **kwargs_t, **params_t, **common)

and returns the total together with every (unweighted) term for logging.
Losses with learned parameters (proxies, centres, class weights, learnable
beta) get them from ``init_<stem>`` (the loss name without ``_loss``):
:meth:`Objective.init_params` builds ``{term_key: {kwarg: array}}``, a plain
pytree that the train state stores and the optimiser updates.

Example:
  >>> import jax, jax.numpy as jnp, metric_jax as mj
  >>> obj = mj.losses.make_objective([
  ...     mj.losses.LossTerm("contrastive_loss"),
  ...     mj.losses.LossTerm("triplet_margin_loss", weight=0.5,
  ...                        kwargs={"margin": 1.0})])
  >>> emb = jnp.array([[0., 0.], [0., 1.], [0.5, 0.]])
  >>> total, terms = obj(emb, jnp.array([0, 0, 1]), obj.init_params(
  ...     jax.random.key(0), num_classes=2, embedding_dim=2))
  >>> sorted(terms), round(float(total), 4)
  (['contrastive_loss', 'triplet_margin_loss'], 2.0955)
"""

from __future__ import annotations

__all__ = ["LossTerm", "Objective", "make_objective", "available_losses"]

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

# Arguments an objective forwards to every term (``Objective.__call__``).
COMMON_ARGS = ("ref_embeddings", "ref_labels", "where", "ref_where")


def _losses_module():
  # Imported lazily: this module is itself loaded while
  # ``metric_jax.losses`` collects its public names.
  return importlib.import_module("metric_jax.losses")


def _is_embedding_loss(fn: Any) -> bool:
  if not inspect.isfunction(fn):
    return False
  try:
    params = list(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return False
  return len(params) >= 2 and params[0] == "embeddings" and params[1] == "labels"


def available_losses() -> list[str]:
  """Names usable in a :class:`LossTerm`: every function of
  ``metric_jax.losses.__all__`` with the embedding-loss signature
  ``(embeddings, labels, ...)`` (losses and regularisers).

  Returns:
    The sorted list of names. ``init_<stem>`` helpers, logits functions and
    the composition API itself are not included.

  Example:
    >>> import metric_jax as mj
    >>> names = mj.losses.available_losses()
    >>> "triplet_margin_loss" in names, "init_proxy_anchor" in names
    (True, False)
    >>> names == sorted(names)
    True
  """
  mod = _losses_module()
  names = []
  for name in getattr(mod, "__all__", ()):
    if name in __all__ or name.startswith("init_"):
      continue
    if _is_embedding_loss(getattr(mod, name, None)):
      names.append(name)
  return sorted(names)


def _resolve(name: str | Callable) -> tuple[str, Callable, Callable | None]:
  """(display name, loss function, init function or None)."""
  mod = _losses_module()
  if callable(name):
    fn = name
    label = getattr(fn, "__name__", type(fn).__name__)
    stem = label[:-len("_loss")] if label.endswith("_loss") else label
    return label, fn, getattr(mod, f"init_{stem}", None) if hasattr(mod, label) else None
  if not isinstance(name, str):
    raise TypeError(f"`name` of a loss term must be a str or a callable, got {name!r}.")
  valid = available_losses()
  if name not in valid:
    raise ValueError(f"Unknown loss `name` {name!r}; valid names: {', '.join(valid)}.")
  stem = name[:-len("_loss")] if name.endswith("_loss") else name
  return name, getattr(mod, name), getattr(mod, f"init_{stem}", None)


def _accepted(fn: Callable) -> tuple[set[str], bool]:
  """Keyword names a function accepts, and whether it takes ``**kwargs``."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return set(), True
  names, var_kw = set(), False
  for p in sig.parameters.values():
    if p.kind is p.VAR_KEYWORD:
      var_kw = True
    elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
      names.add(p.name)
  return names, var_kw


@dataclasses.dataclass(frozen=True)
class LossTerm:
  """One weighted term of an objective.

  Attributes:
    name: a loss name from :func:`available_losses` (e.g.
      ``"triplet_margin_loss"``) or a callable with the embedding-loss
      signature.
    weight: its weight in the total.
    kwargs: hyper-parameters passed to the loss (``margin``, ``mining``...).
    init_kwargs: extra keyword arguments for its ``init_<stem>`` function.
    key: the term's name in the returned dict and in the parameter tree
      (default: ``name``); must be unique within an objective.
    learned: use the loss's ``init_<stem>`` parameters (default). With
      False the term gets no learned parameters and the loss uses ``kwargs``
      (e.g. a fixed ``beta`` for ``margin_loss``).

  Example:
    The same loss twice, once with a fixed and once with a learned ``beta``
    (per class, from ``init_margin``):

    >>> import jax, metric_jax as mj
    >>> fixed = mj.losses.LossTerm("margin_loss", kwargs={"beta": 1.2}, learned=False)
    >>> learned = mj.losses.LossTerm("margin_loss", key="margin_learned")
    >>> obj = mj.losses.make_objective([fixed, learned])
    >>> jax.tree.map(lambda a: a.shape, obj.init_params(jax.random.key(0), 3, 4))
    {'margin_learned': {'beta': (3,)}, 'margin_loss': {}}
  """
  name: Any
  weight: float = 1.0
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  init_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  key: str | None = None
  learned: bool = True


@dataclasses.dataclass(frozen=True)
class _Resolved:
  key: str
  fn: Callable
  init: Callable | None
  weight: float
  kwargs: dict
  init_kwargs: dict


class Objective:
  """A weighted sum of losses; build it with :func:`make_objective`.

  ``objective(embeddings, labels, loss_params, **common) -> (total, terms)``:

  * ``embeddings`` [B, D] float, ``labels`` [B] int;
  * ``loss_params``: ``{key: {kwarg: array}}`` from :meth:`init_params`
    (may be ``None`` when no term has learned parameters);
  * ``common``: ``ref_embeddings``, ``ref_labels``, ``where``, ``ref_where``
    forwarded to every term (``None`` values are not forwarded);
  * ``total``: float32 scalar ``sum_t weight_t * term_t``;
  * ``terms``: ``{key: float32 scalar}``, each term *unweighted*.

  Pure and jit-compatible; gradients flow to embeddings and parameters.

  Args:
    terms: the resolved terms; built by :func:`make_objective`, which
      validates names, weights and hyper-parameters (do not build them by
      hand).

  Example:
    >>> import jax, jax.numpy as jnp, metric_jax as mj
    >>> obj = mj.losses.make_objective([
    ...     "proxy_anchor_loss", mj.losses.LossTerm("contrastive_loss", weight=0.5)])
    >>> obj.keys, obj.has_params
    (('proxy_anchor_loss', 'contrastive_loss'), True)
    >>> params = obj.init_params(jax.random.key(0), num_classes=3, embedding_dim=4)
    >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
    >>> labels = jnp.array([0, 0, 1, 1, 2, 2])
    >>> total, terms = jax.jit(obj)(emb, labels, params)
    >>> bool(jnp.allclose(total, terms["proxy_anchor_loss"] + 0.5 * terms["contrastive_loss"]))
    True
    >>> grads = jax.grad(lambda p: obj(emb, labels, p)[0])(params)
    >>> grads["proxy_anchor_loss"]["proxies"].shape
    (3, 4)
  """

  def __init__(self, terms: Sequence[_Resolved]):
    self._terms = tuple(terms)

  @property
  def keys(self) -> tuple[str, ...]:
    """The terms' keys, in order."""
    return tuple(t.key for t in self._terms)

  @property
  def weights(self) -> dict[str, float]:
    """``{key: weight}`` of every term."""
    return {t.key: t.weight for t in self._terms}

  @property
  def has_params(self) -> bool:
    """Whether any term has learned parameters (an ``init_<stem>``)."""
    return any(t.init is not None for t in self._terms)

  def __repr__(self) -> str:
    inner = ", ".join(f"{t.weight:g}*{t.key}" for t in self._terms)
    return f"Objective({inner})"

  def init_params(self, key: jax.Array, num_classes: int,
                  embedding_dim: int) -> dict[str, dict[str, Any]]:
    """Learned parameters of every term: ``{key: init_<stem>(...)}``.

    Terms without an ``init_<stem>`` get ``{}``. Each term's key is the
    input key folded with the term's position.

    Args:
      key: a ``jax.random`` key.
      num_classes: number of training classes (labels in [0, num_classes)).
      embedding_dim: D.

    Returns:
      ``{term_key: dict of keyword arguments for that loss}``.
    """
    out = {}
    for i, t in enumerate(self._terms):
      if t.init is None:
        out[t.key] = {}
        continue
      params = t.init(jax.random.fold_in(key, i), num_classes, embedding_dim,
                      **t.init_kwargs)
      if not isinstance(params, Mapping):
        raise TypeError(
            f"init function of loss term {t.key!r} must return a dict of keyword "
            f"arguments, got {type(params).__name__}.")
      out[t.key] = dict(params)
    return out

  def __call__(self, embeddings: jax.Array, labels: jax.Array,
               loss_params: Mapping[str, Mapping[str, Any]] | None = None,
               **common) -> tuple[jax.Array, dict[str, jax.Array]]:
    unknown = set(common) - set(COMMON_ARGS)
    if unknown:
      raise TypeError(
          f"Objective got unexpected keyword arguments {sorted(unknown)}; "
          f"accepted: {list(COMMON_ARGS)}.")
    common = {k: v for k, v in common.items() if v is not None}
    loss_params = {} if loss_params is None else loss_params
    missing = [t.key for t in self._terms if t.init is not None and t.key not in loss_params]
    if missing:
      raise ValueError(
          f"`loss_params` lacks the learned parameters of {missing}; build them "
          f"with Objective.init_params(key, num_classes, embedding_dim).")
    total = jnp.zeros((), jnp.float32)
    values = {}
    for t in self._terms:
      params = dict(loss_params.get(t.key, {}))
      clash = sorted(set(params) & set(t.kwargs))
      if clash:
        raise ValueError(
            f"loss term {t.key!r}: {clash} are given both as hyper-parameters and as "
            f"learned parameters; drop them from `kwargs` (initial values go in "
            f"`init_kwargs`) or set `learned=False`.")
      value = t.fn(embeddings, labels, **common, **t.kwargs, **params)
      value = jnp.asarray(value, jnp.float32)
      if value.shape != ():
        raise ValueError(
            f"loss term {t.key!r} must return a scalar, got shape {value.shape} "
            f"(use a reducing `reduction`, not 'none').")
      values[t.key] = value
      total = total + t.weight * value
    return total, values


def _as_term(term: Any) -> LossTerm:
  if isinstance(term, LossTerm):
    return term
  if isinstance(term, str) or callable(term):
    return LossTerm(term)
  if isinstance(term, Mapping) or hasattr(term, "to_dict"):
    d = dict(term.to_dict() if hasattr(term, "to_dict") else term)
    allowed = {f.name for f in dataclasses.fields(LossTerm)}
    extra = set(d) - allowed
    if extra:
      raise ValueError(
          f"loss term {d.get('name')!r} has unknown fields {sorted(extra)}; "
          f"allowed: {sorted(allowed)}.")
    return LossTerm(**d)
  raise TypeError(
      f"each term must be a LossTerm, a loss name, a callable or a mapping, got {term!r}.")


def make_objective(terms: Sequence[Any]) -> Objective:
  """Builds an :class:`Objective` from loss terms.

  Args:
    terms: non-empty sequence of :class:`LossTerm`, loss names, callables or
      mappings with the fields of :class:`LossTerm` (e.g. a ConfigDict's
      ``to_dict()``).

  Returns:
    The objective. Raises ``ValueError`` for an unknown loss name (listing
    the valid ones), a hyper-parameter the loss does not accept, a duplicate
    key or a non-finite weight.

  Example:
    >>> import metric_jax as mj
    >>> mj.losses.make_objective(["contrastive_loss"])
    Objective(1*contrastive_loss)
  """
  if isinstance(terms, (str, LossTerm)) or callable(terms):
    terms = [terms]
  terms = [_as_term(t) for t in terms]
  if not terms:
    raise ValueError("`terms` must contain at least one loss term, got none.")
  resolved, seen = [], set()
  for t in terms:
    label, fn, init = _resolve(t.name)
    if not t.learned:
      init = None
    key = t.key or label
    if key in seen:
      raise ValueError(
          f"duplicate loss term key {key!r}; give repeated losses distinct `key`s.")
    seen.add(key)
    try:
      weight = float(t.weight)
    except (TypeError, ValueError):
      raise TypeError(f"`weight` of loss term {key!r} must be a number, got {t.weight!r}.")
    if not jnp.isfinite(weight):
      raise ValueError(f"`weight` of loss term {key!r} must be finite, got {weight}.")
    kwargs = dict(t.kwargs.to_dict() if hasattr(t.kwargs, "to_dict") else t.kwargs)
    names, var_kw = _accepted(fn)
    if not var_kw:
      bad = sorted(set(kwargs) - names)
      if bad:
        hyper = sorted(names - {"embeddings", "labels", *COMMON_ARGS})
        raise ValueError(
            f"loss term {key!r} does not accept {bad}; its hyper-parameters: {hyper}.")
      clash = sorted(set(kwargs) & set(COMMON_ARGS))
      if clash:
        raise ValueError(
            f"loss term {key!r}: {clash} are per-call arguments of the objective, "
            f"not hyper-parameters.")
    init_kwargs = dict(t.init_kwargs.to_dict() if hasattr(t.init_kwargs, "to_dict")
                       else t.init_kwargs)
    if init_kwargs and init is None:
      raise ValueError(
          f"loss term {key!r} has `init_kwargs` but the loss has no learned "
          f"parameters (no init function).")
    resolved.append(_Resolved(key, fn, init, weight, kwargs, init_kwargs))
  return Objective(resolved)
