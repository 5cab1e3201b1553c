"""Optimisers and schedules against hand-written NumPy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metric_jax.training import optim


def _np_schedule(step, peak, total, schedule, warmup=0, end=0.0, bounds=(), decay=0.1):
  if step < warmup:
    return peak * step / warmup
  if schedule == "constant":
    return peak
  if schedule == "cosine":
    t = min(step - warmup, total - warmup) / (total - warmup)
    return peak * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t)))
  return peak * decay ** sum(step >= b for b in bounds)


@pytest.mark.parametrize("kw", [
    dict(schedule="constant"),
    dict(schedule="constant", warmup=10),
    dict(schedule="cosine"),
    dict(schedule="cosine", warmup=20, end=0.1),
    dict(schedule="step", bounds=(30, 70)),
    dict(schedule="step", warmup=10, bounds=(30, 70), decay=0.5),
])
def test_schedules_match_formulas(kw):
  sched = optim.make_schedule(
      0.5, 100, schedule=kw["schedule"], warmup_steps=kw.get("warmup", 0),
      end_lr_factor=kw.get("end", 0.0), step_boundaries=kw.get("bounds", ()),
      step_decay=kw.get("decay", 0.1))
  for step in [0, 1, 5, 9, 10, 11, 20, 29, 30, 31, 50, 69, 70, 99, 100, 120]:
    np.testing.assert_allclose(
        float(sched(step)),
        _np_schedule(step, 0.5, 100, kw["schedule"], kw.get("warmup", 0), kw.get("end", 0.0),
                     kw.get("bounds", ()), kw.get("decay", 0.1)),
        rtol=1e-5, atol=1e-7, err_msg=f"step {step}")


def test_schedule_errors():
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(1.0, 10, schedule="linear")
  with pytest.raises(ValueError, match="learning_rate"):
    optim.make_schedule(-1.0, 10)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule(1.0, 10, warmup_steps=-1)
  with pytest.raises(ValueError, match="optimizer `name`.*adamw, sgd, rmsprop"):
    optim.make_optimizer({"name": "adam", "learning_rate": 1.0}, 10)


def _tree():
  return {"model": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([1.0, 1.0])},
          "loss": {"t": {"proxies": jnp.array([[2.0, 0.0]])}}}


def _grads():
  return {"model": {"kernel": jnp.array([[0.1, 0.2], [-0.3, 0.4]]), "bias": jnp.array([0.5, -0.5])},
          "loss": {"t": {"proxies": jnp.array([[1.0, -1.0]])}}}


def _apply(tx, steps=1):
  params, grads = _tree(), _grads()
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return jax.tree.map(np.asarray, params)


def test_sgd_separate_learning_rate_and_decay_mask():
  tx, _ = optim.make_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.0,
                                "weight_decay": 0.01, "loss_learning_rate": 2.0,
                                "loss_weight_decay": 0.0}, 10)
  out = _apply(tx)
  p, g = _tree(), _grads()
  # Coupled weight decay on kernels (ndim > 1) only; biases are not decayed.
  np.testing.assert_allclose(out["model"]["kernel"],
                             np.asarray(p["model"]["kernel"]) - 0.1 * (
                                 np.asarray(g["model"]["kernel"])
                                 + 0.01 * np.asarray(p["model"]["kernel"])), rtol=1e-6)
  np.testing.assert_allclose(out["model"]["bias"],
                             np.asarray(p["model"]["bias"]) - 0.1 * np.asarray(g["model"]["bias"]),
                             rtol=1e-6)
  # Loss parameters at their own learning rate (and no decay).
  np.testing.assert_allclose(out["loss"]["t"]["proxies"],
                             np.asarray(p["loss"]["t"]["proxies"])
                             - 2.0 * np.asarray(g["loss"]["t"]["proxies"]), rtol=1e-6)


def test_sgd_momentum_and_nesterov():
  for nesterov in (False, True):
    tx, _ = optim.make_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9,
                                  "nesterov": nesterov}, 10)
    out = _apply(tx, steps=3)
    p = np.asarray(_tree()["model"]["bias"])
    g = np.asarray(_grads()["model"]["bias"])
    buf = np.zeros_like(p)
    for _ in range(3):   # PyTorch's SGD with a constant gradient
      buf = 0.9 * buf + g
      p = p - 0.1 * ((g + 0.9 * buf) if nesterov else buf)
    np.testing.assert_allclose(out["model"]["bias"], p, rtol=1e-6)


def test_rmsprop_matches_pytorch_semantics():
  tx, _ = optim.make_optimizer({"name": "rmsprop", "learning_rate": 0.01, "momentum": 0.9,
                                "rms_decay": 0.99, "eps": 1e-8, "weight_decay": 1e-4}, 10)
  out = _apply(tx, steps=3)
  p = np.asarray(_tree()["model"]["kernel"], np.float64)
  g0 = np.asarray(_grads()["model"]["kernel"], np.float64)
  sq = np.zeros_like(p)
  buf = np.zeros_like(p)
  for _ in range(3):   # torch.optim.RMSprop(alpha=0.99, eps=1e-8, momentum=0.9, wd=1e-4)
    g = g0 + 1e-4 * p
    sq = 0.99 * sq + 0.01 * g * g
    buf = 0.9 * buf + g / (np.sqrt(sq) + 1e-8)
    p = p - 0.01 * buf
  np.testing.assert_allclose(out["model"]["kernel"], p, rtol=1e-5)


def test_adamw_decoupled_decay():
  tx, _ = optim.make_optimizer({"name": "adamw", "learning_rate": 0.01,
                                "weight_decay": 0.1}, 10)
  out = _apply(tx)
  p = np.asarray(_tree()["model"]["kernel"])
  g = np.asarray(_grads()["model"]["kernel"])
  # First Adam step: m/(sqrt(v)+eps) = g/(|g|+eps) after bias correction.
  expected = p - 0.01 * (g / (np.abs(g) + 1e-8) + 0.1 * p)
  np.testing.assert_allclose(out["model"]["kernel"], expected, rtol=1e-5)
  b = np.asarray(_tree()["model"]["bias"])
  gb = np.asarray(_grads()["model"]["bias"])
  np.testing.assert_allclose(out["model"]["bias"], b - 0.01 * gb / (np.abs(gb) + 1e-8),
                             rtol=1e-5)


def test_grad_clipping():
  tx, _ = optim.make_optimizer({"name": "sgd", "learning_rate": 1.0, "momentum": 0.0,
                                "grad_clip_norm": 0.1}, 10)
  out = _apply(tx)
  g = _grads()
  norm = math.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(g)))
  np.testing.assert_allclose(out["model"]["bias"],
                             np.asarray(_tree()["model"]["bias"])
                             - np.asarray(g["model"]["bias"]) * 0.1 / norm, rtol=1e-5)


def test_schedules_are_returned_and_used():
  tx, scheds = optim.make_optimizer({"name": "sgd", "learning_rate": 1.0, "momentum": 0.0,
                                     "schedule": "step", "step_boundaries": (1,),
                                     "step_decay": 0.5, "loss_learning_rate": 4.0}, 10)
  assert float(scheds["model"](0)) == 1.0 and float(scheds["model"](1)) == 0.5
  assert float(scheds["loss"](0)) == 4.0 and float(scheds["loss"](1)) == 2.0
  out = _apply(tx, steps=2)
  np.testing.assert_allclose(out["loss"]["t"]["proxies"],
                             np.asarray(_tree()["loss"]["t"]["proxies"])
                             - (4.0 + 2.0) * np.asarray(_grads()["loss"]["t"]["proxies"]),
                             rtol=1e-6)
