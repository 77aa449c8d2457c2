"""PNG charts from the results files: ``python -m benchmarks.plots [--results DIR]``.

Per suite and per device (rows from different devices are never drawn in one chart):
- ``<suite>_<device>_speedup.png``: for each shape, one bar per provider with the speed-up
  against the suite's baseline, ``baseline time / provider time`` = 1 / ratio (higher is faster;
  the dashed line at 1 is the baseline), one panel per mode (fwd, full, ...);
- ``<suite>_<device>_memory.png``: peak memory against the number of classes ``C`` (parsed from the
  shape), one line per provider, where a suite measured memory at two or more ``C``.
Each ratio comes from one interleaved run (the row's own ``ratio``), the latest run per shape.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import common, suites, tables  # noqa: E402

CLASSES = re.compile(r"\bC=(\d+)")


def slug(device: str) -> str:
    """File-name form of a device name: ``"NVIDIA H100 80GB HBM3"`` → ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


def speedup_chart(name: str, device: str, rows: list[dict], path: Path) -> Path | None:
    """Bars of 1/ratio per (shape, case) and provider, one panel per mode; None if no ratios."""
    timed = [r for r in tables.latest(rows) if r.get("metric") == "time" and tables.num(r.get("ratio")) is not None]
    if not timed:
        return None
    modes = sorted(dict.fromkeys(r.get("mode", "") for r in timed), key=tables.mode_rank)
    # one x order for every panel: the (shape, case, dtype) groups as they first appear in the results
    order = {g: i for i, g in enumerate(dict.fromkeys((r["shape"], r.get("case", ""), r.get("dtype", ""))
                                                      for r in timed))}
    fig, axes = plt.subplots(len(modes), 1, squeeze=False, figsize=(1, 1))
    widest = 0
    for ax, mode in zip(axes[:, 0], modes):
        mrows = [r for r in timed if r.get("mode", "") == mode]
        groups = sorted({(r["shape"], r.get("case", ""), r.get("dtype", "")) for r in mrows}, key=order.get)
        providers = list(dict.fromkeys(r["provider"] for r in mrows))
        widest = max(widest, len(groups) * max(1, len(providers)))
        value = {(r["shape"], r.get("case", ""), r.get("dtype", ""), r["provider"]): 1.0 / float(r["ratio"])
                 for r in mrows}
        width = 0.8 / len(providers)
        for j, provider in enumerate(providers):
            xs = [g + (j - (len(providers) - 1) / 2) * width for g in range(len(groups))]
            ys = [value.get((*grp, provider), float("nan")) for grp in groups]
            bars = ax.bar(xs, ys, width, label=provider)
            if len(groups) * len(providers) <= 40:
                ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        baselines = sorted({r.get("baseline", "") for r in mrows} - {""})
        ax.set_ylabel(f"speed-up vs {', '.join(baselines) or 'baseline'}\n(higher is faster)")
        ax.set_title(f"mode: {mode}", fontsize=9)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{s}\n{c} {d}".strip() for s, c, d in groups], rotation=25, ha="right", fontsize=7)
        pad = max(0.0, (3 - len(groups)) / 2)  # keep bars narrow when there are few shapes
        ax.set_xlim(-0.5 - pad, len(groups) - 0.5 + pad)
        ax.set_ylim(0, max(1.0, *(v for v in value.values() if v == v)) * 1.15)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.set_size_inches(max(8.0, 0.22 * widest + 2), 3.6 * len(modes) + 0.8)
    fig.suptitle(f"{suites.title(name)}\n{device} — {tables.provenance(timed)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_chart(name: str, device: str, rows: list[dict], path: Path) -> Path | None:
    """Peak memory (MiB) vs classes C, one line per provider (and the rest of the shape); None if < 2 C."""
    mem = [r for r in tables.latest(rows) if tables.is_memory(r) and CLASSES.search(r.get("shape", ""))]
    if len({CLASSES.search(r["shape"]).group(1) for r in mem}) < 2:
        return None
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in mem:
        rest = " ".join(CLASSES.sub("", r["shape"]).split())
        label = " ".join(x for x in (r["provider"], r.get("case", ""), r.get("mode", ""), rest) if x)
        lines.setdefault(label, []).append((int(CLASSES.search(r["shape"]).group(1)), tables.mib(r)))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, pts in lines.items():
        pts.sort()
        ax.plot([c for c, _ in pts], [m for _, m in pts], marker="o", label=label)
    ax.set_xscale("log")
    if all(m > 0 for pts in lines.values() for _, m in pts):  # quick runs can measure 0 MiB extra
        ax.set_yscale("log")
    ax.set_xlabel("number of classes C")
    ax.set_ylabel("peak memory (MiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{suites.title(name)}: memory vs classes\n{device} — {tables.provenance(mem)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(results: Path | str, names: list[str] | None = None) -> list[Path]:
    """Write every chart for the results files in ``results`` (all, or the stems in ``names``)."""
    results = Path(results)
    written: list[Path] = []
    for name, rows in tables.load_dir(results).items():
        if names is not None and name not in names:
            continue
        for device, dev_rows in tables.by_device(rows).items():
            stem = results / f"{name}_{slug(device)}"
            for chart in (speedup_chart(name, device, dev_rows, Path(f"{stem}_speedup.png")),
                          memory_chart(name, device, dev_rows, Path(f"{stem}_memory.png"))):
                if chart is not None:
                    written.append(chart)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=common.RESULTS, help="folder of <suite>.csv files")
    args = ap.parse_args(argv)
    try:
        charts = make_plots(args.results)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for c in charts:
        print(c)
    if not charts:
        print(f"no results with ratios in {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
