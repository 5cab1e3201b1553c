"""The matrix products of the matmul-bound losses, timed alone, next to the
whole loss and to PML: how much speed-up over PML those products leave room for.

    python benchmarks/product_floor.py                     # B in {512, 2048}, D = 128
    python benchmarks/product_floor.py --only nca cosface --batch 2048

A loss whose forward and backward need certain matrix products cannot run
faster than those products on a given machine, whatever the rest of it does.
For each case below (named as in ``benchmarks/losses.py``, same inputs) the
script times

* ``jax products`` / ``torch products``: the loss's products alone, back to
  back in one call, at full float32 precision, in XLA:CPU and in torch
  (PML's engine); median wall time;
* ``ours`` / ``pml``: the whole loss, forward + backward, as
  ``benchmarks/losses.py`` does;

and prints ``pml / products``, with ``products`` the faster of the two
product timings: the largest speed-up over PML that any implementation doing
these products in float32 can reach on this machine. Where it is below 2,
issue #8's target (2x PML) is out of reach by arithmetic alone.

The products per case (B anchors, D dimensions, C = B / 4 classes of the PK
batches): a [B, M] matrix of the batch against M references costs one
[B, D] x [D, M] product forward and two backward, ``G @ refs`` and
``G^T @ x``; one backward product when the references get no gradient
(memory) or the loss is symmetric in (i, j) (see
``distances.self_pairwise_for_symmetric_loss``); none when only a few
entries per row carry the gradient (batch-hard recomputes them from the
embeddings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import losses as loss_bench  # noqa: E402


def _pairwise(m_of_b, backward, n_of_b=lambda b: b):
  """Products of an [N, M] matrix, N = n_of_b(B) rows (the batch by
  default) against M = m_of_b(B) references: forward, then the backward ones
  named in ``backward`` ("G refs": G @ refs, "G^T x": G^T @ x)."""
  def plan(b, d):
    n, m = n_of_b(b), m_of_b(b)
    shapes = [(n, d, m)]
    if "G refs" in backward:
      shapes.append((n, m, d))
    if "G^T x" in backward:
      shapes.append((m, n, d))
    return shapes
  return plan


_BOTH = ("G refs", "G^T x")
_SELF = lambda b: b
_CLASSES = lambda b: max(b // 4, 1)

# case name in benchmarks/losses.py -> plan(B, D) -> [(m, k, n)] products.
PLANS = {
    "contrastive": _pairwise(_SELF, ("G refs",)),
    "intra_pair_variance": _pairwise(_SELF, ("G refs",)),
    "triplet (batch-hard)": _pairwise(_SELF, ()),
    "nca": _pairwise(_SELF, _BOTH),
    "instance": _pairwise(_SELF, _BOTH),
    "supcon": _pairwise(_SELF, _BOTH),
    "ranked_list": _pairwise(_SELF, _BOTH),
    # One (anchor, positive) pair per class: a [C, C] softmax.
    "npair": _pairwise(_CLASSES, _BOTH, n_of_b=_CLASSES),
    "normalized_softmax": _pairwise(_CLASSES, _BOTH),
    "arcface": _pairwise(_CLASSES, _BOTH),
    "cosface": _pairwise(_CLASSES, _BOTH),
    "sphereface": _pairwise(_CLASSES, _BOTH),
    "large_margin_softmax": _pairwise(_CLASSES, _BOTH),
    "proxy_nca": _pairwise(_CLASSES, _BOTH),
    "subcenter_arcface": _pairwise(lambda b: 3 * _CLASSES(b), _BOTH),
    "soft_triple": _pairwise(lambda b: 10 * _CLASSES(b), _BOTH),
    "xbm contrastive (memory 4096)": _pairwise(lambda b: 4096, ("G refs",)),
}


def _operands(shapes, rng):
  return [(rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32))
          for m, k, n in shapes]


def time_jax_products(shapes, repeats):
  hi = jax.lax.Precision.HIGHEST
  run = jax.jit(lambda ops: [jnp.matmul(a, b, precision=hi) for a, b in ops])
  ops = [(jnp.asarray(a), jnp.asarray(b)) for a, b in _operands(shapes, np.random.default_rng(0))]
  return common.median_seconds(lambda: jax.block_until_ready(run(ops)), repeats=repeats)


def time_torch_products(shapes, repeats):
  import torch  # pylint: disable=import-outside-toplevel
  ops = [(torch.from_numpy(a), torch.from_numpy(b))
         for a, b in _operands(shapes, np.random.default_rng(0))]
  return common.median_seconds(lambda: [a @ b for a, b in ops], repeats=repeats)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", nargs="*", default=[], help="case names (exact)")
  parser.add_argument("--batch", type=int, nargs="+", default=[512, 2048])
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args(argv)
  unknown = [name for name in args.only if name not in PLANS]
  if unknown:
    parser.error(f"--only: no product plan for {unknown}; known: {sorted(PLANS)}")
  cases = {case.name: case for case in loss_bench.all_cases()}
  names = args.only or list(PLANS)

  print(f"# machine: {common.machine()}")
  print("| loss | B | D | products (m x k x n) | jax products ms | torch products ms "
        "| ours ms | pml ms | pml / ours | pml / products |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for b in args.batch:
    emb, labels = loss_bench.make_inputs(b, args.dim)
    for name in names:
      case = cases[name]
      shapes = PLANS[name](b, args.dim)
      jax_products = time_jax_products(shapes, args.repeats)
      torch_products = time_torch_products(shapes, args.repeats)
      ours, _ = loss_bench.time_jax(case, emb, labels, b // 4, args.repeats)
      pml = loss_bench.time_pml(case, emb, labels, b // 4, args.repeats)
      floor = min(jax_products, torch_products)
      listed = ", ".join(f"{m}x{k}x{n}" for m, k, n in shapes)
      print(f"| {name} | {b} | {args.dim} | {listed} | {common.fmt_ms(jax_products)} "
            f"| {common.fmt_ms(torch_products)} | {common.fmt_ms(ours)} | {common.fmt_ms(pml)} "
            f"| {pml / ours:.1f}x | {pml / floor:.1f}x |", flush=True)


if __name__ == "__main__":
  main()
