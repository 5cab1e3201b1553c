"""Training: train state, jitted sharded steps, the loop, orbax checkpoints,
logging, and the config that drives them.

Modules:

* :mod:`~metric_jax.training.state`: ``TrainState`` and its initialisation.
* :mod:`~metric_jax.training.optim`: optimisers and schedules from a config.
* :mod:`~metric_jax.training.steps`: the pure ``train_step`` and the
  embedding forward pass, jitted over the data mesh.
* :mod:`~metric_jax.training.checkpoint`: orbax ``CheckpointManager``
  wrapper, stored config, compatibility checks, atomic writes.
* :mod:`~metric_jax.training.reporting`: JSONL, TensorBoard, tables, plots.
* :mod:`~metric_jax.training.config`: config defaults and validation.
* :mod:`~metric_jax.training.objective`: ``config.loss`` with per-call
  inputs (sampler extras such as magnet cluster ids, a learned Bregman
  divergence whose generator trains with the model).
* :mod:`~metric_jax.training.loop`: ``train_and_evaluate(config, workdir)``,
  ``evaluate_checkpoint``, ``embed_checkpoint``.

Importing this package has no side effects (no devices touched).
"""

from metric_jax.training.checkpoint import Checkpointer
from metric_jax.training.config import base_config, validate
from metric_jax.training.loop import (embed_checkpoint, evaluate_checkpoint,
                                      evaluate_embeddings, setup, train_and_evaluate)
from metric_jax.training.optim import make_optimizer, make_schedule
from metric_jax.training.state import TrainState, init_train_state
from metric_jax.training.steps import (embed_source, jit_embed_fn, jit_train_step,
                                       make_embed_fn, make_train_step)

__all__ = [
    "Checkpointer",
    "TrainState",
    "base_config",
    "embed_checkpoint",
    "embed_source",
    "evaluate_checkpoint",
    "evaluate_embeddings",
    "init_train_state",
    "jit_embed_fn",
    "jit_train_step",
    "make_embed_fn",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "setup",
    "train_and_evaluate",
    "validate",
]
