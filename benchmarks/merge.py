"""Fold the results of another run folder into the committed ones: ``python -m benchmarks.merge SRC``.

    python -m benchmarks.merge OUTDIR [--into benchmarks/results]

For a GPU host's ``gpu_suite.sh OUTDIR``: appends every row of ``OUTDIR/<suite>.csv`` that
``--into``'s ``<suite>.csv`` does not already hold (rows are kept per device, so CPU and GPU
results live side by side). Both files must have the ``COLUMNS`` header; a malformed one is
reported and nothing is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import common


def merge(src: Path, into: Path) -> dict[str, int]:
    """Rows appended per results file stem; ValueError (nothing written) if any file is malformed."""
    plan: dict[str, list[dict]] = {}
    for path in sorted(Path(src).glob("*.csv")):
        new = common.read_rows(path)
        have = {tuple(r.values()) for r in common.read_rows(Path(into) / path.name)}
        plan[path.stem] = [r for r in new if tuple(r.values()) not in have]
    for stem, rows in plan.items():
        if rows:
            common.append_rows(stem, rows, path=Path(into) / f"{stem}.csv")
    return {stem: len(rows) for stem, rows in plan.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="folder of <suite>.csv files from another run (e.g. gpu_suite.sh OUTDIR)")
    ap.add_argument("--into", type=Path, default=common.RESULTS, help="results folder to append to")
    args = ap.parse_args(argv)
    if args.src.resolve() == args.into.resolve():
        print("error: SRC and --into are the same folder", file=sys.stderr)
        return 2
    try:
        counts = merge(args.src, args.into)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for stem, n in counts.items():
        print(f"{stem}.csv: {n} new row(s)")
    if not counts:
        print(f"no results files in {args.src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
