"""Progress bars that suit both a terminal and a log: the one place petal_fast makes them.

In a terminal a bar redraws as tqdm usually does. When its stream is not a terminal (CI, ``nohup``,
a cluster job's log file) every redraw would be one more carriage-return line in the log, so the bar
writes at most once per ``progress_interval`` seconds (:mod:`petal_fast.settings`: default 30,
``PETAL_FAST_PROGRESS_INTERVAL`` or ``settings.configure(progress_interval=...)``), plus its final state.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

from petal_fast import settings


def log_interval() -> float:
    """Seconds between redraws of a bar that writes to a log (the ``progress_interval`` setting)."""
    return settings.current().progress_interval


def is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False


def progress(iterable: Iterable | None = None, **kwargs: Any):
    """``tqdm(iterable, **kwargs)``, redrawn rarely when its stream (``file``, default stderr) is not
    a terminal: ``mininterval`` (and the monitor thread's ``maxinterval``) become ``log_interval()``
    seconds, the width is fixed and the bar is ASCII. Explicit keyword arguments win."""
    if "ipykernel" in sys.modules and "file" not in kwargs:  # a notebook: tqdm's widget, as tqdm.auto does
        from tqdm.auto import tqdm
        return tqdm(iterable, **kwargs)
    from tqdm import tqdm

    stream = kwargs.get("file") or sys.stderr
    if not is_terminal(stream):
        interval = log_interval()
        kwargs.setdefault("mininterval", interval)
        kwargs.setdefault("maxinterval", max(interval, kwargs["mininterval"]))
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", True)
        kwargs.pop("dynamic_ncols", None)  # a log has no width to follow
    return tqdm(iterable, **kwargs)
