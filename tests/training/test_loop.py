"""End-to-end runs of train_and_evaluate on digits (runlocal-sized)."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from metric_jax.training import loop
from tests.training import common

METRIC_KEYS = {"precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
               "r_precision", "map_at_r", "mean_average_precision",
               "mean_reciprocal_rank", "num_queries", "num_excluded_queries"}


def _records(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(l) for l in lines]


def test_end_to_end_outputs(reference_run, capsys):
  config, workdir, metrics = reference_run
  assert METRIC_KEYS <= set(metrics)
  assert metrics["step"] == 12 and metrics["num_queries"] == 896
  assert 0.0 < metrics["precision_at_1"] <= 1.0 and 0.0 < metrics["map_at_r"] <= 1.0
  assert np.isfinite(metrics["train_loss"])
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [4, 8, 12]
  stored = json.loads((workdir / "config.json").read_text())
  assert stored["data"]["name"] == "digits" and stored["num_train_steps"] == 12
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["step"] == 12
  assert final["map_at_r"] == pytest.approx(metrics["map_at_r"])
  records = _records(workdir)
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
  assert {"loss", "loss/triplet_margin_loss", "grad_norm", "learning_rate",
          "images_per_sec"} <= set(train[0])
  evals = [r for r in records if r["split"] == "eval"]
  assert len(evals) == 1 and evals[0]["step"] == 12
  assert (workdir / "embeddings_2d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert any(p.name.startswith("events.out.tfevents")
             for p in (workdir / "tensorboard").iterdir())
  leftovers = [p for p in workdir.rglob("*") if p.name.endswith(".tmp")]
  assert not leftovers


def test_extending_a_run_matches_the_uninterrupted_run(reference_run, tmp_path):
  """6 steps, then the same run extended to 12 (constant schedule): the
  parameters equal those of the 12-step run bit for bit."""
  config, ref_dir, _ = reference_run
  loop.train_and_evaluate(common.tiny_config(num_train_steps=6), tmp_path)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 6]
  loop.train_and_evaluate(common.tiny_config(), tmp_path)
  common.assert_states_equal(common.read_state(config, tmp_path, 12),
                             common.read_state(config, ref_dir, 12))
  steps = [r["step"] for r in _records(tmp_path) if r["split"] == "train"]
  assert steps == [2, 4, 6, 8, 10, 12]     # no step logged twice


def test_restarting_a_finished_run_only_evaluates(reference_run):
  config, workdir, metrics = reference_run
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  again = loop.train_and_evaluate(config, workdir)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
  for k in METRIC_KEYS:
    assert again[k] == pytest.approx(metrics[k])


def test_other_config_shape_is_refused_and_nothing_is_touched(reference_run):
  config, workdir, _ = reference_run
  snapshot = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in workdir.rglob("*")}
  stored = (workdir / "config.json").read_text()
  other = common.tiny_config(projection="pca", model__embedding_dim=16)
  with pytest.raises(ValueError, match=r"(?s)model\.embedding_dim.*state params/"):
    loop.train_and_evaluate(other, workdir)
  with pytest.raises(ValueError, match="different configuration"):
    loop.evaluate_checkpoint(other, workdir)
  assert (workdir / "config.json").read_text() == stored
  assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in workdir.rglob("*")} == snapshot


def test_evaluate_and_embed_checkpoint(reference_run, tmp_path):
  config, workdir, metrics = reference_run
  ev = loop.evaluate_checkpoint(config, workdir)
  assert ev["step"] == 12
  for k in METRIC_KEYS:
    assert ev[k] == pytest.approx(metrics[k])
  assert json.loads((workdir / "eval_test_step_12.json").read_text())["step"] == 12
  out = loop.embed_checkpoint(config, workdir, split="test", output=tmp_path / "e.npz")
  with np.load(out) as f:
    assert f["embeddings"].shape == (896, 64) and f["embeddings"].dtype == np.float32
    assert f["labels"].shape == (896,) and int(f["step"]) == 12
    np.testing.assert_array_equal(f["class_ids"], np.arange(5, 10))
  assert os.listdir(tmp_path) == ["e.npz"]
  with pytest.raises(ValueError, match="split"):
    loop.embed_checkpoint(config, workdir, split="validation")


def test_missing_checkpoint_is_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    loop.evaluate_checkpoint(common.tiny_config(), tmp_path)


def test_embed_cli_uses_the_stored_config(reference_run, tmp_path):
  """``python -m experiments.embed --workdir=...`` without --config."""
  config, workdir, _ = reference_run
  out = tmp_path / "cli.npz"
  proc = common.launch("experiments.embed", [f"--workdir={workdir}", f"--output={out}"])
  log, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, log
  assert f"Wrote {out}" in log
  ref = loop.embed_checkpoint(config, workdir, output=tmp_path / "lib.npz")
  with np.load(out) as a, np.load(ref) as b:
    np.testing.assert_allclose(a["embeddings"], b["embeddings"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_segments_between_sampler_refreshes():
  assert loop._segments(0, 10, 0) == [(0, 10, False)]
  assert loop._segments(0, 10, 4) == [(0, 4, True), (4, 8, True), (8, 10, True)]
  assert loop._segments(5, 10, 4) == [(5, 8, True), (8, 10, True)]
  assert loop._segments(10, 10, 4) == []


def test_sampler_refresh_hook_and_exact_resume(tmp_path):
  """A sampler with ``update_embeddings`` (the lifted-structure sampler) is
  refreshed every ``refresh_every`` steps with the embeddings of the whole
  training set; resuming at a refresh step reproduces the run exactly."""
  from metric_jax.data import lifted_sampler, samplers
  samplers.register_sampler(
      "lifted_structure_for_tests",
      lambda labels, batch_size, seed=0, **kw: lifted_sampler.LiftedStructureSampler(
          labels, batch_size, seed=seed, **kw))

  def config(steps):
    c = common.tiny_config(num_train_steps=steps, checkpoint_every=3,
                           sampler__name="lifted_structure_for_tests",
                           sampler__refresh_every=3)
    with c.unlocked():
      c.sampler.kwargs = {"num_pairs": 5}
    return c

  exp = loop.setup(config(6), tmp_path / "probe")
  state = exp.init_state()
  sampler = loop._build_sampler(exp)
  before = sampler.batch_indices(0)
  loop._refresh_sampler(exp, sampler, state)
  assert sampler.has_index
  emb, _ = exp.embed_split(state, "train")
  expected = lifted_sampler.knn_other_label(emb, exp.splits.train.labels,
                                            sampler.num_neighbors)
  np.testing.assert_array_equal(sampler._neighbors, expected)  # pylint: disable=protected-access
  assert not np.array_equal(sampler.batch_indices(0), before)  # hard negatives now

  loop.train_and_evaluate(config(6), tmp_path / "a")
  loop.train_and_evaluate(config(3), tmp_path / "b")
  loop.train_and_evaluate(config(6), tmp_path / "b")
  common.assert_states_equal(common.read_state(config(6), tmp_path / "a", 6),
                             common.read_state(config(6), tmp_path / "b", 6))
