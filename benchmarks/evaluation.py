"""Exact retrieval evaluation at scale: metric_jax vs faiss-cpu (+ NumPy) and PML.

    python benchmarks/evaluation.py                          # N in {20000, 60000}, D in {128, 512}
    python benchmarks/evaluation.py --n 60000 --dim 128      # the headline figure
    python benchmarks/evaluation.py --n 20000 --dim 128 --chunk-size 512 --skip-pml

Setting: query = gallery (each query's own index excluded), L2-normalised
Gaussian embeddings around class centres (``--class-size`` items per class),
Euclidean ranking, the k-NN metrics P@1, Recall@{1,2,4,8}, R-precision and
MAP@R (k = max(8, largest class count - 1) neighbours).

* **ours**: ``metric_jax.evaluation.retrieval_metrics(..., metrics=KNN_METRICS)``
  end to end (host checks, chunked exact k-NN under jit, metric arithmetic,
  float64 means), wall time of the second call (the first one compiles).
* **ours full**: the same call with every metric, i.e. plus the exact
  full-ranking mean average precision and MRR (which faiss's top-k cannot
  give); shown with ``--full-ranking``.
* **faiss**: ``IndexFlatL2`` (``--metric cosine``: ``IndexFlatIP``) exact
  search of k + 1 neighbours, the query itself removed as PML does, then the
  same metric arithmetic in NumPy; wall time of one call.
* **PML**: ``AccuracyCalculator(k="max_bin_count")`` on the same normalised
  embeddings (faiss inside), same metrics.

Each method runs in its own subprocess so that ``max RSS`` is its own.
``peak (XLA)`` is the compiled executable's planned peak
(``benchmarks.common.compiled_peak_bytes``): arguments, outputs and
temporaries, bounded by ``chunk_size x N`` floats for the score block.
The script checks that our metrics equal faiss's and prints the largest
absolute difference (non-zero only if float rounding reorders near-ties).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

K_VALUES = (1, 2, 4, 8)
KNN_KEYS = ("precision_at_1",) + tuple(f"recall_at_{k}" for k in K_VALUES) + (
    "r_precision", "map_at_r")


def make_data(n: int, d: int, class_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  num_classes = max(1, n // class_size)
  labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
  centers = rng.normal(size=(num_classes, d)).astype(np.float32)
  x = centers[labels] + 1.5 * rng.normal(size=(n, d)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), labels


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------
# Workers (each in its own process).
# --------------------------------------------------------------------------


def worker_ours(args, x, y):
  import jax
  from benchmarks import common
  from metric_jax import evaluation as ev

  metric = args.metric
  max_r = int(np.bincount(np.unique(y, return_inverse=True)[1]).max()) - 1

  def run(metrics):
    return ev.retrieval_metrics(x, y, k_values=K_VALUES, metric=metric,
                                chunk_size=args.chunk_size, metrics=metrics)

  out = {"machine": common.machine()}
  run(ev.KNN_METRICS)  # compile
  start = time.perf_counter()
  out["metrics"] = run(ev.KNN_METRICS)
  out["seconds"] = time.perf_counter() - start
  jitted = jax.jit(lambda q, l: ev.retrieval_per_query(
      q, l, max_r=max_r, k_values=K_VALUES, metric=metric, chunk_size=args.chunk_size,
      metrics=ev.KNN_METRICS))
  out["xla_peak"] = common.compiled_peak_bytes(jitted, x, y.astype(np.int32))
  if args.full_ranking:
    run(None)
    start = time.perf_counter()
    out["full_metrics"] = run(None)
    out["full_seconds"] = time.perf_counter() - start
  out["max_rss"] = max_rss_bytes()
  return out


def knn_metrics_numpy(idx, y):
  """P@1, Recall@k, R-precision, MAP@R from [N, K] neighbour indices (self removed)."""
  n, k = idx.shape
  _, codes = np.unique(y, return_inverse=True)
  r = np.bincount(codes)[codes] - 1
  valid = r > 0
  rel = y[idx] == y[:, None]
  ranks = np.arange(1, k + 1)[None, :]
  within = ranks <= r[:, None]
  cum = np.cumsum(rel, axis=1)
  safe_r = np.maximum(r, 1)
  per_q = {"precision_at_1": rel[:, 0].astype(np.float64)}
  for kk in K_VALUES:
    per_q[f"recall_at_{kk}"] = rel[:, :kk].any(axis=1).astype(np.float64)
  per_q["r_precision"] = (rel & within).sum(axis=1) / safe_r
  per_q["map_at_r"] = np.where(rel & within, cum / ranks, 0.0).sum(axis=1) / safe_r
  return {name: float(v[valid].mean()) for name, v in per_q.items()}


def worker_faiss(args, x, y):
  import faiss
  n, d = x.shape
  _, codes = np.unique(y, return_inverse=True)
  k = max(max(K_VALUES), int(np.bincount(codes).max()) - 1)
  start = time.perf_counter()
  index = faiss.IndexFlatIP(d) if args.metric == "cosine" else faiss.IndexFlatL2(d)
  index.add(x)
  _, idx = index.search(x, k + 1)
  # Remove each query's own index (or the last neighbour if absent), as PML does.
  is_self = idx == np.arange(n)[:, None]
  keep = ~is_self
  keep[~is_self.any(axis=1), -1] = False
  idx = idx[keep].reshape(n, k)
  metrics = knn_metrics_numpy(idx, y)
  seconds = time.perf_counter() - start
  return {"metrics": metrics, "seconds": seconds, "max_rss": max_rss_bytes(),
          "threads": faiss.omp_get_max_threads()}


def worker_pml(args, x, y):
  import torch
  from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
  calc = AccuracyCalculator(include=("precision_at_1", "r_precision",
                                     "mean_average_precision_at_r"),
                            k="max_bin_count", device=torch.device("cpu"))
  q = torch.from_numpy(x)
  labels = torch.from_numpy(y)
  start = time.perf_counter()
  res = calc.get_accuracy(q, labels)
  seconds = time.perf_counter() - start
  return {"metrics": {"precision_at_1": res["precision_at_1"], "r_precision": res["r_precision"],
                      "map_at_r": res["mean_average_precision_at_r"]},
          "seconds": seconds, "max_rss": max_rss_bytes()}


WORKERS = {"ours": worker_ours, "faiss": worker_faiss, "pml": worker_pml}


def spawn(method: str, args, n: int, d: int) -> dict | None:
  cmd = [sys.executable, __file__, "--worker", method, "--n", str(n), "--dim", str(d),
         "--chunk-size", str(args.chunk_size), "--class-size", str(args.class_size),
         "--metric", args.metric] + (["--full-ranking"] if args.full_ranking else [])
  proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
  if proc.returncode != 0:
    print(f"[{method} N={n} D={d} failed]\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_bytes(b):
  from benchmarks.common import fmt_bytes as f
  return f(b)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, nargs="+", default=[20000, 60000])
  parser.add_argument("--dim", type=int, nargs="+", default=[128, 512])
  parser.add_argument("--chunk-size", type=int, default=1024)
  parser.add_argument("--class-size", type=int, default=10,
                      help="items per class (max R = class size - 1)")
  parser.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean")
  parser.add_argument("--skip-pml", action="store_true")
  parser.add_argument("--skip-faiss", action="store_true")
  parser.add_argument("--full-ranking", action="store_true",
                      help="also time every metric (exact full-ranking mAP and MRR)")
  parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    x, y = make_data(args.n[0], args.dim[0], args.class_size)
    print(json.dumps(WORKERS[args.worker](args, x, y)))
    return

  import importlib.util
  has_faiss = importlib.util.find_spec("faiss") is not None and not args.skip_faiss
  has_pml = (not args.skip_pml and has_faiss
             and importlib.util.find_spec("pytorch_metric_learning") is not None)
  rows, machine = [], None
  for n in args.n:
    for d in args.dim:
      ours = spawn("ours", args, n, d)
      faiss_res = spawn("faiss", args, n, d) if has_faiss else None
      pml = spawn("pml", args, n, d) if has_pml else None
      if ours is None:
        continue
      machine = ours["machine"]
      diff = None
      if faiss_res is not None:
        diff = max(abs(ours["metrics"][k] - faiss_res["metrics"][k]) for k in KNN_KEYS)
      pml_diff = None
      if pml is not None:
        pml_diff = max(abs(ours["metrics"][k] - pml["metrics"][k]) for k in pml["metrics"])
      rows.append((n, d, ours, faiss_res, pml, diff, pml_diff))
      print(f"N={n} D={d}: ours {ours['seconds']:.2f}s"
            + (f", faiss {faiss_res['seconds']:.2f}s" if faiss_res else "")
            + (f", PML {pml['seconds']:.2f}s" if pml else "")
            + (f", max |ours - faiss| = {diff:.2e}" if diff is not None else "")
            + (f", max |ours - PML| = {pml_diff:.2e}" if pml_diff is not None else ""),
            flush=True)

  print()
  print(f"Machine: {machine}; chunk_size {args.chunk_size}; class size {args.class_size}; "
        f"metric {args.metric}; query = gallery")
  if rows and rows[0][3] is not None:
    print(f"faiss threads: {rows[0][3]['threads']}")
  print()
  head = "| N | D | ours s | faiss s | ratio | PML s |"
  sep = "|---|---|---|---|---|---|"
  if args.full_ranking:
    head += " ours full s |"
    sep += "---|"
  head += " peak (XLA) | max RSS ours | max RSS faiss | max abs diff vs faiss |"
  sep += "---|---|---|---|"
  print(head)
  print(sep)
  for n, d, ours, fr, pml, diff, _ in rows:
    cells = [str(n), str(d), f"{ours['seconds']:.2f}",
             f"{fr['seconds']:.2f}" if fr else "n/a",
             f"{ours['seconds'] / fr['seconds']:.2f}" if fr else "n/a",
             f"{pml['seconds']:.2f}" if pml else "n/a"]
    if args.full_ranking:
      cells.append(f"{ours['full_seconds']:.2f}")
    cells += [fmt_bytes(ours["xla_peak"]), fmt_bytes(ours["max_rss"]),
              fmt_bytes(fr["max_rss"]) if fr else "n/a",
              f"{diff:.1e}" if diff is not None else "n/a"]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
