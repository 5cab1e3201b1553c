"""Shared pytest setup: float32 matmuls at full precision, 8 fake CPU devices
for the multi-device tests and cheap XLA compilation (set before JAX
initialises)."""

import os
import tempfile

# Test time is mostly XLA compile time of small programs: skip the expensive
# LLVM passes (about 20% less CPU for the suite; results are unchanged, the
# tests compare at rtol >= 1e-5).
CHEAP_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                       "--xla_llvm_disable_expensive_passes=true")
_TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8",) + CHEAP_COMPILE_FLAGS
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in _TEST_XLA_FLAGS:
  if _flag.split("=")[0] not in _flags:
    _flags = f"{_flags} {_flag}".strip()
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same XLA programs (in both pytest-xdist workers,
# and through fresh closures that miss JAX's in-memory cache): a persistent
# compilation cache, shared by the workers and their subprocesses, compiles
# each once (about 7% of the suite's time on a cold cache; a warm one, e.g.
# a second local run, saves much more). Entries are keyed by the program,
# the XLA flags and the JAX version. Set JAX_COMPILATION_CACHE_DIR to move it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "metric_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
