"""Memory estimates checked before a command allocates: a value that would exhaust RAM (or GPU memory)
is a clear error naming the settings that drive it, not an OOM kill minutes later.

Estimates are lower bounds (the tensors a run must hold at once, not every temporary), so they refuse
only what cannot fit.
"""
from __future__ import annotations

import os
from typing import Mapping

GIB = 1 << 30


def available_bytes(device: str = "cpu") -> int | None:
    """Memory a new allocation can use now: ``MemAvailable`` (Linux), else physical memory; free GPU
    memory for ``cuda``; None when unknown (then nothing is refused)."""
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            return None
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def check_fits(parts: Mapping[str, float], what: str, fix: str, device: str = "cpu",
               available: int | None = None, error: type[ValueError] = ValueError) -> None:
    """``error`` (a ValueError) when the ``parts`` ({description: bytes}) together exceed the memory available on
    ``device``; the message lists them, largest first, and says what to change (``fix``)."""
    avail = available_bytes(device) if available is None else available
    total = sum(parts.values())
    if avail is None or total <= avail:
        return
    listed = ", ".join(f"{name} {gib(n)}" for name, n in sorted(parts.items(), key=lambda kv: -kv[1]) if n > 0)
    where = "GPU memory" if device.startswith("cuda") else "RAM"
    raise error(f"{what} needs at least {gib(total)} of {where} ({listed}), but {gib(avail)} is available: {fix}")
