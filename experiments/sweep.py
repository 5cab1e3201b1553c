r"""Every loss of the library under one training protocol, tuned on validation classes.

For each loss of :data:`LOSS_GRIDS` (all losses of
``metric_jax.losses.available_losses()`` usable on (embeddings, labels)
batches; :data:`SKIPPED` lists the others and why):

1. train on the validation split of the training classes
   (``data.options.validation=True``: the dataset's test classes are never
   read) once per value of the loss's grid of its main hyper-parameter
   (margin, temperature or scale), with the base config's protocol
   (backbone, batch, sampler, steps, optimiser);
2. pick the value with the best validation MAP@R (ties: the first);
3. retrain with that value on all training classes and evaluate on the
   test classes.

Every run is ``metric_jax.training.train_and_evaluate`` on the base config
with the loss (and the validation switch) overridden; its workdir is
``OUTDIR/{val,test}/<loss>[/<param>=<value>]``. A finished run (its
``final_metrics.json`` at the last step) is read, not retrained, so an
interrupted sweep resumes. The untrained network (step 0) is evaluated on both
splits as a baseline row. Writes ``OUTDIR/results.json``, ``results.csv``
and ``results.md`` (the markdown table, also printed).

Usage:
  python -m experiments.sweep --config=configs/sweep_digits.py --outdir=/tmp/sweep_digits
  python -m experiments.sweep --config=configs/sweep_digits.py --outdir=DIR \
      --losses=contrastive_loss,triplet_margin_loss,lifted_structure_loss
  python -m experiments.sweep --config=configs/sweep_omniglot.py --outdir=DIR
  python -m experiments.sweep --config=configs/cub200.py --outdir=DIR   # needs TFDS data

The base config must declare ``data.options.validation`` (the sweep configs
do); others (e.g. configs/cub200.py) get it added by the sweep.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

# (main hyper-parameter, grid, fixed kwargs). Grids hold 2-3 values around
# the paper / PML defaults, on the scale of L2-normalised embeddings
# (Euclidean distances in [0, 2]). Losses without a margin or temperature get
# a single value and no validation runs.
LOSS_GRIDS: dict[str, tuple[str, tuple, dict[str, Any]]] = {
    "angular_loss": ("alpha", (0.628, 0.785), {}),          # 36 and 45 degrees
    "arcface_loss": ("margin", (0.3, 0.5), {"scale": 64.0}),
    "circle_loss": ("m", (0.25, 0.4), {"gamma": 80.0}),
    "contrastive_loss": ("neg_margin", (0.5, 0.8, 1.0), {"pos_margin": 0.0}),
    "cosface_loss": ("margin", (0.2, 0.35), {"scale": 64.0}),
    "fastap_loss": ("num_bins", (10,), {}),
    "generalized_lifted_structure_loss": ("neg_margin", (0.5, 1.0), {"pos_margin": 0.0}),
    "histogram_loss": ("num_bins", (100,), {}),
    "instance_loss": ("gamma", (32.0, 64.0), {}),
    "large_margin_softmax_loss": ("margin", (2, 4), {}),
    "lifted_structure_loss": ("neg_margin", (0.5, 1.0, 1.5), {"pos_margin": 0.0}),
    "manifold_loss": ("margin", (5e-4, 0.05), {}),          # one proxy per class
    "margin_loss": ("margin", (0.1, 0.2), {}),               # beta learned, init 1.2
    "multi_similarity_loss": ("base", (0.5, 0.8), {"alpha": 2.0, "beta": 50.0}),
    "nca_loss": ("softmax_scale", (1.0, 10.0), {}),
    "normalized_softmax_loss": ("temperature", (0.05, 0.1), {}),
    "npair_loss": ("l2_reg", (0.002,), {}),
    "p2sgrad_loss": ("detach_weight_norm", (False,), {}),
    "pnp_loss": ("anneal", (0.01, 0.05), {}),
    "ntxent_loss": ("temperature", (0.07, 0.2), {}),
    "proxy_anchor_loss": ("margin", (0.1, 0.2), {"alpha": 32.0}),
    "proxy_nca_loss": ("softmax_scale", (3.0, 9.0), {}),
    "quadruplet_loss": ("margin1", (0.2, 0.4), {"margin2": 0.1}),
    "ranked_list_loss": ("margin", (0.2, 0.4), {}),
    "snr_contrastive_loss": ("neg_margin", (0.5, 1.0), {"pos_margin": 0.0}),
    "smooth_ap_loss": ("temperature", (0.01, 0.05), {}),
    "soft_triple_loss": ("margin", (0.01, 0.05), {}),
    "sphereface_loss": ("margin", (2, 4), {}),
    "subcenter_arcface_loss": ("margin", (0.3, 0.5), {"scale": 64.0}),
    "supcon_loss": ("temperature", (0.07, 0.2), {}),
    "triplet_center_loss": ("margin", (0.5, 1.0), {}),
    "triplet_margin_loss": ("margin", (0.05, 0.1, 0.2), {"mining": "semihard"}),
    "tuplet_margin_loss": ("margin", (0.1, 0.2), {"scale": 64.0}),
}

PRIORITY = ("triplet_margin_loss", "contrastive_loss", "lifted_structure_loss")

SKIPPED: dict[str, str] = {
    "magnet_loss": "needs cluster assignments from the magnet sampler/index "
                   "(experiments/magnet), not plain (embeddings, labels) batches",
    "intra_pair_variance_loss": "a variance regulariser meant to be added to another "
                                "loss; alone it has no term separating classes",
    "threshold_consistent_margin_loss": "a regulariser of the similarity thresholds, "
                                        "meant to be added to another loss",
    "dynamic_soft_margin_loss": "its running histogram is state carried from step to "
                                "step (return_histogram=True), which the objective does "
                                "not thread; use it in a custom loop",
    "lp_regularizer": "a regulariser (embedding norm), not a metric-learning loss",
    "zero_mean_regularizer": "a regulariser, not a metric-learning loss",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Base protocol, e.g. configs/sweep_digits.py.", lock_config=True)
_OUTDIR = flags.DEFINE_string("outdir", None, "Directory of all runs and the result files.")
_LOSSES = flags.DEFINE_list("losses", None, "Losses to run (default: all of LOSS_GRIDS).")
_SEEDS = flags.DEFINE_list(
    "final_seeds", None, "Seeds of the final (test) runs (default: the config's seed). "
    "With several, the table shows mean +- std over them.")
_PREFIX = flags.DEFINE_string("results_name", "results",
                              "Stem of the result files in OUTDIR (.json, .csv, .md).")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "JAX persistent compilation cache directory "
    "(default OUTDIR/jax_cache; 'none' to disable).")
flags.mark_flags_as_required(["config", "outdir"])

METRICS = ("precision_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "r_precision",
           "map_at_r", "nmi")


def run_config(base: ml_collections.ConfigDict, loss: str, kwargs: dict,
               validation: bool, seed: int | None = None) -> ml_collections.ConfigDict:
  """``base`` with ``loss``/``kwargs``, the validation switch and optionally
  another seed (a locked copy)."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  if seed is not None:
    cfg.seed = int(seed)
  cfg.loss.name = loss
  cfg.loss.kwargs = ml_collections.ConfigDict(kwargs)
  cfg.loss.extra_terms = ml_collections.ConfigDict()
  cfg.data.options.validation = bool(validation)
  cfg.lock()
  return cfg


