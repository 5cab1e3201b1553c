r"""Trains an embedding, evaluates it periodically and at the end.

Usage:
  python -m experiments.train --config=configs/digits.py --workdir=/tmp/digits_run
  python -m experiments.train --config=configs/digits.py:runlocal --workdir=/tmp/dbg
  python -m experiments.train --config=configs/digits_magnet.py --workdir=/tmp/digits_magnet
  python -m experiments.train --config=configs/digits_bregman.py --workdir=/tmp/digits_bregman
  python -m experiments.train --config=configs/cub200.py \
      --config.loss.kwargs.margin=0.1 --config.num_train_steps=20000 --workdir=DIR

Re-running with the same ``--workdir`` resumes from the latest checkpoint.
Multi-host: pass ``--coordinator_address=host:port --num_processes=N
--process_id=i`` on every host (or ``--coordinator_address=auto`` where JAX
can detect the cluster).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from metric_jax import sharding
from metric_jax.training import loop
from metric_jax.training import reporting

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, e.g. configs/digits.py[:runlocal].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: coordinator host:port, or 'auto'.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  logging.info("Config:\n%s", _CONFIG.value)
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
