"""The train loop and the evaluate / embed jobs behind ``experiments/``.

:func:`train_and_evaluate` is the whole run in one readable function:

1. validate the config, build the mesh, load the data, the sampler, the
   model, the objective and the optimiser;
2. ``jax.eval_shape`` the initial state; if the workdir holds a
   checkpoint, check that it matches and restore the latest one, else
   initialise (jitted, with the replicated output shardings);
3. for each step: the sampler's global batch indices for that step, this
   process's rows loaded in a background thread, ``train_step`` (jitted,
   sharded, state donated); logging, periodic evaluation and checkpoints;
4. a final checkpoint, evaluation on the test classes, the metric table,
   ``final_metrics.json`` and a 2-D picture of the test embeddings.

Resuming is exact: the sampler's batches and the step's random key are
functions of the step, and the state holds everything else, so a run
stopped at any checkpoint and restarted reproduces an uninterrupted run bit
for bit. Samplers with an ``update_embeddings(embeddings)`` hook (magnet,
lifted) are refreshed every ``config.sampler.refresh_every`` steps with the
embeddings of the whole training set (and once when a run resumes; exact
when the checkpoint step is a multiple of ``refresh_every``).

Samplers with more state (the magnet sampler, :mod:`metric_jax.data.magnet_sampler`):

* ``batch_extras(step)``: per-example keyword arguments of the loss (the
  batch's ``cluster_ids``), loaded and sharded with the batch;
* ``update_from_step(cluster_ids, losses, variance)``: the train step's
  feedback (per-example losses, batch variance; see
  :meth:`metric_jax.training.objective.TrainObjective.feedback`), folded in
  every ``config.sampler.update_every`` steps. Between two updates the
  sampler is frozen, so the prefetched batches do not depend on timing;
* ``state_dict()`` / ``load_state_dict()``: saved as
  ``sampler/step_<N>.npz`` next to each checkpoint and restored on resume,
  so a resumed magnet run continues with the same cluster index, running
  cluster losses and variance (exact, like the train state).

With such a sampler (an index with a running variance), evaluation adds
``nearest_cluster_accuracy`` (eq. 6 on the test classes, see
:func:`metric_jax.magnet_index.nearest_cluster_accuracy`) and, at the end,
``train_nearest_cluster_accuracy`` (eq. 6 on the training set with its
index re-clustered from the final embeddings, the paper's protocol). With ``config.eval.metric =
"bregman"`` retrieval uses the learned divergence of the loss.
"""

from __future__ import annotations

__all__ = ["Experiment", "setup", "train_and_evaluate", "evaluate_checkpoint",
           "embed_checkpoint", "evaluate_embeddings"]

