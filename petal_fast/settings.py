"""Every petal_fast setting in one frozen object, read from the environment once, at import
(docs/design.md §3.4; the fields, variables and values: :data:`ENV`, :class:`Settings` and the
README's Settings table).

``current()`` is the :class:`Settings` in force, a plain attribute read (torch.compile traces and
guards on it). ``configure(**changes)`` replaces fields for the rest of the process; ``with
override(**changes):`` for a block (the fields it changed come back on exit). Changing
``os.environ`` after import has no effect. An empty variable counts as unset; a bad value raises at
import (:class:`SettingsError`, or a petal_fast command's one-line error), naming the variable, the
value and what it may be. The scoped APIs sit on top: ``use_backend(name)`` (per thread, wins over
``backend``), ``use_design(name)`` (wins over ``triton_design``), ``cpu_tuning(path, block_rows)``.

This module imports nothing of petal_fast but ``definitions`` and ``threads``: the layers that use a
setting read it when they run, and those below what may import it get it as an argument. The Triton
design reaches ``kernels/`` as the ``design`` argument of its launchers (``ops/petal_linear/backends.py``);
the C++ knobs reach ``csrc/petal_linear.cpp`` through its ``petal_linear_cpu_tuning`` op, called by the
same table before a C++ call when they changed; ``build`` and ``cache_dir`` are read by ``_ext`` when it
loads. ``threads`` is torch's state: ``configure`` applies it with ``torch.set_num_threads``.
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


def current() -> Settings:
    """The settings in force (a plain attribute read: torch.compile traces and guards on it)."""
    return _current


def configure(**changes: Any) -> Settings:
    """Replace the named fields for the rest of the process (validated together: a bad value changes
    nothing); returns the settings now in force."""
    global _current
    unknown = sorted(set(changes) - set(ENV))
    if unknown:
        raise TypeError(f"configure: unknown setting(s) {', '.join(unknown)}; the settings are {', '.join(ENV)}")
    with _lock:
        new = dataclasses.replace(_current, **changes)
        _current = new
        _push(new)
    return new


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """``configure(**changes)`` inside a ``with`` block; on exit the fields it changed get back the
    values they had when it began (others changed meanwhile are kept). Process-wide, like what it
    sets: for scripts, benchmarks and tests, not for threads that want different values at once."""
    before = {field: getattr(_current, field) for field in changes if field in ENV}
    new = configure(**changes)
    try:
        yield new
    finally:
        configure(**before)


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
