"""Device mesh and shardings for data-parallel training and evaluation.

One mesh axis, ``"data"``: batches are split along their leading axis over
every device of every process, parameters and optimiser state are
replicated. Losses see the *global* batch: under ``jax.jit`` a sharded
``[B, D]`` embedding array is one logical array, so a loss computed on it
compares every example with every other one (negatives from all devices),
and XLA inserts the collectives. Nothing here is specific to one host:
:func:`shard_batch` builds global arrays from each process's local rows with
``jax.make_array_from_process_local_data``.

The mesh axis uses ``AxisType.Auto`` (sharding propagation by the compiler)
so that any loss, including ones that sort or gather along the batch axis,
compiles unchanged on a sharded batch.

Example:
  >>> import jax, numpy as np
  >>> from metric_jax import sharding
  >>> mesh = sharding.make_mesh(num_devices=1)
  >>> x = sharding.shard_batch({"x": np.zeros((4, 2), np.float32)}, mesh)["x"]
  >>> x.shape, x.sharding.spec
  ((4, 2), P('data',))
"""

from __future__ import annotations

__all__ = [
    "DATA_AXIS",
    "make_mesh",
    "batch_sharding",
    "replicated",
    "check_batch_size",
    "local_batch_slice",
    "shard_batch",
    "state_shardings",
    "initialize_distributed",
]

from typing import Any

import jax
import numpy as np

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None,
              devices: Any = None) -> jax.sharding.Mesh:
  """A one-axis ``("data",)`` mesh over ``num_devices`` devices.

  Args:
    num_devices: how many devices to use (default: all of ``jax.devices()``,
      i.e. every device of every process). Must be > 0 and at most the
      number available.
    devices: optional explicit device list (overrides ``num_devices``).

  Returns:
    A ``jax.sharding.Mesh`` with one ``"data"`` axis of type ``Auto``.

  Raises:
    TypeError / ValueError: ``num_devices`` not an int or out of range.

  Example:
    >>> from metric_jax import sharding
    >>> mesh = sharding.make_mesh(num_devices=1)
    >>> mesh.axis_names, mesh.devices.shape
    (('data',), (1,))
  """
  if devices is None:
    available = jax.devices()
    if num_devices is None:
      num_devices = len(available)
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)):
      raise TypeError(f"`num_devices` must be an int, got {num_devices!r}.")
    if not 0 < num_devices <= len(available):
      raise ValueError(
          f"`num_devices` must be in [1, {len(available)}] (devices available), "
          f"got {num_devices}.")
    devices = available[:num_devices]
  devices = list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  """Leading axis split over ``"data"``: ``NamedSharding(mesh, P("data"))``.

  Args:
    mesh: the data mesh (:func:`make_mesh`).

  Returns:
    The ``jax.NamedSharding`` of a batch.

  Example:
    >>> from metric_jax import sharding
    >>> sharding.batch_sharding(sharding.make_mesh(num_devices=1)).spec
    P('data',)
  """
  return jax.NamedSharding(mesh, jax.P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  """Every device holds a full copy: ``NamedSharding(mesh, P())``.

  Args:
    mesh: the data mesh (:func:`make_mesh`).

  Returns:
    The replicated ``jax.NamedSharding`` (parameters, optimiser state).

  Example:
    >>> from metric_jax import sharding
    >>> sharding.replicated(sharding.make_mesh(num_devices=1)).spec
    P()
  """
  return jax.NamedSharding(mesh, jax.P())


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh,
                     name: str = "batch_size") -> None:
  """Raises unless the global batch splits evenly over devices and processes.

  Args:
    batch_size: the global batch size.
    mesh: the data mesh.
    name: the argument name quoted in the error message.

  Raises:
    ValueError: ``batch_size`` is not a multiple of the number of devices
      or of processes.

  Example:
    >>> from metric_jax import sharding
    >>> sharding.check_batch_size(8, sharding.make_mesh(num_devices=1))  # no error
  """
  n_dev = mesh.devices.size
  if batch_size % n_dev:
    raise ValueError(
        f"`{name}` must be divisible by the number of devices ({n_dev}), "
        f"got {batch_size}.")
  if batch_size % jax.process_count():
    raise ValueError(
        f"`{name}` must be divisible by the number of processes "
        f"({jax.process_count()}), got {batch_size}.")


def local_batch_slice(global_batch_size: int) -> slice:
  """The rows of a global batch that this process loads.

  Every process draws the same global batch indices (samplers are functions
  of the step), then loads only its contiguous share of rows.

  Args:
    global_batch_size: rows of the global batch (a multiple of the number
      of processes, see :func:`check_batch_size`).

  Returns:
    ``slice(start, stop)`` of this process's rows.

  Example:
    >>> from metric_jax import sharding
    >>> sharding.local_batch_slice(8)            # one process: every row
    slice(0, 8, None)
  """
  per_process = global_batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def shard_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Assembles global ``P("data")``-sharded arrays from process-local rows.

  Args:
    local_batch: pytree of host arrays whose leading axis holds this
      process's rows (``global_rows / process_count`` of them).
    mesh: the data mesh.

  Returns:
    The same pytree of global ``jax.Array`` s with leading axis
    ``local_rows * process_count``.

  Example:
    >>> import numpy as np
    >>> from metric_jax import sharding
    >>> batch = sharding.shard_batch({"labels": np.arange(4)}, sharding.make_mesh(num_devices=1))
    >>> batch["labels"].shape, batch["labels"].sharding.spec
    ((4,), P('data',))
  """
  sharding = batch_sharding(mesh)
  n_proc = jax.process_count()

  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * n_proc,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, local_batch)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """Replicated sharding for every leaf of a (possibly abstract) state.

  Args:
    abstract_state: pytree of arrays or ``jax.ShapeDtypeStruct`` s (e.g.
      from ``jax.eval_shape``), used as ``out_shardings`` of the jitted
      initialisation.
    mesh: the data mesh.

  Returns:
    A pytree of the same structure holding :func:`replicated` shardings.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from metric_jax import sharding
    >>> state = {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}
    >>> sharding.state_shardings(state, sharding.make_mesh(num_devices=1))["w"].spec
    P()
  """
  rep = replicated(mesh)
  return jax.tree.map(lambda _: rep, abstract_state)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, **kwargs: Any) -> bool:
  """Calls ``jax.distributed.initialize`` for a multi-process run.

  With no arguments nothing happens (single process). On managed clusters
  (Cloud TPU, SLURM) ``jax.distributed.initialize()`` can find its settings
  itself: pass ``coordinator_address="auto"`` for that. On CPU the
  processes exchange data through gloo collectives (JAX's default
  ``jax_cpu_collectives_implementation``).

  Args:
    coordinator_address: ``"host:port"`` of process 0's coordinator (the
      same for every process), ``"auto"``, or None (single process).
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    **kwargs: further ``jax.distributed.initialize`` arguments, e.g.
      ``initialization_timeout`` (seconds) or ``local_device_ids``.

  Returns:
    Whether ``jax.distributed`` was initialised.

  Example:
    >>> from metric_jax import sharding
    >>> sharding.initialize_distributed()        # no arguments: single process
    False
  """
  if (coordinator_address is None and num_processes is None and process_id is None
      and not kwargs):
    return False
  if coordinator_address == "auto":
    jax.distributed.initialize(**kwargs)
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               **kwargs)
  return True
