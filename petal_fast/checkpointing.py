"""Atomic training checkpoints and RNG state capture, so that a resumed run equals an uninterrupted one.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
renamed over ``checkpoint_last.pt`` (``os.replace`` is atomic on POSIX): a process killed mid-save
leaves the previous checkpoint intact, and the temporary file it leaves (``.<name>.tmp<pid>``) is
removed by :func:`clean_stale_tmp` when the next run starts. Files are read back with
``weights_only=True``; an unreadable, truncated or foreign file raises :class:`CheckpointFileError`
naming the file and the problem.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAST = "checkpoint_last.pt"
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint); names the file."""


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


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write a text file through a temporary file + fsync + rename (never half-written)."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_save` / :func:`atomic_write_text` that a killed
    process left in ``folder`` (only names of our own pattern, ``.<name>.tmp<pid>``, whose process is
    gone). Returns the removed paths."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TMP.match(entry.name)
        if m and entry.is_file() and not _alive(int(m["pid"])):
            try:
                entry.unlink()
                removed.append(entry)
            except FileNotFoundError:  # another process cleaned it first
                pass
    return removed


def load(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`atomic_save` (tensors and plain data only)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    if size == 0:
        raise CheckpointFileError(f"cannot read checkpoint {path}: the file is empty (0 bytes); delete it or "
                                  "start over with resume=false")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file and the cause
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointFileError(f"cannot read checkpoint {path} ({size} bytes): {first}. The file is truncated, "
                                  "corrupt or not a torch checkpoint; delete it (or start over with resume=false) "
                                  "if it cannot be restored") from None
    if not isinstance(state, dict):
        raise CheckpointFileError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint dict")
    return state


def latest(output: str | Path) -> Path | None:
    path = Path(output) / LAST
    return path if path.exists() else None