import dataclasses
import inspect
import io
import logging
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from metric_jax import sharding
from metric_jax.training import checkpoint as ckpt_lib
from metric_jax.training import config as config_lib
from metric_jax.training import objective as objective_lib
from metric_jax.training import optim
from metric_jax.training import reporting
from metric_jax.training import state as state_lib
from metric_jax.training import steps as steps_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Experiment:
  """Everything built from a config (see :func:`setup`).

  Attributes:
    config: the validated run config.
    workdir: the run directory (``pathlib.Path``).
    mesh: the data mesh (``config.num_devices`` devices, axis ``"data"``).
    splits: the dataset splits of ``metric_jax.data.load`` (``train``,
      ``test``, ``num_classes_train``, ``image_shape``).
    model: the Flax module ``(images, train) -> [B, E]``.
    objective: the :class:`~metric_jax.training.objective.TrainObjective`.
    tx: the optimiser of ``{"model": ..., "loss": ...}``.
    schedules: ``{"model": schedule, "loss": schedule}``.
    preprocess: ``(images_uint8, rng, train) -> float32``.
    input_shape: ``(H, W, C)`` of the preprocessed images.
    init_key: PRNG key of the state initialisation.
    train_key: base PRNG key of the train steps (folded with the step).
    abstract_state: ``jax.eval_shape`` of the initial
      :class:`~metric_jax.training.state.TrainState`.
    state_shardings: shardings of the state (replicated over the mesh).
    embed: the jitted ``embed(params, batch_stats, images) -> [B, E]``.
    sampler: the batch sampler built for validation (default None; the
      loop builds its own).

  Example:
    A full :func:`setup` loads data and builds the model (seconds); the
    fields:

    >>> import dataclasses
    >>> [f.name for f in dataclasses.fields(Experiment)][:6]
    ['config', 'workdir', 'mesh', 'splits', 'model', 'objective']
  """
  config: Any
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  splits: Any
  model: Any
  objective: Any
  tx: Any
  schedules: dict
  preprocess: Callable
  input_shape: tuple
  init_key: jax.Array
  train_key: jax.Array
  abstract_state: Any
  state_shardings: Any
  embed: Callable
  sampler: Any = None

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def init_state(self) -> state_lib.TrainState:
    """The initial state (with ``config.model.pretrained`` weights loaded
    into the backbone and the optimiser state rebuilt for them)."""
    init = jax.jit(self._init_fn(), out_shardings=self.state_shardings)
    state = init(self.init_key)
    path = self.config.model.get("pretrained")
    if path:
      from metric_jax.models import torch_convert
      variables = torch_convert.load_torch_resnet(
          path, {"params": state.params, "batch_stats": state.batch_stats})
      log.info("Loaded pretrained backbone weights from %s", path)

      def rebuild(step, params, batch_stats, loss_params):
        opt_state = self.tx.init({"model": params, "loss": loss_params})
        return state_lib.TrainState(step=step, params=params, batch_stats=batch_stats,
                                    loss_params=loss_params, opt_state=opt_state)

      state = jax.jit(rebuild, out_shardings=self.state_shardings)(
          state.step, variables["params"], variables.get("batch_stats", {}),
          state.loss_params)
    return state

  def _init_fn(self) -> Callable:
    def init(key):
      return state_lib.init_train_state(
          key, self.model, self.objective, self.tx, input_shape=self.input_shape,
          num_classes=self.splits.num_classes_train,
          embedding_dim=self.config.model.embedding_dim)
    return init

  def embed_split(self, state, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    source = getattr(self.splits, split)
    emb = steps_lib.embed_source(self.embed, state.params, state.batch_stats, source,
                                 self.mesh, self.config.eval.batch_size)
    return emb, np.asarray(source.labels)


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> None:
  labels = np.asarray(labels)
  if labels.size == 0:
    raise ValueError(f"`{name}` is empty.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"`{name}` must be integers, got dtype {labels.dtype}.")
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0 or hi >= num_classes:
    raise ValueError(
        f"`{name}` must lie in [0, {num_classes}) (num_classes_train), "
        f"got values in [{lo}, {hi}].")


def setup(config, workdir) -> Experiment:
  """Builds mesh, data, model, objective, optimiser and abstract state.

  Validates ``config`` first (:func:`metric_jax.training.config.validate`,
  batch sizes divisible by the device count); touches no file in
  ``workdir``.

  Args:
    config: a config built on
      :func:`metric_jax.training.config.base_config`.
    workdir: the run directory (str or path; need not exist).

  Returns:
    An :class:`Experiment` (``abstract_state`` by ``jax.eval_shape``: no
    parameters are allocated).

  Raises:
    ValueError: for an invalid config, naming the field.

  Example:
    A real setup loads the dataset (seconds); bad input is rejected before
    that:

    >>> import tempfile
    >>> from metric_jax.training import config as config_lib
    >>> c = config_lib.base_config()
    >>> c.batch_size = 0
    >>> setup(c, tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    ValueError: `config.batch_size` must be an int >= 1, got 0.
  """
  from metric_jax import data as data_lib
  from metric_jax import models as models_lib

  config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  mesh = sharding.make_mesh(config.num_devices)
  sharding.check_batch_size(config.batch_size, mesh, "config.batch_size")
  sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
  model = models_lib.build_model(config.model.name,
                                 embedding_dim=config.model.embedding_dim,
                                 dtype=config_lib.compute_dtype(config),
                                 **config.model.kwargs.to_dict())
  splits = data_lib.load(config.data.name, **config.data.options.to_dict())
  _check_labels(splits.train.labels, splits.num_classes_train, "train labels")
  sampler = _build_sampler_from(config, splits)
  objective = objective_lib.TrainObjective(
      config, num_clusters=getattr(sampler, "num_clusters", None))
  preprocess = config_lib.preprocess_from_config(config)
  out = jax.eval_shape(lambda x: preprocess(x, jax.random.key(0), False),
                       jax.ShapeDtypeStruct((1, *splits.image_shape), jnp.uint8))
  input_shape = tuple(out.shape[1:])
  tx, schedules = optim.make_optimizer(config.optimizer, config.num_train_steps)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  exp = Experiment(
      config=config, workdir=workdir, mesh=mesh, splits=splits, model=model,
      objective=objective, tx=tx, schedules=schedules, preprocess=preprocess,
      input_shape=input_shape, init_key=init_key, train_key=train_key,
      abstract_state=None, state_shardings=None, embed=None, sampler=sampler)
  exp.abstract_state = jax.eval_shape(exp._init_fn(), init_key)
  exp.state_shardings = sharding.state_shardings(exp.abstract_state, mesh)
  # The model computes in config.compute_dtype itself (its `dtype`), so the
  # steps' generic parameter cast is not needed here.
  exp.embed = steps_lib.jit_embed_fn(steps_lib.make_embed_fn(model, preprocess=preprocess),
                                     mesh)
  return exp


def _restore_latest(exp: Experiment, checkpointer: ckpt_lib.Checkpointer,
                    step: int | None = None):
  """Checks compatibility with the workdir and restores; (state, step)."""
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    ckpt_lib.check_compatible(exp.workdir, exp.config, exp.abstract_state, None, None)
    return None, 0
  diffs = ckpt_lib.check_compatible(exp.workdir, exp.config, exp.abstract_state,
                                    checkpointer.stored_structure(step), step)
  if diffs:
    log.info("Config changes since the stored config: %s",
             {k: v for k, v in diffs.items()})
  target = ckpt_lib.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
  return checkpointer.restore(target, step), step


def evaluate_embeddings(embeddings: np.ndarray, labels: np.ndarray, config,
                        seed: int = 0, metric: Any = None) -> dict[str, float]:
  """Retrieval and clustering metrics (``metric_jax.evaluation.evaluate``)
  with the options of ``config.eval``, as Python numbers. ``metric``
  overrides ``config.eval.metric`` (e.g. a learned Bregman divergence).

  Every example is a query against all the others (leave-one-out).

  Args:
    embeddings: [N, E] float embeddings.
    labels: [N] integer labels.
    config: the run config; reads ``eval.k_values``, ``eval.metric``,
      ``eval.normalize`` and ``eval.clustering``.
    seed: key of the k-means of the clustering metrics (default 0).
    metric: None (default: ``config.eval.metric``), a metric name or a
      callable metric.

  Returns:
    ``{name: float}`` (``int`` for counts such as ``num_queries``).

  Example:
    >>> import numpy as np
    >>> from metric_jax.training import config as config_lib
    >>> c = config_lib.base_config()
    >>> c.eval.k_values = (1,); c.eval.clustering = False
    >>> x = np.array([[0., 1.], [0., 1.1], [1., 0.], [1.1, 0.1]], np.float32)
    >>> m = evaluate_embeddings(x, np.array([0, 0, 1, 1]), c)
    >>> m["precision_at_1"], m["map_at_r"], m["num_queries"]
    (1.0, 1.0, 4)
  """
  from metric_jax import evaluation
  e = config.eval
  metrics = evaluation.evaluate(
      jnp.asarray(embeddings), jnp.asarray(labels), k_values=tuple(e.k_values),
      metric=e.metric if metric is None else metric, normalize=e.normalize,
      clustering=e.clustering, key=jax.random.key(seed))
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    integral = np.issubdtype(v.dtype, np.integer) or k.startswith("num_")
    out[k] = int(v) if integral else float(v)
  return out


def _has_index(sampler) -> bool:
  """Whether ``sampler`` holds a magnet cluster index (with a variance)."""
  index = getattr(sampler, "index", None)
  return index is not None and hasattr(index, "variance")


def _nearest_cluster_metrics(exp: Experiment, sampler, emb, labels,
                             state=None) -> dict[str, float]:
  """Eq. 6 accuracies of a magnet run (``{}`` for other samplers)."""
  if not _has_index(sampler):
    return {}
  from metric_jax import magnet_index as mi
  index = sampler.index
  x = emb
  if exp.config.loss.normalize_embeddings:   # the space the index lives in
    x = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  out = {"nearest_cluster_accuracy": mi.nearest_cluster_accuracy(
      x, labels, clusters_per_class=index.clusters_per_class, variance=index.variance,
      L=exp.config.eval.nearest_cluster_L, key=jax.random.key(exp.config.seed))}
  if state is not None:
    train, train_labels = exp.embed_split(state, "train")
    if exp.config.loss.normalize_embeddings:
      train = train / np.maximum(np.linalg.norm(train, axis=-1, keepdims=True), 1e-12)
    # The index of the current embeddings (warm-started k-means; the
    # sampler's own index is left as it is).
    fresh = mi.refresh(index, train, jax.random.key(exp.config.seed))
    pred = mi.nearest_cluster_predict(fresh, train, L=exp.config.eval.nearest_cluster_L)
    out["train_nearest_cluster_accuracy"] = float(np.mean(pred == train_labels))
  out["magnet_variance"] = float(index.variance)
  return out


def _evaluate_state(exp: Experiment, state, sampler=None, final: bool = False):
  """Test embeddings and metrics of ``state`` (learned retrieval metric,
  nearest-cluster accuracy of a magnet sampler)."""
  emb, labels = exp.embed_split(state, "test")
  metric = exp.objective.eval_metric(state.loss_params)
  metrics = evaluate_embeddings(emb, labels, exp.config, exp.config.seed, metric=metric)
  metrics.update(_nearest_cluster_metrics(exp, sampler, emb, labels,
                                          state=state if final else None))
  return emb, labels, metrics


def _accepts(fn, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _refresh_sampler(exp: Experiment, sampler, state, step: int = 0) -> None:
  emb, _ = exp.embed_split(state, "train")
  if exp.config.loss.normalize_embeddings and hasattr(sampler, "update_from_step"):
    # The magnet loss sees normalised embeddings: cluster them in that space.
    emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  if _accepts(sampler.update_embeddings, "step"):
    sampler.update_embeddings(emb, step=step)
  else:
    sampler.update_embeddings(emb)


def _batches(exp: Experiment, sampler, start: int, stop: int):
  """(step, host batch) for steps [start, stop); this process's rows."""
  train = exp.splits.train
  local = sharding.local_batch_slice(exp.config.batch_size)
  with_extras = hasattr(sampler, "batch_extras")
  for step in range(start, stop):
    idx = np.asarray(sampler.batch_indices(step))
    if idx.shape != (exp.config.batch_size,):
      raise ValueError(
          f"sampler {exp.config.sampler.name!r} returned indices of shape {idx.shape} "
          f"at step {step}, expected ({exp.config.batch_size},).")
    idx = idx[local]
    batch = {"images": train.images(idx), "labels": train.labels[idx].astype(np.int32)}
    if with_extras:
      batch["extras"] = {k: np.asarray(v)[local] for k, v in sampler.batch_extras(step).items()}
    yield step, batch


def _segments(start: int, total: int, refresh_every: int, sync_every: int = 0):
  """Step ranges of a frozen sampler: [(a, b, refresh_at_a)].

  Boundaries at the multiples of ``refresh_every`` (a refresh of the
  sampler's embeddings) and of ``sync_every`` (feedback folded in, sampler
  state saved); the first segment refreshes whenever ``refresh_every``."""
  periods = [p for p in (refresh_every, sync_every) if p]
  if not periods:
    return [(start, total, False)]
  out, a = [], start
  while a < total:
    b = min([total] + [(a // p + 1) * p for p in periods])
    out.append((a, b, bool(refresh_every) and (a == start or a % refresh_every == 0)))
    a = b
  return out


SAMPLER_DIR = "sampler"


def _sampler_path(workdir: pathlib.Path, step: int) -> pathlib.Path:
  return workdir / SAMPLER_DIR / f"step_{step}.npz"


def _save_sampler(exp: Experiment, sampler, step: int, keep: list[int]) -> None:
  """Writes ``sampler/step_<step>.npz`` (main process) and removes files of
  steps whose checkpoints are gone."""
  if not exp.is_main or not hasattr(sampler, "state_dict"):
    return
  if getattr(sampler, "index", True) is None:
    return
  buf = io.BytesIO()
  np.savez(buf, **sampler.state_dict())
  ckpt_lib.atomic_write_bytes(_sampler_path(exp.workdir, step), buf.getvalue())
  keep = set(keep) | {step}
  for path in (exp.workdir / SAMPLER_DIR).glob("step_*.npz"):
    try:
      s = int(path.stem[len("step_"):])
    except ValueError:
      continue
    if s not in keep:
      path.unlink(missing_ok=True)


def _load_sampler(exp: Experiment, sampler, step: int) -> bool:
  """Restores the sampler state saved at ``step``; False if there is none."""
  path = _sampler_path(exp.workdir, step)
  if not hasattr(sampler, "load_state_dict") or not path.exists():
    return False
  with np.load(path) as f:
    sampler.load_state_dict({k: f[k] for k in f.files})
  return True


def _apply_feedback(sampler, pending: list) -> None:
  """Folds the feedback of finished steps into the sampler, in step order."""
  for step, feedback in pending:
    feedback = jax.device_get(feedback)
    cluster_ids = sampler.batch_extras(step)["cluster_ids"]
    sampler.update_from_step(cluster_ids, np.asarray(feedback["losses"]),
                             feedback.get("variance"))
  pending.clear()


def _final_report(exp: Experiment, state, step: int, writer, quiet: bool = False,
                  sampler=None) -> dict:
  emb, labels, metrics = _evaluate_state(exp, state, sampler, final=True)
  if exp.is_main:
    writer.write(step, metrics, split="eval")
    reporting.write_json(exp.workdir / "final_metrics.json", {"step": step, **metrics})
    if exp.config.projection != "none":
      try:
        reporting.save_projection_png(
            exp.workdir / "embeddings_2d.png", emb, labels, method=exp.config.projection,
            max_classes=exp.config.plot_max_classes, seed=exp.config.seed,
            class_names=np.asarray(exp.splits.test.class_ids),
            title=f"{exp.config.data.name} test embeddings, step {step} "
                  f"({exp.config.projection.upper()})")
      except Exception as e:  # a plot must never lose a finished run
        log.warning("could not write the embedding plot: %s", e)
    if not quiet:
      print(reporting.format_table(
          metrics, title=f"Retrieval metrics: {exp.config.data.name} test classes, "
                         f"step {step}"), flush=True)
  return metrics


def train_and_evaluate(config, workdir) -> dict[str, float]:
  """Trains (or resumes) and evaluates; returns the final test metrics.

  Args:
    config: a locked ``ml_collections.ConfigDict`` (see
      :mod:`metric_jax.training.config`).
    workdir: run directory (checkpoints, logs, metrics, plot).

  Returns:
    The retrieval metrics of ``metric_jax.evaluation.evaluate`` on the test
    classes (plus the nearest-cluster accuracies of a magnet run), and
    ``"step"`` and ``"train_loss"`` (last logged loss).

  Raises:
    ValueError: for an invalid config (before any data is loaded), or a
      workdir holding a checkpoint of another configuration
      (:func:`metric_jax.training.checkpoint.check_compatible`).

  Example:
    A run takes seconds even on the tiny ``configs/digits.py`` config (see
    ``experiments/``); a bad config fails at once, before data loading:

    >>> import tempfile
    >>> from metric_jax.training import config as config_lib
    >>> c = config_lib.base_config()
    >>> c.optimizer.name = "adam"
    >>> train_and_evaluate(c, tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    ValueError: Unknown `config.optimizer.name` 'adam'; valid names: adamw, sgd, rmsprop.
  """
  from tqdm.auto import tqdm

  exp = setup(config, workdir)
  workdir = exp.workdir
  if exp.is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = ckpt_lib.Checkpointer(workdir / ckpt_lib.CHECKPOINT_DIR,
                                       max_to_keep=config.keep_checkpoints)
  try:
    state, start = _restore_latest(exp, checkpointer)
    if state is None:
      state = exp.init_state()
      log.info("Initialised a new run in %s", workdir)
    else:
      log.info("Resumed from step %d in %s", start, workdir)
    if exp.is_main:
      ckpt_lib.save_config(workdir, config)
    total = config.num_train_steps
    sampler = _build_sampler(exp)
    train_step = steps_lib.jit_train_step(
        steps_lib.make_train_step(
            exp.model, exp.objective, exp.tx, preprocess=exp.preprocess,
            schedule=exp.schedules["model"],
            normalize_embeddings=config.loss.normalize_embeddings),
        exp.abstract_state, exp.mesh)
    writer = reporting.MetricWriter(workdir, enabled=exp.is_main, truncate_after=start)
    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (config.progress_bar and exp.is_main), mininterval=0.5)
    refresh = config.sampler.refresh_every if hasattr(sampler, "update_embeddings") else 0
    if config.sampler.refresh_every and not refresh:
      log.warning("config.sampler.refresh_every=%d but sampler %r has no update_embeddings.",
                  config.sampler.refresh_every, config.sampler.name)
    with_feedback = hasattr(sampler, "update_from_step")
    stateful = hasattr(sampler, "state_dict")
    sync_every = 0
    if with_feedback or stateful:
      sync_every = int(np.gcd(config.sampler.update_every if with_feedback else 0,
                              config.checkpoint_every if stateful else 0))
    restored = start > 0 and _load_sampler(exp, sampler, start)
    pending = []       # (step, device feedback) not yet folded into the sampler
    last_loss = float("nan")
    in_flight = None
    t_last, step_last = time.perf_counter(), start
    for a, b, do_refresh in _segments(start, total, refresh, sync_every):
      if pending:
        _apply_feedback(sampler, pending)
      if stateful and a > start and a % config.checkpoint_every == 0:
        _save_sampler(exp, sampler, a, checkpointer.all_steps())
      if do_refresh and not (restored and a == start and a % refresh):
        _refresh_sampler(exp, sampler, state, step=a)
      for step, host_batch in steps_lib.prefetch(_batches(exp, sampler, a, b)):
        batch = sharding.shard_batch(host_batch, exp.mesh)
        state, metrics = train_step(state, batch, exp.train_key)
        feedback = metrics.pop("feedback", None)
        if feedback is not None and with_feedback:
          pending.append((step, feedback))
        done = step + 1
        # At most two steps in flight: the host loads the next batch while
        # the device computes, without queueing unboundedly many steps (and
        # their batches); the progress bar's rate and ETA stay truthful.
        if in_flight is not None:
          jax.block_until_ready(in_flight)
        in_flight = metrics["loss"]
        if step == start:   # exclude compilation from the throughput
          jax.block_until_ready(metrics)
          t_last, step_last = time.perf_counter(), done
        if done % config.log_every == 0 or done == total:
          metrics = jax.device_get(metrics)
          now = time.perf_counter()
          rate = (done - step_last) / max(now - t_last, 1e-9) if done > step_last else 0.0
          t_last, step_last = now, done
          metrics["steps_per_sec"] = rate
          metrics["images_per_sec"] = rate * config.batch_size
          record = writer.write(done, metrics)
          last_loss = record["loss"]
          if not np.isfinite(last_loss):
            raise FloatingPointError(
                f"the training loss is {last_loss} at step {done}; not saving this state "
                f"(last checkpoint: {checkpointer.latest_step()}). Lower the learning "
                f"rate or check the data.")
          bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate * config.batch_size:.0f}")
        if done % config.checkpoint_every == 0 or done == total:
          checkpointer.save(done, state)
        if config.eval.every and done % config.eval.every == 0 and done != total:
          if pending and done == b:
            _apply_feedback(sampler, pending)
          _, _, ev = _evaluate_state(exp, state, sampler)
          writer.write(done, ev, split="eval")
          extra = (f" nearest-cluster acc {ev['nearest_cluster_accuracy']:.4f}"
                   if "nearest_cluster_accuracy" in ev else "")
          bar.write(f"step {done}: eval P@1 {ev.get('precision_at_1', float('nan')):.4f} "
                    f"MAP@R {ev.get('map_at_r', float('nan')):.4f}{extra}")
          t_last = time.perf_counter()
        bar.update(1)
    bar.close()
    if pending:
      _apply_feedback(sampler, pending)
    final_step = max(start, total)
    if start >= total:   # (otherwise the loop saved step `total`)
      log.info("Run already at step %d (num_train_steps=%d); evaluating only.", start, total)
      if refresh and not restored:
        _refresh_sampler(exp, sampler, state, step=start)
    elif stateful:
      _save_sampler(exp, sampler, final_step, checkpointer.all_steps())
    checkpointer.wait()
    metrics = _final_report(exp, state, final_step, writer, sampler=sampler)
    writer.close()
  finally:
    checkpointer.close()
  return {**metrics, "step": final_step, "train_loss": last_loss}


def _build_sampler_from(config, splits):
  from metric_jax.data import samplers
  return samplers.build_sampler(config.sampler.name, splits.train.labels,
                                config.batch_size, seed=config.seed,
                                **config.sampler.kwargs.to_dict())


def _build_sampler(exp: Experiment):
  """A fresh sampler of the run (the loop mutates its own)."""
  return _build_sampler_from(exp.config, exp.splits)


def _open_existing(exp: Experiment) -> tuple[ckpt_lib.Checkpointer, int]:
  directory = exp.workdir / ckpt_lib.CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoints in workdir {str(exp.workdir)!r}.")
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=None)
  step = checkpointer.latest_step()
  if step is None:
    checkpointer.close()
    raise FileNotFoundError(f"no finalised checkpoint in {str(directory)!r}.")
  return checkpointer, step


def evaluate_checkpoint(config, workdir, step: int | None = None,
                        split: str = "test") -> dict[str, float]:
  """Metrics of the latest (or given) checkpoint of ``workdir`` on
  ``split``; prints the table and writes ``eval_<split>_step_<N>.json``.

  Retrieval uses the learned divergence with ``config.eval.metric =
  "bregman"``; a magnet run's saved cluster index (``sampler/step_<N>.npz``)
  adds the nearest-cluster accuracy.

  Args:
    config: the config of the run (as stored in ``workdir/config.json``;
      see :func:`metric_jax.training.config.config_from_workdir`).
    workdir: the run directory holding ``checkpoints/``.
    step: the checkpoint step (default None: the latest).
    split: ``"test"`` (default) or ``"train"``.

  Returns:
    The metrics of :func:`evaluate_embeddings` plus ``"step"``.

  Raises:
    ValueError: for an invalid config or a checkpoint of another shape.
    FileNotFoundError: if ``workdir`` has no finalised checkpoint.

  Example:
    Restoring and embedding a split takes seconds; bad input fails at once:

    >>> import tempfile
    >>> from metric_jax.training import config as config_lib
    >>> c = config_lib.base_config()
    >>> c.eval.batch_size = 0
    >>> evaluate_checkpoint(c, tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    ValueError: `config.eval.batch_size` must be an int >= 1, got 0.
  """
  exp = setup(config, workdir)
  checkpointer, latest = _open_existing(exp)
  try:
    state, step = _restore_latest(exp, checkpointer, step if step is not None else latest)
  finally:
    checkpointer.close()
  sampler = _build_sampler(exp)
  if not _load_sampler(exp, sampler, step):
    sampler = None
  source = getattr(exp.splits, split)
  emb = steps_lib.embed_source(exp.embed, state.params, state.batch_stats, source,
                               exp.mesh, config.eval.batch_size)
  labels = np.asarray(source.labels)
  metrics = evaluate_embeddings(emb, labels, config, config.seed,
                                metric=exp.objective.eval_metric(state.loss_params))
  metrics.update(_nearest_cluster_metrics(exp, sampler, emb, labels))
  if exp.is_main:
    reporting.write_json(exp.workdir / f"eval_{split}_step_{step}.json",
                         {"step": step, **metrics})
    print(reporting.format_table(
        metrics, title=f"Retrieval metrics: {config.data.name} {split} split, step {step}"),
        flush=True)
  return {**metrics, "step": step}


def embed_checkpoint(config, workdir, split: str = "test", output=None,
                     step: int | None = None) -> pathlib.Path:
  """Writes the embeddings of ``split`` to an ``.npz`` (atomically).

  The file holds ``embeddings`` [N, E] float32, ``labels`` [N] int32,
  ``class_ids`` (the dataset's class id of each label) and ``step``.

  Args:
    config: the config of the run (as stored in ``workdir/config.json``).
    workdir: the run directory holding ``checkpoints/``.
    split: ``"test"`` (default) or ``"train"``.
    output: the ``.npz`` path (default None:
      ``workdir/embeddings_<split>_step_<N>.npz``).
    step: the checkpoint step (default None: the latest).

  Returns:
    The path written (default ``workdir/embeddings_<split>_step_<N>.npz``).

  Raises:
    ValueError: for another ``split``, an invalid config or a checkpoint
      of another shape.
    FileNotFoundError: if ``workdir`` has no finalised checkpoint.

  Example:
    Restoring and embedding a split takes seconds; bad input fails at once:

    >>> import tempfile
    >>> from metric_jax.training import config as config_lib
    >>> embed_checkpoint(config_lib.base_config(), tempfile.mkdtemp(), split="val")
    Traceback (most recent call last):
    ...
    ValueError: `split` must be 'train' or 'test', got 'val'.
  """
  if split not in ("train", "test"):
    raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
  exp = setup(config, workdir)
  checkpointer, latest = _open_existing(exp)
  try:
    state, step = _restore_latest(exp, checkpointer, step if step is not None else latest)
  finally:
    checkpointer.close()
  emb, labels = exp.embed_split(state, split)
  path = pathlib.Path(output) if output else (
      exp.workdir / f"embeddings_{split}_step_{step}.npz")
  if exp.is_main:
    buf = io.BytesIO()
    source = getattr(exp.splits, split)
    np.savez(buf, embeddings=emb.astype(np.float32), labels=labels.astype(np.int32),
             class_ids=np.asarray(source.class_ids), step=np.int64(step))
    ckpt_lib.atomic_write_bytes(path, buf.getvalue())
  return path
