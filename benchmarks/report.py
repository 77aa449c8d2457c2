"""docs/performance.md's measured tables, generated from the results: ``python -m benchmarks.report``.

    python -m benchmarks.report [--results DIR] [--target docs/performance.md | --output FILE | --stdout]

Writes one table per suite per device (the device named on every table), says which figures
were measured on which CPU/GPU and what has not been measured yet. In the target file it rewrites
only the lines between ``<!-- perf:start -->`` and ``<!-- perf:end -->`` (the hand-written, dated
notes around them stay); without both markers (once each, in that order) it refuses and changes
nothing. ``--output`` writes the section alone to a new file (``gpu_suite.sh``'s PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks import common, plots, suites, tables

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "docs" / "performance.md"


def is_gpu(device: str) -> bool:
    return not device.startswith("CPU")


def _in_reading_order(cells: dict[tuple, dict]) -> dict[tuple, dict]:
    """Keys (shape, case, dtype, mode) grouped by shape/case/dtype in order of first appearance, the
    modes of a group as fwd, bwd, full (a later run adding a mode would otherwise list it last)."""
    first: dict[tuple, int] = {}
    for key in cells:
        first.setdefault(key[:3], len(first))
    return dict(sorted(cells.items(), key=lambda kv: (first[kv[0][:3]], tables.mode_rank(kv[0][3]))))


def _pivot(rows: list[dict], metric: str) -> list[str]:
    """Markdown table: one line per (shape, case, dtype, mode), one column per provider.

    ``metric`` ``"time"``: cells ``median ms (ratio×)``; ``"memory"``: cells ``MiB (ratio×)``;
    any other metric (``"tflops"``): cells ``median unit``, with the ratio where the rows have one.
    """
    pick = tables.is_memory if metric == "memory" else (lambda r: r.get("metric") == metric)
    picked = [r for r in tables.latest(rows) if pick(r)]
    if not picked:
        return []
    baselines = list(dict.fromkeys(r.get("baseline", "") for r in picked if r.get("baseline")))
    providers = list(dict.fromkeys(r["provider"] for r in picked))
    providers.sort(key=lambda p: p not in baselines)  # baseline column first
    cells: dict[tuple, dict[str, str]] = {}
    for r in picked:
        key = (r["shape"], r.get("case", ""), r.get("dtype", ""), r.get("mode", ""))
        value = tables.mib(r) if metric == "memory" else tables.num(r["median"])
        ratio = tables.num(r.get("ratio", ""))
        unit = "MiB" if metric == "memory" else r.get("unit", "")
        text = f"{tables.fmt(value)} {unit}"
        if ratio is not None and r["provider"] != r.get("baseline"):
            text += f" ({ratio:.2f}×)"
        cells.setdefault(key, {})[r["provider"]] = text
    lines = ["| shape | case | dtype | mode | " + " | ".join(providers) + " |",
             "|" + " --- |" * (4 + len(providers))]
    for (shape, case, dtype, mode), row in _in_reading_order(cells).items():
        lines.append(f"| {shape} | {case} | {dtype} | {mode} | " + " | ".join(row.get(p, "—") for p in providers)
                     + " |")
    return lines


def _suite_section(name: str, device: str, rows: list[dict], results: Path, link_base: Path) -> list[str]:
    suite = suites.of_results(name)
    versions = "; ".join(f"{lib} {', '.join(sorted(v))}" for lib in ("torch", "triton")
                         if (v := {r.get(lib, "") for r in rows} - {""}))
    out = [f"### {suites.title(name)} — {device}", "",
           f"Measured on **{device}** ({tables.provenance(rows)}; {versions or 'versions not recorded'}).", ""]
    time_lines = _pivot(rows, "time")
    if time_lines:
        baselines = sorted({r.get("baseline", "") for r in rows if r.get("metric") == "time"} - {""})
        out += [f"Time per call, median over repeats; in brackets the ratio to `{'`, `'.join(baselines)}` "
                "from the same interleaved run (< 1 is faster).", "", *time_lines, ""]
    tflops_lines = _pivot(rows, "tflops") if is_gpu(device) else []
    if tflops_lines:
        out += ["Achieved TFLOP/s: the model flop count (the suite script's docstring) over the median time "
                "(higher is better).", "", *tflops_lines, ""]
    mem_lines = _pivot(rows, "memory")
    if mem_lines:
        metrics = sorted({r.get("metric", "") for r in rows if tables.is_memory(r)})
        out += [f"Peak memory (`{'`, `'.join(metrics)}`, MiB); in brackets the ratio to the baseline.", "",
                *mem_lines, ""]
    notes = sorted({r.get("notes", "") for r in rows} - {""})
    if notes:
        out += ["Notes: " + "; ".join(notes) + ".", ""]
    if suite:
        out += [f"Goal (docs/design.md §6): {suite.goal}.", ""]
    charts = [p for p in (results / f"{name}_{plots.slug(device)}_speedup.png",
                          results / f"{name}_{plots.slug(device)}_memory.png") if p.exists()]
    if charts:
        out += ["Charts: " + ", ".join(f"[{p.name}]({Path(os.path.relpath(p, link_base)).as_posix()})"
                                       for p in charts), ""]
    return out


def render(results: Path, link_base: Path) -> str:
    """The section's markdown (without the markers) for every results file in ``results``."""
    data = {name: rows for name, rows in tables.load_dir(results).items() if rows}
    data = dict(sorted(data.items(), key=lambda kv: suites.order(kv[0])))
    devices = {d for rows in data.values() for d in tables.by_device(rows)}
    rel = Path(os.path.relpath(results, link_base)).as_posix()
    if results.is_relative_to(REPO):  # name a folder of this repository from its root, never by machine path
        rel = results.relative_to(REPO).as_posix() if rel.startswith("..") else rel
    source = ("the `*.csv` files beside this file" if rel == "." else
              f"`{results.as_posix() if rel.startswith('..') else rel}/*.csv`")
    out = ["## Measured performance", "",
           f"_Generated by `python -m benchmarks.report` from {source}; do not edit by hand. Absolute times hold "
           "only for the device named on each table; every ratio compares providers timed interleaved in one "
           "process on that device (docs/design.md §5). Reproduce with `python -m benchmarks` (all suites, full size, "
           "on the device present), then `python -m benchmarks.plots` and `python -m benchmarks.report`._", ""]
    if data:
        out += ["| suite | device | kind | rows | measured |", "| --- | --- | --- | --- | --- |"]
        for name, rows in data.items():
            for device, dev_rows in tables.by_device(rows).items():
                out.append(f"| {suites.title(name)} | {device} | {'GPU' if is_gpu(device) else 'CPU'} | "
                           f"{len(tables.latest(dev_rows))} | {tables.provenance(dev_rows)} |")
        out.append("")
    missing = []
    any_gpu = any(is_gpu(d) for d in devices)
    if not any_gpu:
        missing.append("**No GPU results yet**: every GPU figure (Triton kernels, bf16, `do_bench`) is unmeasured. "
                       "On a CUDA host, `bash benchmarks/gpu_suite.sh OUTDIR` runs the GPU tests and every suite.")
    for s in suites.SUITES.values():
        kinds = {is_gpu(r.get("device", "")) for n in s.csv_names for r in data.get(n, [])}
        if not kinds:
            missing.append(f"{s.title}: no results on any device (`python -m benchmarks --suite {s.key}`).")
            continue
        if any_gpu and s.gpu and True not in kinds:
            missing.append(f"{s.title}: no GPU results yet.")
        if False not in kinds:
            missing.append(f"{s.title}: no CPU results yet.")
    if missing:
        out += ["Not measured yet:", "", *(f"- {m}" for m in missing), ""]
    for name, rows in data.items():
        for device, dev_rows in sorted(tables.by_device(rows).items(), key=lambda kv: is_gpu(kv[0])):
            out += _suite_section(name, device, dev_rows, results, link_base)
    return "\n".join(out).rstrip() + "\n"


