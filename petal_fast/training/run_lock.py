"""One run per output folder at a time: ``<output>/run.lock``, held for the whole ``fit``.

The lock is an exclusive ``flock`` on that file (released by the operating system when the owner
dies, so a killed run leaves no stale lock behind), and the file names its owner (pid, host, start
time, command) for the message another run gets. On a file system without ``flock`` the file itself
is the lock (created exclusively); a leftover one whose process is gone (same host, pid not alive) is
stale and taken over, one from another host is reported with its owner, to be removed by hand.
(The config check alone refuses a foreign run only once a checkpoint exists.)
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from petal_fast.atomic_files import process_alive

LOCK = "run.lock"


class RunLocked(ValueError):
    """The output folder belongs to another run now; the message names its owner."""


def _owner_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": " ".join(sys.argv)[:500]})


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


class RunLock:
    """``with RunLock(folder):`` — this process owns ``folder`` for the block, or :class:`RunLocked`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.fd: int | None = None
        self.flock = True

    def _refuse(self) -> RunLocked:
        owner = _read_owner(self.path)
        who = (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('started', '?')}"
               + (f": {owner['command']}" if owner.get("command") else "")) if owner else "another process"
        return RunLocked(f"output folder {self.folder} is in use by another run ({who}). Wait for it to finish, "
                         "or choose another output folder (output=<folder>)")

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse() from None
            except (ImportError, OSError) as err:  # no flock here (Windows, some network file systems)
                os.close(fd)
                if isinstance(err, OSError) and err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                                                                  errno.EINVAL):
                    raise
                return self._acquire_exclusive_file()
            try:  # the owner before us may have removed the file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, _owner_text().encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def _acquire_exclusive_file(self) -> "RunLock":
        """Without flock: the file's existence is the lock; a leftover of a dead process on this host is stale."""
        self.flock = False
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _read_owner(self.path)
                stale = owner.get("host") == socket.gethostname() and not process_alive(owner.get("pid"))
                if not stale:
                    error = self._refuse()
                    if owner.get("host") not in (None, socket.gethostname()):
                        error.args = (f"{error.args[0]}; if that run is gone, delete {self.path}",)
                    raise error from None
                self.path.unlink(missing_ok=True)  # its process is gone: a stale lock
                continue
            os.write(fd, _owner_text().encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise self._refuse()

    def release(self) -> None:
        if self.fd is None:
            return
        # remove first, then unlock (closing releases the flock): a process that opened the old file
        # meanwhile sees it replaced and retries on the new one
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
