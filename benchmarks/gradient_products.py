"""The matrix products in a pairwise loss's gradient, timed three ways.

    python benchmarks/gradient_products.py                 # B in {512, 2048, 4096}, D = 128
    python benchmarks/gradient_products.py --batch 2048 --dim 512

A pairwise loss computes ``S = x @ y.T`` ([B, M]) and, in reverse mode, two
products with its cotangent ``G``: ``G @ y`` and ``G^T @ x``. Written
plainly, XLA:CPU runs the second one by contracting over the rows of the
large ``G``, a slow path. Rows of the table (``jax.jit(jax.grad)`` of
``sum(tanh(S))``, median wall time):

* ``plain``: ``jnp.matmul(x, y.T)``, JAX's own derivative;
* ``metric_jax``: ``distances.pairwise(x, y, "dot")``, whose product has a
  JVP rule that transposes the small operands instead (same numbers);
* ``symmetric``: ``distances.self_pairwise_for_symmetric_loss`` (y = x, a
  consumer that weighs (i, j) as (j, i)): one product in the gradient.

``forward`` is the product alone, for scale.
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
import metric_jax as mj  # noqa: E402


def _cases(x, y):
  hi = jax.lax.Precision.HIGHEST
  return {
      "forward": (jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=hi)), (x, y)),
      "plain": (jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.tanh(jnp.matmul(a, b.T, precision=hi))),
                                 argnums=(0, 1))), (x, y)),
      "metric_jax": (jax.jit(jax.grad(
          lambda a, b: jnp.sum(jnp.tanh(mj.distances.pairwise(a, b, "dot"))),
          argnums=(0, 1))), (x, y)),
      "plain, y = x": (jax.jit(jax.grad(
          lambda a: jnp.sum(jnp.tanh(jnp.matmul(a, a.T, precision=hi))))), (x,)),
      "metric_jax, y = x": (jax.jit(jax.grad(
          lambda a: jnp.sum(jnp.tanh(mj.distances.pairwise(a, None, "dot"))))), (x,)),
      "symmetric, y = x": (jax.jit(jax.grad(
          lambda a: jnp.sum(jnp.tanh(mj.distances.self_pairwise_for_symmetric_loss(a, "dot"))))),
                           (x,)),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, nargs="+", default=[512, 2048, 4096])
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args(argv)
  print(f"# {common.machine()}")
  print("| B = M | D | case | ms |")
  print("|---|---|---|---|")
  rng = np.random.default_rng(0)
  for b in args.batch:
    x = jnp.asarray(rng.normal(size=(b, args.dim)).astype(np.float32))
    y = jnp.asarray(rng.normal(size=(b, args.dim)).astype(np.float32))
    for name, (fn, fn_args) in _cases(x, y).items():
      seconds = common.median_seconds(lambda: jax.block_until_ready(fn(*fn_args)),
                                      repeats=args.repeats)
      print(f"| {b} | {args.dim} | {name} | {common.fmt_ms(seconds)} |", flush=True)


if __name__ == "__main__":
  main()
