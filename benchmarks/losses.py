"""Forward+backward time and memory of every loss, next to PML.

    python benchmarks/losses.py                     # all cases, B in {128, 512, 2048}, D in {128, 512}
    python benchmarks/losses.py --compare-pml       # plus PML's equivalent loss and the speed ratio
    python benchmarks/losses.py --only triplet --batch 512 --dim 128
    python benchmarks/losses.py --compare-pml --exact --only nca margin --pml-timeout 300

Inputs: PK batches (4 samples per class), Gaussian embeddings, L2-normalised
for both libraries when the case says so. JAX: ``jax.jit(jax.value_and_grad)``
timed after compilation and one warm-up call; memory is the compiled
executable's planned peak (arguments + outputs + temporaries). PML: the same
inputs as torch tensors, ``loss.backward()``, median wall time; a PML case
that runs past ``--pml-timeout`` seconds (warm-up and timed calls together)
is reported as not finished.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import loss_cases  # noqa: E402
import metric_jax as mj  # noqa: E402


def all_cases():
  cases = []
  for info in sorted(pkgutil.iter_modules(loss_cases.__path__), key=lambda m: m.name):
    module = importlib.import_module(f"benchmarks.loss_cases.{info.name}")
    cases.extend(getattr(module, "CASES", []))
  return cases


def make_inputs(b: int, d: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(b, d)).astype(np.float32)
  labels = np.repeat(np.arange(b // 4), 4).astype(np.int32)
  return emb, labels


def time_jax(case, emb, labels, num_classes, repeats):
  d = emb.shape[1]
  params = case.make_params(jax.random.key(0), num_classes, d) if case.make_params else None

  def loss(e, p):
    if case.normalize:
      e = mj.distances.l2_normalize(e)
    return case.jax_loss(e, labels, p)

  argnums = (0, 1) if params is not None else 0
  step = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  e = jnp.asarray(emb)
  peak = common.compiled_peak_bytes(step, e, params)
  seconds = common.median_seconds(lambda: jax.block_until_ready(step(e, params)),
                                  repeats=repeats)
  return seconds, peak


class PmlTimeout(Exception):
  """A PML case ran past --pml-timeout."""


@contextlib.contextmanager
def _deadline(seconds):
  """Raises PmlTimeout in the main thread after ``seconds`` (torch returns
  to Python between its operations, where the signal is handled)."""
  if not seconds:
    yield
    return

  def on_alarm(signum, frame):
    del signum, frame
    raise PmlTimeout()

  old = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def time_pml(case, emb, labels, num_classes, repeats):
  import torch  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  module = case.pml_loss(num_classes, emb.shape[1])
  if hasattr(module, "to"):
    module = module.to(device)
  t_labels = torch.from_numpy(labels.astype(np.int64)).to(device)
  t_emb = torch.from_numpy(emb).to(device)

  def run():
    e = t_emb.clone().requires_grad_(True)
    if hasattr(module, "zero_grad"):
      module.zero_grad()
    out = module(e, t_labels)
    out.backward()
    if device == "cuda":
      torch.cuda.synchronize()

  return common.median_seconds(run, repeats=repeats)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--compare-pml", action="store_true")
  parser.add_argument("--only", nargs="*", default=[],
                      help="run the cases whose name contains any of these substrings")
  parser.add_argument("--exact", action="store_true",
                      help="--only names whole case names (e.g. 'nca' without 'proxy_nca')")
  parser.add_argument("--pml-timeout", type=float, default=0.0,
                      help="seconds allowed to each PML case (0: no limit)")
  parser.add_argument("--batch", type=int, nargs="*", default=[128, 512, 2048])
  parser.add_argument("--dim", type=int, nargs="*", default=[128, 512])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)

  if args.compare_pml:
    try:
      import pytorch_metric_learning  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      parser.error("--compare-pml needs the compare extra: pip install -e '.[compare]'")

  print(f"# machine: {common.machine()}")
  header = "| loss | B | D | jax ms | jax peak | pml ms | pml/jax |"
  print(header)
  print("|---|---|---|---|---|---|---|")
  for case in all_cases():
    if args.only and not any(part == case.name if args.exact else part in case.name
                             for part in args.only):
      continue
    for b in args.batch:
      for d in args.dim:
        emb, labels = make_inputs(b, d)
        num_classes = b // 4
        try:
          jax_s, peak = time_jax(case, emb, labels, num_classes, args.repeats)
        except Exception as err:  # pylint: disable=broad-except
          print(f"| {case.name} | {b} | {d} | failed: {type(err).__name__}: {str(err)[:100]} |")
          continue
        pml_s, pml_note = None, None
        if args.compare_pml and case.pml_loss is not None:
          try:
            with _deadline(args.pml_timeout):
              pml_s = time_pml(case, emb, labels, num_classes, args.repeats)
          except PmlTimeout:
            pml_note = f"did not finish in {args.pml_timeout:.0f} s"
          except Exception as err:  # pylint: disable=broad-except  # PML OOM / INT_MAX triplets
            print(f"# PML failed for {case.name} B={b} D={d}: {str(err)[:120]}")
        if pml_note:
          pml_col, ratio = pml_note, f"> {args.pml_timeout / (args.repeats + 1) / jax_s:.0f}x"
        else:
          pml_col = common.fmt_ms(pml_s)
          ratio = f"{pml_s / jax_s:.1f}x" if pml_s else "n/a"
        print(f"| {case.name} | {b} | {d} | {common.fmt_ms(jax_s)} | "
              f"{common.fmt_bytes(peak)} | {pml_col} | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
