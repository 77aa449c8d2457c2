"""Shared benchmark machinery (docs/design.md §5): interleaved timing, medians/quantiles, result rows.

Every result row names device, dtype, shape, provider, commit, date and versions, and is
appended to ``benchmarks/results/<suite>.csv`` (columns ``COLUMNS``).
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["date", "commit", "device", "torch", "triton", "suite", "case", "shape", "dtype", "provider",
           "mode", "metric", "median", "q20", "q80", "unit", "baseline", "ratio", "notes"]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU {cpu} x{torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return ""


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return statistics.median(s), q(0.2), q(0.8)


def time_interleaved(providers: dict[str, Callable[[], object]], device: torch.device | str,
                     warmup: int = 2, repeat: int = 10, rep_ms: int = 50) -> dict[str, list[float]]:
    """Milliseconds per call for each provider, runs interleaved so drift hits all alike.

    On CUDA, ``max(1, repeat // 5)`` rounds of one ``triton.testing.do_bench`` per provider (L2
    flushed before every call, ``rep_ms`` of timed calls each); the samples are every timed call
    of every round, so medians and quantiles are over single calls. On CPU each sample is one
    ``time.perf_counter`` interval, ``repeat`` rounds after ``warmup`` calls.
    """
    device = torch.device(device)
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in providers}
    if device.type == "cuda":
        from triton.testing import do_bench
        for _ in range(max(1, repeat // 5)):
            for name, fn in providers.items():
                samples[name].extend(do_bench(fn, warmup=5, rep=rep_ms, return_mode="all"))
        return samples
    for _ in range(repeat):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def peak_rss_subprocess(code: str, env: dict | None = None) -> int:
    """Peak resident memory (bytes) of a fresh Python subprocess running ``code``.

    Read from ``VmHWM`` in /proc/self/status: ``ru_maxrss`` survives ``exec`` on Linux, so a child of a
    large parent would report at least the parent's peak.
    """
    script = code + ("\nimport sys\nsys.stdout.write(next(l.split()[1] for l in open('/proc/self/status') "
                     "if l.startswith('VmHWM')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return int(out.stdout.strip().splitlines()[-1]) * 1024  # VmHWM is in kB


def base_row(suite: str, device: torch.device | str) -> dict:
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "device": device_name(device), "torch": torch.__version__, "triton": triton_version(), "suite": suite}


@contextlib.contextmanager
def results_dir(path: Path | str) -> Iterator[Path]:
    """Send every ``append_rows`` without an explicit path to ``path/<suite>.csv`` while active.

    The per-op scripts call ``append_rows(SUITE, rows)``; the runner's ``--out`` redirects them here.
    """
    global RESULTS
    previous, RESULTS = RESULTS, Path(path).resolve()
    try:
        yield RESULTS
    finally:
        RESULTS = previous


def results_path(suite: str) -> Path:
    """Where ``append_rows(suite, rows)`` writes now."""
    return RESULTS / f"{suite}.csv"


def check_results_file(path: Path) -> bool:
    """True if ``path`` holds rows already; ValueError if it exists with a header other than ``COLUMNS``."""
    if not (path.exists() and path.stat().st_size > 0):
        return False
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if header != COLUMNS:
        raise ValueError(f"{path}: malformed results file (header {header!r} != expected {COLUMNS!r}); "
                         "move it aside instead of letting it be overwritten")
    return True


def read_rows(path: Path) -> list[dict]:
    """All rows of a results file (after ``check_results_file``); [] when it does not exist."""
    if not check_results_file(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_rows(suite: str, rows: list[dict], path: Path | None = None) -> Path:
    """Append rows to ``results/<suite>.csv``; refuses (ValueError) a file whose header is not ``COLUMNS``."""
    path = path or results_path(suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = check_results_file(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise")
        if not exists:
            w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in COLUMNS})
    return path


def summary_rows(suite: str, device, case: str, shape: str, dtype: str, mode: str,
                 samples: dict[str, list[float]], baseline: str, notes: str = "",
                 flops: dict[str, float] | None = None) -> list[dict]:
    """Turn interleaved samples into result rows with the ratio of each provider to ``baseline``.

    With ``flops`` (model flop count per call, by provider), each provider's time row is followed
    by a ``tflops`` row (TFLOP/s, no ratio): the fastest time quantile gives the highest
    throughput, so q20/q80 are the flop count over the time's q80/q20.
    """
    base_med = quantiles(samples[baseline])[0] if baseline in samples else float("nan")
    rows = []
    for provider, s in samples.items():
        med, q20, q80 = quantiles(s)
        ids = {**base_row(suite, device), "case": case, "shape": shape, "dtype": dtype,
                  "provider": provider, "mode": mode}
        rows.append({**ids, "metric": "time", "median": f"{med:.6g}", "q20": f"{q20:.6g}",
                     "q80": f"{q80:.6g}", "unit": "ms", "baseline": baseline,
                     "ratio": f"{med / base_med:.4f}" if base_med == base_med else "", "notes": notes})
        if flops and provider in flops:
            tflops = lambda ms: flops[provider] / ms * 1e-9  # noqa: E731  (flop / ms → TFLOP/s)
            rows.append({**ids, "metric": "tflops", "median": f"{tflops(med):.4g}",
                         "q20": f"{tflops(q80):.4g}", "q80": f"{tflops(q20):.4g}", "unit": "TFLOP/s",
                         "baseline": "", "ratio": "", "notes": "TFLOP/s = model flop count / time"})
    return rows


def print_table(rows: list[dict], title: str = "") -> None:
    """A compact fixed-width table of result rows (shape, mode, provider, median, ratio)."""
    if title:
        print(f"\n{title}")
    cols = ["case", "shape", "dtype", "mode", "provider", "metric", "median", "q20", "q80", "unit", "ratio"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))
