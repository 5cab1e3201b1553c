"""Streaming vs dense losses at large batch: peak memory and time.

    python benchmarks/scale.py                                   # B = 4096, every loss, both modes
    python benchmarks/scale.py --losses contrastive triplet_hard multi_similarity \\
        --batch 32768 --mode streaming --repeats 0               # the big case (CPU: minutes)
    python benchmarks/scale.py --batch 4096 16384 --dim 512      # e.g. on a GPU
    python benchmarks/scale.py --batch 32768 --compile-only     # XLA's planned peak only
    python benchmarks/scale.py --list

Every (loss, batch, mode) runs in a fresh subprocess, so its peak resident
memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes the
~0.3 GiB of the Python/JAX runtime) is its own. Each case times
``jax.jit(jax.value_and_grad(loss))`` on L2-normalised Gaussian embeddings
of a PK batch (4 samples per class): the first call (compile + run), then
the median of ``--repeats`` calls (wall time) and the process CPU time per
call (all threads; steadier than wall time on a shared machine), and the
first call's wall and CPU time (with ``--repeats 0`` the only figures: at
B = 32,768 on a CPU compilation is a small part of them). Also printed:
the accelerator's peak memory when the backend reports it
(``Device.memory_stats()``, GPU/TPU), and XLA's planned peak (arguments +
outputs + temporaries of the compiled executable).

Bandwidth (dense only): a dense loss writes the [B, B] float32 matrix and
reads it back in the forward pass and writes and reads its cotangent in
the backward pass, so it moves at least ``16 B^2`` bytes; ``GB/s`` is that
figure divided by the step time, a lower bound on the achieved memory
bandwidth to compare with the device's peak (e.g. H100 SXM ~3.35 TB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

K_PER_CLASS = 4


def _registry():
  """name -> (streaming fn, dense fn); both ``fn(emb, labels, tile)``."""
  import metric_jax as mj  # pylint: disable=import-outside-toplevel
  from metric_jax import streaming as st  # pylint: disable=import-outside-toplevel
  L = mj.losses
  p = K_PER_CLASS - 1

  def pair(s_fn, d_fn, **kw):
    return (lambda e, l, t: s_fn(e, l, tile_size=t, **kw),
            lambda e, l, t: d_fn(e, l, **kw))

  def triplet(**kw):
    return pair(st.streaming_triplet_margin_loss, L.triplet_margin_loss, **kw)

  return {
      "contrastive": pair(st.streaming_contrastive_loss, L.contrastive_loss),
      "triplet_hard": triplet(mining="hard"),
      "triplet_all": triplet(mining="all", max_positives=p),
      "triplet_semihard": triplet(mining="semihard", max_positives=p),
      "lifted": pair(st.streaming_lifted_structure_loss, L.lifted_structure_loss),
      "generalized_lifted": pair(st.streaming_generalized_lifted_structure_loss,
                                 L.generalized_lifted_structure_loss),
      "multi_similarity": pair(st.streaming_multi_similarity_loss, L.multi_similarity_loss),
      "circle": pair(st.streaming_circle_loss, L.circle_loss),
      "ntxent": pair(st.streaming_ntxent_loss, L.ntxent_loss),
      "supcon": pair(st.streaming_supcon_loss, L.supcon_loss),
      "npair": pair(st.streaming_npair_loss, L.npair_loss),
  }


LOSSES = ("contrastive", "triplet_hard", "triplet_all", "triplet_semihard", "lifted",
          "generalized_lifted", "multi_similarity", "circle", "ntxent", "supcon", "npair")


def _device_line() -> str:
  import jax  # pylint: disable=import-outside-toplevel
  devs = jax.devices()
  d = devs[0]
  return (f"{len(devs)} x {d.platform} ({d.device_kind}), JAX {jax.__version__}, "
          f"{os.cpu_count()} CPU cores")


def worker(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import metric_jax as mj  # pylint: disable=import-outside-toplevel
  from benchmarks import common  # pylint: disable=import-outside-toplevel

  s_fn, d_fn = _registry()[args.loss]
  fn = s_fn if args.mode == "streaming" else d_fn
  b, d = args.batch, args.dim
  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.normal(size=(b, d)).astype(np.float32))
  labels = jnp.asarray(np.repeat(np.arange(b // K_PER_CLASS + 1), K_PER_CLASS)[:b]
                       .astype(np.int32))

  def loss(e):
    return fn(mj.distances.l2_normalize(e), labels, args.tile)

  step = jax.jit(jax.value_and_grad(loss))
  planned = common.compiled_peak_bytes(step, emb)
  if args.compile_only:
    return {"loss": args.loss, "mode": args.mode, "batch": b, "dim": d, "tile": args.tile,
            "planned": planned, "device": _device_line()}
  start, cpu0 = time.perf_counter(), time.process_time()
  value, grad = jax.block_until_ready(step(emb))
  first = time.perf_counter() - start
  first_cpu = time.process_time() - cpu0
  seconds = cpu = None
  if args.repeats > 0:
    cpu0 = time.process_time()
    seconds = common.median_seconds(lambda: jax.block_until_ready(step(emb)),
                                    repeats=args.repeats, warmup=0)
    cpu = (time.process_time() - cpu0) / args.repeats
  device_peak = None
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if stats:
    device_peak = stats.get("peak_bytes_in_use")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
  return {"loss": args.loss, "mode": args.mode, "batch": b, "dim": d,
          "tile": args.tile, "value": float(value),
          "grad_finite": bool(np.all(np.isfinite(np.asarray(grad)))),
          "first_s": first, "first_cpu_s": first_cpu, "step_s": seconds, "cpu_s": cpu,
          "rss": rss, "device_peak": device_peak,
          "planned": planned, "device": _device_line()}


def _run_case(loss, batch, mode, args) -> dict:
  cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--loss", loss,
         "--batch", str(batch), "--dim", str(args.dim), "--mode", mode,
         "--repeats", str(args.repeats)]
  if args.tile:
    cmd += ["--tile", str(args.tile)]
  if args.compile_only:
    cmd.append("--compile-only")
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                         cwd=str(ROOT), check=False)
  except subprocess.TimeoutExpired:
    return {"loss": loss, "mode": mode, "batch": batch, "error": f"timeout {args.timeout}s"}
  for line in reversed(out.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
  return {"loss": loss, "mode": mode, "batch": batch,
          "error": f"rc={out.returncode}: {tail[0][:120]}"}


def _gib(n):
  return "n/a" if n is None else f"{n / 2**30:.2f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
  parser.add_argument("--batch", nargs="+", type=int, default=[4096])
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--mode", choices=("streaming", "dense", "both"), default="both")
  parser.add_argument("--tile", type=int, default=None,
                      help="streaming tile_size (default: the library's)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed calls after the first (0: first call only)")
  parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
  parser.add_argument("--compile-only", action="store_true",
                      help="only XLA's planned peak (compile, do not run)")
  parser.add_argument("--list", action="store_true")
  parser.add_argument("--device", action="store_true", help="print the device and exit")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--loss", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    args.batch = args.batch[0]
    print(json.dumps(worker(args)), flush=True)
    return
  if args.list:
    print("\n".join(LOSSES))
    return
  print(f"device: {_device_line()}", flush=True)
  if args.device:
    return
  modes = ("streaming", "dense") if args.mode == "both" else (args.mode,)
  if args.compile_only:
    print("| loss | B | D | mode | XLA planned GiB |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
      for loss in args.losses:
        for mode in modes:
          r = _run_case(loss, batch, mode, args)
          print(f"| {loss} | {batch} | {args.dim} | {mode} | "
                f"{r.get('error') or _gib(r['planned'])} |", flush=True)
    return
  print("| loss | B | D | mode | step s | CPU s/step | first call s | first call CPU s "
        "| peak RSS GiB | device peak GiB | XLA planned GiB | dense GB/s "
        "| streaming/dense (wall, CPU) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for batch in args.batch:
    for loss in args.losses:
      results = {}
      for mode in modes:
        r = _run_case(loss, batch, mode, args)
        results[mode] = r
        if "error" in r:
          print(f"| {loss} | {batch} | {args.dim} | {mode} | {r['error']} | | | | | | | | |",
                flush=True)
          continue
        t = r["step_s"] if r["step_s"] is not None else r["first_s"]
        bw = ""
        if mode == "dense":
          bw = f"{16 * batch * batch / t / 1e9:.3g}"
        ratio = ""
        if mode == "dense" and "streaming" in results and "error" not in results["streaming"]:
          s = results["streaming"]
          ts = s["step_s"] if s["step_s"] is not None else s["first_s"]
          ratio = f"{ts / t:.2f}"
          if s.get("cpu_s") and r.get("cpu_s"):
            ratio += f", {s['cpu_s'] / r['cpu_s']:.2f}"
          if abs(s["value"] - r["value"]) > 1e-3 * max(1.0, abs(r["value"])):
            ratio += f" (values differ: {s['value']:.6g} vs {r['value']:.6g})"
        step = "n/a" if r["step_s"] is None else f"{r['step_s']:.3f}"
        cpu = "n/a" if r.get("cpu_s") is None else f"{r['cpu_s']:.3f}"
        print(f"| {loss} | {batch} | {args.dim} | {mode} | {step} | {cpu} | {r['first_s']:.2f} "
              f"| {r['first_cpu_s']:.2f} "
              f"| {_gib(r['rss'])} | {_gib(r['device_peak'])} | {_gib(r['planned'])} "
              f"| {bw} | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
