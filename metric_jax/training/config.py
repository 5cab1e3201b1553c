"""The experiment config: defaults, validation and the objects it builds.

Every ``configs/<name>.py`` starts from :func:`base_config` (all fields,
typed), overrides what it needs and returns ``config.lock()``-ed: a misspelt
field or a value of the wrong type (``--config.batch_size=abc``) is
rejected by ``ml_collections``. :func:`validate` then checks values and names
(unknown model, loss, optimiser, schedule or dtype names raise a
``ValueError`` listing the valid ones) before any data is loaded.

Fields (defaults in :func:`base_config`)::

  seed, batch_size (global), num_train_steps, compute_dtype
  data:      name, options, image_size, random_resized_crop, crop_scale, flip, center_crop,
             mean, std
  sampler:   name, kwargs, refresh_every, update_every
  model:     name, embedding_dim, kwargs, pretrained
  loss:      name, weight, kwargs, init_kwargs, learned, normalize_embeddings,
             extra_terms {key: {name, weight, kwargs, init_kwargs, learned}},
             distance ("default" | "bregman"),
             bregman {generator, kwargs, similarity, scale}
  optimizer: name, learning_rate, weight_decay, schedule, warmup_steps, ...
  eval:      batch_size, every, k_values, metric, normalize, clustering,
             nearest_cluster_L
  log_every, checkpoint_every, keep_checkpoints, projection,
  plot_max_classes, progress_bar, num_devices
"""

from __future__ import annotations

__all__ = ["base_config", "validate", "objective_from_config", "preprocess_from_config",
           "config_from_dict", "config_from_workdir", "parse_config_arg",
           "image_retrieval_config", "COMPUTE_DTYPES", "PROJECTIONS", "IMAGENET_MEAN",
           "IMAGENET_STD"]

import functools
from typing import Any

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from metric_jax.training import optim

COMPUTE_DTYPES = ("float32", "bfloat16")
PROJECTIONS = ("pca", "tsne", "none")


