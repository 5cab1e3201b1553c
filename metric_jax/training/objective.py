r"""The training objective: ``config.loss`` plus per-call inputs.

:class:`TrainObjective` is what the train state and the train step use in
place of a bare :class:`metric_jax.losses.Objective`. It adds two things
that depend on the step:

* **Per-batch extras from the sampler.** A sampler with
  ``batch_extras(step)`` (the magnet sampler gives ``{"cluster_ids": [B]}``)
  has them loaded with the batch (``batch["extras"]``, sharded over the data
  axis like the labels) and passed to the main loss term as keyword
  arguments. For ``magnet_loss`` the static ``num_clusters`` comes from the
  sampler, and :meth:`TrainObjective.feedback` returns the per-example
  losses and the batch variance (``magnet_loss(..., reduction="none",
  return_variance=True)`` on the same embeddings, outside the gradient),
  which the loop folds back into the sampler's cluster index.
* **A learned Bregman divergence** (``config.loss.distance = "bregman"``).
  The main term gets ``distance=D_phi`` (anchors first, references second:
  ``D[i, j] = D_phi(x_i, y_j)``, see :mod:`metric_jax.bregman`), rebuilt in
  every step from the generator parameters ``loss_params["bregman"]``
  (:func:`metric_jax.bregman.init_bregman`), so they are traced, receive
  gradients, train with the model (learning rate
  ``config.optimizer.loss_learning_rate``) and are checkpointed with the
  state. :meth:`TrainObjective.eval_metric` is the same divergence for
  retrieval (``config.eval.metric = "bregman"``).

``config.loss.bregman``::

  generator   "icnn" | "max_affine" | "soft_max_affine" | "mahalanobis" (learned)
              "squared_norm" | "half_squared_norm" (fixed, no parameters)
  kwargs      the generator module's attributes (hidden_features, eps,
              num_pieces, temperature) or ``rank`` for "mahalanobis"
  similarity  False: a distance (pair / triplet losses); True: the
              similarity ``-scale * D`` (N-pair, NT-Xent, SupCon)
  scale       the similarity's scale

Example:
  >>> import jax, jax.numpy as jnp
  >>> from metric_jax.training import config as config_lib, objective
  >>> c = config_lib.base_config()     # semi-hard triplet loss
  >>> c.loss.distance = "bregman"; c.loss.bregman.kwargs = {"hidden_features": (8,)}
  >>> obj = objective.TrainObjective(c)
  >>> params = obj.init_params(jax.random.key(0), num_classes=5, embedding_dim=4)
  >>> sorted(params), sorted(params["bregman"])
  (['bregman', 'triplet_margin_loss'], ['phi_params'])
  >>> emb = jax.random.normal(jax.random.key(1), (6, 4))
  >>> total, terms = obj(emb, jnp.array([0, 0, 1, 1, 2, 2]), params)
  >>> bool(jnp.isfinite(total))
  True
"""

from __future__ import annotations

__all__ = ["TrainObjective", "check_config", "BREGMAN_KEY", "DISTANCES", "FIXED_GENERATORS"]

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from metric_jax import bregman as bregman_lib
from metric_jax.training import config as config_lib

# Key of the generator parameters in ``TrainState.loss_params``.
BREGMAN_KEY = "bregman"
DISTANCES = ("default", "bregman")
FIXED_GENERATORS = {"squared_norm": bregman_lib.squared_norm,
                    "half_squared_norm": bregman_lib.half_squared_norm}
MAGNET_LOSS = "magnet_loss"


def _bregman_settings(config) -> tuple[str, dict]:
  b = config.loss.bregman
  kwargs = b.kwargs.to_dict() if hasattr(b.kwargs, "to_dict") else dict(b.kwargs)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return b.generator, kwargs


