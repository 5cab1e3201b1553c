"""Configs: every config file loads and validates; wrong types, unknown
names and out-of-range labels are rejected with messages naming the field."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from metric_jax.training import config as config_lib
from metric_jax.training import loop
from tests.training import common

CONFIGS = ("digits", "omniglot", "cub200", "cars196", "sop", "digits_magnet", "omniglot_magnet",
           "digits_bregman", "omniglot_bregman")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_config_loads_locked_and_valid(name, arg):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(arg)
  assert config.is_locked
  config_lib.validate(config)
  assert module.__doc__ and "python -m experiments.train" in module.__doc__
  if arg == "runlocal":
    assert config.num_train_steps <= 10


@pytest.mark.parametrize("name", ["digits", "omniglot"])
def test_contrastive_option(name):
  config = importlib.import_module(f"configs.{name}").get_config("contrastive")
  assert config.loss.name == "contrastive_loss"
  with pytest.raises(ValueError, match="Unknown config option.*'bogus'.*valid"):
    importlib.import_module(f"configs.{name}").get_config("runlocal,bogus")


def test_locked_config_rejects_wrong_types_and_new_fields():
  config = common.tiny_config()
  with pytest.raises(TypeError, match="batch_size"):
    config.batch_size = "sixty-four"
  with pytest.raises(TypeError, match="image_size"):
    config.data.image_size = "big"
  with pytest.raises(AttributeError, match="batch_szie"):
    config.batch_szie = 64
  config.optimizer.learning_rate = 1     # ints are accepted for floats
  assert isinstance(config.optimizer.learning_rate, float)


def _parse(argv):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                  sys_argv=["prog", *argv])
  fv(["prog", *argv])
  return fv.config


def test_command_line_overrides():
  config = _parse(["--config=configs/digits.py:runlocal",
                   "--config.loss.kwargs.margin=0.3", "--config.num_devices=1",
                   "--config.optimizer.name=sgd"])
  assert config.loss.kwargs.margin == 0.3
  assert config.num_devices == 1 and config.optimizer.name == "sgd"
  assert config.num_train_steps == 6
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(["--config=configs/digits.py", "--config.batch_size=abc"])
  with pytest.raises(AttributeError, match="no_such_field"):
    _parse(["--config=configs/digits.py", "--config.no_such_field=1"])


@pytest.mark.parametrize("field,value,match", [
    ("loss__name", "tripletloss", r"valid names: .*triplet_margin_loss"),
    ("loss__kwargs__margn", 0.1, r"does not accept \['margn'\]"),
    ("optimizer__name", "adam", r"valid names: adamw, sgd, rmsprop"),
    ("optimizer__schedule", "linear", r"valid names: constant, cosine, step"),
    ("compute_dtype", "float16", r"compute_dtype.*'float32', 'bfloat16'"),
    ("projection", "umap", r"projection"),
    ("batch_size", 0, r"config.batch_size.*>= 1"),
    ("eval__every", -1, r"config.eval.every.*>= 0"),
    ("data__mean", ("a",), r"config.data.mean"),
])
def test_validate_names_the_field(field, value, match):
  config = common.tiny_config()
  with config.unlocked():
    node, parts = config, field.split("__")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def test_unknown_model_and_dataset_list_valid_names(tmp_path):
  with pytest.raises(ValueError, match=r"convnet.*resnet50"):
    loop.setup(common.tiny_config(model__name="resnet5"), tmp_path)
  with pytest.raises(ValueError, match=r"digits.*omniglot_npz"):
    loop.setup(common.tiny_config(data__name="mnist_digits"), tmp_path)
  with pytest.raises(ValueError, match=r"divisible by the number of devices"):
    loop.setup(common.tiny_config(num_devices=8, batch_size=36, sampler__kwargs__m=4),
               tmp_path)
  assert not any(tmp_path.iterdir())     # nothing written for a bad config


def test_labels_outside_the_class_range_are_rejected():
  loop._check_labels(np.array([0, 4, 2]), 5, "train labels")
  with pytest.raises(ValueError, match=r"train labels.*\[0, 5\).*\[0, 5\]"):
    loop._check_labels(np.array([0, 5, 2]), 5, "train labels")
  with pytest.raises(ValueError, match=r"\[-1, 2\]"):
    loop._check_labels(np.array([-1, 2]), 5, "train labels")
  with pytest.raises(TypeError, match="integers"):
    loop._check_labels(np.array([0.0, 1.0]), 5, "train labels")


def test_extra_loss_terms_from_config():
  config = common.tiny_config()
  with config.unlocked():
    config.loss.extra_terms.reg = {"name": "lp_regularizer", "weight": 0.01}
    config.loss.extra_terms.proxies = {"name": "proxy_anchor_loss", "weight": 0.5,
                                       "kwargs": {"alpha": 16.0}}
  objective = config_lib.objective_from_config(config)
  assert objective.keys == ("triplet_margin_loss", "proxies", "reg")   # extras by key
  assert objective.weights == {"triplet_margin_loss": 1.0, "reg": 0.01, "proxies": 0.5}
  assert objective.has_params
  with config.unlocked():
    config.loss.extra_terms.bad = {"weight": 1.0}
  with pytest.raises(ValueError, match="extra_terms.bad.*name"):
    config_lib.objective_from_config(config)