def replace_region(text: str, section: str) -> str:
    """``text`` with the lines between the markers replaced by ``section``; ValueError without them."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.strip() == START]
    ends = [i for i, ln in enumerate(lines) if ln.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"needs exactly one line {START} followed by one line {END} "
                         f"(found {len(starts)} start, {len(ends)} end)")
    return "".join(lines[:starts[0] + 1]) + section + "".join(lines[ends[0]:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=common.RESULTS, help="folder of <suite>.csv files")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--target", type=Path, default=TARGET,
                       help="file whose perf:start/perf:end region is rewritten (default: docs/performance.md)")
    where.add_argument("--output", type=Path, help="write the section to this file instead (e.g. OUTDIR/PERFORMANCE.md)")
    where.add_argument("--stdout", action="store_true", help="print the section, write nothing")
    args = ap.parse_args(argv)
    target = args.output or args.target
    try:
        section = render(args.results.resolve(), Path.cwd() if args.stdout else target.resolve().parent)
        if args.stdout:
            sys.stdout.write(section)
            return 0
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(section)
        elif not args.target.exists():
            raise ValueError(f"{args.target}: file not found")
        else:
            try:
                text = replace_region(args.target.read_text(), section)
            except ValueError as e:
                raise ValueError(f"{args.target}: {e}; nothing written") from e
            args.target.write_text(text)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the measured tables to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