def base_config() -> ml_collections.ConfigDict:
  """All config fields with their defaults (unlocked; configs lock it).

  The defaults train the small ``convnet`` on ``digits`` with the semi-hard
  triplet loss (margin 0.2), PK batches of 64 (m = 4 per class) and AdamW
  with cosine decay; see the module docstring for the field list.

  Returns:
    A fresh, unlocked ``ml_collections.ConfigDict``.

  Example:
    >>> c = base_config()
    >>> c.data.name, c.model.name, c.loss.name, c.batch_size, c.optimizer.schedule
    ('digits', 'convnet', 'triplet_margin_loss', 64, 'cosine')
    >>> validate(c)   # the defaults are valid
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64
  c.num_train_steps = 1000
  c.compute_dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.options = ml_collections.ConfigDict()
  c.data.image_size = config_dict.placeholder(int)      # None: native size
  c.data.random_resized_crop = False
  c.data.crop_scale = (0.16, 1.0)     # area fraction range of the random crop
  c.data.flip = False
  c.data.center_crop = 1.0            # fraction of each side kept at evaluation
  c.data.mean = config_dict.placeholder(tuple)
  c.data.std = config_dict.placeholder(tuple)

  c.sampler = ml_collections.ConfigDict()
  c.sampler.name = "m_per_class"
  c.sampler.kwargs = ml_collections.ConfigDict({"m": 4})
  c.sampler.refresh_every = 0        # call sampler.update_embeddings every N steps
  # Samplers with an update_from_step hook (magnet): fold the train steps'
  # feedback (per-cluster losses, batch variance) in every N steps.
  c.sampler.update_every = 1

  c.model = ml_collections.ConfigDict()
  c.model.name = "convnet"
  c.model.embedding_dim = 64
  c.model.kwargs = ml_collections.ConfigDict()
  # torchvision/timm ResNet weights (.pth or .safetensors) for the backbone of
  # a new run (metric_jax.models.torch_convert); None: random initialisation.
  c.model.pretrained = config_dict.placeholder(str)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "triplet_margin_loss"
  c.loss.weight = 1.0
  c.loss.kwargs = ml_collections.ConfigDict({"margin": 0.2, "mining": "semihard"})
  c.loss.init_kwargs = ml_collections.ConfigDict()
  c.loss.learned = True              # use init_<stem> parameters if the loss has them
  c.loss.normalize_embeddings = True
  c.loss.extra_terms = ml_collections.ConfigDict()
  # "bregman": the main term's `distance` is the Bregman divergence of
  # `loss.bregman.generator` (learned ones train with the model, their
  # parameters are loss_params["bregman"]); see metric_jax.training.objective.
  c.loss.distance = "default"
  c.loss.bregman = ml_collections.ConfigDict()
  c.loss.bregman.generator = "icnn"
  c.loss.bregman.kwargs = ml_collections.ConfigDict()  # module attributes / rank
  c.loss.bregman.similarity = False   # -scale * D for similarity losses (N-pair, NT-Xent)
  c.loss.bregman.scale = 1.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 0
  c.optimizer.end_lr_factor = 0.0
  c.optimizer.step_boundaries = ()
  c.optimizer.step_decay = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.rms_decay = 0.99
  c.optimizer.grad_clip_norm = 0.0
  c.optimizer.loss_learning_rate = config_dict.placeholder(float)  # None: same as model
  c.optimizer.loss_weight_decay = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.every = 0                 # steps between evaluations; 0: only at the end
  c.eval.k_values = (1, 2, 4, 8)
  c.eval.metric = "euclidean"
  c.eval.normalize = True
  c.eval.clustering = True
  c.eval.nearest_cluster_L = 8     # magnet runs: L of the eq. 6 nearest-cluster accuracy

  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.projection = "pca"
  c.plot_max_classes = 20
  c.progress_bar = True
  c.num_devices = config_dict.placeholder(int)   # None: all devices
  return c


def _positive(config, key: str, minimum: int = 1) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"`config.{key}` must be an int >= {minimum}, got {value!r}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values and names; raises ``ValueError`` naming the field.

  Checks the positive integers (batch sizes, step counts, intervals), the
  names of the compute dtype, projection, optimiser and schedule, the loss
  and its hyper-parameters (by building :func:`objective_from_config`) and
  the distance / Bregman / magnet settings
  (:func:`metric_jax.training.objective.check_config`).

  Args:
    config: a config built on :func:`base_config` (locked or not).

  Raises:
    ValueError: naming the first invalid field, what it must be and what it
      is.

  Example:
    >>> c = base_config()
    >>> validate(c)
    >>> c.batch_size = 0
    >>> validate(c)
    Traceback (most recent call last):
    ...
    ValueError: `config.batch_size` must be an int >= 1, got 0.
  """
  _positive(config, "batch_size")
  _positive(config, "num_train_steps")
  _positive(config, "log_every")
  _positive(config, "checkpoint_every")
  _positive(config, "keep_checkpoints")
  _positive(config, "eval.batch_size")
  _positive(config, "model.embedding_dim")
  _positive(config, "plot_max_classes")
  _positive(config, "eval.every", minimum=0)
  _positive(config, "sampler.refresh_every", minimum=0)
  _positive(config, "sampler.update_every")
  _positive(config, "eval.nearest_cluster_L")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"`config.compute_dtype` must be one of {COMPUTE_DTYPES}, "
                     f"got {config.compute_dtype!r}.")
  if config.projection not in PROJECTIONS:
    raise ValueError(f"`config.projection` must be one of {PROJECTIONS}, "
                     f"got {config.projection!r}.")
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise ValueError(f"Unknown `config.optimizer.name` {config.optimizer.name!r}; "
                     f"valid names: {', '.join(optim.OPTIMIZERS)}.")
  if config.optimizer.schedule not in optim.SCHEDULES:
    raise ValueError(f"Unknown `config.optimizer.schedule` {config.optimizer.schedule!r}; "
                     f"valid names: {', '.join(optim.SCHEDULES)}.")
  if not config.optimizer.learning_rate >= 0:
    raise ValueError(f"`config.optimizer.learning_rate` must be >= 0, "
                     f"got {config.optimizer.learning_rate}.")
  if config.data.image_size is not None and config.data.image_size < 1:
    raise ValueError(f"`config.data.image_size` must be >= 1 or None, "
                     f"got {config.data.image_size}.")
  for name in ("mean", "std"):
    value = config.data[name]
    if value is not None and not all(isinstance(v, (int, float)) for v in value):
      raise ValueError(f"`config.data.{name}` must be a tuple of numbers, got {value!r}.")
  objective_from_config(config)   # unknown loss names / hyper-parameters
  from metric_jax.training import objective as objective_lib
  objective_lib.check_config(config)   # distance / bregman / magnet settings


