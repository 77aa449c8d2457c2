"""Training on a shared CPU: the demo model's step quiet, then beside busy processes on the same cores.

Per configuration a fresh worker process (``benchmarks/contention_worker.py``) trains the demo's
model (``tiny`` face Swin at 40 px, batch 64, 300 classes, α from BRISQUE, CosFace, AdamW;
``--quick``: batch 32, shorter phases) quiet, then beside one busy process (``while True: pass``)
pinned to the same cores, then beside as many busy processes as cores, then quiet again.
Configurations:

- ``petal_fast``   petal_fast imported first: OpenMP's idle workers sleep (passive wait), threads =
                   the cores this process may use (docs/design.md §3.6);
- ``torch_first``  torch imported before petal_fast, as a script that begins ``import torch``: the
                   OpenMP runtime keeps its default wait (spinning); the same thread count;
- ``one_thread``   petal_fast first, ``PETAL_FAST_THREADS=1`` (full run only).

Rows per configuration and phase (mode ``quiet``: both quiet phases pooled; ``beside N busy``):
``time`` (ms per step: median, q20–q80; ratio to the same configuration's quiet median) and
``throughput`` (img/s = images / wall time of the phase; ratio to quiet: the goal of issue 23 is
≥ 0.4 beside a busy process on 2 cores). The notes carry the load average before and after: on a
machine that others use, "quiet" is not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from benchmarks.common import append_rows, base_row, print_table, quantiles

SUITE = "contention"
GOAL = 0.4
REPO = Path(__file__).resolve().parent.parent
FULL = {"preset": "tiny", "batch": 64, "classes": 300, "seconds": 10.0,
        "configs": ("petal_fast", "torch_first", "one_thread")}
QUICK = {"preset": "tiny", "batch": 32, "classes": 300, "seconds": 4.0, "configs": ("petal_fast", "torch_first")}
ENV = {"petal_fast": {}, "torch_first": {}, "one_thread": {"PETAL_FAST_THREADS": "1"}}


def cores() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API: every CPU
        return set(range(os.cpu_count() or 1))


@contextmanager
def busy(n: int, on: set[int]) -> Iterator[list[subprocess.Popen]]:
    """``n`` processes spinning in a Python loop, pinned to the CPUs ``on``; killed on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        for p in procs:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(p.pid, on)
        time.sleep(0.3)  # running before the measurement starts
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


class Worker:
    """One ``contention_worker`` process: a warm model that trains for as long as it is asked."""

    def __init__(self, config: str, preset: str, batch: int, classes: int):
        env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
               **ENV[config], "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.contention_worker", config, preset,
                                      str(batch), str(classes)], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"contention worker {config} did not start (exit {self.proc.returncode}): {line!r}")

    def train(self, seconds: float) -> dict:
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(config: str, preset: str, batch: int, classes: int, seconds: float,
            competitors: tuple[int, ...]) -> dict:
    """Quiet, beside each number of busy processes, quiet again, in one warm worker: {phase: [worker
    reports]} and the load averages before and after."""
    worker = Worker(config, preset, batch, classes)
    try:
        load_before = os.getloadavg()
        result = {"quiet": [worker.train(seconds)]}
        for n in competitors:
            with busy(n, cores()):
                result[phase_name(n)] = [worker.train(seconds)]
        result["quiet"].append(worker.train(seconds))
        return {**result, "load": (load_before, os.getloadavg())}
    finally:
        worker.close()


def phase_name(competitors: int) -> str:
    return f"beside {competitors} busy"


def rows_for(config: str, shape: str, result: dict) -> list[dict]:
    (b1, b5, _), (a1, a5, _) = result["load"]
    first = result["quiet"][0]
    notes = (f"{first['threads']} threads, wait: {first['wait'].split(' (')[0]}; busy processes pinned to the "
             f"same {len(cores())} cores; load average {b1:.1f}/{b5:.1f} before, {a1:.1f}/{a5:.1f} after; "
             f"goal beside one busy process ≥ {GOAL}× quiet img/s")
    stats = {}
    for phase, reports in result.items():
        if phase == "load":
            continue
        ms = [t for r in reports for t in r["ms"]]
        images = sum(r["images"] for r in reports)
        wall = sum(r["wall"] for r in reports)
        stats[phase] = (quantiles(ms), images / wall, images / len(ms))
    quiet_med, quiet_img_s = stats["quiet"][0][0], stats["quiet"][1]
    rows = []
    for phase, ((med, q20, q80), img_s, batch) in stats.items():
        ids = {**base_row(SUITE, "cpu"), "case": "train_step", "shape": shape, "dtype": "float32",
               "provider": config, "mode": phase, "baseline": "quiet", "notes": notes}
        rows.append({**ids, "metric": "time", "median": f"{med:.6g}", "q20": f"{q20:.6g}", "q80": f"{q80:.6g}",
                     "unit": "ms", "ratio": f"{med / quiet_med:.4f}"})
        rows.append({**ids, "metric": "throughput", "median": f"{img_s:.6g}", "q20": f"{batch * 1e3 / q80:.6g}",
                     "q80": f"{batch * 1e3 / q20:.6g}", "unit": "img/s", "ratio": f"{img_s / quiet_img_s:.4f}"})
    return rows


def run(quick: bool = False, device: str | None = None, competitors: tuple[int, ...] | None = None) -> list[dict]:
    if device not in (None, "cpu"):
        print(f"contention: a CPU benchmark; nothing to run on {device}")
        return []
    spec = QUICK if quick else FULL
    counts = competitors or tuple(sorted({1, len(cores())}))
    shape = f"{spec['preset']} B={spec['batch']} C={spec['classes']}"
    rows: list[dict] = []
    for config in spec["configs"]:
        print(f"contention: {config}: {spec['seconds']:g} s each quiet, "
              + ", ".join(phase_name(n) for n in counts) + ", quiet", flush=True)
        new = rows_for(config, shape, measure(config, spec["preset"], spec["batch"], spec["classes"],
                                              spec["seconds"], counts))
        append_rows(SUITE, new)
        rows += new
        tp = {r["mode"]: r for r in new if r["metric"] == "throughput"}
        beside = "; ".join(f"{phase_name(n)} {float(tp[phase_name(n)]['median']):.1f} img/s "
                           f"({float(tp[phase_name(n)]['ratio']):.2f}×)" for n in counts)
        print(f"contention: {config}: quiet {float(tp['quiet']['median']):.1f} img/s; {beside} "
              f"(goal ≥ {GOAL}× beside 1)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 32, 4 s phases, two configurations (~1–2 min)")
    parser.add_argument("--competitors", type=int, nargs="+", default=None,
                        help="numbers of busy processes, one phase each (default: 1 and the usable cores)")
    args = parser.parse_args()
    rows = run(quick=args.quick, competitors=tuple(args.competitors or ()))
    print_table(rows, title="training beside busy processes")


if __name__ == "__main__":
    main()
