"""How many threads petal_fast's CPU work runs on, and how idle ones wait (docs/design.md §3.6).

One pool does all of it: torch's intra-op OpenMP pool. The C++ ops (csrc/) parallelise with
``at::parallel_for`` on it, and MKL/BLAS inside torch and inside the ops use it too.

- **How many**: the ``threads`` setting (``PETAL_FAST_THREADS``). 0, the default, is automatic: the
  cores this process may use — its affinity mask (``os.sched_getaffinity``: taskset, cpusets, a job
  scheduler's binding) and a cgroup v2 CPU quota (a container's ``--cpus``), which torch's own
  default ignores — but never more than torch had chosen when petal_fast was imported
  (``OMP_NUM_THREADS``, torchrun's one thread per rank, an earlier ``torch.set_num_threads``).
  N > 0 is N. Applied with ``torch.set_num_threads`` when petal_fast is imported and whenever the
  setting changes (``petal_fast.settings.configure(threads=...)``).
- **How idle threads wait**: passive (they sleep) when petal_fast is imported before torch; see
  :mod:`petal_fast._openmp_env`, and :func:`wait_policy` for the case in force.
- **No nesting**: ``OMP_MAX_ACTIVE_LEVELS=1`` (same module), and ``at::parallel_for`` inside a
  parallel region runs inline.
- **Worker processes**: DataLoader workers run torch, and so OpenMP and the C++ ops, on one thread
  (torch sets it in each worker); petal_fast's own process pools start their workers with
  :func:`single_threaded`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from petal_fast import _openmp_env

TORCH_DEFAULT = torch.get_num_threads()  # torch's choice before petal_fast changed anything


def affinity_cores() -> int:
    """CPUs in this process's affinity mask (all CPUs where the OS has no such mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def quota_cores(cgroup_file: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time a cgroup v2 CPU quota grants (``cpu.max`` of this process's cgroup and
    every parent, the smallest), or None where there is no quota or no cgroup v2."""
    try:
        line = next((ln for ln in cgroup_file.read_text().splitlines() if ln.startswith("0::")), None)
    except OSError:
        return None
    if line is None:
        return None
    folder, found = root / line.split(":", 2)[2].strip().lstrip("/"), None
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                found = min(found if found is not None else math.inf, int(quota) / int(period))
        except (OSError, ValueError):
            pass
        if folder == root or root not in folder.parents:
            return found
        folder = folder.parent


def available_cores() -> int:
    """The cores this process may use: its affinity mask, capped by a CPU quota (rounded up)."""
    cores = affinity_cores()
    quota = quota_cores()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


@dataclass(frozen=True)
class Choice:
    threads: int
    why: str


def choose(setting: int) -> Choice:
    """The thread count for the ``threads`` setting (0: automatic) and why."""
    if setting > 0:
        return Choice(setting, f"the threads setting (PETAL_FAST_THREADS={setting})")
    cores = available_cores()
    if TORCH_DEFAULT < cores:
        return Choice(TORCH_DEFAULT, f"auto: torch's {TORCH_DEFAULT} at import (OMP_NUM_THREADS or earlier "
                                     f"torch.set_num_threads), below the {cores} usable cores")
    return Choice(cores, f"auto: the {cores} core(s) this process may use (affinity mask, CPU quota)")


def apply(setting: int) -> int:
    """Size torch's intra-op pool (and so the C++ ops' and MKL's) for ``setting``; returns the count."""
    n = choose(setting).threads
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def wait_policy() -> str:
    """How idle OpenMP workers wait in this process, and why."""
    if _openmp_env.STATE == "petal_fast":
        return "passive (OMP_WAIT_POLICY=PASSIVE, set by petal_fast before torch loaded OpenMP)"
    if _openmp_env.STATE == "user":
        chosen = ", ".join(f"{v}={os.environ[v]}" for v in _openmp_env.WAIT_VARIABLES if os.environ.get(v))
        return f"as set in the environment ({chosen})"
    return ("spin, then sleep (the OpenMP default: torch was imported before petal_fast); on a shared "
            "machine import petal_fast first or start Python with OMP_WAIT_POLICY=PASSIVE")


def single_threaded(*_args) -> None:
    """Initializer of a worker process (a process pool's ``initializer``, a DataLoader's
    ``worker_init_fn``): torch, OpenMP and the C++ ops on one thread, so N workers use N cores."""
    torch.set_num_threads(1)