def objective_from_config(config: ml_collections.ConfigDict, main_fn=None):
  """The :class:`metric_jax.losses.Objective` of ``config.loss``.

  The main term is ``config.loss.name`` with ``weight``, ``kwargs``,
  ``init_kwargs`` and ``learned``; each ``config.loss.extra_terms[key]``
  adds a term under ``key``.

  Args:
    config: a config built on :func:`base_config`.
    main_fn: None (default: the loss named ``config.loss.name``) or a
      function replacing the main term's loss (same ``__name__``, so the
      same learned parameters;
      :class:`metric_jax.training.objective.TrainObjective` uses it to pass
      per-call inputs such as a learned ``distance`` or the batch's
      ``cluster_ids``).

  Returns:
    The objective ``(embeddings [B, E], labels [B], loss_params) ->
    (total, terms)``.

  Raises:
    ValueError: for an unknown loss name, bad hyper-parameters or an extra
      term without a ``name``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = base_config()
    >>> c.loss.extra_terms = {"tc": {"name": "triplet_center_loss", "weight": 0.1}}
    >>> obj = objective_from_config(c)
    >>> params = obj.init_params(jax.random.key(0), 3, 4)
    >>> sorted(params), params["tc"]["centers"].shape
    (['tc', 'triplet_margin_loss'], (3, 4))
  """
  from metric_jax.losses import composition
  loss = config.loss
  terms = [composition.LossTerm(loss.name if main_fn is None else main_fn,
                                 weight=loss.weight, kwargs=loss.kwargs.to_dict(),
                                 init_kwargs=loss.init_kwargs.to_dict(),
                                 learned=loss.learned)]
  for key, term in loss.extra_terms.items():
    term = term.to_dict() if hasattr(term, "to_dict") else dict(term)
    if "name" not in term:
      raise ValueError(f"`config.loss.extra_terms.{key}` needs a `name`.")
    terms.append(composition.LossTerm(
        term["name"], weight=term.get("weight", 1.0), kwargs=term.get("kwargs", {}),
        init_kwargs=term.get("init_kwargs", {}), key=key,
        learned=term.get("learned", True)))
  return composition.make_objective(terms)


def preprocess_from_config(config: ml_collections.ConfigDict):
  """``preprocess(images_uint8, rng, train) -> float32`` from ``config.data``
  (``metric_jax.data.augment.preprocess`` with the config's options).

  Args:
    config: a config built on :func:`base_config`; reads ``data.image_size``
      (None: native size), ``center_crop``, ``crop_scale``,
      ``random_resized_crop``, ``flip``, ``mean`` and ``std``.

  Returns:
    ``preprocess(images [B, H, W, C] uint8, rng, train) -> [B, S, S, C]
    float32`` (S = ``data.image_size``, or H x W when None); random
    augmentations only when ``train``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = base_config()    # native size, no mean / std: values scaled to [0, 1]
    >>> preprocess = preprocess_from_config(c)
    >>> x = preprocess(jnp.full((2, 3, 3, 1), 255, jnp.uint8), jax.random.key(0), False)
    >>> x.shape, x.dtype, round(float(x.mean()), 4)
    ((2, 3, 3, 1), dtype('float32'), 1.0)
  """
  from metric_jax.data import augment
  d = config.data
  size = None if d.image_size is None else (d.image_size, d.image_size)
  fn = functools.partial(
      augment.preprocess, output_size=size, center_crop=d.center_crop,
      crop_scale=tuple(d.crop_scale),
      random_resized_crop=d.random_resized_crop, flip=d.flip,
      mean=None if d.mean is None else tuple(d.mean),
      std=None if d.std is None else tuple(d.std))

  def preprocess(images, rng, train):
    return fn(images, rng, train=train)

  return preprocess


def compute_dtype(config) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.compute_dtype]


def _assign(cfg: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict):
      if key not in cfg or not isinstance(cfg[key], ml_collections.ConfigDict):
        cfg[key] = ml_collections.ConfigDict()
      _assign(cfg[key], value)
    else:
      cfg[key] = tuple(value) if isinstance(value, list) else value


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
  """A locked config from a stored ``config.json`` dict (on top of
  :func:`base_config`, so every field keeps its type).

  Args:
    values: a nested dict of overrides (e.g.
      :func:`metric_jax.training.checkpoint.load_config`); lists become
      tuples, dicts under fields absent from :func:`base_config` become new
      ``ConfigDict`` s.

  Returns:
    The locked ``ml_collections.ConfigDict``.

  Example:
    >>> c = config_from_dict({"batch_size": 32, "eval": {"k_values": [1, 5]}})
    >>> c.batch_size, c.eval.k_values, c.seed
    (32, (1, 5), 0)
  """
  cfg = base_config()
  _assign(cfg, values)
  cfg.lock()
  return cfg


