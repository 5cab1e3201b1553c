"""What a user sees: metrics files, TensorBoard, the summary table and a 2-D
picture of the test embeddings.

Files in the workdir (written by process 0 only):

* ``metrics.jsonl``: one JSON object per line, ``{"step": s, "split":
  "train" | "eval", <name>: value, ...}``, appended and flushed line by line
  (a killed run never leaves a partial line that later lines depend on).
* ``tensorboard/``: TensorBoard event files (tensorboardX).
* ``embeddings_2d.png``: PCA or t-SNE projection of the test embeddings,
  coloured by class (matplotlib's Agg canvas, no global backend change).
* ``final_metrics.json``: the final retrieval metrics.

Every whole-file output is written to a temporary file and renamed.
"""

from __future__ import annotations

__all__ = ["MetricWriter", "format_table", "project_2d", "save_projection_png",
           "write_json", "quiet_library_logs"]

import io
import json
import math
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from metric_jax.training.checkpoint import atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _scalar(v: Any) -> float | int | None:
  try:
    v = np.asarray(v)
  except Exception:  # pragma: no cover - unconvertible values are skipped
    return None
  if v.shape != () or not (np.issubdtype(v.dtype, np.number) or v.dtype == bool):
    return None
  if np.issubdtype(v.dtype, np.integer):
    return int(v)
  return float(v)


