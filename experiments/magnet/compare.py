"""Magnet loss vs semi-hard triplet loss on digits: steps to a MAP@R level.

Same backbone (a 2-layer MLP on the 8x8 pixels), same batch size (40), same
optimiser; train on digits 0-4, evaluate MAP@R and 1-NN (leave-one-out) error
among the unseen digits 5-9 every ``--eval_every`` steps.

* triplet: ``MPerClassSampler`` (5 classes x 8), semi-hard mining, margin 0.1
  (as ``configs/digits.py``).
* magnet: K = 2 clusters per class, M = 5 clusters x D = 8 examples from
  :class:`MagnetSampler`, alpha = 1, cluster index refreshed from the
  current embeddings every ``--refresh_every`` steps; per-cluster losses and
  the variance folded into the index every step.

    python -m experiments.magnet.compare --steps 400 --seeds 0 1
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import metric_jax as mj
from metric_jax import magnet_index as mi
from metric_jax.data import datasets, samplers
from metric_jax.data.magnet_sampler import MagnetSampler


class MLP(nn.Module):
  dim: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.dim)(x)


def scores(emb, labels):
  """(1-NN leave-one-out error, MAP@R) on unnormalised Euclidean embeddings."""
  out = mj.evaluation.retrieval_metrics(np.asarray(emb), labels, normalize=False,
                                        k_values=(1,), metrics=("precision_at_1", "map_at_r"))
  return 1.0 - out["precision_at_1"], out["map_at_r"]


def run(loss_name, seed, steps, eval_every, refresh_every, k=2, m=5, d=8):
  splits = datasets.load_digits()
  tr, te = splits.train, splits.test
  xtr = tr.images(np.arange(len(tr))).reshape(len(tr), -1).astype(np.float32) / 255.0
  xte = te.images(np.arange(len(te))).reshape(len(te), -1).astype(np.float32) / 255.0
  ytr, yte = np.asarray(tr.labels), np.asarray(te.labels)
  model = MLP()
  params = model.init(jax.random.key(seed), xtr[:1])
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)
  num_clusters = k * splits.num_classes_train

  def loss_fn(p, x, y, c):
    e = model.apply(p, x)
    if loss_name == "triplet":
      return mj.losses.triplet_margin_loss(e, y, margin=0.1, mining="semihard"), (
          jnp.zeros(x.shape[0]), 0.0)
    terms, var = mj.losses.magnet_loss(e, y, c, num_clusters=num_clusters, reduction="none",
                                       return_variance=True)
    return jnp.mean(terms), (terms, var)

  @jax.jit
  def step_fn(p, s, x, y, c):
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y, c)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss, aux

  embed = jax.jit(model.apply)
  key = jax.random.key(seed + 100)
  if loss_name == "triplet":
    sampler = samplers.MPerClassSampler(ytr, m * d, m=d, seed=seed)
  else:
    key, sub = jax.random.split(key)
    index = mi.build_index(np.asarray(embed(params, xtr)), ytr, clusters_per_class=k, key=sub)
    sampler = MagnetSampler(index, m, d, seed=seed)
  curve = [(0, *scores(embed(params, xte), yte))]
  for t in range(steps):
    if loss_name == "magnet" and t > 0 and t % refresh_every == 0:
      key, sub = jax.random.split(key)
      index = mi.refresh(index, np.asarray(embed(params, xtr)), sub)
      sampler.update_index(index)
    if loss_name == "magnet":
      ids, cids = sampler.batch(t)
    else:
      ids, cids = sampler.batch_indices(t), np.zeros(m * d, np.int32)
    params, opt_state, _, (terms, var) = step_fn(params, opt_state, xtr[ids], ytr[ids],
                                                 jnp.asarray(cids, jnp.int32))
    if loss_name == "magnet":
      index = mi.update_losses(index, cids, np.asarray(terms))
      index = mi.update_variance(index, float(var))
      sampler.update_index(index)
    if (t + 1) % eval_every == 0:
      curve.append((t + 1, *scores(embed(params, xte), yte)))
  return curve


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--eval_every", type=int, default=25)
  ap.add_argument("--refresh_every", type=int, default=50)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  ap.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.7],
                  help="MAP@R levels")
  args = ap.parse_args()
  print("| loss | seed | " + " | ".join(f"steps to MAP@R >= {t}" for t in args.targets)
        + " | best MAP@R | final MAP@R | final 1-NN err |")
  print("|---|---|" + "---|" * (len(args.targets) + 3))
  for loss_name in ("triplet", "magnet"):
    for seed in args.seeds:
      curve = run(loss_name, seed, args.steps, args.eval_every, args.refresh_every)
      reach = []
      for target in args.targets:
        hit = [s for s, _, mapr in curve if mapr >= target]
        reach.append(str(hit[0]) if hit else f"> {args.steps}")
      maps = [mapr for _, _, mapr in curve]
      print(f"| {loss_name} | {seed} | " + " | ".join(reach)
            + f" | {max(maps):.3f} | {maps[-1]:.3f} | {curve[-1][1]:.3f} |", flush=True)


if __name__ == "__main__":
  main()
