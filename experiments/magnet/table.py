"""Markdown table of finished runs: the eval curve and final metrics of each
workdir (``metrics.jsonl``, ``final_metrics.json``, ``config.json``).

    python -m experiments.magnet.table /tmp/exp/digits_s0 /tmp/exp/digits_magnet_s0 ...

Columns: loss (with ``distance``), seed, steps, MAP@R at every evaluation
step, final P@1, MAP@R, NMI, nearest-cluster accuracy (magnet runs) and
the last logged training loss.
"""

from __future__ import annotations

import json
import pathlib
import sys


def _row(workdir: pathlib.Path) -> tuple[str, dict]:
  config = json.loads((workdir / "config.json").read_text())
  final = json.loads((workdir / "final_metrics.json").read_text())
  curve, loss = {}, float("nan")
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if rec.get("split") == "eval":
      curve[rec["step"]] = rec["map_at_r"]
    elif "loss" in rec:
      loss = rec["loss"]
  name = config["loss"]["name"]
  if config["loss"].get("distance", "default") == "bregman":
    name += f" + Bregman {config['loss']['bregman']['generator']}"
  return name, {"seed": config["seed"], "steps": final["step"], "curve": curve, "final": final,
                "loss": loss}


def main(argv):
  rows = [_row(pathlib.Path(p)) for p in argv]
  steps = sorted({s for _, r in rows for s in r["curve"]})
  head = ["loss", "seed", "steps"] + [f"MAP@R @{s}" for s in steps] + [
      "P@1", "MAP@R", "NMI", "nearest-cluster acc", "train loss"]
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for name, r in rows:
    f = r["final"]
    cells = [name, str(r["seed"]), str(r["steps"])]
    cells += [f"{100 * r['curve'][s]:.1f}" if s in r["curve"] else "" for s in steps]
    cells += [f"{100 * f['precision_at_1']:.1f}", f"{100 * f['map_at_r']:.1f}",
              f"{100 * f['nmi']:.1f}" if "nmi" in f else "",
              f"{100 * f['nearest_cluster_accuracy']:.1f}" if "nearest_cluster_accuracy" in f
              else "", f"{r['loss']:.3f}"]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main(sys.argv[1:])
