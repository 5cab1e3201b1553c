"""Fixtures of the training tests: one uninterrupted reference run (the
persistent compilation cache of tests/conftest.py is shared with the
subprocess runs, so every run of the same tiny config compiles once)."""

from __future__ import annotations

import pytest

from metric_jax.training import loop
from tests.training import common


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """An uninterrupted tiny digits run: (config, workdir, final metrics)."""
  workdir = tmp_path_factory.mktemp("reference")
  config = common.tiny_config(projection="pca")
  metrics = loop.train_and_evaluate(config, workdir)
  return config, workdir, metrics