def config_from_workdir(workdir) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` was started with.

  Args:
    workdir: the run directory holding ``config.json``.

  Returns:
    :func:`config_from_dict` of the stored config (locked).

  Raises:
    FileNotFoundError: if ``workdir`` has no ``config.json``.

  Example:
    >>> import tempfile
    >>> from metric_jax.training import checkpoint
    >>> workdir = tempfile.mkdtemp()
    >>> checkpoint.save_config(workdir, {"num_train_steps": 7})
    >>> config_from_workdir(workdir).num_train_steps
    7
  """
  from metric_jax.training import checkpoint
  stored = checkpoint.load_config(workdir)
  if stored is None:
    raise FileNotFoundError(
        f"workdir {str(workdir)!r} has no {checkpoint.CONFIG_FILE}; pass --config.")
  return config_from_dict(stored)


def parse_config_arg(arg: str | None, allowed) -> set[str]:
  """Options of a config string: ``"runlocal,contrastive"`` ->
  ``{"runlocal", "contrastive"}``; unknown options raise ``ValueError``.

  Args:
    arg: comma-separated options (blanks ignored), or None for none.
    allowed: the valid option names (any iterable of str).

  Returns:
    The set of options.

  Example:
    >>> sorted(parse_config_arg("runlocal, contrastive", {"runlocal", "contrastive"}))
    ['contrastive', 'runlocal']
    >>> parse_config_arg(None, {"runlocal"})
    set()
    >>> parse_config_arg("fast", {"runlocal"})
    Traceback (most recent call last):
    ...
    ValueError: Unknown config option(s) ['fast'] in 'fast'; valid: ['runlocal'].
  """
  opts = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = opts - set(allowed)
  if unknown:
    raise ValueError(f"Unknown config option(s) {sorted(unknown)} in {arg!r}; "
                     f"valid: {sorted(allowed)}.")
  return opts


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_retrieval_config(dataset: str, *, num_train_steps: int, embedding_dim: int = 512,
                           runlocal: bool = False) -> ml_collections.ConfigDict:
  """The common protocol of the CUB-200 / Cars196 / SOP benchmarks (unlocked).

  ResNet-50 (frozen BatchNorm, ImageNet weights via ``model.pretrained``),
  an ``embedding_dim`` linear head, L2-normalised embeddings; PK batches of
  32 classes x 4 images; training images resized to 256 on the host, then
  RandomResizedCrop 224 (scale 0.16-1) and horizontal flips; evaluation on
  the 224 centre crop of the 256 image (``center_crop=0.875``); ImageNet
  mean/std; semi-hard triplet loss (margin 0.2); AdamW with cosine decay;
  bf16 compute. With ``runlocal``: a width-8 ResNet-18 on 32x32 crops for a
  few steps (tests and smoke runs on prepared or mock TFDS data).

  Args:
    dataset: TFDS-style dataset name of ``config.data.name`` (e.g.
      ``"cub200"``, ``"cars196"``, ``"sop"``).
    num_train_steps: length of the run (ignored with ``runlocal``: 4).
    embedding_dim: E of the linear head (default 512; 16 with
      ``runlocal``).
    runlocal: the tiny smoke-test variant (default False).

  Returns:
    The unlocked ``ml_collections.ConfigDict``.

  Example:
    >>> c = image_retrieval_config("cub200", num_train_steps=10000)
    >>> c.model.name, c.model.embedding_dim, c.data.image_size, c.compute_dtype
    ('resnet50', 512, 224, 'bfloat16')
    >>> small = image_retrieval_config("cub200", num_train_steps=10000, runlocal=True)
    >>> small.model.name, small.num_train_steps, small.data.image_size
    ('resnet18', 4, 32)
  """
  c = base_config()
  c.data.name = dataset
  c.data.options = ml_collections.ConfigDict({
      "data_dir": config_dict.placeholder(str),   # TFDS data_dir (None: TFDS default)
      "image_size": 256,                         # host size of every image
  })
  c.data.image_size = 224
  c.data.random_resized_crop = True
  c.data.crop_scale = (0.16, 1.0)
  c.data.flip = True
  c.data.center_crop = 0.875
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.model.name = "resnet50"
  c.model.embedding_dim = embedding_dim
  c.model.kwargs = ml_collections.ConfigDict({"freeze_bn": True})
  c.sampler.name = "m_per_class"
  c.sampler.kwargs.m = 4
  c.batch_size = 128
  c.num_train_steps = num_train_steps
  c.compute_dtype = "bfloat16"
  c.loss.name = "triplet_margin_loss"
  c.loss.kwargs = ml_collections.ConfigDict({"margin": 0.2, "mining": "semihard"})
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 500
  c.eval.batch_size = 256
  c.eval.every = 1000
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.projection = "pca"
  if runlocal:
    c.data.options.image_size = 40
    c.data.image_size = 32
    c.model.name = "resnet18"
    c.model.kwargs.width = 8
    c.model.embedding_dim = 16
    c.batch_size = 8
    c.num_train_steps = 4
    c.compute_dtype = "float32"
    c.optimizer.warmup_steps = 0
    c.eval.batch_size = 8
    c.eval.k_values = (1, 2, 4)
    c.eval.every = 0
    c.eval.clustering = False
    c.log_every = 2
    c.checkpoint_every = 2
    c.progress_bar = False
  return c