def check_config(config) -> None:
  """Checks ``config.loss.distance`` / ``loss.bregman`` / magnet settings;
  raises ``ValueError`` naming the field.

  Args:
    config: the run's config (reads ``loss``, ``sampler`` and
      ``eval.metric``).

  Raises:
    ValueError: for an unknown distance or generator, kwargs of a fixed
      generator, ``scale <= 0``, ``eval.metric = "bregman"`` without a
      Bregman loss, or a magnet loss without the magnet sampler.

  Example:
    >>> from metric_jax.training import config as config_lib
    >>> c = config_lib.base_config()
    >>> check_config(c)
    >>> c.loss.distance = "cosine"
    >>> check_config(c)
    Traceback (most recent call last):
    ...
    ValueError: `config.loss.distance` must be one of ('default', 'bregman'), got 'cosine'.
  """
  loss = config.loss
  if loss.distance not in DISTANCES:
    raise ValueError(f"`config.loss.distance` must be one of {DISTANCES}, "
                     f"got {loss.distance!r}.")
  valid_generators = tuple(bregman_lib.GENERATORS) + tuple(FIXED_GENERATORS)
  if loss.distance == "bregman":
    generator, kwargs = _bregman_settings(config)
    if generator not in valid_generators:
      raise ValueError(f"`config.loss.bregman.generator` must be one of {valid_generators}, "
                       f"got {generator!r}.")
    if generator in FIXED_GENERATORS and kwargs:
      raise ValueError(f"`config.loss.bregman.kwargs` must be empty for the fixed generator "
                       f"{generator!r}, got {sorted(kwargs)}.")
    if "distance" in loss.kwargs:
      raise ValueError("`config.loss.kwargs.distance` must not be set with "
                       "`config.loss.distance = 'bregman'`.")
    if not float(loss.bregman.scale) > 0:
      raise ValueError(f"`config.loss.bregman.scale` must be > 0, got {loss.bregman.scale}.")
    if BREGMAN_KEY in (loss.extra_terms or {}):
      raise ValueError(f"`config.loss.extra_terms` must not use the key {BREGMAN_KEY!r} "
                       f"(it holds the Bregman generator's parameters).")
  if config.eval.metric == "bregman" and loss.distance != "bregman":
    raise ValueError("`config.eval.metric = 'bregman'` needs `config.loss.distance = "
                     "'bregman'` (the learned divergence of the loss).")
  if loss.name == MAGNET_LOSS:
    if config.sampler.name != "magnet":
      raise ValueError(f"`config.loss.name = {MAGNET_LOSS!r}` needs `config.sampler.name = "
                       f"'magnet'` (the batch's cluster ids), got {config.sampler.name!r}.")
    if not config.sampler.refresh_every:
      raise ValueError("`config.sampler.refresh_every` must be > 0 for the magnet loss (the "
                       "cluster index is built and refreshed from the embeddings).")
    for field in ("num_clusters", "cluster_ids", "reduction", "return_variance"):
      if field in loss.kwargs:
        raise ValueError(f"`config.loss.kwargs.{field}` must not be set for the magnet loss: "
                         f"the training loop provides it.")


