"""Orbax checkpoints of the train state, and the run's stored config.

A workdir looks like::

  workdir/config.json             the config of the run (written atomically)
  workdir/checkpoints/<step>/     finalised orbax checkpoints (keep K)

Orbax writes each checkpoint to ``<step>.orbax-checkpoint-tmp`` and renames it
when complete, so a run killed during a save leaves only a temporary
directory: :meth:`Checkpointer.latest_step` ignores it and the manager
removes it on the next start (``cleanup_tmp_directories``). Saves are
asynchronous (device-to-host copy first, then the write in the background);
:meth:`Checkpointer.wait` blocks until they are on disk.

Before restoring, :func:`check_compatible` compares the state the config
would build (shapes and dtypes of every leaf, from ``jax.eval_shape``) with
the checkpoint's metadata, and a few structural config fields with the
stored config, and raises a ``ValueError`` listing the differences; nothing
in the workdir is modified.
"""

from __future__ import annotations

__all__ = [
    "Checkpointer",
    "STRUCTURAL_KEYS",
    "check_compatible",
    "config_differences",
    "load_config",
    "save_config",
    "atomic_write_bytes",
    "atomic_write_text",
]

import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp

from metric_jax.training import state as state_lib

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

# Config fields that a resumed run must share with the stored one: they
# define what the checkpoint *is*, even where shapes happen to agree.
STRUCTURAL_KEYS = ("data.name", "model.name", "model.embedding_dim", "loss.name")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to a temporary file in the same directory, fsyncs it
  and renames it over ``path``: readers see the old or the new file, never
  a partial one.

  Args:
    path: the destination file; missing parent directories are created.
      The file gets mode 0644.
    data: the bytes to write.

  Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "sub" / "blob.bin"
    >>> atomic_write_bytes(path, b"abc")
    >>> path.read_bytes(), sorted(p.name for p in path.parent.iterdir())
    (b'abc', ['blob.bin'])
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o644)   # mkstemp creates 0600; outputs are meant to be shared
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8.

  Args:
    path: the destination file; missing parent directories are created.
    text: the string to write.

  Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
    >>> atomic_write_text(path, "old"); atomic_write_text(path, "new")
    >>> path.read_text(encoding="utf-8")
    'new'
  """
  atomic_write_bytes(path, text.encode("utf-8"))


def _to_dict(config: Any) -> dict:
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=_json_default))


def _json_default(x: Any):
  if hasattr(x, "to_dict"):
    return x.to_dict()
  if isinstance(x, (tuple, set, frozenset)):
    return list(x)
  if hasattr(x, "item"):
    return x.item()
  return repr(x)


def save_config(workdir: str | os.PathLike, config: Any) -> None:
  """Stores ``config`` as ``workdir/config.json`` (atomically, sorted keys,
  2-space indent).

  Args:
    workdir: the run directory (created if missing).
    config: a ``ConfigDict`` or a JSON-able mapping; tuples become lists,
      NumPy scalars numbers and other objects their ``repr``.

  Example:
    >>> import tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> save_config(workdir, {"model": {"name": "resnet50", "embedding_dim": 128}})
    >>> load_config(workdir)["model"]
    {'embedding_dim': 128, 'name': 'resnet50'}
  """
  atomic_write_text(pathlib.Path(workdir) / CONFIG_FILE,
                    json.dumps(_to_dict(config), indent=2, sort_keys=True) + "\n")


def load_config(workdir: str | os.PathLike) -> dict | None:
  """The stored config as a dict, or None if the workdir has none.

  Args:
    workdir: the run directory (reads ``workdir/config.json``).

  Returns:
    The dict written by :func:`save_config`, or None.

  Example:
    >>> import tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> load_config(workdir) is None
    True
    >>> save_config(workdir, {"seed": 3, "steps": (1, 2)})
    >>> load_config(workdir)
    {'seed': 3, 'steps': [1, 2]}
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  return json.loads(path.read_text(encoding="utf-8"))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    if not d and prefix:
      out[prefix[:-1]] = {}
  else:
    out[prefix[:-1]] = d
  return out


