"""Run the petal_fast benchmark suites and summarise them: ``python -m benchmarks``.

    python -m benchmarks [--suite linear,loss,quality,e2e,contention] [--quick] [--device cpu|cuda] [--out DIR]

Each suite is one per-op script (``benchmarks/bench_*.py``) whose providers are timed interleaved
in this process (docs/design.md §5). Rows are appended to ``<out>/<suite>.csv`` (default
``benchmarks/results/``; a ``--quick`` smoke run defaults to ``benchmarks/results/quick/`` so that
the committed results hold full measurements only). At the end: one table per suite (shape,
provider, median, q20–q80, ratio to the suite's baseline, peak memory where measured) and PNG
charts, one per device. Exit status: 0 all suites ran; 1 a suite was unavailable or failed;
2 nothing ran because a results file is malformed or the arguments are wrong.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import petal_fast  # noqa: F401  (before torch: OpenMP's idle workers then sleep instead of spinning, §3.6)
import torch

from benchmarks import common, suites, tables


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="all",
                    help=f"comma-separated suites: {', '.join(suites.SUITES)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1–3 repeats: a smoke run, not a measurement")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the CSVs and charts (default: benchmarks/results, or results/quick with --quick)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG charts")
    ap.add_argument("--list", action="store_true", help="list the suites and whether their scripts are present")
    return ap.parse_args(argv)


def _list() -> int:
    for s in suites.SUITES.values():
        try:
            suites.load(s)
            state = "ready"
        except suites.SuiteUnavailable as e:
            state = f"unavailable: {e}"
        print(f"{s.key:8s} {s.module:32s} {state}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.list:
        return _list()
    try:
        selected = suites.parse_selection(args.suite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("warning: TRITON_INTERPRET=1 runs the Triton kernels in the interpreter; GPU times will be "
              "meaningless (unset it)", file=sys.stderr)
    out = args.out or (common.RESULTS / "quick" if args.quick else common.RESULTS)

    # Import every selected script and check every results file before spending minutes on timing.
    problems: list[str] = []
    loaded = []
    for s in selected:
        try:
            loaded.append((s, suites.load(s)))
        except suites.SuiteUnavailable as e:
            problems.append(str(e))
    for s, module in loaded:
        try:
            common.check_results_file(Path(out) / f"{module.SUITE}.csv")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for p in problems:
        print(f"skipping {p}", file=sys.stderr)

    mode = "quick (smoke run)" if args.quick else "full"
    print(f"petal_fast benchmarks: {len(loaded)} suite(s), {mode}, on {common.device_name(device)}, results in {out}")
    ran: dict[str, list[dict]] = {}
    elapsed: dict[str, float] = {}
    for i, (s, module) in enumerate(loaded, 1):
        print(f"\n[{i}/{len(loaded)}] {s.key}: {s.title}", flush=True)
        t0 = time.perf_counter()
        try:
            with common.results_dir(out):
                ran[module.SUITE] = module.run(quick=args.quick, device=device)
        except Exception:  # one broken suite must not cost the others' results
            traceback.print_exc()
            problems.append(f"{s.key}: failed (traceback above); its rows were not written")
        elapsed[s.key] = time.perf_counter() - t0
        print(f"[{i}/{len(loaded)}] {s.key} done in {elapsed[s.key]:.1f} s", flush=True)

    for name, rows in ran.items():
        for dev, dev_rows in tables.by_device(rows).items():
            print(f"\n== {suites.title(name)} — {dev} ==")
            print(tables.format_table(dev_rows))
    if ran and not args.no_plots:
        from benchmarks import plots
        charts = plots.make_plots(out, list(ran))
        print("\ncharts:" if charts else "\nno charts (no rows with ratios)")
        for c in charts:
            print(f"  {c}")
    print(f"\nresults: {', '.join(str(Path(out) / f'{n}.csv') for n in ran) or 'none'}")
    if elapsed:
        print("time per suite: " + ", ".join(f"{k} {v:.1f} s" for k, v in elapsed.items()))
    for p in problems:
        print(f"NOT RUN: {p}", file=sys.stderr)
    for s, module in loaded:  # a suite's one-line verdict (e.g. host: fwd <x> us, bwd <y> us) ends the run
        if module.SUITE in ran and hasattr(module, "summary_line"):
            print(module.summary_line(ran[module.SUITE]), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
