"""One process of the multi-host test (launched by tests/test_multihost.py).

    python tests/multihost_worker.py --out DIR --num-processes 2 --process-id 0 \\
        --devices-per-process 2 --coordinator 127.0.0.1:PORT [--checkpoint]

The launcher sets ``XLA_FLAGS=--xla_force_host_platform_device_count=K``
(fake CPU devices per process) and ``JAX_PLATFORMS=cpu``. With
``--num-processes 1`` nothing is initialised (the single-process
reference); otherwise :func:`metric_jax.sharding.initialize_distributed`
connects the processes. The worker builds a global ``("data",)`` mesh over
every device of every process, feeds each process's half of a PK batch
with :func:`metric_jax.sharding.shard_batch`, runs 3 steps of the library's
jitted train step (``metric_jax.training.steps``: a small convnet on the
8x8 digits, objective = streaming contrastive loss + dense batch-hard
triplet loss), and process 0 writes the final state to
``DIR/state_<num_processes>.npz``. Every process writes
``DIR/process_<num_processes>_<id>.json``: its process index and count, its
local and global device counts, and with ``--checkpoint`` whether the state
it saved with orbax (``metric_jax.training.Checkpointer``, all processes
together) and restored into the same shardings is identical, with the
saved steps.

Exit code 3: gloo CPU collectives are unavailable in this jaxlib.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

B = 16          # global batch: 4 classes x 4 samples
NUM_STEPS = 3


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--devices-per-process", type=int, required=True)
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--checkpoint", action="store_true")
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception as e:  # pylint: disable=broad-except
    print(f"gloo CPU collectives unavailable: {e}", file=sys.stderr)
    sys.exit(3)
  jax.config.update("jax_default_matmul_precision", "highest")
  from metric_jax import sharding  # pylint: disable=import-outside-toplevel
  if args.num_processes > 1:
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                    initialization_timeout=120)
  import numpy as np  # pylint: disable=import-outside-toplevel

  import metric_jax as mj  # pylint: disable=import-outside-toplevel
  from metric_jax import data, models  # pylint: disable=import-outside-toplevel
  from metric_jax import streaming  # pylint: disable=import-outside-toplevel
  from metric_jax.training import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from metric_jax.training import optim, state as state_lib, steps  # pylint: disable=import-outside-toplevel

  assert jax.process_count() == args.num_processes
  assert jax.process_index() == args.process_id
  assert jax.local_device_count() == args.devices_per_process, jax.local_devices()
  assert jax.device_count() == 4, jax.devices()

  splits = data.load("digits")
  model = models.build_model("convnet", embedding_dim=8, features=(8, 16))
  objective = mj.losses.make_objective([
      mj.losses.LossTerm(streaming.streaming_contrastive_loss, kwargs={"tile_size": 6},
                         key="streaming_contrastive"),
      mj.losses.LossTerm("triplet_margin_loss", weight=0.5,
                         kwargs={"mining": "hard", "margin": 0.5}),
  ])
  tx, schedules = optim.make_optimizer(
      {"name": "adamw", "learning_rate": 1e-2, "weight_decay": 1e-4,
       "schedule": "constant"}, total_steps=100)
  init = functools.partial(state_lib.init_train_state, model=model, objective=objective,
                           tx=tx, input_shape=(8, 8, 1),
                           num_classes=splits.num_classes_train, embedding_dim=8)
  preprocess = lambda x, rng, train: data.preprocess(x, rng, train=train)  # noqa: E731
  step_fn = steps.make_train_step(model, objective, tx, preprocess=preprocess,
                                  schedule=schedules["model"])

  mesh = sharding.make_mesh()                      # every device of every process
  key = jax.random.key(0)
  abstract = jax.eval_shape(init, key)
  state_sh = sharding.state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=state_sh)(key)
  train_step = steps.jit_train_step(step_fn, abstract, mesh)

  sampler = data.build_sampler("m_per_class", splits.train.labels, B, m=4)
  local = sharding.local_batch_slice(B)            # this process's rows
  losses = []
  for s in range(NUM_STEPS):
    idx = sampler.batch_indices(s)[local]
    host = {"images": np.asarray(splits.train.images(idx)),
            "labels": np.asarray(splits.train.labels[idx], np.int32)}
    batch = sharding.shard_batch(host, mesh)
    assert batch["labels"].shape == (B,)
    state, metrics = train_step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"].addressable_data(0)))

  def local_copy(leaf):
    return np.asarray(leaf.addressable_data(0))    # replicated: any shard is the value

  flat = {jax.tree_util.keystr(path): local_copy(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
  out = pathlib.Path(args.out)
  n = args.num_processes
  if jax.process_index() == 0:
    np.savez(out / f"state_{n}.npz", losses=np.asarray(losses), **flat)

  report = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count()}
  if args.checkpoint:
    checkpointer = ckpt_lib.Checkpointer(out / f"ckpt_{n}", max_to_keep=1)
    checkpointer.save(NUM_STEPS, state)
    checkpointer.wait()
    target = ckpt_lib.abstract_with_shardings(abstract, state_sh)
    restored = checkpointer.restore(target, NUM_STEPS)
    saved_steps = checkpointer.all_steps()
    checkpointer.close()
    same = all(
        np.array_equal(local_copy(a), local_copy(b_))
        and a.sharding.is_equivalent_to(b_.sharding, a.ndim)
        for a, b_ in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
    report.update(checkpoint_identical=bool(same), checkpoint_steps=saved_steps)
  (out / f"process_{n}_{args.process_id}.json").write_text(json.dumps(report))

  if n > 1:
    jax.distributed.shutdown()
  print(f"process {args.process_id}/{n} done: losses {losses}", flush=True)


if __name__ == "__main__":
  main()