def _finished(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> dict | None:
  """The stored final metrics of a finished run of ``cfg`` in ``workdir``.

  Raises ``ValueError`` if the workdir holds a run of another config (a
  different protocol must go to another ``--outdir``)."""
  from metric_jax.training import checkpoint
  stored_cfg = checkpoint.load_config(workdir)
  if stored_cfg is not None:
    diffs = checkpoint.config_differences(stored_cfg, cfg)
    diffs.pop("progress_bar", None)
    if diffs:
      raise ValueError(f"{str(workdir)!r} holds a run of another config (differences: "
                       f"{diffs}); use a new --outdir.")
  path = workdir / "final_metrics.json"
  if path.is_file():
    stored = json.loads(path.read_text())
    if stored.get("step") == cfg.num_train_steps:
      return stored
  return None


def train(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """One pipeline run (or its stored result); metrics plus wall seconds.

  A run that fails (e.g. a non-finite loss) is recorded with its error."""
  from metric_jax.training import loop
  done = _finished(workdir, cfg)
  if done is not None:
    logging.info("reusing %s", workdir)
    return {**done, "wall_s": float("nan")}
  t0 = time.perf_counter()
  try:
    metrics = loop.train_and_evaluate(cfg, workdir)
  except (FloatingPointError, ValueError) as e:
    logging.error("run %s failed: %s", workdir, e)
    return {"error": str(e), "wall_s": time.perf_counter() - t0}
  return {**metrics, "wall_s": time.perf_counter() - t0}


def untrained(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Metrics of the randomly initialised network (the pipeline's init and
  embedding functions, no training step)."""
  from metric_jax.training import loop
  exp = loop.setup(cfg, workdir)
  state = exp.init_state()
  emb, labels = exp.embed_split(state, "test")
  return loop.evaluate_embeddings(emb, labels, cfg, cfg.seed)


def _fmt(v, scale=100.0) -> str:
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.1f}"


def _cell(row: dict, metric: str) -> str:
  """The test value of ``metric``; mean +- std (population) over seeds if several."""
  runs = [m for m in row.get("test_seeds", []) if "error" not in m]
  if len(runs) > 1:
    vals = [m.get(metric, float("nan")) for m in runs]
    if any(v is None or v != v for v in vals):
      return "-"
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return f"{mean * 100:.1f} ± {std * 100:.1f}"
  return _fmt(row.get("test", {}).get(metric))


def markdown_table(rows: list[dict]) -> str:
  """The results table: one row per loss (and the baseline)."""
  head = ("| loss | tuned | grid: validation MAP@R | P@1 | R@2 | R@4 | R@8 | MAP@R | NMI |\n"
          "|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    t = r.get("test", {})
    grid = ", ".join(f"{v['value']:g}: {_fmt(v.get('map_at_r'))}" for v in r.get("validation", []))
    if not r.get("param") and r.get("validation"):   # the untrained baseline
      grid = f"(no training) {_fmt(r['validation'][0].get('map_at_r'))}"
    tuned = f"{r['param']}={r['chosen']:g}" if r.get("param") else "-"
    if "error" in t:
      lines.append(f"| {r['loss']} | {tuned} | {grid or '-'} | failed: {t['error'][:60]} "
                   "| | | | | |")
      continue
    cells = " | ".join(_cell(r, m) for m in ("precision_at_1", "recall_at_2", "recall_at_4",
                                             "recall_at_8", "map_at_r", "nmi"))
    lines.append(f"| {r['loss']} | {tuned} | {grid or '-'} | {cells} |")
  return "\n".join(lines)


def _write(outdir: pathlib.Path, base, rows: list[dict], stem: str = "results") -> str:
  table = markdown_table(rows)
  (outdir / f"{stem}.json").write_text(json.dumps(
      {"config": base.to_dict(), "skipped": SKIPPED, "rows": rows}, indent=1, default=str))
  with open(outdir / f"{stem}.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["loss", "param", "chosen", "grid_validation_map_at_r", "seed", *METRICS,
                "wall_s"])
    for r in rows:
      grid = ";".join(f"{v['value']:g}:{v.get('map_at_r', float('nan')):.4f}"
                      for v in r.get("validation", []))
      for t in r.get("test_seeds") or [r.get("test", {})]:
        w.writerow([r["loss"], r.get("param", ""), r.get("chosen", ""), grid, t.get("seed", ""),
                    *[t.get(m, "") for m in METRICS], t.get("wall_s", "")])
  (outdir / f"{stem}.md").write_text(table + "\n")
  return table


def sweep_loss(base, outdir: pathlib.Path, loss: str, seeds=None) -> dict:
  """Validation runs over the grid, choice by MAP@R, final run(s); one row.

  ``seeds``: seeds of the final runs (default: the config's); the first
  seed's run is ``row["test"]``, all of them ``row["test_seeds"]``."""
  param, grid, fixed = LOSS_GRIDS[loss]
  row: dict[str, Any] = {"loss": loss, "param": param, "fixed": fixed, "validation": []}
  best, best_score = grid[0], -1.0
  if len(grid) > 1:
    for value in grid:
      cfg = run_config(base, loss, {**fixed, param: value}, validation=True)
      m = train(cfg, outdir / "val" / loss / f"{param}={value:g}")
      score = m.get("map_at_r", float("nan"))
      row["validation"].append({"value": value, **m})
      if score == score and score > best_score:
        best, best_score = value, score
  row["chosen"] = best
  row["test_seeds"] = []
  for seed in seeds or [base.seed]:
    cfg = run_config(base, loss, {**fixed, param: best}, validation=False, seed=seed)
    # The config's own seed keeps the plain workdir (reused by later sweeps).
    workdir = outdir / "test" / loss
    if int(seed) != base.seed:
      workdir = outdir / "test" / f"{loss}_seed{int(seed)}"
    row["test_seeds"].append({"seed": int(seed), **train(cfg, workdir)})
  row["test"] = row["test_seeds"][0]
  return row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax
  from metric_jax import losses as losses_lib
  from metric_jax.training import reporting
  reporting.quiet_library_logs()
  outdir = pathlib.Path(_OUTDIR.value)
  outdir.mkdir(parents=True, exist_ok=True)
  cache = _CACHE.value or str(outdir / "jax_cache")
  if cache != "none":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  base = _CONFIG.value
  if "validation" not in base.data.options:
    base = ml_collections.ConfigDict(base.to_dict())
    base.data.options.validation = False
  available = set(losses_lib.available_losses())
  unknown = sorted(available - set(LOSS_GRIDS) - set(SKIPPED))
  if unknown:
    logging.warning("losses in the library but not in the sweep: %s", unknown)
  # The published ordering's three losses first, then the rest.
  names = _LOSSES.value or list(PRIORITY) + sorted(set(LOSS_GRIDS) - set(PRIORITY))
  bad = [n for n in names if n not in LOSS_GRIDS]
  if bad:
    raise app.UsageError(f"--losses: {bad} not in LOSS_GRIDS; valid: {sorted(LOSS_GRIDS)}.")

  seeds = [int(s) for s in _SEEDS.value] if _SEEDS.value else None
  baseline = {"loss": "untrained network (step 0)", "validation": [
      {"value": float("nan"), **untrained(
          run_config(base, base.loss.name, base.loss.kwargs.to_dict(), True),
          outdir / "untrained_val")}], "test_seeds": []}
  for seed in seeds or [base.seed]:
    cfg = run_config(base, base.loss.name, base.loss.kwargs.to_dict(), False, seed=seed)
    baseline["test_seeds"].append({"seed": seed, **untrained(cfg, outdir / "untrained_test")})
  baseline["test"] = baseline["test_seeds"][0]
  rows = [baseline]
  stem = _PREFIX.value
  _write(outdir, base, rows, stem)
  t0 = time.perf_counter()
  for i, loss in enumerate(names):
    logging.info("[%d/%d] %s (%.0f s so far)", i + 1, len(names), loss,
                 time.perf_counter() - t0)
    rows.append(sweep_loss(base, outdir, loss, seeds))
    _write(outdir, base, rows, stem)
  table = _write(outdir, base, rows, stem)
  print(table, flush=True)
  print("skipped: " + "; ".join(f"{k} ({v})" for k, v in SKIPPED.items()), flush=True)


if __name__ == "__main__":
  app.run(main)
