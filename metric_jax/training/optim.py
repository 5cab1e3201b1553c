"""Optimisers and learning-rate schedules from a config.

The optimiser acts on the trainable tree ``{"model": params, "loss":
loss_params}``; the two parts are partitioned (``optax.partition``) so that
loss parameters (proxies, centres, class weights, learnable beta) get their
own learning rate and weight decay, as the proxy-based papers prescribe
(e.g. Proxy-Anchor trains proxies with a 100x larger learning rate).

Schedules (``schedule=``), each after ``warmup_steps`` of linear warm-up
from 0 to the peak:

* ``"constant"``: the peak learning rate.
* ``"cosine"``: cosine decay to ``end_lr_factor * peak`` at the last step.
* ``"step"``: the peak multiplied by ``step_decay`` at each of
  ``step_boundaries`` (absolute step numbers).

Optimisers (``name=``): ``"adamw"`` (decoupled weight decay), ``"sgd"``
(momentum, optional Nesterov, coupled L2 weight decay as in PyTorch) and
``"rmsprop"`` (PyTorch semantics: ``decay``, ``eps`` outside the square root
and momentum; coupled weight decay; the Reality Check protocol uses it).
Weight decay applies to parameters with ``ndim > 1`` only (kernels, not
biases or normalisation scales).
"""

from __future__ import annotations

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_schedule", "make_optimizer"]

from typing import Any, Callable

import jax
import optax

OPTIMIZERS = ("adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "step")


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
  return default if value is None else value


def make_schedule(peak: float, total_steps: int, *, schedule: str = "constant",
                  warmup_steps: int = 0, end_lr_factor: float = 0.0,
                  step_boundaries=(), step_decay: float = 0.1) -> optax.Schedule:
  """A learning-rate schedule ``step -> lr``.

  Args:
    peak: learning rate after warm-up.
    total_steps: length of the run (the cosine reaches its end here).
    schedule: ``"constant"``, ``"cosine"`` or ``"step"``.
    warmup_steps: linear warm-up from 0 over this many steps.
    end_lr_factor: final learning rate of the cosine, as a fraction of peak.
    step_boundaries: absolute steps at which ``"step"`` multiplies by
      ``step_decay``.
    step_decay: the multiplier of ``"step"``.

  Returns:
    An optax schedule.

  Example:
    >>> from metric_jax.training import optim
    >>> s = optim.make_schedule(1.0, 100, schedule="cosine", warmup_steps=10)
    >>> [round(float(s(i)), 3) for i in (0, 5, 10, 55, 100)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")
  if peak < 0:
    raise ValueError(f"`learning_rate` must be >= 0, got {peak}.")
  if warmup_steps < 0:
    raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
  if total_steps < 1:
    raise ValueError(f"`num_train_steps` must be >= 1, got {total_steps}.")
  warmup_steps = min(int(warmup_steps), int(total_steps))
  rest = max(int(total_steps) - warmup_steps, 1)
  if schedule == "constant":
    main = optax.constant_schedule(peak)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, rest, alpha=end_lr_factor)
  else:
    bounds = sorted(int(b) - warmup_steps for b in step_boundaries)
    main = optax.piecewise_constant_schedule(
        peak, {b: step_decay for b in bounds if b > 0})
  if warmup_steps == 0:
    return main
  warm = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warm, main], [warmup_steps])


def _decay_mask(params):
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) > 1, params)


def _base_optimizer(name: str, lr: optax.Schedule, weight_decay: float,
                    cfg: Any) -> optax.GradientTransformation:
  if name == "adamw":
    return optax.adamw(lr, b1=_get(cfg, "b1", 0.9), b2=_get(cfg, "b2", 0.999),
                       eps=_get(cfg, "eps", 1e-8), weight_decay=weight_decay,
                       mask=_decay_mask)
  decay = optax.add_decayed_weights(weight_decay, mask=_decay_mask)
  if name == "sgd":
    momentum = _get(cfg, "momentum", 0.9)
    return optax.chain(decay, optax.sgd(lr, momentum=momentum or None,
                                        nesterov=bool(_get(cfg, "nesterov", False))))
  if name == "rmsprop":
    momentum = _get(cfg, "momentum", 0.0)
    return optax.chain(decay, optax.rmsprop(
        lr, decay=_get(cfg, "rms_decay", 0.99), eps=_get(cfg, "eps", 1e-8),
        eps_in_sqrt=False, momentum=momentum or None, bias_correction=False))
  raise ValueError(f"Unknown optimizer `name` {name!r}; valid names: {', '.join(OPTIMIZERS)}.")


def make_optimizer(cfg: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
  """The optimiser of ``{"model": ..., "loss": ...}`` and its schedules.

  Args:
    cfg: a config (ConfigDict or mapping) with ``name``, ``learning_rate``,
      ``weight_decay``, ``schedule``, ``warmup_steps`` and optionally
      ``end_lr_factor``, ``step_boundaries``, ``step_decay``, ``momentum``,
      ``nesterov``, ``b1``, ``b2``, ``eps``, ``rms_decay``,
      ``grad_clip_norm``, ``loss_learning_rate`` (default: the model's),
      ``loss_weight_decay`` (default 0).
    total_steps: number of training steps.

  Returns:
    ``(tx, {"model": schedule, "loss": schedule})``.

  Raises:
    ValueError: for an unknown optimiser or schedule name, or a negative
      learning rate / warm-up.

  Example:
    >>> import jax.numpy as jnp
    >>> from metric_jax.training import optim
    >>> cfg = {"name": "sgd", "learning_rate": 0.1, "loss_learning_rate": 10.0,
    ...        "weight_decay": 0.0, "momentum": 0.0}
    >>> tx, schedules = optim.make_optimizer(cfg, total_steps=100)
    >>> float(schedules["model"](0)), float(schedules["loss"](0))
    (0.1, 10.0)
    >>> params = {"model": {"w": jnp.ones(2)}, "loss": {"p": jnp.ones(2)}}
    >>> grads = {"model": {"w": jnp.ones(2)}, "loss": {"p": jnp.ones(2)}}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> [round(float(u), 6) for u in updates["model"]["w"]], updates["loss"]["p"].tolist()
    ([-0.1, -0.1], [-10.0, -10.0])
  """
  name = _get(cfg, "name")
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer `name` {name!r}; valid names: {', '.join(OPTIMIZERS)}.")
  lr = float(_get(cfg, "learning_rate"))
  loss_lr = float(_get(cfg, "loss_learning_rate", lr))
  sched_kw = dict(schedule=_get(cfg, "schedule", "constant"),
                  warmup_steps=int(_get(cfg, "warmup_steps", 0)),
                  end_lr_factor=float(_get(cfg, "end_lr_factor", 0.0)),
                  step_boundaries=tuple(_get(cfg, "step_boundaries", ())),
                  step_decay=float(_get(cfg, "step_decay", 0.1)))
  schedules = {"model": make_schedule(lr, total_steps, **sched_kw),
               "loss": make_schedule(loss_lr, total_steps, **sched_kw)}
  wd = float(_get(cfg, "weight_decay", 0.0))
  loss_wd = float(_get(cfg, "loss_weight_decay", 0.0))
  tx = optax.partition(
      {"model": _base_optimizer(name, schedules["model"], wd, cfg),
       "loss": _base_optimizer(name, schedules["loss"], loss_wd, cfg)},
      lambda tree: {k: jax.tree.map(lambda _: k, v) for k, v in tree.items()})
  clip = _get(cfg, "grad_clip_norm", 0.0)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
  return tx, schedules