def config_differences(stored: dict, config: Any) -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (stored value, new value)}`` for every differing field.

  Args:
    stored: the stored config, as returned by :func:`load_config`.
    config: the new config (``ConfigDict`` or mapping; nested dicts are
      compared leaf by leaf under dotted keys).

  Returns:
    The differing fields, sorted by key; a field present on one side only
    has ``"<absent>"`` on the other.

  Example:
    >>> stored = {"model": {"name": "resnet50"}, "seed": 0}
    >>> config_differences(stored, {"model": {"name": "resnet50"}, "seed": 1, "extra": 2})
    {'extra': ('<absent>', 2), 'seed': (0, 1)}
  """
  a, b = _flatten(stored), _flatten(_to_dict(config))
  return {k: (a.get(k, "<absent>"), b.get(k, "<absent>"))
          for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")}


def check_compatible(workdir: str | os.PathLike, config: Any, abstract_state: Any,
                     stored_state: dict[str, tuple] | None, step: int | None) -> dict:
  """Raises ``ValueError`` if ``workdir`` holds a run of another shape.

  Args:
    workdir: the run directory.
    config: the new config.
    abstract_state: ``jax.eval_shape`` of the state the config builds.
    stored_state: :func:`metric_jax.training.state.describe` of the
      checkpoint's metadata (None when there is no checkpoint).
    step: the checkpoint's step (for the message).

  Returns:
    The config differences that are allowed (e.g. a longer
    ``num_train_steps``), ``{key: (stored, new)}``.

  Raises:
    ValueError: when a :data:`STRUCTURAL_KEYS` field differs from the
      stored config or a state leaf differs in path, shape or dtype; the
      message lists every difference.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp
    >>> workdir = tempfile.mkdtemp()
    >>> save_config(workdir, {"model": {"name": "resnet50"}, "num_train_steps": 10})
    >>> abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    >>> stored = {"w": ((3,), "float32")}
    >>> check_compatible(workdir, {"model": {"name": "resnet50"}, "num_train_steps": 20},
    ...                  abstract, stored, step=10)
    {'num_train_steps': (10, 20)}
    >>> check_compatible(workdir, {"model": {"name": "vit"}, "num_train_steps": 10},
    ...                  abstract, {"w": ((4,), "float32")}, step=10)
    Traceback (most recent call last):
    ...
    ValueError: workdir '...' holds a checkpoint (step 10) of a different configuration; ...
  """
  stored_config = load_config(workdir)
  diffs = config_differences(stored_config, config) if stored_config is not None else {}
  if stored_state is None:
    return diffs
  problems = [f"  config {k}: checkpoint has {diffs[k][0]!r}, config has {diffs[k][1]!r}"
              for k in STRUCTURAL_KEYS if k in diffs]
  wanted = state_lib.describe(abstract_state)
  for path in sorted(set(wanted) | set(stored_state)):
    if path not in stored_state:
      problems.append(f"  state {path}: not in the checkpoint (config expects {wanted[path]})")
    elif path not in wanted:
      problems.append(f"  state {path}: in the checkpoint {stored_state[path]}, not in the config")
    elif wanted[path] != stored_state[path]:
      problems.append(f"  state {path}: checkpoint {stored_state[path]}, config {wanted[path]}")
  if problems:
    shown = problems[:20] + ([f"  ... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    other = [k for k in diffs if k not in STRUCTURAL_KEYS]
    raise ValueError(
        f"workdir {str(workdir)!r} holds a checkpoint (step {step}) of a different "
        f"configuration; refusing to resume or overwrite it:\n" + "\n".join(shown)
        + (f"\nOther config differences: {', '.join(other)}." if other else "")
        + "\nUse a new --workdir, or the config the run was started with.")
  return diffs


class Checkpointer:
  """Saves and restores :class:`~metric_jax.training.state.TrainState` s.

  Args:
    directory: where checkpoints live (``workdir/checkpoints``).
    max_to_keep: number of most recent checkpoints kept.
    async_save: write in a background thread (call :meth:`wait` before
      exiting; :meth:`close` does).

  Raises:
    ValueError: if ``max_to_keep < 1``.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp
    >>> ckpt = Checkpointer(tempfile.mkdtemp() + "/checkpoints", async_save=False)
    >>> ckpt.latest_step() is None
    True
    >>> ckpt.save(5, {"w": jnp.arange(3.0)})
    True
    >>> ckpt.latest_step(), ckpt.stored_structure(5)
    (5, {'w': ((3,), 'float32')})
    >>> abstract = jax.eval_shape(lambda: {"w": jnp.zeros(3)})
    >>> ckpt.restore(abstract)["w"].tolist()
    [0.0, 1.0, 2.0]
    >>> ckpt.close()
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               async_save: bool = True):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"`keep_checkpoints` must be >= 1, got {max_to_keep}.")
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._saved: set[int] = set()
    # Naming the handler lets a fresh process read the metadata of
    # existing checkpoints (shapes and dtypes) before restoring them.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The step of the newest finalised checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: state_lib.TrainState) -> bool:
    """Starts saving ``state`` as checkpoint ``step`` (no-op if it exists
    or was already saved by this object)."""
    if step in self._saved or step in self._manager.all_steps():
      return False
    self._saved.add(step)
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)

  def stored_structure(self, step: int) -> dict[str, tuple]:
    """``{path: (shape, dtype)}`` of the checkpoint's state, from metadata."""
    meta = self._manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    if tree is None:
      raise ValueError(f"checkpoint {step} in {str(self.directory)!r} has no readable "
                       f"state metadata.")
    return state_lib.describe(tree)

  def restore(self, abstract_state: Any, step: int | None = None) -> state_lib.TrainState:
    """Restores checkpoint ``step`` (default: latest) into the structure and
    shardings of ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {str(self.directory)!r}.")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` leaves carrying the target shardings."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)
