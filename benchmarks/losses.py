"""Forward+backward time and memory of every loss, next to PML.

    python benchmarks/losses.py                     # all cases, B in {128, 512, 2048}, D in {128, 512}
    python benchmarks/losses.py --compare-pml       # plus PML's equivalent loss and the speed ratio
    python benchmarks/losses.py --only triplet --batch 512 --dim 128
    python benchmarks/losses.py --compare-pml --exact --only nca margin --pml-timeout 300
    python benchmarks/losses.py --compare-pml --batch 512 2048 --dim 128 --rounds 3  # the published table

Inputs: PK batches (4 samples per class), Gaussian embeddings, L2-normalised
for both libraries when the case says so. JAX: ``jax.jit(jax.value_and_grad)``
timed after compilation and one warm-up call; memory is the compiled
executable's planned peak (arguments + outputs + temporaries). PML: the same
inputs as torch tensors, ``loss.backward()``, median wall time; a PML case
that runs past ``--pml-timeout`` seconds (warm-up and timed calls together)
is reported as not finished. ``--rounds N`` times each case N times, the two
libraries taking turns, and keeps each library's fastest median: both see
the same machine states. PML's times also depend on what ran before in the
process (its tensors reuse the heap that earlier cases grew), so compare
ratios from one run.
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


def jax_runner(case, emb, labels, num_classes):
  """``(run, peak)``: ``run()`` makes one jitted forward + backward call of
  the case (compiled here) and waits for it; ``peak`` is the executable's
  planned peak bytes."""
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
  return (lambda: jax.block_until_ready(step(e, params))), peak


def time_jax(case, emb, labels, num_classes, repeats):
  """``(median seconds, peak bytes)`` of the case's jitted forward + backward."""
  run, peak = jax_runner(case, emb, labels, num_classes)
  return common.median_seconds(run, repeats=repeats), peak


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


def pml_runner(case, emb, labels, num_classes):
  """``run()``: one forward + backward call of the case's PML loss."""
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

  return run


def time_pml(case, emb, labels, num_classes, repeats):
  """Median seconds of the case's PML forward + backward."""
  return common.median_seconds(pml_runner(case, emb, labels, num_classes), repeats=repeats)


def _interleaved_rounds(jax_run, make_pml, args, label):
  """``(jax seconds, pml seconds or None, pml note or None)``: ``args.rounds``
  turns of a median of ``args.repeats`` calls, metric_jax then PML in each
  turn, each library keeping its fastest median. ``make_pml`` (or None)
  builds PML's ``run``. A PML case past ``--pml-timeout`` in any turn is
  reported as not finished; one that fails (out of memory, too many
  triplets) prints why and reports no time."""
  jax_s, pml_s, pml_note, pml_run = float("inf"), None, None, None
  for _ in range(args.rounds):
    jax_s = min(jax_s, common.median_seconds(jax_run, repeats=args.repeats))
    if make_pml is None:
      continue
    try:
      with _deadline(args.pml_timeout):
        pml_run = pml_run or make_pml()
        seconds = common.median_seconds(pml_run, repeats=args.repeats)
      pml_s = seconds if pml_s is None else min(pml_s, seconds)
    except PmlTimeout:
      pml_s, pml_note, make_pml = None, f"did not finish in {args.pml_timeout:.0f} s", None
    except Exception as err:  # pylint: disable=broad-except  # PML OOM / INT_MAX triplets
      print(f"# PML failed for {label}: {str(err)[:120]}")
      pml_s, make_pml = None, None
  return jax_s, pml_s, pml_note


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
  parser.add_argument("--rounds", type=int, default=1,
                      help="time each case this many times, metric_jax and PML taking "
                           "turns, and keep each library's best median (both then see "
                           "the same machine states; default 1)")
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.repeats < 1:
    parser.error(f"--rounds and --repeats must be >= 1, got {args.rounds} and {args.repeats}")

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
        make_pml = None
        if args.compare_pml and case.pml_loss is not None:
          make_pml = lambda: pml_runner(case, emb, labels, num_classes)  # pylint: disable=cell-var-from-loop
        try:
          jax_run, peak = jax_runner(case, emb, labels, num_classes)
          jax_s, pml_s, pml_note = _interleaved_rounds(jax_run, make_pml, args,
                                                       f"{case.name} B={b} D={d}")
        except Exception as err:  # pylint: disable=broad-except
          print(f"| {case.name} | {b} | {d} | failed: {type(err).__name__}: {str(err)[:100]} |")
          continue
        if pml_note:
          pml_col, ratio = pml_note, f"> {args.pml_timeout / (args.repeats + 1) / jax_s:.0f}x"
        else:
          pml_col = common.fmt_ms(pml_s)
          ratio = f"{pml_s / jax_s:.1f}x" if pml_s else "n/a"
        print(f"| {case.name} | {b} | {d} | {common.fmt_ms(jax_s)} | "
              f"{common.fmt_bytes(peak)} | {pml_col} | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
