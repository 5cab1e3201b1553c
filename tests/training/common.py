"""Helpers of the training tests: tiny digits configs and checkpoint reads."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np

from configs import digits
from metric_jax.training import checkpoint as ckpt_lib
from metric_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Fields of the tiny test runs, also passed as --config.<field> overrides to
# the subprocess runs so that both build exactly the same run.
TINY = {
    "num_train_steps": 12,
    "checkpoint_every": 4,
    "keep_checkpoints": 10,
    "num_devices": 1,
    "projection": "none",
    "log_every": 2,
}


def tiny_config(**overrides):
  """digits.py:runlocal with TINY and ``overrides`` (dotted keys allowed as
  ``a__b``)."""
  config = digits.get_config("runlocal")
  for key, value in {**TINY, **overrides}.items():
    node, parts = config, key.split("__")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return config


def cli_overrides(**overrides) -> list[str]:
  return [f"--config.{k.replace('__', '.')}={v}" for k, v in {**TINY, **overrides}.items()]


def subprocess_env() -> dict:
  """The environment of the test process (8 fake devices, highest matmul
  precision, CPU) for subprocess runs, so results are bit-identical."""
  env = dict(os.environ)
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def launch(module: str, args: list[str], stdout=subprocess.PIPE) -> subprocess.Popen:
  """``python -m module args`` in the repository root (stdout+stderr to
  ``stdout``: a pipe, or a file for long runs so the pipe never fills)."""
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                          env=subprocess_env(), stdout=stdout,
                          stderr=subprocess.STDOUT, text=True)


def read_state(config, workdir, step=None):
  """The train state of ``workdir``'s checkpoint ``step`` (default latest)."""
  exp = loop.setup(config, workdir)
  checkpointer = ckpt_lib.Checkpointer(pathlib.Path(workdir) / ckpt_lib.CHECKPOINT_DIR)
  try:
    target = ckpt_lib.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    return checkpointer.restore(target, step)
  finally:
    checkpointer.close()


def assert_states_equal(a, b):
  la = jax.tree_util.tree_flatten_with_path(a)[0]
  lb = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


class FlatModel(nn.Module):
  """A user-defined model (flatten + Dense + BatchNorm): cheap to compile."""

  @nn.compact
  def __call__(self, x, train):
    x = x.reshape(x.shape[0], -1)
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
    return nn.Dense(8)(nn.relu(x))
