"""Fixtures of the training tests: a shared compilation cache and one
uninterrupted reference run."""

from __future__ import annotations

import os

import jax
import pytest

from metric_jax.training import loop
from tests.training import common


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA compilation cache for this session, shared with the
  subprocess runs: every run of the same tiny config (reference, resumed,
  killed) compiles the same programs, which then compile once."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  old = {k: getattr(jax.config, k) for k in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  yield path
  for k, v in old.items():
    jax.config.update(k, v)
  for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
    os.environ.pop(k, None)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """An uninterrupted tiny digits run: (config, workdir, final metrics)."""
  workdir = tmp_path_factory.mktemp("reference")
  config = common.tiny_config(projection="pca")
  metrics = loop.train_and_evaluate(config, workdir)
  return config, workdir, metrics
