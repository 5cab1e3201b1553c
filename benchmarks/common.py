"""Timing and memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import jax


def machine() -> str:
  """One line naming the machine the figures come from."""
  dev = jax.devices()[0]
  return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind})")


def median_seconds(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of ``fn()`` after warm-up; ``fn`` must block until done."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_peak_bytes(jitted, *args) -> int | None:
  """Peak buffer bytes XLA plans for a jitted call (arguments, outputs and
  temporaries), from the compiled executable's memory analysis."""
  try:
    stats = jitted.lower(*args).compile().memory_analysis()
  except Exception:  # pragma: no cover - backend without memory analysis
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def fmt_bytes(n: int | None) -> str:
  if n is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def fmt_ms(seconds: float | None) -> str:
  return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"
