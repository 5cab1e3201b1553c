"""The loss benchmark's table (benchmarks/losses.py) on tiny inputs: rows,
the interleaved rounds and PML's timeout report (timings are not checked)."""

import argparse
import re

import pytest

from benchmarks import losses as loss_bench

_ROW = re.compile(r"^\| (?P<name>[^|]+) \| (?P<b>\d+) \| (?P<d>\d+) \| (?P<jax>[\d.]+) \| "
                  r"(?P<peak>[^|]+) \| (?P<pml>[^|]+) \| (?P<ratio>[^|]+) \|$")


def _rows(capsys, argv):
  loss_bench.main(argv)
  out = capsys.readouterr().out.splitlines()
  rows = [m.groupdict() for m in map(_ROW.match, out) if m and m["name"] != "loss"]
  return out, rows


def test_rows_without_pml(capsys):
  _, rows = _rows(capsys, ["--batch", "8", "--dim", "4", "--repeats", "1", "--rounds", "2",
                           "--exact", "--only", "contrastive", "nca"])
  assert [(r["name"], r["b"], r["d"]) for r in rows] == [("contrastive", "8", "4"),
                                                         ("nca", "8", "4")]
  assert all(float(r["jax"]) > 0 and r["pml"].strip() == "n/a" and r["ratio"].strip() == "n/a"
             for r in rows)


def test_rounds_and_repeats_must_be_positive():
  with pytest.raises(SystemExit):
    loss_bench.main(["--rounds", "0"])
  with pytest.raises(SystemExit):
    loss_bench.main(["--repeats", "0"])


def test_pml_columns_and_timeout(capsys):
  pytest.importorskip("pytorch_metric_learning")
  _, rows = _rows(capsys, ["--compare-pml", "--batch", "8", "--dim", "4", "--repeats", "1",
                           "--rounds", "2", "--exact", "--only", "contrastive"])
  (row,) = rows
  # The printed ratio comes from the unrounded times (printed to 0.01 ms).
  pml, ours, printed = float(row["pml"]), float(row["jax"]), float(row["ratio"].strip()[:-1])
  assert (pml - 0.005) / (ours + 0.005) - 0.05 <= printed <= (pml + 0.005) / (ours - 0.005) + 0.05
  # A PML case past its deadline is reported, not timed.
  _, rows = _rows(capsys, ["--compare-pml", "--batch", "8", "--dim", "4", "--repeats", "1",
                           "--pml-timeout", "1e-6", "--exact", "--only", "contrastive"])
  (row,) = rows
  assert row["pml"].strip() == "did not finish in 0 s" and row["ratio"].startswith("> ")


def test_rounds_take_turns_and_stop_pml_after_a_failure():
  calls = []
  args = argparse.Namespace(rounds=3, repeats=2, pml_timeout=0.0)

  def pml_that_fails_in_round_3():
    if calls.count("pml") >= 2 * 3:   # warm-up + 2 timed calls per round
      raise MemoryError("out of memory")
    calls.append("pml")

  jax_s, pml_s, note = loss_bench._interleaved_rounds(  # pylint: disable=protected-access
      lambda: calls.append("jax"), lambda: pml_that_fails_in_round_3, args, "case")
  turns = [k for i, k in enumerate(calls) if i == 0 or calls[i - 1] != k]
  assert turns == ["jax", "pml", "jax", "pml", "jax"]   # PML fails at the start of round 3
  assert calls.count("jax") == 3 * 3 and jax_s >= 0
  assert pml_s is None and note is None
