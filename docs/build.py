"""Builds the API documentation from the docstrings with pdoc.

    python docs/build.py [--output site/]

Fails (exit 1) on any warning pdoc emits, so a docstring that does not
render breaks CI (tests/test_docs.py runs this build).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import warnings

import pdoc
import pdoc.render

MODULES = ["metric_jax"]


def build(output: pathlib.Path) -> list[str]:
  """Writes the HTML docs to ``output`` and returns pdoc's warnings."""
  pdoc.render.configure(docformat="google", math=True, search=True,
                        footer_text="metric_jax")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pdoc.pdoc(*MODULES, output_directory=output)
  return [str(w.message) for w in caught]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--output", default="site", type=pathlib.Path)
  args = parser.parse_args(argv)
  problems = build(args.output)
  for p in problems:
    print("warning:", p, file=sys.stderr)
  print(f"docs written to {args.output}/ ({len(problems)} warnings)")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
