"""Documentation checks: every public docstring's example runs (doctest),
public losses document their arguments, results and references, and the
API docs build without warnings."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import sys

import pytest

import metric_jax
import metric_jax as mj

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _modules():
  names = ["metric_jax"]
  for info in pkgutil.walk_packages(metric_jax.__path__, "metric_jax."):
    names.append(info.name)
  return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_doctests(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                           verbose=False)
  assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


@pytest.mark.parametrize("name", sorted(mj.losses.__all__))
def test_public_loss_docstrings_are_complete(name):
  fn = getattr(mj.losses, name)
  doc = fn.__doc__ or ""
  assert doc.strip(), f"{name} has no docstring"
  if not name.endswith("_loss"):
    return
  for section in ("Args:", "Returns:", "References:", "Example"):
    assert section in doc, f"{name} docstring lacks {section!r}"


def test_api_docs_build_without_warnings(tmp_path):
  sys.path.insert(0, str(ROOT / "docs"))
  try:
    build = importlib.import_module("build")
  finally:
    sys.path.pop(0)
  problems = build.build(tmp_path)
  assert not problems, problems
  assert (tmp_path / "metric_jax.html").exists()
