"""Shared pytest setup: float32 matmuls at full precision, 8 fake CPU devices
for the multi-device tests and cheap XLA compilation (set before JAX
initialises)."""

import os

# Test time is mostly XLA compile time of small programs: skip the expensive
# LLVM passes (about 20% less CPU for the suite; results are unchanged, the
# tests compare at rtol >= 1e-5).
_TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8",
                   "--xla_backend_optimization_level=0",
                   "--xla_llvm_disable_expensive_passes=true")
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in _TEST_XLA_FLAGS:
  if _flag.split("=")[0] not in _flags:
    _flags = f"{_flags} {_flag}".strip()
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