class TrainObjective:
  """``config.loss`` as ``(embeddings, labels, loss_params, *, where,
  extras) -> (total, terms)``, with the learned parameters of
  :meth:`init_params`.

  Args:
    config: the run's config (``loss``, ``sampler``).
    num_clusters: width of the magnet cluster ids (the sampler's
      ``num_clusters``); required for ``magnet_loss``, default None.

  Raises:
    ValueError: from :func:`check_config`, or when ``num_clusters`` is
      missing for the magnet loss.

  Example:
    (The module docstring calls an objective on a batch.)

    >>> import jax
    >>> from metric_jax.training import config as config_lib
    >>> c = config_lib.base_config()     # semi-hard triplet loss, no learned parameters
    >>> obj = TrainObjective(c)
    >>> params = obj.init_params(jax.random.key(0), num_classes=3, embedding_dim=2)
    >>> params, obj.keys, obj.learned_generator, obj.eval_metric(params)
    ({'triplet_margin_loss': {}}, ('triplet_margin_loss',), False, 'euclidean')
    >>> obj.feedback(jax.numpy.zeros((4, 2)), jax.numpy.array([0, 0, 1, 1]))   # not magnet
    {}
    >>> c.loss.name = "magnet_loss"; c.loss.kwargs = {}
    >>> c.sampler.name = "magnet"; c.sampler.refresh_every = 10
    >>> TrainObjective(c)
    Traceback (most recent call last):
    ...
    ValueError: `num_clusters` is required for the magnet loss (the sampler's `num_clusters`).
  """

  def __init__(self, config, *, num_clusters: int | None = None):
    check_config(config)
    from metric_jax import losses  # pylint: disable=import-outside-toplevel
    self.config = config
    self.base = config_lib.objective_from_config(config)
    loss_fn = getattr(losses, config.loss.name)
    self._call_kwargs: dict[str, Any] = {}

    def main(embeddings, labels, **kwargs):
      return loss_fn(embeddings, labels, **kwargs, **self._call_kwargs)

    # Same name as the loss: the objective finds the same init_<stem>.
    main.__name__ = config.loss.name
    self._with_call_kwargs = config_lib.objective_from_config(config, main_fn=main)
    self.is_magnet = config.loss.name == MAGNET_LOSS
    if self.is_magnet and num_clusters is None:
      raise ValueError("`num_clusters` is required for the magnet loss (the sampler's "
                       "`num_clusters`).")
    self.num_clusters = num_clusters
    self.distance_kind = config.loss.distance
    self.generator, self.generator_kwargs = (
        _bregman_settings(config) if self.distance_kind == "bregman" else (None, {}))

  @property
  def learned_generator(self) -> bool:
    """Whether the Bregman generator has parameters in ``loss_params``."""
    return self.distance_kind == "bregman" and self.generator not in FIXED_GENERATORS

  @property
  def keys(self) -> tuple[str, ...]:
    return self.base.keys

  def init_params(self, key: jax.Array, num_classes: int,
                  embedding_dim: int) -> dict[str, Any]:
    """The objective's learned parameters, plus ``"bregman": {"phi_params":
    ...}`` for a learned generator."""
    params = self.base.init_params(key, num_classes, embedding_dim)
    if self.learned_generator:
      params[BREGMAN_KEY] = bregman_lib.init_bregman(
          jax.random.fold_in(key, 1 << 20), num_classes, embedding_dim,
          generator=self.generator, **self.generator_kwargs)
    return params

  def distance(self, loss_params: Mapping[str, Any] | None):
    """The Bregman metric of ``loss_params`` (None for ``"default"``)."""
    if self.distance_kind != "bregman":
      return None
    b = self.config.loss.bregman
    if self.generator in FIXED_GENERATORS:
      phi = FIXED_GENERATORS[self.generator]
      if b.similarity:
        return bregman_lib.as_similarity(phi, float(b.scale))
      return bregman_lib.as_distance(phi)
    if not loss_params or BREGMAN_KEY not in loss_params:
      raise ValueError(f"`loss_params` lacks {BREGMAN_KEY!r} (the generator's parameters); "
                       f"build them with TrainObjective.init_params.")
    return bregman_lib.bregman_distance_from_params(
        loss_params[BREGMAN_KEY]["phi_params"], generator=self.generator,
        similarity=bool(b.similarity), scale=float(b.scale), **self.generator_kwargs)

  def eval_metric(self, loss_params):
    """The retrieval metric of ``config.eval.metric`` (``"bregman"``: the
    loss's divergence with ``loss_params``, anchors = queries)."""
    if self.config.eval.metric != "bregman":
      return self.config.eval.metric
    return self.distance(jax.device_get(loss_params))

  def _main_kwargs(self, loss_params, extras) -> dict[str, Any]:
    kw = dict(extras or {})
    if self.is_magnet:
      if "cluster_ids" not in kw:
        raise ValueError("the magnet loss needs the batch's `cluster_ids` in `extras` "
                         "(from the magnet sampler's batch_extras).")
      kw["num_clusters"] = self.num_clusters
    dist = self.distance(loss_params)
    if dist is not None:
      kw["distance"] = dist
    return kw

  def __call__(self, embeddings: jax.Array, labels: jax.Array,
               loss_params: Mapping[str, Any] | None = None, *,
               extras: Mapping[str, Any] | None = None, **common):
    kw = self._main_kwargs(loss_params, extras)
    if not kw:
      return self.base(embeddings, labels, loss_params, **common)
    # The per-call inputs (traced arrays, metrics of traced parameters) reach
    # the main term through its wrapper, for the duration of this call.
    self._call_kwargs = kw
    try:
      return self._with_call_kwargs(embeddings, labels, loss_params, **common)
    finally:
      self._call_kwargs = {}

  def feedback(self, embeddings: jax.Array, labels: jax.Array,
               loss_params: Mapping[str, Any] | None = None, *,
               extras: Mapping[str, Any] | None = None,
               where: jax.Array | None = None) -> dict[str, jax.Array]:
    """What the sampler learns from a step: for the magnet loss
    ``{"losses": [B] per-example loss, "variance": batch sigma^2}`` (no
    gradient), else ``{}``."""
    if not self.is_magnet:
      return {}
    from metric_jax import losses  # pylint: disable=import-outside-toplevel
    kw = self._main_kwargs(loss_params, extras)
    kw.update({k: v for k, v in self.config.loss.kwargs.to_dict().items()
               if k not in ("reduction",)})
    per_example, variance = losses.magnet_loss(
        jax.lax.stop_gradient(embeddings), labels, reduction="none", return_variance=True,
        where=where, **kw)
    return {"losses": per_example, "variance": jnp.asarray(variance, jnp.float32)}
