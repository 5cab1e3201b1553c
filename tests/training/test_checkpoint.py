"""Checkpoints: orbax round trips, compatibility checks, atomic writes, and
runs killed with SIGKILL (between steps and during a save) that resume to
exactly the parameters of an uninterrupted run."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import optax
import pytest

from metric_jax.training import checkpoint as ckpt_lib
from metric_jax.training import loop
from metric_jax.training import state as state_lib
from tests.training import common


def _state(scale=1.0, width=3):
  params = {"dense": {"kernel": jnp.full((2, width), scale), "bias": jnp.zeros(width)}}
  tx = optax.adamw(1e-3)
  return state_lib.TrainState(
      step=jnp.asarray(7, jnp.int32), params=params,
      batch_stats={"bn": {"mean": jnp.arange(width, dtype=jnp.float32)}},
      loss_params={"proxy_anchor_loss": {"proxies": jnp.ones((4, 2))}, "contrastive_loss": {}},
      opt_state=tx.init({"model": params, "loss": {}}))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def test_round_trip_keep_and_structure(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", max_to_keep=2)
  states = {s: _state(scale=float(s)) for s in (1, 2, 3)}
  for s, st in states.items():
    assert ck.save(s, st)
  assert not ck.save(3, states[3])          # an existing step is not rewritten
  ck.wait()
  assert ck.latest_step() == 3 and ck.all_steps() == [2, 3]
  restored = ck.restore(_abstract(states[3]))
  common.assert_states_equal(restored, states[3])
  common.assert_states_equal(ck.restore(_abstract(states[2]), 2), states[2])
  assert ck.stored_structure(3) == state_lib.describe(_abstract(states[3]))
  ck.close()
  reopened = ckpt_lib.Checkpointer(tmp_path / "ck")   # as a new process would
  assert reopened.latest_step() == 3
  assert reopened.stored_structure(3) == state_lib.describe(_abstract(states[3]))
  common.assert_states_equal(reopened.restore(_abstract(states[3])), states[3])
  reopened.close()


def test_check_compatible_lists_differences(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  ck.save(1, _state())
  ck.wait()
  stored = ck.stored_structure(1)
  ck.close()
  ckpt_lib.save_config(tmp_path, {"model": {"name": "convnet", "embedding_dim": 3},
                                  "num_train_steps": 10})
  same = {"model": {"name": "convnet", "embedding_dim": 3}, "num_train_steps": 20}
  diffs = ckpt_lib.check_compatible(tmp_path, same, _abstract(_state()), stored, 1)
  assert diffs == {"num_train_steps": (10, 20)}
  wider = {"model": {"name": "convnet", "embedding_dim": 5}, "num_train_steps": 10}
  with pytest.raises(ValueError) as info:
    ckpt_lib.check_compatible(tmp_path, wider, _abstract(_state(width=5)), stored, 1)
  message = str(info.value)
  assert "model.embedding_dim: checkpoint has 3, config has 5" in message
  assert "state params/dense/kernel: checkpoint ((2, 3), 'float32'), config ((2, 5), 'float32')" \
      in message
  assert "step 1" in message and "new --workdir" in message
  # Shapes that agree but a structural field that does not: still refused.
  renamed = {"model": {"name": "resnet18", "embedding_dim": 3}, "num_train_steps": 10}
  with pytest.raises(ValueError, match="model.name"):
    ckpt_lib.check_compatible(tmp_path, renamed, _abstract(_state()), stored, 1)
  # A missing leaf is named too.
  fewer = _state().replace(loss_params={"contrastive_loss": {}})
  with pytest.raises(ValueError, match="proxy_anchor_loss/proxies: in the checkpoint"):
    ckpt_lib.check_compatible(tmp_path, same, _abstract(fewer), stored, 1)


def test_config_round_trip(tmp_path):
  from configs import digits
  from metric_jax.training import config as config_lib
  config = digits.get_config("runlocal")
  ckpt_lib.save_config(tmp_path, config)
  again = config_lib.config_from_workdir(tmp_path)
  assert again.to_dict() == config.to_dict()
  assert ckpt_lib.config_differences(ckpt_lib.load_config(tmp_path), again) == {}
  with pytest.raises(FileNotFoundError, match="config.json"):
    config_lib.config_from_workdir(tmp_path / "nothing")


def test_atomic_write(tmp_path):
  path = tmp_path / "out" / "f.json"
  ckpt_lib.atomic_write_text(path, "old")
  assert path.read_text() == "old"
  assert oct(path.stat().st_mode & 0o777) == oct(0o644)
  with pytest.raises(TypeError):
    ckpt_lib.atomic_write_bytes(path, object())   # fails while writing
  assert path.read_text() == "old"
  assert os.listdir(path.parent) == ["f.json"]     # no temporary file left
  ckpt_lib.atomic_write_bytes(path, b"new")
  assert path.read_text() == "new" and os.listdir(path.parent) == ["f.json"]


# ----------------------------------------------------------- killed runs


def _steps_in(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  if not d.is_dir():
    return [], []
  names = os.listdir(d)
  final = sorted(int(n) for n in names if n.isdigit())
  tmp = [n for n in names if "tmp" in n]
  return final, tmp


def _kill_when(workdir, overrides, condition, timeout=900):
  """Starts ``experiments.train`` and SIGKILLs it once ``condition(final,
  tmp)`` holds for the checkpoint directory; returns what was there."""
  log = open(pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.log", "a")
  proc = common.launch("experiments.train", [
      "--config=configs/digits.py:runlocal", f"--workdir={workdir}",
      *common.cli_overrides(**overrides)], stdout=log)
  proc.log_path = log.name
  deadline = time.monotonic() + timeout
  try:
    while time.monotonic() < deadline:
      final, tmp = _steps_in(workdir)
      if condition(final, tmp):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return _steps_in(workdir), proc
      if proc.poll() is not None:
        return _steps_in(workdir), proc
      time.sleep(0.001)
    raise AssertionError("the run never reached the kill condition")
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()


def test_sigkill_between_steps_resumes_identically(reference_run, tmp_path):
  config, ref_dir, _ = reference_run
  # Evaluating after every step keeps the subprocess busy between steps.
  (final, tmp), proc = _kill_when(tmp_path, {"eval__every": 1},
                                  lambda final, tmp: 4 in final and not tmp)
  assert proc.returncode == -signal.SIGKILL, pathlib.Path(proc.log_path).read_text()
  assert final and max(final) < 12, final
  loop.train_and_evaluate(common.tiny_config(), tmp_path)
  common.assert_states_equal(common.read_state(config, tmp_path, 12),
                             common.read_state(config, ref_dir, 12))


def test_sigkill_during_a_save_leaves_a_restorable_workdir(reference_run, tmp_path):
  config, ref_dir, _ = reference_run
  # Saving after every step: the run spends most of its time inside saves.
  # Kill as soon as a temporary checkpoint directory appears; repeat (each
  # restart resumes) until a kill has caught a save in flight.
  caught = None
  for _ in range(5):
    (final, tmp), proc = _kill_when(tmp_path, {"checkpoint_every": 1},
                                    lambda final, tmp: bool(final) and bool(tmp))
    if proc.returncode == -signal.SIGKILL and tmp:
      caught = (final, tmp)
      break
  assert caught is not None, "no kill landed inside a save"
  final, tmp = caught
  assert all(n.endswith("orbax-checkpoint-tmp") or "tmp" in n for n in tmp)
  # The unfinished save is invisible: the latest step is the last finalised one.
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  assert ck.latest_step() == max(final)
  ck.close()
  loop.train_and_evaluate(common.tiny_config(checkpoint_every=1), tmp_path)
  done, leftover = _steps_in(tmp_path)
  assert not leftover and 12 in done
  common.assert_states_equal(common.read_state(config, tmp_path, 12),
                             common.read_state(config, ref_dir, 12))
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["checkpoint_every"] == 1
