r"""Evaluates the latest checkpoint of a workdir on the test classes.

Usage:
  python -m experiments.evaluate --workdir=/tmp/digits_run
  python -m experiments.evaluate --config=configs/digits.py --workdir=/tmp/digits_run \
      --step=1000 --split=test

Without ``--config`` the config stored in the workdir is used. Prints the
metric table and writes ``eval_<split>_step_<N>.json`` to the workdir.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from metric_jax import sharding
from metric_jax.training import config as config_lib
from metric_jax.training import loop
from metric_jax.training import reporting

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (default: the workdir's config.json).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "test"], "Split to evaluate.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: coordinator host:port, or 'auto'.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  config = _CONFIG.value or config_lib.config_from_workdir(_WORKDIR.value)
  loop.evaluate_checkpoint(config, _WORKDIR.value, step=_STEP.value, split=_SPLIT.value)


if __name__ == "__main__":
  app.run(main)
