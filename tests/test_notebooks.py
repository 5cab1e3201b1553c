"""Executes every notebook of ``notebooks/`` (so they cannot rot) and checks
that they are stored without outputs.

Each notebook runs top to bottom in a fresh IPython kernel started with this
interpreter (``sys.executable``, through a kernelspec written to a temporary
``JUPYTER_PATH``: no ``ipykernel install`` step needed), in a temporary
working directory, with matplotlib's Agg backend. Any cell that raises
(including the notebooks' own sanity ``assert``s) fails the test with the
cell's traceback.

The kernel inherits this process's environment, including the fake CPU
devices of ``conftest.py``. ``--xla_backend_optimization_level=0`` is added
to ``XLA_FLAGS``: the notebooks' tiny models spend most of their time in XLA
compilation, which it shortens (their results do not depend on it).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("quickstart", "compose_losses", "magnet_and_bregman", "evaluate_and_visualise")
KERNEL_NAME = "metric-jax-test-python"
CELL_TIMEOUT_S = 300


def _write_kernelspec(jupyter_dir: pathlib.Path) -> None:
  spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "metric_jax tests",
      "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")


def test_every_notebook_is_executed():
  found = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
  assert found == sorted(NOTEBOOKS), (
      f"notebooks/ holds {found}; add new notebooks to NOTEBOOKS in {__file__}")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{name}.ipynb cell {i} has outputs; clear them before committing")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path, monkeypatch):
  jupyter_dir = tmp_path / "jupyter"
  _write_kernelspec(jupyter_dir)
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))   # no user profile/startup files
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_backend_optimization_level=0".strip())
  # This checkout's package, whatever the kernel's working directory.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))

  nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S, startup_timeout=120,
      resources={"metadata": {"path": str(workdir)}})
  client.execute()   # raises CellExecutionError (with the traceback) on any error

  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  executed = [c.execution_count for c in nb.cells if c.cell_type == "code"]
  assert all(n is not None for n in executed), "some cells did not run"
