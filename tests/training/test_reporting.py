"""Metric files, the summary table and the embedding plot."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from metric_jax.training import reporting


def test_metric_writer_jsonl_and_resume_truncation(tmp_path):
  w = reporting.MetricWriter(tmp_path, tensorboard=False)
  w.write(1, {"loss": np.float32(0.5), "vec": np.zeros(3), "name": "x", "n": np.int64(3)})
  w.write(2, {"loss": 0.25})
  w.write(2, {"precision_at_1": 0.9}, split="eval")
  w.write(3, {"loss": 0.125})
  w.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines[0] == {"step": 1, "split": "train", "loss": 0.5, "n": 3}  # non-scalars dropped
  assert [l["step"] for l in lines] == [1, 2, 2, 3]
  # A kill can cut the last line; a resume from step 2 drops later steps.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "spl')
  w = reporting.MetricWriter(tmp_path, tensorboard=False, truncate_after=2)
  w.write(3, {"loss": 0.1})
  w.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(l["step"], l["split"]) for l in lines] == [(1, "train"), (2, "train"), (2, "eval"),
                                                      (3, "train")]
  assert lines[-1]["loss"] == 0.1


def test_metric_writer_tensorboard_and_disabled(tmp_path):
  w = reporting.MetricWriter(tmp_path / "a")
  w.write(5, {"loss": 1.0})
  w.close()
  assert any(p.name.startswith("events.out.tfevents")
             for p in (tmp_path / "a" / "tensorboard").iterdir())
  off = reporting.MetricWriter(tmp_path / "b", enabled=False)
  assert off.write(1, {"loss": 2.0}) == {"loss": 2.0}
  off.close()
  assert not (tmp_path / "b").exists()


def test_format_table():
  table = reporting.format_table({
      "precision_at_1": 0.98765, "recall_at_2": 0.5, "map_at_r": 0.25, "nmi": float("nan"),
      "num_queries": 896.0, "custom": 0.1}, title="T")
  lines = table.splitlines()
  assert lines[0] == "T"
  rows = {l.split()[0]: l.split()[-1] for l in lines[4:-1]}
  assert rows == {"P@1": "98.77", "R@2": "50.00", "MAP@R": "25.00", "NMI": "nan",
                  "num_queries": "896", "custom": "10.00"}
  assert [l.split()[0] for l in lines[4:-1]][:3] == ["P@1", "R@2", "MAP@R"]


def test_project_2d_pca_matches_svd():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 5)) * np.array([5.0, 3.0, 1.0, 0.1, 0.1])
  xy = reporting.project_2d(x, "pca")
  assert xy.shape == (50, 2)
  centred = x - x.mean(0)
  # The projection keeps the variance of the two leading principal axes.
  eig = np.sort(np.linalg.eigvalsh(np.cov(centred.T)))[::-1]
  np.testing.assert_allclose(np.var(xy, axis=0, ddof=1), eig[:2], rtol=1e-6)
  with pytest.raises(ValueError, match="projection"):
    reporting.project_2d(x, "umap")
  with pytest.raises(ValueError, match="embeddings"):
    reporting.project_2d(x[:1], "pca")


@pytest.mark.parametrize("method,classes", [("pca", 3), ("tsne", 3), ("pca", 30)])
def test_projection_png(tmp_path, method, classes):
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(classes), 10)
  emb = rng.normal(size=(len(labels), 8)) + labels[:, None]
  path = tmp_path / "p.png"
  reporting.save_projection_png(path, emb, labels, method=method, max_classes=20)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(tmp_path) == ["p.png"]


def test_write_json_is_atomic_and_converts(tmp_path):
  reporting.write_json(tmp_path / "m.json", {"a": np.float32(0.5), "b": np.int64(2), "c": "s"})
  assert json.loads((tmp_path / "m.json").read_text()) == {"a": 0.5, "b": 2, "c": "s"}
  assert os.listdir(tmp_path) == ["m.json"]


def test_quiet_library_logs_filters_only_chatty_info():
  import logging
  reporting.quiet_library_logs()
  reporting.quiet_library_logs()        # idempotent
  f = reporting._DropChattyInfo()
  make = lambda level, path: logging.LogRecord("x", level, path, 1, "m", None, None)  # noqa: E731
  assert not f.filter(make(logging.INFO, "/site-packages/orbax/checkpoint/x.py"))
  assert f.filter(make(logging.WARNING, "/site-packages/orbax/checkpoint/x.py"))
  assert f.filter(make(logging.INFO, "/work/metric_jax/training/loop.py"))
