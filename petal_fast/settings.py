"""Every petal_fast setting in one frozen object, read from the environment once, at import
(docs/design.md §3.4; the fields, variables and values: :data:`ENV`, :class:`Settings` and the
README's Settings table).

``current()`` is the :class:`Settings` in force on the calling thread: a plain attribute read
(torch.compile traces and guards on it). ``configure(**changes)`` replaces fields for the process;
``with override(**changes):`` changes them for the calls this thread makes inside the block, as every
petal_fast context manager does (docs/design.md §3.7); ``threads``, the size of torch's process-wide
pool, changes only with ``configure``. Changing ``os.environ`` after import has no effect. An empty
variable counts as unset; a bad value raises at import (:class:`SettingsError`, or a petal_fast
command's one-line error), naming the variable, the value and what it may be.

This module imports nothing of petal_fast but ``definitions`` and ``threads``: the layers that use a
setting read it when they run, and those below what may import it get it as an argument (the Triton
design as the launchers' ``design``, the C++ knobs as the C++ ops' ``path`` / ``block_rows``, both
from ``ops/petal_linear/backends.py``); ``build`` and ``cache_dir`` are read by ``_ext`` when it loads.
Variables that are not petal_fast's are read where they are used (docs/design.md §3.4).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from petal_fast import threads as _threads
from petal_fast.definitions.petal_linear import TRITON_DESIGNS

BACKENDS = ("reference", "torch", "cpp", "triton")
BACKEND_CHOICES = ("auto",) + BACKENDS
BUILD_MODES = ("auto", "never", "always")
CPU_PATHS = ("auto", "blocked", "whole")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

ENV = {"backend": "PETAL_FAST_BACKEND", "build": "PETAL_FAST_BUILD", "cache_dir": "PETAL_FAST_CACHE_DIR",
       "progress_interval": "PETAL_FAST_PROGRESS_INTERVAL", "debug": "PETAL_FAST_DEBUG",
       "triton_design": "PETAL_FAST_TRITON_DESIGN", "cpu_path": "PETAL_FAST_CPU_PATH",
       "cpu_block_rows": "PETAL_FAST_CPU_BLOCK_ROWS", "threads": "PETAL_FAST_THREADS"}


def _choice(allowed: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, name: str) -> str:
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        return text
    return parse


def _design(value: Any, name: str) -> str | None:
    return None if value is None else _choice(TRITON_DESIGNS)(value, name)


def _seconds(value: Any, name: str) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        seconds = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds >= 0; got {value!r}") from None
    if not seconds >= 0 or seconds == float("inf"):  # also NaN
        raise ValueError(f"{name} must be a number of seconds >= 0; got {value!r}")
    return seconds


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{name} must be one of {', '.join(_TRUE)} (on) or {', '.join(_FALSE)} (off); got {value!r}")


def _folder(value: Any, name: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"{name} must be a folder path (or None for the default); got {value!r}")
    return Path(str(value).strip()).expanduser()


def _count(what: str, power: int) -> Callable[[Any, str], int]:
    """0 (automatic) or a positive whole number below 2**power."""
    def parse(value: Any, name: str) -> int:
        n = value.strip() if isinstance(value, str) else value
        if isinstance(n, str) and n.isdecimal():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**power:
            raise ValueError(f"{name} must be 0 (automatic) or a positive whole number of {what} (< 2**{power}); "
                             f"got {value!r}")
        return n
    return parse


_PARSE: dict[str, Callable[[Any, str], Any]] = {
    "backend": _choice(BACKEND_CHOICES), "build": _choice(BUILD_MODES), "cache_dir": _folder,
    "progress_interval": _seconds, "debug": _flag, "triton_design": _design, "cpu_path": _choice(CPU_PATHS),
    "cpu_block_rows": _count("rows", 31), "threads": _count("threads", 16)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings in force (see the module docstring); every instance is validated and normalised."""
    backend: str = "auto"
    build: str = "auto"
    cache_dir: Path | None = None
    progress_interval: float = 30.0
    debug: bool = False
    triton_design: str | None = None
    cpu_path: str = "auto"
    cpu_block_rows: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        for field, parse in _PARSE.items():
            object.__setattr__(self, field, parse(getattr(self, field), f"{field} ({ENV[field]})"))


