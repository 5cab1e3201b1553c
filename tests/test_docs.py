"""Documentation checks: every public docstring's example runs (doctest),
public losses document their arguments, results and references, every public
function and class has an example and documents its arguments, and the API
docs build without warnings."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
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


# Modules exempt from the completeness check below (their doctests still run
# in test_doctests). Empty: every public module is complete; keep it so.
DOC_COMPLETENESS_EXEMPT = ()


def _is_exempt(name: str) -> bool:
  return any(name == e or name.startswith(e + ".") for e in DOC_COMPLETENESS_EXEMPT)


def _documented_modules() -> list[str]:
  """Non-exempt modules under metric_jax, found without importing the exempt
  ones (pkgutil.iter_modules only lists the files of a package)."""
  names = ["metric_jax"]
  stack = [(pathlib.Path(metric_jax.__file__).parent, "metric_jax.")]
  while stack:
    path, prefix = stack.pop()
    for info in pkgutil.iter_modules([str(path)], prefix):
      if _is_exempt(info.name):
        continue
      names.append(info.name)
      if info.ispkg:
        stack.append((path / info.name.rsplit(".", 1)[1], info.name + "."))
  return sorted(names)


def _public_objects(module) -> list[tuple[str, object]]:
  """Functions and classes of ``module.__all__`` defined in ``module`` itself
  (re-exports are checked in their defining module)."""
  out = []
  for attr in getattr(module, "__all__", ()):
    obj = getattr(module, attr)
    if callable(obj) and getattr(obj, "__module__", None) == module.__name__:
      out.append((attr, obj))
  return out


def _parameters(obj) -> list[str]:
  """Documented parameter names of a function or a class's constructor
  (Flax's ``parent`` / ``name`` module fields excluded)."""
  try:
    params = inspect.signature(obj).parameters.values()
  except (TypeError, ValueError):
    return []
  is_flax_module = inspect.isclass(obj) and any(
      (base.__module__ or "").startswith("flax.") for base in obj.__mro__[1:])
  return [p.name for p in params if p.name not in ("self", "cls")
          and not (is_flax_module and p.name in ("parent", "name"))]


def _is_record(obj) -> bool:
  """Dataclasses (Flax modules included) and NamedTuples: fields are Attributes."""
  return inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or (
      issubclass(obj, tuple) and hasattr(obj, "_fields")))


def _section(doc: str, headers: tuple[str, ...]) -> str | None:
  """The body of the first Google-style section among ``headers``."""
  for header in headers:
    match = re.search(rf"^{header}:[ \t]*\n((?:[ \t]+\S.*\n|[ \t]*\n)*)", doc + "\n", re.M)
    if match:
      return match.group(1)
  return None


@pytest.mark.parametrize("name", _documented_modules())
def test_public_api_docstrings_are_complete(name):
  module = importlib.import_module(name)
  problems = []
  for attr, obj in _public_objects(module):
    # obj.__doc__, not inspect.getdoc: a class must not pass on its base's docstring.
    doc = inspect.cleandoc(obj.__doc__ or "")
    where = f"{name}.{attr}"
    if not doc.strip():
      problems.append(f"{where}: no docstring")
      continue
    if ">>>" not in doc:
      problems.append(f"{where}: no `>>>` example")
    params = _parameters(obj)
    if not params:
      continue
    headers = ("Attributes", "Args") if _is_record(obj) else ("Args",)
    body = _section(doc, headers)
    if body is None:
      problems.append(f"{where}: takes {params} but has no {' or '.join(h + ':' for h in headers)} "
                      f"section")
      continue
    # An entry documents one name or a group sharing one description
    # ("pos_margin, neg_margin: as the dense loss.").
    undocumented = [p for p in params if not re.search(
        rf"(^|[\s*;,]){re.escape(p)}(, \**\w+)*( \([^)]*\))?:", body, re.M)]
    if undocumented:
      problems.append(f"{where}: its {'/'.join(headers)} section does not document {undocumented}")
  assert not problems, "\n".join(problems)


def test_api_docs_build_without_warnings(tmp_path):
  sys.path.insert(0, str(ROOT / "docs"))
  try:
    build = importlib.import_module("build")
  finally:
    sys.path.pop(0)
  problems = build.build(tmp_path)
  assert not problems, problems
  assert (tmp_path / "metric_jax.html").exists()
