"""Reading results files back: latest row per measurement, time and memory side by side, tables.

A results file accumulates every run, so summaries keep the last row for each
(device, suite, case, shape, dtype, mode, provider, metric). Ratios are taken from the rows
themselves: each was computed inside one interleaved run, never across runs or devices.
"""
from __future__ import annotations

import math
from pathlib import Path

from benchmarks.common import read_rows

# Memory units seen in result rows → factor to MiB.
MEM_UNITS = {"B": 2.0**-20, "bytes": 2.0**-20, "KiB": 2.0**-10, "MiB": 1.0, "GiB": 2.0**10,
             "KB": 1e3 / 2**20, "MB": 1e6 / 2**20, "GB": 1e9 / 2**20}
KEY = ("device", "suite", "case", "shape", "dtype", "mode", "provider", "metric")


def load_dir(results: Path) -> dict[str, list[dict]]:
    """Rows of every ``*.csv`` in ``results`` by file stem; ValueError names a malformed file."""
    return {p.stem: read_rows(p) for p in sorted(Path(results).glob("*.csv"))}


MODE_ORDER = ("fwd", "bwd", "full")  # how modes are listed in tables and charts


def mode_rank(mode: str) -> int:
    return MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)


def latest(rows: list[dict]) -> list[dict]:
    """The last row for each measurement key, in the order keys first appeared."""
    last: dict[tuple, dict] = {}
    for r in rows:
        last[tuple(r.get(k, "") for k in KEY)] = r
    return list(last.values())


def is_memory(row: dict) -> bool:
    return row.get("unit", "") in MEM_UNITS or "mem" in row.get("metric", "")


def mib(row: dict) -> float:
    return float(row["median"]) * MEM_UNITS.get(row.get("unit", ""), 1.0)


def num(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def provenance(rows: list[dict]) -> str:
    """``"commit abc1234, 2026-01-02"`` (every commit, the date or date range) of the rows shown:
    the latest per measurement key, not the runs they superseded."""
    rows = latest(rows)
    commits = sorted({r.get("commit", "") for r in rows} - {""})
    dates = sorted(r.get("date", "")[:10] for r in rows if r.get("date"))
    when = dates[0] if dates and dates[0] == dates[-1] else (f"{dates[0]} to {dates[-1]}" if dates else "?")
    shown = ", ".join(commits[:3]) + (f" and {len(commits) - 3} more" if len(commits) > 3 else "")
    return f"{'commits' if len(commits) > 1 else 'commit'} {shown or '?'}, {when}"


def by_device(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("device", "?"), []).append(r)
    return out


def merged(rows: list[dict]) -> list[dict]:
    """One entry per (device, case, shape, dtype, mode, provider): its time, throughput and memory rows.

    Entries: ``{"case", "shape", "dtype", "mode", "provider", "device", "time": row|None,
    "tflops": row|None, "memory": row|None, "other": [rows]}``; order follows the first row of each entry.
    """
    out: dict[tuple, dict] = {}
    for r in latest(rows):
        key = tuple(r.get(k, "") for k in ("device", "case", "shape", "dtype", "mode", "provider"))
        e = out.setdefault(key, {**dict(zip(("device", "case", "shape", "dtype", "mode", "provider"), key)),
                                 "time": None, "tflops": None, "memory": None, "other": []})
        if r.get("metric") in ("time", "tflops"):
            e[r["metric"]] = r
        elif is_memory(r) and e["memory"] is None:
            e["memory"] = r
        else:
            e["other"].append(r)
    return list(out.values())


def fmt(x: float | None, digits: int = 3) -> str:
    """``x`` with ``digits`` significant figures, no exponent (1234 → "1234", 0.01234 → "0.0123")."""
    if x is None:
        return ""
    if x == 0 or not math.isfinite(x) or abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def ratio_text(row: dict | None) -> str:
    r = num(row.get("ratio", "")) if row else None
    return f"{r:.2f}×" if r is not None else ""


def text_rows(rows: list[dict]) -> list[dict[str, str]]:
    """Printable cells per entry: case, shape, dtype, mode, provider, median, q20–q80, ratio, TFLOP/s,
    peak memory."""
    out = []
    for e in merged(rows):
        t, m = e["time"], e["memory"]
        cells = {k: e[k] for k in ("case", "shape", "dtype", "mode", "provider")}
        if t is not None:
            cells["median"] = f"{fmt(num(t['median']))} {t.get('unit', '')}"
            q20, q80 = num(t.get("q20", "")), num(t.get("q80", ""))
            cells["q20–q80"] = f"{fmt(q20)}–{fmt(q80)}" if q20 is not None and q80 is not None else ""
            cells["× baseline"] = ratio_text(t) + (f" ({t['baseline']})" if t.get("baseline") else "")
        cells["TFLOP/s"] = fmt(num(e["tflops"]["median"])) if e["tflops"] is not None else ""
        cells["peak mem"] = f"{fmt(mib(m))} MiB" + (f" ({ratio_text(m)})" if ratio_text(m) else "") if m else ""
        for o in e["other"]:
            cells.setdefault("median", "")
            cells["median"] += f" {o['metric']}={o['median']}{o.get('unit', '')}"
        out.append(cells)
    return out


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of ``text_rows`` (columns with no values are dropped)."""
    cells = text_rows(rows)
    cols = [c for c in ("case", "shape", "dtype", "mode", "provider", "median", "q20–q80", "× baseline", "TFLOP/s",
                        "peak mem") if any(r.get(c) for r in cells)]
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in cells)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in cols).rstrip() for r in cells]
    return "\n".join(lines)