class MetricWriter:
  """Appends metrics to ``metrics.jsonl`` and TensorBoard.

  Args:
    workdir: the run directory.
    enabled: write anything at all (False on processes other than 0).
    tensorboard: also write TensorBoard event files.
    truncate_after: on resume, drop lines of ``metrics.jsonl`` with a
      step greater than this (they were logged after the last checkpoint
      and are about to be logged again); None (default) keeps every line.

  Non-scalar values (arrays with a shape, strings) are skipped; call
  :meth:`close` when done.

  Example:
    >>> import json, pathlib, tempfile, numpy as np
    >>> workdir = pathlib.Path(tempfile.mkdtemp())
    >>> w = MetricWriter(workdir, tensorboard=False)
    >>> w.write(1, {"loss": np.float32(0.5), "grad": np.zeros(3), "n": 4})
    {'loss': 0.5, 'n': 4}
    >>> w.write(2, {"loss": 0.25})
    {'loss': 0.25}
    >>> w.close()
    >>> w = MetricWriter(workdir, tensorboard=False, truncate_after=1); w.close()
    >>> [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    [{'step': 1, 'split': 'train', 'loss': 0.5, 'n': 4}]
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               tensorboard: bool = True, truncate_after: int | None = None):
    self.enabled = enabled
    self._tb = None
    self._file = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / METRICS_FILE
    if truncate_after is not None and path.exists():
      keep = []
      for line in path.read_text(encoding="utf-8").splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        if record.get("step", 0) <= truncate_after:
          keep.append(line)
      atomic_write_text(path, "".join(l + "\n" for l in keep))
    self._file = open(path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: heavy
      self._tb = SummaryWriter(logdir=str(workdir / TENSORBOARD_DIR))

  def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict:
    """Writes scalar ``metrics`` at ``step``; returns what was written."""
    record = {}
    for k, v in metrics.items():
      s = _scalar(v)
      if s is not None:
        record[k] = s
    if not self.enabled:
      return record
    line = {"step": int(step), "split": split, **record}
    self._file.write(json.dumps(line, allow_nan=True) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        self._tb.add_scalar(f"{split}/{k}", v, int(step))
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


_TABLE_ORDER = ("precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4",
                "recall_at_8", "r_precision", "map_at_r", "mean_average_precision",
                "mean_reciprocal_rank", "nmi", "ami")

_PRETTY = {"precision_at_1": "P@1", "r_precision": "R-Precision", "map_at_r": "MAP@R",
           "mean_average_precision": "mAP", "mean_reciprocal_rank": "MRR",
           "nmi": "NMI", "ami": "AMI"}


# Metrics printed as they are (not scores in [0, 1]).
_NOT_PERCENT = frozenset({"magnet_variance"})


def format_table(metrics: Mapping[str, Any], title: str = "Retrieval metrics") -> str:
  """A plain-text table of retrieval metrics (percentages for scores).

  Known metrics come first in a fixed order with short names (P@1, R@k,
  MAP@R, ...), then the others sorted; integers and ``num_*`` print as
  integers, scores in [0, 1] as percentages, non-scalars are skipped.

  Args:
    metrics: ``{name: scalar}`` (Python or NumPy/JAX scalars).
    title: the first line (default ``"Retrieval metrics"``).

  Returns:
    The table as one string (no trailing newline).

  Example:
    >>> print(format_table({"precision_at_1": 0.5, "map_at_r": 0.25,
    ...                     "num_queries": 10}))
    Retrieval metrics
    --------------------
    metric         value
    --------------------
    P@1            50.00
    MAP@R          25.00
    num_queries       10
    --------------------
  """
  rows = []
  keys = [k for k in _TABLE_ORDER if k in metrics]
  keys += sorted(k for k in metrics if k not in keys)
  for k in keys:
    v = _scalar(metrics[k])
    if v is None:
      continue
    name = _PRETTY.get(k, k.replace("recall_at_", "R@") if k.startswith("recall_at_") else k)
    if isinstance(v, int) or k.startswith("num_"):
      rows.append((name, f"{int(v):d}"))
    elif k in _NOT_PERCENT:
      rows.append((name, f"{v:.4g}"))
    elif math.isnan(v):
      rows.append((name, "nan"))
    else:
      rows.append((name, f"{100 * v:.2f}"))
  width = max([len(n) for n, _ in rows] + [len("metric")]) + 2
  vwidth = max([len(v) for _, v in rows] + [len("value")])
  rule = "-" * (width + vwidth + 2)
  lines = [title, rule, f"{'metric':<{width}}  {'value':>{vwidth}}", rule]
  lines += [f"{n:<{width}}  {v:>{vwidth}}" for n, v in rows]
  lines.append(rule)
  return "\n".join(lines)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
  """Writes ``data`` (scalars converted to Python numbers) atomically.

  Args:
    path: the destination ``.json`` file (parents created).
    data: a JSON-able mapping; NumPy/JAX scalars become Python numbers.

  Example:
    >>> import json, pathlib, tempfile, numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "final_metrics.json"
    >>> write_json(path, {"precision_at_1": np.float32(0.75), "num_queries": np.int64(8)})
    >>> json.loads(path.read_text())
    {'num_queries': 8, 'precision_at_1': 0.75}
  """
  clean = {k: (_scalar(v) if _scalar(v) is not None else v) for k, v in data.items()}
  atomic_write_text(path, json.dumps(clean, indent=2, sort_keys=True) + "\n")


def project_2d(embeddings: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
  """[N, D] -> [N, 2] by PCA (SVD of the centred data) or t-SNE (sklearn).

  Args:
    embeddings: [N, D] float array, N >= 2 (D = 1 gets a zero second
      column).
    method: ``"pca"`` (default) or ``"tsne"`` (perplexity
      ``min(30, max(2, (N - 1) / 3))``).
    seed: t-SNE random state (default 0; PCA is deterministic).

  Returns:
    [N, 2] float64 coordinates.

  Example:
    >>> import numpy as np
    >>> x = np.array([[0., 1., 1.], [2., 1., 1.], [4., 1., 1.]])   # spread along axis 0
    >>> xy = project_2d(x)
    >>> xy.shape, np.abs(xy).round(6).tolist()
    ((3, 2), [[2.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    >>> project_2d(x[:1])
    Traceback (most recent call last):
    ...
    ValueError: `embeddings` must be [N >= 2, D], got shape (1, 3).
  """
  x = np.asarray(embeddings, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"`embeddings` must be [N >= 2, D], got shape {x.shape}.")
  if method == "pca":
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    if out.shape[1] < 2:
      out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out
  if method == "tsne":
    from sklearn.manifold import TSNE
    perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3)))
    return TSNE(n_components=2, init="pca", random_state=seed,
                perplexity=perplexity).fit_transform(x)
  raise ValueError(f"`projection` must be 'pca', 'tsne' or 'none', got {method!r}.")


def save_projection_png(path: str | os.PathLike, embeddings: np.ndarray,
                        labels: np.ndarray, *, method: str = "pca",
                        max_classes: int = 20, title: str = "", seed: int = 0,
                        class_names=None) -> None:
  """Saves a scatter plot of a 2-D projection coloured by class.

  Only the ``max_classes`` most frequent classes are drawn (hundreds of
  colours are unreadable); the projection is fitted on those points.
  ``class_names[label]`` (e.g. a source's ``class_ids``) labels the legend.

  Args:
    path: the ``.png`` file (written atomically, parents created).
    embeddings: [N, D] float embeddings.
    labels: [N] integer labels.
    method: ``"pca"`` (default) or ``"tsne"``, see :func:`project_2d`.
    max_classes: number of most frequent classes drawn (default 20; with
      more than 20 the legend is omitted).
    title: the plot title (default: method and number of classes).
    seed: t-SNE random state (default 0).
    class_names: None (default: the labels) or a sequence / mapping
      indexed by label.

  Example:
    >>> import pathlib, tempfile, numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "embeddings_2d.png"
    >>> x = np.random.default_rng(0).normal(size=(12, 4))
    >>> save_projection_png(path, x, np.arange(12) % 3, max_classes=2)
    >>> path.read_bytes()[:4]
    b'\x89PNG'
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  labels = np.asarray(labels)
  classes, counts = np.unique(labels, return_counts=True)
  keep = classes[np.argsort(-counts, kind="stable")[:max_classes]]
  sel = np.isin(labels, keep)
  xy = project_2d(np.asarray(embeddings)[sel], method, seed)
  lab = labels[sel]
  fig = Figure(figsize=(6, 6), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  import matplotlib
  few = len(keep) <= 20
  colours = matplotlib.colormaps["tab20" if few else "hsv"]
  for i, c in enumerate(sorted(keep)):
    pts = xy[lab == c]
    colour = colours(i) if few else colours(i / max(len(keep) - 1, 1))
    name = class_names[c] if class_names is not None else c
    ax.scatter(pts[:, 0], pts[:, 1], s=6, color=colour,
               label=str(name) if few else None, alpha=0.8)
  if few:
    ax.legend(markerscale=2, fontsize=7, loc="best", title="class")
  ax.set_title(title or f"Test embeddings ({method.upper()}, {len(keep)} classes)")
  ax.set_xticks([])
  ax.set_yticks([])
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  atomic_write_bytes(path, buf.getvalue())


class _DropChattyInfo:
  """A logging filter dropping INFO (and lower) records of noisy libraries."""

  def __init__(self, fragments=("/orbax/", "/matplotlib/")):
    self._fragments = tuple(fragments)

  def filter(self, record) -> bool:
    import logging
    if record.levelno >= logging.WARNING:
      return True
    return not any(f in record.pathname for f in self._fragments)


def quiet_library_logs() -> None:
  """Hides orbax's and matplotlib's INFO lines on the absl log handler
  (entry points call this; warnings and errors still show).

  Idempotent: the filter is installed once.

  Example:
    >>> import logging
    >>> quiet_library_logs(); quiet_library_logs()
    >>> logging.getLogger("orbax").level == logging.WARNING
    True
  """
  import logging
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropChattyInfo) for f in handler.filters):
    handler.addFilter(_DropChattyInfo())
  for name in ("orbax", "matplotlib"):
    logging.getLogger(name).setLevel(logging.WARNING)
