"""Atomic training checkpoints and RNG state capture, so that a resumed run equals an uninterrupted one.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
renamed over ``checkpoint_last.pt`` (``os.replace`` is atomic on POSIX): a process killed mid-save
leaves the previous checkpoint intact. Files are read back with ``weights_only=True``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAST = "checkpoint_last.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), None if gauss is None else float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> tuple:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _python_state() -> tuple:
    version, internal, gauss = random.getstate()
    return (version, torch.tensor(internal, dtype=torch.int64), gauss)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`atomic_save` (tensors and plain data only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file and the cause
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err


def latest(output: str | Path) -> Path | None:
    path = Path(output) / LAST
    return path if path.exists() else None
