"""Multi-process (multi-host) training on one machine: 2 processes x 2 fake
CPU devices, ``jax.distributed`` over 127.0.0.1 with gloo CPU collectives,
must give the same parameters after 3 train steps as 1 process x 4
devices, and an orbax checkpoint written by both processes must restore
identically. The processes run tests/multihost_worker.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import CHEAP_COMPILE_FLAGS

WORKER = pathlib.Path(__file__).resolve().parent / "multihost_worker.py"
# Generous: compile time dominates and CI machines may be loaded.
TIMEOUT_S = float(os.environ.get("METRIC_JAX_MULTIHOST_TIMEOUT", "600"))


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices_per_process: int) -> dict:
  env = dict(os.environ)
  # The tests' cheap-compilation flags, with this run's device count (both
  # runs compared here use the same flags).
  env["XLA_FLAGS"] = " ".join(
      (f"--xla_force_host_platform_device_count={devices_per_process}",)
      + CHEAP_COMPILE_FLAGS)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _start(out, num_processes, devices_per_process, coordinator=None, checkpoint=False):
  """Starts the workers; each writes its output to a log file (a pipe that
  nobody reads while another worker is awaited could fill up and block)."""
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, str(WORKER), "--out", str(out),
           "--num-processes", str(num_processes), "--process-id", str(i),
           "--devices-per-process", str(devices_per_process)]
    if coordinator:
      cmd += ["--coordinator", coordinator]
    if checkpoint:
      cmd.append("--checkpoint")
    log = open(out / f"log_{num_processes}_{i}.txt", "w+")  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(cmd, env=_env(devices_per_process), stdout=log,
                                   stderr=subprocess.STDOUT, text=True), log))
  return procs


def _wait(procs, timeout_s):
  """Waits for every worker under one overall deadline. A worker that fails
  makes the others of the run stop at once (they would otherwise wait for
  it in a collective until the deadline)."""
  deadline = time.monotonic() + timeout_s
  try:
    while any(p.poll() is None for p, _ in procs):
      if any(p.returncode not in (None, 0) for p, _ in procs):
        break
      if time.monotonic() > deadline:
        pytest.fail(f"multi-host workers did not finish within {timeout_s:.0f} s:\n"
                    + "\n".join(_tail(log) for _, log in procs))
      time.sleep(0.2)
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  results = [(p.returncode, _tail(log)) for p, log in procs]
  for _, log in procs:
    log.close()
  return results


def _tail(log, n=3000):
  log.flush()
  log.seek(0)
  return log.read()[-n:]


def test_two_processes_equal_one_process(tmp_path):
  coordinator = f"127.0.0.1:{_free_port()}"
  # The single-process reference and the 2-process run go concurrently.
  single = _start(tmp_path, 1, 4)
  multi = _start(tmp_path, 2, 2, coordinator=coordinator, checkpoint=True)
  results = _wait(multi + single, TIMEOUT_S)
  if any(rc == 3 for rc, _ in results):
    pytest.skip("gloo CPU collectives are unavailable in this jaxlib: "
                + next(o for rc, o in results if rc == 3).strip()[-200:])
  for rc, out in results:
    assert rc == 0, out[-3000:]

  one = np.load(tmp_path / "state_1.npz")
  two = np.load(tmp_path / "state_2.npz")
  assert sorted(one.files) == sorted(two.files)
  assert len(one.files) > 5
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], rtol=2e-4, atol=2e-5, err_msg=name)
  losses = one["losses"]
  assert losses.shape == (3,) and np.all(np.isfinite(losses)) and losses[0] > 0
  step = [n for n in one.files if n.endswith(".step")]
  assert step and int(one[step[0]]) == 3

  # Really 2 processes of 2 devices each (and 1 of 4), each of which saved
  # and restored the orbax checkpoint of the 2-process run.
  for i in range(2):
    report = json.loads((tmp_path / f"process_2_{i}.json").read_text())
    assert report == {"process_index": i, "process_count": 2, "local_devices": 2,
                      "devices": 4, "checkpoint_identical": True, "checkpoint_steps": [3]}
  report = json.loads((tmp_path / "process_1_0.json").read_text())
  assert report == {"process_index": 0, "process_count": 1, "local_devices": 4, "devices": 4}