def parse(field: str, value: Any, name: str | None = None) -> Any:
    """``value`` checked and normalised as ``field`` would be; errors call it ``name`` (default: the field).
    For APIs that take one setting as an argument, such as ``use_backend(name)``."""
    return _PARSE[field](value, name or field)


def from_environ(environ: Mapping[str, str]) -> Settings:
    """The settings ``environ`` asks for: each variable that is set and not empty, else the default."""
    values = {}
    for field, var in ENV.items():
        raw = environ.get(var, "")
        if raw.strip():
            values[field] = _PARSE[field](raw, var)
    return Settings(**values)


class _Blocks(threading.local):
    """This thread's ``override`` blocks, innermost last: (the changes of the block and of those around
    it, the settings in force inside). A list that always exists (a lazily created one would change what
    a compiled graph's guards see after the first block, and force a recompile)."""

    def __init__(self) -> None:
        self.stack: list[tuple[dict, Settings]] = []


_blocks = _Blocks()
PROCESS_ONLY = ("threads",)  # torch's process-wide pool: configure() only


def current() -> Settings:
    """The settings in force on this thread: its innermost ``override`` block's, else the process's."""
    stack = _blocks.stack
    return stack[-1][1] if stack else _current


def _check_names(changes: Mapping[str, Any], what: str) -> None:
    unknown = sorted(set(changes) - set(ENV))
    if unknown:
        raise TypeError(f"{what}: unknown setting(s) {', '.join(unknown)}; the settings are {', '.join(ENV)}")


def configure(**changes: Any) -> Settings:
    """Replace the named fields for the process (validated together: a bad value changes nothing);
    returns the settings now in force on this thread. This thread's ``override`` blocks keep their own
    fields on top; other threads' blocks see the change when they end."""
    global _current
    _check_names(changes, "configure")
    with _lock:
        new = dataclasses.replace(_current, **changes)
        _current = new
        _push(new)
        stack = _blocks.stack
        stack[:] = [(fields, dataclasses.replace(new, **fields)) for fields, _ in stack]
    return current()


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """The settings with ``changes`` (validated together) for the calls this thread makes inside the
    ``with`` block; blocks nest, the innermost wins, and other threads are not affected. ``threads`` is
    the size of torch's process-wide thread pool: change it with ``configure(threads=n)``."""
    _check_names(changes, "override")
    process = sorted(set(changes) & set(PROCESS_ONLY))
    if process:
        raise ValueError(f"override: {', '.join(process)} sizes torch's process-wide thread pool, which a block of "
                         f"one thread cannot change; use petal_fast.settings.configure({process[0]}=...)")
    stack = _blocks.stack
    fields = {**(stack[-1][0] if stack else {}), **changes}
    new = dataclasses.replace(_current, **fields)
    stack.append((fields, new))
    try:
        yield new
    finally:
        stack.pop()


def _push(new: Settings) -> None:
    """Size torch's thread pool (the one setting that is torch's state, not read by our code)."""
    _threads.apply(new.threads)


class SettingsError(ValueError):
    """A ``PETAL_FAST_*`` variable with a value it cannot take; the message names variable, value and choices."""


def _command_line() -> bool:
    """Whether this process is a petal_fast command (``petal-fast``, ``python -m petal_fast.…``, torchrun of
    one), whose user errors are one line and exit status 2 rather than a traceback."""
    if os.path.basename(sys.argv[0]).removesuffix(".exe") == "petal-fast":
        return True
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b.split(".")[0] == "petal_fast" for a, b in zip(argv, argv[1:]))


def _at_import() -> Settings:
    """The settings of the environment at import. A bad value stops the import (SettingsError); in a
    petal_fast command it is the command's one-line error instead (status 2, as any user error;
    ``PETAL_FAST_DEBUG=1`` shows the traceback)."""
    try:
        return from_environ(os.environ)
    except ValueError as err:
        if _command_line() and os.environ.get("PETAL_FAST_DEBUG", "").strip().lower() not in _TRUE:
            print(f"petal-fast: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        raise SettingsError(str(err)) from None


_lock = threading.Lock()
_current = _at_import()
_push(_current)
