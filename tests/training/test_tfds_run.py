"""A run of configs/cub200.py:runlocal on a tiny CUB-200 prepared in a
temporary TFDS data_dir (the real TFDS builder, a few generated examples;
see tests/data/test_tfds_sources.py): RGB images, host resize, random
resized crops, flips, ImageNet normalisation and the centre-crop evaluation,
through the real loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from configs import cub200  # noqa: E402
from metric_jax.training import loop  # noqa: E402
from tests.data.test_tfds_sources import prepare  # noqa: E402

# Classes 0-99 train, 100-199 test (both TFDS splits are pooled).
SPLIT_LABELS = {"train": [0, 0, 1, 1, 2, 2, 3, 100, 101, 150],
                "test": [0, 1, 2, 3, 3, 100, 101, 150, 150, 199]}


def test_cub200_runlocal_on_prepared_tfds(tmp_path):
  data_dir = tmp_path / "tfds"
  prepare("caltech_birds2011", str(data_dir), SPLIT_LABELS)
  config = cub200.get_config("runlocal")
  with config.unlocked():
    config.data.options.data_dir = str(data_dir)
    # A ConvNet instead of the runlocal ResNet-18 keeps the compilation short;
    # the data path is the subject here.
    config.model.name = "convnet"
    config.model.kwargs = {"features": (8,)}
    config.num_devices = 1
  workdir = tmp_path / "run"
  metrics = loop.train_and_evaluate(config, workdir)
  # Test classes 100 (2 images), 101 (2), 150 (3), 199 (1): 8 images, 7 with
  # a same-class neighbour.
  assert metrics["num_queries"] + metrics["num_excluded_queries"] == 8
  assert metrics["num_excluded_queries"] == 1
  assert 0.0 <= metrics["precision_at_1"] <= 1.0
  stored = json.loads((workdir / "config.json").read_text())
  assert stored["data"]["options"]["data_dir"] == str(data_dir)
  assert stored["data"]["mean"] == [0.485, 0.456, 0.406]
  train = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in train if r["split"] == "train"] == [2, 4]
  assert all(np.isfinite(r["loss"]) for r in train if r["split"] == "train")
  out = loop.embed_checkpoint(config, workdir, split="train")
  with np.load(out) as f:
    assert f["embeddings"].shape == (12, 16)
    np.testing.assert_array_equal(np.unique(f["class_ids"]), [0, 1, 2, 3])
