"""Files that are never half-written: every checkpoint, ``model.pt`` and summary goes through here.

A file is written to a temporary name in the same directory (``.<name>.tmp<pid>``), flushed and
fsync'ed, then renamed over the target (``os.replace`` is atomic on POSIX) and the directory
fsync'ed: a process killed mid-write leaves the previous file intact. The temporary files a killed
process leaves behind are removed by :func:`clean_stale_tmp` when the next run starts.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import IO, Any, Callable

import torch

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")

__all__ = ["atomic_save", "atomic_write", "atomic_write_text", "clean_stale_tmp"]


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _Recording:
    """A file that remembers the OSError its ``write`` raised: torch's zip writer turns a full disk
    into a RuntimeError of its own ("file write failed", "unexpected pos"), without the cause."""

    def __init__(self, file: IO):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def _write_error(path: Path, err: OSError) -> OSError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / (1 << 20):.0f} MiB free in {path.parent}"
    except OSError:
        free = f"free space in {path.parent} unknown"
    error = OSError(f"cannot write {path}: {err.strerror or err} ({free}). Nothing was replaced: the previous "
                    f"{path.name}, if any, is intact")
    error.errno = err.errno
    return error


def atomic_write(path: str | Path, write: Callable[[IO], None], mode: str = "wb") -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then fsync and rename it to ``path``.
    A failed write (a full disk, a file size limit) is an OSError naming the file and the free space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode) as f:
            recording = _Recording(f)
            try:
                write(recording)
                f.flush()
                os.fsync(f.fileno())
            except (OSError, RuntimeError) as err:
                cause = err if isinstance(err, OSError) else recording.error
                if cause is None:
                    raise
                raise _write_error(path, cause) from None
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file + fsync + rename."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write a text file through a temporary file + fsync + rename."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


def process_alive(pid) -> bool:
    """Whether process ``pid`` (an int > 0) exists on this host: this process, another user's, any."""
    if not isinstance(pid, int) or pid <= 0:
        return False
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
    """Remove the temporary files that a killed process left in ``folder`` (only names of our own
    pattern, ``.<name>.tmp<pid>``, whose process is gone). Returns the removed paths."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TMP.match(entry.name)
        if m and entry.is_file() and not process_alive(int(m["pid"])):
            try:
                entry.unlink()
                removed.append(entry)
            except FileNotFoundError:  # another process cleaned it first
                pass
    return removed
